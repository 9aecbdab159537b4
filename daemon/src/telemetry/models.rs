//! Events of the compute back end and the models: which device and provider run, model runs, batches and failures.

use super::*;

/// The image kernels' back end was chosen (`compute.device`).
#[derive(Debug)]
pub struct ComputeSelected<'a> {
    pub requested: &'a str,
    pub device: &'a str,
    /// Why `auto` fell back to the CPU.
    pub fallback_reason: Option<&'a str>,
}

impl ComputeSelected<'_> {
    pub fn emit(&self) {
        match self.fallback_reason {
            Some(reason) => info!(
                requested = self.requested,
                device = self.device,
                reason,
                "image kernels run on the CPU"
            ),
            None => info!(requested = self.requested, device = self.device, "image kernels ready"),
        }
        gauge!(COMPUTE_INFO, "device" => self.device.to_string()).set(1.0);
    }
}

/// The segment stage's method was resolved (`segmentation.method`): InstanSeg with its model and
/// provider, or the classical path with the reason InstanSeg does not run.
#[derive(Debug)]
pub struct SegmentMethodChosen<'a> {
    pub method: &'a str,
    pub model: &'a str,
    pub provider: &'a str,
    pub reason: Option<&'a str>,
}

impl SegmentMethodChosen<'_> {
    pub fn emit(&self) {
        match self.reason {
            Some(reason) => warn!(
                method = self.method,
                reason, "segmentation falls back to the classical path"
            ),
            None => info!(
                method = self.method,
                model = self.model,
                provider = self.provider,
                "segmentation runs InstanSeg"
            ),
        }
        self.gauge();
    }

    /// The metric alone: the method is chosen once, while the config is checked and before the
    /// metrics recorder exists, so each segment stage sets it again when it is built for the run.
    pub fn gauge(&self) {
        gauge!(SEGMENT_METHOD_INFO, "method" => self.method.to_string(), "model" => self.model.to_string()).set(1.0);
    }
}

/// `segmentation.method = "auto"` timed InstanSeg on this machine against what the run asks
/// (budget, pace) and chose: the figures are logged either way, so a user sees why. No metric of
/// its own: it happens while the config is checked, before the recorder exists; the outcome is
/// `liveomics_segment_method_info`, set when the stage is built.
#[derive(Debug)]
pub struct SegmentAutoMeasured<'a> {
    pub chosen: &'a str,
    pub figures: &'a str,
}

impl SegmentAutoMeasured<'_> {
    pub fn emit(&self) {
        info!(chosen = self.chosen, "segmentation auto: {}", self.figures);
    }
}

/// InstanSeg's network was cut to its nuclei decoder (cells come from elsewhere), or could not be
/// and runs whole.
#[derive(Debug)]
pub struct InstansegNetworkCut<'a> {
    pub model: &'a str,
    /// The nodes dropped, or why the graph was left whole.
    pub outcome: Result<usize, &'a str>,
}

impl InstansegNetworkCut<'_> {
    pub fn emit(&self) {
        match self.outcome {
            Ok(dropped) => info!(
                model = self.model,
                dropped_nodes = dropped,
                "InstanSeg runs its nuclei decoder alone: no cells are asked of the model"
            ),
            Err(reason) => warn!(
                model = self.model,
                reason, "InstanSeg runs its whole network: the cells decoder could not be cut"
            ),
        }
    }
}

/// A model's session was created.
#[derive(Debug)]
pub struct ModelLoaded<'a> {
    pub model: &'a str,
    pub role: &'a str,
    pub provider: &'a str,
    /// Why each provider before `provider` in the configured list could not run the model.
    pub skipped: &'a [String],
    /// The ONNX Runtime library in use (found at run time, so worth a line in the log).
    pub library: &'a str,
}

impl ModelLoaded<'_> {
    pub fn emit(&self) {
        info!(
            model = self.model,
            role = self.role,
            provider = self.provider,
            skipped = ?self.skipped,
            library = self.library,
            "model ready"
        );
        gauge!(MODEL_INFO, "model" => self.model.to_string(), "role" => self.role.to_string(), "provider" => self.provider.to_string()).set(1.0);
    }
}

/// A model ran on one field.
#[derive(Debug)]
pub struct ModelRan<'a> {
    pub model: &'a str,
    pub provider: &'a str,
    pub field: &'a str,
    pub items: usize,
    pub elapsed: Duration,
}

impl ModelRan<'_> {
    pub fn emit(&self) {
        debug!(
            model = self.model,
            provider = self.provider,
            field = self.field,
            items = self.items,
            ms = self.elapsed.as_secs_f64() * 1e3,
            "model ran"
        );
        histogram!(MODEL_SECONDS, "model" => self.model.to_string(), "provider" => self.provider.to_string())
            .record(self.elapsed.as_secs_f64());
    }
}

/// A model failed on a field; the field goes on without its predictions.
#[derive(Debug)]
pub struct ModelFailed<'a> {
    pub model: &'a str,
    pub field: &'a str,
    pub error: &'a (dyn std::error::Error + 'static),
}

impl ModelFailed<'_> {
    pub fn emit(&self) {
        error!(
            model = self.model,
            field = self.field,
            "model failed: {}",
            error_chain(self.error)
        );
        counter!(MODEL_FAILURES, "model" => self.model.to_string()).increment(1);
    }
}

/// A per-cell batch ran.
#[derive(Debug)]
pub struct BatchRan<'a> {
    pub model: &'a str,
    pub samples: usize,
    pub padded_to: usize,
    pub requests: usize,
}

impl BatchRan<'_> {
    pub fn emit(&self) {
        debug!(
            model = self.model,
            samples = self.samples,
            padded_to = self.padded_to,
            fields = self.requests,
            "batch ran"
        );
        histogram!(MODEL_BATCH_SIZE, "model" => self.model.to_string()).record(self.samples as f64);
    }
}

/// Something `liveomics segment` noticed about its input that the user should know.
#[derive(Debug)]
pub struct SegmentNote<'a> {
    pub note: &'a str,
}

impl SegmentNote<'_> {
    pub fn emit(&self) {
        warn!("{}", self.note);
    }
}
