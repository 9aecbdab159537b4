//! What a run creates once and hands to every component that needs it: the compute back end,
//! the loaded models (ONNX sessions, batchers, well-omics pools) and the zenoh session. Passed
//! explicitly: validation and the run of one process share one `Resources` (so models load
//! once), and two runs in one process (tests) share nothing.

use std::any::Any;
use std::sync::{Arc, Mutex, OnceLock};

use liveomics_adapters::Invalid;
use liveomics_kernels::gpu::{Compute, DeviceRequest};

use crate::cluster::Cluster;
use crate::live::Live;
use crate::schedule::Scheduler;
use crate::zenoh_session::SharedSession;

/// A back end opened for a device request, with the reason `auto` fell back to the CPU.
type OpenedCompute = (DeviceRequest, Compute, Option<String>);

/// Something a component loaded once for the run, under the key of the settings it was loaded
/// with; any type, so that a component's loaded state stays the component's own type.
type Loaded = (String, Arc<dyn Any + Send + Sync>);

/// The plate store once the zarr sink has opened it: where a stage reads what the plate already
/// holds (a resumed plate's well pools, or those other members of a cluster stored).
#[derive(Clone, Default)]
pub struct PlateStore(Arc<OnceLock<zarrs::storage::ReadableWritableListableStorage>>);

impl std::fmt::Debug for PlateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlateStore")
            .field("open", &self.0.get().is_some())
            .finish()
    }
}

impl PlateStore {
    pub fn set(&self, store: zarrs::storage::ReadableWritableListableStorage) {
        let _ = self.0.set(store);
    }

    /// The attributes of `node` (`B/2`), if the store is open and the node is there.
    pub fn attributes(&self, node: &str) -> Option<serde_json::Value> {
        let key = zarrs::storage::StoreKey::new(format!("{}/zarr.json", node.trim_matches('/'))).ok()?;
        let bytes = self.0.get()?.get(&key).ok()??;
        let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        v.get("attributes").cloned()
    }
}

/// The shared resources of a run; clones share the same resources.
#[derive(Debug, Clone, Default)]
pub struct Resources {
    compute: Arc<Mutex<Vec<OpenedCompute>>>,
    loaded: Arc<Mutex<Vec<Loaded>>>,
    pub zenoh: SharedSession,
    /// The run's deadline scheduler: learnt costs and the backlog of owed work, shared by the
    /// inference stages, the zarr sink, the tracker and the backfill threads.
    pub scheduler: Arc<Scheduler>,
    /// What the plate page shows, updated by the pipeline and the follow-up sink.
    pub live: Arc<Live>,
    /// This daemon's membership of its plate's cluster (`[cluster]`), joined by the pipeline.
    pub cluster: Cluster,
    /// The plate store, set by the zarr sink when it opens.
    pub plate: PlateStore,
}

impl Resources {
    /// The back end for `compute.device`, opened on first use and shared by every worker's stage
    /// (one CUDA context and one compile of the kernels, whatever the number of workers), with
    /// the reason `auto` fell back to the CPU. The pipeline reports it once logging is up
    /// ([`crate::telemetry::ComputeSelected`]).
    pub fn compute(&self, req: DeviceRequest) -> Result<(Compute, Option<String>), Invalid> {
        let mut open = self.compute.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, c, why)) = open.iter().find(|(r, _, _)| *r == req) {
            return Ok((c.clone(), why.clone()));
        }
        let (compute, fallback) = Compute::select(req).map_err(|e| Invalid::new("compute.device", e.to_string()))?;
        open.push((req, compute.clone(), fallback.clone()));
        Ok((compute, fallback))
    }

    /// The `T` loaded for `key` (the settings it depends on), loaded by `load` on first use: every
    /// worker's stage, and the validation before the run, share one model session. The lock is
    /// held while loading, so two workers never load the same model twice.
    pub fn loaded<T, E>(&self, key: &str, load: impl FnOnce() -> Result<T, E>) -> Result<Arc<T>, E>
    where
        T: Any + Send + Sync,
    {
        let mut all = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        let found = all
            .iter()
            .filter(|(k, _)| k == key)
            .find_map(|(_, v)| Arc::clone(v).downcast::<T>().ok());
        if let Some(v) = found {
            return Ok(v);
        }
        let v = Arc::new(load()?);
        all.push((key.to_string(), v.clone()));
        Ok(v)
    }
}
