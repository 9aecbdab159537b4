//! TIFF files in and out: what `liveomics simulate --out` writes and what folder sources read.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::Path;

use tiff::decoder::{Decoder, DecodingResult};
use tiff::encoder::{colortype, TiffEncoder};

/// TIFF problems always name the file, because a plate has thousands of them.
#[derive(Debug, thiserror::Error)]
pub enum TiffError {
    #[error("cannot open {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a readable TIFF")]
    Format {
        path: String,
        #[source]
        source: tiff::TiffError,
    },
    #[error("{path}: unsupported sample type {kind} (supported: uint8, uint16, uint32, float32 grayscale)")]
    Unsupported { path: String, kind: String },
    /// The file's directory names pixel data it does not hold yet: a writer is still at it.
    #[error("{path} is not complete: {detail}")]
    Incomplete { path: String, detail: String },
}

/// The pixels of one TIFF page.
#[derive(Debug, Clone, PartialEq)]
pub enum Plane {
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
    F32(Vec<f32>),
}

fn create(path: &Path) -> Result<TiffEncoder<BufWriter<File>>, TiffError> {
    let file = File::create(path).map_err(|source| TiffError::Io {
        path: path.display().to_string(),
        source,
    })?;
    TiffEncoder::new(BufWriter::new(file)).map_err(|source| TiffError::Format {
        path: path.display().to_string(),
        source,
    })
}

/// Writes a single-page grayscale TIFF.
pub fn write_plane(path: &Path, width: usize, height: usize, plane: &Plane) -> Result<(), TiffError> {
    let mut enc = create(path)?;
    let (w, h) = (width as u32, height as u32);
    let res = match plane {
        Plane::U8(d) => enc.write_image::<colortype::Gray8>(w, h, d),
        Plane::U16(d) => enc.write_image::<colortype::Gray16>(w, h, d),
        Plane::U32(d) => enc.write_image::<colortype::Gray32>(w, h, d),
        Plane::F32(d) => enc.write_image::<colortype::Gray32Float>(w, h, d),
    };
    res.map_err(|source| TiffError::Format {
        path: path.display().to_string(),
        source,
    })
}

/// Reads the first page of a grayscale TIFF: `(width, height, pixels)`.
pub fn read_plane(path: &Path) -> Result<(usize, usize, Plane), TiffError> {
    let img = read_image(path)?;
    Ok((img.width, img.height, img.plane))
}

/// One image read from a file, with what OME-TIFF metadata says about it.
#[derive(Debug, Clone, PartialEq)]
pub struct TiffImage {
    pub width: usize,
    pub height: usize,
    pub plane: Plane,
    /// `PhysicalSizeX` from OME-XML, in µm, when present.
    pub pixel_size_um: Option<f64>,
    /// Channel names from OME-XML, when present.
    pub channel_names: Vec<String>,
}

/// Reads the first page and, if the file is an OME-TIFF, its pixel size and channel names.
pub fn read_image(path: &Path) -> Result<TiffImage, TiffError> {
    read_image_with(path, tiff::decoder::Limits::default())
}

fn read_image_with(path: &Path, limits: tiff::decoder::Limits) -> Result<TiffImage, TiffError> {
    let p = || path.display().to_string();
    let file = File::open(path).map_err(|source| TiffError::Io { path: p(), source })?;
    let fmt = |source| TiffError::Format { path: p(), source };
    let mut dec = Decoder::new(BufReader::new(file)).map_err(fmt)?.with_limits(limits);
    let description = dec
        .get_tag_ascii_string(tiff::tags::Tag::ImageDescription)
        .unwrap_or_default();
    let (w, h) = dec.dimensions().map_err(fmt)?;
    let plane = match dec.read_image().map_err(fmt)? {
        DecodingResult::U8(d) => Plane::U8(d),
        DecodingResult::U16(d) => Plane::U16(d),
        DecodingResult::U32(d) => Plane::U32(d),
        DecodingResult::F32(d) => Plane::F32(d),
        other => {
            let kind = format!("{:?}", std::mem::discriminant(&other));
            return Err(TiffError::Unsupported { path: p(), kind });
        }
    };
    let (pixel_size_um, channel_names) = ome_metadata(&description);
    Ok(TiffImage {
        width: w as usize,
        height: h as usize,
        plane,
        pixel_size_um,
        channel_names,
    })
}

/// What a file's first directory says, read without decoding a pixel: a reader checks size and
/// sample type against its plan, and whether the data is all there, before it spends memory on
/// decompression (a deflate bomb of a few hundred KB can name gigabytes).
#[derive(Debug, Clone, PartialEq)]
pub struct TiffHeader {
    pub width: usize,
    pub height: usize,
    /// The sample type as a user would name it (`uint16`, `int16`, `float64`, `bool`, `rgb8`...).
    pub sample: String,
    /// Whether the last chunk of pixel data (the last a sequential writer fills) ends in zero
    /// bytes: the mark of a preallocated file whose pixels are not written yet.
    pub zero_tail: bool,
}

/// Bytes looked at at the end of the last chunk: enough that a real image (camera offset, noise,
/// a compressed stream's checksum) is not all zero there by chance.
const TAIL_BYTES: u64 = 512;

/// Reads the first directory of `path` and checks that every chunk of pixel data it names lies
/// inside the file (else [`TiffError::Incomplete`]).
pub fn read_header(path: &Path) -> Result<TiffHeader, TiffError> {
    use std::io::{Read, Seek, SeekFrom};
    use tiff::tags::Tag;
    let p = || path.display().to_string();
    let mut file = File::open(path).map_err(|source| TiffError::Io { path: p(), source })?;
    let file_len = file
        .metadata()
        .map_err(|source| TiffError::Io { path: p(), source })?
        .len();
    let fmt = |source| TiffError::Format { path: p(), source };
    let mut dec = Decoder::new(BufReader::new(
        file.try_clone().map_err(|source| TiffError::Io { path: p(), source })?,
    ))
    .map_err(fmt)?;
    let (w, h) = dec.dimensions().map_err(fmt)?;
    let format = dec
        .find_tag_unsigned_vec::<u16>(Tag::SampleFormat)
        .map_err(fmt)?
        .and_then(|v| v.first().copied())
        .unwrap_or(1);
    let sample = match dec.colortype().map_err(fmt)? {
        tiff::ColorType::Gray(1) => "bool".to_string(),
        tiff::ColorType::Gray(bits) => match format {
            1 => format!("uint{bits}"),
            2 => format!("int{bits}"),
            3 => format!("float{bits}"),
            _ => format!("{bits}-bit sample format {format}"),
        },
        other => format!("{other:?}").to_lowercase(),
    };
    let (offsets, counts) = match dec.get_chunk_type() {
        tiff::decoder::ChunkType::Strip => (Tag::StripOffsets, Tag::StripByteCounts),
        tiff::decoder::ChunkType::Tile => (Tag::TileOffsets, Tag::TileByteCounts),
    };
    let offsets = dec
        .find_tag_unsigned_vec::<u64>(offsets)
        .map_err(fmt)?
        .unwrap_or_default();
    let counts = dec
        .find_tag_unsigned_vec::<u64>(counts)
        .map_err(fmt)?
        .unwrap_or_default();
    let mut last: Option<(u64, u64)> = None;
    for (&o, &n) in offsets.iter().zip(&counts) {
        let end = o.saturating_add(n);
        if end > file_len {
            return Err(TiffError::Incomplete {
                path: p(),
                detail: format!("pixel data up to byte {end}, the file has {file_len}"),
            });
        }
        if n > 0 && last.is_none_or(|(lo, _)| o > lo) {
            last = Some((o, n));
        }
    }
    let zero_tail = match last {
        Some((o, n)) => {
            let k = n.min(TAIL_BYTES);
            let mut buf = vec![0u8; k as usize];
            file.seek(SeekFrom::Start(o + n - k))
                .and_then(|_| file.read_exact(&mut buf))
                .map_err(|source| TiffError::Io { path: p(), source })?;
            buf.iter().all(|&b| b == 0)
        }
        None => false,
    };
    Ok(TiffHeader {
        width: w as usize,
        height: h as usize,
        sample,
        zero_tail,
    })
}

/// [`read_image`] with decoded data capped at `max_bytes`, for files from outside.
pub fn read_image_limited(path: &Path, max_bytes: usize) -> Result<TiffImage, TiffError> {
    let mut limits = tiff::decoder::Limits::default();
    limits.decoding_buffer_size = max_bytes;
    limits.intermediate_buffer_size = max_bytes;
    read_image_with(path, limits)
}

/// Every channel of a 2-D image file: the pages of a multi-page TIFF (how ImageJ, tifffile and
/// OME-TIFF store `(C, Y, X)`), or the samples of an interleaved (RGB) page. All channels share
/// the first page's size; pages of another size (thumbnails, pyramids) end the channel list.
pub fn read_channels(path: &Path) -> Result<(usize, usize, Vec<Plane>), TiffError> {
    let p = || path.display().to_string();
    let file = File::open(path).map_err(|source| TiffError::Io { path: p(), source })?;
    let fmt = |source| TiffError::Format { path: p(), source };
    let mut dec = Decoder::new(BufReader::new(file)).map_err(fmt)?;
    let (w, h) = dec.dimensions().map_err(fmt)?;
    let mut planes = Vec::new();
    loop {
        let samples = match dec.colortype().map_err(fmt)? {
            tiff::ColorType::Gray(_) => 1,
            tiff::ColorType::RGB(_) => 3,
            tiff::ColorType::RGBA(_) => 4,
            tiff::ColorType::GrayA(_) => 2,
            other => {
                return Err(TiffError::Unsupported {
                    path: p(),
                    kind: format!("{other:?}"),
                })
            }
        };
        let data = dec.read_image().map_err(fmt)?;
        macro_rules! split {
            ($v:expr, $variant:ident) => {{
                for s in 0..samples {
                    planes.push(Plane::$variant(
                        $v.iter().skip(s).step_by(samples).copied().collect(),
                    ));
                }
            }};
        }
        match data {
            DecodingResult::U8(d) => split!(d, U8),
            DecodingResult::U16(d) => split!(d, U16),
            DecodingResult::U32(d) => split!(d, U32),
            DecodingResult::F32(d) => split!(d, F32),
            other => {
                return Err(TiffError::Unsupported {
                    path: p(),
                    kind: sample_type(&other).into(),
                });
            }
        }
        if !dec.more_images() {
            break;
        }
        dec.next_image().map_err(fmt)?;
        if dec.dimensions().map_err(fmt)? != (w, h) {
            break;
        }
    }
    Ok((w as usize, h as usize, planes))
}

/// A decoded image's sample type, as a user would name it.
fn sample_type(d: &DecodingResult) -> &'static str {
    match d {
        DecodingResult::U8(_) => "uint8",
        DecodingResult::U16(_) => "uint16",
        DecodingResult::U32(_) => "uint32",
        DecodingResult::U64(_) => "uint64",
        DecodingResult::F16(_) => "float16",
        DecodingResult::F32(_) => "float32",
        DecodingResult::F64(_) => "float64",
        DecodingResult::I8(_) => "int8",
        DecodingResult::I16(_) => "int16",
        DecodingResult::I32(_) => "int32",
        DecodingResult::I64(_) => "int64",
    }
}

/// Pixel size (µm) and channel names from an OME-XML description. Only the attributes we use are
/// looked at; anything else in the XML is ignored.
pub fn ome_metadata(xml: &str) -> (Option<f64>, Vec<String>) {
    if !xml.contains("<OME") {
        return (None, Vec::new());
    }
    let attr = |tag_start: usize, name: &str| -> Option<String> {
        let rest = &xml[tag_start..];
        let end = rest.find('>')?;
        let tag = &rest[..end];
        let key = format!(" {name}=\"");
        let i = tag.find(&key)? + key.len();
        let j = tag[i..].find('"')?;
        Some(tag[i..i + j].to_string())
    };
    let pixel_size = xml.find("<Pixels").and_then(|i| {
        let v: f64 = attr(i, "PhysicalSizeX")?.parse().ok()?;
        let unit = attr(i, "PhysicalSizeXUnit").unwrap_or_else(|| "µm".into());
        match unit.as_str() {
            "µm" | "um" | "micron" => Some(v),
            "nm" => Some(v / 1000.0),
            "mm" => Some(v * 1000.0),
            _ => None,
        }
    });
    let mut channels = Vec::new();
    let mut from = 0;
    while let Some(i) = xml[from..].find("<Channel") {
        let at = from + i;
        if let Some(n) = attr(at, "Name") {
            channels.push(n);
        }
        from = at + 8;
    }
    (pixel_size, channels)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ome_xml_pixel_size_and_channels() {
        let xml = r#"<?xml version="1.0"?><OME><Image ID="Image:0"><Pixels DimensionOrder="XYCZT" PhysicalSizeX="0.325" PhysicalSizeXUnit="µm" SizeX="4"><Channel ID="Channel:0:0" Name="DAPI"/><Channel ID="Channel:0:1" Name="ER"/></Pixels></Image></OME>"#;
        let (px, ch) = super::ome_metadata(xml);
        assert_eq!(px, Some(0.325));
        assert_eq!(ch, vec!["DAPI", "ER"]);
        assert_eq!(super::ome_metadata("ImageJ=1.54"), (None, vec![]));
    }

    use super::*;

    #[test]
    fn round_trips_every_type() {
        let dir = std::env::temp_dir().join(format!("liveomics-tiff-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for plane in [
            Plane::U8(vec![1, 2, 3, 4, 5, 6]),
            Plane::U16(vec![1, 2, 3, 65535, 5, 6]),
            Plane::U32(vec![1, 2, 3, 4, 5, 70000]),
            Plane::F32(vec![0.5, 2.0, 3.0, 4.0, 5.0, -6.0]),
        ] {
            let path = dir.join("x.tif");
            write_plane(&path, 3, 2, &plane).unwrap();
            assert_eq!(read_plane(&path).unwrap(), (3, 2, plane));
        }
        let junk = dir.join("junk.tif");
        header_tells_unfinished_files(&dir);
        std::fs::write(&junk, b"not a tiff").unwrap();
        assert!(matches!(read_plane(&junk), Err(TiffError::Format { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// What a watcher sees of a file a writer has not finished: pixel data past the end, a
    /// preallocated tail of zeros; and sample types named as users name them.
    fn header_tells_unfinished_files(dir: &Path) {
        let path = dir.join("h.tif");
        let pixels: Vec<u16> = (0..64 * 64).map(|i| 100 + (i % 7) as u16).collect();
        write_plane(&path, 64, 64, &Plane::U16(pixels)).unwrap();
        let h = read_header(&path).unwrap();
        assert_eq!(
            (h.width, h.height, h.sample.as_str(), h.zero_tail),
            (64, 64, "uint16", false)
        );
        // The pixels come first and the directory (at the offset in bytes 4..8) last in this
        // writer's files: zero the last
        // 600 bytes of pixel data, as a preallocated file not yet filled would be.
        let mut bytes = std::fs::read(&path).unwrap();
        let end = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
        bytes[end - 600..end].fill(0);
        std::fs::write(&path, &bytes).unwrap();
        assert!(read_header(&path).unwrap().zero_tail);
        let mut grown = std::fs::read(&path).unwrap();
        grown[end - 1] = 1;
        std::fs::write(&path, &grown).unwrap();
        assert!(!read_header(&path).unwrap().zero_tail, "only an all-zero tail counts");
        let signed = dir.join("i16.tif");
        create(&signed)
            .unwrap()
            .write_image::<colortype::GrayI16>(4, 4, &[-1i16; 16])
            .unwrap();
        assert_eq!(read_header(&signed).unwrap().sample, "int16");
        // Cut in half: its directory (written last by this writer) is not there yet.
        let cut = dir.join("cut.tif");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        assert!(matches!(
            read_header(&cut),
            Err(TiffError::Format { .. } | TiffError::Incomplete { .. })
        ));
    }
}
