//! Searched activation clipping levels: one decision variable per activation tensor that
//! scales the tensor's quantization step (and so its clipping range) by `1 + k * step`.
//!
//! This module owns which tensors can carry such a variable and everything a change of
//! one recomputes. A tensor qualifies when a hidden convolution or a residual add writes
//! it and every reader is a hidden convolution or an add, possibly through ops that pass
//! codes on at the same scale (slices, padding, pooling, flatten): exactly the readers
//! whose integer parameters can be recomputed from the new scale. Moving clip `i` to code
//! `k` sets the tensor's scale to `base_scale * (1 + k * step)` and recomputes, from the
//! values at code 0:
//! - the producing convolution's requantization (divided by the multiplier) or the
//!   producing add's parameters;
//! - each reading convolution's bias codes (divided by it: its accumulators are at the
//!   input's scale) and requantization (multiplied by it);
//! - each reading add's parameters ([`AddParams::new`] from the values' scales, which is
//!   how quantization built them).
//!
//! The codes never change, so a candidate's accumulators do not either; only stages,
//! biases and add parameters move. Tensors read by anything else (the logits layer,
//! lookup tables, products, concatenations, clamps) keep their scale: their integer
//! parameters are tables or network-wide constants.

use serde::{Deserialize, Serialize};

use crate::kernels::AddParams;
use crate::qnet::{ChannelScales, ConvClip, LayerVars, QNetwork, QOp, VarKind};
use crate::{Error, Result};

/// The searched clipping level of one activation tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActClip {
    pub step: f64,
    /// Value ids that share the scale: the producer's output first, then the outputs of
    /// scale-preserving ops over them.
    pub values: Vec<usize>,
    /// The tensor's scale at code 0 (as quantized).
    pub base_scale: f64,
    /// The clip code `k`, in [`ChannelScales::code_range`] of `step`.
    pub code: i8,
}

impl ActClip {
    /// The node that writes the tensor.
    pub fn producer(&self) -> usize {
        self.values[0] - 1
    }

    /// The multiplier of code `k`: `1 + k * step`.
    pub fn multiplier(&self, k: i8) -> f64 {
        1.0 + f64::from(k) * self.step
    }

    /// The tensor's scale at code `k`.
    pub fn scale(&self, k: i8) -> f64 {
        self.base_scale * self.multiplier(k)
    }
}

/// Ops whose output is their input's codes rearranged or pooled, at the input's scale.
fn passes_scale(op: &QOp) -> bool {
    matches!(
        op,
        QOp::Slice { .. }
            | QOp::Pad { .. }
            | QOp::MaxPool(_)
            | QOp::AvgPool { .. }
            | QOp::GlobalAvgPool
            | QOp::Flatten
    )
}

impl QNetwork {
    /// The tensor node `p` writes, as a clip could cover it: its value ids (the output
    /// and every scale-preserving op's over it) and the nodes that read them otherwise,
    /// or `None` when the tensor does not qualify (see the module docs).
    fn clip_group(&self, p: usize) -> Option<(Vec<usize>, Vec<usize>)> {
        match &self.nodes.get(p)?.op {
            QOp::Conv(c) if c.stage.is_some() => {}
            QOp::Add(_) if self.add_follows_scales(p) => {}
            _ => return None,
        }
        let root = self.nodes[p].out;
        let mut values = vec![p + 1];
        let mut readers = Vec::new();
        let mut i = 0;
        while let Some(&v) = values.get(i) {
            i += 1;
            for (j, node) in self.nodes.iter().enumerate().skip(v) {
                if !node.inputs.contains(&v) {
                    continue;
                }
                let same_scale = node.out.scale == root.scale && node.out.zp == root.zp;
                match &node.op {
                    op if passes_scale(op) && same_scale && node.inputs.len() == 1 => {
                        values.push(j + 1)
                    }
                    QOp::Conv(c) if c.stage.is_some() => readers.push(j),
                    QOp::Add(_) if self.add_follows_scales(j) => readers.push(j),
                    _ => return None,
                }
            }
        }
        readers.sort_unstable();
        readers.dedup();
        (!readers.is_empty()).then_some((values, readers))
    }

    /// The nodes that read clip `clip`'s tensor (other than scale-preserving ops).
    pub fn clip_readers(&self, clip: &ActClip) -> Vec<usize> {
        (self.nodes.iter().enumerate())
            .filter(|(_, n)| n.inputs.iter().any(|v| clip.values.contains(v)))
            .filter(|(_, n)| !passes_scale(&n.op))
            .map(|(j, _)| j)
            .collect()
    }

    /// Adds a searched clipping level to every tensor that can carry one (see the module
    /// docs): one [`VarKind::Clip`] entry after all other variables, every code 0 (the
    /// network computes exactly what it did). `step` is the multiplier's step, in
    /// `(0, 0.5]`. A network in which no tensor qualifies is an error.
    pub fn add_act_clips(&mut self, step: f64) -> Result<()> {
        if !ChannelScales::valid_step(step) {
            return Err(Error::setting(
                "act_clip_step",
                step,
                "must lie in (0, 0.5]",
            ));
        }
        if !self.clips.is_empty() {
            return Err(Error::setting(
                "act_clip_step",
                step,
                "the network already has activation clips",
            ));
        }
        let groups: Vec<(Vec<usize>, Vec<usize>)> = (0..self.nodes.len())
            .filter_map(|p| self.clip_group(p))
            .collect();
        if groups.is_empty() {
            return Err(Error::setting(
                "act_clip_step",
                step,
                "no activation of this network can carry a clip: each is read by the \
                 logits layer, a table, a product or a concatenation",
            ));
        }
        for (values, readers) in groups {
            for &j in std::iter::once(&(values[0] - 1)).chain(&readers) {
                if let QOp::Conv(c) = &mut self.nodes[j].op {
                    if c.clip.is_none() {
                        let base_requant = match (&c.scales, &c.stage) {
                            (Some(s), _) => s.base.clone(),
                            (None, Some(stage)) => stage.requant.clone(),
                            (None, None) => unreachable!("clip_group admits staged layers"),
                        };
                        c.clip = Some(ConvClip {
                            base_requant,
                            base_bias: c.bias.clone(),
                            input: 1.0,
                            output: 1.0,
                        });
                        // The same values; a stage quantization did not normalise is
                        // stored as `Requant::from_real` gives it, as validation expects.
                        for oc in 0..c.geom.out_c {
                            c.restage_channel(oc);
                        }
                        c.repack();
                    }
                }
            }
            let base_scale = self.value(values[0]).scale;
            self.clips.push(ActClip {
                step,
                values,
                base_scale,
                code: 0,
            });
        }
        let (lo, hi) = ChannelScales::code_range(step);
        let offset = self.layers.last().map_or(0, |l| l.offset + l.len);
        let n = self.clips.len();
        self.layers.push(LayerVars {
            node: self.clips[0].producer(),
            kind: VarKind::Clip,
            name: "activations.clip".into(),
            offset,
            len: n,
            lo,
            hi,
            dims: [n, 1, 1, 1],
        });
        Ok(())
    }

    /// Rebuilt copies of the nodes that the clip changes `changes` (clip index, new code)
    /// alter, merged into `patches` (node, replacement op; a node already there is
    /// changed in place): producing and reading convolutions get the new multipliers,
    /// stages and biases (their packed weights are left for the caller to rebuild), adds
    /// their parameters from the new scales. Indices and codes must have been checked,
    /// and each clip named at most once.
    pub(crate) fn patch_clips(&self, changes: &[(usize, i8)], patches: &mut Vec<(usize, QOp)>) {
        let scale_of = |v: usize| {
            (changes.iter())
                .find(|(ci, _)| self.clips[*ci].values.contains(&v))
                .map_or(self.value(v).scale, |&(ci, k)| self.clips[ci].scale(k))
        };
        let mut touched = Vec::new();
        for &(ci, k) in changes {
            let clip = &self.clips[ci];
            let m = clip.multiplier(k);
            let p = clip.producer();
            touched.push(p);
            if let QOp::Conv(c) = self.patch(patches, p) {
                clip_of(c).output = m;
            }
            for j in self.clip_readers(clip) {
                touched.push(j);
                if let QOp::Conv(c) = self.patch(patches, j) {
                    clip_of(c).input = m;
                }
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for j in touched {
            let node = &self.nodes[j];
            let out = (scale_of(j + 1), node.out.zp);
            let ins: Vec<(f64, u8)> = (node.inputs.iter())
                .map(|&v| (scale_of(v), self.value(v).zp))
                .collect();
            match self.patch(patches, j) {
                QOp::Conv(c) => {
                    for oc in 0..c.geom.out_c {
                        c.restage_channel(oc);
                    }
                }
                QOp::Add(p) => {
                    let (a, b) = (ins[0], ins[1]);
                    *p = AddParams::new(
                        a.0,
                        i32::from(a.1),
                        b.0,
                        i32::from(b.1),
                        out.0,
                        i32::from(out.1),
                        p.min,
                        p.max,
                    );
                }
                _ => unreachable!("clips touch convolutions and adds only"),
            }
        }
    }

    /// The op of node `j` in `patches`, copied there from the network first if absent.
    fn patch<'a>(&self, patches: &'a mut Vec<(usize, QOp)>, j: usize) -> &'a mut QOp {
        let slot = match patches.iter().position(|(n, _)| *n == j) {
            Some(s) => s,
            None => {
                patches.push((j, self.nodes[j].op.clone()));
                patches.len() - 1
            }
        };
        &mut patches[slot].1
    }

    /// Moves clips to new codes in place (clip index, code; checked by the caller). A clip
    /// named more than once ends at its last code, as a variable set twice in turn would:
    /// change lists that span several network versions (a worker catching up, a
    /// measurement undoing changes) name one clip once per version that moved it.
    pub(crate) fn set_clips(&mut self, changes: &[(usize, i8)]) {
        let mut last: Vec<(usize, i8)> = Vec::with_capacity(changes.len());
        for &(ci, k) in changes.iter().rev() {
            if !last.iter().any(|&(c, _)| c == ci) {
                last.push((ci, k));
            }
        }
        let changes = &last[..];
        if changes.is_empty() {
            return;
        }
        let mut patches = Vec::new();
        self.patch_clips(changes, &mut patches);
        for &(ci, k) in changes {
            let clip = &mut self.clips[ci];
            clip.code = k;
            let scale = clip.scale(k);
            for v in clip.values.clone() {
                self.nodes[v - 1].out.scale = scale;
            }
        }
        for (j, mut op) in patches {
            if let QOp::Conv(c) = &mut op {
                c.repack();
            }
            self.nodes[j].op = op;
        }
    }

    /// The clips against the network: each covers the tensor its producer writes (as
    /// [`QNetwork::clip_group`] finds it), codes in range, the tensor at its scale, every
    /// producing or reading layer with the clip's multiplier and the stage and bias it
    /// gives, every add with the parameters the scales give; one variable entry for all.
    pub(crate) fn validate_clips(&self) -> std::result::Result<(), String> {
        let mut seen = Vec::new();
        for (i, clip) in self.clips.iter().enumerate() {
            let bad = |why: &str| Err(format!("activation clip {i}: {why}"));
            if !ChannelScales::valid_step(clip.step) || clip.step != self.clips[0].step {
                return bad("a step outside (0, 0.5] or unlike the others'");
            }
            let (lo, hi) = ChannelScales::code_range(clip.step);
            if clip.code < lo || clip.code > hi {
                return bad("a code outside its range");
            }
            if !(clip.base_scale.is_finite() && clip.base_scale > 0.0) {
                return bad("a base scale that is not a positive number");
            }
            let Some(&v0) = clip.values.first() else {
                return bad("no values");
            };
            // The group test compares each value's scale with the producer's, which a moved
            // clip changed for all of them alike, so it holds at any code.
            let group = (v0 >= 1 && v0 <= self.nodes.len()).then(|| self.clip_group(v0 - 1));
            let Some(Some((values, readers))) = group else {
                return bad("its tensor cannot carry a clip");
            };
            if values != clip.values || seen.iter().any(|v| values.contains(v)) {
                return bad("its values are not its producer's tensor, or another clip's");
            }
            seen.extend(values.iter().copied());
            let m = clip.multiplier(clip.code);
            for &v in &values {
                if self.nodes[v - 1].out.scale != clip.scale(clip.code) {
                    return bad("a value not at the clip's scale");
                }
            }
            for &j in std::iter::once(&clip.producer()).chain(&readers) {
                if let QOp::Conv(c) = &self.nodes[j].op {
                    let Some(cc) = &c.clip else {
                        return bad("a layer it touches has no clip multipliers");
                    };
                    let mult = if j == clip.producer() {
                        cc.output
                    } else {
                        cc.input
                    };
                    if mult != m {
                        return bad("a layer it touches has another multiplier");
                    }
                }
            }
        }
        // Every layer with clip multipliers: bases of the right length, multipliers of 1
        // where no clip covers the tensor, stage and bias as the multipliers give them.
        for (j, node) in self.nodes.iter().enumerate() {
            let QOp::Conv(c) = &node.op else {
                if let QOp::Add(_) = &node.op {
                    self.check_add(j)?;
                }
                continue;
            };
            let Some(cc) = &c.clip else { continue };
            let out_c = c.geom.out_c;
            let bad = |why: &str| Err(format!("layer '{}' clip: {why}", node.name));
            if cc.base_requant.len() != out_c
                || cc.base_bias.len() != out_c
                || cc.base_requant.iter().any(|r| !r.is_valid())
                || c.stage.is_none()
            {
                return bad("bases of the wrong length, invalid, or no output stage");
            }
            let mult_of = |v: usize| {
                (self.clips.iter())
                    .find(|cl| cl.values.contains(&v))
                    .map_or(1.0, |cl| cl.multiplier(cl.code))
            };
            if cc.input != mult_of(node.inputs[0]) || cc.output != mult_of(j + 1) {
                return bad("multipliers that no clip gives");
            }
            if let Some(s) = &c.scales {
                if s.base != cc.base_requant {
                    return bad("a base unlike its channel scales' base");
                }
            }
            let stage = c.stage.as_ref().expect("checked above");
            if (0..out_c).any(|oc| {
                Some(stage.requant[oc]) != c.rescaled_requant(oc)
                    || c.bias[oc] != c.rescaled_bias(oc)
            }) {
                return bad("a stage or bias unlike what the multipliers give");
            }
        }
        let entries: Vec<&LayerVars> = (self.layers.iter())
            .filter(|l| l.kind == VarKind::Clip)
            .collect();
        match (&entries[..], self.clips.first()) {
            ([], None) => Ok(()),
            ([l], Some(first)) => {
                let last = self.layers.last().map(|l| l.kind) == Some(VarKind::Clip);
                if !last
                    || l.len != self.clips.len()
                    || (l.lo, l.hi) != ChannelScales::code_range(first.step)
                    || l.node != first.producer()
                {
                    return Err("the clip entry of the variable map is inconsistent".into());
                }
                Ok(())
            }
            _ => Err("clips and clip entries of the variable map do not match".into()),
        }
    }

    /// An add whose inputs or output a clip covers has the parameters the scales give.
    fn check_add(&self, j: usize) -> std::result::Result<(), String> {
        let node = &self.nodes[j];
        let covered = |v: usize| self.clips.iter().any(|c| c.values.contains(&v));
        if !(node.inputs.iter().any(|&v| covered(v)) || covered(j + 1)) {
            return Ok(());
        }
        if !self.add_follows_scales(j) {
            return Err(format!(
                "add '{}' has parameters unlike its clipped scales give",
                node.name
            ));
        }
        Ok(())
    }

    /// Whether add node `j` has exactly the parameters [`AddParams::new`] gives for its
    /// values' scales (what quantization builds; a clip recomputes them so).
    fn add_follows_scales(&self, j: usize) -> bool {
        let node = &self.nodes[j];
        let (QOp::Add(p), [a, b]) = (&node.op, &node.inputs[..]) else {
            return false;
        };
        let (a, b, out) = (self.value(*a), self.value(*b), node.out);
        *p == AddParams::new(
            a.scale,
            i32::from(a.zp),
            b.scale,
            i32::from(b.zp),
            out.scale,
            i32::from(out.zp),
            p.min,
            p.max,
        )
    }
}

/// A layer's clip multipliers, which every layer a clip touches has.
fn clip_of(c: &mut crate::qnet::QConv) -> &mut ConvClip {
    c.clip
        .as_mut()
        .expect("layers a clip touches have clip multipliers")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Normalization;
    use crate::qnet::Activations;
    use crate::quant::{quantize, Calibration, QuantConfig, Rounding, WeightScale};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Fixture `name` (`channels` x `hw` x `hw` inputs) quantized at W4A8 on random
    /// images, with clips of step 1/8 unless `clips` is false; and 32 other images.
    fn fixture(name: &str, channels: usize, hw: usize, clips: bool) -> (QNetwork, Vec<u8>) {
        let graph = crate::testutil::fixture_graph(name);
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let il = channels * hw * hw;
        let calib: Vec<u8> = (0..48 * il).map(|_| rng.random()).collect();
        let test: Vec<u8> = (0..32 * il).map(|_| rng.random()).collect();
        let cfg = QuantConfig {
            weight_bits: 4,
            act_bits: 8,
            calibration: Calibration::Max,
            weight_scale: WeightScale::Max,
            rounding: Rounding::Nearest,
            bias_correction: false,
            first_last_bits: None,
            channel_scale_step: None,
            act_clip_step: clips.then_some(0.125),
        };
        let norm = Normalization {
            mean: vec![0.45; channels],
            std: vec![0.25; channels],
        };
        (quantize(&graph, &norm, &calib, 48, &cfg).unwrap(), test)
    }

    fn run(net: &QNetwork, images: &[u8]) -> Activations {
        let mut acts = Activations::default();
        net.forward(images, images.len() / net.image_len(), &mut acts);
        acts
    }

    fn clip_var(net: &QNetwork, i: usize) -> u32 {
        let l = net.layers.last().unwrap();
        assert_eq!(l.kind, VarKind::Clip);
        (l.offset + i) as u32
    }

    /// In a residual network every tensor but the one the logits layer reads gets a clip
    /// (block outputs through the downsampling shortcut's slice and pad included), each
    /// one variable after all others; at code 0 the network computes exactly what it did
    /// without them, and survives its binary form.
    #[test]
    fn clips_cover_every_tensor_whose_readers_can_follow() {
        let (plain, images) = fixture("tiny_resnet", 3, 16, false);
        let (net, _) = fixture("tiny_resnet", 3, 16, true);
        assert_eq!(net.num_vars(), plain.num_vars() + net.clips.len());
        let staged = (plain.nodes.iter())
            .filter(|n| {
                matches!(&n.op, QOp::Conv(c) if c.stage.is_some()) || matches!(n.op, QOp::Add(_))
            })
            .count();
        // Every staged layer and add writes a clipped tensor but the one that reaches the
        // logits layer (through global pooling).
        assert_eq!(net.clips.len(), staged - 1, "{:?}", net.clips);
        let logits_input = net.nodes.last().unwrap().inputs[0];
        assert!(net.clips.iter().all(|c| !c.values.contains(&logits_input)));
        assert!(
            net.clips.iter().any(|c| c.values.len() > 1),
            "a shortcut's slice and pad share their input's clip"
        );
        assert!(net.codes()[plain.num_vars()..].iter().all(|&k| k == 0));
        let (a, b) = (run(&plain, &images), run(&net, &images));
        assert_eq!(a.values, b.values);
        assert_eq!(a.logits, b.logits);
        let back = QNetwork::from_bytes(&net.to_bytes(), "test").unwrap();
        assert_eq!(back.clips, net.clips);
        assert_eq!(run(&back, &images).logits, b.logits);
        // Asking twice, or with a bad step, is refused.
        let mut again = net.clone();
        assert!(again.add_act_clips(0.125).is_err());
        assert!(plain.clone().add_act_clips(0.0).is_err());
        assert!(plain.clone().add_act_clips(0.75).is_err());
    }

    /// Moving one clip up (a coarser scale, a wider range) divides its producer's codes
    /// by the multiplier and leaves every reader computing nearly the same real values
    /// (its bias and requantization follow); moving it back restores the network
    /// exactly. For every clip of the residual network.
    #[test]
    fn a_clip_rescales_its_producer_and_its_readers_consistently() {
        let (net, images) = fixture("tiny_resnet", 3, 16, true);
        let before = run(&net, &images);
        for i in 0..net.clips.len() {
            let clip = net.clips[i].clone();
            let mut moved = net.clone();
            moved.apply_changes(&[(clip_var(&net, i), 2)]).unwrap();
            moved.validate("moved").unwrap();
            let m = clip.multiplier(2);
            assert_eq!(m, 1.25);
            for &v in &clip.values {
                assert_eq!(moved.value(v).scale, clip.base_scale * m);
            }
            let after = run(&moved, &images);
            let zp = i32::from(net.value(clip.values[0]).zp);
            let max = i32::from(u8::MAX);
            for (&old, &new) in before.values[clip.values[0]]
                .iter()
                .zip(&after.values[clip.values[0]])
            {
                let (old, new) = (i32::from(old) - zp, i32::from(new) - zp);
                // Codes the old scale clipped at the top may now lie below it.
                if old + zp < max && new + zp < max {
                    let real_new = f64::from(new) * m;
                    assert!(
                        (real_new - f64::from(old)).abs() <= 1.0 + m / 2.0,
                        "clip {i}: code {old} became {new} at x{m}"
                    );
                }
            }
            for j in net.clip_readers(&clip) {
                let (x, y) = (&before.values[j + 1], &after.values[j + 1]);
                let mean_diff = crate::testutil::mean_code_diff(x, y);
                assert!(
                    mean_diff < 1.0,
                    "clip {i}, reader {j}: mean code change {mean_diff}"
                );
            }
            let mut back = moved.clone();
            back.apply_changes(&[(clip_var(&net, i), 0)]).unwrap();
            let restored = run(&back, &images);
            assert_eq!(restored.values, before.values, "clip {i} back at 0");
            assert_eq!(restored.logits, before.logits);
            assert_same_rescaling(&back, &net);
        }
    }

    /// Every value's quantization, every layer's bias, stage and clip multipliers and
    /// every add's parameters are the same in `a` and `b`.
    fn assert_same_rescaling(a: &QNetwork, b: &QNetwork) {
        for (x, y) in a.nodes.iter().zip(&b.nodes) {
            assert_eq!(x.out, y.out, "{}", x.name);
            match (&x.op, &y.op) {
                (QOp::Conv(p), QOp::Conv(q)) => {
                    assert_eq!((&p.bias, &p.stage, &p.clip), (&q.bias, &q.stage, &q.clip))
                }
                (QOp::Add(p), QOp::Add(q)) => assert_eq!(p, q),
                _ => {}
            }
        }
    }

    /// Change lists that span several versions name a clip once per version that moved
    /// it: applied at once they give exactly the network that applying them one by one
    /// gives (a worker catching up, a measurement rebuilt by undoing changes), with
    /// weight and clip changes interleaved.
    #[test]
    fn a_clip_named_twice_ends_at_its_last_code() {
        let (net, images) = fixture("tiny_resnet", 3, 16, true);
        let (a, b) = (clip_var(&net, 3), clip_var(&net, 5));
        let steps: Vec<Vec<(u32, i8)>> = vec![
            vec![(a, 2), (7, 1)],
            vec![(b, -1), (a, -3)],
            vec![(7, -2), (a, 1), (b, 4)],
        ];
        let mut one_by_one = net.clone();
        for s in &steps {
            one_by_one.apply_changes(s).unwrap();
        }
        let mut at_once = net.clone();
        at_once.apply_changes(&steps.concat()).unwrap();
        at_once.validate("at once").unwrap();
        assert_eq!(at_once.codes(), one_by_one.codes());
        assert_eq!(at_once.clips, one_by_one.clips);
        assert_same_rescaling(&at_once, &one_by_one);
        assert_eq!(
            run(&at_once, &images).logits,
            run(&one_by_one, &images).logits
        );
    }

    /// A damaged clip is refused by name when a network is loaded.
    #[test]
    fn damaged_clips_are_refused() {
        let (mut net, _) = fixture("tiny_resnet", 3, 16, true);
        net.apply_changes(&[(clip_var(&net, 1), -3), (clip_var(&net, 2), 4)])
            .unwrap();
        net.validate("ok").unwrap();
        let damage: Vec<fn(&mut QNetwork)> = vec![
            |n| n.clips[1].code = 9,
            |n| n.clips[1].code = 0,
            |n| n.clips[2].base_scale *= 1.5,
            |n| n.clips[0].step = 0.25,
            |n| n.clips[0].values.push(1),
            |n| {
                let v = n.clips[1].values[0];
                n.nodes[v - 1].out.scale *= 1.01;
            },
            |n| {
                let j = (n.nodes.iter())
                    .position(|x| matches!(x.op, QOp::Add(_)))
                    .unwrap();
                if let QOp::Add(p) = &mut n.nodes[j].op {
                    p.a_mult += 1;
                }
            },
            |n| {
                let p = n.clips[2].producer();
                let j = if matches!(n.nodes[p].op, QOp::Conv(_)) {
                    p
                } else {
                    n.clip_readers(&n.clips[2].clone())[0]
                };
                if let QOp::Conv(c) = &mut n.nodes[j].op {
                    c.bias[0] += 1;
                }
            },
            |n| n.layers.last_mut().unwrap().len -= 1,
        ];
        for (i, hurt) in damage.iter().enumerate() {
            let mut bad = net.clone();
            hurt(&mut bad);
            assert!(bad.validate("damaged").is_err(), "damage {i} passed");
        }
    }
}
