//! Helpers the unit tests of several modules share: the committed ONNX fixtures and the
//! mean difference of two code tensors.

use crate::model::Graph;

/// The fixture graph `tests/fixtures/{name}.onnx`.
pub fn fixture_graph(name: &str) -> Graph {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("{name}.onnx"));
    crate::onnx::load_onnx(&path).unwrap()
}

/// Mean absolute difference of two code tensors of the same length, in codes.
pub fn mean_code_diff(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len(), "code tensors of different lengths");
    let total: f64 = (a.iter().zip(b))
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).abs())
        .sum();
    total / a.len().max(1) as f64
}
