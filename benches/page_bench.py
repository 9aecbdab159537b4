"""What the live plate page costs the pipeline (issue 20): the same plate run alternately with the
HTTP server off, and with it on and the page open in headless Chromium (a well selected, so that
every change re-renders the heatmap and refetches that well's thumbnails), ROUNDS times each in
this one script. Prints fields/s (fields done over the time from the first to the last `field
done`) and latency p50/p99 per run, and the medians per setting.

    .venv/bin/python benches/page_bench.py [--config config/models.toml] [--rounds 3]
"""

import argparse
import copy
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from datetime import datetime

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from compare_plates import dump_toml  # noqa: E402
from liveomics_testkit import free_port  # noqa: E402

FIELD = re.compile(r"(\w+)=(\"[^\"]*\"|\S+)")
STAMP = re.compile(r"^(\S+Z)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def parse(stderr: str):
    times, lat = [], []
    for line in stderr.splitlines():
        if "field done" in line:
            kv = {k: v.strip('"') for k, v in FIELD.findall(line)}
            lat.append(float(kv["latency_ms"]))
            m = STAMP.match(line)
            if m:
                times.append(datetime.fromisoformat(m[1].replace("Z", "+00:00")).timestamp())
    span = max(times) - min(times) if len(times) > 1 else float("nan")
    return (len(times) - 1) / span, pct(lat, 0.5), pct(lat, 0.99)


def browse(port: int, stop: threading.Event):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = b.new_page()
        for _ in range(100):
            try:
                page.goto(f"http://127.0.0.1:{port}/")
                break
            except Exception:  # noqa: BLE001 - the server is not up yet
                time.sleep(0.05)
        page.wait_for_selector(".well.has-data", timeout=60_000)
        page.click(".well.has-data")
        while not stop.is_set():
            page.wait_for_timeout(100)
        b.close()


def run(binary, base, tmp, page: bool):
    d = copy.deepcopy(base)
    d.setdefault("sinks", {}).setdefault("zarr", {})["output"] = str(tmp / "out")
    port = free_port()
    d.setdefault("telemetry", {})["http_listen"] = f"127.0.0.1:{port}" if page else ""
    for m in d.get("inference", {}).get("models", []):
        m["path"] = str((ROOT / "config" / m["path"]).resolve())  # relative to the config file
    cfg = tmp / "run.toml"
    cfg.write_text(dump_toml(d))
    stop = threading.Event()
    viewer = threading.Thread(target=browse, args=(port, stop)) if page else None
    proc = subprocess.Popen([str(binary), "run", "--overwrite", "--config", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "NO_COLOR": "1"})
    if viewer:
        viewer.start()
    out, err = proc.communicate()
    stop.set()
    if viewer:
        viewer.join()
    if proc.returncode != 0:
        raise SystemExit(err[-3000:])
    return parse(err)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=pathlib.Path, default=ROOT / "config" / "models.toml")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--binary", type=pathlib.Path, default=ROOT / "target" / "release" / "liveomics")
    args = ap.parse_args()
    if CHROMIUM is None:
        raise SystemExit("no chromium: make browser")
    base = tomllib.loads(args.config.read_text())
    results = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for page in (False, True):
                fps, p50, p99 = run(args.binary, base, pathlib.Path(tmp), page)
                results[page].append((fps, p50, p99))
                print(f"round {r + 1} page {'open' if page else 'off '}: {fps:.2f} fields/s, "
                      f"latency p50 {p50:.0f} ms, p99 {p99:.0f} ms", flush=True)
    med = {k: [statistics.median(x[i] for x in v) for i in range(3)] for k, v in results.items()}
    off, on = med[False], med[True]
    print(f"{args.config.relative_to(ROOT)}, medians of {args.rounds}: fields/s {off[0]:.2f} off, {on[0]:.2f} with the "
          f"page open ({on[0] / off[0]:.2f}x); latency p99 {off[2]:.0f} ms off, {on[2]:.0f} ms open "
          f"({on[2] / off[2]:.2f}x)")


if __name__ == "__main__":
    main()
