/// A dense row-major f32 tensor: what flows between preprocessing, ONNX Runtime and
/// postprocessing. Models take and give other dtypes only through `ensure_dtype`, which rounds
/// values but keeps them in f32 so one code path serves every model.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }

    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Self {
            shape,
            data: vec![0.0; n],
        }
    }

    /// Largest absolute difference to `other`; `None` when the shapes differ.
    pub fn max_abs_diff(&self, other: &Tensor) -> Option<f32> {
        (self.shape == other.shape).then(|| {
            self.data
                .iter()
                .zip(&other.data)
                .map(|(a, b)| if a.is_nan() && b.is_nan() { 0.0 } else { (a - b).abs() })
                .fold(0.0f32, |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) })
        })
    }
}
