//! Error-feedback rounding (GPTQ: Frantar et al. 2022, after Optimal Brain Quantization):
//! a layer's codes chosen so that the layer's *output* on the calibration images stays
//! close to the float layer's, instead of every weight rounding on its own.
//!
//! For one output channel with float weights `w`, scale `s` and codes `q`, the output
//! error over the calibration patches `x` is `(w - s q)ᵀ H (w - s q)` with `H = Σ x xᵀ`,
//! one matrix that all channels of the layer share. Rounding the columns one at a time,
//! the error of each rounding is spread over the columns not yet rounded by the update
//! that minimises the quadratic form; with `U` the upper Cholesky factor of `H⁻¹` that
//! update is `w[t] -= (w[j] - s q[j]) / U[j][j] * U[j][t]` for `t > j`. Columns go in
//! decreasing order of `H`'s diagonal (the most active inputs first), and `H` is damped by
//! 1 % of its mean diagonal, as GPTQ does, so that collinear or dead inputs keep the
//! factorisation stable.
//!
//! This module owns that arithmetic: the input statistics `H` of every weight layer,
//! accumulated from the float network's values, and the rounding of a layer's rows.
//! It is float arithmetic (f64, fixed loop order, so the same inputs give the same codes),
//! run once when a network is quantized; the search and the integer engine see codes only.

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2};

use crate::float;
use crate::model::{Graph, Op};

/// Damping added to `H`'s diagonal, as a fraction of its mean diagonal.
const DAMPING: f64 = 0.01;

/// `H = Σ x xᵀ` over the calibration images' input patches of each weight layer, in the
/// float graph's weight order (Conv: `(in channel, ky, kx)`; Linear: input features).
pub(crate) struct InputStats {
    /// Per weight layer: its node, its patch length `k` and `H` (`k * k`, row-major).
    layers: Vec<(usize, usize, Vec<f64>)>,
    col: Vec<f32>,
    prod: Vec<f32>,
}

impl InputStats {
    /// Statistics for the Conv (group 1) and Linear nodes among `nodes`.
    pub(crate) fn new(graph: &Graph, nodes: impl IntoIterator<Item = usize>) -> Self {
        let layers = nodes
            .into_iter()
            .filter_map(|i| {
                let k = match &graph.nodes[i].op {
                    Op::Conv(c) if c.group == 1 => c.in_channels * c.kernel[0] * c.kernel[1],
                    Op::Linear(l) => l.in_features,
                    _ => return None,
                };
                Some((i, k, vec![0.0; k * k]))
            })
            .collect();
        InputStats {
            layers,
            col: Vec::new(),
            prod: Vec::new(),
        }
    }

    /// Adds the patches of `m` images whose every float value is in `vals` (as
    /// [`float::forward_all`] returns them).
    pub(crate) fn add(&mut self, graph: &Graph, vals: &[Vec<f32>], m: usize) {
        for (i, k, h) in &mut self.layers {
            let node = &graph.nodes[*i];
            let (x, xs, ys) = (
                &vals[node.inputs[0]],
                graph.shape(node.inputs[0]),
                node.shape,
            );
            let k = *k;
            self.prod.resize(k * k, 0.0);
            let mut prod = ArrayViewMut2::from_shape((k, k), &mut self.prod[..])
                .expect("prod holds k * k values");
            match &node.op {
                Op::Conv(c) => {
                    let hw = ys.h * ys.w;
                    self.col.resize(k * hw, 0.0);
                    for xi in x.chunks_exact(xs.len()).take(m) {
                        float::im2col(c, xi, xs, ys, 0, c.in_channels, &mut self.col);
                        let col = ArrayView2::from_shape((k, hw), &self.col[..])
                            .expect("col holds k * hw values");
                        general_mat_mul(1.0, &col, &col.t(), 0.0, &mut prod);
                        for (a, &b) in h.iter_mut().zip(prod.iter()) {
                            *a += f64::from(b);
                        }
                    }
                }
                Op::Linear(_) => {
                    let rows = ArrayView2::from_shape((m, k), &x[..m * k])
                        .expect("a linear layer's input is m rows of k features");
                    general_mat_mul(1.0, &rows.t(), &rows, 0.0, &mut prod);
                    for (a, &b) in h.iter_mut().zip(prod.iter()) {
                        *a += f64::from(b);
                    }
                }
                _ => unreachable!("only Conv and Linear nodes are kept"),
            }
        }
    }

    /// The statistics of node `i` (`k * k`), if it is a weight layer.
    pub(crate) fn take(&mut self, i: usize) -> Option<Vec<f64>> {
        let at = self.layers.iter().position(|(n, _, _)| *n == i)?;
        Some(self.layers.swap_remove(at).2)
    }
}

/// `H` with its rows and columns reordered: entry `(a, b)` of the result is entry
/// `(perm[a], perm[b])` of `h` (`perm[a]` is where the new index `a` was).
pub(crate) fn permuted(h: &[f64], perm: &[usize]) -> Vec<f64> {
    let k = perm.len();
    let mut out = vec![0.0; k * k];
    for (a, &pa) in perm.iter().enumerate() {
        for (b, &pb) in perm.iter().enumerate() {
            out[a * k + b] = h[pa * k + pb];
        }
    }
    out
}

/// The codes of `rows` (row-major, `scales.len()` rows of `k = h.len().sqrt()` weights)
/// by error-feedback rounding against the input statistics `h`, each code in `[lo, hi]`.
/// When `H` cannot be factorised even with heavy damping, every weight rounds to its
/// nearest code.
pub(crate) fn round_rows(rows: &[f32], scales: &[f64], h: &[f64], lo: i8, hi: i8) -> Vec<i8> {
    let k = rows.len() / scales.len().max(1);
    debug_assert_eq!(h.len(), k * k);
    let nearest = |x: f64, s: f64| (x / s).round().clamp(f64::from(lo), f64::from(hi));

    // Columns in decreasing order of activity; ties by index, so the order is fixed.
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&a, &b| h[b * k + b].total_cmp(&h[a * k + a]).then(a.cmp(&b)));
    let mut hp = permuted(h, &order);
    // A dead input (never non-zero) gets a unit diagonal: it then neither passes nor
    // receives compensation, and its weights round to nearest.
    for j in 0..k {
        if hp[j * k + j] <= 0.0 {
            hp[j * k + j] = 1.0;
        }
    }
    let mean_diag = (0..k).map(|j| hp[j * k + j]).sum::<f64>() / k.max(1) as f64;
    let u = (0..4).find_map(|t| {
        let mut damped = hp.clone();
        let damp = DAMPING * 10f64.powi(t) * mean_diag;
        (0..k).for_each(|j| damped[j * k + j] += damp);
        inverse_upper_factor(&mut damped, k)
    });

    let mut codes = vec![0i8; rows.len()];
    let mut w = vec![0f64; k];
    for ((row, &s), out) in rows
        .chunks_exact(k)
        .zip(scales)
        .zip(codes.chunks_exact_mut(k))
    {
        for (wj, &j) in w.iter_mut().zip(&order) {
            *wj = f64::from(row[j]);
        }
        for j in 0..k {
            let q = nearest(w[j], s);
            out[order[j]] = q as i8;
            let Some(u) = &u else { continue };
            let e = (w[j] - q * s) / u[j * k + j];
            for t in j + 1..k {
                w[t] -= e * u[j * k + t];
            }
        }
    }
    codes
}

/// `U`, upper triangular with `H⁻¹ = Uᵀ U`, for the symmetric `h` (`k * k`, destroyed);
/// `None` when `h` is not positive definite.
fn inverse_upper_factor(h: &mut [f64], k: usize) -> Option<Vec<f64>> {
    // H = L Lᵀ (L in the lower triangle of h).
    cholesky(h, k)?;
    // L⁻¹ by forward substitution, column by column.
    let mut inv = vec![0f64; k * k];
    for c in 0..k {
        inv[c * k + c] = 1.0 / h[c * k + c];
        for r in c + 1..k {
            let s: f64 = (c..r).map(|t| h[r * k + t] * inv[t * k + c]).sum();
            inv[r * k + c] = -s / h[r * k + r];
        }
    }
    // H⁻¹ = L⁻ᵀ L⁻¹.
    let mut hinv = vec![0f64; k * k];
    for a in 0..k {
        for b in 0..=a {
            let s: f64 = (a..k).map(|t| inv[t * k + a] * inv[t * k + b]).sum();
            hinv[a * k + b] = s;
            hinv[b * k + a] = s;
        }
    }
    // H⁻¹ = M Mᵀ, and U = Mᵀ.
    cholesky(&mut hinv, k)?;
    let mut u = vec![0f64; k * k];
    for r in 0..k {
        for c in 0..=r {
            u[c * k + r] = hinv[r * k + c];
        }
    }
    Some(u)
}

/// In-place Cholesky factorisation `A = L Lᵀ` of the symmetric `a` (`k * k`): `L` ends in
/// the lower triangle. `None` when `a` is not (numerically) positive definite.
fn cholesky(a: &mut [f64], k: usize) -> Option<()> {
    for j in 0..k {
        let d = a[j * k + j] - (0..j).map(|t| a[j * k + t] * a[j * k + t]).sum::<f64>();
        // NaN fails `d > 0.0` as well.
        if d.is_nan() || d <= 0.0 || !d.is_finite() {
            return None;
        }
        let d = d.sqrt();
        a[j * k + j] = d;
        for r in j + 1..k {
            let s: f64 = (0..j).map(|t| a[r * k + t] * a[j * k + t]).sum();
            a[r * k + j] = (a[r * k + j] - s) / d;
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// `Σ_rows (w - s q)ᵀ H (w - s q)`: the layer's squared output error on the patches
    /// that `h` summarises.
    fn output_error(rows: &[f32], scales: &[f64], codes: &[i8], h: &[f64]) -> f64 {
        let k = rows.len() / scales.len();
        let mut total = 0.0;
        for (o, &s) in scales.iter().enumerate() {
            let d: Vec<f64> = (0..k)
                .map(|j| f64::from(rows[o * k + j]) - s * f64::from(codes[o * k + j]))
                .collect();
            for a in 0..k {
                for b in 0..k {
                    total += d[a] * h[a * k + b] * d[b];
                }
            }
        }
        total
    }

    /// Correlated patches: a few shared factors plus noise, as neighbouring pixels are.
    fn patches(n: usize, k: usize, rng: &mut ChaCha8Rng) -> Vec<f64> {
        let mut h = vec![0f64; k * k];
        for _ in 0..n {
            let f: [f64; 3] = [rng.random(), rng.random(), rng.random()];
            let x: Vec<f64> = (0..k)
                .map(|j| f[j % 3] + 0.3 * f[(j + 1) % 3] + 0.2 * rng.random::<f64>())
                .collect();
            for a in 0..k {
                for b in 0..k {
                    h[a * k + b] += x[a] * x[b];
                }
            }
        }
        h
    }

    fn layer(rows: usize, k: usize, rng: &mut ChaCha8Rng) -> (Vec<f32>, Vec<f64>) {
        let w: Vec<f32> = (0..rows * k).map(|_| rng.random::<f32>() - 0.5).collect();
        // 2-bit symmetric scales from each row's largest magnitude (qmax = 1).
        let s = w
            .chunks_exact(k)
            .map(|r| r.iter().fold(0f64, |m, &x| m.max(f64::from(x).abs())))
            .collect();
        (w, s)
    }

    #[test]
    fn error_feedback_lowers_the_output_error_below_rounding_to_nearest() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (k, rows) = (24, 8);
        let h = patches(400, k, &mut rng);
        let (w, s) = layer(rows, k, &mut rng);
        let nearest: Vec<i8> = w
            .chunks_exact(k)
            .zip(&s)
            .flat_map(|(r, &s)| r.iter().map(move |&x| (f64::from(x) / s).round() as i8))
            .collect();
        let fed = round_rows(&w, &s, &h, -2, 1);
        assert!(fed.iter().all(|&q| (-2..=1).contains(&q)));
        let (e_near, e_fed) = (
            output_error(&w, &s, &nearest, &h),
            output_error(&w, &s, &fed, &h),
        );
        assert!(
            e_fed < 0.7 * e_near,
            "output error: feedback {e_fed}, nearest {e_near}"
        );
        // Deterministic: the same inputs give the same codes.
        assert_eq!(round_rows(&w, &s, &h, -2, 1), fed);
    }

    #[test]
    fn with_uncorrelated_inputs_every_weight_rounds_to_nearest() {
        // A diagonal H has nothing to compensate through.
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let k = 10;
        let mut h = vec![0f64; k * k];
        for j in 0..k {
            h[j * k + j] = 1.0 + j as f64;
        }
        h[3 * k + 3] = 0.0; // a dead input
        let (w, s) = layer(4, k, &mut rng);
        let codes = round_rows(&w, &s, &h, -8, 7);
        for (o, &s) in s.iter().enumerate() {
            for j in 0..k {
                let want = (f64::from(w[o * k + j]) / s).round() as i8;
                assert_eq!(codes[o * k + j], want, "row {o} column {j}");
            }
        }
    }

    #[test]
    fn the_factor_inverts_h() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let k = 9;
        let h = patches(50, k, &mut rng);
        let u = inverse_upper_factor(&mut h.clone(), k).unwrap();
        // (Uᵀ U) H = I
        for r in 0..k {
            for c in 0..k {
                let x: f64 = (0..k)
                    .map(|m| {
                        (0..k).map(|t| u[t * k + r] * u[t * k + m]).sum::<f64>() * h[m * k + c]
                    })
                    .sum();
                let want = if r == c { 1.0 } else { 0.0 };
                assert!((x - want).abs() < 1e-6, "({r}, {c}): {x}");
            }
        }
        // Lower triangle of U is zero.
        assert!((0..k).all(|r| (0..r).all(|c| u[r * k + c] == 0.0)));
        // Not positive definite: refused.
        let mut singular = vec![1.0; 4];
        assert!(inverse_upper_factor(&mut singular, 2).is_none());
    }

    #[test]
    fn permuting_moves_rows_and_columns_together() {
        let h: Vec<f64> = (0..9).map(f64::from).collect();
        assert_eq!(
            permuted(&h, &[2, 0, 1]),
            vec![8.0, 6.0, 7.0, 2.0, 0.0, 1.0, 5.0, 3.0, 4.0]
        );
    }
}
