#!/usr/bin/env bash
# Packs, on this machine, what a lent GPU machine needs for benches/gpu/device_check.sh
# (docs/GPU.md, "On a device"): the daemon and the two GPU test binaries, stripped and compressed,
# and ONNX Runtime's GPU build (from .venv-gpu, `make gpu-env`) as a compressed tar split into
# parts that fit the device tool's 64 MiB per call (tracked files, about 31 MiB, count too). The NVIDIA libraries themselves are not
# carried: the device's PyTorch wheels have them (device_check.sh links them in).
#
#   benches/gpu/pack.sh            # then carry gpu-bin/ as the script prints
set -euo pipefail
cd "$(dirname "$0")/../.."
out=gpu-bin
rm -rf "$out" && mkdir -p "$out/parts"

cargo build --release --locked
kernels=$(cargo test --release --locked -p liveomics-kernels --lib --no-run 2>&1 | grep -o 'target/release/deps/liveomics_kernels-[0-9a-f]*' | tail -1)
instanseg=$(cargo test --release --locked -p liveomics --test it --no-run 2>&1 | grep -o 'target/release/deps/it-[0-9a-f]*' | tail -1)
pack() {  # strip and compress $1 into $out/$2.zst
    cp "$1" "$out/$2" && strip "$out/$2" && zstd -q -19 -T0 --rm -f "$out/$2" -o "$out/$2.zst"
}
pack target/release/liveomics liveomics
pack "$kernels" kernels-tests
pack "$instanseg" instanseg-tests

capi=$(ls -d .venv-gpu/lib/python3*/site-packages/onnxruntime/capi 2>/dev/null | head -1 || true)
if [ -n "$capi" ]; then
    tar -C "$capi" -cf - libonnxruntime.so.1.31.1 libonnxruntime_providers_shared.so libonnxruntime_providers_cuda.so \
        | zstd -q -19 -T0 | split -b 28M - "$out/parts/ort.tar.zst."
else
    echo "no .venv-gpu: run \`make gpu-env\` to carry ONNX Runtime's CUDA provider too" >&2
fi
du -b "$out"/*.zst "$out"/parts/* | awk '{printf "%8.1f MiB  %s\n", $1 / 1048576, $2}'
echo "carry in the first call: gpu-bin/*.zst (with the repo); then one gpu-bin/parts/ort.tar.zst.* per call,"
echo "then: bash benches/gpu/device_check.sh (the parts stay on the machine while it is warm)"
