//! What a run creates once and hands to every component that needs it: the compute back end,
//! the loaded models (ONNX sessions, batchers and the well-omics pools that the summary reads),
//! and the zenoh session. Passed explicitly: validation and the run of one process share one
//! `Resources` (so models load once), and two runs in one process (tests) share nothing.

use std::sync::{Arc, Mutex};

use liveomics_adapters::Invalid;
use liveomics_kernels::gpu::{Compute, DeviceRequest};

use crate::inference::{ModelCache, WellReadout};
use crate::zenoh_session::SharedSession;

/// A back end opened for a device request, with the reason `auto` fell back to the CPU.
type OpenedCompute = (DeviceRequest, Compute, Option<String>);

/// The shared resources of a run; clones share the same resources.
#[derive(Debug, Clone, Default)]
pub struct Resources {
    compute: Arc<Mutex<Vec<OpenedCompute>>>,
    pub(crate) models: ModelCache,
    pub zenoh: SharedSession,
}

impl Resources {
    /// The back end for `compute.device`, opened on first use and shared by every worker's stage
    /// (one CUDA context and one compile of the kernels, whatever the number of workers), with
    /// the reason `auto` fell back to the CPU. The pipeline reports it once logging is up
    /// ([`crate::telemetry::ComputeSelected`]).
    pub fn compute(&self, device: &str) -> Result<(Compute, Option<String>), Invalid> {
        let req: DeviceRequest = device
            .parse()
            .map_err(|e: liveomics_kernels::gpu::BadDeviceRequest| Invalid::new("compute.device", e.to_string()))?;
        let mut open = self.compute.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, c, why)) = open.iter().find(|(r, _, _)| *r == req) {
            return Ok((c.clone(), why.clone()));
        }
        let (compute, fallback) = Compute::select(req).map_err(|e| Invalid::new("compute.device", e.to_string()))?;
        open.push((req, compute.clone(), fallback.clone()));
        Ok((compute, fallback))
    }

    /// The latest readout of every well of every well-omics model this run loaded.
    pub fn well_readouts(&self) -> Vec<WellReadout> {
        self.models.well_readouts()
    }
}
