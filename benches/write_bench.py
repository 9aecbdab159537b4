"""Write benchmark: liveomics' zarr write path vs acquire-zarr and tensorstore, same frames, same
layout, same machine, one script.

Frames: 2048x2048 uint16 fields from `liveomics simulate` (microscope-like: cells, noise, offset).
Layout for every writer: a (t, y, x) array, 512x512 chunks, one shard per frame, blosc-zstd level 1
with byte shuffle. Printed: MB/s (raw bytes / wall time), p99 per-frame latency (submission to durable in
the page cache), and the ratio of liveomics to each baseline. liveomics writes frames on its pool
(two in flight on two cores); acquire-zarr queues appends to its own thread pool; tensorstore runs
both one frame at a time and with two writes in flight (`tensorstore-x2`), so that the strongest
baseline is the one compared.

    .venv/bin/python benches/write_bench.py [--frames 64] [--binary target/release/liveomics]
"""

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

SIZE, CHUNK, LEVEL = 2048, 512, 1


def simulate(binary: Path, work: Path) -> list[Path]:
    cfg = work / "sim.toml"
    cfg.write_text(
        f"""
[source.simulator]
plate = "bench"
wells = ["B2", "B3"]
control_wells = ["B2"]
fields_per_well = 2
width_px = {SIZE}
height_px = {SIZE}
"""
    )
    subprocess.run([binary, "simulate", "--config", cfg, "--out", work / "sim"], check=True, capture_output=True)
    return sorted((work / "sim" / "images").glob("*.tif"))


def stats(times_ms: list[float], nbytes: int, seconds: float) -> dict:
    t = np.sort(np.asarray(times_ms))
    return {
        "mb_per_s": nbytes / 1e6 / seconds,
        "p50_frame_ms": float(np.percentile(t, 50)),
        "p99_frame_ms": float(np.percentile(t, 99)),
        "seconds": seconds,
    }


def bench_acquire_zarr(frames: list[np.ndarray], n: int, out: Path) -> dict:
    import acquire_zarr as az

    settings = az.StreamSettings(
        store_path=str(out),
        overwrite=True,
        arrays=[
            az.ArraySettings(
                dimensions=[
                    az.Dimension(name="t", kind=az.DimensionType.TIME, array_size_px=0, chunk_size_px=1, shard_size_chunks=1),
                    az.Dimension(name="y", kind=az.DimensionType.SPACE, array_size_px=SIZE, chunk_size_px=CHUNK, shard_size_chunks=SIZE // CHUNK),
                    az.Dimension(name="x", kind=az.DimensionType.SPACE, array_size_px=SIZE, chunk_size_px=CHUNK, shard_size_chunks=SIZE // CHUNK),
                ],
                data_type=az.DataType.UINT16,
                compression=az.CompressionSettings(
                    compressor=az.Compressor.BLOSC1, codec=az.CompressionCodec.BLOSC_ZSTD, level=LEVEL, shuffle=1
                ),
            )
        ],
    )
    stream = az.ZarrStream(settings)
    times = []
    start = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        stream.append(frames[i % len(frames)])
        times.append((time.perf_counter() - t0) * 1e3)
    stream.close()  # acquire-zarr flushes at close: its wall time includes it
    return stats(times, n * SIZE * SIZE * 2, time.perf_counter() - start)


def bench_tensorstore(frames: list[np.ndarray], n: int, out: Path, in_flight: int = 1) -> dict:
    import tensorstore as ts

    spec = {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(out)},
        "metadata": {
            "shape": [n, SIZE, SIZE],
            "data_type": "uint16",
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1, SIZE, SIZE]}},
            "codecs": [
                {
                    "name": "sharding_indexed",
                    "configuration": {
                        "chunk_shape": [1, CHUNK, CHUNK],
                        "codecs": [
                            {"name": "bytes", "configuration": {"endian": "little"}},
                            {"name": "blosc", "configuration": {"cname": "zstd", "clevel": LEVEL, "shuffle": "shuffle",
                                                                "typesize": 2, "blocksize": 0}},
                        ],
                        "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                    },
                }
            ],
        },
        "create": True,
        "delete_existing": True,
    }
    arr = ts.open(spec).result()
    times = []
    pending = []  # (future, submitted at)
    start = time.perf_counter()
    for i in range(n):
        pending.append((arr[i].write(frames[i % len(frames)]), time.perf_counter()))
        while len(pending) >= in_flight:
            fut, t0 = pending.pop(0)
            fut.result()
            times.append((time.perf_counter() - t0) * 1e3)
    for fut, t0 in pending:
        fut.result()
        times.append((time.perf_counter() - t0) * 1e3)
    return stats(times, n * SIZE * SIZE * 2, time.perf_counter() - start)


def bench_liveomics(binary: Path, files: list[Path], n: int, out: Path) -> dict:
    repeat = -(-n // len(files))
    proc = subprocess.run(
        [binary, "bench-write", "--out", out, "--repeat", str(repeat), "--chunk-px", str(CHUNK), "--level", str(LEVEL), *files],
        check=True,
        capture_output=True,
        text=True,
    )
    r = json.loads(proc.stdout)
    return {k: r[k] for k in ("mb_per_s", "p50_frame_ms", "p99_frame_ms", "seconds")} | {"frames": r["frames"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--binary", type=Path, default=Path("target/release/liveomics"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="liveomics-bench-"))
    try:
        files = simulate(args.binary.resolve(), work)
        frames = [tifffile.imread(f) for f in files]
        n = len(files) * -(-args.frames // len(files))
        results = {
            "liveomics": bench_liveomics(args.binary.resolve(), files, n, work / "lo.zarr"),
            "acquire-zarr": bench_acquire_zarr(frames, n, work / "az.zarr"),
            "tensorstore": bench_tensorstore(frames, n, work / "ts.zarr"),
            "tensorstore-x2": bench_tensorstore(frames, n, work / "ts2.zarr", in_flight=2),
        }
        print(f"{n} frames of {SIZE}x{SIZE} uint16, {CHUNK}^2 chunks, shard per frame, blosc-zstd {LEVEL} + shuffle")
        print(f"{'writer':<14}{'MB/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
        for name, r in results.items():
            print(f"{name:<14}{r['mb_per_s']:>10.0f}{r['p50_frame_ms']:>10.1f}{r['p99_frame_ms']:>10.1f}")
        lo = results["liveomics"]
        for base in ("acquire-zarr", "tensorstore", "tensorstore-x2"):
            b = results[base]
            print(
                f"liveomics / {base}: throughput {lo['mb_per_s'] / b['mb_per_s']:.2f}x, "
                f"p99 latency {b['p99_frame_ms'] / lo['p99_frame_ms']:.2f}x (higher is better for liveomics)"
            )
        # Same pixels everywhere: a quick check that the writers agree.
        import zarr

        a = zarr.open_array(work / "lo.zarr" / "frames", mode="r")
        np.testing.assert_array_equal(a[1], frames[1])
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
