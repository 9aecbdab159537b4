//! Where the components meet the config: the one place that maps a source kind, a stage name
//! and a sink to its section (sinks are listed by `sink::SinksConfig::all`), builds the
//! [`Context`] each is given, and checks the meaning of a whole config by asking every section
//! to check itself and then building the stages against the plan the source will produce.

use std::sync::Arc;

use liveomics_adapters::folder::{FolderConfig, FolderSource};
use liveomics_adapters::model::AcquisitionPlan;
use liveomics_adapters::simulator::{Simulator, SimulatorConfig};
use liveomics_adapters::source::{Source, SourceError};
use liveomics_adapters::Invalid;

use crate::component::{Context, Sink, SinkConfig, SinkError, SourceConfig, SourceName, Stage, StageConfig, StageName};
use crate::config::{Config, ConfigErrors};
use crate::field::mean_column;
use crate::resources::Resources;
use crate::stage::MeasureConfig;

impl SourceConfig for SimulatorConfig {
    fn validate(&self, ctx: &Context, problems: &mut Vec<Invalid>) {
        problems.extend(self.validate().into_iter().map(|e| e.under(ctx.section)));
    }

    fn build(&self, _ctx: &Context) -> Result<Box<dyn Source>, SourceError> {
        Ok(Box::new(Simulator::new(self.clone())?))
    }
}

impl SourceConfig for FolderConfig {
    fn validate(&self, ctx: &Context, problems: &mut Vec<Invalid>) {
        problems.extend(self.validate().into_iter().map(|e| e.under(ctx.section)));
    }

    fn build(&self, _ctx: &Context) -> Result<Box<dyn Source>, SourceError> {
        Ok(Box::new(FolderSource::new(self.clone())?))
    }
}

/// The context of a run's components, at the top level (each component gets it `at` its
/// section). `overwrite` is the command line's `--overwrite`.
pub fn context<'a>(cfg: &'a Config, res: &'a Resources, overwrite: bool) -> Context<'a> {
    Context {
        section: "",
        instrument: &cfg.instrument,
        stages: &cfg.pipeline.stages,
        device: cfg.compute.device,
        inference: &cfg.inference,
        localization: &cfg.localization,
        probability_model: &cfg.segmentation.probability_model,
        zenoh: &cfg.zenoh,
        resources: res,
        overwrite,
        budget_ms: cfg.latency_budget_ms,
        pace_fields_per_s: match cfg.source.kind {
            SourceName::Simulator => Some(cfg.source.simulator.rate_fields_per_s).filter(|r| *r > 0.0),
            _ => None,
        },
    }
}

/// The configured source's section and where it sits.
pub fn source(cfg: &Config) -> (&'static str, &dyn SourceConfig) {
    let s = &cfg.source;
    match s.kind {
        SourceName::Simulator => ("source.simulator", &s.simulator),
        SourceName::Folder => ("source.folder", &s.folder),
        SourceName::Replay => ("source.replay", &s.replay),
        SourceName::Zenoh => ("source.zenoh", &s.zenoh),
    }
}

/// A stage's section and where it sits (the measure stage has none).
pub fn stage(cfg: &Config, name: StageName) -> (&'static str, &dyn StageConfig) {
    match name {
        StageName::Segment => ("segmentation", &cfg.segmentation),
        StageName::Measure => ("", &MeasureConfig),
        StageName::Inference => ("inference", &cfg.inference),
        StageName::Localize => ("localization", &cfg.localization),
    }
}

/// Every sink by name, with its section's path, in the order they open.
pub fn sinks(cfg: &Config) -> Vec<(&'static str, String, &dyn SinkConfig)> {
    let mut out: Vec<_> = cfg
        .sinks
        .all()
        .into_iter()
        .map(|(name, c)| (name, format!("sinks.{name}"), c))
        .collect();
    out.push(("followup", "closed_loop".to_string(), &cfg.closed_loop));
    out
}

/// Builds the configured source.
pub fn build_source(cfg: &Config, res: &Resources) -> Result<Box<dyn Source>, SourceError> {
    let (section, c) = source(cfg);
    c.build(&context(cfg, res, false).at(section))
}

/// A stage that cannot be built, with every key that makes it impossible.
pub type StageProblems = (StageName, Vec<Invalid>);

/// Builds one worker's stages, in order.
pub fn build_stages(
    cfg: &Config,
    plan: &AcquisitionPlan,
    res: &Resources,
) -> Result<Vec<Box<dyn Stage>>, StageProblems> {
    let ctx = context(cfg, res, false);
    cfg.pipeline
        .stages
        .iter()
        .map(|&name| {
            let (section, c) = stage(cfg, name);
            c.build(&ctx.at(section), plan).map_err(|e| (name, e))
        })
        .collect()
}

/// Opens every enabled sink, by name.
pub fn open_sinks(
    cfg: &Config,
    plan: &Arc<AcquisitionPlan>,
    res: &Resources,
    overwrite: bool,
) -> Result<Vec<Box<dyn Sink>>, (&'static str, SinkError)> {
    let ctx = context(cfg, res, overwrite);
    let all = sinks(cfg);
    all.iter()
        .filter(|(_, _, c)| c.enabled())
        .map(|(name, section, c)| c.build(&ctx.at(section), plan.clone()).map_err(|e| (*name, e)))
        .collect()
}

/// Every problem of meaning in a config: each section's values, then the source's plan, then
/// the sinks and the stages against that plan (channel names exist, models fit, etc.). `res`
/// is the run's: stages built here load their models and back end into it, so a run that
/// follows with the same `res` does not load them again. No zenoh session is opened.
pub fn validate(cfg: &Config, res: &Resources) -> Vec<Invalid> {
    let mut out = cfg.validate_own();
    out.extend(cfg.telemetry.validate().into_iter().map(|e| e.under("telemetry")));
    out.extend(cfg.zenoh.validate());
    let ctx = context(cfg, res, false);
    let (section, src) = source(cfg);
    src.validate(&ctx.at(section), &mut out);
    // Value checks of every stage's section, whether the stage runs or not: a wrong value is
    // wrong before someone adds the stage.
    for name in StageName::ALL {
        let (section, c) = stage(cfg, name);
        c.validate(&ctx.at(section), &mut out);
    }
    let sinks = sinks(cfg);
    for (_, section, c) in &sinks {
        c.validate(&ctx.at(section), &mut out);
    }
    // A source that cannot be built was already reported by the value checks of its section;
    // one that can lets the stages be checked against its plan even if other keys are wrong.
    // The zenoh session is never opened here: sources open it when they start running.
    let Ok(source) = src.build(&ctx.at(section)) else {
        return dedup(out);
    };
    let plan = source.plan();
    // Channel names become column names (`mean_{name}`) and are matched case-insensitively.
    let mut columns = std::collections::BTreeMap::new();
    for c in &plan.channels {
        let col = mean_column(&c.name);
        if let Some(prev) = columns.insert(col.clone(), c.name.clone()) {
            out.push(Invalid::new(
                section,
                format!(
                    "channels {prev:?} and {:?} are the same name once normalised ({col})",
                    c.name
                ),
            ));
        }
    }
    for (_, section, c) in &sinks {
        c.validate_plan(&ctx.at(section), plan, &mut out);
    }
    for &name in &cfg.pipeline.stages {
        let (section, c) = stage(cfg, name);
        if let Err(e) = c.build(&ctx.at(section), plan) {
            out.extend(e);
        }
    }
    dedup(out)
}

/// The same problem found twice (the compute back end by two stages, a runtime library by
/// every model) is reported once.
fn dedup(all: Vec<Invalid>) -> Vec<Invalid> {
    let mut out: Vec<Invalid> = Vec::with_capacity(all.len());
    for e in all {
        if !out.contains(&e) {
            out.push(e);
        }
    }
    out
}

/// Loads a file, or the embedded default when `path` is `None`, with its shape and meaning
/// both checked, in resources of its own (a run passes its own to [`load_for_run`]).
pub fn load(path: Option<&std::path::Path>) -> Result<Config, ConfigErrors> {
    load_for_run(path, &Resources::default())
}

/// [`load`] whose meaning checks build the stages into `res`, the resources the run will use:
/// models load once per process.
pub fn load_for_run(path: Option<&std::path::Path>, res: &Resources) -> Result<Config, ConfigErrors> {
    // Shape and meaning in one report: the meaning of what is left after the shape errors
    // (a value of the wrong type does not hide an out-of-range one elsewhere). A section that
    // lost a value has a default in its place, so its meaning is not judged; and the plan,
    // stages and models feed every cross-check, so a shape error in `source`, `pipeline` or
    // `inference` leaves meaning for the next run.
    let (cfg, mut errors, origin) = Config::read(path);
    let section = |key: &str| key.split(['.', '[']).next().unwrap_or("").to_string();
    let damaged: std::collections::BTreeSet<String> = errors.iter().map(|e| section(&e.key)).collect();
    let cross = ["source", "pipeline", "inference"].iter().any(|s| damaged.contains(*s));
    match cfg.filter(|_| !cross) {
        Some(cfg) => {
            errors.extend(
                validate(&cfg, res)
                    .into_iter()
                    .filter(|e| !damaged.contains(&section(&e.key))),
            );
            if errors.is_empty() {
                Ok(cfg)
            } else {
                Err(ConfigErrors { origin, errors })
            }
        }
        None => Err(ConfigErrors { origin, errors }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let cfg = load(None).unwrap();
        assert_eq!(cfg.source.kind, SourceName::Simulator);
    }

    #[test]
    fn meaning_errors_are_all_reported() {
        let text = r#"
            instrument = "scope/1"
            latency_budget_ms = 0
            [source.simulator]
            [segmentation]
            nuclei_channel = "Hoechst"
            [telemetry]
            log_level = "loud"
            [pipeline]
            max_pending_mb = 0
            [[inference.models]]
            name = "cells"
            path = "models/cell_omics_cnn"
            crop_scale = 0.0
        "#;
        let cfg = Config::from_toml(text, "t.toml").unwrap();
        let errs: Vec<Invalid> = cfg
            .inference
            .validate()
            .into_iter()
            .map(|e| e.under("inference"))
            .collect();
        assert!(
            errs.iter().any(|e| e.key == "inference.models[0].crop_scale"),
            "{errs:?}"
        );
        let errs = validate(&cfg, &Resources::default());
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        for k in [
            "instrument",
            "latency_budget_ms",
            "segmentation.nuclei_channel",
            "telemetry.log_level",
            "pipeline.max_pending_mb",
        ] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
    }

    #[test]
    fn load_reports_shape_and_meaning_together_without_judging_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            r#"
            [segmentation]
            nuclei_threshold = "median"
            [sinks.zarr]
            compression = "ztsd"
            compression_level = 15
            [telemetry]
            log_level = "loud"
        "#,
        )
        .unwrap();
        let err = load(Some(&path)).unwrap_err();
        let keys: Vec<&str> = err.errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "segmentation.nuclei_threshold",
                "sinks.zarr.compression",
                "telemetry.log_level"
            ],
            "{err}"
        );
    }
}
