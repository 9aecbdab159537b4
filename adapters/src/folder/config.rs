//! `[source.folder]`: the watched directory, its file-name layout and the replay pace.

use super::*;

/// Replay pacing: as fast as the pipeline takes frames, or the original timing scaled.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Speed {
    Max,
    /// 1.0 is real time; 4.0 four times faster.
    Factor(f64),
}

impl TryFrom<String> for Speed {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "max" => Ok(Speed::Max),
            "realtime" => Ok(Speed::Factor(1.0)),
            other => other
                .trim_end_matches(['x', 'X', '×'])
                .parse::<f64>()
                .ok()
                .filter(|f| (0.001..=1e6).contains(f))
                .map(Speed::Factor)
                .ok_or_else(|| format!("speed {s:?} is not max, realtime or a factor like 4x (0.001x to 1000000x)")),
        }
    }
}

impl From<Speed> for String {
    fn from(s: Speed) -> String {
        match s {
            Speed::Max => "max".into(),
            Speed::Factor(1.0) => "realtime".into(),
            Speed::Factor(f) => format!("{f}x"),
        }
    }
}

crate::source_section! {
/// `[source.folder]`. Its channels are in channel-number order (`ch1`/`w1`/`C01` is the first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FolderConfig {
    /// The directory the instrument writes into (searched recursively).
    pub path: PathBuf,
    pub layout: LayoutKind,
    /// Regex with named groups for `layout = "pattern"`.
    pub pattern: String,
    /// Whether numbers in a user pattern start at 1 (vendor layouts always do).
    pub one_based: bool,
    /// Keep watching for new files (an acquisition in progress); false reads what is there, in
    /// acquisition order, and ends (replay).
    pub watch: bool,
    /// Poll instead of inotify (network shares, where inotify sees nothing).
    pub polling: bool,
    pub poll_interval_ms: u64,
    /// A file unchanged for this long counts as complete.
    pub stable_ms: u64,
    /// A file still changing or still unreadable after this long is reported.
    pub stuck_timeout_ms: u64,
    /// In watch mode, walk the folder this often against what was seen (0: never): a file no
    /// event reported is read (and counted), a file changed after it was read is reported.
    pub rescan_ms: u64,
    /// In watch mode, end when no new file arrived for this long (0: run until stopped).
    pub idle_exit_ms: u64,
    /// Replay pacing by the files' modification times.
    pub speed: Speed,
}
}

impl Default for FolderConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::new(),
            layout: LayoutKind::Phenix,
            pattern: String::new(),
            one_based: true,
            plate: "plate".into(),
            plate_format: 96,
            channels: vec!["DAPI".into(), "Microtubules".into(), "ER".into()],
            width_px: 0,
            height_px: 0,
            pixel_size_um: 0.0,
            timepoints: 1,
            watch: true,
            polling: false,
            poll_interval_ms: 500,
            stable_ms: 500,
            stuck_timeout_ms: 30_000,
            rescan_ms: 2000,
            idle_exit_ms: 0,
            speed: Speed::Max,
        }
    }
}

impl FolderConfig {
    /// Problems with this section, keys relative to it. The folder itself is checked when the
    /// source starts (it may legitimately not exist yet when the config is validated elsewhere).
    pub fn validate(&self) -> Vec<Invalid> {
        let mut out = Vec::new();
        if self.path.as_os_str().is_empty() {
            out.push(Invalid::new("path", "the folder to watch is required"));
        }
        self.plate_spec().validate(&mut out);
        if let Ok(f) = PlateFormat::new(self.plate_format) {
            if let Err(e) = Layout::new(self.layout, &self.pattern, f, self.one_based) {
                out.push(Invalid::new("pattern", e.to_string()));
            }
        }
        if (self.width_px == 0) != (self.height_px == 0) {
            out.push(Invalid::new("width_px", "set both width_px and height_px, or neither"));
        }
        if !(self.pixel_size_um >= 0.0 && self.pixel_size_um.is_finite()) {
            out.push(Invalid::new("pixel_size_um", "must be >= 0 (0: from OME-XML)"));
        }
        if self.stable_ms == 0 || self.poll_interval_ms == 0 {
            out.push(Invalid::new("stable_ms", "stable_ms and poll_interval_ms must be > 0"));
        }
        out
    }
}
