//! The f32 reference engine: runs a [`Graph`] in plain floating point, NCHW, on one
//! thread (callers split batches across threads). It reports float accuracy and feeds
//! calibration; training never uses it.
//!
//! Convolutions go through im2col and one matrix product per image and group
//! (`ndarray`'s GEMM), which is far faster than direct loops. Like ONNX Runtime it
//! accumulates in f32, so results agree with ONNX Runtime up to summation order.

use ndarray::linalg::general_mat_mul;
use ndarray::{s, ArrayView2, ArrayViewMut2};

use crate::model::{Conv, Graph, Linear, Op, Pad, Pool, Shape, Slice, ValueId};

/// Runs the graph on `n` images (`input` is `n * input_shape.len()` values, NCHW) and
/// returns the logits, `n * num_classes` values.
///
/// # Panics
/// If `input` does not hold exactly `n` images of the graph's input shape.
pub fn forward(graph: &Graph, input: &[f32], n: usize) -> Vec<f32> {
    let mut values = run(graph, input, n, false);
    std::mem::take(&mut values[graph.output])
}

/// Runs the graph on `n` images and returns every value (index = [`ValueId`]), each
/// `n * shape.len()` values, NCHW.
///
/// # Panics
/// If `input` does not hold exactly `n` images of the graph's input shape.
pub fn forward_all(graph: &Graph, input: &[f32], n: usize) -> Vec<Vec<f32>> {
    run(graph, input, n, true)
}

/// Evaluates the nodes in order. Unless `keep_all`, a value is freed after its last
/// consumer, so peak memory is a few activations rather than the whole network's.
fn run(graph: &Graph, input: &[f32], n: usize, keep_all: bool) -> Vec<Vec<f32>> {
    assert_eq!(
        input.len(),
        n * graph.input_shape.len(),
        "float::forward: input has {} values, expected {n} images of {}",
        input.len(),
        graph.input_shape
    );
    let mut last_use: Vec<ValueId> = (0..=graph.nodes.len()).collect();
    for (i, node) in graph.nodes.iter().enumerate() {
        for &v in &node.inputs {
            last_use[v] = i + 1;
        }
    }
    last_use[graph.output] = usize::MAX;

    let mut values: Vec<Vec<f32>> = Vec::with_capacity(graph.nodes.len() + 1);
    values.push(input.to_vec());
    for (i, node) in graph.nodes.iter().enumerate() {
        let first = node.inputs[0];
        let xs = graph.shape(first);
        let ys = node.shape;
        // Elementwise ops overwrite their first input when nothing else reads it, which
        // saves an allocation and a pass over memory per op.
        let consumable =
            !keep_all && last_use[first] == i + 1 && !node.inputs[1..].contains(&first);
        let owned_input = |values: &mut Vec<Vec<f32>>| {
            if consumable {
                std::mem::take(&mut values[first])
            } else {
                values[first].clone()
            }
        };
        let y = match &node.op {
            Op::Conv(c) => conv(c, &values[first], xs, ys, n),
            Op::Linear(l) => linear(l, &values[first], n),
            Op::Relu => {
                let mut y = owned_input(&mut values);
                y.iter_mut().for_each(|v| *v = v.max(0.0));
                y
            }
            Op::Clip { min, max } => {
                let mut y = owned_input(&mut values);
                // max/min rather than clamp, which panics on bounds it considers invalid.
                y.iter_mut().for_each(|v| *v = v.max(*min).min(*max));
                y
            }
            Op::Add => {
                let mut y = owned_input(&mut values);
                y.iter_mut()
                    .zip(&values[node.inputs[1]])
                    .for_each(|(a, b)| *a += b);
                y
            }
            Op::Unary(f) => {
                let mut y = owned_input(&mut values);
                y.iter_mut().for_each(|v| *v = f.apply(*v as f64) as f32);
                y
            }
            Op::Mul => {
                let mut y = owned_input(&mut values);
                let b = &values[node.inputs[1]];
                if b.len() == y.len() {
                    y.iter_mut().zip(b).for_each(|(a, b)| *a *= b);
                } else {
                    // `[C, 1, 1]` per image, broadcast over the plane.
                    let hw = xs.h * xs.w;
                    for (plane, &s) in y.chunks_exact_mut(hw).zip(b) {
                        plane.iter_mut().for_each(|a| *a *= s);
                    }
                }
                y
            }
            Op::Concat => {
                let mut y = Vec::with_capacity(n * ys.len());
                for img in 0..n {
                    for &v in &node.inputs {
                        let len = graph.shape(v).len();
                        y.extend_from_slice(&values[v][img * len..(img + 1) * len]);
                    }
                }
                y
            }
            Op::MaxPool(p) => pool(p, false, &values[first], xs, ys, n),
            Op::AveragePool(p) => pool(p, true, &values[first], xs, ys, n),
            Op::GlobalAveragePool => global_average_pool(&values[first], xs),
            // NCHW flattening keeps the memory order.
            Op::Flatten => owned_input(&mut values),
            Op::Slice(sl) => slice(sl, &values[first], xs, ys, n),
            Op::Pad(p) => pad(p, &values[first], xs, ys, n),
        };
        debug_assert_eq!(y.len(), n * ys.len(), "node '{}'", node.name);
        values.push(y);
        if !keep_all {
            for &v in &node.inputs {
                if last_use[v] == i + 1 {
                    values[v] = Vec::new();
                }
            }
        }
    }
    values
}

fn conv(c: &Conv, x: &[f32], xs: Shape, ys: Shape, n: usize) -> Vec<f32> {
    let mut y = vec![0.0; n * ys.len()];
    let in_per_group = c.in_channels / c.group;
    let out_per_group = c.out_channels / c.group;
    let k = in_per_group * c.kernel[0] * c.kernel[1];
    let hw = ys.h * ys.w;
    let weight = ArrayView2::from_shape((c.out_channels, k), &c.weight)
        .expect("conv weight matches its dims");
    // A 1x1 stride-1 unpadded convolution reads its input as the column matrix directly.
    let pointwise = c.kernel == [1, 1] && c.stride == [1, 1] && c.pads == [0; 4] && c.group == 1;
    let mut col = vec![0.0; if pointwise { 0 } else { k * hw }];

    for (xi, yi) in x.chunks_exact(xs.len()).zip(y.chunks_exact_mut(ys.len())) {
        for g in 0..c.group {
            let cols = if pointwise {
                ArrayView2::from_shape((k, hw), xi)
            } else {
                im2col(c, xi, xs, ys, g * in_per_group, in_per_group, &mut col);
                ArrayView2::from_shape((k, hw), &col[..])
            }
            .expect("column matrix has k * hw values");
            let w = weight.slice(s![g * out_per_group..(g + 1) * out_per_group, ..]);
            let out = &mut yi[g * out_per_group * hw..(g + 1) * out_per_group * hw];
            let mut out =
                ArrayViewMut2::from_shape((out_per_group, hw), out).expect("output block");
            general_mat_mul(1.0, &w, &cols, 0.0, &mut out);
        }
        for (plane, &b) in yi.chunks_exact_mut(hw).zip(&c.bias) {
            plane.iter_mut().for_each(|v| *v += b);
        }
    }
    y
}

/// Fills `col` (`[channels * kh * kw, oh * ow]`) with the input patches of channels
/// `first..first + channels`; positions in the padding are 0.
pub(crate) fn im2col(
    c: &Conv,
    x: &[f32],
    xs: Shape,
    ys: Shape,
    first: usize,
    channels: usize,
    col: &mut [f32],
) {
    let [kh, kw] = c.kernel;
    let [sh, sw] = c.stride;
    let [dh, dw] = c.dilation;
    let (pad_top, pad_left) = (c.pads[0] as isize, c.pads[1] as isize);
    let mut rows = col.chunks_exact_mut(ys.h * ys.w);
    for ch in first..first + channels {
        let plane = &x[ch * xs.h * xs.w..(ch + 1) * xs.h * xs.w];
        for ky in 0..kh {
            for kx in 0..kw {
                // Input column of output column `ox` is `ox * sw + offset`; it lies inside
                // the image for `ox` in `lo..hi`, so each row is zeros, a strided copy, zeros.
                let offset = (kx * dw) as isize - pad_left;
                let lo = if offset >= 0 {
                    0
                } else {
                    (offset.unsigned_abs()).div_ceil(sw)
                }
                .min(ys.w);
                let past_end = xs.w as isize - offset;
                let hi = if past_end <= 0 {
                    0
                } else {
                    (past_end as usize).div_ceil(sw)
                }
                .clamp(lo, ys.w);
                let row = rows.next().expect("col has one row per (channel, ky, kx)");
                for (oy, out_row) in row.chunks_exact_mut(ys.w).enumerate() {
                    let iy = (oy * sh + ky * dh) as isize - pad_top;
                    if iy < 0 || iy >= xs.h as isize || lo == hi {
                        out_row.fill(0.0);
                        continue;
                    }
                    let in_row = &plane[iy as usize * xs.w..(iy as usize + 1) * xs.w];
                    let start = (lo * sw) as isize + offset;
                    let src = in_row[start as usize..].iter().step_by(sw);
                    out_row[..lo].fill(0.0);
                    out_row[lo..hi]
                        .iter_mut()
                        .zip(src)
                        .for_each(|(v, &x)| *v = x);
                    out_row[hi..].fill(0.0);
                }
            }
        }
    }
}

fn linear(l: &Linear, x: &[f32], n: usize) -> Vec<f32> {
    let mut y = vec![0.0; n * l.out_features];
    let xv =
        ArrayView2::from_shape((n, l.in_features), x).expect("linear input matches in_features");
    let w = ArrayView2::from_shape((l.out_features, l.in_features), &l.weight)
        .expect("linear weight matches its dims");
    let mut yv = ArrayViewMut2::from_shape((n, l.out_features), &mut y).expect("linear output");
    general_mat_mul(1.0, &xv, &w.t(), 0.0, &mut yv);
    for row in y.chunks_exact_mut(l.out_features) {
        row.iter_mut().zip(&l.bias).for_each(|(v, b)| *v += b);
    }
    y
}

/// Max or average pooling. Padded cells never win a max; for the average they count in
/// the divisor only with `count_include_pad` (the importer guarantees every window holds
/// at least one real cell and stays inside the padded input).
fn pool(p: &Pool, average: bool, x: &[f32], xs: Shape, ys: Shape, n: usize) -> Vec<f32> {
    let mut y = Vec::with_capacity(n * ys.len());
    let [kh, kw] = p.kernel;
    for plane in x.chunks_exact(xs.h * xs.w) {
        for oy in 0..ys.h {
            let top = (oy * p.stride[0]) as isize - p.pads[0] as isize;
            let rows = top.max(0) as usize..(top + kh as isize).min(xs.h as isize) as usize;
            for ox in 0..ys.w {
                let left = (ox * p.stride[1]) as isize - p.pads[1] as isize;
                let cols = left.max(0) as usize..(left + kw as isize).min(xs.w as isize) as usize;
                let window = rows.clone().flat_map(|iy| {
                    plane[iy * xs.w + cols.start..iy * xs.w + cols.end]
                        .iter()
                        .copied()
                });
                y.push(if average {
                    let divisor = if p.count_include_pad {
                        kh * kw
                    } else {
                        rows.len() * cols.len()
                    };
                    window.sum::<f32>() / divisor as f32
                } else {
                    window.fold(f32::NEG_INFINITY, f32::max)
                });
            }
        }
    }
    y
}

fn global_average_pool(x: &[f32], xs: Shape) -> Vec<f32> {
    let area = xs.h * xs.w;
    x.chunks_exact(area)
        .map(|plane| plane.iter().sum::<f32>() / area as f32)
        .collect()
}

fn slice(sl: &Slice, x: &[f32], xs: Shape, ys: Shape, n: usize) -> Vec<f32> {
    let mut y = Vec::with_capacity(n * ys.len());
    for image in x.chunks_exact(xs.len()) {
        for c in (sl.start[0]..sl.end[0]).step_by(sl.step[0]) {
            for h in (sl.start[1]..sl.end[1]).step_by(sl.step[1]) {
                let row = &image[(c * xs.h + h) * xs.w..][..xs.w];
                y.extend(row[sl.start[2]..sl.end[2]].iter().step_by(sl.step[2]));
            }
        }
    }
    y
}

fn pad(p: &Pad, x: &[f32], xs: Shape, ys: Shape, n: usize) -> Vec<f32> {
    let mut y = vec![0.0; n * ys.len()];
    for (xi, yi) in x.chunks_exact(xs.len()).zip(y.chunks_exact_mut(ys.len())) {
        for c in 0..xs.c {
            for h in 0..xs.h {
                let src = &xi[(c * xs.h + h) * xs.w..][..xs.w];
                let dst = ((c + p.before[0]) * ys.h + h + p.before[1]) * ys.w + p.before[2];
                yi[dst..dst + xs.w].copy_from_slice(src);
            }
        }
    }
    y
}
