//! What a model's description must say for the inference stage to run it against this plan:
//! its role, one input of batch, channel, y, x with the channels mapped to acquisition channels,
//! outputs a whole-field role can tile, a crop size for per-cell models, and for diffusion models
//! a panel and a step budget the field can afford. Every failure is keyed under the model's
//! entry in `[[inference.models]]`.

use super::*;

pub(super) fn description_checks(
    i: usize,
    m: &ModelConfig,
    d: &Description,
    ctx: &Context,
    plan: &AcquisitionPlan,
) -> Result<(Role, Vec<usize>, usize), Invalid> {
    let key = ctx.key(&format!("models[{i}]"));
    let role = match m.role {
        Some(role) => role,
        None => d.liveomics.role.ok_or_else(|| {
            Invalid::new(
                &format!("{key}.role"),
                format!(
                    "the description of {:?} has no config.liveomics.role; set one here",
                    d.name
                ),
            )
        })?,
    };
    if role == Role::InstanceSegmentation {
        return Err(Invalid::new(&format!("{key}.role"), INSTANCE_ROLE));
    }
    if role != Role::VirtualStainDiffusion && !m.panel.is_empty() {
        return Err(Invalid::new(
            &format!("{key}.panel"),
            "only virtual-stain-diffusion models take a panel",
        ));
    }
    if role == Role::VirtualStainDiffusion {
        return diffusion_checks(&key, m, d, plan).map(|c| (role, c, 0));
    }
    if role != Role::CellTable && !m.columns.is_empty() {
        return Err(Invalid::new(
            &format!("{key}.columns"),
            "only cell-table models read per-cell columns; image models take channels",
        ));
    }
    if role == Role::CellTable {
        table_checks(&key, m, d, ctx)?;
        return Ok((role, Vec::new(), 0));
    }
    let input = &d.inputs[0];
    if d.inputs.len() != 1 || d.outputs.len() != 1 {
        return Err(Invalid::new(
            &key,
            format!(
                "{:?} has {} inputs and {} outputs; the stage runs one-input, one-output models",
                d.name,
                d.inputs.len(),
                d.outputs.len()
            ),
        ));
    }
    let kinds: Vec<&AxisKind> = input.axes.iter().map(|a| &a.kind).collect();
    let layout_ok = matches!(
        kinds.as_slice(),
        [
            AxisKind::Batch,
            AxisKind::Channel { .. },
            AxisKind::Space,
            AxisKind::Space
        ]
    );
    if !layout_ok {
        return Err(Invalid::new(
            &key,
            format!("{:?}: input axes must be batch, channel, y, x", d.name),
        ));
    }
    let n_in = match &input.axes[1].size {
        AxisSize::Fixed(n) => *n,
        other => {
            return Err(Invalid::new(
                &key,
                format!("{:?}: the channel axis must have a fixed size, not {other:?}", d.name),
            ))
        }
    };
    let names: Vec<String> = if !m.channels.is_empty() {
        m.channels.clone()
    } else if !d.liveomics.channels.is_empty() {
        d.liveomics.channels.clone()
    } else if let AxisKind::Channel { names } = &input.axes[1].kind {
        names.clone()
    } else {
        Vec::new()
    };
    if names.len() != n_in {
        return Err(Invalid::new(
            &format!("{key}.channels"),
            format!(
                "{:?} takes {n_in} channels, {} are mapped ({})",
                d.name,
                names.len(),
                names.join(", ")
            ),
        ));
    }
    let channels = plan_channels(&key, &names, plan)?;
    if role == Role::WellOmics {
        for (axis, side, what) in [(2, plan.height, "height"), (3, plan.width, "width")] {
            if let AxisSize::Fixed(t) = input.axes[axis].size {
                if side < t {
                    return Err(Invalid::new(
                        &key,
                        format!(
                            "{:?}: the field {what} ({side} px) is smaller than its {t} px tile",
                            d.name
                        ),
                    ));
                }
            }
        }
    }
    // A whole-field role writes images: its output must be (batch, channel, y, x) too, or every
    // field would fail at tiling, long after startup.
    if matches!(role, Role::Segmentation | Role::VirtualStain) {
        let out_kinds: Vec<&AxisKind> = d.outputs[0].axes.iter().map(|a| &a.kind).collect();
        if !matches!(
            out_kinds.as_slice(),
            [
                AxisKind::Batch,
                AxisKind::Channel { .. },
                AxisKind::Space,
                AxisKind::Space
            ]
        ) {
            return Err(Invalid::new(
                &format!("{key}.role"),
                format!(
                    "{:?} is used as {}, a whole-field role, but its output axes are not batch, channel, y, x",
                    d.name,
                    role.as_str()
                ),
            ));
        }
    }
    let mut crop = 0;
    if role == Role::CellOmics {
        if !ctx.runs_before(StageName::Measure, StageName::Inference) {
            return Err(Invalid::new(
                &format!("{key}.role"),
                "a cell-omics model needs the \"measure\" stage before \"inference\"",
            ));
        }
        crop = match (&input.axes[2].size, d.liveomics.crop_size) {
            (AxisSize::Fixed(n), Some(c)) if *n != c => {
                return Err(Invalid::new(
                    &key,
                    format!(
                        "{:?}: config.liveomics.crop_size {c} but the input is {n} pixels",
                        d.name
                    ),
                ))
            }
            (AxisSize::Fixed(n), _) => *n,
            (s, Some(c)) if s.accepts(c) => c,
            (s, Some(c)) => {
                return Err(Invalid::new(
                    &key,
                    format!("{:?}: crop size {c} is not accepted by the input ({s:?})", d.name),
                ))
            }
            (s, None) => {
                return Err(Invalid::new(
                    &key,
                    format!(
                        "{:?}: input size {s:?} is not fixed and no config.liveomics.crop_size is given",
                        d.name
                    ),
                ))
            }
        };
    }
    Ok((role, channels, crop))
}

/// A cell-table model: one input of (batch, channel) and one output of the same layout, after
/// the measure stage (its rows are the measured cells). Which columns it reads is the graph's
/// business ([`super::graph`]), which sees every model.
fn table_checks(key: &str, m: &ModelConfig, d: &Description, ctx: &Context) -> Result<(), Invalid> {
    if !ctx.runs_before(StageName::Measure, StageName::Inference) {
        return Err(Invalid::new(
            &format!("{key}.role"),
            "a cell-table model needs the \"measure\" stage before \"inference\"",
        ));
    }
    if !m.channels.is_empty() {
        return Err(Invalid::new(
            &format!("{key}.channels"),
            "a cell-table model reads per-cell columns, not channels: use `columns`",
        ));
    }
    let vector = |axes: &[liveomics_models::description::Axis]| {
        matches!(
            axes.iter().map(|a| &a.kind).collect::<Vec<_>>().as_slice(),
            [AxisKind::Batch, AxisKind::Channel { .. } | AxisKind::Index]
        )
    };
    if d.inputs.len() != 1 || d.outputs.len() != 1 || !vector(&d.inputs[0].axes) || !vector(&d.outputs[0].axes) {
        return Err(Invalid::new(
            &format!("{key}.role"),
            format!(
                "{:?} is used as cell-table: it needs one input and one output of (batch, channel)",
                d.name
            ),
        ));
    }
    if !matches!(d.inputs[0].axes[1].size, AxisSize::Fixed(_)) {
        return Err(Invalid::new(
            &format!("{key}.path"),
            format!("{:?}: the input's column axis must have a fixed length", d.name),
        ));
    }
    Ok(())
}

fn plan_channels(key: &str, names: &[String], plan: &AcquisitionPlan) -> Result<Vec<usize>, Invalid> {
    names
        .iter()
        .map(|n| {
            channel_index(plan, n).ok_or_else(|| {
                let known: Vec<&str> = plan.channels.iter().map(|c| c.name.as_str()).collect();
                Invalid::new(
                    &format!("{key}.channels"),
                    format!("no acquisition channel {n:?}; channels: {}", known.join(", ")),
                )
            })
        })
        .collect()
}

/// Panel, cell line and step budget of a diffusion model, against its description.
fn diffusion_checks(
    key: &str,
    m: &ModelConfig,
    d: &Description,
    plan: &AcquisitionPlan,
) -> Result<Vec<usize>, Invalid> {
    let lv = &d.liveomics;
    let names = if m.channels.is_empty() {
        &lv.channels
    } else {
        &m.channels
    };
    if names.is_empty() {
        return Err(Invalid::new(
            &format!("{key}.channels"),
            format!(
                "{:?} names no landmark channels (config.liveomics.channels); map them here",
                d.name
            ),
        ));
    }
    let channels = plan_channels(key, names, plan)?;
    if m.panel.is_empty() {
        return Err(Invalid::new(
            &format!("{key}.panel"),
            format!("choose the proteins to sample, from: {}", lv.proteins.join(", ")),
        ));
    }
    let unknown: Vec<&str> = m
        .panel
        .iter()
        .filter(|p| !lv.proteins.iter().any(|q| q.eq_ignore_ascii_case(p)) || p.eq_ignore_ascii_case("none"))
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        return Err(Invalid::new(
            &format!("{key}.panel"),
            format!(
                "{} not in the vocabulary of {:?} ({})",
                unknown.join(", "),
                d.name,
                lv.proteins.join(", ")
            ),
        ));
    }
    if !m.cell_line.is_empty() && !lv.cell_lines.iter().any(|c| c.eq_ignore_ascii_case(&m.cell_line)) {
        return Err(Invalid::new(
            &format!("{key}.cell_line"),
            format!(
                "{:?} is not a cell line of {:?} ({})",
                m.cell_line,
                d.name,
                lv.cell_lines.join(", ")
            ),
        ));
    }
    let Some(sampler) = lv.sampler else {
        return Err(Invalid::new(
            key,
            format!("{:?} has no config.liveomics.sampler", d.name),
        ));
    };
    let steps = m.steps.unwrap_or(sampler.steps);
    if steps == 0 {
        return Err(Invalid::new(&format!("{key}.steps"), "must be > 0"));
    }
    let cost = steps.saturating_mul(m.panel.len());
    if cost > m.max_protein_steps_per_field {
        return Err(Invalid::new(
            &format!("{key}.panel"),
            format!(
                "{} proteins x {steps} steps = {cost} denoiser runs per field, above \
                 max_protein_steps_per_field = {}: shrink the panel or the steps",
                m.panel.len(),
                m.max_protein_steps_per_field
            ),
        ));
    }
    Ok(channels)
}
