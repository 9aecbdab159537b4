"""The GPU install of the README (`make gpu`: onnxruntime-gpu[cuda,cudnn] from PyPI) checked on a
machine without a GPU, in its own venv (.venv-gpu, `make gpu-env`): the daemon finds ONNX
Runtime's CUDA provider and every library it needs in that environment by itself, with no
LD_LIBRARY_PATH, and asked for `cuda` it says there is no CUDA device, not that a library is
missing. On a GPU machine, docs/GPU.md's script runs the provider for real."""

import json
import os
import struct
import subprocess
from pathlib import Path

import pytest
from liveomics_testkit import ROOT, merged, run, sim_config, toml_text

GPU_VENV = ROOT / ".venv-gpu"
# The driver's library: installed with the NVIDIA driver, never from PyPI.
DRIVER = "libcuda.so.1"


def capi() -> Path:
    found = sorted(GPU_VENV.glob("lib/python3*/site-packages/onnxruntime/capi"))
    if not found:
        pytest.skip("skipped: no .venv-gpu (run `make gpu-env`)")
    return found[0]


def needed(elf: Path) -> list[str]:
    """DT_NEEDED of a 64-bit little-endian ELF shared library (what the loader must find)."""
    b = elf.read_bytes()
    assert b[:4] == b"\x7fELF" and b[4] == 2 and b[5] == 1, elf
    shoff, = struct.unpack_from("<Q", b, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", b, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", b, shoff + i * shentsize) for i in range(shnum)]
    dynamic = next(s for s in sections if s[1] == 6)  # SHT_DYNAMIC
    strtab = sections[dynamic[6]]  # sh_link: its string table
    out = []
    for off in range(dynamic[4], dynamic[4] + dynamic[5], 16):
        tag, val = struct.unpack_from("<qQ", b, off)
        if tag == 0:
            break
        if tag == 1:  # DT_NEEDED
            start = strtab[4] + val
            out.append(b[start:b.index(b"\0", start)].decode())
    return out


def system_libraries() -> set[str]:
    p = subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True, text=True)
    return {line.split()[0] for line in p.stdout.splitlines()[1:] if line.strip()}


def test_the_daemon_finds_what_the_cuda_provider_needs_and_says_no_device(binary, tmp_path):
    lib = sorted(capi().glob("libonnxruntime.so.*"))[-1]
    cfg = tmp_path / "g.toml"
    cfg.write_text(toml_text(merged(sim_config(plate="gpu", wells=("B2",), fields=3, size=128), {
        "segmentation": {"method": "classical"},
        "pipeline": {"stages": ["segment", "measure", "inference"]},
        "inference": {"providers": ["cuda:0", "cpu"], "models": [
            {"name": "omics", "path": str(ROOT / "models" / "cell_omics_cnn"), "role": "cell-omics"}]},
    })))
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    env["ORT_DYLIB_PATH"] = str(lib)
    p = run(binary, "doctor", "--config", cfg, "--json", "--fields", 3, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout)
    o = r["onnx_runtime"]
    assert o["library"] == str(lib) and ["cuda", True] in o["providers_in_library"], o

    # Every library the provider links resolves from this environment, the driver's aside.
    loaded = {Path(f).name for f in o["nvidia_loaded"]}
    beside = {f.name for f in lib.parent.iterdir()}
    system = system_libraries()
    provider = lib.parent / "libonnxruntime_providers_cuda.so"
    deps = needed(provider)
    assert DRIVER in deps and "libcublas.so.13" in deps, deps
    missing = [d for d in deps if d != DRIVER and d not in loaded | beside | system]
    assert not missing, (missing, sorted(loaded))
    # cuDNN is loaded by name at run time, not linked: it must be there too.
    assert {"libcudnn.so.9", "libcudnn_ops.so.9", "libcudnn_cnn.so.9"} <= loaded, sorted(loaded)
    # Only what needs the driver itself failed to load.
    for f, why in o["nvidia_failed"]:
        assert DRIVER in why, (f, why)

    # Asked for cuda:0 here: no device, said plainly, and the model runs on the CPU.
    if DRIVER not in system:
        assert o["cuda_provider"] == {"Err": o["cuda_provider"]["Err"]}
        assert o["cuda_provider"]["Err"].startswith("no CUDA device"), o["cuda_provider"]
        (m,) = r["models"]
        assert m["provider"] == {"Ok": "cpu"}
        assert len(m["skipped"]) == 1 and m["skipped"][0].startswith("cuda:0: no CUDA device"), m
        assert "cannot open shared object file" not in m["skipped"][0].split(DRIVER)[0]
