//! What resume checks before it trusts a listed field: a listing is written last, so a crash
//! never lists a partial field, but a disk, a copy or a person can still damage a listed one
//! afterwards. A field that fails is taken off the listing and redone by the source; nothing of
//! it is deleted until it is written again.
//!
//! The checks are cheap, one small read per shard: the image's metadata parses and names arrays
//! that exist; every plane of the acquired channels has its shard at every level, and every
//! shard present has an index whose CRC32C holds and whose chunks lie inside the shard; a label
//! image with cells has its shard; a segmented field has its table.

use serde_json::Value;
use zarrs::storage::byte_range::ByteRange;

use super::{ome, ZarrSink};
use liveomics_adapters::model::WellId;

/// Why a listed field was not trusted: the log's and the metric's reason, and what was found.
#[derive(Debug, Clone, PartialEq)]
pub struct Unverified {
    /// `metadata`, `raw`, `labels` or `table`: the part that failed.
    pub part: &'static str,
    pub detail: String,
}

fn fail(part: &'static str, detail: impl Into<String>) -> Unverified {
    Unverified {
        part,
        detail: detail.into(),
    }
}

/// A sharded array's index layout, from its metadata: `(chunks per shard, index at the end,
/// CRC32C after the index)`. `None` when the array is not sharded (nothing to check cheaply).
fn index_layout(meta: &Value) -> Option<(u64, bool, bool)> {
    let codec = meta.get("codecs")?.as_array()?.first()?;
    if codec.get("name")?.as_str()? != "sharding_indexed" {
        return None;
    }
    let conf = codec.get("configuration")?;
    let inner: Vec<u64> = serde_json::from_value(conf.get("chunk_shape")?.clone()).ok()?;
    let outer: Vec<u64> =
        serde_json::from_value(meta.pointer("/chunk_grid/configuration/chunk_shape")?.clone()).ok()?;
    let chunks = outer.iter().zip(&inner).map(|(o, i)| o.div_ceil((*i).max(1))).product();
    let at_end = conf.get("index_location").and_then(Value::as_str).unwrap_or("end") == "end";
    let crc = conf.get("index_codecs").and_then(Value::as_array).is_some_and(|c| {
        c.iter()
            .any(|c| c.get("name").and_then(Value::as_str) == Some("crc32c"))
    });
    Some((chunks, at_end, crc))
}

impl ZarrSink {
    /// Checks one shard of `array` (whose metadata is `meta`) at chunk `index`: `Ok(false)` if it
    /// is not there.
    fn shard_holds(&self, array: &str, meta: &Value, index: &[u64]) -> Result<bool, String> {
        let coords: Vec<String> = index.iter().map(u64::to_string).collect();
        let name = format!("{array}/c/{}", coords.join("/"));
        let key = self
            .store
            .key(array, &format!("c/{}", coords.join("/")))
            .map_err(|e| format!("{name}: {e}"))?;
        let Some(size) = self.store.zarrs.size_key(&key).map_err(|e| format!("{name}: {e}"))? else {
            return Ok(false);
        };
        let Some((chunks, at_end, crc)) = index_layout(meta) else {
            return Ok(true);
        };
        let len = chunks * 16 + if crc { 4 } else { 0 };
        if size < len {
            return Err(format!("{name}: {size} bytes, shorter than its index ({len})"));
        }
        let range = if at_end {
            ByteRange::Suffix(len)
        } else {
            ByteRange::FromStart(0, Some(len))
        };
        let bytes = self
            .store
            .zarrs
            .get_partial(&key, range)
            .map_err(|e| format!("{name}: {e}"))?
            .ok_or_else(|| format!("{name}: gone while read"))?;
        let (entries, tail) = bytes.split_at((chunks * 16) as usize);
        if crc {
            let stored = u32::from_le_bytes(tail[..4].try_into().unwrap_or_default());
            if crc32c::crc32c(entries) != stored {
                return Err(format!("{name}: its index fails its CRC32C (truncated or overwritten)"));
            }
        }
        for e in entries.chunks_exact(16) {
            let offset = u64::from_le_bytes(e[..8].try_into().unwrap_or_default());
            let n = u64::from_le_bytes(e[8..].try_into().unwrap_or_default());
            if (offset, n) != (u64::MAX, u64::MAX) && offset.saturating_add(n) > size {
                return Err(format!(
                    "{name}: a chunk at {offset}+{n} lies past its end ({size} bytes)"
                ));
            }
        }
        Ok(true)
    }

    /// Whether listed field `field` of `well` at timepoint `t` holds what the listing promises.
    pub(super) fn verify_field(&self, well: WellId, field: u32, t: u32) -> Result<(), Unverified> {
        let image = format!("/{}/{}/{field}", well.row_name(), well.column_name());
        let attrs = self
            .store
            .attributes(&image)
            .map(Value::Object)
            .ok_or_else(|| fail("metadata", format!("{image}/zarr.json is missing or not readable JSON")))?;
        if attrs.pointer("/ome/multiscales/0/datasets").is_none() {
            return Err(fail("metadata", format!("{image}/zarr.json has no OME multiscales")));
        }
        let time: Vec<u64> = if self.has_time() {
            vec![u64::from(t)]
        } else {
            Vec::new()
        };
        let acquired = self.plan.channels.len() as u64;
        for k in 0..self.levels() {
            let array = format!("{image}/{k}");
            let meta = self
                .store
                .metadata(&array)
                .ok_or_else(|| fail("raw", format!("{array}/zarr.json is missing or not readable JSON")))?;
            let sharded = index_layout(&meta).is_some();
            for c in 0..acquired {
                let index: Vec<u64> = time.iter().copied().chain([c, 0, 0]).collect();
                match self.shard_holds(&array, &meta, &index) {
                    Ok(true) => {}
                    // A plane of a camera is never all zero, the one case in which no shard is
                    // written; without sharding a chunk may legitimately be absent.
                    Ok(false) if sharded => {
                        return Err(fail("raw", format!("{array}: the shard of channel {c} is missing")))
                    }
                    Ok(false) => {}
                    Err(e) => return Err(fail("raw", e)),
                }
            }
        }
        let labels: Vec<String> = self
            .store
            .attributes(&format!("{image}/labels"))
            .and_then(|a| a.get("ome")?.get("labels")?.as_array().cloned())
            .map(|l| l.iter().filter_map(|n| n.as_str().map(String::from)).collect())
            .unwrap_or_default();
        for name in &labels {
            let node = format!("{image}/labels/{name}");
            let label_attrs = self
                .store
                .attributes(&node)
                .map(Value::Object)
                .ok_or_else(|| fail("labels", format!("{node}/zarr.json is missing or not readable JSON")))?;
            let (attrs, _) = ome::read::<ome::LabelAttrs, Value>(&label_attrs);
            // The properties describe the last timepoint written: with several, only shards that
            // are there are checked.
            let has_cells = !self.has_time() && attrs.is_some_and(|a| !a.image_label.properties.is_empty());
            for k in 0..self.levels() {
                let array = format!("{node}/{k}");
                let meta = self
                    .store
                    .metadata(&array)
                    .ok_or_else(|| fail("labels", format!("{array}/zarr.json is missing or not readable JSON")))?;
                let sharded = index_layout(&meta).is_some();
                let index: Vec<u64> = time.iter().copied().chain([0, 0, 0]).collect();
                match self.shard_holds(&array, &meta, &index) {
                    Ok(false) if has_cells && sharded => {
                        return Err(fail(
                            "labels",
                            format!("{array}: its shard is missing, yet it lists cells"),
                        ))
                    }
                    Ok(_) => {}
                    Err(e) => return Err(fail("labels", e)),
                }
            }
        }
        if self.cfg.tables && !labels.is_empty() {
            let table = if self.has_time() {
                format!("{image}/t{t}/{}", super::anndata::TABLE)
            } else {
                format!("{image}/{}", super::anndata::TABLE)
            };
            for node in [table.clone(), format!("{table}/obs"), format!("{table}/obs/_index")] {
                if !self.store.exists(&node) {
                    return Err(fail("table", format!("{node}/zarr.json is missing")));
                }
            }
        }
        Ok(())
    }
}
