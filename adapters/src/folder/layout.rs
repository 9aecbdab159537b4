//! File-name layouts of HCS instrument exports: which plate, well, field, channel, timepoint and
//! plane a file holds. Built-in layouts for the instruments labs run, and a user regex with named
//! groups for everything else. Parsed numbers are checked here; names never become paths.

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::model::{PlateFormat, WellId};

/// A built-in layout or a user pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayoutKind {
    /// Opera Phenix / Operetta: `r02c05f03p01-ch2sk1fk1fl1.tiff`.
    Phenix,
    /// ImageXpress: `P1_B03_s2_w1.tif` (thumbnails `..._thumb...` are ignored).
    Imagexpress,
    /// Yokogawa CellVoyager: `P1_B03_T0001F003L01A02Z01C02.tif`.
    Cellvoyager,
    /// `pattern` from the config: a regex with named groups.
    Pattern,
}

/// What a file name says. Indices here are 0-based; `channel` indexes the configured channels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub plate: Option<String>,
    pub well: WellId,
    pub field: u32,
    pub channel: usize,
    pub timepoint: u32,
    pub plane: u32,
}

/// Why a file name was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("matches no {0:?} file name")]
    NoMatch(LayoutKind),
    #[error("is a thumbnail")]
    Thumbnail,
    #[error("{0}")]
    Value(String),
}

/// ImageXpress puts time-lapse and z-stacks in `TimePoint_N` / `ZStep_N` folders with the same file
/// names inside; those folder numbers (1-based) set the timepoint and plane.
pub fn with_folders(kind: LayoutKind, mut p: Parsed, path: &std::path::Path) -> Parsed {
    if kind != LayoutKind::Imagexpress {
        return p;
    }
    for comp in path.parent().into_iter().flat_map(|d| d.components()) {
        let c = comp.as_os_str().to_string_lossy();
        let num = |prefix: &str| {
            c.strip_prefix(prefix)
                .and_then(|n| n.parse::<u32>().ok())
                .and_then(|n| n.checked_sub(1))
        };
        if let Some(t) = num("TimePoint_") {
            p.timepoint = t;
        }
        if let Some(z) = num("ZStep_") {
            p.plane = z;
        }
    }
    p
}

/// A compiled layout.
#[derive(Debug, Clone)]
pub struct Layout {
    kind: LayoutKind,
    re: Regex,
    format: PlateFormat,
    /// Numbers in names start at 1 (all vendors do); a user pattern may say otherwise.
    one_based: bool,
}

const PHENIX: &str = r"(?i)^r(?P<row>\d{1,2})c(?P<column>\d{1,2})f(?P<field>\d{1,4})p(?P<plane>\d{1,3})-ch(?P<channel>\d{1,2})sk(?P<timepoint>\d{1,5})fk\d+fl\d+\.tiff?$";
const IMAGEXPRESS: &str = r"(?i)^(?P<plate>[A-Za-z0-9]+)_(?P<well>[A-Pa-p]\d{2})_s(?P<field>\d{1,4})_w(?P<channel>\d{1,2})(?P<thumb>_thumb[0-9A-Fa-f-]*)?\.tiff?$";
const CELLVOYAGER: &str = r"(?i)^(?P<plate>[A-Za-z0-9]+)_(?P<well>[A-Pa-p]\d{2})_T(?P<timepoint>\d{4})F(?P<field>\d{3})L\d{2}A\d{2}Z(?P<plane>\d{2})C(?P<channel>\d{2})\.tiff?$";

/// Why a file-name layout does not compile.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("invalid regex: {0}")]
    Regex(#[from] regex::Error),
    #[error("the pattern needs named groups `channel`, `field` and `well` (or `row` and `column`); it has {0:?}")]
    Groups(Vec<String>),
}

impl Layout {
    /// Compiles a layout; a user pattern must have `channel`, `field` and `well` (or `row` and
    /// `column`) groups, and may have `plate`, `timepoint`, `plane`.
    pub fn new(kind: LayoutKind, pattern: &str, format: PlateFormat, one_based: bool) -> Result<Self, LayoutError> {
        let (src, one_based) = match kind {
            LayoutKind::Phenix => (PHENIX, true),
            LayoutKind::Imagexpress => (IMAGEXPRESS, true),
            LayoutKind::Cellvoyager => (CELLVOYAGER, true),
            LayoutKind::Pattern => (pattern, one_based),
        };
        let re = Regex::new(src)?;
        let names: Vec<&str> = re.capture_names().flatten().collect();
        let has = |n: &str| names.contains(&n);
        if !has("channel") || !has("field") || !(has("well") || (has("row") && has("column"))) {
            return Err(LayoutError::Groups(names.iter().map(|n| n.to_string()).collect()));
        }
        Ok(Self {
            kind,
            re,
            format,
            one_based,
        })
    }

    pub fn kind(&self) -> LayoutKind {
        self.kind
    }

    /// Parses a file name (not a path).
    pub fn parse(&self, name: &str) -> Result<Parsed, NameError> {
        let caps = self.re.captures(name).ok_or(NameError::NoMatch(self.kind))?;
        if caps.name("thumb").is_some() {
            return Err(NameError::Thumbnail);
        }
        let num = |g: &str, default: u32| -> Result<u32, NameError> {
            match caps.name(g) {
                None => Ok(default),
                Some(m) => {
                    let v: u32 = m
                        .as_str()
                        .parse()
                        .map_err(|_| NameError::Value(format!("{g} {:?} is not a number", m.as_str())))?;
                    if self.one_based {
                        v.checked_sub(1)
                            .ok_or_else(|| NameError::Value(format!("{g} is 0 but numbers start at 1")))
                    } else {
                        Ok(v)
                    }
                }
            }
        };
        let well = match caps.name("well") {
            Some(w) => WellId::parse(w.as_str(), self.format).map_err(|e| NameError::Value(e.to_string()))?,
            None => {
                let (row, column) = (num("row", 0)?, num("column", 0)?);
                if row >= self.format.rows() as u32 || column >= self.format.columns() as u32 {
                    return Err(NameError::Value(format!(
                        "row {} column {} is outside a {}-well plate",
                        row + 1,
                        column + 1,
                        self.format.wells
                    )));
                }
                WellId {
                    row: row as u16,
                    column: column as u16,
                }
            }
        };
        Ok(Parsed {
            plate: caps.name("plate").map(|m| m.as_str().to_string()),
            well,
            field: num("field", 0)?,
            channel: num("channel", 0)? as usize,
            timepoint: num("timepoint", 0)?,
            plane: num("plane", 0)?,
        })
    }

    /// The file name this layout uses for a field's channel (0-based values), for
    /// `liveomics simulate --layout` and tests.
    pub fn file_name(kind: LayoutKind, plate: &str, p: &Parsed) -> Option<String> {
        let w = &p.well;
        Some(match kind {
            LayoutKind::Phenix => format!(
                "r{:02}c{:02}f{:02}p{:02}-ch{}sk{}fk1fl1.tiff",
                w.row + 1,
                w.column + 1,
                p.field + 1,
                p.plane + 1,
                p.channel + 1,
                p.timepoint + 1
            ),
            LayoutKind::Imagexpress => format!(
                "{plate}_{}{:02}_s{}_w{}.tif",
                w.row_name(),
                w.column + 1,
                p.field + 1,
                p.channel + 1
            ),
            LayoutKind::Cellvoyager => format!(
                "{plate}_{}{:02}_T{:04}F{:03}L01A01Z{:02}C{:02}.tif",
                w.row_name(),
                w.column + 1,
                p.timepoint + 1,
                p.field + 1,
                p.plane + 1,
                p.channel + 1
            ),
            LayoutKind::Pattern => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p96() -> PlateFormat {
        PlateFormat::new(96).unwrap()
    }

    #[test]
    fn vendor_names_parse() {
        let ph = Layout::new(LayoutKind::Phenix, "", p96(), true).unwrap();
        let p = ph.parse("r02c05f03p01-ch2sk1fk1fl1.tiff").unwrap();
        assert_eq!(
            (p.well, p.field, p.channel, p.timepoint, p.plane),
            (WellId { row: 1, column: 4 }, 2, 1, 0, 0)
        );
        let ix = Layout::new(LayoutKind::Imagexpress, "", p96(), true).unwrap();
        let p = ix.parse("P1_B03_s2_w1.tif").unwrap();
        assert_eq!(
            (p.plate.as_deref(), p.well.name().as_str(), p.field, p.channel),
            (Some("P1"), "B3", 1, 0)
        );
        assert_eq!(
            ix.parse("P1_B03_s2_w1_thumbA1B2C3D4-1234.tif"),
            Err(NameError::Thumbnail)
        );
        let cv = Layout::new(LayoutKind::Cellvoyager, "", p96(), true).unwrap();
        let p = cv.parse("P1_B03_T0001F003L01A02Z01C02.tif").unwrap();
        assert_eq!(
            (p.well.name().as_str(), p.field, p.channel, p.timepoint),
            ("B3", 2, 1, 0)
        );
    }

    #[test]
    fn imagexpress_folders_give_timepoint_and_plane() {
        let ix = Layout::new(LayoutKind::Imagexpress, "", p96(), true).unwrap();
        let p = ix.parse("P1_B03_s2_w1.TIF").unwrap();
        let p = with_folders(
            LayoutKind::Imagexpress,
            p,
            std::path::Path::new("/x/TimePoint_3/ZStep_2/P1_B03_s2_w1.TIF"),
        );
        assert_eq!((p.timepoint, p.plane), (2, 1));
    }

    #[test]
    fn names_round_trip_through_file_name() {
        let parsed = Parsed {
            plate: Some("P1".into()),
            well: WellId { row: 7, column: 11 },
            field: 4,
            channel: 2,
            timepoint: 1,
            plane: 0,
        };
        for kind in [LayoutKind::Phenix, LayoutKind::Imagexpress, LayoutKind::Cellvoyager] {
            let l = Layout::new(kind, "", p96(), true).unwrap();
            let name = Layout::file_name(kind, "P1", &parsed).unwrap();
            let back = l.parse(&name).unwrap();
            assert_eq!(
                (back.well, back.field, back.channel),
                (parsed.well, parsed.field, parsed.channel),
                "{name}"
            );
        }
    }

    #[test]
    fn bad_names_and_patterns_are_reported() {
        let ph = Layout::new(LayoutKind::Phenix, "", p96(), true).unwrap();
        assert!(matches!(ph.parse("notes.txt"), Err(NameError::NoMatch(_))));
        assert!(matches!(
            ph.parse("r09c05f03p01-ch2sk1fk1fl1.tiff"),
            Err(NameError::Value(_))
        ));
        assert!(matches!(
            ph.parse("r00c05f03p01-ch2sk1fk1fl1.tiff"),
            Err(NameError::Value(_))
        ));
        assert!(Layout::new(LayoutKind::Pattern, "(?P<well>\\w+)", p96(), true).is_err());
        assert!(Layout::new(LayoutKind::Pattern, "(", p96(), true).is_err());
        let user = Layout::new(
            LayoutKind::Pattern,
            r"^(?P<well>[A-H]\d+)_f(?P<field>\d+)_c(?P<channel>\d+)\.tif$",
            p96(),
            false,
        )
        .unwrap();
        let p = user.parse("C7_f0_c3.tif").unwrap();
        assert_eq!((p.well.name().as_str(), p.field, p.channel), ("C7", 0, 3));
    }
}
