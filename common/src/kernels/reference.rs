//! Plain reference kernels: the obvious loops, written for clarity, not speed. They define
//! what the fast kernels must compute bit for bit, and the tests compare against them.
//! Shapes and lengths are checked by the callers in [`super`].

use super::{AddParams, ConvGeom, OutputStage, PoolGeom};

/// Input coordinate of output position `o`, kernel tap `k`, or `None` inside the padding.
fn input_coord(
    o: usize,
    k: usize,
    stride: usize,
    dil: usize,
    pad: usize,
    size: usize,
) -> Option<usize> {
    (o * stride + k * dil)
        .checked_sub(pad)
        .filter(|&i| i < size)
}

/// `out = bias[oc] + sum (x - zp) * w` over each window, padded cells contributing 0.
/// Sums wrap modulo 2^32 (see the module docs of [`super`] for when that can happen).
pub fn conv_acc(
    g: &ConvGeom,
    weights: &[i8],
    bias: &[i32],
    zp: u8,
    input: &[u8],
    n: usize,
    out: &mut [i32],
) {
    let (out_h, out_w) = (g.out_h(), g.out_w());
    for img in 0..n {
        let x = &input[img * g.in_len()..][..g.in_len()];
        let y = &mut out[img * g.out_len()..][..g.out_len()];
        for oy in 0..out_h {
            for ox in 0..out_w {
                for oc in 0..g.out_c {
                    // Grouped convolutions read only their group's input channels.
                    let (first, ipg) = (g.first_input_of(oc), g.in_per_group());
                    let mut acc = bias[oc];
                    for ky in 0..g.k_h {
                        let Some(iy) = input_coord(oy, ky, g.stride_h, g.dil_h, g.pad_t, g.in_h)
                        else {
                            continue;
                        };
                        for kx in 0..g.k_w {
                            let Some(ix) =
                                input_coord(ox, kx, g.stride_w, g.dil_w, g.pad_l, g.in_w)
                            else {
                                continue;
                            };
                            for ic in 0..ipg {
                                let xv = i32::from(x[(iy * g.in_w + ix) * g.in_c + first + ic])
                                    - i32::from(zp);
                                let wv =
                                    i32::from(weights[((oc * g.k_h + ky) * g.k_w + kx) * ipg + ic]);
                                acc = acc.wrapping_add(xv * wv);
                            }
                        }
                    }
                    y[(oy * out_w + ox) * g.out_c + oc] = acc;
                }
            }
        }
    }
}

/// [`conv_acc`] followed by the output stage.
#[allow(clippy::too_many_arguments)]
pub fn conv(
    g: &ConvGeom,
    weights: &[i8],
    bias: &[i32],
    zp: u8,
    stage: &OutputStage,
    input: &[u8],
    n: usize,
    out: &mut [u8],
) {
    let mut acc = vec![0i32; out.len()];
    conv_acc(g, weights, bias, zp, input, n, &mut acc);
    for (i, (o, &a)) in out.iter_mut().zip(&acc).enumerate() {
        *o = stage.code(i % g.out_c, a);
    }
}

/// Inlined into the SIMD builds of [`super::add`], which are this loop auto-vectorised.
#[inline]
pub fn add(p: &AddParams, a: &[u8], b: &[u8], out: &mut [u8]) {
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = p.apply(x, y);
    }
}

/// Calls `f(oy, ox, cells)` for every output position of `g`, where `cells` lists the
/// in-bounds input pixels `(iy, ix)` of that window.
fn for_each_window(g: &PoolGeom, mut f: impl FnMut(usize, usize, &[(usize, usize)])) {
    let mut cells = Vec::with_capacity(g.k_h * g.k_w);
    for oy in 0..g.out_h() {
        for ox in 0..g.out_w() {
            cells.clear();
            for ky in 0..g.k_h {
                for kx in 0..g.k_w {
                    let iy = input_coord(oy, ky, g.stride_h, 1, g.pad_t, g.in_h);
                    let ix = input_coord(ox, kx, g.stride_w, 1, g.pad_l, g.in_w);
                    if let (Some(iy), Some(ix)) = (iy, ix) {
                        cells.push((iy, ix));
                    }
                }
            }
            f(oy, ox, &cells);
        }
    }
}

pub fn max_pool(g: &PoolGeom, input: &[u8], n: usize, out: &mut [u8]) {
    let out_w = g.out_w();
    for img in 0..n {
        let x = &input[img * g.in_len()..][..g.in_len()];
        let y = &mut out[img * g.out_len()..][..g.out_len()];
        for_each_window(g, |oy, ox, cells| {
            let o = &mut y[(oy * out_w + ox) * g.c..][..g.c];
            // Codes are >= 0, so 0 is the identity of max (and the all-padding answer).
            o.fill(0);
            for &(iy, ix) in cells {
                let v = &x[(iy * g.in_w + ix) * g.c..][..g.c];
                for (o, &v) in o.iter_mut().zip(v) {
                    *o = (*o).max(v);
                }
            }
        });
    }
}

pub fn avg_pool(
    g: &PoolGeom,
    count_include_pad: bool,
    pad_value: u8,
    input: &[u8],
    n: usize,
    out: &mut [u8],
) {
    let out_w = g.out_w();
    let window = (g.k_h * g.k_w) as u32;
    let mut sums = vec![0u32; g.c];
    for img in 0..n {
        let x = &input[img * g.in_len()..][..g.in_len()];
        let y = &mut out[img * g.out_len()..][..g.out_len()];
        for_each_window(g, |oy, ox, cells| {
            let (start, count) = if count_include_pad {
                // Floor-mode windows lie inside the padded image, so they always hold
                // k_h * k_w cells.
                (u32::from(pad_value) * (window - cells.len() as u32), window)
            } else {
                (0, cells.len() as u32)
            };
            sums.fill(start);
            for &(iy, ix) in cells {
                let v = &x[(iy * g.in_w + ix) * g.c..][..g.c];
                for (s, &v) in sums.iter_mut().zip(v) {
                    *s += u32::from(v);
                }
            }
            let o = &mut y[(oy * out_w + ox) * g.c..][..g.c];
            for (o, &s) in o.iter_mut().zip(&sums) {
                // An empty window (possible only without the padding count) gives pad_value.
                *o = (s + count / 2)
                    .checked_div(count)
                    .map_or(pad_value, |v| v as u8);
            }
        });
    }
}

pub fn global_avg_pool(h: usize, w: usize, c: usize, input: &[u8], n: usize, out: &mut [u8]) {
    let plane = h * w;
    let count = plane as u64;
    let mut sums = vec![0u64; c];
    for img in 0..n {
        let x = &input[img * plane * c..][..plane * c];
        sums.fill(0);
        for pixel in x.chunks_exact(c.max(1)) {
            for (s, &v) in sums.iter_mut().zip(pixel) {
                *s += u64::from(v);
            }
        }
        for (o, &s) in out[img * c..][..c].iter_mut().zip(&sums) {
            *o = (s + count / 2).checked_div(count).map_or(0, |v| v as u8);
        }
    }
}
