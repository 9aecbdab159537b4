"""Runs bioimage.io's own checks on model descriptions, as a third-party user would: the spec's
validation with its file checks, then bioimageio.core's `test_description`, which loads the ONNX
weights in its runtime and reproduces each description's test tensors. Runs in .venv-bioimageio
(`make bioimageio`); prints one JSON line per description and exits 1 if any does not pass.

    .venv-bioimageio/bin/python tests/bioimageio_core_check.py models/*/bioimageio.yaml
"""

import json
import sys
import warnings
from pathlib import Path


def check(path: Path) -> dict:
    from bioimageio.core import test_description
    from bioimageio.spec import load_description

    d = load_description(path, perform_io_checks=True)
    out = {"model": str(path), "spec": d.validation_summary.status}
    if out["spec"] not in ("passed", "valid-format"):
        return {**out, "passed": False, "errors": d.validation_summary.format()[-4000:]}
    s = test_description(path)
    failed = [f"{e.loc}: {e.msg}" for det in s.details for e in det.errors]
    return {**out, "core": s.status, "passed": s.status == "passed", "errors": failed[:20]}


def main() -> int:
    paths = [Path(p) for p in sys.argv[1:]]
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    ok = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p in paths:
            r = check(p)
            ok &= r["passed"]
            print(json.dumps(r), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
