//! Further ONNX networks of a multi-part model (a diffusion model's encoder and decoder, a
//! well-omics head), declared in `config.liveomics.components` with their own sha256, test
//! tensors and per-channel input normalisation. They share the runtime and provider choice of
//! the main weights.

use std::sync::Mutex;

use ort::session::Session;

use crate::description::{verify_sha256, ComponentRef, Description};
use crate::error::ModelError;
use crate::model::run_session;
use crate::npy;
use crate::runtime::{self, Provider, RuntimeOptions};
use crate::tensor::Tensor;

#[derive(Debug)]
pub struct Component {
    /// `{model}/{component}`, as errors and logs name it.
    pub name: String,
    pub spec: ComponentRef,
    pub provider: Provider,
    session: Mutex<Session>,
    input_names: Vec<String>,
    output_names: Vec<String>,
    root: std::path::PathBuf,
}

impl Component {
    /// Loads component `which` of `descr`; an absent component is a description error.
    pub fn load(descr: &Description, which: &str, opts: &RuntimeOptions) -> Result<Self, ModelError> {
        let name = format!("{}/{which}", descr.name);
        let spec = descr
            .liveomics
            .components
            .get(which)
            .cloned()
            .ok_or_else(|| ModelError::Description {
                model: descr.name.clone(),
                key: format!("config.liveomics.components.{which}"),
                message: "missing; this role needs it".into(),
            })?;
        let path = descr.root.join(&spec.source);
        if let Some(sum) = &spec.sha256 {
            verify_sha256(&name, &path, sum)?;
        }
        let built = runtime::runtime(opts.ort_library.as_deref())?.session(&name, &path, opts)?;
        let input_names = built.session.inputs().iter().map(|o| o.name().to_string()).collect();
        let output_names = built.session.outputs().iter().map(|o| o.name().to_string()).collect();
        Ok(Self {
            name,
            spec,
            provider: built.provider,
            session: Mutex::new(built.session),
            input_names,
            output_names,
            root: descr.root.clone(),
        })
    }

    /// Bare `session.run`.
    pub fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, ModelError> {
        let views: Vec<(&[usize], &[f32])> = inputs.iter().map(|t| (t.shape.as_slice(), t.data.as_slice())).collect();
        run_session(&self.session, &self.name, &self.input_names, &self.output_names, &views)
    }

    /// Normalises the channels of `input` (axis 1), runs, and scales output 0 by `gain`.
    pub fn run(&self, mut input: Tensor) -> Result<Tensor, ModelError> {
        let s = &self.spec;
        if !s.mean.is_empty() {
            let c = input.shape.get(1).copied().unwrap_or(0);
            if c != s.mean.len() {
                return Err(ModelError::Shape {
                    model: self.name.clone(),
                    message: format!("input has {c} channels, the normalisation {}", s.mean.len()),
                });
            }
            let plane: usize = input.shape[2..].iter().product();
            for (i, chunk) in input.data.chunks_mut(plane.max(1)).enumerate() {
                let (m, sd) = (s.mean[i % c], s.std[i % c]);
                chunk.iter_mut().for_each(|v| *v = (*v - m) / sd);
            }
        }
        let mut out = self.infer(&[&input])?.swap_remove(0);
        if let Some(g) = s.gain {
            out.data.iter_mut().for_each(|v| *v *= g);
        }
        Ok(out)
    }

    /// Runs the component's test input (through [`Component::run`]) and returns the largest
    /// absolute difference from its test output; `None` without test tensors.
    pub fn check(&self) -> Result<Option<f32>, ModelError> {
        let (Some(i), Some(o)) = (&self.spec.test_input, &self.spec.test_output) else {
            return Ok(None);
        };
        let input = npy::read(&self.root.join(i))?;
        let want = npy::read(&self.root.join(o))?;
        let got = self.run(input)?;
        got.max_abs_diff(&want).map(Some).ok_or_else(|| ModelError::Shape {
            model: self.name.clone(),
            message: format!("output shape {:?}, test tensor {:?}", got.shape, want.shape),
        })
    }
}
