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
