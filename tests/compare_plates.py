"""Do two liveomics plates hold the same results? Every array (raw and virtual channels at every
pyramid level, label images, the per-cell AnnData tables) must be equal element for element,
and every group's attributes equal except the acquisition timestamps. This is how a refactor
shows that it changed no output.

    python tests/compare_plates.py A.zarr B.zarr
    python tests/compare_plates.py --run OLD_BINARY NEW_BINARY [--config F]

`--run` writes the same plate with each binary (the embedded default config unless `--config`,
with the zenoh sink and the metrics endpoint off) and compares the two. Exit status 0 when the
plates are the same, 1 with the differences listed otherwise.
"""

import argparse
import json
import math
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import numpy as np
import zarr

#: Attributes that record when, not what: they differ between any two runs.
VOLATILE = {"acquired_unix_ns"}


def _normal(value, ignore=frozenset()):
    """Attributes without timestamps (and the keys in `ignore`); lists of `{path: …}` in path
    order (fields and wells are listed as they finish, and workers finish in either order)."""
    if isinstance(value, dict):
        return {k: _normal(v, ignore) for k, v in value.items() if k not in VOLATILE | ignore}
    if isinstance(value, list):
        items = [_normal(v, ignore) for v in value]
        if items and all(isinstance(v, dict) and "path" in v for v in items):
            items.sort(key=lambda v: str(v["path"]))
        return items
    return value


def _walk(group, prefix=""):
    yield prefix, group
    for name, member in sorted(group.members()):
        path = f"{prefix}/{name}" if prefix else name
        if isinstance(member, zarr.Group):
            yield from _walk(member, path)
        else:
            yield path, member


def compare(a: Path, b: Path, ignore=frozenset()) -> list[str]:
    """The differences between two plates; attribute keys in `ignore` are left out (a channel's
    display `window` is a running mean over the fields written so far, so it depends on the order
    fields were written in)."""
    left = dict(_walk(zarr.open_group(a, mode="r")))
    right = dict(_walk(zarr.open_group(b, mode="r")))
    problems = [f"only in {a}: {p}" for p in sorted(set(left) - set(right))]
    problems += [f"only in {b}: {p}" for p in sorted(set(right) - set(left))]
    arrays = groups = 0
    for path in sorted(set(left) & set(right)):
        x, y = left[path], right[path]
        if _normal(dict(x.attrs), ignore) != _normal(dict(y.attrs), ignore):
            problems.append(f"{path or '/'}: attributes differ")
        if isinstance(x, zarr.Group) != isinstance(y, zarr.Group):
            problems.append(f"{path}: a group in one plate, an array in the other")
            continue
        if isinstance(x, zarr.Group):
            groups += 1
            continue
        arrays += 1
        if x.shape != y.shape or x.dtype != y.dtype:
            problems.append(f"{path}: {x.shape} {x.dtype} vs {y.shape} {y.dtype}")
            continue
        u, v = np.asarray(x[...]), np.asarray(y[...])  # a 0-d string array reads as a str
        same = np.array_equal(u, v, equal_nan=True) if u.dtype.kind == "f" else np.array_equal(u, v)
        if not same:
            problems.append(f"{path}: values differ")
    print(f"compared {arrays} arrays and {groups} groups: {len(problems)} difference(s)")
    return problems


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_value(x)}" for k, x in v.items()) + " }"
    return "[" + ", ".join(_value(x) for x in v) + "]"


def dump_toml(d: dict, path: str = "") -> str:
    """TOML for a loaded config (tables, arrays of tables, scalars and lists): enough to write a
    config back with a few keys changed."""
    out, tables = [], []
    for k, v in d.items():
        key = f"{path}.{k}" if path else k
        if isinstance(v, dict):
            tables.append(f"\n[{key}]\n" + dump_toml(v, key))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            tables.extend(f"\n[[{key}]]\n" + dump_toml(x, key) for x in v)
        else:
            out.append(f"{json.dumps(k)} = {_value(v)}\n")
    return "".join(out) + "".join(tables)


def write_plate(binary: str, out: Path, config: str | None) -> Path:
    cfg = out.parent / f"{out.name}.toml"
    d = tomllib.loads(Path(config).read_text()) if config else {}
    d.setdefault("sinks", {}).setdefault("zenoh", {})["enabled"] = False
    d.setdefault("telemetry", {})["http_listen"] = ""
    cfg.write_text(dump_toml(d))
    p = subprocess.run([binary, "run", "--config", str(cfg), "--output", str(out)], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{binary} failed ({p.returncode}): {p.stderr[-2000:]}")
    plates = sorted(out.glob("*.zarr"))
    if len(plates) != 1:
        sys.exit(f"{binary} wrote {len(plates)} plates under {out}")
    return plates[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--run", action="store_true", help="a and b are binaries: write a plate with each")
    ap.add_argument("--config", help="with --run: the config to run (default: the embedded one)")
    args = ap.parse_args()
    if args.run:
        tmp = Path(tempfile.mkdtemp())
        a, b = write_plate(args.a, tmp / "a", args.config), write_plate(args.b, tmp / "b", args.config)
    else:
        a, b = Path(args.a), Path(args.b)
    problems = compare(a, b)
    for p in problems[:50]:
        print(" ", p)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
