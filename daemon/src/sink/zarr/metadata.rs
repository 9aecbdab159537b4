//! The OME-Zarr attributes of labels, images and the plate, built from the plan and what has been
//! written.

use super::*;

impl ZarrSink {
    pub(super) fn label_metadata(&self, name: &str, work: &FieldWork) -> Map<String, Value> {
        let t = work.table();
        let column = |c: &str| t.get(c).map(|c| &c.values);
        let at = |v: Option<&Values>, i: usize| match v {
            Some(Values::U32(v)) => json!(v[i]),
            Some(Values::F32(v)) => json!(v[i]),
            None => Value::Null,
        };
        let (nucleus_area, area) = (column("nucleus_area_px"), column("area_px"));
        let (centroid_x, centroid_y) = (column("centroid_x_px"), column("centroid_y_px"));
        let labels: &[u32] = match column("label") {
            Some(Values::U32(v)) => v,
            _ => &[],
        };
        let colors = labels
            .iter()
            .map(|&l| ome::LabelColor {
                label_value: l,
                rgba: label_color(l),
            })
            .collect();
        // A nucleus' property is its area; a cell's, its area and centroid.
        let properties = labels
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                let mut p = Map::new();
                p.insert("label-value".into(), json!(l));
                if name == "nuclei" {
                    p.insert("area_px".into(), at(nucleus_area, i));
                } else {
                    p.insert("area_px".into(), at(area, i));
                    p.insert("centroid_x_px".into(), at(centroid_x, i));
                    p.insert("centroid_y_px".into(), at(centroid_y, i));
                }
                p
            })
            .collect();
        let attrs = ome::LabelAttrs {
            multiscales: self.multiscales(name, true),
            image_label: ome::ImageLabel {
                colors,
                properties,
                source: ome::LabelSource { image: "../../".into() },
            },
        };
        let liveomics = work.segmented_by.as_deref().map(|m| ome::LabelLiveomics {
            segmentation: m.to_string(),
        });
        ome::attributes(Some(&attrs), liveomics.as_ref())
    }

    pub(super) fn image_metadata(&self, well: WellId, field: u32) -> Map<String, Value> {
        let acquired_channels = self
            .plan
            .channels
            .iter()
            .map(|c| (c.name.as_str(), c.color.as_str(), true));
        // Virtual channels take the colour of the acquired channel of the same protein, if any.
        let virtual_channels = self.virtual_channels.iter().map(|v| {
            let color = self
                .plan
                .channels
                .iter()
                .find(|c| c.name.eq_ignore_ascii_case(&v.output))
                .map_or("FFFFFF", |c| c.color.as_str());
            (v.label.as_str(), color, false)
        });
        let channels = acquired_channels
            .chain(virtual_channels)
            .zip(&self.windows)
            .map(|((label, color, active), win)| {
                let (start, end) = win.window();
                ome::OmeroChannel {
                    label: label.into(),
                    color: color.into(),
                    active,
                    window: Some(ome::Window {
                        min: 0,
                        max: 65535,
                        start: start.into(),
                        end: end.into(),
                    }),
                }
            })
            .collect();
        let acquired = ome::ImageLiveomics {
            acquired_unix_ns: self
                .acquired
                .get(&(well, field))
                .map(|m| m.iter().map(|(t, ns)| (t.to_string(), ns.to_string())).collect())
                .unwrap_or_default(),
            owed: self
                .owed
                .get(&(well, field))
                .map(|m| m.iter().map(|(t, models)| (t.to_string(), models.clone())).collect())
                .unwrap_or_default(),
        };
        let image = ome::ImageAttrs {
            multiscales: self.multiscales("raw", false),
            omero: Some(ome::Omero {
                channels,
                rdefs: Map::from_iter([("model".to_string(), json!("color"))]),
            }),
        };
        ome::attributes(Some(&image), Some(&acquired))
    }

    pub(super) fn plate_metadata(&self, listed: &BTreeMap<WellId, BTreeSet<(u32, u32)>>) -> Map<String, Value> {
        let fmt = self.plan.format;
        let named = |name: String| ome::Named { name };
        let wells: Vec<ome::WellRef> = listed
            .keys()
            .map(|w| ome::WellRef {
                path: format!("{}/{}", w.row_name(), w.column_name()),
                row_index: w.row,
                column_index: w.column,
            })
            .collect();
        let field_count = listed
            .values()
            .map(|f| f.iter().map(|(f, _)| f).collect::<BTreeSet<_>>().len())
            .max()
            .unwrap_or(0);
        // A plate lists its wells once it has any: NGFF requires at least one.
        let plate = (!wells.is_empty()).then(|| ome::PlateAttrs {
            plate: ome::Plate {
                name: self.plan.plate.to_string(),
                version: ome::OME_VERSION.into(),
                rows: (0..fmt.rows()).map(|r| named(PlateFormat::row_name(r))).collect(),
                columns: (0..fmt.columns()).map(|c| named(PlateFormat::column_name(c))).collect(),
                wells,
                field_count,
            },
        });
        ome::attributes(plate.as_ref(), Some(&self.marker))
    }

    /// The plate's metadata. Alone: of the wells this sink wrote. In a cluster only the plate's
    /// writer writes it: after each of its fields from what it wrote or loaded and what the other
    /// members' done notices named (no listing of the store per field), and at the end from a
    /// full listing of the store ([`Self::write_plate_listed`]).
    pub(super) fn write_plate(&self) -> Result<(), SinkError> {
        self.write_plate_from(None)
    }

    pub(super) fn write_plate_listed(&self) -> Result<(), SinkError> {
        self.write_plate_from(Some(self.stored_wells()))
    }

    fn write_plate_from(&self, listed: Option<BTreeMap<WellId, BTreeSet<(u32, u32)>>>) -> Result<(), SinkError> {
        let Some(m) = &self.member else {
            return self.store.group("/", self.plate_metadata(&self.wells));
        };
        if !m.writes_plate() {
            return Ok(());
        }
        let wells = listed.unwrap_or_else(|| {
            let mut wells = self.wells.clone();
            for (well, fields) in m.fields_done() {
                if let Ok(id) = WellId::parse(&well, self.plan.format) {
                    wells.entry(id).or_default().extend(fields);
                }
            }
            wells
        });
        self.store.group("/", self.plate_metadata(&wells))
    }
}

/// A stable, distinct colour per label id (golden-angle hue).
pub(super) fn label_color(l: u32) -> [u8; 4] {
    let h = (l as f64 * 137.507_764) % 360.0;
    let x = 1.0 - ((h / 60.0) % 2.0 - 1.0).abs();
    let (r, g, b) = match (h / 60.0) as u32 {
        0 => (1.0, x, 0.0),
        1 => (x, 1.0, 0.0),
        2 => (0.0, 1.0, x),
        3 => (0.0, x, 1.0),
        4 => (x, 0.0, 1.0),
        _ => (1.0, 0.0, x),
    };
    [(r * 255.0) as u8, (g * 255.0) as u8, (b * 255.0) as u8, 255]
}
