"""pytest's hooks and fixtures for the end-to-end tests, which run the real `liveomics` binary and
read what it writes and publishes with the Python tools users run (zarr-python, ome-zarr-models,
eclipse-zenoh, pyarrow, tifffile). What tests and benchmarks share is `liveomics_testkit.py`."""

import os
from pathlib import Path

import pytest
from liveomics_testkit import BIN, ROOT


def pytest_configure(config):
    """CI sets LIVEOMICS_REQUIRE_ALL (`.ci/run`): there, ../shared and the Micro-Manager test
    adapters are always installed, so a test that would skip or quietly drop a case for want of
    them means a broken setup, and the run stops here instead."""
    if not os.environ.get("LIVEOMICS_REQUIRE_ALL"):
        return
    missing = []
    if not (ROOT.parent / "shared" / "models" / "unet2d_nuclei_broad").exists():
        missing.append("../shared/models/unet2d_nuclei_broad")
    if not (ROOT / ".cache" / "real-data" / "dsb2018_img2d.tif").exists():
        missing.append(".cache/real-data (make real-data)")
    if not (ROOT / ".venv-bioimageio" / "bin" / "python").exists():
        missing.append(".venv-bioimageio (make bioimageio)")
    if not list((ROOT / ".venv-gpu").glob("lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so*")):
        missing.append(".venv-gpu (make gpu-env)")
    for module in ("pymmcore_plus", "mm_test_adapters"):
        try:
            __import__(module)
        except ImportError as e:
            missing.append(f"{module} ({e})")
    if missing:
        raise pytest.UsageError(f"LIVEOMICS_REQUIRE_ALL is set but these are missing: {', '.join(missing)}")


@pytest.fixture(scope="session")
def binary() -> Path:
    if not BIN.exists():
        pytest.fail(f"{BIN} not built: run `make build` (or `make test`, which builds it)")
    return BIN
