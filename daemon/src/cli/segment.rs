//! `liveomics segment`: the daemon's segmentation on one TIFF.

use std::process::ExitCode;

use liveomics::segment_cli::{segment_file, SegmentError, SegmentRequest};
use liveomics::telemetry;
use liveomics_kernels::gpu::GpuError;

use super::Usage;

/// Segments the file and prints what it found; a channel, device or size the file or machine
/// does not have is a usage error (exit 2).
pub fn segment(req: &SegmentRequest) -> anyhow::Result<ExitCode> {
    telemetry::init_logging(&telemetry::TelemetryConfig::default());
    let r = segment_file(req).map_err(|e| match e {
        SegmentError::Channel { .. }
        | SegmentError::Gpu {
            source: GpuError::Unavailable(_),
            ..
        }
        | SegmentError::Device(_)
        | SegmentError::Size { .. }
        | SegmentError::NoModel(_) => anyhow::Error::new(Usage(e.into())),
        e => e.into(),
    })?;
    for n in &r.notes {
        telemetry::SegmentNote { note: n }.emit();
    }
    println!(
        "{}x{}: {} nuclei{} ({}) in {:.1} ms -> {}",
        r.width,
        r.height,
        r.nuclei,
        r.cells.map(|c| format!(", {c} cells")).unwrap_or_default(),
        r.method,
        r.elapsed.as_secs_f64() * 1e3,
        req.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
