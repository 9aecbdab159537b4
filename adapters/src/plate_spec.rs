//! The keys a source's section uses to describe the plate it will deliver, declared once for
//! every source that is told its plan (folder, zenoh): `plate`, `plate_format`, `channels`,
//! `width_px`, `height_px`, `pixel_size_um`, `timepoints`, with the checks they share.
//!
//! A macro that writes the keys into each section's struct, rather than a struct under
//! `#[serde(flatten)]`: serde's flatten does not work with `deny_unknown_fields`, and an error
//! inside a flattened struct loses its key path (checked: `serde_path_to_error` reports the
//! section, not `plate_format`), while a config error must name its key.

use crate::model::{Name, PlateFormat};
use crate::Invalid;

/// The plate-plan keys of a source section.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlateSpec<'a> {
    pub plate: &'a str,
    pub plate_format: u16,
    pub channels: &'a [String],
    pub width_px: u32,
    pub height_px: u32,
    pub pixel_size_um: f64,
    pub timepoints: u32,
}

impl PlateSpec<'_> {
    /// The checks every source makes of these keys, keyed under the section; each source adds
    /// what its sizes may be (a folder reads 0 from its first image, the zenoh source cannot).
    pub fn validate(&self, out: &mut Vec<Invalid>) {
        if let Err(e) = Name::new(self.plate) {
            out.push(Invalid::new("plate", e.to_string()));
        }
        if let Err(e) = PlateFormat::new(self.plate_format) {
            out.push(Invalid::new("plate_format", e.to_string()));
        }
        if self.channels.is_empty() {
            out.push(Invalid::new("channels", "name at least one channel"));
        }
        if self.timepoints == 0 {
            out.push(Invalid::new("timepoints", "must be at least 1"));
        }
    }
}

/// Declares a source section's struct: the plate-plan keys first, then the section's own
/// fields, and `plate_spec()` to read the former as a [`PlateSpec`].
#[macro_export]
macro_rules! source_section {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident : $ty:ty,)* }) => {
        $(#[$meta])*
        pub struct $name {
            /// The plate's name in the output (`^[A-Za-z0-9]+$`); a source that reads plate names
            /// (file names, keys) rejects others.
            pub plate: String,
            /// 96 or 384.
            pub plate_format: u16,
            /// Channel names, in the output's channel order.
            pub channels: Vec<String>,
            /// Field size in pixels (a folder source: 0 takes it from the first image).
            pub width_px: u32,
            pub height_px: u32,
            /// Pixel size in µm (a folder source: 0 takes it from the first image's OME-XML).
            pub pixel_size_um: f64,
            pub timepoints: u32,
            $($(#[$fmeta])* pub $field: $ty,)*
        }

        impl $name {
            /// The plate-plan keys of this section.
            pub fn plate_spec(&self) -> $crate::plate_spec::PlateSpec<'_> {
                $crate::plate_spec::PlateSpec {
                    plate: &self.plate,
                    plate_format: self.plate_format,
                    channels: &self.channels,
                    width_px: self.width_px,
                    height_px: self.height_px,
                    pixel_size_um: self.pixel_size_um,
                    timepoints: self.timepoints,
                }
            }
        }
    };
}
