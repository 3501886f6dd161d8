//! Targets of the block-local fitness (`search.local_evaluations`): the float model's
//! output at the end of each block of an integer network, quantized as the integer
//! network quantizes its own value there.
//!
//! A block ends where the network has one value live ([`QNetwork::block_ends`]: after a
//! residual block's add, after every layer of a plain chain). A group of a block is then
//! scored by how far the integer network's codes at the block's end are from these
//! codes (`qnet::block_loss`), running the network only up to there. Stored as codes, a
//! target costs one byte per value of the block's output per image (ResNet-20 on
//! CIFAR-10: about 100 KB per image for all its blocks). The coordinator computes them
//! once per run with the float engine; workers receive a job's rows with the job, so
//! their inference stays integer-only.

use crate::model::{Graph, Normalization};
use crate::qnet::QNetwork;
use crate::quant::normalize;
use crate::{float, Error, Result};

/// The float graph's value that integer node `node` quantizes: the output of the float
/// node of the same name, whose shape must match. Where quantization fused a ReLU or Clip
/// into that node, the integer value's codes cover only the activation's range, so
/// quantizing the output before the activation clamps it to the activation's codes.
pub fn float_value(graph: &Graph, net: &QNetwork, node: usize) -> Result<usize> {
    let q = net
        .nodes
        .get(node)
        .ok_or_else(|| Error::setting("block end", node, "no such node"))?;
    let mut named = (graph.nodes.iter().enumerate()).filter(|(_, n)| n.name == q.name);
    let v = match (named.next(), named.next()) {
        (Some((i, _)), None) => i + 1,
        _ => {
            return Err(Error::setting(
                "block end",
                &q.name,
                "is not exactly one node of the float graph",
            ))
        }
    };
    let (s, o) = (graph.shape(v), &q.out);
    if (s.c, s.h, s.w) != (o.c, o.h, o.w) {
        return Err(Error::setting(
            "block end",
            &q.name,
            format!(
                "float value {}x{}x{} does not match the integer value {}x{}x{}",
                s.c, s.h, s.w, o.c, o.h, o.w
            ),
        ));
    }
    Ok(v)
}

/// Per node of `ends` (block ends of `net`), the float model's codes there for the `n`
/// CHW u8 images in `pixels`: `n * len` bytes, NHWC, image by image, each value
/// quantized with the integer value's scale and zero point and clamped to its codes.
/// Runs the float graph in chunks, so memory stays a few chunks' activations.
pub fn targets(
    graph: &Graph,
    norm: &Normalization,
    net: &QNetwork,
    ends: &[usize],
    pixels: &[u8],
    n: usize,
) -> Result<Vec<Vec<u8>>> {
    const CHUNK: usize = 32;
    let il = graph.input_shape.len();
    if pixels.len() != n * il {
        return Err(Error::setting(
            "images",
            pixels.len(),
            format!("expected {n} images of {il} pixels"),
        ));
    }
    let values = (ends.iter())
        .map(|&e| float_value(graph, net, e))
        .collect::<Result<Vec<_>>>()?;
    let max = ((1u32 << net.act_bits) - 1) as f64;
    let mut out: Vec<Vec<u8>> = (ends.iter())
        .map(|&e| Vec::with_capacity(n * net.nodes[e].out.len()))
        .collect();
    for lo in (0..n).step_by(CHUNK) {
        let m = CHUNK.min(n - lo);
        let input = normalize(norm, graph.input_shape, &pixels[lo * il..(lo + m) * il], m);
        let all = float::forward_all(graph, &input, m);
        for ((&e, &v), dst) in ends.iter().zip(&values).zip(&mut out) {
            let q = &net.nodes[e].out;
            let (plane, per) = (q.h * q.w, q.len());
            for img in all[v].chunks_exact(per) {
                for p in 0..plane {
                    for c in 0..q.c {
                        let x = f64::from(img[c * plane + p]);
                        let code = (x / q.scale).round() + f64::from(q.zp);
                        // NaN (a broken float model) maps to the zero point, as tables do.
                        dst.push(if code.is_nan() {
                            q.zp
                        } else {
                            code.clamp(0.0, max) as u8
                        });
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qnet::{block_loss, Activations, QOp};
    use crate::quant::{quantize, QuantConfig};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A fixture graph (`name`.onnx, `channels` x `hw` x `hw`), its normalization, and
    /// random images.
    fn fixture(name: &str, channels: usize, hw: usize) -> (Graph, Normalization, Vec<u8>) {
        let graph = crate::testutil::fixture_graph(name);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let pixels = (0..40 * channels * hw * hw).map(|_| rng.random()).collect();
        let norm = Normalization {
            mean: vec![0.45; channels],
            std: vec![0.25; channels],
        };
        (graph, norm, pixels)
    }

    fn quantized(g: &Graph, norm: &Normalization, pixels: &[u8], w: u8) -> QNetwork {
        quantize(g, norm, pixels, 40, &QuantConfig::new(w, 8)).unwrap()
    }

    /// A residual network's blocks end at its adds (never between a block's first
    /// convolution and its add); a plain chain's at every node but the logits; and every
    /// node maps to the first end at or after it, the last block to none.
    #[test]
    fn blocks_end_where_one_value_is_live() {
        let (g, norm, pixels) = fixture("tiny_resnet", 3, 16);
        let net = quantized(&g, &norm, &pixels, 8);
        let ends = net.block_ends();
        let adds: Vec<usize> = (0..net.nodes.len())
            .filter(|&i| matches!(net.nodes[i].op, QOp::Add(_)))
            .collect();
        assert_eq!(adds.len(), 2, "the fixture has two residual blocks");
        for &a in &adds {
            assert!(ends.contains(&a), "add {a} ends a block: {ends:?}");
            // The residual's other input was written before the block: no end between.
            let start = *net.nodes[a].inputs.iter().min().unwrap();
            assert!(
                !ends.iter().any(|&e| e + 1 > start && e < a),
                "no end inside the block of add {a} (from value {start}): {ends:?}"
            );
        }
        assert!(ends.iter().all(|&e| e + 1 < net.nodes.len()));
        for node in 0..net.nodes.len() {
            match net.block_end(node) {
                Some(e) => assert!(e >= node && ends.contains(&e)),
                None => assert!(ends.iter().all(|&e| e < node), "node {node}"),
            }
        }

        let (g, norm, pixels) = fixture("mnist_cnn", 1, 28);
        let net = quantized(&g, &norm, &pixels, 8);
        let chain: Vec<usize> = (0..net.nodes.len() - 1).collect();
        assert_eq!(
            net.block_ends(),
            chain,
            "a plain chain ends a block at every node"
        );
    }

    /// The targets are the float values quantized as the integer network's: laid out
    /// NHWC image by image; at 8-bit weights the network's own codes at every block end
    /// lie within about a code of them, and at 2 bits much farther, so the block loss
    /// measures quantization error.
    #[test]
    fn targets_are_the_float_block_outputs_in_the_networks_codes() {
        let (g, norm, pixels) = fixture("tiny_resnet", 3, 16);
        let n = 40;
        let w8 = quantized(&g, &norm, &pixels, 8);
        let w2 = quantized(&g, &norm, &pixels, 2);
        let ends = w8.block_ends();
        assert_eq!(ends, w2.block_ends());
        let t = targets(&g, &norm, &w8, &ends, &pixels, n).unwrap();
        // One element by hand: image 3, the first add's output, channel 1, position 2.
        let k = (ends.iter())
            .position(|&e| matches!(w8.nodes[e].op, QOp::Add(_)))
            .unwrap();
        let e = ends[k];
        let q = &w8.nodes[e].out;
        assert!(q.h * q.w > 2 && q.c > 1);
        let v = float_value(&g, &w8, e).unwrap();
        let input = normalize(&norm, g.input_shape, &pixels, n);
        let all = float::forward_all(&g, &input, n);
        let x = all[v][3 * q.len() + q.h * q.w + 2] as f64;
        let want = ((x / q.scale).round() + f64::from(q.zp)).clamp(0.0, 255.0) as u8;
        assert_eq!(t[k][3 * q.len() + 2 * q.c + 1], want);

        let mean_loss = |net: &QNetwork| -> Vec<f64> {
            let mut acts = Activations::default();
            net.forward(&pixels, n, &mut acts);
            (ends.iter().zip(&t))
                .map(|(&e, codes)| {
                    let per = net.nodes[e].out.len();
                    let total: u64 = (acts.values[e + 1].chunks_exact(per))
                        .zip(codes.chunks_exact(per))
                        .map(|(a, b)| block_loss(a, b))
                        .sum();
                    total as f64 / n as f64 / f64::from(1u32 << crate::qnet::LOSS_FRAC_BITS)
                })
                .collect()
        };
        let (l8, l2) = (mean_loss(&w8), mean_loss(&w2));
        for (k, (&a, &b)) in l8.iter().zip(&l2).enumerate() {
            assert!(a < 2.0, "8-bit weights, end {}: {a:.3} code^2", ends[k]);
            assert!(
                b > 2.0 * a,
                "2-bit weights, end {}: {b:.3} vs {a:.3}",
                ends[k]
            );
        }
    }

    /// Where a block ends on a value with a zero point (no ReLU after it: a mobile
    /// network's linear bottleneck) and with 4-bit activations, the targets still track
    /// the network's own codes and stay inside the activation's codes.
    #[test]
    fn targets_follow_zero_points_and_activation_bits() {
        let (g, norm, pixels) = fixture("mobile17", 3, 16);
        // Calibrated on 8 of the 40 images, so the others overshoot some ranges.
        let calib = &pixels[..8 * 3 * 16 * 16];
        for act_bits in [8, 4] {
            let net = quantize(&g, &norm, calib, 8, &QuantConfig::new(8, act_bits)).unwrap();
            let ends = net.block_ends();
            assert!(
                ends.iter().any(|&e| net.nodes[e].out.zp != 0),
                "a block ends on an affine value: {ends:?}"
            );
            let t = targets(&g, &norm, &net, &ends, &pixels, 40).unwrap();
            let mut acts = Activations::default();
            net.forward(&pixels, 40, &mut acts);
            let top = ((1u32 << act_bits) - 1) as u8;
            let maxima: Vec<u8> = t.iter().map(|c| *c.iter().max().unwrap()).collect();
            assert!(
                maxima.iter().all(|&m| m <= top),
                "{act_bits}-bit: {maxima:?}"
            );
            assert!(maxima.contains(&top), "some end saturates: {maxima:?}");
            for (&e, codes) in ends.iter().zip(&t) {
                let mean = crate::testutil::mean_code_diff(&acts.values[e + 1], codes);
                assert!(
                    mean < 1.0,
                    "{act_bits}-bit, end {e}: mean |code diff| {mean:.3}"
                );
            }
        }
    }

    /// A wrong number of pixels is an error, not a panic.
    #[test]
    fn targets_refuse_a_wrong_image_count() {
        let (g, norm, pixels) = fixture("mnist_cnn", 1, 28);
        let net = quantized(&g, &norm, &pixels, 8);
        let err = targets(&g, &norm, &net, &[0], &pixels[1..], 40).unwrap_err();
        assert!(err.to_string().contains("images"), "{err}");
    }
}
