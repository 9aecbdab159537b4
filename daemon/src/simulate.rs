//! `liveomics simulate --out DIR`: the simulated plate as files, for tests and other tools.
//!
//! Layout (documented in `docs/SIMULATOR.md`):
//! `images/{well}_f{field}_t{t}_{channel}.tif` (uint16 camera images),
//! `truth/{well}_f{field}_t{t}_{nuclei|cells}.tif` (uint32 labels),
//! `truth/{well}_f{field}_t{t}_{protein}_clean.tif` (float32 noise-free protein images),
//! `truth/cells.csv` (one row per cell: latent state, gene expression, the abundance of each
//! translated protein (`P001`…, never imaged) and, per protein channel, its
//! relocalized share and compartment fractions) and `manifest.json`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use liveomics_adapters::folder::layout::{Layout, LayoutKind, Parsed};
use liveomics_adapters::simulator::{Simulator, SimulatorConfig, COMPARTMENTS, LATENT};
use liveomics_adapters::source::{Source, SourceError};
use liveomics_adapters::tiff_io::{write_plane, Plane, TiffError};
use serde_json::json;

/// Problems writing the simulated plate; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Tiff(#[from] TiffError),
    #[error("cannot write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SimulateError + '_ {
    move |source| SimulateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes every field of the configured plate; returns the number of fields written. With a
/// `layout`, image files are named as that instrument names them; with `files_per_s > 0` they
/// appear one by one at that rate (to exercise a folder watcher), each written to a hidden
/// temporary name and renamed, as instruments do.
pub fn write_plate(
    cfg: &SimulatorConfig,
    out: &Path,
    layout: Option<LayoutKind>,
    files_per_s: f64,
) -> Result<u64, SimulateError> {
    let sim = Simulator::new(cfg.clone())?;
    let plan = sim.plan().clone();
    let images = out.join("images");
    let truth = out.join("truth");
    std::fs::create_dir_all(&images).map_err(io(&images))?;
    std::fs::create_dir_all(&truth).map_err(io(&truth))?;
    let genes = sim.genes();
    let mut csv =
        String::from("plate,well,field,timepoint,label,centroid_x,centroid_y,nucleus_area_px,cell_area_px,mitotic");
    for d in 0..LATENT {
        let _ = write!(csv, ",z{d}");
    }
    for g in &genes.names {
        let _ = write!(csv, ",{g}");
    }
    for t in &genes.translation {
        let _ = write!(csv, ",{}", t.name);
    }
    for p in &cfg.proteins {
        let _ = write!(csv, ",reloc_{}", p.name);
        for c in COMPARTMENTS {
            let _ = write!(csv, ",loc_{}_{c}", p.name);
        }
    }
    csv.push('\n');
    let (w, h) = (plan.width, plan.height);
    let mut fields = 0u64;
    let mut files = Vec::new();
    for t in 0..plan.timepoints {
        for &well in &plan.wells {
            for f in 0..plan.fields_per_well {
                let sf = sim.render(well, f, t);
                let stem = format!("{}_f{f}_t{t}", well.name());
                for (c, px) in sf.channels.into_iter().enumerate() {
                    let parsed = Parsed {
                        plate: Some(plan.plate.to_string()),
                        well,
                        field: f,
                        channel: c,
                        timepoint: t,
                        plane: 0,
                    };
                    let name = layout
                        .and_then(|k| Layout::file_name(k, plan.plate.as_str(), &parsed))
                        .unwrap_or_else(|| format!("{stem}_{}.tif", plan.channels[c].name));
                    if files_per_s > 0.0 {
                        std::thread::sleep(std::time::Duration::from_secs_f64(1.0 / files_per_s));
                        let tmp = images.join(format!(".{name}.partial"));
                        write_plane(&tmp, w, h, &Plane::U16(px))?;
                        let dst = images.join(&name);
                        std::fs::rename(&tmp, &dst).map_err(io(&dst))?;
                    } else {
                        write_plane(&images.join(&name), w, h, &Plane::U16(px))?;
                    }
                    files.push(json!({"path": format!("images/{name}"), "well": well.name(), "field": f, "timepoint": t, "channel": plan.channels[c].name}));
                }
                write_plane(
                    &truth.join(format!("{stem}_nuclei.tif")),
                    w,
                    h,
                    &Plane::U32(sf.nuclei_labels),
                )?;
                write_plane(
                    &truth.join(format!("{stem}_cells.tif")),
                    w,
                    h,
                    &Plane::U32(sf.cell_labels),
                )?;
                for (p, img) in sf.protein_clean.into_iter().enumerate() {
                    let name = &cfg.proteins[p].name;
                    write_plane(&truth.join(format!("{stem}_{name}_clean.tif")), w, h, &Plane::F32(img))?;
                }
                for c in &sf.cells {
                    let _ = write!(
                        csv,
                        "{},{},{f},{t},{},{:.3},{:.3},{},{},{}",
                        plan.plate,
                        well.name(),
                        c.label,
                        c.centroid_x,
                        c.centroid_y,
                        c.nucleus_area_px,
                        c.cell_area_px,
                        u8::from(c.mitotic)
                    );
                    for z in c.latent {
                        let _ = write!(csv, ",{z:.6}");
                    }
                    for e in c.expression.iter().chain(&c.translated) {
                        let _ = write!(csv, ",{e:.6}");
                    }
                    for (m, fractions) in c.relocalized.iter().zip(&c.localization) {
                        let _ = write!(csv, ",{m:.6}");
                        for v in fractions {
                            let _ = write!(csv, ",{v:.6}");
                        }
                    }
                    csv.push('\n');
                }
                fields += 1;
            }
        }
    }
    let csv_path = truth.join("cells.csv");
    std::fs::write(&csv_path, csv).map_err(io(&csv_path))?;
    let manifest = json!({
        "plate": plan.plate.to_string(),
        "plate_format": plan.format.wells,
        "wells": plan.wells.iter().map(|w| w.name()).collect::<Vec<_>>(),
        "fields_per_well": plan.fields_per_well,
        "timepoints": plan.timepoints,
        "width_px": w,
        "height_px": h,
        "pixel_size_um": plan.pixel_size_um,
        "channels": plan.channels.iter().map(|c| json!({"name": c.name, "color": c.color})).collect::<Vec<_>>(),
        "genes": genes.names.iter().zip(&genes.visible).map(|(n, v)| json!({"name": n, "visible": v})).collect::<Vec<_>>(),
        "translated_proteins": genes.translation.iter().map(|t| json!({
            "name": t.name,
            "genes": t.genes.iter().map(|&g| &genes.names[g]).collect::<Vec<_>>(),
            "weights": t.weights, "gain": t.gain, "offset": t.offset, "noise_sd": t.noise_sd,
            "visible": t.visible,
        })).collect::<Vec<_>>(),
        "config": cfg,
        "files": files,
    });
    let mpath = out.join("manifest.json");
    let mut fh = std::fs::File::create(&mpath).map_err(io(&mpath))?;
    fh.write_all(serde_json::to_string_pretty(&manifest).unwrap_or_default().as_bytes())
        .map_err(io(&mpath))?;
    Ok(fields)
}
