//! The `replay` source: feeds an OME-Zarr plate written by liveomics back through the pipeline,
//! in acquisition order (the times the zarr sink recorded per image and timepoint), at the
//! original pace scaled by `speed`, or as fast as the pipeline takes it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::Sender;
use liveomics_adapters::folder::Speed;
use liveomics_adapters::model::{AcquisitionPlan, ChannelInfo, FieldKey, Frame, Name, Pixels, PlateFormat, WellId};
use liveomics_adapters::source::{wait_until, Source, SourceError, SourceReport, StopToken};
use serde_json::Value;
use zarrs::array::Array;
use zarrs::filesystem::FilesystemStore;

use liveomics_adapters::Invalid;
use serde::{Deserialize, Serialize};

use crate::component::{Context, SourceConfig};
use crate::field::is_virtual_label;
use crate::sink::zarr::node::read_plane;
use crate::sink::zarr::ome;

/// Replay of an OME-Zarr plate written by liveomics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplayConfig {
    /// The `{plate}.zarr` directory.
    pub path: PathBuf,
    pub speed: Speed,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::new(),
            speed: Speed::Max,
        }
    }
}

impl SourceConfig for ReplayConfig {
    fn validate(&self, ctx: &Context, problems: &mut Vec<Invalid>) {
        if self.path.as_os_str().is_empty() {
            problems.push(ctx.invalid("path", "the plate to replay is required"));
        }
    }

    fn build(&self, _ctx: &Context) -> Result<Box<dyn Source>, SourceError> {
        Ok(Box::new(ZarrReplay::new(self)?))
    }
}

/// One field at one timepoint, to be replayed.
#[derive(Debug, Clone)]
struct Item {
    acquired_ns: u128,
    key: FieldKey,
    node: String,
}

/// The replay source.
pub struct ZarrReplay {
    plan: AcquisitionPlan,
    store: Arc<FilesystemStore>,
    items: Vec<Item>,
    speed: Speed,
    skip: std::collections::HashSet<FieldKey>,
}

impl std::fmt::Debug for ZarrReplay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZarrReplay").field("items", &self.items.len()).finish()
    }
}

fn bad(path: &Path, what: impl std::fmt::Display) -> SourceError {
    SourceError::Config(format!("{}: {what}", path.display()))
}

fn attrs(root: &Path, node: &str) -> Result<Value, SourceError> {
    let p = root.join(node).join("zarr.json");
    let text = std::fs::read_to_string(&p).map_err(|source| SourceError::Io {
        context: format!("cannot read {}", p.display()),
        source,
    })?;
    let v: Value = serde_json::from_str(&text).map_err(|e| bad(&p, e))?;
    Ok(v.get("attributes").cloned().unwrap_or(Value::Null))
}

impl ZarrReplay {
    pub fn new(cfg: &ReplayConfig) -> Result<Self, SourceError> {
        let root: PathBuf = cfg.path.clone();
        let top = attrs(&root, "")?;
        let (plate, _) = ome::read::<ome::PlateAttrs, Value>(&top);
        let plate = plate
            .ok_or_else(|| bad(&root, "not an OME-Zarr plate (no readable ome.plate)"))?
            .plate;
        let name = if plate.name.is_empty() { "replay" } else { &plate.name };
        let format = PlateFormat::new(if plate.rows.len() > 8 { 384 } else { 96 })?;
        let plate_name = Name::new(name)?;
        let mut items = Vec::new();
        let mut first_image: Option<String> = None;
        for w in &plate.wells {
            let path = w.path.as_str();
            let well = WellId {
                row: w.row_index,
                column: w.column_index,
            };
            if well.row >= format.rows()
                || well.column >= format.columns()
                || path != format!("{}/{}", well.row_name(), well.column_name())
            {
                return Err(bad(&root, format!("well path {path:?} does not match its indices")));
            }
            let (well_ome, well_liveomics) = ome::read::<ome::WellAttrs, ome::WellLiveomics>(&attrs(&root, path)?);
            let well_liveomics = well_liveomics.unwrap_or_default();
            for img in well_ome.map(|w| w.well.images).unwrap_or_default() {
                let f = img.path.as_str();
                let field: u32 = f
                    .parse()
                    .map_err(|_| bad(&root, format!("image path {f:?} is not a field number")))?;
                let node = format!("{path}/{field}");
                first_image.get_or_insert(node.clone());
                let (_, image) = ome::read::<Value, ome::ImageLiveomics>(&attrs(&root, &node)?);
                let times = image.unwrap_or_default().acquired_unix_ns;
                let mut done: Vec<u32> = well_liveomics
                    .complete
                    .iter()
                    .chain(&well_liveomics.incomplete)
                    .filter(|(f, _)| *f == field)
                    .map(|&(_, t)| t)
                    .collect();
                done.sort_unstable();
                if done.is_empty() {
                    done.push(0);
                }
                for t in done {
                    let acquired_ns = times.get(&t.to_string()).and_then(|s| s.parse().ok()).unwrap_or(0);
                    items.push(Item {
                        acquired_ns,
                        key: FieldKey {
                            plate: plate_name.clone(),
                            well,
                            field,
                            timepoint: t,
                        },
                        node: node.clone(),
                    });
                }
            }
        }
        let first = first_image.ok_or_else(|| bad(&root, "the plate lists no image"))?;
        let (image, _) = ome::read::<ome::ImageAttrs, Value>(&attrs(&root, &first)?);
        let image = image.ok_or_else(|| bad(&root, "image has no readable ome attributes"))?;
        let ms = image
            .multiscales
            .first()
            .ok_or_else(|| bad(&root, "image has no multiscales"))?;
        let dataset = ms.datasets.first().map_or("0", |d| d.path.as_str());
        // The path is read from the file: it names a dataset of this image, never a way out of it.
        if dataset.is_empty() || !dataset.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(bad(
                &root,
                format!("multiscales dataset path {dataset:?} is not a name"),
            ));
        }
        let scale = ms
            .datasets
            .first()
            .and_then(|d| d.transforms.first())
            .and_then(|t| t.scale.last().copied())
            .unwrap_or(1.0);
        let channels: Vec<ChannelInfo> = image
            .omero
            .map(|o| o.channels)
            .unwrap_or_default()
            .into_iter()
            .filter(|c| !is_virtual_label(&c.label))
            .map(|c| ChannelInfo {
                name: if c.label.is_empty() { "channel".into() } else { c.label },
                color: if c.color.is_empty() { "FFFFFF".into() } else { c.color },
            })
            .collect();
        let store = Arc::new(FilesystemStore::new(&root).map_err(|e| bad(&root, e))?);
        let array = Array::open(store.clone(), &format!("/{first}/{dataset}")).map_err(|e| bad(&root, e))?;
        let shape = array.shape().to_vec();
        let n = shape.len();
        if !(n == 3 || n == 4) {
            return Err(bad(
                &root,
                format!("image array has {n} dimensions; expected (c, y, x) or (t, c, y, x)"),
            ));
        }
        let timepoints = if n == 4 { shape[0] as u32 } else { 1 };
        items.sort_by(|a, b| a.acquired_ns.cmp(&b.acquired_ns).then_with(|| a.key.cmp(&b.key)));
        let plan = AcquisitionPlan {
            plate: plate_name,
            format,
            channels,
            width: shape[n - 1] as usize,
            height: shape[n - 2] as usize,
            pixel_size_um: scale,
            wells: Vec::new(),
            fields_per_well: 0,
            timepoints,
            controls: Vec::new(),
        };
        Ok(Self {
            plan,
            store,
            items,
            speed: cfg.speed,
            skip: Default::default(),
        })
    }
}

impl Source for ZarrReplay {
    fn plan(&self) -> &AcquisitionPlan {
        &self.plan
    }

    fn paced(&self) -> bool {
        self.speed != Speed::Max
    }

    fn expected_fields(&self) -> Option<u64> {
        Some(self.items.iter().filter(|i| !self.skip.contains(&i.key)).count() as u64)
    }

    fn skip(&mut self, done: &[FieldKey]) {
        self.skip.extend(done.iter().cloned());
    }

    fn run(&mut self, out: &Sender<Frame>, stop: &StopToken) -> Result<SourceReport, SourceError> {
        let mut report = SourceReport::default();
        let start = Instant::now();
        let t0 = self.items.iter().map(|i| i.acquired_ns).filter(|&t| t > 0).min();
        for item in &self.items {
            if stop.is_stopped() {
                report.stopped_early = true;
                break;
            }
            if self.skip.contains(&item.key) {
                continue;
            }
            if let (Speed::Factor(f), Some(t0)) = (self.speed, t0) {
                wait_until(
                    start + Duration::from_nanos(item.acquired_ns.saturating_sub(t0) as u64).div_f64(f),
                    stop,
                );
            }
            let node = format!("/{}/0", item.node);
            let r0 = Instant::now();
            let array =
                Array::open(self.store.clone(), &node).map_err(|e| SourceError::Config(format!("{node}: {e}")))?;
            let shape = array.shape().to_vec();
            let n = shape.len();
            if !(n == 3 || n == 4) {
                return Err(SourceError::Config(format!(
                    "{node}: {n} dimensions; expected (c, y, x) or (t, c, y, x)"
                )));
            }
            let acquired_at = UNIX_EPOCH + Duration::from_nanos(item.acquired_ns as u64);
            let mut frames = Vec::new();
            for c in 0..self.plan.channels.len() as u64 {
                let px: Vec<u16> = read_plane(&array, c, u64::from(item.key.timepoint))
                    .map_err(|e| SourceError::Config(format!("{node}: {e}")))?;
                frames.push(Frame {
                    key: item.key.clone(),
                    channel: c as usize,
                    width: shape[n - 1] as usize,
                    height: shape[n - 2] as usize,
                    pixels: Pixels::U16(px.into()),
                    acquired_at: if item.acquired_ns > 0 {
                        acquired_at
                    } else {
                        SystemTime::now()
                    },
                    received_at: Instant::now(),
                    origin: Default::default(),
                });
            }
            report.read_time += r0.elapsed();
            for f in frames {
                report.send(out, f)?;
            }
            report.fields += 1;
        }
        Ok(report)
    }
}
