//! Fitness of candidate networks that differ from a base network in a few variables.
//!
//! This is the work a worker does for one job, kept here (and free of networking) so that
//! tests can compare a cluster's answer with a single-process evaluation. It runs the base
//! network once per batch and, for each candidate, recomputes only from the first layer
//! the candidate changes — the reuse that makes layer-local groups cheap. Candidates
//! identical to the base or to an earlier candidate are not evaluated twice.

use crate::qnet::{Activations, EvalStats, QConv, QNetwork};
use crate::{Error, Result};

/// Per candidate, its loss/accuracy on the `n` CHW images, in candidate order.
///
/// `group_vars` are the variables every candidate sets; `candidates[c][j]` is candidate
/// c's code for `group_vars[j]`. Images are split across `threads` threads; per-image
/// results do not depend on the split, so neither do the sums.
pub fn evaluate_candidates(
    base: &QNetwork,
    pixels: &[u8],
    labels: &[u8],
    group_vars: &[u32],
    candidates: &[Vec<i8>],
    threads: usize,
) -> Result<Vec<EvalStats>> {
    let n = labels.len();
    let il = base.image_len();
    if pixels.len() != n * il {
        return Err(Error::setting(
            "images",
            pixels.len(),
            format!("expected {n} images of {il} pixels"),
        ));
    }
    let patches = build_patches(base, group_vars, candidates)?;
    let threads = threads.clamp(1, n.max(1));
    let per = n.div_ceil(threads).max(1);
    let mut totals = vec![EvalStats::default(); candidates.len()];
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n.div_ceil(per))
            .map(|t| {
                let (lo, hi) = (t * per, ((t + 1) * per).min(n));
                let patches = &patches;
                scope.spawn(move || {
                    eval_chunk(base, &pixels[lo * il..hi * il], &labels[lo..hi], patches)
                })
            })
            .collect();
        for h in handles {
            let part = h.join().expect("candidate evaluation thread panicked");
            for (t, p) in totals.iter_mut().zip(&part) {
                t.add(p);
            }
        }
    });
    Ok(totals)
}

/// What to run for one candidate.
enum Plan {
    /// Same codes as the base network.
    Base,
    /// Same codes as an earlier candidate.
    SameAs(usize),
    /// Recompute from node `first` with these layers replaced.
    Patched {
        first: usize,
        layers: Vec<(usize, QConv)>,
    },
}

fn build_patches(base: &QNetwork, group_vars: &[u32], candidates: &[Vec<i8>]) -> Result<Vec<Plan>> {
    let n = base.num_vars();
    if let Some(&v) = group_vars.iter().find(|&&v| v as usize >= n) {
        return Err(Error::setting(
            "group_vars",
            v,
            format!("the network has {n} variables"),
        ));
    }
    let layer_of: Vec<usize> = group_vars
        .iter()
        .map(|&v| base.layer_of(v as usize))
        .collect();
    let base_codes: Vec<i8> = group_vars
        .iter()
        .zip(&layer_of)
        .map(|(&v, &l)| {
            let lv = &base.layers[l];
            base.conv(lv.node).codes[v as usize - lv.offset]
        })
        .collect();
    let mut plans = Vec::with_capacity(candidates.len());
    for (ci, cand) in candidates.iter().enumerate() {
        if cand.len() != group_vars.len() {
            return Err(Error::setting(
                "candidate",
                ci,
                format!(
                    "has {} codes for {} group variables",
                    cand.len(),
                    group_vars.len()
                ),
            ));
        }
        if *cand == base_codes {
            plans.push(Plan::Base);
            continue;
        }
        if let Some(prev) = candidates[..ci].iter().position(|c| c == cand) {
            plans.push(Plan::SameAs(prev));
            continue;
        }
        let mut layers: Vec<(usize, QConv)> = Vec::new();
        for ((&v, &li), &code) in group_vars.iter().zip(&layer_of).zip(cand) {
            let lv = &base.layers[li];
            if code < lv.lo || code > lv.hi {
                return Err(Error::setting(
                    "candidate code",
                    code,
                    format!(
                        "variable {v} of layer '{}' allows [{}, {}]",
                        lv.name, lv.lo, lv.hi
                    ),
                ));
            }
            let slot = match layers.iter().position(|(node, _)| *node == lv.node) {
                Some(s) => s,
                None => {
                    layers.push((lv.node, base.conv(lv.node).clone()));
                    layers.len() - 1
                }
            };
            layers[slot].1.codes[v as usize - lv.offset] = code;
        }
        for (_, conv) in &mut layers {
            conv.repack();
        }
        let first = layers.iter().map(|(node, _)| *node).min().unwrap_or(0);
        plans.push(Plan::Patched { first, layers });
    }
    Ok(plans)
}

fn eval_chunk(base: &QNetwork, pixels: &[u8], labels: &[u8], plans: &[Plan]) -> Vec<EvalStats> {
    let mut acts = Activations::default();
    base.forward(pixels, labels.len(), &mut acts);
    let base_stats = base.stats(&acts, labels);
    let mut out: Vec<EvalStats> = Vec::with_capacity(plans.len());
    for plan in plans {
        let s = match plan {
            Plan::Base => base_stats,
            Plan::SameAs(prev) => out[*prev],
            Plan::Patched { first, layers } => {
                base.forward_from(*first, layers, &mut acts);
                base.stats(&acts, labels)
            }
        };
        out.push(s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Normalization;
    use crate::quant::{quantize, Calibration, QuantConfig};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The random-weight MNIST-shaped CNN fixture, quantized on random images.
    fn fixture_net(weight_bits: u8) -> (QNetwork, Vec<u8>, Vec<u8>) {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mnist_cnn.onnx");
        let graph = crate::onnx::load_onnx(&path).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let n = 40;
        let pixels: Vec<u8> = (0..n * 784).map(|_| rng.random()).collect();
        let labels: Vec<u8> = (0..n).map(|_| rng.random_range(0..10)).collect();
        let cfg = QuantConfig {
            weight_bits,
            act_bits: 8,
            calibration: Calibration::Max,
        };
        let net = quantize(
            &graph,
            &Normalization {
                mean: vec![0.13],
                std: vec![0.31],
            },
            &pixels,
            n,
            &cfg,
        )
        .unwrap();
        (net, pixels, labels)
    }

    /// Each candidate's fitness equals a from-scratch evaluation of the whole network
    /// with the candidate's codes written in — prefix reuse, patching and de-duplication
    /// change nothing — whether the group sits in one layer or spans several.
    #[test]
    fn candidates_match_full_evaluation_of_patched_networks() {
        let (net, pixels, labels) = fixture_net(3);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let n = net.num_vars() as u32;
        let last_layer = net.layers.last().unwrap().clone();
        let groups: Vec<Vec<u32>> = vec![
            (0..20).collect(),                                                   // first layer
            (last_layer.offset as u32..last_layer.offset as u32 + 30).collect(), // logits layer
            (0..40)
                .map(|_| rng.random_range(0..n))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect(),
        ];
        for vars in groups {
            let context: Vec<i8> = net.codes();
            let mut candidates = vec![vars
                .iter()
                .map(|&v| context[v as usize])
                .collect::<Vec<i8>>()];
            for _ in 0..5 {
                candidates.push(
                    vars.iter()
                        .map(|&v| {
                            let info = net.var_info(v as usize).unwrap();
                            rng.random_range(info.lo..=info.hi)
                        })
                        .collect(),
                );
            }
            candidates.push(candidates[2].clone()); // a duplicate
            for threads in [1, 3] {
                let got = evaluate_candidates(&net, &pixels, &labels, &vars, &candidates, threads)
                    .unwrap();
                for (c, cand) in candidates.iter().enumerate() {
                    let mut codes = context.clone();
                    for (&v, &x) in vars.iter().zip(cand) {
                        codes[v as usize] = x;
                    }
                    let mut full = net.clone();
                    full.set_codes(&codes).unwrap();
                    let want = full.evaluate(&pixels, &labels, 7, 1);
                    assert_eq!(got[c], want, "candidate {c}, threads {threads}");
                }
            }
        }
    }

    #[test]
    fn bad_jobs_are_errors_not_panics() {
        let (net, pixels, labels) = fixture_net(2);
        let n = net.num_vars() as u32;
        let e = evaluate_candidates(&net, &pixels, &labels, &[n], &[vec![0]], 1).unwrap_err();
        assert!(e.to_string().contains("group_vars"), "{e}");
        let e = evaluate_candidates(&net, &pixels, &labels, &[0, 1], &[vec![0]], 1).unwrap_err();
        assert!(e.to_string().contains("candidate"), "{e}");
        let e = evaluate_candidates(&net, &pixels, &labels, &[0], &[vec![5]], 1).unwrap_err();
        assert!(e.to_string().contains("allows [-2, 1]"), "{e}");
        let e = evaluate_candidates(&net, &pixels[1..], &labels, &[0], &[vec![0]], 1).unwrap_err();
        assert!(e.to_string().contains("images"), "{e}");
    }
}
