//! The arrays of a field: raw and virtual channels and label images, each a multiscale pyramid
//! written level by level.

use super::*;

impl ZarrSink {
    pub(super) fn has_time(&self) -> bool {
        self.plan.timepoints > 1
    }

    pub(super) fn levels(&self) -> usize {
        self.cfg.pyramid_levels.max(1) as usize
    }

    /// `(height, width)` of pyramid level `k`.
    pub(super) fn level_shape(&self, k: usize) -> (u64, u64) {
        let (mut h, mut w) = (self.plan.height as u64, self.plan.width as u64);
        for _ in 0..k {
            h = h.div_ceil(2);
            w = w.div_ceil(2);
        }
        (h, w)
    }

    pub(super) fn axes(&self) -> Vec<ome::Axis> {
        let axis = |name: &str, kind: &str, unit: Option<&str>| ome::Axis {
            name: name.into(),
            kind: kind.into(),
            unit: unit.map(String::from),
        };
        let mut axes = Vec::new();
        if self.has_time() {
            axes.push(axis("t", "time", None));
        }
        axes.push(axis("c", "channel", None));
        axes.push(axis("y", "space", Some("micrometer")));
        axes.push(axis("x", "space", Some("micrometer")));
        axes
    }

    /// The pyramid of an image (`label == false`: 2×2 means) or a label image (2×2 top-left
    /// picks, so that no level holds an id that does not exist).
    pub(super) fn multiscales(&self, name: &str, label: bool) -> Vec<ome::Multiscale> {
        let datasets = (0..self.levels())
            .map(|k| {
                let px = self.plan.pixel_size_um * (1u64 << k) as f64;
                let mut scale = Vec::new();
                if self.has_time() {
                    scale.push(1.0);
                }
                scale.extend([1.0, px, px]);
                ome::Dataset {
                    path: k.to_string(),
                    transforms: vec![ome::Transform {
                        kind: "scale".into(),
                        scale,
                    }],
                }
            })
            .collect();
        let (kind, method, description) = if label {
            (
                "nearest",
                "liveomics_kernels::cpu::downsample2x_nearest",
                "each level keeps the top-left pixel of every 2x2 block of the level above",
            )
        } else {
            (
                "mean",
                "liveomics_kernels::cpu::downsample2x_mean",
                "each level is the rounded mean of every 2x2 block of the level above; odd edges repeat the last row or column",
            )
        };
        let metadata = serde_json::json!({
            "description": description,
            "method": method,
            "version": env!("CARGO_PKG_VERSION"),
            "kwargs": {"factor": 2, "levels": self.levels()},
        });
        vec![ome::Multiscale {
            name: name.into(),
            axes: self.axes(),
            datasets,
            kind: Some(kind.into()),
            metadata: metadata.as_object().cloned(),
        }]
    }

    /// Shape and dimension names of level `k` of an array with `channels` channels.
    pub(super) fn array_shape(&self, k: usize, channels: u64) -> (Vec<u64>, Vec<&'static str>) {
        let (h, w) = self.level_shape(k);
        if self.has_time() {
            (
                vec![self.plan.timepoints as u64, channels, h, w],
                vec!["t", "c", "y", "x"],
            )
        } else {
            (vec![channels, h, w], vec!["c", "y", "x"])
        }
    }

    pub(super) fn prefix(&self, t: u32, c: u64) -> Vec<u64> {
        if self.has_time() {
            vec![t as u64, c]
        } else {
            vec![c]
        }
    }

    pub(super) fn create_pyramid(&self, node: &str, channels: u64, labels: bool) -> Result<(), SinkError> {
        for k in 0..self.levels() {
            let (shape, dims) = self.array_shape(k, channels);
            let path = format!("{node}/{k}");
            if labels {
                self.store
                    .create_array(&path, shape, dims, data_type::uint32(), 0u32, Map::new())?;
            } else {
                self.store
                    .create_array(&path, shape, dims, data_type::uint16(), 0u16, Map::new())?;
            }
        }
        Ok(())
    }

    pub(super) fn open_levels(&self, node: &str) -> Result<Vec<Array<node::Storage>>, SinkError> {
        (0..self.levels())
            .map(|k| self.store.open_array(&format!("{node}/{k}")))
            .collect()
    }

    /// Writes one plane into every level of a pyramid: level 0 straight from `full` (no copy),
    /// each next level by `halve` from the previous one.
    pub(super) fn write_pyramid<T: zarrs::array::Element>(
        &self,
        node: &str,
        arrays: &[Array<node::Storage>],
        prefix: &[u64],
        full: &[T],
        halve: Halve<T>,
    ) -> Result<(), SinkError> {
        let (mut w, mut h) = (self.plan.width, self.plan.height);
        let mut level: Option<Vec<T>> = None;
        for (k, array) in arrays.iter().enumerate() {
            if k > 0 {
                let (next, w2, h2) = halve(level.as_deref().unwrap_or(full), w, h)?;
                (level, w, h) = (Some(next), w2, h2);
            }
            store_plane(array, &format!("{node}/{k}"), prefix, level.as_deref().unwrap_or(full))?;
        }
        Ok(())
    }

    /// The virtual channels of this field as camera-like planes (photoelectrons, rounded and
    /// clamped to u16), with their channel index; a model that failed on the field has none.
    pub(super) fn virtual_planes(&self, work: &FieldWork) -> Vec<(usize, Vec<u16>)> {
        let n = work.field.width * work.field.height;
        let base = self.plan.channels.len();
        self.virtual_channels
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                let img = work.images.iter().find(|m| m.model == v.model)?;
                let k = img.channels.iter().position(|c| *c == v.output)?;
                let plane = img.data.data.get(k * n..(k + 1) * n)?;
                Some((
                    base + i,
                    plane.iter().map(|&x| x.round().clamp(0.0, 65535.0) as u16).collect(),
                ))
            })
            .collect()
    }

    pub(super) fn write_raw(
        &self,
        image: &str,
        work: &FieldWork,
        virtual_planes: &[(usize, Vec<u16>)],
    ) -> Result<(), SinkError> {
        let t = work.field.key.timepoint;
        let raw: Vec<(usize, &[u16])> = work
            .field
            .channels
            .iter()
            .enumerate()
            .filter_map(|(c, px)| px.as_deref().map(|px| (c, px)))
            .chain(virtual_planes.iter().map(|(c, px)| (*c, px.as_slice())))
            .collect();
        self.write_planes(image, t, &raw)
    }

    /// Planes of an image at timepoint `t`, each into its channel at every level. Channels are
    /// separate shards: encoded and written concurrently on the pool.
    pub(super) fn write_planes<P: AsRef<[u16]> + Sync>(
        &self,
        image: &str,
        t: u32,
        planes: &[(usize, P)],
    ) -> Result<(), SinkError> {
        let arrays = self.open_levels(image)?;
        planes.par_iter().try_for_each(|(c, px)| {
            self.write_pyramid(
                image,
                &arrays,
                &self.prefix(t, *c as u64),
                px.as_ref(),
                liveomics_kernels::cpu::downsample2x_mean,
            )
        })
    }

    pub(super) fn write_label(&self, node: &str, t: u32, labels: &[u32]) -> Result<(), SinkError> {
        let arrays = self.open_levels(node)?;
        self.write_pyramid(
            node,
            &arrays,
            &self.prefix(t, 0),
            labels,
            liveomics_kernels::cpu::downsample2x_nearest,
        )
    }
}
