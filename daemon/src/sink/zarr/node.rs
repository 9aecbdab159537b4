//! Zarr v3 nodes on the filesystem or in an S3-compatible object store: metadata documents
//! written atomically (on a filesystem a temporary file, then a rename; in an object store a PUT,
//! which is atomic) so a reader or a crash never sees half a `zarr.json`, and arrays with the
//! configured chunking, sharding and compression. Chunk bytes go through zarrs, whatever the
//! storage.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use zarrs::storage::storage_adapter::async_to_sync::{AsyncToSyncBlockOn, AsyncToSyncStorageAdapter};
use zarrs::storage::{ReadableWritableListableStorage, ReadableWritableListableStorageTraits, StoreKey, StorePrefix};

use serde_json::{json, Map, Value};
use zarrs::array::codec::api::BytesToBytesCodecTraits;
use zarrs::array::codec::{BloscCodec, BloscCompressionLevel, BloscCompressor, BloscShuffleMode, ZstdCodec};
use zarrs::array::{Array, ArrayBuilder, ArraySubset, DataType, Element};
use zarrs::filesystem::FilesystemStore;

use super::config::{Compression, ZarrSinkConfig};
use crate::component::SinkError;

/// The storage a zarrs array of the sink writes to: a directory or an object store.
pub type Storage = dyn ReadableWritableListableStorageTraits;

/// Where a plate lives.
#[derive(Debug, Clone)]
enum Backend {
    Dir,
    /// An object store, through a runtime of its own held by the zarrs adapter (its requests
    /// are async).
    Object,
}

/// Runs the object store's requests to completion on the sink's runtime.
struct BlockOn(Arc<tokio::runtime::Runtime>);

impl AsyncToSyncBlockOn for BlockOn {
    fn block_on<F: core::future::Future>(&self, future: F) -> F::Output {
        self.0.block_on(future)
    }
}

/// `s3://bucket/prefix` → (bucket, prefix); `None` for anything else.
pub fn s3_url(output: &Path) -> Option<(String, String)> {
    let rest = output.to_str()?.strip_prefix("s3://")?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    (!bucket.is_empty()).then(|| (bucket.to_string(), prefix.trim_matches('/').to_string()))
}

/// A plate (a directory, or a prefix in an object store) and the zarrs store over it.
pub struct Store {
    /// The plate's directory, or its `s3://` URL.
    pub root: PathBuf,
    backend: Backend,
    pub zarrs: ReadableWritableListableStorage,
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
pub fn read_plane<T: zarrs::array::ElementOwned, S: ?Sized + zarrs::storage::ReadableStorageTraits + 'static>(
    array: &Array<S>,
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
    if n == 4 && timepoint >= shape[0] || n == 3 && timepoint > 0 {
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
            backend: Backend::Dir,
            zarrs: Arc::new(FilesystemStore::new(root).map_err(zerr("/"))?),
            codecs: codecs(cfg, 2)?,
            chunk_px: cfg.chunk_px,
            shard: cfg.shard,
            fsync: cfg.fsync,
        })
    }

    /// A plate at `url` (`s3://bucket/prefix/plate.zarr`) in an S3-compatible object store, with
    /// the endpoint, region and credentials from the usual environment variables (`AWS_ENDPOINT_URL`,
    /// `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP`...).
    pub fn open_object(url: &Path, cfg: &ZarrSinkConfig) -> Result<Self, SinkError> {
        let (bucket, prefix) = s3_url(url)
            .ok_or_else(|| SinkError::Config(format!("{} is not an s3://bucket/prefix URL", url.display())))?;
        let s3 = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(&bucket)
            .build()
            .map_err(zerr("/"))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("zarr-s3")
            .enable_all()
            .build()
            .map_err(|e| SinkError::Output {
                path: url.display().to_string(),
                source: e,
            })?;
        let prefixed = object_store::prefix::PrefixStore::new(s3, prefix.as_str());
        let store = zarrs_object_store::AsyncObjectStore::new(prefixed);
        let zarrs: ReadableWritableListableStorage =
            Arc::new(AsyncToSyncStorageAdapter::new(Arc::new(store), BlockOn(Arc::new(rt))));
        Ok(Self {
            root: url.to_path_buf(),
            backend: Backend::Object,
            zarrs,
            codecs: codecs(cfg, 2)?,
            chunk_px: cfg.chunk_px,
            shard: cfg.shard,
            fsync: cfg.fsync,
        })
    }

    /// Whether the plate is in an object store (no directory to serve, read back or sync).
    pub fn is_object(&self) -> bool {
        matches!(self.backend, Backend::Object)
    }

    /// The key of `name` in node `node`, after the same check as [`Self::dir`].
    pub fn key(&self, node: &str, name: &str) -> Result<StoreKey, SinkError> {
        self.dir(node)?;
        let rel = node.trim_matches('/');
        let key = if rel.is_empty() {
            name.to_string()
        } else {
            format!("{rel}/{name}")
        };
        StoreKey::new(key).map_err(zerr(node))
    }

    /// The names of the nodes right under `node`, from a listing of the store.
    pub fn children(&self, node: &str) -> Vec<String> {
        let rel = node.trim_matches('/');
        let prefix = if rel.is_empty() {
            String::new()
        } else {
            format!("{rel}/")
        };
        let Ok(prefix) = StorePrefix::new(prefix.clone()) else {
            return Vec::new();
        };
        self.zarrs
            .list_dir(&prefix)
            .map(|l| {
                l.prefixes()
                    .iter()
                    .filter_map(|p| {
                        let name = p.as_str().strip_prefix(prefix.as_str())?.trim_end_matches('/');
                        (!name.is_empty()).then(|| name.to_string())
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether nothing but, at most, a temporary metadata file a crash left is there.
    pub fn nothing_written(&self) -> bool {
        match self.backend {
            Backend::Dir => {
                std::fs::read_dir(&self.root).map_or(true, |d| d.flatten().all(|e| is_partial(&e.file_name())))
            }
            Backend::Object => self
                .zarrs
                .list_prefix(&StorePrefix::root())
                .map_or(true, |keys| keys.is_empty()),
        }
    }

    /// Removes the whole plate.
    pub fn remove_all(&self) -> Result<(), SinkError> {
        match self.backend {
            Backend::Dir => std::fs::remove_dir_all(&self.root).map_err(io_err(&self.root)),
            Backend::Object => self.zarrs.erase_prefix(&StorePrefix::root()).map_err(zerr("/")),
        }
    }

    /// Starts a fresh zarrs store over the same directory. zarrs' filesystem store keeps a lock
    /// for every key it has ever touched and never forgets one (about 5 kB per field of ours),
    /// so a sink that renews it per field keeps its memory flat over a night's plate.
    pub fn renew(&mut self) -> Result<(), SinkError> {
        if let Backend::Dir = self.backend {
            self.zarrs = Arc::new(FilesystemStore::new(&self.root).map_err(zerr("/"))?);
        }
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
        if let Backend::Object = self.backend {
            let bytes = serde_json::to_vec_pretty(doc).unwrap_or_default();
            return self
                .zarrs
                .set(&self.key(node, "zarr.json")?, bytes.into())
                .map_err(zerr(node));
        }
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

    /// Reads a node's whole metadata document, if the node exists and parses.
    pub fn metadata(&self, node: &str) -> Option<Value> {
        let bytes = self.zarrs.get(&self.key(node, "zarr.json").ok()?).ok()??;
        serde_json::from_slice(&bytes).ok()
    }

    /// Reads a node's attributes, if the node exists and parses.
    pub fn attributes(&self, node: &str) -> Option<Map<String, Value>> {
        self.metadata(node)?.get("attributes")?.as_object().cloned()
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
    ) -> Result<Array<Storage>, SinkError> {
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

    /// Creates a 0-d string array holding `value`.
    pub fn scalar_string(&self, node: &str, value: &str, attributes: Map<String, Value>) -> Result<(), SinkError> {
        let mut b = ArrayBuilder::new(
            Vec::<u64>::new(),
            Vec::<u64>::new(),
            zarrs::array::data_type::string(),
            "",
        );
        b.attributes(attributes);
        let array = b.build(self.zarrs.clone(), node).map_err(zerr(node))?;
        let meta = serde_json::to_value(array.metadata()).map_err(zerr(node))?;
        self.write_metadata(node, &meta)?;
        array.store_chunk(&[], &[value.to_string()]).map_err(zerr(node))?;
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
        match self.backend {
            Backend::Dir => self.dir(node).is_ok_and(|d| d.join("zarr.json").is_file()),
            Backend::Object => self
                .key(node, "zarr.json")
                .is_ok_and(|k| self.zarrs.size_key(&k).is_ok_and(|s| s.is_some())),
        }
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
        match self.backend {
            Backend::Dir => walk(&dir).map_err(io_err(&dir)),
            // A PUT returns once the object is durable.
            Backend::Object => Ok(()),
        }
    }

    pub fn open_array(&self, node: &str) -> Result<Array<Storage>, SinkError> {
        self.dir(node)?;
        Array::open(self.zarrs.clone(), node).map_err(zerr(node))
    }

    /// Removes a node and everything under it (a partial field being redone).
    pub fn remove(&self, node: &str) -> Result<(), SinkError> {
        let dir = self.dir(node)?;
        if let Backend::Object = self.backend {
            let prefix = StorePrefix::new(format!("{}/", node.trim_matches('/'))).map_err(zerr(node))?;
            return self.zarrs.erase_prefix(&prefix).map_err(zerr(node));
        }
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
    array: &Array<Storage>,
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
