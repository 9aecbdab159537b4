//! Zarr v3 nodes on the filesystem: metadata documents written atomically (temporary file, then
//! rename) so a reader or a crash never sees half a `zarr.json`, and arrays with the configured
//! chunking, sharding and compression. Chunk bytes go through zarrs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Map, Value};
use zarrs::array::codec::api::BytesToBytesCodecTraits;
use zarrs::array::codec::{BloscCodec, BloscCompressionLevel, BloscCompressor, BloscShuffleMode, ZstdCodec};
use zarrs::array::{Array, ArrayBuilder, ArraySubset, DataType, Element};
use zarrs::filesystem::FilesystemStore;

use super::config::{Compression, ZarrSinkConfig};
use crate::component::SinkError;

/// A plate directory and the zarrs store over it.
pub struct Store {
    pub root: PathBuf,
    pub zarrs: Arc<FilesystemStore>,
    codecs: Vec<Arc<dyn BytesToBytesCodecTraits>>,
    chunk_px: u64,
    shard: bool,
    pub fsync: bool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("root", &self.root).finish()
    }
}

/// One plane of an image or label array, `(c, y, x)` or `(t, c, y, x)`: channel `channel` at
/// `timepoint` (which a time-less array ignores). What backfills, replays and thumbnails read.
pub fn read_plane<T: zarrs::array::ElementOwned>(
    array: &Array<FilesystemStore>,
    channel: u64,
    timepoint: u64,
) -> Result<Vec<T>, String> {
    let shape = array.shape();
    let n = shape.len();
    if !(n == 3 || n == 4) {
        return Err(format!("{n} dimensions; expected (c, y, x) or (t, c, y, x)"));
    }
    if channel >= shape[n - 3] {
        return Err(format!("no channel {channel}"));
    }
    if n == 4 && timepoint >= shape[0] {
        return Err(format!("no timepoint {timepoint}"));
    }
    let mut ranges = vec![channel..channel + 1, 0..shape[n - 2], 0..shape[n - 1]];
    if n == 4 {
        ranges.insert(0, timepoint..timepoint + 1);
    }
    array
        .retrieve_array_subset(&ArraySubset::new_with_ranges(&ranges))
        .map_err(|e| e.to_string())
}

pub fn zerr<E: std::error::Error + Send + Sync + 'static>(path: &str) -> impl FnOnce(E) -> SinkError + '_ {
    move |e| SinkError::Zarr {
        path: path.to_string(),
        source: Box::new(e),
    }
}

pub fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SinkError + '_ {
    move |source| SinkError::Output {
        path: path.display().to_string(),
        source,
    }
}

/// The compressor chain for a config. Blosc shuffles by the element size (`typesize`).
pub fn codecs(cfg: &ZarrSinkConfig, typesize: usize) -> Result<Vec<Arc<dyn BytesToBytesCodecTraits>>, SinkError> {
    let blosc = |cname| -> Result<Vec<Arc<dyn BytesToBytesCodecTraits>>, SinkError> {
        let level = BloscCompressionLevel::try_from(cfg.compression_level.clamp(0, 9) as u8)
            .map_err(|e| SinkError::Config(format!("blosc level: {e}")))?;
        let shuffle = if cfg.shuffle {
            BloscShuffleMode::Shuffle
        } else {
            BloscShuffleMode::NoShuffle
        };
        let codec = BloscCodec::new(cname, level, None, shuffle, Some(typesize))
            .map_err(|e| SinkError::Config(format!("blosc: {e}")))?;
        Ok(vec![Arc::new(codec)])
    };
    match cfg.compression {
        Compression::None => Ok(Vec::new()),
        Compression::Zstd => Ok(vec![Arc::new(ZstdCodec::new(cfg.compression_level, false))]),
        Compression::BloscZstd => blosc(BloscCompressor::Zstd),
        Compression::BloscLz4 => blosc(BloscCompressor::LZ4),
    }
}

/// A metadata document's temporary name, which a crash may leave behind and readers ignore.
pub fn is_partial(name: &std::ffi::OsStr) -> bool {
    let name = name.to_string_lossy();
    name.starts_with(".zarr.json.") && name.ends_with(".partial")
}

impl Store {
    pub fn open(root: &Path, cfg: &ZarrSinkConfig) -> Result<Self, SinkError> {
        std::fs::create_dir_all(root).map_err(io_err(root))?;
        Ok(Self {
            root: root.to_path_buf(),
            zarrs: Arc::new(FilesystemStore::new(root).map_err(zerr("/"))?),
            codecs: codecs(cfg, 2)?,
            chunk_px: cfg.chunk_px,
            shard: cfg.shard,
            fsync: cfg.fsync,
        })
    }

    /// Starts a fresh zarrs store over the same directory. zarrs' filesystem store keeps a lock
    /// for every key it has ever touched and never forgets one (about 5 kB per field of ours),
    /// so a sink that renews it per field keeps its memory flat over a night's plate.
    pub fn renew(&mut self) -> Result<(), SinkError> {
        self.zarrs = Arc::new(FilesystemStore::new(&self.root).map_err(zerr("/"))?);
        Ok(())
    }

    /// The directory of `node`. Every path the sink touches comes through here, so a node
    /// name that would leave the output root (`..`, an absolute part) is refused here, whatever
    /// the callers checked before.
    fn dir(&self, node: &str) -> Result<PathBuf, SinkError> {
        let rel = Path::new(node.trim_start_matches('/'));
        if rel.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
            return Err(SinkError::Config(format!(
                "zarr node {node:?} is not a plain path inside the output root"
            )));
        }
        Ok(self.root.join(rel))
    }

    /// Writes `zarr.json` of `node` atomically.
    pub fn write_metadata(&self, node: &str, doc: &Value) -> Result<(), SinkError> {
        let dir = self.dir(node)?;
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        // A name of its own per writer: members of a cluster write some groups (a row) alike.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(".zarr.json.{}.{n}.partial", std::process::id()));
        let bytes = serde_json::to_vec_pretty(doc).unwrap_or_default();
        let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        std::io::Write::write_all(&mut f, &bytes).map_err(io_err(&tmp))?;
        if self.fsync {
            f.sync_all().map_err(io_err(&tmp))?;
        }
        drop(f);
        let target = dir.join("zarr.json");
        std::fs::rename(&tmp, &target).map_err(io_err(&target))?;
        if self.fsync {
            std::fs::File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(&dir))?;
        }
        Ok(())
    }

    pub fn group(&self, node: &str, attributes: Map<String, Value>) -> Result<(), SinkError> {
        self.write_metadata(
            node,
            &json!({"zarr_format": 3, "node_type": "group", "attributes": attributes}),
        )
    }

    /// Reads a node's attributes, if the node exists and parses.
    pub fn attributes(&self, node: &str) -> Option<Map<String, Value>> {
        let text = std::fs::read_to_string(self.dir(node).ok()?.join("zarr.json")).ok()?;
        let v: Value = serde_json::from_str(&text).ok()?;
        v.get("attributes")?.as_object().cloned()
    }

    /// Creates an array of `shape` whose last two axes are y, x. With sharding, one shard holds a
    /// whole plane (a frame) split into `chunk_px` subchunks, so a field is a handful of files
    /// and each plane is written by exactly one call; without, chunks are `chunk_px` squares.
    pub fn create_array(
        &self,
        node: &str,
        shape: Vec<u64>,
        dims: Vec<&str>,
        dtype: DataType,
        fill: impl Into<zarrs::array::builder::ArrayBuilderFillValue>,
        attributes: Map<String, Value>,
    ) -> Result<Array<FilesystemStore>, SinkError> {
        let n = shape.len();
        let (ch, sh) = subchunk(shape[n - 2], self.chunk_px);
        let (cw, sw) = subchunk(shape[n - 1], self.chunk_px);
        let inner: Vec<u64> = (0..n)
            .map(|i| match i {
                _ if i == n - 2 => ch,
                _ if i == n - 1 => cw,
                _ => 1,
            })
            .collect();
        let mut b = if self.shard {
            let outer: Vec<u64> = (0..n)
                .map(|i| match i {
                    _ if i == n - 2 => sh,
                    _ if i == n - 1 => sw,
                    _ => 1,
                })
                .collect();
            let mut b = ArrayBuilder::new(shape, outer, dtype, fill);
            b.subchunk_shape(inner);
            b
        } else {
            ArrayBuilder::new(shape, inner, dtype, fill)
        };
        b.bytes_to_bytes_codecs(self.codecs.clone())
            .dimension_names(Some(dims))
            .attributes(attributes);
        let array = b.build(self.zarrs.clone(), node).map_err(zerr(node))?;
        let meta = serde_json::to_value(array.metadata()).map_err(zerr(node))?;
        self.write_metadata(node, &meta)?;
        Ok(array)
    }

    /// Creates a 1-D table column (no sharding: columns are small and written once).
    pub fn column<T: Element>(
        &self,
        node: &str,
        dtype: DataType,
        fill: impl Into<zarrs::array::builder::ArrayBuilderFillValue>,
        values: &[T],
        attributes: Map<String, Value>,
    ) -> Result<(), SinkError> {
        let len = values.len() as u64;
        let mut b = ArrayBuilder::new(vec![len], vec![len.max(1)], dtype, fill);
        b.attributes(attributes);
        let array = b.build(self.zarrs.clone(), node).map_err(zerr(node))?;
        let meta = serde_json::to_value(array.metadata()).map_err(zerr(node))?;
        self.write_metadata(node, &meta)?;
        if len > 0 {
            // The column is a single chunk.
            array.store_chunk(&[0], values).map_err(zerr(node))?;
        }
        Ok(())
    }

    /// Creates a dense row-major 2-D float32 matrix `rows x cols` in one chunk (AnnData `X`).
    pub fn matrix(
        &self,
        node: &str,
        rows: usize,
        cols: usize,
        values: &[f32],
        attributes: Map<String, Value>,
    ) -> Result<(), SinkError> {
        let (r, c) = (rows as u64, cols as u64);
        let mut b = ArrayBuilder::new(
            vec![r, c],
            vec![r.max(1), c.max(1)],
            zarrs::array::data_type::float32(),
            0f32,
        );
        b.attributes(attributes);
        let array = b.build(self.zarrs.clone(), node).map_err(zerr(node))?;
        let meta = serde_json::to_value(array.metadata()).map_err(zerr(node))?;
        self.write_metadata(node, &meta)?;
        if rows > 0 && cols > 0 {
            array.store_chunk(&[0, 0], values).map_err(zerr(node))?;
        }
        Ok(())
    }

    /// Whether a node's metadata exists.
    pub fn exists(&self, node: &str) -> bool {
        self.dir(node).is_ok_and(|d| d.join("zarr.json").is_file())
    }

    /// Flushes every file under `node` and the directories to the disk, so that metadata listing
    /// the node can never reach the disk before the data it lists (power loss, kernel crash).
    pub fn sync_tree(&self, node: &str) -> Result<(), SinkError> {
        fn walk(dir: &Path) -> std::io::Result<()> {
            for e in std::fs::read_dir(dir)? {
                let e = e?;
                if e.file_type()?.is_dir() {
                    walk(&e.path())?;
                } else {
                    std::fs::File::open(e.path())?.sync_all()?;
                }
            }
            std::fs::File::open(dir)?.sync_all()
        }
        let dir = self.dir(node)?;
        walk(&dir).map_err(io_err(&dir))
    }

    pub fn open_array(&self, node: &str) -> Result<Array<FilesystemStore>, SinkError> {
        self.dir(node)?;
        Array::open(self.zarrs.clone(), node).map_err(zerr(node))
    }

    /// Removes a node and everything under it (a partial field being redone).
    pub fn remove(&self, node: &str) -> Result<(), SinkError> {
        let dir = self.dir(node)?;
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&dir)(e)),
        }
    }
}

/// Subchunk edge and shard edge for an axis of `dim` pixels. Sharding needs subchunks that tile the
/// shard exactly: prefer a divisor of `dim` between `want/2` and `want` (2160 → 432), so one shard
/// is exactly one plane; otherwise round the shard up to whole subchunks (it overhangs the edge).
pub fn subchunk(dim: u64, want: u64) -> (u64, u64) {
    let want = want.max(1);
    if dim <= want {
        return (dim.max(1), dim.max(1));
    }
    if let Some(d) = (want.div_ceil(2)..=want).rev().find(|d| dim.is_multiple_of(*d)) {
        return (d, dim);
    }
    (want, dim.div_ceil(want) * want)
}

/// Stores one y-x plane at `prefix` indices (e.g. `[t, c]`) of an array. When a plane is exactly
/// one chunk (a shard per frame), it is stored as that chunk: no subset bookkeeping, and zarrs
/// encodes its subchunks in parallel.
pub fn store_plane<T: Element>(
    array: &Array<FilesystemStore>,
    node: &str,
    prefix: &[u64],
    data: &[T],
) -> Result<(), SinkError> {
    let shape = array.shape();
    let n = shape.len();
    let mut chunk: Vec<u64> = prefix.to_vec();
    chunk.extend([0, 0]);
    let whole = array
        .chunk_shape(&chunk)
        .map(|s| s[n - 2].get() == shape[n - 2] && s[n - 1].get() == shape[n - 1])
        .unwrap_or(false);
    if whole {
        return array.store_chunk(&chunk, data).map_err(zerr(node));
    }
    let mut ranges: Vec<std::ops::Range<u64>> = prefix.iter().map(|&i| i..i + 1).collect();
    ranges.push(0..shape[n - 2]);
    ranges.push(0..shape[n - 1]);
    array
        .store_array_subset(&ArraySubset::new_with_ranges(&ranges), data)
        .map_err(zerr(node))
}

#[cfg(test)]
mod tests {
    use super::{subchunk, Store};

    #[test]
    fn nodes_that_leave_the_root_are_refused() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let root = dir.path().join("plate.zarr");
        let store = Store::open(&root, &Default::default()).unwrap_or_else(|e| panic!("open: {e}"));
        let doc = serde_json::json!({"zarr_format": 3, "node_type": "group"});
        for bad in ["../escape", "A/../../escape", "/A/1/../../.."] {
            assert!(store.write_metadata(bad, &doc).is_err(), "{bad}");
            assert!(store.remove(bad).is_err(), "{bad}");
            assert!(!store.exists(bad), "{bad}");
        }
        assert!(!dir.path().join("escape").exists());
        store
            .write_metadata("/A/1", &doc)
            .unwrap_or_else(|e| panic!("a plain node: {e}"));
        assert!(store.exists("A/1"));
    }

    #[test]
    fn subchunks_tile_their_shard() {
        assert_eq!(subchunk(2048, 512), (512, 2048));
        assert_eq!(subchunk(2160, 512), (432, 2160));
        assert_eq!(subchunk(1080, 512), (360, 1080));
        assert_eq!(subchunk(300, 512), (300, 300));
        assert_eq!(subchunk(1021, 512), (512, 1024));
        for dim in 1..3000u64 {
            let (c, s) = subchunk(dim, 512);
            assert_eq!(s % c, 0, "{dim}");
            assert!(s >= dim && c <= 512, "{dim}");
        }
    }
}
