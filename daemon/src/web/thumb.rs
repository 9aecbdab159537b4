//! Thumbnails of a written field for the page: one channel (acquired or virtual) from the
//! lowest pyramid level, scaled by the channel's display window and tinted with its colour,
//! with the cell outlines drawn over it, as a PNG.

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;
use zarrs::array::Array;
use zarrs::filesystem::FilesystemStore;

use crate::sink::zarr::node::read_plane;

/// Why a thumbnail could not be made; the server answers 404 with it.
#[derive(Debug, thiserror::Error)]
pub enum ThumbError {
    #[error("no such image or channel: {0}")]
    NotFound(String),
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("cannot encode the PNG: {0}")]
    Encode(String),
}

/// A plane of the array at `node` and its width and height.
fn plane<T: zarrs::array::ElementOwned>(
    store: &Arc<FilesystemStore>,
    node: &str,
    channel: u64,
    timepoint: u64,
) -> Result<(Vec<T>, usize, usize), ThumbError> {
    let read = |message: String| ThumbError::Read {
        path: node.to_string(),
        message,
    };
    let array = Array::open(store.clone(), node).map_err(|e| read(e.to_string()))?;
    let shape = array.shape().to_vec();
    let px = read_plane(&array, channel, timepoint).map_err(read)?;
    Ok((px, shape[shape.len() - 1] as usize, shape[shape.len() - 2] as usize))
}

fn hex_rgb(color: &str) -> [f32; 3] {
    let c = u32::from_str_radix(color.trim_start_matches('#'), 16).unwrap_or(0xFFFFFF);
    [
        (c >> 16) as f32 / 255.0,
        ((c >> 8) & 0xFF) as f32 / 255.0,
        (c & 0xFF) as f32 / 255.0,
    ]
}

/// The PNG of channel `channel` at timepoint `timepoint` of the field `row/column/field` of the
/// plate at `plate_dir`. The names come from the request; they are checked to be plain names,
/// never joined into a path as they are.
pub fn png(
    plate_dir: &Path,
    row: &str,
    column: &str,
    field: u32,
    channel: usize,
    timepoint: u32,
) -> Result<Vec<u8>, ThumbError> {
    let ok_name = |s: &str| !s.is_empty() && s.len() <= 8 && s.bytes().all(|b| b.is_ascii_alphanumeric());
    if !ok_name(row) || !ok_name(column) {
        return Err(ThumbError::NotFound(format!("{row}/{column}")));
    }
    let image = format!("{row}/{column}/{field}");
    let attrs = super::plate::attrs(plate_dir, &image)
        .and_then(|a| a.get("ome").cloned())
        .ok_or_else(|| ThumbError::NotFound(image.clone()))?;
    let lowest = attrs
        .pointer("/multiscales/0/datasets")
        .and_then(Value::as_array)
        .and_then(|d| d.last())
        .and_then(|d| d.get("path"))
        .and_then(Value::as_str)
        .ok_or_else(|| ThumbError::NotFound(format!("{image}: no multiscales")))?
        .to_string();
    let ch = attrs
        .pointer(&format!("/omero/channels/{channel}"))
        .ok_or_else(|| ThumbError::NotFound(format!("{image}: channel {channel}")))?;
    let window = |k: &str| ch.pointer(&format!("/window/{k}")).and_then(Value::as_f64);
    let (lo, hi) = (window("start").unwrap_or(0.0), window("end").unwrap_or(65535.0));
    let tint = hex_rgb(ch.get("color").and_then(Value::as_str).unwrap_or("FFFFFF"));
    let store = Arc::new(FilesystemStore::new(plate_dir).map_err(|e| ThumbError::Read {
        path: plate_dir.display().to_string(),
        message: e.to_string(),
    })?);
    let t = u64::from(timepoint);
    let (px, w, h) = plane::<u16>(&store, &format!("/{image}/{lowest}"), channel as u64, t)?;
    // The outlines of the cells, when the field was segmented.
    let labels = plane::<u32>(&store, &format!("/{image}/labels/cells/{lowest}"), 0, t)
        .ok()
        .filter(|(_, lw, lh)| (*lw, *lh) == (w, h))
        .map(|(l, ..)| l);
    let span = (hi - lo).max(1.0);
    let mut rgb = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            // One pixel of outline per boundary (where the right or lower neighbour is another
            // cell or background), blended half over the image so that the image stays readable.
            let edge = labels.as_ref().is_some_and(|l| {
                let v = l[i];
                (x + 1 < w && l[i + 1] != v && (v != 0 || l[i + 1] != 0))
                    || (y + 1 < h && l[i + w] != v && (v != 0 || l[i + w] != 0))
            });
            let g = ((px[i] as f64 - lo) / span).clamp(0.0, 1.0) as f32;
            let pixel = tint.map(|t| g * t * 255.0);
            let out = if edge {
                [0.5 * pixel[0] + 127.0, 0.5 * pixel[1] + 100.0, 0.5 * pixel[2]]
            } else {
                pixel
            };
            rgb.extend(out.map(|c| c.round().clamp(0.0, 255.0) as u8));
        }
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w as u32, h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(|e| ThumbError::Encode(e.to_string()))?;
        writer
            .write_image_data(&rgb)
            .map_err(|e| ThumbError::Encode(e.to_string()))?;
    }
    Ok(out)
}
