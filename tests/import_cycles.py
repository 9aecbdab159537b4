"""Import loops between the files of a Rust crate's `src/`: which files reach each other through
`crate::` paths (in `use` lines or written out in code), grouped into strongly connected
components. Issue 17 asks that no loop in `daemon/src` span more than 2 files.

    python3 tests/import_cycles.py [daemon/src]

Prints every component of more than one file, largest first, and exits 1 if one has more than
`--max` files (default: report only).
"""

import argparse
import re
import sys
from pathlib import Path


def module_of(src: Path, path: Path) -> str:
    rel = path.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return "::".join(parts) or "crate"


def edges(src: Path) -> dict[str, set[str]]:
    files = {module_of(src, p): p for p in src.rglob("*.rs")}
    out: dict[str, set[str]] = {m: set() for m in files}
    ref = re.compile(r"crate::((?:[a-z_][a-z0-9_]*)(?:::[a-z_][a-z0-9_]*)*)")
    for m, p in files.items():
        text = re.sub(r"//[^\n]*", "", p.read_text())
        # `super::x` inside a module file names a sibling module.
        parent = m.rsplit("::", 1)[0] if "::" in m else ""
        targets = [t for t in ref.findall(text)]
        targets += [f"{parent}::{t}" if parent else t for t in re.findall(r"super::([a-z_][a-z0-9_]*)", text)]
        for t in targets:
            parts = t.split("::")
            # The longest prefix that is a file's module.
            for n in range(len(parts), 0, -1):
                cand = "::".join(parts[:n])
                if cand in files and cand != m:
                    out[m].add(cand)
                    break
    return out


def components(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, comps = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            comps.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return sorted((c for c in comps if len(c) > 1), key=len, reverse=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("src", nargs="?", default=str(Path(__file__).resolve().parent.parent / "daemon" / "src"))
    ap.add_argument("--max", type=int, default=0, help="fail if a loop spans more files (0: report only)")
    args = ap.parse_args()
    src = Path(args.src)
    graph = edges(src)
    comps = components(graph)
    print(f"{len(graph)} files in {src}; {len(comps)} import loop(s)")
    for c in comps:
        print(f"  {len(c)} files: {', '.join(c)}")
    if args.max and comps and len(comps[0]) > args.max:
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
