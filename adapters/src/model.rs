//! The acquisition data model every source produces and every stage consumes.
//!
//! Names here end up as OME-Zarr paths and zenoh key chunks, so they are validated once, when they
//! are constructed, against `^[A-Za-z0-9]+$`: nothing downstream has to re-check a name.

use std::fmt;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};

/// Errors about identifiers and frame contents; these come from untrusted input (config, files,
/// network) and must be reported, not panicked on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    #[error("name {0:?} is not allowed: names must match ^[A-Za-z0-9]+$ (1 to 64 characters)")]
    BadName(String),
    #[error("well {0:?} is not a well name like B03 or P24")]
    BadWell(String),
    #[error("well {well} is outside a {format}-well plate")]
    WellOutsidePlate { well: String, format: u16 },
    #[error("plate format {0} is not supported: use 96 or 384")]
    BadPlateFormat(u16),
}

/// A validated name usable as a path component and zenoh key chunk.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(Arc<str>);

impl Name {
    pub fn new(s: &str) -> Result<Self, ModelError> {
        if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(ModelError::BadName(s.to_string()));
        }
        Ok(Self(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = ModelError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Name::new(&s)
    }
}

impl From<Name> for String {
    fn from(n: Name) -> Self {
        n.0.to_string()
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Plate geometry. Only the SBS formats HCS labs run overnight are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u16", into = "u16")]
pub struct PlateFormat {
    pub wells: u16,
}

impl PlateFormat {
    pub fn new(wells: u16) -> Result<Self, ModelError> {
        match wells {
            96 | 384 => Ok(Self { wells }),
            other => Err(ModelError::BadPlateFormat(other)),
        }
    }

    pub fn rows(&self) -> u16 {
        if self.wells == 384 {
            16
        } else {
            8
        }
    }

    pub fn columns(&self) -> u16 {
        if self.wells == 384 {
            24
        } else {
            12
        }
    }

    /// Row names as OME-Zarr paths: `A`, `B`, ...
    pub fn row_name(row: u16) -> String {
        ((b'A' + row as u8) as char).to_string()
    }

    /// Column names as OME-Zarr paths: `1`, `2`, ... (no zero padding, as ome-zarr-py writes them).
    pub fn column_name(col: u16) -> String {
        (col + 1).to_string()
    }
}

impl TryFrom<u16> for PlateFormat {
    type Error = ModelError;
    fn try_from(v: u16) -> Result<Self, Self::Error> {
        PlateFormat::new(v)
    }
}

impl From<PlateFormat> for u16 {
    fn from(p: PlateFormat) -> u16 {
        p.wells
    }
}

/// A well by 0-based row and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WellId {
    pub row: u16,
    pub column: u16,
}

impl WellId {
    /// Parses `B3`, `B03` or `b03`, and checks it lies on the plate.
    pub fn parse(s: &str, format: PlateFormat) -> Result<Self, ModelError> {
        let bad = || ModelError::BadWell(s.to_string());
        let mut chars = s.chars();
        let r = chars.next().ok_or_else(bad)?.to_ascii_uppercase();
        if !r.is_ascii_uppercase() {
            return Err(bad());
        }
        let digits: String = chars.collect();
        if digits.is_empty() || digits.len() > 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let col: u16 = digits.parse().map_err(|_| bad())?;
        let row = (r as u8 - b'A') as u16;
        if col == 0 || row >= format.rows() || col > format.columns() {
            return Err(ModelError::WellOutsidePlate {
                well: s.to_string(),
                format: format.wells,
            });
        }
        Ok(Self { row, column: col - 1 })
    }

    pub fn row_name(&self) -> String {
        PlateFormat::row_name(self.row)
    }

    pub fn column_name(&self) -> String {
        PlateFormat::column_name(self.column)
    }

    /// The well as one key chunk, e.g. `B3`; also its display name.
    pub fn name(&self) -> String {
        format!("{}{}", self.row_name(), self.column_name())
    }
}

impl fmt::Display for WellId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// Identifies one field of view at one timepoint: the unit the pipeline assembles, processes and
/// writes exactly once.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FieldKey {
    pub plate: Name,
    pub well: WellId,
    pub field: u32,
    pub timepoint: u32,
}

impl fmt::Display for FieldKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/f{}/t{}", self.plate, self.well, self.field, self.timepoint)
    }
}

/// Pixel data as it arrives. Only `U16` is processed today; the others exist so that a source can
/// hand over what it received and the assembler can reject it with a precise reason.
#[derive(Debug, Clone)]
pub enum Pixels {
    U8(Arc<[u8]>),
    U16(Arc<[u16]>),
    F32(Arc<[f32]>),
}

impl Pixels {
    pub fn len(&self) -> usize {
        match self {
            Pixels::U8(p) => p.len(),
            Pixels::U16(p) => p.len(),
            Pixels::F32(p) => p.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> &'static str {
        match self {
            Pixels::U8(_) => "uint8",
            Pixels::U16(_) => "uint16",
            Pixels::F32(_) => "float32",
        }
    }
}

/// Where and why a frame was acquired, when the source knows: what a closed loop needs to send
/// the microscope back to the same place, and to recognise the answer to a follow-up request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Origin {
    /// Stage position `[x, y, z]` in µm.
    pub stage_um: Option<[f64; 3]>,
    /// The acquisition event's index as the control software numbers it (useq: `{"p":1,"c":0}`).
    pub event_index: Option<String>,
    /// Set when the frame answers a follow-up request.
    pub followup_id: Option<String>,
}

/// One channel of one field, as a camera delivers it.
#[derive(Debug, Clone)]
pub struct Frame {
    pub key: FieldKey,
    /// Index into the acquisition's channel list.
    pub channel: usize,
    pub width: usize,
    pub height: usize,
    pub pixels: Pixels,
    /// Wall-clock time of exposure, for records and deadlines across processes.
    pub acquired_at: SystemTime,
    /// Monotonic time the frame entered liveomics; latency is measured from here.
    pub received_at: Instant,
    pub origin: Origin,
}

/// What a source promises to deliver, known before the first frame, so that sinks can write plate
/// metadata up front and the assembler knows which channels make a complete field.
#[derive(Debug, Clone)]
pub struct AcquisitionPlan {
    pub plate: Name,
    pub format: PlateFormat,
    pub channels: Vec<ChannelInfo>,
    pub width: usize,
    pub height: usize,
    pub pixel_size_um: f64,
    /// Wells in acquisition order, when known in advance.
    pub wells: Vec<WellId>,
    pub fields_per_well: u32,
    pub timepoints: u32,
    /// Negative-control wells, when the source declares them: what per-well scores (the
    /// relocalization shift) are measured against.
    pub controls: Vec<WellId>,
}

impl AcquisitionPlan {
    /// A plan for a source that does not know in advance which wells and fields will come (a
    /// watched folder, frames over the network): only the plate, channels and field geometry.
    pub fn open_ended(
        plate: &str,
        plate_format: u16,
        channels: &[String],
        (width, height): (usize, usize),
        pixel_size_um: f64,
        timepoints: u32,
    ) -> Result<Self, ModelError> {
        Ok(Self {
            plate: Name::new(plate)?,
            format: PlateFormat::new(plate_format)?,
            channels: ChannelInfo::from_names(channels),
            width,
            height,
            pixel_size_um,
            wells: Vec::new(),
            fields_per_well: 0,
            timepoints,
            controls: Vec::new(),
        })
    }
}

/// A channel's name and display colour (`RRGGBB`), as OME-Zarr viewers show it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelInfo {
    pub name: String,
    pub color: String,
}

impl ChannelInfo {
    /// Channels named by configuration, coloured in the order fluorescence viewers use
    /// (blue, red, yellow, green, magenta, cyan).
    pub fn from_names(names: &[String]) -> Vec<ChannelInfo> {
        const COLORS: [&str; 6] = ["0000FF", "FF0000", "FFFF00", "00FF00", "FF00FF", "00FFFF"];
        names
            .iter()
            .enumerate()
            .map(|(i, n)| ChannelInfo {
                name: n.clone(),
                color: COLORS[i % COLORS.len()].into(),
            })
            .collect()
    }
}

/// All channels of one field, assembled. `channels[c]` is `None` when channel `c` never arrived
/// before the assembly timeout.
#[derive(Debug, Clone)]
pub struct Field {
    pub key: FieldKey,
    pub width: usize,
    pub height: usize,
    pub channels: Vec<Option<Arc<[u16]>>>,
    pub acquired_at: SystemTime,
    /// Monotonic arrival of the field's first frame.
    pub received_at: Instant,
    /// The first frame's origin.
    pub origin: Origin,
}

impl Field {
    pub fn missing_channels(&self) -> Vec<usize> {
        self.channels
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_none())
            .map(|(i, _)| i)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_reject_paths_and_separators() {
        for bad in ["", "..", "a/b", "a b", "é", "x*", &"a".repeat(65)] {
            assert!(Name::new(bad).is_err(), "{bad:?}");
        }
        assert!(Name::new("Plate01").is_ok());
    }

    #[test]
    fn wells_parse_and_check_bounds() {
        let p96 = PlateFormat::new(96).unwrap();
        let p384 = PlateFormat::new(384).unwrap();
        assert_eq!(WellId::parse("B03", p96).unwrap(), WellId { row: 1, column: 2 });
        assert_eq!(WellId::parse("b3", p96).unwrap().name(), "B3");
        assert!(WellId::parse("I01", p96).is_err());
        assert!(WellId::parse("P24", p384).is_ok());
        assert!(WellId::parse("A13", p96).is_err());
        assert!(WellId::parse("A0", p96).is_err());
        assert!(WellId::parse("A/1", p96).is_err());
        assert!(PlateFormat::new(24).is_err());
    }
}
