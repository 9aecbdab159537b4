//! The one table where sources, stages and sinks are registered by name. Adding a kind means one
//! entry here plus its config section; validation, `liveomics validate` and the topology all read
//! this table.

use std::sync::Arc;

use liveomics_adapters::folder::FolderSource;
use liveomics_adapters::model::AcquisitionPlan;
use liveomics_adapters::simulator::Simulator;
use liveomics_adapters::source::{Source, SourceError};
use liveomics_adapters::Invalid;

use crate::config::Config;
use crate::inference::InferenceStage;
use crate::replay::ZarrReplay;
use crate::resources::Resources;
use crate::sink::{zarr::ZarrSink, zenoh::ZenohSink, Sink, SinkError};
use crate::stage::{MeasureStage, SegmentStage, Stage};
use crate::zenoh_source::ZenohSource;

pub type BuildStage = fn(&Config, &AcquisitionPlan, &Resources) -> Result<Box<dyn Stage>, Vec<Invalid>>;
pub type BuildSource = fn(&Config, &Resources) -> Result<Box<dyn Source>, SourceError>;
pub type OpenSink = fn(&Config, Arc<AcquisitionPlan>, &SinkOptions, &Resources) -> Result<Box<dyn Sink>, SinkError>;

/// How to build a source of one kind.
#[derive(Debug)]
pub struct SourceKind {
    pub name: &'static str,
    /// Built from the config and the run's resources (the zenoh session opens only when a
    /// source uses it).
    pub build: BuildSource,
}

/// How to build a stage; `Err` names every config key that makes it impossible.
#[derive(Debug)]
pub struct StageKind {
    pub name: &'static str,
    pub build: BuildStage,
    /// Stages that must run before this one.
    pub after: &'static [&'static str],
}

/// How to open a sink, and whether the config enables it.
#[derive(Debug)]
pub struct SinkKind {
    pub name: &'static str,
    pub enabled: fn(&Config) -> bool,
    pub open: OpenSink,
}

/// Run-time options of sinks that are not configuration (command-line flags).
#[derive(Debug, Clone, Default)]
pub struct SinkOptions {
    pub overwrite: bool,
}

pub const SOURCES: &[SourceKind] = &[
    SourceKind {
        name: "simulator",
        build: |cfg, _| Ok(Box::new(Simulator::new(cfg.source.simulator.clone())?)),
    },
    SourceKind {
        name: "folder",
        build: |cfg, _| Ok(Box::new(FolderSource::new(cfg.source.folder.clone())?)),
    },
    SourceKind {
        name: "zenoh",
        build: |cfg, res| {
            Ok(Box::new(ZenohSource::new(
                &cfg.source.zenoh,
                &cfg.instrument,
                res.zenoh.clone(),
                cfg.zenoh.clone(),
            )?))
        },
    },
    SourceKind {
        name: "replay",
        build: |cfg, _| Ok(Box::new(ZarrReplay::new(&cfg.source.replay)?)),
    },
];

pub const STAGES: &[StageKind] = &[
    StageKind {
        name: "segment",
        build: |cfg, plan, res| Ok(Box::new(SegmentStage::new(cfg, plan, res).map_err(|e| vec![e])?)),
        after: &[],
    },
    StageKind {
        name: "measure",
        build: |cfg, _, res| Ok(Box::new(MeasureStage::new(cfg, res).map_err(|e| vec![e])?)),
        after: &["segment"],
    },
    StageKind {
        name: "inference",
        build: |cfg, plan, res| Ok(Box::new(InferenceStage::new(cfg, plan, res)?)),
        after: &[],
    },
];

pub const SINKS: &[SinkKind] = &[
    SinkKind {
        name: "zarr",
        enabled: |cfg| cfg.sinks.zarr.enabled,
        open: |cfg, plan, opts, _| {
            let virtual_channels = crate::inference::virtual_channels(cfg);
            Ok(Box::new(ZarrSink::open(
                &cfg.sinks.zarr,
                plan,
                virtual_channels,
                opts.overwrite,
            )?))
        },
    },
    SinkKind {
        name: "zenoh",
        enabled: |cfg| cfg.sinks.zenoh.enabled,
        open: |cfg, plan, _, res| {
            Ok(Box::new(ZenohSink::open(
                &res.zenoh,
                &cfg.zenoh,
                &cfg.instrument,
                plan.plate.as_str(),
            )?))
        },
    },
    SinkKind {
        name: "followup",
        enabled: |cfg| cfg.closed_loop.enabled,
        open: |cfg, plan, _, res| {
            Ok(Box::new(crate::sink::followup::FollowupSink::open(
                cfg, &plan, &res.zenoh,
            )?))
        },
    },
];

pub fn source_kind(name: &str) -> Option<&'static SourceKind> {
    SOURCES.iter().find(|s| s.name == name)
}

pub fn stage_kind(name: &str) -> Option<&'static StageKind> {
    STAGES.iter().find(|s| s.name == name)
}

fn names<T>(table: &[T], name: impl Fn(&T) -> &'static str) -> String {
    table.iter().map(name).collect::<Vec<_>>().join(", ")
}

/// Every problem of meaning in a config: values, then the kinds and stages against this table,
/// then the stages against the plan the source will produce (channel names exist, etc.).
/// `res` is the run's: stages built here load their models and back end into it, so a run that
/// follows with the same `res` does not load them again. No zenoh session is opened.
pub fn validate(cfg: &Config, res: &Resources) -> Vec<Invalid> {
    let mut out = cfg.validate_values();
    let source = match source_kind(&cfg.source.kind) {
        None => {
            out.push(Invalid::new(
                "source.kind",
                format!(
                    "unknown source {:?}; known: {}",
                    cfg.source.kind,
                    names(SOURCES, |s| s.name)
                ),
            ));
            None
        }
        // A source that cannot be built was already reported by the value checks of its section;
        // one that can lets the stages be checked against its plan even if other keys are wrong.
        // The zenoh session is never opened here: sources open it when they start running.
        Some(k) => (k.build)(cfg, res).ok(),
    };
    if let Some(src) = &source {
        // Channel names become column names (`mean_{name}`) and are matched case-insensitively.
        let mut columns = std::collections::BTreeMap::new();
        for c in &src.plan().channels {
            let col = crate::sink::cells_arrow::mean_column(&c.name);
            if let Some(prev) = columns.insert(col.clone(), c.name.clone()) {
                out.push(Invalid::new(
                    &format!("source.{}", cfg.source.kind),
                    format!(
                        "channels {prev:?} and {:?} are the same name once normalised ({col})",
                        c.name
                    ),
                ));
            }
        }
    }
    if let Some(src) = &source {
        out.extend(crate::sink::followup::validate(cfg, src.plan()));
    }
    let mut seen: Vec<&str> = Vec::new();
    for (i, name) in cfg.pipeline.stages.iter().enumerate() {
        let key = format!("pipeline.stages[{i}]");
        match stage_kind(name) {
            None => out.push(Invalid::new(
                &key,
                format!("unknown stage {name:?}; known: {}", names(STAGES, |s| s.name)),
            )),
            Some(k) => {
                for dep in k.after {
                    if !seen.contains(dep) {
                        out.push(Invalid::new(&key, format!("stage {name:?} needs {dep:?} before it")));
                    }
                }
                if seen.contains(&k.name) {
                    out.push(Invalid::new(&key, format!("stage {name:?} is listed twice")));
                }
                seen.push(k.name);
                if let Some(src) = &source {
                    if let Err(e) = (k.build)(cfg, src.plan(), res) {
                        out.extend(e);
                    }
                }
            }
        }
    }
    out
}
