//! The search model of ccq's training: a univariate estimation-of-distribution algorithm
//! (UMDA) over the integer weight codes, plus the cooperative-coevolution grouping that
//! decides which variables are searched together.
//!
//! This module owns only the algorithm state. The coordinator drives it: each cycle it
//! asks for [`EdaState::groups`], and for every group it [`EdaState::sample`]s a
//! population against the current global codes (the *context*), has workers score the
//! candidates, adopts the best one into the context when it beats the context, and feeds
//! the top-k back through [`EdaState::update`].
//!
//! # Search space
//! Variable `i` starts at the post-training code `q0_i` and may only take
//! `q0_i + d, d in [-r, r]`, clipped to its code range `[lo_i, hi_i]`. Its model is one
//! categorical distribution over those values, initialised with mass `p0` on `q0_i` and
//! the rest spread evenly over the other allowed values. A variable whose largest
//! probability (its *confidence*) reaches the freeze threshold is frozen at its mode: it is
//! left out of every later group, never updated, and always sampled as its mode.
//!
//! # Storage (the memory budget)
//! The issue budget is at most 16 bytes of coordinator state per variable, so that a
//! 25M-variable network fits well under 1 GB. Probabilities are therefore stored as
//! `u16` fixed point (`count / 65535`) in one flat row-major vector with `2r + 1` slots per
//! variable; slot `j` of variable `i` is the code `base_i + j`, and slots at or beyond the
//! number of allowed values (`span_i`) are always zero. Per variable that is
//! `2 (2r + 1) + 2` bytes: 8 at `r = 1`, 12 at `r = 2`, 16 at `r = 3`. Layer ids are stored
//! as runs of consecutive variables (one run per layer when, as in a [`ccq_common::qnet`]
//! weight vector, layers are contiguous), so they cost nothing per variable. A cycle's
//! groups add 4 bytes per free variable (`u32` indices) and the context 1 byte.
//!
//! Fixed point also makes every result exact and reproducible: rows always sum to
//! exactly 65535, sampling maps one `u32` of the caller's ChaCha stream to a slot with
//! integer arithmetic, and the only floating point (the update's targets, in `f64`) is
//! evaluated in a fixed order. Each update rounds a probability by less than 1/65535.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::ops::RangeInclusive;
use std::sync::Arc;

use rand::{Rng, RngCore};
use rand_chacha::ChaCha8Rng;
use serde::ser::{SerializeSeq, SerializeStruct};
use serde::{Deserialize, Serialize, Serializer};

use crate::{Error, Result};

/// Probability 1 in the fixed-point representation.
const ONE: u32 = u16::MAX as u32;

/// Largest supported search radius; it bounds the row width to 15 slots so per-row scratch
/// space can live on the stack.
pub const MAX_RADIUS: u8 = 7;
const MAX_WIDTH: usize = 2 * MAX_RADIUS as usize + 1;

/// Settings of the EDA and of the cooperative coevolution around it (the `[eda]` section
/// of the coordinator's configuration). Missing fields take their defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct EdaParams {
    /// Each variable may move at most this many codes away from its round-to-nearest
    /// code (1 to 7; codes outside the bit width are never allowed).
    pub radius: u8,
    /// Initial probability of the round-to-nearest code; the rest is shared equally by the
    /// other allowed codes (0 < p0 < 1).
    pub p0: f64,
    /// Learning rate of the update `p <- (1 - alpha) p + alpha freq`, where `freq` is a
    /// code's frequency among the `top_k` best candidates (0 < alpha <= 1).
    pub alpha: f64,
    /// A variable whose largest probability reaches this is frozen at its mode and never
    /// searched again.
    pub freeze_threshold: f64,
    /// Largest number of variables searched together (a group; always inside one layer).
    pub group_size: usize,
    /// Candidates per generation, the current network (the context) included.
    pub population: usize,
    /// How many of the best candidates feed the update (at most `population`).
    pub top_k: usize,
}

impl Default for EdaParams {
    fn default() -> Self {
        EdaParams {
            radius: 1,
            p0: 0.8,
            alpha: 0.5,
            freeze_threshold: 0.98,
            group_size: 128,
            population: 16,
            top_k: 4,
        }
    }
}

impl EdaParams {
    /// Rejects settings under which the algorithm cannot run.
    pub fn validate(&self) -> Result<()> {
        if self.radius == 0 || self.radius > MAX_RADIUS {
            return Err(Error::setting(
                "eda.radius",
                self.radius,
                format!("must be between 1 and {MAX_RADIUS}"),
            ));
        }
        // Written as negated ranges so that NaN is rejected too.
        if !(self.p0 > 0.0 && self.p0 < 1.0) {
            return Err(Error::setting(
                "eda.p0",
                self.p0,
                "must be strictly between 0 and 1",
            ));
        }
        if !(self.alpha > 0.0 && self.alpha <= 1.0) {
            return Err(Error::setting("eda.alpha", self.alpha, "must be in (0, 1]"));
        }
        if !(self.freeze_threshold > 0.0 && self.freeze_threshold <= 1.0) {
            return Err(Error::setting(
                "eda.freeze_threshold",
                self.freeze_threshold,
                "must be in (0, 1]",
            ));
        }
        if self.group_size == 0 {
            return Err(Error::setting(
                "eda.group_size",
                self.group_size,
                "must be at least 1",
            ));
        }
        if self.population < 2 {
            return Err(Error::setting(
                "eda.population",
                self.population,
                "must be at least 2 (candidate 0 is the current context)",
            ));
        }
        if self.top_k == 0 || self.top_k > self.population {
            return Err(Error::setting(
                "eda.top_k",
                self.top_k,
                format!("must be between 1 and the population ({})", self.population),
            ));
        }
        Ok(())
    }

    /// Slots per probability row.
    fn width(&self) -> usize {
        2 * usize::from(self.radius) + 1
    }

    /// The freeze threshold in fixed point: frozen iff `max count >= this`.
    fn freeze_count(&self) -> u32 {
        (self.freeze_threshold * f64::from(ONE)).ceil() as u32
    }
}

/// One decision variable as the quantized network describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variable {
    /// The round-to-nearest post-training code `q0`.
    pub initial: i8,
    /// Code range of the variable's layer, e.g. `[-8, 7]` for 4 bits.
    pub lo: i8,
    pub hi: i8,
    pub layer: u32,
}

/// Variables searched together in one step of a cycle. Groups of cooperative
/// coevolution lie in one layer so that workers can reuse every activation computed
/// before it; the joint group of EDA without CC spans layers, and `layer` is then the
/// first layer it touches (workers recompute from the first changed layer either way).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub layer: u32,
    /// Variable indices (least confident first for confidence-based groups).
    pub vars: Vec<u32>,
}

/// Confidence statistics of one layer, for progress plots.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerSummary {
    pub layer: u32,
    pub variables: usize,
    pub frozen: usize,
    pub mean_confidence: f64,
    /// `histogram[b]` counts variables with confidence in `[b / bins, (b + 1) / bins)`;
    /// the last bin also holds confidence 1.
    pub histogram: Vec<u64>,
}

/// Variables `start..` (up to the next run's start) belong to `layer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct LayerRun {
    start: usize,
    layer: u32,
}

/// The whole EDA state; serialisable for checkpoints (deserialising re-checks every
/// invariant, so a corrupted checkpoint is an error, not a later panic).
///
/// Cloning it is cheap and is how a checkpoint snapshots it: `base` and `span` never
/// change after construction and are shared; the probability rows are shared chunk by
/// chunk ([`Rows`]), and an update copies only a chunk a clone still holds. So the
/// checkpoint written off the event loop costs memory for what changes meanwhile, not a
/// second copy of the model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "StateRepr")]
pub struct EdaState {
    params: EdaParams,
    layer_runs: Vec<LayerRun>,
    /// Lowest allowed code of each variable.
    base: Arc<Vec<i8>>,
    /// Number of allowed codes of each variable (`1..=width`).
    span: Arc<Vec<u8>>,
    /// `width` fixed-point probabilities per variable, each row summing to [`ONE`].
    probs: Rows,
    /// Derived from `probs` and the threshold; kept to make the counts O(1).
    frozen: usize,
    /// Sum of every row's largest count, derived from `probs`; kept so that
    /// [`EdaState::mean_confidence`] is O(1) (the coordinator reports it every generation).
    confidence_total: u64,
}

/// The same fields, in the same order, as [`StateRepr`] reads: the derived values are not
/// saved.
impl Serialize for EdaState {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("EdaState", 5)?;
        st.serialize_field("params", &self.params)?;
        st.serialize_field("layer_runs", &self.layer_runs)?;
        st.serialize_field("base", self.base.as_slice())?;
        st.serialize_field("span", self.span.as_slice())?;
        st.serialize_field("probs", &self.probs)?;
        st.end()
    }
}

/// Rows per chunk of [`Rows`]: an update that must copy a shared chunk copies
/// `CHUNK_ROWS * width * 2` bytes (24 KB at radius 1).
const CHUNK_ROWS: usize = 4096;

/// Fixed-width rows of `u16`, stored in chunks of [`CHUNK_ROWS`] rows behind reference
/// counts: a clone copies no rows, and writing a row copies its chunk only if a clone
/// still shares it (copy on write). Serialised as one flat sequence, so the chunking is
/// invisible outside.
#[derive(Debug, Clone, PartialEq)]
struct Rows {
    width: usize,
    rows: usize,
    chunks: Vec<Arc<Vec<u16>>>,
}

impl Rows {
    fn new(width: usize) -> Rows {
        Rows {
            width,
            rows: 0,
            chunks: Vec::new(),
        }
    }

    /// `flat.len()` must be a multiple of `width`.
    fn from_flat(flat: &[u16], width: usize) -> Rows {
        Rows {
            width,
            rows: flat.len() / width,
            chunks: flat
                .chunks(CHUNK_ROWS * width)
                .map(|c| Arc::new(c.to_vec()))
                .collect(),
        }
    }

    /// Appends a row of zeros and returns it.
    fn push_zero_row(&mut self) -> &mut [u16] {
        let width = self.width;
        if self.rows.is_multiple_of(CHUNK_ROWS) {
            // The previous chunk is full: its capacity was exact.
            self.chunks
                .push(Arc::new(Vec::with_capacity(CHUNK_ROWS * width)));
        }
        self.rows += 1;
        let chunk = Arc::make_mut(self.chunks.last_mut().expect("a chunk was just ensured"));
        let start = chunk.len();
        chunk.resize(start + width, 0);
        &mut chunk[start..]
    }

    /// Releases the unused capacity of the last chunk (after the last push).
    fn shrink_to_fit(&mut self) {
        if let Some(last) = self.chunks.last_mut() {
            Arc::make_mut(last).shrink_to_fit();
        }
        self.chunks.shrink_to_fit();
    }

    fn row(&self, i: usize) -> &[u16] {
        let at = (i % CHUNK_ROWS) * self.width;
        &self.chunks[i / CHUNK_ROWS][at..at + self.width]
    }

    fn row_mut(&mut self, i: usize) -> &mut [u16] {
        let at = (i % CHUNK_ROWS) * self.width;
        &mut Arc::make_mut(&mut self.chunks[i / CHUNK_ROWS])[at..at + self.width]
    }

    /// Heap bytes held: the rows (capacities) and each chunk's reference count and
    /// vector header.
    fn heap_bytes(&self) -> usize {
        let per_chunk = 2 * std::mem::size_of::<usize>() + std::mem::size_of::<Vec<u16>>();
        self.chunks
            .iter()
            .map(|c| c.capacity() * std::mem::size_of::<u16>() + per_chunk)
            .sum::<usize>()
            + self.chunks.capacity() * std::mem::size_of::<Arc<Vec<u16>>>()
    }
}

impl Serialize for Rows {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.rows * self.width))?;
        for chunk in &self.chunks {
            for p in chunk.iter() {
                seq.serialize_element(p)?;
            }
        }
        seq.end()
    }
}

/// The serialised form of [`EdaState`], validated by `TryFrom` on the way in.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StateRepr {
    params: EdaParams,
    layer_runs: Vec<LayerRun>,
    base: Vec<i8>,
    span: Vec<u8>,
    probs: Vec<u16>,
}

impl EdaState {
    /// Builds the initial model for the variables `0..n` given in order.
    pub fn new(params: EdaParams, vars: impl IntoIterator<Item = Variable>) -> Result<Self> {
        params.validate()?;
        let width = params.width();
        let radius = i16::from(params.radius);
        let vars = vars.into_iter();
        let (hint, _) = vars.size_hint();
        let mut layer_runs = Vec::new();
        let mut bases = Vec::with_capacity(hint);
        let mut spans = Vec::with_capacity(hint);
        let mut probs = Rows::new(width);
        let mut targets = [0.0f64; MAX_WIDTH];
        for (i, v) in vars.enumerate() {
            if i > u32::MAX as usize {
                return Err(Error::setting(
                    "variables",
                    i + 1,
                    "more than 2^32 variables are not supported",
                ));
            }
            if v.lo > v.hi {
                return Err(Error::setting(
                    &format!("variables[{i}].lo"),
                    v.lo,
                    format!("is above hi = {}", v.hi),
                ));
            }
            if !(v.lo..=v.hi).contains(&v.initial) {
                return Err(Error::setting(
                    &format!("variables[{i}].initial"),
                    v.initial,
                    format!("is outside the code range [{}, {}]", v.lo, v.hi),
                ));
            }
            let q0 = i16::from(v.initial);
            let lo = (q0 - radius).max(i16::from(v.lo));
            let hi = (q0 + radius).min(i16::from(v.hi));
            let span = (hi - lo + 1) as usize;
            bases.push(lo as i8);
            spans.push(span as u8);
            if layer_runs.last().map(|r: &LayerRun| r.layer) != Some(v.layer) {
                layer_runs.push(LayerRun {
                    start: i,
                    layer: v.layer,
                });
            }

            let one = f64::from(ONE);
            let initial_slot = (q0 - lo) as usize;
            let rest = if span > 1 {
                (1.0 - params.p0) * one / (span - 1) as f64
            } else {
                0.0
            };
            for (j, t) in targets[..span].iter_mut().enumerate() {
                *t = if j != initial_slot {
                    rest
                } else if span > 1 {
                    params.p0 * one
                } else {
                    one
                };
            }
            apportion(&targets[..span], &mut probs.push_zero_row()[..span]);
        }
        probs.shrink_to_fit();
        let mut state = EdaState {
            params,
            layer_runs,
            base: Arc::new(bases),
            span: Arc::new(spans),
            probs,
            frozen: 0,
            confidence_total: 0,
        };
        if state.base.is_empty() {
            return Err(Error::setting(
                "variables",
                0,
                "the network has no decision variables",
            ));
        }
        state.frozen = state.count_frozen();
        state.confidence_total = state.sum_max_counts();
        Ok(state)
    }

    pub fn params(&self) -> &EdaParams {
        &self.params
    }

    /// Heap bytes held (capacities): the per-variable arrays and the layer runs. For
    /// memory accounting (`coordinator bench`). Parts shared with clones count in full.
    pub fn heap_bytes(&self) -> usize {
        self.base.capacity()
            + self.span.capacity()
            + self.probs.heap_bytes()
            + self.layer_runs.capacity() * std::mem::size_of::<LayerRun>()
    }

    pub fn num_variables(&self) -> usize {
        self.base.len()
    }

    /// The allowed codes of variable `i` (its restricted search space).
    /// Panics if `i` is out of range, like slice indexing.
    pub fn allowed_values(&self, i: usize) -> RangeInclusive<i8> {
        let lo = self.base[i];
        lo..=(i16::from(lo) + i16::from(self.span[i]) - 1) as i8
    }

    /// Probability of `code` for variable `i` (0 for codes outside its allowed values).
    pub fn probability(&self, i: usize, code: i8) -> f64 {
        match self.slot(i, code) {
            Some(j) => f64::from(self.row(i)[j]) / f64::from(ONE),
            None => 0.0,
        }
    }

    /// The most probable code of variable `i` (the lower code on a tie).
    pub fn mode(&self, i: usize) -> i8 {
        let row = &self.row(i)[..usize::from(self.span[i])];
        let mut best = 0;
        for (j, &p) in row.iter().enumerate() {
            if p > row[best] {
                best = j;
            }
        }
        self.code(i, best)
    }

    /// Largest probability of variable `i`.
    pub fn confidence(&self, i: usize) -> f64 {
        f64::from(self.max_count(i)) / f64::from(ONE)
    }

    pub fn is_frozen(&self, i: usize) -> bool {
        self.max_count(i) >= self.params.freeze_count()
    }

    pub fn frozen_count(&self) -> usize {
        self.frozen
    }

    pub fn free_count(&self) -> usize {
        self.num_variables() - self.frozen
    }

    /// Layer id of variable `i`.
    pub fn layer(&self, i: usize) -> u32 {
        assert!(i < self.num_variables(), "variable {i} out of range");
        let run = self.layer_runs.partition_point(|r| r.start <= i) - 1;
        self.layer_runs[run].layer
    }

    /// Mean confidence over all variables, frozen ones included.
    pub fn mean_confidence(&self) -> f64 {
        // Kept as an integer sum, so the result does not depend on the order of updates.
        self.confidence_total as f64 / (self.num_variables() as f64 * f64::from(ONE))
    }

    /// Per-layer confidence statistics, in ascending layer id; `bins` (at least 1) is the
    /// number of equal-width histogram bins over `[0, 1]`.
    pub fn layer_summaries(&self, bins: usize) -> Vec<LayerSummary> {
        let bins = bins.max(1);
        let freeze = self.params.freeze_count();
        let mut by_layer: BTreeMap<u32, (LayerSummary, u64)> = BTreeMap::new();
        for (run, range) in self.runs() {
            let (summary, total) = by_layer.entry(run.layer).or_insert_with(|| {
                let summary = LayerSummary {
                    layer: run.layer,
                    variables: 0,
                    frozen: 0,
                    mean_confidence: 0.0,
                    histogram: vec![0; bins],
                };
                (summary, 0)
            });
            for i in range {
                let count = self.max_count(i);
                summary.variables += 1;
                summary.frozen += usize::from(count >= freeze);
                *total += u64::from(count);
                let bin = (u64::from(count) * bins as u64 / u64::from(ONE)) as usize;
                summary.histogram[bin.min(bins - 1)] += 1;
            }
        }
        by_layer
            .into_values()
            .map(|(mut summary, total)| {
                summary.mean_confidence =
                    total as f64 / (summary.variables as f64 * f64::from(ONE));
                summary
            })
            .collect()
    }

    /// Partitions the free variables into one cycle's groups.
    ///
    /// One cycle's groups for confidence-based cooperative coevolution (the method).
    /// Repeatedly: take the least confident remaining free variable, and group the up to
    /// `group_size` least confident remaining free variables of its layer. Groups are
    /// returned in that order, their members least confident first.
    ///
    /// Ties between equally confident variables are broken by a random order drawn from
    /// `rng` (the top 16 bits of one `u32` per free variable, in index order; equal draws
    /// fall back to the index). Ties are the rule, not the exception: a fresh distribution gives every
    /// variable the same confidence p0, and a variable no group has reached yet keeps it.
    /// Breaking them by index would make the first cycle a static layer-by-layer sweep
    /// (measured: identical to `cc-layer`, and 1-4 points behind random groups on
    /// ResNet-20 at 20,000 evaluations); a random order spreads the early groups over the
    /// network, and confidence still decides as soon as it differs.
    ///
    /// Every layer's free variables are sorted once; a layer's remaining variables are
    /// then always a suffix of its sorted list, so the global least confident one is the
    /// smallest of the layers' fronts, kept in a heap. O(n log n) overall.
    pub fn groups(&self, rng: &mut ChaCha8Rng) -> Vec<Group> {
        let group_size = self.params.group_size;
        let freeze = self.params.freeze_count();
        let mut layer_ids: Vec<u32> = self.layer_runs.iter().map(|r| r.layer).collect();
        layer_ids.sort_unstable();
        layer_ids.dedup();

        // Key = (confidence count: 16 bits, random tie-break: 16, index: 32) packed so that
        // integer order is the grouping order; 8 bytes per free variable (the memory budget).
        let mut sorted: Vec<Vec<u64>> = vec![Vec::new(); layer_ids.len()];
        for (run, range) in self.runs() {
            let slot = layer_ids
                .binary_search(&run.layer)
                .expect("every run's layer is in layer_ids");
            for i in range {
                let count = self.max_count(i);
                if count < freeze {
                    let tie = u64::from(rng.next_u32() >> 16);
                    sorted[slot].push((u64::from(count) << 48) | (tie << 32) | i as u64);
                }
            }
        }
        for keys in &mut sorted {
            keys.sort_unstable();
        }

        let mut next = vec![0usize; sorted.len()];
        let mut fronts: BinaryHeap<Reverse<(u64, usize)>> = sorted
            .iter()
            .enumerate()
            .filter_map(|(slot, keys)| keys.first().map(|&key| Reverse((key, slot))))
            .collect();
        let mut groups = Vec::new();
        while let Some(Reverse((_, slot))) = fronts.pop() {
            let keys = &sorted[slot];
            let start = next[slot];
            let end = (start + group_size).min(keys.len());
            groups.push(Group {
                layer: layer_ids[slot],
                vars: keys[start..end].iter().map(|&key| key as u32).collect(),
            });
            next[slot] = end;
            if let Some(&key) = keys.get(end) {
                fronts.push(Reverse((key, slot)));
            }
        }
        groups
    }

    /// One cycle's groups for cooperative coevolution with *random* grouping (the
    /// ablation of confidence-based grouping): every layer's free variables are shuffled
    /// and cut into groups of up to `group_size`, and the order of all groups is shuffled.
    ///
    /// Groups stay inside one layer, as confidence-based groups do, so the ablation
    /// changes only *which* variables are searched together, not the cost of evaluating
    /// them (workers recompute from the group's layer). Each free variable is in exactly
    /// one group; the result depends only on the state and the RNG.
    pub fn random_groups(&self, rng: &mut ChaCha8Rng) -> Vec<Group> {
        let mut groups = Vec::new();
        for (layer, mut vars) in self.free_by_layer() {
            shuffle(&mut vars, rng);
            for chunk in vars.chunks(self.params.group_size) {
                groups.push(Group {
                    layer,
                    vars: chunk.to_vec(),
                });
            }
        }
        shuffle(&mut groups, rng);
        groups
    }

    /// One cycle's groups for *static layer-by-layer* grouping: the free variables in
    /// index order (layer after layer), cut into consecutive groups of up to
    /// `group_size` that never cross a layer boundary. Deterministic.
    pub fn layer_groups(&self) -> Vec<Group> {
        let mut groups = Vec::new();
        for (layer, vars) in self.free_by_layer() {
            for chunk in vars.chunks(self.params.group_size) {
                groups.push(Group {
                    layer,
                    vars: chunk.to_vec(),
                });
            }
        }
        groups
    }

    /// EDA without cooperative coevolution: a single group holding every free variable
    /// in index order, so each candidate samples the whole network jointly. Its `layer`
    /// is the first layer it touches (workers recompute from there). Empty when every
    /// variable is frozen.
    pub fn joint_group(&self) -> Vec<Group> {
        let freeze = self.params.freeze_count();
        let vars: Vec<u32> = (0..self.num_variables())
            .filter(|&i| self.max_count(i) < freeze)
            .map(|i| i as u32)
            .collect();
        match vars.first() {
            Some(&v) => vec![Group {
                layer: self.layer(v as usize),
                vars,
            }],
            None => Vec::new(),
        }
    }

    /// Candidates of one generation of (1+λ) random local search around `context`:
    /// candidate 0 is the context, and each of the other `population - 1` candidates
    /// moves exactly `min(flips, layer size)` distinct variables to another of their
    /// allowed codes (uniformly among the others). The distributions are ignored: local
    /// search has none, and every variable with more than one allowed code is eligible.
    ///
    /// All moves of one generation fall in one layer, chosen by drawing one eligible
    /// variable uniformly (so a layer is chosen in proportion to its size and every
    /// variable is equally likely to be moved); like a CC group, that lets workers reuse
    /// everything computed before the layer. Returns the moved variables (ascending) and
    /// the candidates' codes for them, in the layout of [`EdaState::sample`].
    pub fn local_moves(
        &self,
        context: &[i8],
        population: usize,
        flips: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<(Group, Vec<Vec<i8>>)> {
        if context.len() != self.num_variables() {
            return Err(Error::setting(
                "context",
                format!("{} codes", context.len()),
                format!("expected one code per variable ({})", self.num_variables()),
            ));
        }
        if flips == 0 {
            return Err(Error::setting("search.hill_flips", 0, "must be at least 1"));
        }
        for (i, &code) in context.iter().enumerate() {
            self.check_allowed(|| format!("context[{i}]"), i, code)?;
        }
        let movable: Vec<u32> = (0..self.num_variables())
            .filter(|&i| self.span[i] > 1)
            .map(|i| i as u32)
            .collect();
        if movable.is_empty() {
            return Err(Error::setting(
                "eda.radius",
                self.params.radius,
                "leaves no variable with a second allowed code to move to",
            ));
        }
        let pick = movable[rng.random_range(0..movable.len())] as usize;
        let layer = self.layer(pick);
        let (_, range) = self
            .runs()
            .find(|(_, r)| r.contains(&pick))
            .expect("every variable is in a run");
        let in_layer: Vec<u32> = movable
            .iter()
            .copied()
            .filter(|&v| range.contains(&(v as usize)))
            .collect();
        let k = flips.min(in_layer.len());
        let mut moves: Vec<Vec<(u32, i8)>> = Vec::with_capacity(population);
        for _ in 1..population {
            let mut m: Vec<(u32, i8)> = rand::seq::index::sample(rng, in_layer.len(), k)
                .into_iter()
                .map(|j| {
                    let v = in_layer[j];
                    let i = v as usize;
                    let span = i16::from(self.span[i]);
                    let current = i16::from(context[i]) - i16::from(self.base[i]);
                    // Uniform over the other span - 1 slots.
                    let mut slot = rng.random_range(0..span - 1);
                    if slot >= current {
                        slot += 1;
                    }
                    (v, self.code(i, slot as usize))
                })
                .collect();
            m.sort_unstable();
            moves.push(m);
        }
        let mut vars: Vec<u32> = moves.iter().flatten().map(|&(v, _)| v).collect();
        vars.sort_unstable();
        vars.dedup();
        let base: Vec<i8> = vars.iter().map(|&v| context[v as usize]).collect();
        let mut candidates = Vec::with_capacity(population);
        candidates.push(base.clone());
        for m in moves {
            let mut c = base.clone();
            for (v, code) in m {
                let pos = vars
                    .binary_search(&v)
                    .expect("every moved variable is listed");
                c[pos] = code;
            }
            candidates.push(c);
        }
        Ok((Group { layer, vars }, candidates))
    }

    /// Each layer's free variables in index order, in order of first appearance.
    fn free_by_layer(&self) -> Vec<(u32, Vec<u32>)> {
        let freeze = self.params.freeze_count();
        let mut out: Vec<(u32, Vec<u32>)> = Vec::new();
        for (run, range) in self.runs() {
            let free = range
                .filter(|&i| self.max_count(i) < freeze)
                .map(|i| i as u32);
            match out.iter_mut().find(|(l, _)| *l == run.layer) {
                Some((_, vars)) => vars.extend(free),
                None => out.push((run.layer, free.collect())),
            }
        }
        out.retain(|(_, vars)| !vars.is_empty());
        out
    }

    /// Draws `population` candidates for `group` against the global codes `context`.
    ///
    /// Candidate 0 is the context's codes for the group; every other candidate draws each
    /// variable independently from its distribution (frozen variables give their mode).
    /// Each candidate lists codes in the order of `group`. For a given state, group,
    /// context and RNG state the result is always the same.
    pub fn sample(
        &self,
        group: &[u32],
        context: &[i8],
        rng: &mut ChaCha8Rng,
    ) -> Result<Vec<Vec<i8>>> {
        self.check_group(group)?;
        if context.len() != self.num_variables() {
            return Err(Error::setting(
                "context",
                format!("{} codes", context.len()),
                format!("expected one code per variable ({})", self.num_variables()),
            ));
        }
        let current: Vec<i8> = group.iter().map(|&v| context[v as usize]).collect();
        for (&v, &code) in group.iter().zip(&current) {
            self.check_allowed(|| format!("context[{v}]"), v as usize, code)?;
        }

        let mut candidates = Vec::with_capacity(self.params.population);
        candidates.push(current);
        for _ in 1..self.params.population {
            candidates.push(group.iter().map(|&v| self.draw(v as usize, rng)).collect());
        }
        Ok(candidates)
    }

    /// Moves the distributions of `group` toward the selected candidates:
    /// `p <- (1 - alpha) p + alpha freq`, then freezes the variables whose confidence reached
    /// the threshold. Returns the newly frozen variables; the caller should set their
    /// codes in the context to [`EdaState::mode`] (or call [`EdaState::pin_frozen`]).
    ///
    /// Frozen variables in `group` are left untouched. Nothing changes when an error is
    /// returned.
    pub fn update<C: AsRef<[i8]>>(&mut self, group: &[u32], selected: &[C]) -> Result<Vec<u32>> {
        self.check_group(group)?;
        if selected.is_empty() {
            return Err(Error::setting(
                "selected",
                0,
                "the update needs at least one selected candidate",
            ));
        }
        for (c, candidate) in selected.iter().enumerate() {
            let candidate = candidate.as_ref();
            if candidate.len() != group.len() {
                return Err(Error::setting(
                    &format!("selected[{c}]"),
                    format!("{} codes", candidate.len()),
                    format!("expected one code per group variable ({})", group.len()),
                ));
            }
            for (pos, (&v, &code)) in group.iter().zip(candidate).enumerate() {
                self.check_allowed(|| format!("selected[{c}][{pos}]"), v as usize, code)?;
            }
        }

        let alpha = self.params.alpha;
        let one = f64::from(ONE);
        let k = selected.len() as f64;
        let mut newly_frozen = Vec::new();
        for (pos, &v) in group.iter().enumerate() {
            let i = v as usize;
            if self.is_frozen(i) {
                continue;
            }
            let base = i16::from(self.base[i]);
            let span = usize::from(self.span[i]);
            let mut counts = [0u32; MAX_WIDTH];
            for candidate in selected {
                counts[(i16::from(candidate.as_ref()[pos]) - base) as usize] += 1;
            }
            let before = self.max_count(i);
            let row = &mut self.probs.row_mut(i)[..span];
            let mut targets = [0.0f64; MAX_WIDTH];
            for j in 0..span {
                let freq = f64::from(counts[j]) / k;
                targets[j] = (1.0 - alpha) * f64::from(row[j]) + alpha * freq * one;
            }
            apportion(&targets[..span], row);
            self.confidence_total =
                self.confidence_total - u64::from(before) + u64::from(self.max_count(i));
            if self.is_frozen(i) {
                self.frozen += 1;
                newly_frozen.push(v);
            }
        }
        Ok(newly_frozen)
    }

    /// Writes every frozen variable's mode into `codes` (the global context); returns how
    /// many codes changed.
    pub fn pin_frozen(&self, codes: &mut [i8]) -> Result<usize> {
        if codes.len() != self.num_variables() {
            return Err(Error::setting(
                "codes",
                format!("{} codes", codes.len()),
                format!("expected one code per variable ({})", self.num_variables()),
            ));
        }
        let mut changed = 0;
        for (i, code) in codes.iter_mut().enumerate() {
            if self.is_frozen(i) {
                let mode = self.mode(i);
                changed += usize::from(*code != mode);
                *code = mode;
            }
        }
        Ok(changed)
    }

    fn row(&self, i: usize) -> &[u16] {
        self.probs.row(i)
    }

    fn max_count(&self, i: usize) -> u32 {
        self.row(i).iter().copied().max().map_or(0, u32::from)
    }

    fn code(&self, i: usize, slot: usize) -> i8 {
        (i16::from(self.base[i]) + slot as i16) as i8
    }

    fn slot(&self, i: usize, code: i8) -> Option<usize> {
        let slot = i16::from(code) - i16::from(self.base[i]);
        (0..i16::from(self.span[i]))
            .contains(&slot)
            .then_some(slot as usize)
    }

    /// Each layer run with its variable range.
    fn runs(&self) -> impl Iterator<Item = (&LayerRun, std::ops::Range<usize>)> {
        let n = self.num_variables();
        self.layer_runs.iter().enumerate().map(move |(r, run)| {
            let end = self.layer_runs.get(r + 1).map_or(n, |next| next.start);
            (run, run.start..end)
        })
    }

    fn sum_max_counts(&self) -> u64 {
        (0..self.num_variables())
            .map(|i| u64::from(self.max_count(i)))
            .sum()
    }

    fn count_frozen(&self) -> usize {
        (0..self.num_variables())
            .filter(|&i| self.is_frozen(i))
            .count()
    }

    /// One draw for variable `i`: a uniform point of `[0, ONE)` from one `u32` of the
    /// stream (multiply-shift; bias below 2^-16), located in the row's cumulative sums.
    fn draw(&self, i: usize, rng: &mut ChaCha8Rng) -> i8 {
        if self.is_frozen(i) {
            return self.mode(i);
        }
        let point = ((u64::from(rng.next_u32()) * u64::from(ONE)) >> 32) as u32;
        self.code(i, pick_slot(self.row(i), point))
    }

    fn check_group(&self, group: &[u32]) -> Result<()> {
        match group
            .iter()
            .position(|&v| v as usize >= self.num_variables())
        {
            Some(pos) => Err(Error::setting(
                &format!("group[{pos}]"),
                group[pos],
                format!("there are only {} variables", self.num_variables()),
            )),
            None => Ok(()),
        }
    }

    /// `field` names the offending value; built only on error (this runs per variable
    /// of every generation).
    fn check_allowed(&self, field: impl FnOnce() -> String, i: usize, code: i8) -> Result<()> {
        if self.slot(i, code).is_some() {
            return Ok(());
        }
        let allowed = self.allowed_values(i);
        Err(Error::setting(
            &field(),
            code,
            format!(
                "variable {i} only allows codes {}..={}",
                allowed.start(),
                allowed.end()
            ),
        ))
    }
}

impl TryFrom<StateRepr> for EdaState {
    type Error = Error;

    fn try_from(repr: StateRepr) -> Result<Self> {
        repr.params.validate()?;
        let n = repr.base.len();
        let width = repr.params.width();
        let bad = |field: &str, value: String, reason: String| {
            Err(Error::setting(&format!("eda_state.{field}"), value, reason))
        };
        // Indices travel as u32 in groups.
        if n == 0 || n - 1 > u32::MAX as usize {
            return bad("base", format!("{n} variables"), "must be 1..=2^32".into());
        }
        if repr.span.len() != n || repr.probs.len() != n * width {
            return bad(
                "probs",
                format!(
                    "{} spans, {} probabilities",
                    repr.span.len(),
                    repr.probs.len()
                ),
                format!("expected {n} spans and {} probabilities", n * width),
            );
        }
        let runs_ok = repr.layer_runs.first().is_some_and(|r| r.start == 0)
            && repr.layer_runs.windows(2).all(|w| w[0].start < w[1].start)
            && repr.layer_runs.last().is_some_and(|r| r.start < n);
        if !runs_ok {
            return bad(
                "layer_runs",
                format!("{} runs", repr.layer_runs.len()),
                format!("run starts must begin at 0 and increase strictly below {n}"),
            );
        }
        for i in 0..n {
            let span = usize::from(repr.span[i]);
            if span == 0 || span > width || i16::from(repr.base[i]) + span as i16 - 1 > 127 {
                return bad(
                    &format!("span[{i}]"),
                    span.to_string(),
                    format!("must be 1..={width} and keep codes within i8"),
                );
            }
            let row = &repr.probs[i * width..(i + 1) * width];
            let sum: u32 = row.iter().map(|&p| u32::from(p)).sum();
            if sum != ONE || row[span..].iter().any(|&p| p != 0) {
                return bad(
                    &format!("probs[{i}]"),
                    format!("{row:?}"),
                    format!("must sum to {ONE} with zeros beyond the {span} allowed codes"),
                );
            }
        }
        let mut state = EdaState {
            params: repr.params,
            layer_runs: repr.layer_runs,
            base: Arc::new(repr.base),
            span: Arc::new(repr.span),
            probs: Rows::from_flat(&repr.probs, width),
            frozen: 0,
            confidence_total: 0,
        };
        state.frozen = state.count_frozen();
        state.confidence_total = state.sum_max_counts();
        Ok(state)
    }
}

/// Fisher-Yates with one bounded draw per position, so the permutation depends only on
/// the stream (written out rather than `SliceRandom::shuffle` to pin the algorithm that
/// reproducibility depends on).
fn shuffle<T>(items: &mut [T], rng: &mut ChaCha8Rng) {
    for i in (1..items.len()).rev() {
        let j = rng.random_range(0..=i);
        items.swap(i, j);
    }
}

/// The slot whose cumulative interval `[sum before, sum through]` holds `point`, for a
/// `row` summing to [`ONE`] and `point < ONE`. Zero-probability slots, including every
/// slot outside the allowed values, have empty intervals and are never chosen.
fn pick_slot(row: &[u16], point: u32) -> usize {
    let mut cumulative = 0;
    for (slot, &p) in row.iter().enumerate() {
        cumulative += u32::from(p);
        if point < cumulative {
            return slot;
        }
    }
    unreachable!("the row sums to {ONE}, above every point drawn")
}

/// Rounds non-negative `targets` that sum to [`ONE`] (up to f64 rounding) into integer
/// counts summing to exactly [`ONE`], each less than one unit from its target: floors
/// first, then the missing units go to the largest fractional parts (ties: lower slot),
/// never to a slot whose target is zero.
fn apportion(targets: &[f64], out: &mut [u16]) {
    let mut total = 0u32;
    for (count, &t) in out.iter_mut().zip(targets) {
        *count = t.floor().clamp(0.0, f64::from(ONE)) as u16;
        total += u32::from(*count);
    }
    let mut order = [0usize; MAX_WIDTH];
    let mut candidates = 0;
    for (j, &t) in targets.iter().enumerate() {
        if t > 0.0 {
            order[candidates] = j;
            candidates += 1;
        }
    }
    let order = &mut order[..candidates];
    let fraction = |j: usize| targets[j] - targets[j].floor();
    order.sort_by(|&a, &b| fraction(b).total_cmp(&fraction(a)).then(a.cmp(&b)));
    let missing = ONE.saturating_sub(total) as usize;
    for &j in order.iter().cycle().take(missing) {
        out[j] += 1;
    }
    debug_assert_eq!(out.iter().map(|&c| u32::from(c)).sum::<u32>(), ONE);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// One fixed-point quantum, written independently of the module's constant.
    const Q: f64 = 1.0 / 65535.0;

    fn var(initial: i8, lo: i8, hi: i8, layer: u32) -> Variable {
        Variable {
            initial,
            lo,
            hi,
            layer,
        }
    }

    /// `n` 4-bit variables at code 0 in `layer`.
    fn four_bit(n: usize, layer: u32) -> impl Iterator<Item = Variable> {
        std::iter::repeat_n(var(0, -8, 7, layer), n)
    }

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    fn field_of(result: Result<impl std::fmt::Debug>) -> String {
        match result {
            Err(Error::InvalidSetting { field, .. }) => field,
            other => panic!("expected InvalidSetting, got {other:?}"),
        }
    }

    #[test]
    fn params_validation_names_the_bad_field() {
        let d = EdaParams::default();
        assert!(d.validate().is_ok());
        let bad = [
            (
                EdaParams {
                    radius: 0,
                    ..d.clone()
                },
                "eda.radius",
            ),
            (
                EdaParams {
                    radius: 8,
                    ..d.clone()
                },
                "eda.radius",
            ),
            (
                EdaParams {
                    p0: 0.0,
                    ..d.clone()
                },
                "eda.p0",
            ),
            (
                EdaParams {
                    p0: 1.0,
                    ..d.clone()
                },
                "eda.p0",
            ),
            (
                EdaParams {
                    p0: f64::NAN,
                    ..d.clone()
                },
                "eda.p0",
            ),
            (
                EdaParams {
                    alpha: 0.0,
                    ..d.clone()
                },
                "eda.alpha",
            ),
            (
                EdaParams {
                    alpha: 1.01,
                    ..d.clone()
                },
                "eda.alpha",
            ),
            (
                EdaParams {
                    alpha: f64::NAN,
                    ..d.clone()
                },
                "eda.alpha",
            ),
            (
                EdaParams {
                    freeze_threshold: 0.0,
                    ..d.clone()
                },
                "eda.freeze_threshold",
            ),
            (
                EdaParams {
                    freeze_threshold: 1.5,
                    ..d.clone()
                },
                "eda.freeze_threshold",
            ),
            (
                EdaParams {
                    group_size: 0,
                    ..d.clone()
                },
                "eda.group_size",
            ),
            (
                EdaParams {
                    population: 1,
                    top_k: 1,
                    ..d.clone()
                },
                "eda.population",
            ),
            (
                EdaParams {
                    top_k: 0,
                    ..d.clone()
                },
                "eda.top_k",
            ),
            (
                EdaParams {
                    top_k: 17,
                    ..d.clone()
                },
                "eda.top_k",
            ),
        ];
        for (params, field) in bad {
            assert_eq!(field_of(params.validate()), field, "{params:?}");
            assert_eq!(field_of(EdaState::new(params, four_bit(3, 0))), field);
        }
        let edges = [
            EdaParams {
                radius: 7,
                ..d.clone()
            },
            EdaParams {
                alpha: 1.0,
                ..d.clone()
            },
            EdaParams {
                freeze_threshold: 1.0,
                ..d.clone()
            },
            EdaParams {
                population: 2,
                top_k: 2,
                ..d.clone()
            },
            EdaParams {
                group_size: 1,
                ..d.clone()
            },
        ];
        for params in edges {
            assert!(params.validate().is_ok(), "{params:?}");
        }
    }

    #[test]
    fn params_deserialize_with_defaults_and_reject_unknown_fields() {
        let p: EdaParams = serde_json::from_str(r#"{"radius": 2, "top_k": 3}"#).unwrap();
        assert_eq!(
            p,
            EdaParams {
                radius: 2,
                top_k: 3,
                ..EdaParams::default()
            }
        );
        assert_eq!(p.p0, 0.8);
        assert_eq!(p.alpha, 0.5);
        assert_eq!(p.freeze_threshold, 0.98);
        assert_eq!((p.group_size, p.population), (128, 16));
        let err = serde_json::from_str::<EdaParams>(r#"{"radious": 2}"#).unwrap_err();
        assert!(err.to_string().contains("radious"), "{err}");
    }

    #[test]
    fn new_rejects_bad_variables() {
        let p = EdaParams::default;
        let lo_above_hi = [var(0, -8, 7, 0), var(0, 3, 2, 0)];
        assert_eq!(field_of(EdaState::new(p(), lo_above_hi)), "variables[1].lo");
        let outside = [var(0, -8, 7, 0), var(0, -8, 7, 0), var(8, -8, 7, 0)];
        assert_eq!(
            field_of(EdaState::new(p(), outside)),
            "variables[2].initial"
        );
        assert_eq!(field_of(EdaState::new(p(), [])), "variables");
    }

    #[test]
    fn initial_distribution_respects_radius_and_code_range() {
        let r1 = EdaParams::default();
        let r2 = EdaParams {
            radius: 2,
            ..EdaParams::default()
        };
        // (params, variable, expected allowed values)
        let cases = [
            (&r1, var(0, -8, 7, 0), -1..=1),
            (&r1, var(-8, -8, 7, 0), -8..=-7),
            (&r1, var(7, -8, 7, 0), 6..=7),
            (&r1, var(0, 0, 0, 0), 0..=0),
            (&r2, var(0, -8, 7, 0), -2..=2),
            (&r2, var(-7, -8, 7, 0), -8..=-5),
            (&r2, var(7, -8, 7, 0), 5..=7),
            (&r2, var(1, -2, 1, 0), -1..=1),
        ];
        for (params, v, allowed) in cases {
            let s = EdaState::new(params.clone(), [v]).unwrap();
            assert_eq!(s.allowed_values(0), allowed, "{v:?}");
            let others = allowed.clone().count() as f64 - 1.0;
            let mut total = 0.0;
            for code in allowed.clone() {
                let expected = match (code == v.initial, others) {
                    (true, 0.0) => 1.0,
                    (true, _) => params.p0,
                    (false, _) => (1.0 - params.p0) / others,
                };
                let p = s.probability(0, code);
                assert!(
                    (p - expected).abs() <= Q,
                    "{v:?} code {code}: {p} vs {expected}"
                );
                total += p;
            }
            assert!((total - 1.0).abs() < 1e-12, "{v:?} sums to {total}");
            assert_eq!(s.probability(0, allowed.start() - 1), 0.0);
            assert_eq!(s.probability(0, allowed.end().saturating_add(1)), 0.0);
            assert_eq!(s.mode(0), v.initial);
            // Only a variable without any alternative is sure enough to start frozen.
            assert_eq!(s.frozen_count(), usize::from(others == 0.0), "{v:?}");
        }
    }

    /// Fixed-point rounding hands the units the floors leave out to the largest
    /// fractional parts (index order on ties), never to a zero target.
    #[test]
    fn apportion_gives_the_remainder_to_the_largest_fractions() {
        let mut out = [0u16; 3];
        apportion(&[10.9, 1.5, 65522.6], &mut out);
        assert_eq!(out, [11, 1, 65523]);
        apportion(&[0.0, 65534.5, 0.5], &mut out);
        assert_eq!(out, [0, 65535, 0]);
        apportion(&[21845.0, 21845.0, 21845.0], &mut out);
        assert_eq!(out, [21845; 3]);
    }

    /// The mode is the most probable code, the lower one on a tie (the documented rule;
    /// freezing pins variables there, so it must not depend on slot order quirks).
    #[test]
    fn mode_is_the_most_probable_code_and_the_lower_on_a_tie() {
        let params = EdaParams {
            alpha: 1.0,
            top_k: 3,
            ..EdaParams::default()
        };
        let mut s = EdaState::new(params, four_bit(2, 0)).unwrap();
        // Variable 0: a third on each of -1, 0, +1 (65535 splits exactly in three).
        // Variable 1: all on +1.
        s.update(&[0, 1], &[vec![-1i8, 1], vec![0i8, 1], vec![1i8, 1]])
            .unwrap();
        assert_eq!(s.probability(0, -1), s.probability(0, 1));
        assert_eq!(s.probability(0, 0), s.probability(0, 1));
        assert_eq!(s.mode(0), -1);
        assert_eq!(s.mode(1), 1);
    }

    /// The memory budget of the module docs: 8, 12 and 16 bytes per variable at radius
    /// 1, 2 and 3, plus a few bytes per layer run — and `heap_bytes` reports exactly that.
    #[test]
    fn heap_bytes_counts_the_per_variable_arrays_and_the_layer_runs() {
        let n = 10_000;
        for (radius, per_var) in [(1u8, 8usize), (2, 12), (3, 16)] {
            let params = EdaParams {
                radius,
                ..EdaParams::default()
            };
            let s = EdaState::new(params, four_bit(n / 2, 0).chain(four_bit(n / 2, 1))).unwrap();
            // Beyond the per-variable bytes: per chunk of rows (3 for 10,000 rows) a
            // reference-count block (two counters), a vector header and a pointer in the
            // chunk list; and the layer runs.
            let chunks = n.div_ceil(CHUNK_ROWS);
            assert_eq!(s.probs.chunks.len(), chunks);
            assert_eq!(s.probs.chunks.capacity(), chunks, "no spare chunk slots");
            let word = std::mem::size_of::<usize>();
            let per_chunk = 2 * word + 3 * word + word;
            assert_eq!(
                s.heap_bytes(),
                per_var * n + per_chunk * chunks + s.layer_runs.capacity() * 16,
                "radius {radius}: {n} variables in 2 layers"
            );
            assert!((2..=8).contains(&s.layer_runs.capacity()));
        }
    }

    /// A clone (a checkpoint's snapshot) shares the model: updating the original leaves
    /// the clone as it was, and copies only the chunk of rows the update touched.
    #[test]
    fn clones_share_rows_until_an_update_copies_one_chunk() {
        let n = 3 * CHUNK_ROWS;
        let mut s = EdaState::new(EdaParams::default(), four_bit(n, 0)).unwrap();
        let snapshot = s.clone();
        let shared = |a: &EdaState, b: &EdaState| {
            a.probs
                .chunks
                .iter()
                .zip(&b.probs.chunks)
                .filter(|(x, y)| Arc::ptr_eq(x, y))
                .count()
        };
        assert_eq!(shared(&s, &snapshot), 3, "a clone copies no rows");
        assert!(Arc::ptr_eq(&s.base, &snapshot.base) && Arc::ptr_eq(&s.span, &snapshot.span));
        let var = (CHUNK_ROWS + 5) as u32;
        s.update(&[var], &[[1i8], [1]]).unwrap();
        assert_eq!(
            shared(&s, &snapshot),
            2,
            "only the updated row's chunk is copied"
        );
        assert!(s.probability(var as usize, 1) > snapshot.probability(var as usize, 1));
        assert_eq!(
            snapshot,
            EdaState::new(EdaParams::default(), four_bit(n, 0)).unwrap(),
            "the snapshot still holds the model as it was"
        );
        // Serialised flat, whatever the chunks: the same JSON as a state rebuilt from it,
        // and the same through postcard, the checkpoints' encoding (which writes the
        // sequence's length up front, so it must be exact).
        let back: EdaState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        assert_eq!(
            serde_json::to_string(&back).unwrap(),
            serde_json::to_string(&s).unwrap()
        );
        let bytes = postcard::to_stdvec(&s).unwrap();
        let back: EdaState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, s);
        assert_eq!(postcard::to_stdvec(&back).unwrap(), bytes);
    }

    /// The widest rows the state supports (radius MAX_RADIUS over a 4-bit code range,
    /// 2 * 7 + 1 = 15 slots) sample, update and round-trip like any other: the per-row
    /// scratch arrays are sized for them.
    #[test]
    fn the_largest_radius_uses_every_slot() {
        let params = EdaParams {
            radius: MAX_RADIUS,
            population: 64,
            top_k: 8,
            group_size: 4,
            ..EdaParams::default()
        };
        let mut s = EdaState::new(params, four_bit(4, 0)).unwrap();
        assert_eq!(s.allowed_values(0), -7..=7);
        let context = vec![0i8; 4];
        let group = [0u32, 1, 2, 3];
        let mut r = rng(1);
        let candidates = s.sample(&group, &context, &mut r).unwrap();
        // The selection holds the two extremes of the range: both must be counted.
        let selected = vec![vec![-7i8, 7, 0, 0], vec![7i8, -7, 0, 0]];
        s.update(&group, &selected).unwrap();
        assert!(s.probability(0, -7) > 0.2 && s.probability(0, 7) > 0.2);
        assert!(candidates.iter().flatten().all(|c| (-7..=7).contains(c)));
        let back: EdaState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn sampling_stays_in_allowed_values_and_candidate_zero_is_the_context() {
        let params = EdaParams {
            radius: 2,
            population: 3000,
            top_k: 4,
            ..EdaParams::default()
        };
        let vars = [
            var(0, -8, 7, 0),
            var(-8, -8, 7, 0),
            var(7, -8, 7, 0),
            var(-7, -8, 7, 1),
            var(1, -2, 1, 1),
            var(-2, -2, 1, 1),
            var(0, 0, 1, 2),
            var(3, 3, 3, 2),
        ];
        let s = EdaState::new(params, vars).unwrap();
        // A context away from the initial codes wherever there is room.
        let context: Vec<i8> = (0..vars.len())
            .map(|i| {
                let allowed = s.allowed_values(i);
                if *allowed.end() != vars[i].initial {
                    *allowed.end()
                } else {
                    *allowed.start()
                }
            })
            .collect();
        let group: Vec<u32> = vec![5, 0, 7, 2, 4, 1, 6, 3];
        let candidates = s.sample(&group, &context, &mut rng(7)).unwrap();
        assert_eq!(candidates.len(), 3000);
        let expected_first: Vec<i8> = group.iter().map(|&v| context[v as usize]).collect();
        assert_eq!(candidates[0], expected_first);
        for (pos, &v) in group.iter().enumerate() {
            let allowed = s.allowed_values(v as usize);
            let mut seen = vec![0usize; allowed.clone().count()];
            for candidate in &candidates[1..] {
                let code = candidate[pos];
                assert!(allowed.contains(&code), "variable {v} drew {code}");
                seen[(code - allowed.start()) as usize] += 1;
            }
            // Every allowed value has probability >= 0.2 / 4, so all must show up.
            assert!(seen.iter().all(|&n| n > 0), "variable {v}: {seen:?}");
        }
    }

    #[test]
    fn slot_picking_never_lands_on_zero_probability() {
        let row = [0u16, 3, 0, 65532, 0];
        let picks: Vec<usize> = [0, 1, 2, 3, 4, 65534].map(|p| pick_slot(&row, p)).to_vec();
        assert_eq!(picks, [1, 1, 1, 3, 3, 3]);
    }

    #[test]
    fn sampling_rejects_bad_arguments() {
        let s = EdaState::new(EdaParams::default(), four_bit(4, 0)).unwrap();
        let context = vec![0i8; 4];
        assert_eq!(
            field_of(s.sample(&[0, 4], &context, &mut rng(1))),
            "group[1]"
        );
        assert_eq!(
            field_of(s.sample(&[0], &context[..3], &mut rng(1))),
            "context"
        );
        let outside = vec![0, 0, 2, 0];
        assert_eq!(
            field_of(s.sample(&[1, 2], &outside, &mut rng(1))),
            "context[2]"
        );
    }

    /// Pearson's statistic of `observed` against `n * probs` (cells with p > 0 only).
    fn chi_square(observed: &[usize], probs: &[f64]) -> (f64, usize) {
        let n: usize = observed.iter().sum();
        let mut stat = 0.0;
        let mut cells = 0;
        for (&o, &p) in observed.iter().zip(probs) {
            if p > 0.0 {
                let e = n as f64 * p;
                stat += (o as f64 - e).powi(2) / e;
                cells += 1;
            }
        }
        (stat, cells - 1)
    }

    /// Chi-square critical values at p = 0.001, by degrees of freedom.
    const CRITICAL: [f64; 5] = [f64::NAN, 10.83, 13.82, 16.27, 18.47];

    fn assert_frequencies_match(s: &EdaState, group: &[u32], seed: u64) {
        let context: Vec<i8> = (0..s.num_variables()).map(|i| s.mode(i)).collect();
        let candidates = s.sample(group, &context, &mut rng(seed)).unwrap();
        for (pos, &v) in group.iter().enumerate() {
            let allowed = s.allowed_values(v as usize);
            let probs: Vec<f64> = allowed
                .clone()
                .map(|c| s.probability(v as usize, c))
                .collect();
            let mut observed = vec![0usize; probs.len()];
            for candidate in &candidates[1..] {
                observed[(candidate[pos] - allowed.start()) as usize] += 1;
            }
            for (o, p) in observed.iter().zip(&probs) {
                if *p == 0.0 {
                    assert_eq!(*o, 0, "variable {v} drew a zero-probability value");
                }
            }
            let (stat, df) = chi_square(&observed, &probs);
            assert!(
                stat < CRITICAL[df],
                "variable {v}: chi2 = {stat} (df {df}), observed {observed:?}, probs {probs:?}"
            );
        }
    }

    #[test]
    fn sampling_frequencies_match_the_distribution() {
        let draws = 40_000;
        let params = EdaParams {
            radius: 2,
            population: draws + 1,
            freeze_threshold: 1.0,
            ..EdaParams::default()
        };
        let vars = [var(0, -8, 7, 0), var(-8, -8, 7, 0), var(1, -2, 1, 0)];
        let mut s = EdaState::new(params, vars).unwrap();
        assert_frequencies_match(&s, &[0, 1, 2], 11);
        // Uneven distributions: [-2, -2, 1, 0] etc. as the selected candidates.
        let selected = [[-2i8, -8, -1], [-2, -6, -1], [1, -7, 1], [0, -6, 0]];
        s.update(&[0, 1, 2], &selected).unwrap();
        assert_frequencies_match(&s, &[2, 0, 1], 12);

        // alpha = 1 empties a value's probability; it must never be drawn again.
        let params = EdaParams {
            alpha: 1.0,
            population: draws + 1,
            freeze_threshold: 1.0,
            ..EdaParams::default()
        };
        let mut s = EdaState::new(params, four_bit(1, 0)).unwrap();
        s.update(&[0], &[[0i8], [1]]).unwrap();
        assert_eq!(s.probability(0, -1), 0.0);
        assert!((s.probability(0, 0) - 0.5).abs() <= Q);
        assert_frequencies_match(&s, &[0], 13);
    }

    #[test]
    fn update_follows_the_formula_and_keeps_rows_normalised() {
        let alpha = 0.5;
        let vars = [
            var(0, -8, 7, 0),
            var(0, -8, 7, 0),
            var(0, -8, 7, 0),
            var(7, -8, 7, 0),
        ];
        let mut s = EdaState::new(EdaParams::default(), vars).unwrap();
        let group = [0u32, 1, 2, 3];
        let selected = [[-1i8, 0, 1, 7], [-1, 0, 0, 6], [0, 1, 1, 6], [-1, 0, 1, 6]];
        let before: Vec<Vec<f64>> = (0..4)
            .map(|i| s.allowed_values(i).map(|c| s.probability(i, c)).collect())
            .collect();
        assert_eq!(s.update(&group, &selected).unwrap(), Vec::<u32>::new());
        for (pos, &v) in group.iter().enumerate() {
            let i = v as usize;
            let mut total = 0.0;
            for (j, code) in s.allowed_values(i).enumerate() {
                let freq = selected.iter().filter(|c| c[pos] == code).count() as f64 / 4.0;
                let expected = (1.0 - alpha) * before[i][j] + alpha * freq;
                let p = s.probability(i, code);
                assert!(
                    (p - expected).abs() <= Q,
                    "var {i} code {code}: {p} vs {expected}"
                );
                total += p;
            }
            assert!((total - 1.0).abs() < 1e-12);
        }
        // By hand for variable 0: [0.1, 0.8, 0.1] and frequencies [3/4, 1/4, 0].
        for (code, expected) in [(-1, 0.425), (0, 0.525), (1, 0.05)] {
            assert!((s.probability(0, code) - expected).abs() <= 2.0 * Q);
        }
        // Variable 3 lives at the top of the range: [0.2, 0.8] and frequencies [3/4, 1/4].
        assert!((s.probability(3, 6) - 0.475).abs() <= 2.0 * Q);
        assert!((s.probability(3, 7) - 0.525).abs() <= 2.0 * Q);
    }

    #[test]
    fn repeated_updates_track_a_float_simulation() {
        let params = EdaParams {
            alpha: 0.3,
            freeze_threshold: 1.0,
            ..EdaParams::default()
        };
        let mut s = EdaState::new(params, four_bit(1, 0)).unwrap();
        let mut exact = [0.1f64, 0.8, 0.1];
        let rounds: [&[i8]; 6] = [&[-1, -1], &[1, 0, 1], &[-1], &[0, 0, 0, 1], &[1], &[-1, 1]];
        for (t, selected) in rounds.iter().enumerate() {
            let candidates: Vec<[i8; 1]> = selected.iter().map(|&c| [c]).collect();
            s.update(&[0], &candidates).unwrap();
            for (j, p) in exact.iter_mut().enumerate() {
                let code = j as i8 - 1;
                let freq = selected.iter().filter(|&&c| c == code).count() as f64;
                *p = 0.7 * *p + 0.3 * freq / selected.len() as f64;
            }
            // Each step rounds by less than one quantum; earlier errors shrink by 1 - alpha.
            for (j, &p) in exact.iter().enumerate() {
                let got = s.probability(0, j as i8 - 1);
                let tolerance = (t + 2) as f64 * Q;
                assert!(
                    (got - p).abs() <= tolerance,
                    "step {t} code {}: {got} vs {p}",
                    j as i8 - 1
                );
            }
        }
    }

    #[test]
    fn update_rejects_bad_input_without_changing_anything() {
        let vars = [var(0, -8, 7, 0), var(7, -8, 7, 0)];
        let mut s = EdaState::new(EdaParams::default(), vars).unwrap();
        let before = s.clone();
        assert_eq!(
            field_of(s.update(&[0, 1], &[[0i8, 7], [1, 5]])),
            "selected[1][1]"
        );
        assert_eq!(
            field_of(s.update(&[0, 1], &[vec![0i8, 7], vec![1]])),
            "selected[1]"
        );
        assert_eq!(field_of(s.update::<[i8; 2]>(&[0, 1], &[])), "selected");
        assert_eq!(field_of(s.update(&[0, 2], &[[0i8, 7]])), "group[1]");
        assert_eq!(s, before);
    }

    /// Confidence after t consistent updates: p_t = 1 - (1 - p0)(1 - alpha)^t.
    fn closed_form(p0: f64, alpha: f64, t: i32) -> f64 {
        1.0 - (1.0 - p0) * (1.0 - alpha).powi(t)
    }

    #[test]
    fn consistently_selected_variable_freezes_when_the_closed_form_says() {
        for (p0, alpha, threshold) in [
            (0.8, 0.5, 0.98),
            (0.5, 0.3, 0.95),
            (0.9, 0.1, 0.97),
            (0.8, 0.25, 0.97),
            (0.6, 1.0, 0.98),
        ] {
            let freeze_at = (1..)
                .find(|&t| closed_form(p0, alpha, t) >= threshold)
                .unwrap();
            // The cases are chosen away from the threshold so that fixed-point rounding
            // (under one quantum per step) cannot move the freezing step.
            assert!(closed_form(p0, alpha, freeze_at) - threshold > 1e-3);
            assert!(threshold - closed_form(p0, alpha, freeze_at - 1) > 1e-3);

            let params = EdaParams {
                p0,
                alpha,
                freeze_threshold: threshold,
                // Enough draws that sampling a frozen variable's row would show.
                population: 1000,
                ..EdaParams::default()
            };
            let mut s = EdaState::new(params, four_bit(3, 0)).unwrap();
            let always_zero = [[0i8]; 4];
            for t in 1..=freeze_at {
                let newly = s.update(&[0], &always_zero).unwrap();
                let expected = closed_form(p0, alpha, t);
                let confidence = s.confidence(0);
                assert!(
                    (confidence - expected).abs() <= f64::from(t + 1) * Q,
                    "p0 {p0} alpha {alpha} t {t}: {confidence} vs {expected}"
                );
                assert_eq!(
                    s.is_frozen(0),
                    t == freeze_at,
                    "p0 {p0} alpha {alpha} t {t}"
                );
                assert_eq!(newly, if t == freeze_at { vec![0] } else { vec![] });
            }
            assert_eq!((s.frozen_count(), s.free_count()), (1, 2));

            // Frozen: out of every group, immune to updates, always sampled as its mode.
            let groups = s.groups(&mut rng(4));
            assert!(groups.iter().all(|g| !g.vars.contains(&0)), "{groups:?}");
            let frozen_row: Vec<f64> = (-1..=1).map(|c| s.probability(0, c)).collect();
            assert_eq!(s.update(&[0], &[[1i8]; 4]).unwrap(), Vec::<u32>::new());
            let row_after: Vec<f64> = (-1..=1).map(|c| s.probability(0, c)).collect();
            assert_eq!(row_after, frozen_row);
            assert_eq!(s.mode(0), 0);
            let mut context = vec![1i8, 0, 0];
            let candidates = s.sample(&[0], &context, &mut rng(3)).unwrap();
            assert!(candidates[1..].iter().all(|c| c == &[0]));
            assert_eq!(s.pin_frozen(&mut context).unwrap(), 1);
            assert_eq!(context, [0, 0, 0]);
        }
    }

    #[test]
    fn groups_prefer_least_confident_and_break_ties_at_random() {
        let params = EdaParams {
            group_size: 3,
            ..EdaParams::default()
        };
        let layers = [0u32, 0, 1, 1, 0, 0];
        let vars = layers.iter().map(|&l| var(0, -8, 7, l));
        let mut s = EdaState::new(params, vars).unwrap();
        // All equally confident: a random layer's variables in a random order, the same
        // for the same stream, and every order of layer 0's four variables possible.
        let mut firsts = std::collections::BTreeSet::new();
        for seed in 0..64 {
            let groups = s.groups(&mut rng(seed));
            assert_eq!(groups, s.groups(&mut rng(seed)), "same stream, same groups");
            assert_partition(&s, &groups);
            let sizes: Vec<(u32, usize)> = groups.iter().map(|g| (g.layer, g.vars.len())).collect();
            assert!(
                sizes == [(0, 3), (1, 2), (0, 1)]
                    || sizes == [(0, 3), (0, 1), (1, 2)]
                    || sizes == [(1, 2), (0, 3), (0, 1)],
                "{sizes:?}"
            );
            firsts.insert(groups.iter().find(|g| g.layer == 0).unwrap().vars[0]);
        }
        assert_eq!(firsts.into_iter().collect::<Vec<_>>(), [0, 1, 4, 5]);

        // Variable 5 drops to [0.3, 0.4, 0.3] and variable 3 to [0.55, 0.4, 0.05]:
        // confidence decides wherever it differs, whatever the stream.
        s.update(&[5], &[[-1i8], [1]]).unwrap();
        s.update(&[3], &[[-1i8]]).unwrap();
        let mut alone = std::collections::BTreeSet::new();
        for seed in 0..64 {
            let groups = s.groups(&mut rng(seed));
            assert_eq!(groups.len(), 3);
            assert_eq!((groups[0].layer, groups[0].vars[0]), (0, 5), "{groups:?}");
            assert_eq!(groups[0].vars.len(), 3);
            assert_eq!(
                groups[1],
                Group {
                    layer: 1,
                    vars: vec![3, 2],
                }
            );
            assert_eq!((groups[2].layer, groups[2].vars.len()), (0, 1));
            alone.insert(groups[2].vars[0]);
        }
        assert_eq!(alone.into_iter().collect::<Vec<_>>(), [0, 1, 4]);
    }

    /// A state with spread-out confidences, some frozen variables and a layer split over
    /// two runs, built by random updates.
    fn random_state(group_size: usize, n: usize, seed: u64) -> EdaState {
        let params = EdaParams {
            group_size,
            freeze_threshold: 0.9,
            ..EdaParams::default()
        };
        let layer_of = |i: usize| match i * 10 / n {
            0..=2 => 4,
            3 | 4 => 1,
            5 => 9,
            6..=8 => 2,
            _ => 4,
        };
        let vars = (0..n).map(|i| var(((i % 16) as i8) - 8, -8, 7, layer_of(i)));
        let mut s = EdaState::new(params, vars).unwrap();
        let mut r = rng(seed);
        for _ in 0..n / 4 {
            let group: Vec<u32> = (0..8).map(|_| r.random_range(0..n as u32)).collect();
            let selected: Vec<Vec<i8>> = (0..r.random_range(1..5))
                .map(|_| {
                    group
                        .iter()
                        .map(|&v| {
                            let allowed = s.allowed_values(v as usize);
                            r.random_range(*allowed.start()..=*allowed.end())
                        })
                        .collect()
                })
                .collect();
            s.update(&group, &selected).unwrap();
        }
        s
    }

    /// The grouping rule implemented literally, quadratically, with the documented tie
    /// break: the top 16 bits of one draw per free variable in index order, then the index.
    fn naive_groups(s: &EdaState, r: &mut ChaCha8Rng) -> Vec<Group> {
        let m = s.params().group_size;
        let mut tie = vec![0u32; s.num_variables()];
        for (i, t) in tie.iter_mut().enumerate() {
            if !s.is_frozen(i) {
                *t = r.next_u32() >> 16;
            }
        }
        // Read once: the literal rule below compares them O(n²) times.
        let confidence: Vec<f64> = (0..s.num_variables()).map(|i| s.confidence(i)).collect();
        let order = |a: usize, b: usize| {
            confidence[a]
                .total_cmp(&confidence[b])
                .then(tie[a].cmp(&tie[b]))
                .then(a.cmp(&b))
        };
        let mut remaining: Vec<usize> = (0..s.num_variables())
            .filter(|&i| !s.is_frozen(i))
            .collect();
        let mut groups = Vec::new();
        while let Some(&first) = remaining.iter().min_by(|a, b| order(**a, **b)) {
            let layer = s.layer(first);
            let mut members: Vec<usize> = remaining
                .iter()
                .copied()
                .filter(|&i| s.layer(i) == layer)
                .collect();
            members.sort_by(|a, b| order(*a, *b));
            members.truncate(m);
            let mut taken = vec![false; s.num_variables()];
            for &i in &members {
                taken[i] = true;
            }
            remaining.retain(|&i| !taken[i]);
            groups.push(Group {
                layer,
                vars: members.iter().map(|&i| i as u32).collect(),
            });
        }
        groups
    }

    #[test]
    fn groups_match_a_literal_implementation_of_the_rule() {
        // The literal rule is quadratic in the variables per group formed, so the smallest
        // groups get fewer variables: these tests also run unoptimised, once per mutant.
        for (group_size, n) in [(1, 600), (7, 1500), (128, 3000), (5000, 3000)] {
            let s = random_state(group_size, n, 5);
            assert!(s.frozen_count() > 0 && s.free_count() > 0);
            assert_eq!(s.layer(0), 4);
            assert_eq!(s.layer(n / 2), 9);
            assert_eq!(s.layer(n - 1), 4);
            for seed in [1, 2] {
                assert_eq!(
                    s.groups(&mut rng(seed)),
                    naive_groups(&s, &mut rng(seed)),
                    "group_size {group_size}"
                );
            }
        }
    }

    #[test]
    fn groups_partition_free_variables_at_resnet20_scale() {
        let n = 268_000;
        let s = random_state(128, n, 9);
        let groups = s.groups(&mut rng(3));
        let mut seen = vec![0u8; n];
        let mut previous_first = None;
        for g in &groups {
            assert!(!g.vars.is_empty() && g.vars.len() <= 128);
            for &v in &g.vars {
                seen[v as usize] += 1;
                assert_eq!(s.layer(v as usize), g.layer);
            }
            let key = |v: u32| s.confidence(v as usize);
            assert!(g.vars.windows(2).all(|w| key(w[0]) <= key(w[1])));
            // Each group starts at the least confident variable left, so the starts rise.
            let first = key(g.vars[0]);
            assert!(previous_first <= Some(first));
            previous_first = Some(first);
        }
        for (i, &count) in seen.iter().enumerate() {
            assert_eq!(
                usize::from(count),
                usize::from(!s.is_frozen(i)),
                "variable {i}"
            );
        }
        assert!(s.frozen_count() > 0);
    }

    #[test]
    fn same_seed_same_results() {
        let run = |seed: u64| {
            let mut s = random_state(16, 500, 1);
            let mut context: Vec<i8> = (0..500).map(|i| s.mode(i)).collect();
            let mut r = rng(seed);
            let mut history = Vec::new();
            for group in s.groups(&mut rng(seed ^ 1)) {
                let candidates = s.sample(&group.vars, &context, &mut r).unwrap();
                // Stand-in fitness: prefer low codes, so candidates matter.
                let score = |c: &Vec<i8>| c.iter().map(|&x| i32::from(x)).sum::<i32>();
                let mut ranked: Vec<&Vec<i8>> = candidates.iter().collect();
                ranked.sort_by_key(|c| score(c));
                if score(ranked[0]) < score(&candidates[0]) {
                    for (&v, &code) in group.vars.iter().zip(ranked[0]) {
                        context[v as usize] = code;
                    }
                }
                s.update(&group.vars, &ranked[..4]).unwrap();
                s.pin_frozen(&mut context).unwrap();
                history.push(candidates);
            }
            (s, context, history)
        };
        let (a, context_a, history_a) = run(42);
        let (b, context_b, history_b) = run(42);
        assert_eq!(history_a, history_b);
        assert_eq!(context_a, context_b);
        assert_eq!(a, b);
        let (c, _, history_c) = run(43);
        assert_ne!(history_a, history_c);
        assert_ne!(a, c);
    }

    #[test]
    fn state_round_trips_through_serde_and_rejects_corruption() {
        let s = random_state(32, 400, 2);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::to_string(&s).unwrap(), json);
        let restored: EdaState = serde_json::from_str(&json).unwrap();
        assert_eq!(restored, s);
        assert_eq!(restored.frozen_count(), s.frozen_count());
        let context: Vec<i8> = (0..400).map(|i| s.mode(i)).collect();
        let group = &s.groups(&mut rng(5))[0].vars;
        assert_eq!(
            restored.sample(group, &context, &mut rng(8)).unwrap(),
            s.sample(group, &context, &mut rng(8)).unwrap()
        );

        let corrupt = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
            edit(&mut value);
            serde_json::from_value::<EdaState>(value)
                .unwrap_err()
                .to_string()
        };
        let err = corrupt(&|v| v["probs"][3] = (v["probs"][3].as_u64().unwrap() + 1).into());
        assert!(err.contains("eda_state.probs[1]"), "{err}");
        let err = corrupt(&|v| v["layer_runs"][0]["start"] = 5.into());
        assert!(err.contains("eda_state.layer_runs"), "{err}");
        let err = corrupt(&|v| v["span"][7] = 9.into());
        assert!(err.contains("eda_state.span[7]"), "{err}");
        let err = corrupt(&|v| v["params"]["alpha"] = 0.0.into());
        assert!(err.contains("eda.alpha"), "{err}");
        // Arrays that disagree in length, one at a time.
        let err = corrupt(&|v| {
            v["span"].as_array_mut().unwrap().pop();
        });
        assert!(err.contains("eda_state.probs"), "{err}");
        let err = corrupt(&|v| {
            v["probs"].as_array_mut().unwrap().pop();
        });
        assert!(err.contains("eda_state.probs"), "{err}");
        // Layer runs must start strictly increasing, each below the variable count.
        assert!(
            json.matches("\"start\"").count() >= 2,
            "the state has several runs"
        );
        let err = corrupt(&|v| v["layer_runs"][1]["start"] = v["layer_runs"][0]["start"].clone());
        assert!(err.contains("eda_state.layer_runs"), "{err}");
        let err = corrupt(&|v| {
            let runs = v["layer_runs"].as_array_mut().unwrap();
            runs.push(serde_json::json!({"start": 400, "layer": 99}));
        });
        assert!(err.contains("eda_state.layer_runs"), "{err}");
        // Codes reach 127 and no further: an 8-bit variable at the top of its range
        // round-trips; a row that would run past 127 is refused.
        let top = EdaState::new(EdaParams::default(), [var(127, -128, 127, 0)]).unwrap();
        let top_json = serde_json::to_value(&top).unwrap();
        assert_eq!(
            serde_json::from_value::<EdaState>(top_json.clone()).unwrap(),
            top
        );
        let mut past = top_json;
        past["base"][0] = 127.into();
        let err = serde_json::from_value::<EdaState>(past)
            .unwrap_err()
            .to_string();
        assert!(err.contains("eda_state.span[0]"), "{err}");
        // A state of no variables at all is refused, not a panic.
        let err = corrupt(&|v| {
            for field in ["base", "span", "probs", "layer_runs"] {
                v[field] = serde_json::json!([]);
            }
        });
        assert!(err.contains("eda_state.base"), "{err}");
    }

    #[test]
    fn confidence_summaries_agree_with_per_variable_confidence() {
        let layers = [7u32, 7, 7, 2, 2, 7];
        let vars = layers.iter().map(|&l| var(0, -8, 7, l));
        let mut s = EdaState::new(EdaParams::default(), vars).unwrap();
        assert!((s.mean_confidence() - 0.8).abs() <= Q);
        let summaries = s.layer_summaries(10);
        assert_eq!(
            summaries.iter().map(|l| l.layer).collect::<Vec<_>>(),
            [2, 7]
        );
        assert_eq!(summaries[1].histogram[8], 4);

        s.update(&[0, 3], &[[-1i8, -1], [1, -1]]).unwrap();
        for _ in 0..4 {
            s.update(&[5], &[[0i8]]).unwrap();
        }
        assert!(s.is_frozen(5));
        let expected_mean = (0..6).map(|i| s.confidence(i)).sum::<f64>() / 6.0;
        assert!((s.mean_confidence() - expected_mean).abs() < 1e-12);
        for summary in s.layer_summaries(10) {
            let members: Vec<usize> = (0..6).filter(|&i| layers[i] == summary.layer).collect();
            assert_eq!(summary.variables, members.len());
            let frozen = members.iter().filter(|&&i| s.is_frozen(i)).count();
            assert_eq!(summary.frozen, frozen);
            let mean = members.iter().map(|&i| s.confidence(i)).sum::<f64>() / members.len() as f64;
            assert!((summary.mean_confidence - mean).abs() < 1e-12);
            let mut histogram = vec![0u64; 10];
            for &i in &members {
                histogram[((s.confidence(i) * 10.0) as usize).min(9)] += 1;
            }
            assert_eq!(summary.histogram, histogram, "layer {}", summary.layer);
        }
        // Confidence exactly 1 (a variable with a single allowed code) counts in the last
        // bin, not past it.
        let sure = EdaState::new(EdaParams::default(), [var(0, 0, 0, 4)]).unwrap();
        assert_eq!(sure.confidence(0), 1.0);
        assert_eq!(sure.layer_summaries(10)[0].histogram[9], 1);
    }

    /// The mean confidence is kept as a running integer total; it must equal a recount
    /// over every row after any sequence of updates, and after a checkpoint round trip.
    #[test]
    fn running_confidence_total_matches_a_recount() {
        for seed in 0..4 {
            let s = random_state(8, 500, seed);
            assert_eq!(s.confidence_total, s.sum_max_counts(), "seed {seed}");
            let recount = (0..500).map(|i| s.confidence(i)).sum::<f64>() / 500.0;
            assert!((s.mean_confidence() - recount).abs() < 1e-12);
            let back: EdaState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
            assert_eq!(back.confidence_total, s.confidence_total);
        }
    }

    fn free_vars(s: &EdaState) -> Vec<u32> {
        (0..s.num_variables() as u32)
            .filter(|&v| !s.is_frozen(v as usize))
            .collect()
    }

    /// Every free variable exactly once, no frozen one, each group inside one layer and
    /// no larger than the group size.
    fn assert_partition(s: &EdaState, groups: &[Group]) {
        let mut all: Vec<u32> = groups.iter().flat_map(|g| g.vars.clone()).collect();
        all.sort_unstable();
        assert_eq!(all, free_vars(s), "groups partition the free variables");
        for g in groups {
            assert!(!g.vars.is_empty() && g.vars.len() <= s.params().group_size);
            assert!(g.vars.iter().all(|&v| s.layer(v as usize) == g.layer));
        }
    }

    #[test]
    fn layer_groups_are_consecutive_runs_covering_each_layer_once() {
        let s = random_state(37, 3000, 8);
        assert!(
            s.frozen_count() > 0,
            "the test must exclude frozen variables"
        );
        let groups = s.layer_groups();
        assert_partition(&s, &groups);
        // Consecutive: within a group, no free variable of the layer lies between two
        // members; groups of a layer follow each other in index order.
        let free = free_vars(&s);
        for g in &groups {
            assert!(g.vars.windows(2).all(|w| w[0] < w[1]));
            let between = free
                .iter()
                .filter(|&&v| v > g.vars[0] && v < *g.vars.last().unwrap())
                .filter(|&&v| s.layer(v as usize) == g.layer)
                .count();
            assert_eq!(between, g.vars.len() - 2, "group skips a free variable");
        }
        // Each layer's groups are contiguous in the list, and only the last may be short.
        let mut seen = Vec::new();
        for (i, g) in groups.iter().enumerate() {
            let last_of_layer = groups.get(i + 1).is_none_or(|n| n.layer != g.layer);
            if !last_of_layer {
                assert_eq!(g.vars.len(), 37);
                assert!(g.vars.last() < groups[i + 1].vars.first());
            }
            if seen.last() != Some(&g.layer) {
                assert!(!seen.contains(&g.layer), "layer {} visited twice", g.layer);
                seen.push(g.layer);
            }
        }
        assert_eq!(groups, s.layer_groups(), "static grouping is fixed");
    }

    #[test]
    fn random_groups_partition_at_random_but_reproducibly() {
        let s = random_state(37, 3000, 8);
        let a = s.random_groups(&mut rng(1));
        assert_partition(&s, &a);
        assert_eq!(a, s.random_groups(&mut rng(1)), "same stream, same groups");
        let b = s.random_groups(&mut rng(2));
        assert_partition(&s, &b);
        assert_ne!(a, b);
        // Not the static or the confidence order: members are scattered over the layer.
        assert_ne!(a, s.layer_groups());
        assert_ne!(a, s.groups(&mut rng(1)));
        let sorted_groups = a
            .iter()
            .filter(|g| g.vars.windows(2).all(|w| w[0] < w[1]))
            .count();
        assert!(
            sorted_groups * 10 < a.len(),
            "groups look ordered, not random"
        );
        // Layers are interleaved in the cycle rather than visited one after another.
        let switches = a.windows(2).filter(|w| w[0].layer != w[1].layer).count();
        let layers = {
            let mut l: Vec<u32> = a.iter().map(|g| g.layer).collect();
            l.sort_unstable();
            l.dedup();
            l.len()
        };
        assert!(switches > 2 * layers, "{switches} layer switches");
    }

    #[test]
    fn joint_group_holds_every_free_variable() {
        let s = random_state(37, 3000, 8);
        let g = s.joint_group();
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].vars, free_vars(&s));
        assert_eq!(g[0].layer, s.layer(g[0].vars[0] as usize));
        // One candidate samples all of them at once.
        let context: Vec<i8> = (0..s.num_variables()).map(|i| s.mode(i)).collect();
        let cands = s.sample(&g[0].vars, &context, &mut rng(3)).unwrap();
        assert!(cands.iter().all(|c| c.len() == g[0].vars.len()));
        let all_frozen = EdaState::new(
            EdaParams {
                freeze_threshold: 0.5,
                ..EdaParams::default()
            },
            four_bit(10, 0),
        )
        .unwrap();
        assert!(all_frozen.joint_group().is_empty());
    }

    #[test]
    fn local_moves_change_exactly_k_variables_of_one_layer_within_allowed_codes() {
        let s = random_state(37, 3000, 8);
        let context: Vec<i8> = (0..s.num_variables()).map(|i| s.mode(i)).collect();
        let mut r = rng(4);
        let mut layers = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let (g, cands) = s.local_moves(&context, 9, 3, &mut r).unwrap();
            assert_eq!(cands.len(), 9);
            assert!(g.vars.windows(2).all(|w| w[0] < w[1]));
            assert!(g.vars.iter().all(|&v| s.layer(v as usize) == g.layer));
            layers.insert(g.layer);
            let ctx: Vec<i8> = g.vars.iter().map(|&v| context[v as usize]).collect();
            assert_eq!(cands[0], ctx, "candidate 0 is the context");
            for c in &cands[1..] {
                let moved = c.iter().zip(&ctx).filter(|(a, b)| a != b).count();
                assert_eq!(moved, 3, "each candidate moves exactly k variables");
                for (&v, &code) in g.vars.iter().zip(c) {
                    assert!(s.allowed_values(v as usize).contains(&code));
                }
            }
            // Every listed variable is moved by some candidate.
            for (pos, &code) in ctx.iter().enumerate() {
                assert!(cands[1..].iter().any(|c| c[pos] != code));
            }
        }
        assert_eq!(layers.len(), 4, "moves visit every layer");
        // Frozen variables are not special to local search, and the draws are
        // reproducible.
        assert_eq!(
            s.local_moves(&context, 5, 2, &mut rng(9)).unwrap(),
            s.local_moves(&context, 5, 2, &mut rng(9)).unwrap()
        );
        assert!(s.local_moves(&context, 5, 0, &mut rng(9)).is_err());
        assert!(s.local_moves(&context[1..], 5, 2, &mut rng(9)).is_err());

        // A variable with a single allowed code (a zero range) has nowhere to move: it is
        // never picked, however many of them there are.
        let vars = (0..40).map(|i| {
            if i % 4 == 0 {
                var(0, -8, 7, 0)
            } else {
                var(0, 0, 0, 0)
            }
        });
        let s = EdaState::new(EdaParams::default(), vars).unwrap();
        let context = vec![0i8; 40];
        for seed in 0..50 {
            let (g, cands) = s.local_moves(&context, 4, 2, &mut rng(seed)).unwrap();
            assert!(g.vars.iter().all(|&v| v % 4 == 0), "{:?}", g.vars);
            for c in &cands[1..] {
                assert_eq!(c.iter().filter(|&&x| x != 0).count(), 2);
            }
        }
    }
}
