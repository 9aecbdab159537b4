//! `liveomics bench-write`: the zarr sink's write path on its own, for `benches/write_bench.py`,
//! which runs acquire-zarr and tensorstore on the same frames in the same script and prints the
//! ratios. Frames come from TIFF files so every writer gets identical bytes.

use std::path::{Path, PathBuf};
use std::time::Instant;

use liveomics_adapters::tiff_io::{read_plane, Plane};
use rayon::prelude::*;
use zarrs::array::data_type;

use crate::config::{Compression, ZarrSinkConfig};
use crate::sink::zarr::node::{store_plane, Store};
use crate::sink::SinkError;

/// Problems running the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Tiff(#[from] liveomics_adapters::tiff_io::TiffError),
    #[error("{0} is not a uint16 image")]
    NotU16(PathBuf),
    #[error("frames differ in size: {0}")]
    Size(PathBuf),
    #[error("no frames given")]
    Empty,
    #[error(transparent)]
    Sink(#[from] SinkError),
}

/// Result of one run, printed as JSON.
#[derive(Debug, serde::Serialize)]
pub struct BenchResult {
    pub frames: usize,
    pub bytes: u64,
    pub seconds: f64,
    pub mb_per_s: f64,
    pub p50_frame_ms: f64,
    pub p99_frame_ms: f64,
}

/// Writes `repeat` passes over `inputs` as a `(t, y, x)` uint16 array with one shard per frame,
/// `chunk_px` subchunks and blosc-zstd (level `level`, byte shuffle): the benchmark's layout.
pub fn write_frames(
    inputs: &[PathBuf],
    repeat: usize,
    out: &Path,
    chunk_px: u64,
    level: i32,
) -> Result<BenchResult, BenchError> {
    let mut frames = Vec::new();
    for p in inputs {
        match read_plane(p)? {
            (w, h, Plane::U16(d)) => frames.push((w, h, d)),
            _ => return Err(BenchError::NotU16(p.clone())),
        }
    }
    let (w, h) = frames.first().map(|f| (f.0, f.1)).ok_or(BenchError::Empty)?;
    if let Some((i, _)) = frames.iter().enumerate().find(|(_, f)| (f.0, f.1) != (w, h)) {
        return Err(BenchError::Size(inputs[i].clone()));
    }
    let n = frames.len() * repeat;
    if n == 0 {
        return Err(BenchError::Empty);
    }
    let cfg = ZarrSinkConfig {
        compression: Compression::BloscZstd,
        compression_level: level,
        shuffle: true,
        chunk_px,
        shard: true,
        ..Default::default()
    };
    let _ = std::fs::remove_dir_all(out);
    let store = Store::open(out, &cfg)?;
    let array = store.create_array(
        "/frames",
        vec![n as u64, h as u64, w as u64],
        vec!["t", "y", "x"],
        data_type::uint16(),
        0u16,
        serde_json::Map::new(),
    )?;
    let start = Instant::now();
    // Frames go to the pool as the sink's planes do: each is its own shard, so they are encoded
    // and written concurrently without ever sharing a file.
    let mut times = (0..n)
        .into_par_iter()
        .with_max_len(1)
        .map(|i| {
            let t0 = Instant::now();
            store_plane(&array, "/frames", &[i as u64], &frames[i % frames.len()].2)?;
            Ok(t0.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<Vec<f64>, SinkError>>()?;
    let seconds = start.elapsed().as_secs_f64();
    times.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| times[((p * (n as f64 - 1.0)).round() as usize).min(n - 1)];
    let bytes = (n * w * h * 2) as u64;
    Ok(BenchResult {
        frames: n,
        bytes,
        seconds,
        mb_per_s: bytes as f64 / 1e6 / seconds,
        p50_frame_ms: q(0.5),
        p99_frame_ms: q(0.99),
    })
}
