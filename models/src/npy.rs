//! `.npy` reading and writing: bioimage.io test tensors are NumPy arrays, and `liveomics models
//! predict` exchanges tensors with Python in the same format. Only what those need: C order,
//! little-endian numeric dtypes, read as f32.

use std::path::Path;

use crate::error::ModelError;
use crate::tensor::Tensor;

fn bad(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Npy {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Value of `'key': value` in the header dict, up to the next top-level comma or brace.
fn header_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let start = header.find(&format!("'{key}'"))? + key.len() + 2;
    let rest = header[start..].trim_start().strip_prefix(':')?.trim_start();
    if let Some(tuple) = rest.strip_prefix('(') {
        return Some(&tuple[..tuple.find(')')?]);
    }
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim())
}

pub fn read(path: &Path) -> Result<Tensor, ModelError> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&bytes).map_err(|m| bad(path, m))
}

fn parse(bytes: &[u8]) -> Result<Tensor, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("missing the \\x93NUMPY magic".into());
    }
    let (header_len, offset) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(format!("unsupported format version {v}")),
    };
    let header = bytes
        .get(offset..offset + header_len)
        .ok_or("header runs past the end of the file")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not text")?;
    let descr = header_value(header, "descr").ok_or("header has no 'descr'")?;
    let descr = descr.trim_matches(['\'', '"']);
    if header_value(header, "fortran_order") != Some("False") {
        return Err("only C-order arrays are supported (fortran_order must be False)".into());
    }
    let shape_text = header_value(header, "shape").ok_or("header has no 'shape'")?;
    let shape = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("bad shape entry {s:?}")))
        .collect::<Result<Vec<_>, _>>()?;
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?} has more elements than memory"))?;
    let body = &bytes[offset + header_len..];
    macro_rules! decode {
        ($t:ty) => {{
            let size = std::mem::size_of::<$t>();
            if n.checked_mul(size) != Some(body.len()) {
                return Err(format!(
                    "shape {shape:?} of {descr} needs {} x {size} bytes, the file has {}",
                    n,
                    body.len()
                ));
            }
            body.chunks_exact(size)
                .map(|c| <$t>::from_le_bytes(c.try_into().expect("chunk size")) as f32)
                .collect::<Vec<f32>>()
        }};
    }
    let data = match descr {
        "<f4" => decode!(f32),
        "<f8" => decode!(f64),
        "|u1" => decode!(u8),
        "|i1" => decode!(i8),
        "<u2" => decode!(u16),
        "<i2" => decode!(i16),
        "<u4" => decode!(u32),
        "<i4" => decode!(i32),
        "<i8" => decode!(i64),
        other => return Err(format!("unsupported dtype {other:?} (little-endian numeric only)")),
    };
    Ok(Tensor { shape, data })
}

/// Writes `t` as a float32 `.npy` (format 1.0).
pub fn write(path: &Path, t: &Tensor) -> Result<(), ModelError> {
    let shape = match t.shape.len() {
        1 => format!("({},)", t.shape[0]),
        _ => format!(
            "({})",
            t.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
        ),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + t.data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in &t.data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, out).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.npy");
        let t = Tensor {
            shape: vec![2, 3],
            data: vec![1.0, 2.0, 3.0, 4.0, 5.5, -6.0],
        };
        write(&p, &t).unwrap();
        assert_eq!(read(&p).unwrap(), t);
        for junk in [&b""[..], b"\x93NUMPY\x01\x00\xff\xff{", b"hello world, not numpy"] {
            assert!(parse(junk).is_err());
        }
        let mut truncated = std::fs::read(&p).unwrap();
        truncated.pop();
        assert!(parse(&truncated).unwrap_err().contains("needs 6 x 4 bytes"));
        // A shape whose element count overflows is an error, not a panic.
        let huge = b"{'descr': '<f4', 'fortran_order': False, 'shape': (18446744073709551615, 2), }";
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend_from_slice(&(huge.len() as u16).to_le_bytes());
        bytes.extend_from_slice(huge);
        assert!(parse(&bytes).unwrap_err().contains("more elements"));
    }
}
