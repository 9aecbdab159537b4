#!/usr/bin/env bash
# The GPU checks, in one script for a lent device (docs/GPU.md): CUDA kernel parity with the CPU
# reference, InstanSeg's post-processing parity, ONNX Runtime's CUDA provider on every shipped
# model (their own test tensors), and timings: InstanSeg on a 2160² field and the reference
# models' pipeline, each on the GPU and on the same machine's CPU. Two files come back in $OUT
# (the device tool returns at most 8): device_check.log, every step's output under a header, and
# doctor.jsonl, one `doctor --json` report per line.
# Carry gpu-bin/ first (benches/gpu/pack.sh). Without a GPU it runs too, and says why each GPU
# part fell back.
set -u
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
log="$out/device_check.log"
tmp=$(mktemp -d)
say() { echo "== $*" | tee -a "$log"; }
step() {  # step NAME CMD...: runs CMD, appends its output to the log, never stops the script
    say "$1"
    shift
    ( "$@" ) >>"$log" 2>&1
    echo "exit $?" | tee -a "$log"
}
doctor() {  # doctor NAME ARGS...: one JSON line per report in doctor.jsonl, its log in the log
    say "doctor $1"
    local name=$1
    shift
    "$bin" doctor --json "$@" 2>>"$log" | sed "s/^{/{\"check\":\"$name\",/" >>"$out/doctor.jsonl"
    echo "exit ${PIPESTATUS[0]}" | tee -a "$log"
}

: >"$log"
: >"$out/doctor.jsonl"
nvidia-smi >>"$log" 2>&1 || echo "no nvidia-smi" >>"$log"
for f in gpu-bin/*.zst; do
    zstd -q -d -f "$f" -o "${f%.zst}" && chmod +x "${f%.zst}"
done
bin=gpu-bin/liveomics

# ONNX Runtime's GPU build, from its parts, beside the NVIDIA libraries of the device's PyTorch.
if ls gpu-bin/parts/ort.tar.zst.* >/dev/null 2>&1; then
    mkdir -p gpu-bin/ort/onnxruntime/capi
    cat gpu-bin/parts/ort.tar.zst.* | zstd -q -d | tar -x -C gpu-bin/ort/onnxruntime/capi
    sp=$(python3 -c 'import pathlib, torch; print(pathlib.Path(torch.__file__).parents[1])' 2>/dev/null || true)
    [ -n "$sp" ] && [ -d "$sp/nvidia" ] && ln -sfn "$sp/nvidia" gpu-bin/ort/nvidia
    export ORT_DYLIB_PATH=$PWD/gpu-bin/ort/onnxruntime/capi/libonnxruntime.so.1.31.1
    say "ONNX Runtime GPU build: $ORT_DYLIB_PATH (NVIDIA libraries from ${sp:-nowhere})"
fi

step "kernels parity" gpu-bin/kernels-tests gpu --nocapture
step "instanseg post-processing parity" gpu-bin/kernels-tests instanseg --nocapture
step "instanseg on its test tensors" gpu-bin/instanseg-tests instanseg::cuda --nocapture
doctor default
# Absolute 1e-2: the U-Net's outputs reach 5200 (float32 rounding alone differs by 4e-3 between
# CPUs); the errors printed per output are the figures to read.
step "models check cuda" "$bin" models check --providers cuda:0,cpu --runs 20 --tolerance 0.01 models/virtual_stain_unet \
    models/proticelli_tiny models/cell_omics_cnn models/well_omics_mil models/instanseg_fluorescence
step "models check cpu" "$bin" models check --providers cpu --runs 20 --tolerance 0.01 models/virtual_stain_unet \
    models/proticelli_tiny models/cell_omics_cnn models/well_omics_mil models/instanseg_fluorescence

# InstanSeg on 2160² fields, then the reference models' pipeline: on the GPU, and on this
# machine's CPU as the baseline.
for dev in gpu cpu; do
    if [ $dev = gpu ]; then providers='["cuda:0", "cpu"]'; device=auto; else providers='["cpu"]'; device=cpu; fi
    cat >"$tmp/instanseg-$dev.toml" <<TOML
latency_budget_ms = 60000
[source.simulator]
width_px = 2160
height_px = 2160
[segmentation]
method = "instanseg"
model = "$PWD/models/instanseg_fluorescence"
[compute]
device = "$device"
[inference]
providers = $providers
TOML
    doctor "instanseg-2160-$dev" --config "$tmp/instanseg-$dev.toml" --fields 4
    sed -e "s#^path = \"../models/#path = \"$PWD/models/#" -e "s#^providers = .*#providers = $providers#" \
        config/models.toml >"$tmp/models-$dev.toml"
    printf '[compute]\ndevice = "%s"\n' "$device" >>"$tmp/models-$dev.toml"
    doctor "models-$dev" --config "$tmp/models-$dev.toml" --fields 12
done
say "done: $out"
