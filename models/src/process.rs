//! The bioimage.io pre- and postprocessing operations, applied to whole tensors on the CPU.
//! Statistics (mean, std, percentiles) are computed over the `axes` the description names,
//! independently for every index of the other axes, as bioimageio.core does.

use rayon::prelude::*;
use serde::Deserialize;

use crate::description::{Axis, RawProc};
use crate::tensor::Tensor;

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(f32),
    Many(Vec<f32>),
}

impl OneOrMany {
    fn values(self) -> Vec<f32> {
        match self {
            OneOrMany::One(v) => vec![v],
            OneOrMany::Many(v) => v,
        }
    }
}

/// One operation with its parameters resolved against the tensor's axes (axis names become
/// positions, so a typo in an axis name fails at load time).
#[derive(Debug, Clone, PartialEq)]
pub enum Proc {
    ZeroMeanUnitVariance {
        reduce: Option<Vec<usize>>,
        eps: f32,
    },
    /// Per-index values along `axis` (or one value for all).
    FixedZeroMeanUnitVariance {
        mean: Vec<f32>,
        std: Vec<f32>,
        axis: Option<usize>,
        eps: f32,
    },
    ScaleRange {
        reduce: Option<Vec<usize>>,
        min_percentile: f32,
        max_percentile: f32,
        eps: f32,
    },
    ScaleLinear {
        gain: Vec<f32>,
        offset: Vec<f32>,
        axis: Option<usize>,
    },
    Clip {
        min: f32,
        max: f32,
    },
    Binarize {
        threshold: Vec<f32>,
        axis: Option<usize>,
    },
    /// Rounding to an integer dtype, saturating; floats pass unchanged.
    EnsureDtype {
        integer_range: Option<(f32, f32)>,
    },
    Sigmoid,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ZmuvArgs {
    axes: Option<Vec<String>>,
    #[serde(default = "default_eps")]
    eps: f32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FixedZmuvArgs {
    mean: OneOrMany,
    std: OneOrMany,
    axis: Option<String>,
    #[serde(default = "default_eps")]
    eps: f32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScaleRangeArgs {
    axes: Option<Vec<String>>,
    #[serde(default)]
    min_percentile: f32,
    #[serde(default = "hundred")]
    max_percentile: f32,
    #[serde(default = "default_eps")]
    eps: f32,
    reference_tensor: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScaleLinearArgs {
    #[serde(default = "one")]
    gain: OneOrMany,
    #[serde(default = "zero")]
    offset: OneOrMany,
    axis: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClipArgs {
    min: Option<f32>,
    max: Option<f32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BinarizeArgs {
    threshold: OneOrMany,
    axis: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DtypeArgs {
    dtype: String,
}

fn default_eps() -> f32 {
    1e-6
}
fn hundred() -> f32 {
    100.0
}
fn one() -> OneOrMany {
    OneOrMany::One(1.0)
}
fn zero() -> OneOrMany {
    OneOrMany::One(0.0)
}

fn axis_position(axes: &[Axis], id: &str) -> Result<usize, String> {
    axes.iter().position(|a| a.id == id).ok_or_else(|| {
        let known: Vec<&str> = axes.iter().map(|a| a.id.as_str()).collect();
        format!("axis {id:?} is not an axis of this tensor ({})", known.join(", "))
    })
}

fn positions(axes: &[Axis], ids: Option<Vec<String>>) -> Result<Option<Vec<usize>>, String> {
    ids.map(|ids| ids.iter().map(|id| axis_position(axes, id)).collect())
        .transpose()
}

impl Proc {
    pub(crate) fn parse(raw: &RawProc, axes: &[Axis], output: bool) -> Result<Self, String> {
        fn args<T: serde::de::DeserializeOwned>(raw: &RawProc) -> Result<T, String> {
            let v = if raw.kwargs.is_null() {
                serde_yaml_ng::Value::Mapping(Default::default())
            } else {
                raw.kwargs.clone()
            };
            serde_yaml_ng::from_value(v).map_err(|e| format!("kwargs of {}: {e}", raw.id))
        }
        let per_axis =
            |values: Vec<f32>, axis: Option<String>, what: &str| -> Result<(Vec<f32>, Option<usize>), String> {
                let axis = axis.map(|a| axis_position(axes, &a)).transpose()?;
                if values.is_empty() {
                    return Err(format!("{what} has no values"));
                }
                if values.len() != 1 && axis.is_none() {
                    return Err(format!("{what} has {} values but no axis", values.len()));
                }
                // One value per index of the axis, which needs an axis of fixed size.
                if let (Some(a), true) = (axis, values.len() != 1) {
                    match axes[a].size {
                        crate::description::AxisSize::Fixed(n) if values.len() != n => {
                            return Err(format!(
                                "{what} has {} values for axis {:?} of size {n}",
                                values.len(),
                                axes[a].id
                            ));
                        }
                        crate::description::AxisSize::Fixed(_) => {}
                        _ => {
                            return Err(format!(
                                "{what} has {} values along axis {:?}, whose size is not fixed",
                                values.len(),
                                axes[a].id
                            ))
                        }
                    }
                }
                Ok((values, axis))
            };
        Ok(match raw.id.as_str() {
            "zero_mean_unit_variance" => {
                let a: ZmuvArgs = args(raw)?;
                Proc::ZeroMeanUnitVariance {
                    reduce: positions(axes, a.axes)?,
                    eps: a.eps,
                }
            }
            "fixed_zero_mean_unit_variance" => {
                let a: FixedZmuvArgs = args(raw)?;
                let (mean, axis) = per_axis(a.mean.values(), a.axis.clone(), "mean")?;
                let (std, _) = per_axis(a.std.values(), a.axis, "std")?;
                if mean.len() != std.len() {
                    return Err("mean and std have different lengths".into());
                }
                Proc::FixedZeroMeanUnitVariance {
                    mean,
                    std,
                    axis,
                    eps: a.eps,
                }
            }
            "scale_range" => {
                let a: ScaleRangeArgs = args(raw)?;
                if let Some(r) = a.reference_tensor {
                    return Err(format!(
                        "scale_range with reference_tensor {r:?} is not supported (statistics of another tensor)"
                    ));
                }
                let ordered = (0.0..100.0).contains(&a.min_percentile)
                    && a.max_percentile > a.min_percentile
                    && a.max_percentile <= 100.0;
                if !ordered {
                    return Err(format!(
                        "percentiles must satisfy 0 <= min < max <= 100, got {} and {}",
                        a.min_percentile, a.max_percentile
                    ));
                }
                Proc::ScaleRange {
                    reduce: positions(axes, a.axes)?,
                    min_percentile: a.min_percentile,
                    max_percentile: a.max_percentile,
                    eps: a.eps,
                }
            }
            "scale_linear" => {
                let a: ScaleLinearArgs = args(raw)?;
                let (gain, axis) = per_axis(a.gain.values(), a.axis.clone(), "gain")?;
                let (offset, _) = per_axis(a.offset.values(), a.axis, "offset")?;
                Proc::ScaleLinear { gain, offset, axis }
            }
            "clip" => {
                let a: ClipArgs = args(raw)?;
                let (min, max) = (a.min.unwrap_or(f32::NEG_INFINITY), a.max.unwrap_or(f32::INFINITY));
                if !(min <= max) {
                    return Err(format!("clip needs min <= max, got min {min} and max {max}"));
                }
                Proc::Clip { min, max }
            }
            "binarize" => {
                let a: BinarizeArgs = args(raw)?;
                let (threshold, axis) = per_axis(a.threshold.values(), a.axis, "threshold")?;
                Proc::Binarize { threshold, axis }
            }
            "ensure_dtype" => {
                let a: DtypeArgs = args(raw)?;
                let integer_range = match a.dtype.as_str() {
                    "float32" | "float64" => None,
                    "uint8" => Some((0.0, 255.0)),
                    "int8" => Some((-128.0, 127.0)),
                    "uint16" => Some((0.0, 65535.0)),
                    "int16" => Some((-32768.0, 32767.0)),
                    "uint32" => Some((0.0, u32::MAX as f32)),
                    "int32" => Some((i32::MIN as f32, i32::MAX as f32)),
                    "bool" => Some((0.0, 1.0)),
                    other => return Err(format!("ensure_dtype to {other:?} is not supported")),
                };
                Proc::EnsureDtype { integer_range }
            }
            "sigmoid" if output => {
                args::<ClipArgs>(raw)?;
                Proc::Sigmoid
            }
            "sigmoid" => Proc::Sigmoid,
            "scale_mean_variance" => {
                return Err("scale_mean_variance (matching another tensor's statistics) is not supported".into())
            }
            other => return Err(format!("unknown operation {other:?}")),
        })
    }

    pub fn apply(&self, t: &mut Tensor) {
        match self {
            Proc::ZeroMeanUnitVariance { reduce, eps } if contiguous(&t.shape, reduce.as_deref()).is_some() => {
                let len = contiguous(&t.shape, reduce.as_deref()).unwrap_or(t.data.len()).max(1);
                let eps = *eps as f64;
                let f = |chunk: &mut [f32]| {
                    let n = chunk.len().max(1) as f64;
                    // One pass for both moments, shifted by the first value so that large
                    // offsets (camera baselines) do not cancel catastrophically.
                    let shift = chunk.first().copied().unwrap_or(0.0) as f64;
                    let (s1, s2) = chunk.iter().fold((0f64, 0f64), |(a, b), &v| {
                        let d = v as f64 - shift;
                        (a + d, b + d * d)
                    });
                    let mean = shift + s1 / n;
                    let var = (s2 / n - (s1 / n) * (s1 / n)).max(0.0);
                    let (m, inv) = (mean as f32, (1.0 / (var.sqrt() + eps)) as f32);
                    chunk.iter_mut().for_each(|v| *v = (*v - m) * inv);
                };
                if t.data.len() >= PARALLEL_MIN && len < t.data.len() {
                    t.data.par_chunks_mut(len).for_each(f);
                } else {
                    t.data.chunks_mut(len).for_each(f);
                }
            }
            Proc::ZeroMeanUnitVariance { reduce, eps } => {
                let groups = Groups::new(&t.shape, reduce.as_deref());
                let mut sum = vec![0f64; groups.count];
                let mut sq = vec![0f64; groups.count];
                let mut n = vec![0usize; groups.count];
                groups.for_each(|i, g| {
                    let v = t.data[i] as f64;
                    sum[g] += v;
                    n[g] += 1;
                });
                let mean: Vec<f64> = sum.iter().zip(&n).map(|(s, &k)| s / k.max(1) as f64).collect();
                groups.for_each(|i, g| {
                    let d = t.data[i] as f64 - mean[g];
                    sq[g] += d * d;
                });
                let std: Vec<f64> = sq.iter().zip(&n).map(|(s, &k)| (s / k.max(1) as f64).sqrt()).collect();
                groups.for_each(|i, g| {
                    t.data[i] = ((t.data[i] as f64 - mean[g]) / (std[g] + *eps as f64)) as f32;
                });
            }
            Proc::FixedZeroMeanUnitVariance { axis, .. }
            | Proc::ScaleLinear { axis, .. }
            | Proc::Binarize { axis, .. } => {
                let axis = *axis;
                for_each_run(t, axis, |k, run| self.apply_run(k, run));
            }
            Proc::ScaleRange {
                reduce,
                min_percentile,
                max_percentile,
                eps,
            } => {
                let groups = Groups::new(&t.shape, reduce.as_deref());
                let mut values: Vec<Vec<f32>> = vec![Vec::new(); groups.count];
                groups.for_each(|i, g| values[g].push(t.data[i]));
                let bounds: Vec<(f32, f32)> = values
                    .iter_mut()
                    .map(|v| (percentile(v, *min_percentile), percentile(v, *max_percentile)))
                    .collect();
                groups.for_each(|i, g| {
                    let (lo, hi) = bounds[g];
                    t.data[i] = (t.data[i] - lo) / (hi - lo + eps);
                });
            }
            Proc::Clip { .. } | Proc::EnsureDtype { .. } => self.apply_run(0, &mut t.data),
            Proc::Sigmoid => {
                if t.data.len() >= PARALLEL_MIN {
                    t.data.par_iter_mut().for_each(sigmoid);
                } else {
                    t.data.iter_mut().for_each(sigmoid);
                }
            }
        }
    }
}

impl Proc {
    /// Whether the operation maps each value on its own, with parameters that depend at most on
    /// the value's index along `channel_axis`: then it can run plane by plane, where the data
    /// is made (the crop gather), instead of as a pass over the whole batch.
    pub fn is_elementwise_per(&self, channel_axis: Option<usize>) -> bool {
        match self {
            Proc::FixedZeroMeanUnitVariance { axis, .. }
            | Proc::ScaleLinear { axis, .. }
            | Proc::Binarize { axis, .. } => axis.is_none() || *axis == channel_axis,
            Proc::Clip { .. } | Proc::EnsureDtype { .. } | Proc::Sigmoid => true,
            Proc::ZeroMeanUnitVariance { .. } | Proc::ScaleRange { .. } => false,
        }
    }

    /// An elementwise operation on values whose index along its axis is `k` (see
    /// [`Proc::is_elementwise_per`]); statistics-based operations leave `run` alone.
    pub fn apply_run(&self, k: usize, run: &mut [f32]) {
        match self {
            Proc::FixedZeroMeanUnitVariance { mean, std, eps, .. } => {
                // `(v - mean) / (std + eps)` exactly as numpy computes it (a multiply by the
                // reciprocal differs in the last bit, and outputs in the thousands show it).
                let (m, d) = (pick(mean, k), pick(std, k) + eps);
                run.iter_mut().for_each(|v| *v = (*v - m) / d);
            }
            Proc::ScaleLinear { gain, offset, .. } => {
                let (g, o) = (pick(gain, k), pick(offset, k));
                run.iter_mut().for_each(|v| *v = *v * g + o);
            }
            Proc::Binarize { threshold, .. } => {
                let th = pick(threshold, k);
                run.iter_mut().for_each(|v| *v = if *v > th { 1.0 } else { 0.0 });
            }
            Proc::Clip { min, max } => run.iter_mut().for_each(|v| *v = v.clamp(*min, *max)),
            Proc::EnsureDtype { integer_range } => {
                if let Some((lo, hi)) = integer_range {
                    run.iter_mut().for_each(|v| *v = v.trunc().clamp(*lo, *hi));
                }
            }
            Proc::Sigmoid => run.iter_mut().for_each(sigmoid),
            Proc::ZeroMeanUnitVariance { .. } | Proc::ScaleRange { .. } => {}
        }
    }
}

fn sigmoid(v: &mut f32) {
    *v = 1.0 / (1.0 + (-*v).exp());
}

/// Below this many elements, threads cost more than they save.
const PARALLEL_MIN: usize = 1 << 16;

/// When the reduced axes are exactly the trailing ones (the usual `[y, x]` or `[c, y, x]`),
/// each group is one contiguous run of this many elements.
fn contiguous(shape: &[usize], reduce: Option<&[usize]>) -> Option<usize> {
    let Some(r) = reduce else {
        return Some(shape.iter().product());
    };
    let k = shape.len().checked_sub(r.len())?;
    let trailing = (k..shape.len()).all(|d| r.contains(&d));
    trailing.then(|| shape[k..].iter().product())
}

/// The value for index `k` along the operation's axis. Lists are checked at load to have one
/// value per index of an axis of fixed size, so the NaN is only a guard against a panic.
fn pick(values: &[f32], k: usize) -> f32 {
    match values {
        [one] => *one,
        _ => values.get(k).copied().unwrap_or(f32::NAN),
    }
}

/// Calls `f(k, run)` for each run of values that share index `k` along `axis` (the whole
/// tensor with `k = 0` without an axis): per-run constants, no index arithmetic per value.
fn for_each_run(t: &mut Tensor, axis: Option<usize>, mut f: impl FnMut(usize, &mut [f32])) {
    let (inner, len) = match axis {
        None => (t.data.len().max(1), 1),
        Some(a) => (t.shape[a + 1..].iter().product::<usize>().max(1), t.shape[a].max(1)),
    };
    for (j, run) in t.data.chunks_mut(inner).enumerate() {
        f(j % len, run);
    }
}

/// numpy's default (linear) percentile; NaNs are ignored.
fn percentile(values: &mut [f32], p: f32) -> f32 {
    let mut n = values.len();
    let mut w = 0;
    for i in 0..n {
        if !values[i].is_nan() {
            values[w] = values[i];
            w += 1;
        }
    }
    n = w;
    if n == 0 {
        return 0.0;
    }
    let v = &mut values[..n];
    let pos = p as f64 / 100.0 * (n - 1) as f64;
    let lo = pos.floor() as usize;
    let frac = (pos - lo as f64) as f32;
    let (_, &mut a, rest) = v.select_nth_unstable_by(lo, |x, y| x.total_cmp(y));
    if frac == 0.0 || rest.is_empty() {
        return a;
    }
    let b = rest.iter().copied().fold(f32::INFINITY, f32::min);
    a + (b - a) * frac
}

/// Maps each flat index to the group of elements that share statistics: those equal on every
/// axis that is not reduced.
struct Groups<'a> {
    shape: &'a [usize],
    /// Group stride per axis (0 for reduced axes).
    gstride: Vec<usize>,
    count: usize,
}

impl<'a> Groups<'a> {
    fn new(shape: &'a [usize], reduce: Option<&[usize]>) -> Self {
        let mut gstride = vec![0; shape.len()];
        let mut count = 1;
        for d in (0..shape.len()).rev() {
            let reduced = reduce.is_none_or(|r| r.contains(&d));
            if !reduced {
                gstride[d] = count;
                count *= shape[d];
            }
        }
        Self { shape, gstride, count }
    }

    fn for_each(&self, mut f: impl FnMut(usize, usize)) {
        let total: usize = self.shape.iter().product();
        if self.count == 1 {
            (0..total).for_each(|i| f(i, 0));
            return;
        }
        let mut idx = vec![0usize; self.shape.len()];
        let mut g = 0;
        for i in 0..total {
            f(i, g);
            for d in (0..self.shape.len()).rev() {
                idx[d] += 1;
                g += self.gstride[d];
                if idx[d] < self.shape[d] {
                    break;
                }
                g -= self.gstride[d] * idx[d];
                idx[d] = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::description::{AxisKind, AxisSize};

    fn parse(id: &str, kwargs: &str) -> Result<Proc, String> {
        let axes = [
            Axis {
                id: "batch".into(),
                kind: AxisKind::Batch,
                size: AxisSize::Any,
                halo: 0,
                unit: None,
                scale: 1.0,
            },
            Axis {
                id: "channel".into(),
                kind: AxisKind::Channel {
                    names: vec!["a".into(), "b".into(), "c".into()],
                },
                size: AxisSize::Fixed(3),
                halo: 0,
                unit: None,
                scale: 1.0,
            },
        ];
        let raw = RawProc {
            id: id.into(),
            kwargs: serde_yaml_ng::from_str(kwargs).map_err(|e| e.to_string())?,
        };
        Proc::parse(&raw, &axes, false)
    }

    #[test]
    fn inconsistent_kwargs_are_load_errors_not_panics() {
        let e = parse("clip", "{min: 5, max: -5}").err().unwrap_or_default();
        assert!(e.contains("min <= max"), "{e}");
        let e = parse("scale_linear", "{gain: [1, 2], axis: channel}")
            .err()
            .unwrap_or_default();
        assert!(e.contains("2 values for axis \"channel\" of size 3"), "{e}");
        let e = parse("scale_linear", "{gain: [], axis: channel}")
            .err()
            .unwrap_or_default();
        assert!(e.contains("no values"), "{e}");
        let e = parse("scale_linear", "{gain: [1, 2, 3], offset: [0, 1], axis: channel}")
            .err()
            .unwrap_or_default();
        assert!(e.contains("offset has 2 values"), "{e}");
        assert!(parse("scale_linear", "{gain: [1, 2, 3], offset: 0.5, axis: channel}").is_ok());
        assert!(parse("clip", "{min: 0, max: 1}").is_ok());
        let e = parse("scale_linear", "{gain: [1, 2], axis: batch}")
            .err()
            .unwrap_or_default();
        assert!(e.contains("whose size is not fixed"), "{e}");
    }

    #[test]
    fn a_list_along_an_axis_of_unknown_size_is_refused_and_pick_never_panics() {
        assert_eq!(pick(&[1.0, 2.0], 1), 2.0);
        assert_eq!(pick(&[7.0], 5), 7.0);
        assert!(pick(&[1.0, 2.0], 2).is_nan());
    }

    #[test]
    fn zero_mean_per_channel() {
        let mut t = Tensor::new(vec![1, 2, 2], vec![1.0, 3.0, 10.0, 30.0]);
        Proc::ZeroMeanUnitVariance {
            reduce: Some(vec![0, 2]),
            eps: 0.0,
        }
        .apply(&mut t);
        assert_eq!(t.data, vec![-1.0, 1.0, -1.0, 1.0]);
    }

    #[test]
    fn percentiles_match_numpy() {
        let mut v: Vec<f32> = (0..11).map(|i| i as f32).collect();
        assert_eq!(percentile(&mut v, 50.0), 5.0);
        let mut v = vec![1.0, 2.0, 3.0, 4.0];
        assert!((percentile(&mut v, 25.0) - 1.75).abs() < 1e-6);
        let mut v = vec![f32::NAN, 2.0];
        assert_eq!(percentile(&mut v, 99.0), 2.0);
    }

    #[test]
    fn per_axis_linear() {
        let mut t = Tensor::new(vec![2, 2], vec![1.0, 1.0, 1.0, 1.0]);
        Proc::ScaleLinear {
            gain: vec![2.0, 3.0],
            offset: vec![0.0, 1.0],
            axis: Some(0),
        }
        .apply(&mut t);
        assert_eq!(t.data, vec![2.0, 2.0, 4.0, 4.0]);
    }

    #[test]
    fn plane_by_plane_equals_whole_tensor_for_elementwise_steps() {
        // [n=2, c=3, 2x2]: every elementwise step run per (crop, channel) plane must give the
        // whole-tensor result bit for bit, because the crop gather applies them that way.
        let data: Vec<f32> = (0..24).map(|i| (i as f32 - 7.0) * 13.7).collect();
        let steps = [
            Proc::FixedZeroMeanUnitVariance {
                mean: vec![1.0, 2.0, 3.0],
                std: vec![3.0, 7.0, 11.0],
                axis: Some(1),
                eps: 1e-6,
            },
            Proc::ScaleLinear {
                gain: vec![0.5],
                offset: vec![-1.0],
                axis: None,
            },
            Proc::Clip { min: -5.0, max: 5.0 },
            Proc::Binarize {
                threshold: vec![0.0, 1.0, -1.0],
                axis: Some(1),
            },
            Proc::Sigmoid,
        ];
        for step in &steps {
            assert!(step.is_elementwise_per(Some(1)), "{step:?}");
            let mut whole = Tensor::new(vec![2, 3, 2, 2], data.clone());
            step.apply(&mut whole);
            let mut planes = data.clone();
            for (j, plane) in planes.chunks_mut(4).enumerate() {
                step.apply_run(j % 3, plane);
            }
            assert_eq!(whole.data, planes, "{step:?}");
        }
        let stats = Proc::ZeroMeanUnitVariance { reduce: None, eps: 0.0 };
        assert!(!stats.is_elementwise_per(Some(1)));
        let other_axis = Proc::ScaleLinear {
            gain: vec![1.0, 2.0],
            offset: vec![0.0, 0.0],
            axis: Some(2),
        };
        assert!(!other_axis.is_elementwise_per(Some(1)));
    }
}
