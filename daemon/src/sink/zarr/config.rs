//! `[sinks.zarr]`: where the plate goes and how its arrays are chunked and compressed.

use std::path::PathBuf;

use liveomics_adapters::Invalid;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    None,
    Zstd,
    BloscZstd,
    BloscLz4,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ZarrSinkConfig {
    pub enabled: bool,
    /// Directory that holds `{plate}.zarr`; relative paths are relative to the working directory.
    pub output: PathBuf,
    pub compression: Compression,
    /// zstd: 1..=22; blosc: 0..=9.
    pub compression_level: i32,
    /// Byte shuffle before blosc (helps 16-bit camera data a lot).
    pub shuffle: bool,
    /// Chunk edge in pixels for y and x (the subchunk edge when sharding).
    pub chunk_px: u64,
    /// One shard per plane (frame): few files per field, each written by one call.
    pub shard: bool,
    /// Resolution levels including full resolution; each next level is 2x smaller.
    pub pyramid_levels: u32,
    /// Write the per-cell AnnData table of each field.
    pub tables: bool,
    /// Flush a field's files to the disk before listing it, so a power loss cannot leave a listed
    /// field with missing data.
    pub fsync: bool,
}

impl Default for ZarrSinkConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            output: PathBuf::from("out"),
            compression: Compression::BloscZstd,
            compression_level: 1,
            shuffle: true,
            chunk_px: 512,
            shard: true,
            pyramid_levels: 3,
            tables: true,
            fsync: true,
        }
    }
}

impl ZarrSinkConfig {
    /// Range checks, keyed under the section.
    pub fn validate(&self) -> Vec<Invalid> {
        let mut out = Vec::new();
        let levels = match self.compression {
            Compression::Zstd => Some(1..=22),
            Compression::BloscZstd | Compression::BloscLz4 => Some(0..=9),
            Compression::None => None,
        };
        if let Some(r) = levels {
            if !r.contains(&self.compression_level) {
                out.push(Invalid::new(
                    "compression_level",
                    format!(
                        "must be {}..={} for {:?}, got {}",
                        r.start(),
                        r.end(),
                        self.compression,
                        self.compression_level
                    ),
                ));
            }
        }
        if !(1..=8).contains(&self.pyramid_levels) {
            out.push(Invalid::new(
                "pyramid_levels",
                format!("must be 1..=8, got {}", self.pyramid_levels),
            ));
        }
        if !(16..=8192).contains(&self.chunk_px) {
            out.push(Invalid::new(
                "chunk_px",
                format!("must be 16..=8192, got {}", self.chunk_px),
            ));
        }
        let text = self.output.to_string_lossy();
        if self.enabled && text.starts_with("s3://") && super::node::s3_url(&self.output).is_none() {
            out.push(Invalid::new(
                "output",
                format!("{text:?}: an object store is s3://bucket/prefix"),
            ));
        }
        if self.enabled && self.output.as_os_str().is_empty() {
            out.push(Invalid::new("output", "must not be empty"));
        } else if self.enabled && !text.starts_with("s3://") {
            if let Some(why) = unwritable(&self.output) {
                out.push(Invalid::new("output", why));
            }
        }
        out
    }
}

/// Why the plate could not be written under `output`, found before the run: the nearest part of
/// the path that exists must be a directory this process can create a file in (checked with a
/// probe file, removed at once: permissions alone do not tell a read-only mount or an ACL).
fn unwritable(output: &std::path::Path) -> Option<String> {
    let mut dir = output;
    loop {
        let here = if dir.as_os_str().is_empty() {
            std::path::Path::new(".")
        } else {
            dir
        };
        match std::fs::metadata(here) {
            Ok(m) if m.is_dir() => {
                let probe = here.join(format!(".liveomics-validate-{}", std::process::id()));
                // Empty: a full disk is a run's condition (exit 3 when met), not the config's.
                return match std::fs::File::create(&probe) {
                    Ok(_) => {
                        let _ = std::fs::remove_file(&probe);
                        None
                    }
                    Err(e) => Some(format!(
                        "{}: cannot create files in {}: {e}",
                        output.display(),
                        here.display()
                    )),
                };
            }
            Ok(_) => return Some(format!("{}: {} is not a directory", output.display(), here.display())),
            Err(_) => dir = dir.parent()?,
        }
    }
}
