//! Fitness of candidate networks that differ from a base network in a few variables.
//!
//! This is the work a worker does for one job, kept here (and free of networking) so that
//! tests can compare a cluster's answer with a single-process evaluation. It runs the base
//! network once per batch and, for each candidate, recomputes only from the first layer
//! the candidate changes — the reuse that makes layer-local groups cheap. Candidates
//! identical to the base or to an earlier candidate are not evaluated twice. Where a
//! candidate changes few weights of that first layer, the layer itself is not recomputed
//! either: its output is the base output with the changed channels updated by the sparse
//! weight delta ([`kernels::DeltaBase`]), from accumulators computed once per batch.
//!
//! Every [`Strategy`] gives bit-identical results; they differ only in speed, and exist
//! side by side so that tests and the `candidates` benchmark can compare them.

use crate::kernels::{ConvGeom, DeltaBase, WeightChange};
use crate::qnet::{Activations, EvalStats, QNetwork, QOp, Targets, VarKind};
use crate::{Error, Result};

/// How [`evaluate_candidates_with`] computes each candidate. All give the same bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// A full forward pass per candidate, duplicates included: the baseline.
    Naive,
    /// The base network once per batch; each candidate from its first changed layer;
    /// candidates equal to the base or to an earlier one are not recomputed.
    Prefix,
    /// [`Strategy::Prefix`], and the first changed layer updated by the sparse weight
    /// delta where [`delta_pays_off`] says that is cheaper than recomputing it.
    Delta,
    /// [`Strategy::Delta`] with the delta always used (for tests and measurements).
    DeltaAlways,
}

/// Per candidate, its loss/accuracy on the `n` CHW images, in candidate order.
///
/// `group_vars` are the variables every candidate sets; `candidates[c][j]` is candidate
/// c's code for `group_vars[j]`. Images are split across `threads` threads; per-image
/// results do not depend on the split, so neither do the sums.
pub fn evaluate_candidates(
    base: &QNetwork,
    pixels: &[u8],
    targets: &Targets,
    group_vars: &[u32],
    candidates: &[Vec<i8>],
    threads: usize,
) -> Result<Vec<EvalStats>> {
    evaluate_candidates_with(
        base,
        pixels,
        targets,
        group_vars,
        candidates,
        threads,
        Strategy::Delta,
    )
}

/// [`evaluate_candidates`] with an explicit [`Strategy`].
pub fn evaluate_candidates_with(
    base: &QNetwork,
    pixels: &[u8],
    targets: &Targets,
    group_vars: &[u32],
    candidates: &[Vec<i8>],
    threads: usize,
    strategy: Strategy,
) -> Result<Vec<EvalStats>> {
    let n = targets.len();
    let classes = base.num_classes;
    targets.check(classes)?;
    let il = base.image_len();
    if pixels.len() != n * il {
        return Err(Error::setting(
            "images",
            pixels.len(),
            format!("expected {n} images of {il} pixels"),
        ));
    }
    let plans = build_plans(base, group_vars, candidates, strategy)?;
    if let Some(b) = &targets.block {
        let mut last = 0;
        for &v in group_vars {
            let l = &base.layers[base.layer_of(v as usize)];
            if l.kind == VarKind::Clip {
                // Moving a clip rescales its readers, which may lie past the block.
                return Err(Error::setting(
                    "group_vars",
                    v,
                    "is an activation clip, which a block-local fitness cannot score",
                ));
            }
            last = last.max(l.node);
        }
        base.check_block(b, n, last)?;
    }
    let threads = threads.clamp(1, n.max(1));
    let per = n.div_ceil(threads).max(1);
    let mut totals = vec![EvalStats::default(); candidates.len()];
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n.div_ceil(per))
            .map(|t| {
                let (lo, hi) = (t * per, ((t + 1) * per).min(n));
                let plans = &plans;
                scope.spawn(move || {
                    let targets = targets.slice(lo, hi, classes);
                    eval_chunk(base, &pixels[lo * il..hi * il], &targets, plans)
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

/// Whether updating a layer of geometry `g` by `changes` (sorted by output channel) is
/// expected to be cheaper than recomputing it, per candidate (the per-batch setup of
/// [`DeltaBase`] is not counted: a generation spreads it over its candidates).
///
/// A cost model with measured weights (`cargo bench -p ccq-search --bench candidates`
/// prints the table they come from: ResNet-20's layers, AVX-512 VNNI, one thread). The
/// delta costs one multiply-add per changed weight and output position (about 5x more
/// for strided layers, which go row by row) and a requantization, scatter and later
/// restore per output position of each touched channel; the full layer costs a fixed
/// amount per output plus one per multiply-accumulate.
pub fn delta_pays_off(g: &ConvGeom, changes: &[WeightChange]) -> bool {
    let (delta, full) = delta_pays_off_costs(g, changes);
    delta < full
}

/// Per image, the sparse delta's and the full recompute's cost for one candidate.
fn delta_pays_off_costs(g: &ConvGeom, changes: &[WeightChange]) -> (usize, usize) {
    let positions = g.out_h() * g.out_w();
    let touched = 1 + changes.windows(2).filter(|w| w[0].oc != w[1].oc).count();
    let per_change = if g.stride_h == 1 && g.stride_w == 1 {
        DELTA_MAC_COST
    } else {
        DELTA_MAC_COST * DELTA_STRIDED_FACTOR
    };
    let delta = changes.len() * positions * per_change + touched * positions * DELTA_CHANNEL_COST;
    let full = g.out_len() * (FULL_OUTPUT_COST + g.k_len() * FULL_MAC_COST);
    (delta, full)
}

/// Whether the candidates of one job that [`delta_pays_off`] picks (`changes`: each
/// distinct candidate's changes to the layer, sorted by output channel) are cheaper by
/// the sparse delta than by recomputing the layer once the job's one-off cost is
/// counted: [`DeltaBase`] copies the layer's input into padded planes and, for a
/// stride-1 layer, computes the base accumulators of every channel a candidate touches,
/// one pass over a whole input plane per weight of the channel. Past a few channels that
/// costs more than the whole convolution: a search's groups are spread over a layer's
/// channels (ResNet-20's last layers: a group of 128 touches about 21 of 64 channels per
/// candidate and all of them over a generation), so there the job recomputes instead.
pub fn delta_pays_off_for_job(g: &ConvGeom, changes: &[Vec<WeightChange>]) -> bool {
    let picked: Vec<&Vec<WeightChange>> = (changes.iter())
        .filter(|c| !c.is_empty() && delta_pays_off(g, c))
        .collect();
    let mut touched: Vec<usize> = picked.iter().flat_map(|c| c.iter().map(|w| w.oc)).collect();
    touched.sort_unstable();
    touched.dedup();
    let padded = (g.in_h + g.pad_t + g.pad_b) * (g.in_w + g.pad_l + g.pad_r);
    let base = if g.stride_h == 1 && g.stride_w == 1 {
        touched.len() * g.k_len() * padded * DELTA_BASE_CELL_COST
    } else {
        // Strided layers take every channel from one full run, rearranged into planes.
        g.out_len() * (g.k_len() * FULL_MAC_COST + DELTA_ACC_PLANE_COST)
    };
    let setup = g.in_c * padded * DELTA_INPUT_CELL_COST + base;
    let (delta, full) = picked
        .iter()
        .map(|c| delta_pays_off_costs(g, c))
        .fold((setup, 0), |(d, f), (cd, cf)| (d + cd, f + cf));
    !picked.is_empty() && delta < full
}

// The weights of `delta_pays_off` and `delta_pays_off_for_job`, in picoseconds per image
// on the machine the tables were measured on (only their ratios matter). The last three:
// 2-core Intel Xeon (AVX-512 VNNI), 2026-12-06, ResNet-20 W4A8, 256 images.
const DELTA_MAC_COST: usize = 125;
const DELTA_STRIDED_FACTOR: usize = 5;
const DELTA_CHANNEL_COST: usize = 2300;
const FULL_OUTPUT_COST: usize = 190;
const FULL_MAC_COST: usize = 3;
/// Copying one padded input cell into the planes.
const DELTA_INPUT_CELL_COST: usize = 2000;
/// One weight's pass over one padded cell when a channel's base accumulators are built.
const DELTA_BASE_CELL_COST: usize = 105;
/// A strided layer's accumulator, rearranged into its plane.
const DELTA_ACC_PLANE_COST: usize = 4500;

/// What to run for one candidate.
enum Plan {
    /// Same codes as the base network.
    Base,
    /// Same codes as an earlier candidate.
    SameAs(usize),
    /// Full forward pass with these layers replaced ([`Strategy::Naive`]).
    Full {
        layers: Vec<(usize, QOp)>,
        /// The candidate's codes are the base network's.
        is_base: bool,
    },
    /// Recompute from node `first` with these layers replaced.
    Patched {
        first: usize,
        layers: Vec<(usize, QOp)>,
    },
    /// Node `first` by the sparse delta `changes` from the base; then recompute from
    /// `first + 1` with these (other) layers replaced.
    Delta {
        first: usize,
        changes: Vec<WeightChange>,
        layers: Vec<(usize, QOp)>,
    },
}

fn build_plans(
    base: &QNetwork,
    group_vars: &[u32],
    candidates: &[Vec<i8>],
    strategy: Strategy,
) -> Result<Vec<Plan>> {
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
        .map(|&v| base.var_code(v as usize))
        .collect();
    // Every candidate sets the same variables, so all share the first node they touch.
    let first = group_vars
        .iter()
        .map(|&v| base.first_node(v as usize))
        .min()
        .unwrap_or(0);
    let job = JobChanges {
        first,
        group_vars,
        layer_of: &layer_of,
        base_codes: &base_codes,
    };
    // Scale and clip changes move stages and biases, which the sparse delta (of weights,
    // at the base stage) does not see: jobs with them recompute from their first node.
    let weights_only = (layer_of.iter()).all(|&l| base.layers[l].kind == VarKind::Weights);
    let job_delta = weights_only && delta_pays_off_in_job(base, strategy, &job, candidates);
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
        }
        if strategy != Strategy::Naive {
            if *cand == base_codes {
                plans.push(Plan::Base);
                continue;
            }
            if let Some(prev) = candidates[..ci].iter().position(|c| c == cand) {
                plans.push(Plan::SameAs(prev));
                continue;
            }
        }
        let delta = match strategy {
            Strategy::Delta | Strategy::DeltaAlways if job_delta => {
                let changes = first_layer_changes(base, first, group_vars, &layer_of, cand);
                let geom = &base.conv(first).geom;
                (strategy == Strategy::DeltaAlways || delta_pays_off(geom, &changes))
                    .then_some(changes)
            }
            _ => None,
        };
        let skip = delta.as_ref().map(|_| first);
        let mut layers: Vec<(usize, QOp)> = Vec::new();
        let mut clips = Vec::new();
        for ((&v, &li), &code) in group_vars.iter().zip(&layer_of).zip(cand) {
            let lv = &base.layers[li];
            let i = v as usize - lv.offset;
            if lv.kind == VarKind::Clip {
                if base.clips[i].code != code {
                    clips.push((i, code));
                }
                continue;
            }
            if Some(lv.node) == skip {
                continue;
            }
            let slot = match layers.iter().position(|(node, _)| *node == lv.node) {
                Some(s) => s,
                None => {
                    layers.push((lv.node, base.nodes[lv.node].op.clone()));
                    layers.len() - 1
                }
            };
            if let QOp::Conv(c) = &mut layers[slot].1 {
                c.set_var(lv.kind, i, code);
            }
        }
        base.patch_clips(&clips, &mut layers);
        // Also a layer whose scales or clips alone changed (its packed weights are the
        // base's but for a clip's bias): such groups are a few of a cycle's, and one rule
        // is simpler than two.
        for (_, op) in &mut layers {
            if let QOp::Conv(c) = op {
                c.repack();
            }
        }
        plans.push(match (strategy, delta) {
            (Strategy::Naive, _) => Plan::Full {
                layers,
                is_base: *cand == base_codes,
            },
            (_, Some(changes)) => Plan::Delta {
                first,
                changes,
                layers,
            },
            (_, None) => Plan::Patched { first, layers },
        });
    }
    Ok(plans)
}

/// What [`delta_pays_off_in_job`] needs of a job besides its candidates.
struct JobChanges<'a> {
    /// The group's first layer (node).
    first: usize,
    group_vars: &'a [u32],
    layer_of: &'a [usize],
    base_codes: &'a [i8],
}

/// Whether a job's candidates may take the sparse delta at all: always under
/// [`Strategy::DeltaAlways`], never without a delta strategy, and under
/// [`Strategy::Delta`] when [`delta_pays_off_for_job`] says so for its distinct
/// candidates other than the base.
fn delta_pays_off_in_job(
    base: &QNetwork,
    strategy: Strategy,
    job: &JobChanges,
    candidates: &[Vec<i8>],
) -> bool {
    match strategy {
        Strategy::DeltaAlways => true,
        Strategy::Naive | Strategy::Prefix => false,
        Strategy::Delta => {
            let mut distinct: Vec<&Vec<i8>> = Vec::new();
            for c in candidates {
                if c.len() == job.group_vars.len()
                    && c[..] != *job.base_codes
                    && !distinct.contains(&c)
                {
                    distinct.push(c);
                }
            }
            if distinct.is_empty() {
                return false;
            }
            let changes: Vec<Vec<WeightChange>> = (distinct.iter())
                .map(|c| first_layer_changes(base, job.first, job.group_vars, job.layer_of, c))
                .collect();
            delta_pays_off_for_job(&base.conv(job.first).geom, &changes)
        }
    }
}

/// The weights of node `first` that `cand` changes, sorted by output channel.
fn first_layer_changes(
    base: &QNetwork,
    first: usize,
    group_vars: &[u32],
    layer_of: &[usize],
    cand: &[i8],
) -> Vec<WeightChange> {
    let conv = base.conv(first);
    let g = &conv.geom;
    let mut changes = Vec::new();
    for ((&v, &li), &code) in group_vars.iter().zip(layer_of).zip(cand) {
        let lv = &base.layers[li];
        if lv.node != first || lv.kind != VarKind::Weights {
            continue;
        }
        let i = v as usize - lv.offset;
        let old = conv.codes[i];
        if code == old {
            continue;
        }
        let [oc, ky, kx, ic] = g.weight_position(i);
        changes.push(WeightChange {
            oc,
            ky,
            kx,
            ic,
            delta: i32::from(code) - i32::from(old),
        });
    }
    changes.sort_by_key(|c| c.oc);
    changes
}

/// One layer's base state for delta plans on one batch.
struct DeltaCache {
    node: usize,
    base: DeltaBase,
    /// The layer's base output codes (hidden layers; empty for the logits layer).
    out: Vec<u8>,
    /// Channels in which the layer's value in the activations may differ from `out`
    /// (`None`: any), for [`DeltaBase::run`].
    stale: Option<Vec<usize>>,
}

fn eval_chunk(base: &QNetwork, pixels: &[u8], targets: &Targets, plans: &[Plan]) -> Vec<EvalStats> {
    let n = targets.len();
    // Residual adds fused into the convolutions before them, except where a delta plan
    // needs the convolution's own output (its cache, below).
    let keep = (plans.iter())
        .filter_map(|p| match p {
            Plan::Delta { first, .. } => Some(*first),
            _ => None,
        })
        .collect();
    let mut acts = Activations::fused(keep);
    acts.stop_after = targets.block.map(|b| b.node);
    let mut out: Vec<EvalStats> = Vec::with_capacity(plans.len());
    if plans.iter().all(|p| matches!(p, Plan::Full { .. })) {
        let mut results = Vec::with_capacity(plans.len());
        let mut base_at = None;
        for (i, plan) in plans.iter().enumerate() {
            if let Plan::Full { layers, is_base } = plan {
                base.forward_patched(pixels, n, layers, &mut acts);
                results.push(base.image_results(&acts, targets));
                if *is_base && base_at.is_none() {
                    base_at = Some(i);
                }
            }
        }
        // The paired spreads need the base network's losses: a candidate equal to it
        // has them, else one more forward.
        let base_losses: Vec<u64> = match base_at {
            Some(i) => results[i].iter().map(|r| r.0).collect(),
            None => {
                base.forward(pixels, n, &mut acts);
                (base.image_results(&acts, targets).iter())
                    .map(|r| r.0)
                    .collect()
            }
        };
        return (results.iter())
            .map(|r| EvalStats::tally(r, Some(&base_losses)))
            .collect();
    }
    base.forward(pixels, n, &mut acts);
    let base_results = base.image_results(&acts, targets);
    let base_losses: Vec<u64> = base_results.iter().map(|r| r.0).collect();
    let base_stats = EvalStats::tally(&base_results, Some(&base_losses));
    let score = |acts: &Activations| {
        EvalStats::tally(&base.image_results(acts, targets), Some(&base_losses))
    };
    // Built before any candidate overwrites the base values after its first layer.
    let mut caches: Vec<DeltaCache> = Vec::new();
    for plan in plans {
        if let Plan::Delta { first, .. } = plan {
            if caches.iter().all(|c| c.node != *first) {
                let node = &base.nodes[*first];
                let conv = base.conv(*first);
                caches.push(DeltaCache {
                    node: *first,
                    base: DeltaBase::new(conv.packed(), &acts.values[node.inputs[0]], n),
                    out: acts.values[*first + 1].clone(),
                    stale: Some(Vec::new()),
                });
            }
        }
    }
    let mut scratch = Vec::new();
    for plan in plans {
        let s = match plan {
            Plan::Base => base_stats,
            Plan::SameAs(prev) => out[*prev],
            Plan::Full { layers, .. } => {
                caches.iter_mut().for_each(|c| c.stale = None);
                base.forward_patched(pixels, n, layers, &mut acts);
                score(&acts)
            }
            Plan::Patched { first, layers } => {
                caches.iter_mut().for_each(|c| c.stale = None);
                base.forward_from(*first, layers, &mut acts);
                score(&acts)
            }
            Plan::Delta {
                first,
                changes,
                layers,
            } => {
                let cache = caches
                    .iter_mut()
                    .find(|c| c.node == *first)
                    .expect("a cache was built for every delta plan");
                let conv = base.conv(*first);
                match &conv.stage {
                    Some(stage) if first + 1 < base.nodes.len() => {
                        let mut values = std::mem::take(&mut acts.values[first + 1]);
                        values.resize(cache.out.len(), 0);
                        cache.base.run(
                            stage,
                            changes,
                            &cache.out,
                            &mut values,
                            &mut cache.stale,
                            &mut scratch,
                        );
                        acts.values[first + 1] = values;
                    }
                    _ => {
                        acts.logits.resize(n * base.num_classes, 0);
                        cache.base.run_acc(changes, &mut acts.logits);
                        base.requant_logits(&mut acts.logits);
                    }
                }
                base.forward_from(first + 1, layers, &mut acts);
                score(&acts)
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
    use crate::qnet::{BlockTarget, QOp, Teacher};
    use crate::quant::{quantize, Calibration, QuantConfig, Rounding, WeightScale};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const STRATEGIES: [Strategy; 4] = [
        Strategy::Naive,
        Strategy::Prefix,
        Strategy::Delta,
        Strategy::DeltaAlways,
    ];

    /// A fixture network (`name`.onnx, `channels` x `hw` x `hw` input) with its ONNX
    /// weights, quantized on random images, and random images and labels.
    fn fixture(
        name: &str,
        channels: usize,
        hw: usize,
        weight_bits: u8,
    ) -> (QNetwork, Vec<u8>, Vec<u8>) {
        let graph = crate::testutil::fixture_graph(name);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let n = 40;
        let il = channels * hw * hw;
        let pixels: Vec<u8> = (0..n * il).map(|_| rng.random()).collect();
        let labels: Vec<u8> = (0..n).map(|_| rng.random_range(0..10)).collect();
        let cfg = QuantConfig {
            weight_bits,
            act_bits: 8,
            calibration: Calibration::Max,
            weight_scale: WeightScale::Max,
            rounding: Rounding::Nearest,
            bias_correction: false,
            first_last_bits: None,
            channel_scale_step: None,
            act_clip_step: None,
        };
        let net = quantize(
            &graph,
            &Normalization {
                mean: vec![0.45; channels],
                std: vec![0.25; channels],
            },
            &pixels,
            n,
            &cfg,
        )
        .unwrap();
        (net, pixels, labels)
    }

    /// The random-weight MNIST-shaped CNN fixture, quantized on random images.
    fn fixture_net(weight_bits: u8) -> (QNetwork, Vec<u8>, Vec<u8>) {
        fixture("mnist_cnn", 1, 28, weight_bits)
    }

    /// The context's codes for `vars`, then `count` random candidates that change each
    /// variable with probability `p_change`, then a duplicate of candidate 2.
    fn candidates_for(
        net: &QNetwork,
        vars: &[u32],
        count: usize,
        p_change: f64,
        rng: &mut ChaCha8Rng,
    ) -> Vec<Vec<i8>> {
        let context = net.codes();
        let mut candidates = vec![vars
            .iter()
            .map(|&v| context[v as usize])
            .collect::<Vec<i8>>()];
        for _ in 0..count {
            candidates.push(
                vars.iter()
                    .map(|&v| {
                        let info = net.var_info(v as usize).unwrap();
                        if rng.random_bool(p_change) {
                            rng.random_range(info.lo..=info.hi)
                        } else {
                            context[v as usize]
                        }
                    })
                    .collect(),
            );
        }
        candidates.push(candidates[2].clone());
        candidates
    }

    /// Asserts that every strategy, at 1 and 3 threads, gives each candidate exactly the
    /// fitness of a from-scratch evaluation of the whole network with the candidate's
    /// codes written in: scored by cross-entropy on the labels and by distillation
    /// against a (random) teacher.
    fn assert_all_strategies_exact(
        net: &QNetwork,
        pixels: &[u8],
        labels: &[u8],
        vars: &[u32],
        candidates: &[Vec<i8>],
    ) {
        let mut rng = ChaCha8Rng::seed_from_u64(labels.len() as u64);
        let logits: Vec<f32> = (0..labels.len() * net.num_classes)
            .map(|_| rng.random_range(-6.0..6.0))
            .collect();
        let distill = Targets {
            block: None,
            labels,
            teacher: Some(Teacher {
                logits: &logits,
                temperature: 2.0,
            }),
        };
        // Block-local: the end of the block holding the group's last layer, against
        // random codes, where the group lies before the last block (and moves no clip,
        // which a block cannot score).
        let last = (vars.iter())
            .map(|&v| net.layers[net.layer_of(v as usize)].node)
            .max()
            .unwrap_or(0);
        let clips =
            (vars.iter()).any(|&v| net.layers[net.layer_of(v as usize)].kind == VarKind::Clip);
        let end = net.block_end(last).filter(|_| !clips);
        let codes: Vec<u8> = end.map_or(Vec::new(), |e| {
            (0..labels.len() * net.nodes[e].out.len())
                .map(|_| rng.random())
                .collect()
        });
        let block = end.map(|node| Targets {
            block: Some(BlockTarget {
                node,
                codes: &codes,
            }),
            ..Targets::labels(labels)
        });
        for targets in [Targets::labels(labels), distill].into_iter().chain(block) {
            let context = net.codes();
            let mut acts = Activations::default();
            net.forward(pixels, labels.len(), &mut acts);
            let base_losses: Vec<u64> = (net.image_results(&acts, &targets).iter())
                .map(|r| r.0)
                .collect();
            let want: Vec<EvalStats> = candidates
                .iter()
                .map(|cand| {
                    let mut codes = context.clone();
                    for (&v, &x) in vars.iter().zip(cand) {
                        codes[v as usize] = x;
                    }
                    let mut full = net.clone();
                    full.set_codes(&codes).unwrap();
                    full.forward(pixels, labels.len(), &mut acts);
                    let results = full.image_results(&acts, &targets);
                    let s = EvalStats::tally(&results, Some(&base_losses));
                    assert_eq!(
                        (s.loss_fixed, s.correct, s.images),
                        {
                            let t = full.stats(&acts, &targets);
                            (t.loss_fixed, t.correct, t.images)
                        },
                        "the paired tally sums what stats sums"
                    );
                    s
                })
                .collect();
            // Without the context among them, the naive path scores the base itself.
            let without_context = &candidates[1..];
            for strategy in STRATEGIES {
                for threads in [1, 3] {
                    let got = evaluate_candidates_with(
                        net, pixels, &targets, vars, candidates, threads, strategy,
                    )
                    .unwrap();
                    assert_eq!(
                        got,
                        want,
                        "{strategy:?}, threads {threads}, vars {vars:?}, teacher {}, block {:?}",
                        targets.teacher.is_some(),
                        targets.block.map(|b| b.node)
                    );
                    let got = evaluate_candidates_with(
                        net,
                        pixels,
                        &targets,
                        vars,
                        without_context,
                        threads,
                        strategy,
                    )
                    .unwrap();
                    assert_eq!(got, want[1..], "{strategy:?} without the context");
                }
            }
            assert_eq!(want[0].paired_sq, 0, "the context against itself");
            assert!(
                want.iter().any(|s| s.paired_sq > 0),
                "some candidate's losses differ from the context's"
            );
        }
    }

    /// Each candidate's fitness equals a from-scratch evaluation of the whole network
    /// with the candidate's codes written in — prefix reuse, sparse deltas, patching and
    /// de-duplication change nothing — whether the group sits in the first layer (whose
    /// input has a non-zero zero point), the logits layer, or spans several layers.
    #[test]
    fn candidates_match_full_evaluation_of_patched_networks() {
        let (net, pixels, labels) = fixture_net(3);
        assert_ne!(
            net.conv(net.layers[0].node).input_zp,
            0,
            "affine input layer"
        );
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
            let candidates = candidates_for(&net, &vars, 5, 0.8, &mut rng);
            assert_all_strategies_exact(&net, &pixels, &labels, &vars, &candidates);
        }

        // One job over two layers (a joint group, as `eda` searches) whose candidates
        // change only the first layer, only the second (their sparse delta on the group's
        // first layer is then empty), or both.
        let second = net.layers[1].clone();
        let vars: Vec<u32> = (0..10)
            .chain(second.offset as u32..second.offset as u32 + 10)
            .collect();
        let context: Vec<i8> = vars.iter().map(|&v| net.codes()[v as usize]).collect();
        let flip = |c: i8, v: u32| {
            let info = net.var_info(v as usize).unwrap();
            if c < info.hi {
                c + 1
            } else {
                c - 1
            }
        };
        let moved = |layer_of_change: &dyn Fn(usize) -> bool| -> Vec<i8> {
            context
                .iter()
                .zip(&vars)
                .enumerate()
                .map(|(i, (&c, &v))| if layer_of_change(i) { flip(c, v) } else { c })
                .collect()
        };
        let candidates = vec![
            context.clone(),
            moved(&|i| i >= 10), // second layer only
            moved(&|i| i < 10),  // first layer only
            moved(&|i| i == 3 || i == 15),
            moved(&|i| i >= 12), // second layer again
        ];
        assert_all_strategies_exact(&net, &pixels, &labels, &vars, &candidates);
    }

    /// Residual fusion (used by every evaluation here) leaves the logits and every value
    /// but the fused convolutions' own outputs bit-identical to the plain forward pass,
    /// keeps the convolutions it is told to keep, and does fuse something in a residual
    /// network.
    #[test]
    fn residual_fusion_changes_no_value_it_keeps() {
        let (net, pixels, _) = fixture("tiny_resnet", 3, 16, 4);
        let n = pixels.len() / net.image_len();
        let mut plain = Activations::default();
        net.forward(&pixels, n, &mut plain);
        // Convolutions whose output only a residual add reads: right before it, or (in
        // the downsampling block) with the shortcut's Slice and Pad in between.
        let readers = |v: usize| net.nodes.iter().filter(move |x| x.inputs.contains(&v));
        let fusable: Vec<usize> = (0..net.nodes.len() - 1)
            .filter(|&i| matches!(net.nodes[i].op, QOp::Conv(_)))
            .filter(|&i| readers(i + 1).count() == 1)
            .filter(|&i| readers(i + 1).all(|x| matches!(x.op, QOp::Add(_))))
            .collect();
        assert_eq!(fusable.len(), 2, "the fixture has two residual adds");
        let add_of_second = (net.nodes.iter())
            .position(|x| x.inputs.contains(&(fusable[1] + 1)))
            .unwrap();
        assert!(add_of_second > fusable[1] + 1, "the shortcut lies between");
        let keep = vec![fusable[0]];
        let mut fused = Activations::fused(keep.clone());
        net.forward(&pixels, n, &mut fused);
        assert_eq!(fused.logits, plain.logits);
        for (v, (f, p)) in fused.values.iter().zip(&plain.values).enumerate() {
            let conv = v.checked_sub(1);
            if conv.is_some_and(|c| fusable.contains(&c) && !keep.contains(&c)) {
                assert!(
                    f.is_empty(),
                    "value {v} of a fused convolution is left empty"
                );
            } else {
                assert_eq!(f, p, "value {v}");
            }
        }
        // Recomputing from a fused convolution, from between it and its add, or from the
        // add after a kept one, gives the same logits again.
        for first in [fusable[1], fusable[1] + 1, add_of_second, fusable[0] + 1] {
            fused.logits.clear();
            net.forward_from(first, &[], &mut fused);
            assert_eq!(fused.logits, plain.logits, "from node {first}");
        }
    }

    /// The same on a small residual network (strided convs, Add, shortcut Slice/Pad), with
    /// a group in every layer: a block of consecutive variables (few output channels, as
    /// in a fresh search) and scattered ones (many channels, border taps included), each
    /// with sparse and dense candidates.
    #[test]
    fn candidates_match_full_evaluation_in_every_layer_of_a_resnet() {
        let (net, pixels, labels) = fixture("tiny_resnet", 3, 16, 4);
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for l in &net.layers {
            let (lo, len) = (l.offset as u32, l.len as u32);
            let block: Vec<u32> = (lo..lo + len.min(24)).collect();
            let scattered: Vec<u32> = (0..24)
                .map(|_| lo + rng.random_range(0..len))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            for vars in [block, scattered] {
                for p_change in [0.1, 1.0] {
                    let candidates = candidates_for(&net, &vars, 4, p_change, &mut rng);
                    assert_all_strategies_exact(&net, &pixels, &labels, &vars, &candidates);
                }
            }
        }
    }

    /// With channel scales, every layer's candidates — scale groups, weight groups (whose
    /// sparse delta must use the stage at the base's scale codes) and joint groups of both
    /// — score exactly as the whole patched network, in a residual network and from a
    /// base whose scale codes are not all 0.
    #[test]
    fn candidates_over_channel_scales_match_full_evaluation() {
        for (name, channels, hw) in [("tiny_resnet", 3, 16), ("mnist_cnn", 1, 28)] {
            let (mut net, pixels, labels) = fixture(name, channels, hw, 3);
            let weights = net.num_vars();
            net.add_channel_scales(0.125).unwrap();
            assert!(net.num_vars() > weights, "{name}: scale variables added");
            let mut rng = ChaCha8Rng::seed_from_u64(12);
            let moved: Vec<(u32, i8)> = (weights..net.num_vars())
                .step_by(3)
                .map(|v| {
                    let info = net.var_info(v).unwrap();
                    (v as u32, rng.random_range(info.lo..=info.hi))
                })
                .collect();
            net.apply_changes(&moved).unwrap();
            for l in net.layers.clone() {
                let (lo, len) = (l.offset as u32, l.len as u32);
                let vars: Vec<u32> = (lo..lo + len.min(24)).collect();
                let mut groups = vec![vars.clone()];
                if l.kind == VarKind::Scales {
                    // The same layer's weights beside its scales: one joint group.
                    let w = net.layers.iter().find(|w| w.node == l.node).unwrap();
                    groups.push((w.offset as u32..w.offset as u32 + 6).chain(vars).collect());
                }
                for vars in groups {
                    for p_change in [0.1, 1.0] {
                        let candidates = candidates_for(&net, &vars, 4, p_change, &mut rng);
                        assert_all_strategies_exact(&net, &pixels, &labels, &vars, &candidates);
                    }
                }
            }
        }
    }

    /// With activation clips (and channel scales), candidates that move clips alone, with
    /// the weights of the clip's producer, or with scales score exactly as the whole
    /// network with the candidate's codes written in: producers, readers, residual adds
    /// and fused convolutions all follow. From a base whose clips are not all at 0.
    #[test]
    fn candidates_over_activation_clips_match_full_evaluation() {
        for (name, channels, hw) in [("tiny_resnet", 3, 16), ("mnist_cnn", 1, 28)] {
            let (mut net, pixels, labels) = fixture(name, channels, hw, 3);
            let weights = net.num_vars();
            net.add_channel_scales(0.125).unwrap();
            let scales = net.num_vars();
            net.add_act_clips(0.0625).unwrap();
            let clips = net.clips.len();
            assert!(clips > 0, "{name}: clips added");
            let moved: Vec<(u32, i8)> = (scales..net.num_vars())
                .step_by(2)
                .map(|v| (v as u32, [3i8, -2][v % 2]))
                .collect();
            net.apply_changes(&moved).unwrap();
            let clip_vars: Vec<u32> = (scales as u32..net.num_vars() as u32).collect();
            let mut rng = ChaCha8Rng::seed_from_u64(14);
            let mut groups = vec![clip_vars.clone()];
            for (i, &v) in clip_vars.iter().enumerate() {
                let producer = net.clips[i].producer();
                let layer = net.layers.iter().find(|l| l.node == producer);
                let mut g: Vec<u32> = vec![v];
                if let Some(l) = layer {
                    // The producer's own weights and scales beside its clip.
                    g.extend(l.offset as u32..l.offset as u32 + 5);
                    let s = (net.layers.iter())
                        .find(|s| s.node == producer && s.kind == VarKind::Scales)
                        .unwrap();
                    g.extend(s.offset as u32..s.offset as u32 + 2);
                }
                // And a weight of a later layer.
                g.push(rng.random_range(0..weights as u32));
                g.sort_unstable();
                g.dedup();
                groups.push(g);
            }
            for vars in groups {
                for p_change in [0.3, 1.0] {
                    let candidates = candidates_for(&net, &vars, 4, p_change, &mut rng);
                    assert_all_strategies_exact(&net, &pixels, &labels, &vars, &candidates);
                }
            }
        }
    }

    /// The cost rule takes the delta for a few changed weights of a large layer and the
    /// full recompute when most of a layer changes.
    #[test]
    fn delta_rule_prefers_sparse_changes() {
        let g = ConvGeom {
            k_h: 3,
            k_w: 3,
            pad_t: 1,
            pad_l: 1,
            pad_b: 1,
            pad_r: 1,
            ..ConvGeom::dense(64, 64)
        };
        let g = ConvGeom {
            in_h: 8,
            in_w: 8,
            ..g
        };
        let change = |oc| WeightChange {
            oc,
            ky: 1,
            kx: 1,
            ic: 0,
            delta: 1,
        };
        let few: Vec<WeightChange> = (0..26).map(|i| change(i / 20)).collect();
        assert!(delta_pays_off(&g, &few));
        let all: Vec<WeightChange> = (0..g.out_c * g.k_len())
            .map(|i| change(i / g.k_len()))
            .collect();
        assert!(!delta_pays_off(&g, &all));

        // A job whose candidates stay in two channels pays for the delta's set-up; one
        // whose candidates each touch 21 channels (a search group spread over the layer,
        // all 64 channels over the job) does not, though each candidate alone would.
        let clustered = vec![few.clone(); 15];
        assert!(delta_pays_off_for_job(&g, &clustered));
        let spread: Vec<Vec<WeightChange>> = (0..15)
            .map(|c| {
                (0..21)
                    .map(|i| change((c * 21 + i) % 64))
                    .collect::<Vec<_>>()
            })
            .map(|mut v| {
                v.sort_by_key(|w| w.oc);
                v
            })
            .collect();
        assert!(spread.iter().all(|c| delta_pays_off(&g, c)));
        assert!(!delta_pays_off_for_job(&g, &spread));
        assert!(!delta_pays_off_for_job(&g, &[]), "no candidate, no delta");
    }

    /// With a teacher the loss is the distillation loss — zero against the network's
    /// own logits as teacher — while accuracy still counts the labels.
    #[test]
    fn distillation_scores_the_teacher_and_counts_the_labels() {
        let (net, pixels, labels) = fixture_net(2);
        let n = labels.len();
        let mut acts = Activations::default();
        net.forward(&pixels, n, &mut acts);
        let own: Vec<f32> = acts
            .logits
            .iter()
            .map(|&l| (l as f64 * net.logit_scale) as f32)
            .collect();
        let by_labels = net.stats(&acts, &Targets::labels(&labels));
        let teacher = |logits| Targets {
            block: None,
            labels: &labels,
            teacher: Some(Teacher {
                logits,
                temperature: 1.0,
            }),
        };
        let vs_self = net.stats(&acts, &teacher(&own));
        assert_eq!(
            (vs_self.correct, vs_self.images),
            (by_labels.correct, by_labels.images)
        );
        assert!(
            vs_self.loss_fixed <= n as u64,
            "{vs_self:?}: f32 rounding only"
        );
        let reversed: Vec<f32> = own.iter().map(|v| -v).collect();
        let vs_other = net.stats(&acts, &teacher(&reversed));
        assert!(vs_other.loss_fixed > 1000 * n as u64, "{vs_other:?}");
        assert_eq!(vs_other.correct, by_labels.correct);
    }

    #[test]
    fn bad_jobs_are_errors_not_panics() {
        let (net, pixels, labels) = fixture_net(2);
        let n = net.num_vars() as u32;
        let e = evaluate_candidates(
            &net,
            &pixels,
            &Targets::labels(&labels),
            &[n],
            &[vec![0]],
            1,
        )
        .unwrap_err();
        assert!(e.to_string().contains("group_vars"), "{e}");
        let e = evaluate_candidates(
            &net,
            &pixels,
            &Targets::labels(&labels),
            &[0, 1],
            &[vec![0]],
            1,
        )
        .unwrap_err();
        assert!(e.to_string().contains("candidate"), "{e}");
        let e = evaluate_candidates(
            &net,
            &pixels,
            &Targets::labels(&labels),
            &[0],
            &[vec![5]],
            1,
        )
        .unwrap_err();
        assert!(e.to_string().contains("allows [-2, 1]"), "{e}");
        let e = evaluate_candidates(
            &net,
            &pixels[1..],
            &Targets::labels(&labels),
            &[0],
            &[vec![0]],
            1,
        )
        .unwrap_err();
        assert!(e.to_string().contains("images"), "{e}");
        // A teacher from the network: wrong length, a non-finite logit, a bad temperature.
        let classes = net.num_classes;
        let good = vec![0.5f32; labels.len() * classes];
        let mut nan = good.clone();
        nan[3] = f32::NAN;
        for (logits, temperature, says) in [
            (&good[1..], 1.0, "classes"),
            (&nan[..], 1.0, "logit 3 is not finite"),
            (&good[..], 0.0, "temperature"),
            (&good[..], f32::INFINITY, "temperature"),
        ] {
            let t = Targets {
                block: None,
                labels: &labels,
                teacher: Some(Teacher {
                    logits,
                    temperature,
                }),
            };
            let e = evaluate_candidates(&net, &pixels, &t, &[0], &[vec![0]], 1).unwrap_err();
            assert!(e.to_string().contains(says), "{e}");
        }
        // Block targets from the network: a block that ends at the logits or before the
        // group's layer, codes of another length per image or not whole images.
        let n = labels.len();
        let (first, second) = (net.layers[0].node, net.layers[1].node);
        let per = |node: usize| net.nodes[node].out.len();
        let codes = vec![0u8; n * per(second) + n * per(first)];
        let in_second = net.layers[1].offset as u32;
        for (node, len, var, says) in [
            (second, n * per(second), 0, ""),
            (net.nodes.len() - 1, n * per(second), 0, "block end"),
            (first, n * per(first), in_second, "block end"),
            (first, n * per(second), 0, "block targets"),
            (second, n * per(second) + 1, 0, "block targets"),
        ] {
            let t = Targets {
                block: Some(BlockTarget {
                    node,
                    codes: &codes[..len],
                }),
                ..Targets::labels(&labels)
            };
            let r = evaluate_candidates(&net, &pixels, &t, &[var], &[vec![0]], 1);
            match says {
                "" => assert!(r.is_ok(), "a later block end scores: {r:?}"),
                _ => assert!(
                    r.unwrap_err().to_string().contains(says),
                    "node {node}, {len}"
                ),
            }
        }
    }
}
