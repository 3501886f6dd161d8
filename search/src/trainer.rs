//! EDA + cooperative coevolution as a pure state machine, free of networking and time.
//!
//! The coordinator's event loop asks for the next [`Generation`] (a batch, a group of
//! variables and the candidates to evaluate), has the workers evaluate it, and hands the
//! summed results back to [`Trainer::complete`]. Everything random comes from three ChaCha
//! streams seeded from the run seed: one draws batches, one draws candidates, one draws
//! random groups (`cc-random` only). Results are exact integer sums, so the sequence of
//! networks depends on the seed alone — never on how many workers there were or in which
//! order they answered.
//!
//! With `search.window = L` up to L generations are in flight: groups are searched side
//! by side, one generation of each at a time, generation `g` handed out when `g - L` has
//! merged and merged strictly in order (the caller refills the window after each merge).
//!
//! The [`Strategy`] picks what a generation searches; the grouping and sampling rules
//! themselves live in [`crate::eda`]. Group strategies (`eda-cc`, `cc-random`,
//! `cc-layer`, `eda`) share everything but the grouping: G generations per group, top-k
//! update, freezing, adoption. `hill` draws local moves each generation and only adopts;
//! `rtn` has no generations at all.

use std::collections::VecDeque;
use std::sync::Arc;

use ccq_common::qnet::{EvalStats, QNetwork};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::{Acceptance, Fitness, SearchConfig, Strategy};
use crate::eda::{EdaParams, EdaState, Group, Variable};
use crate::Error;

/// One generation: the work handed to the workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// Generation number, from 0.
    pub id: u64,
    /// Global training-split indices of the batch, ascending.
    pub images: Vec<u64>,
    /// The group's variables; every candidate gives one code per variable.
    pub vars: Vec<u32>,
    /// Candidate 0 is the context (the current global network).
    pub candidates: Vec<Vec<i8>>,
    /// Index into the network's layer list: the (first) layer the group touches.
    pub layer: u32,
    /// Scored by the group's block alone (`search.local_evaluations`); its batch comes
    /// from the local pool ([`SearchConfig::local_pool`]).
    #[serde(default)]
    pub local: bool,
}

/// What one completed generation changed.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The best candidate beat the context and was adopted.
    pub adopted: bool,
    /// Variables set in the global network, by adoption and by freezing.
    pub changes: Vec<(u32, i8)>,
    /// The code each of `changes` replaced, in the same order (what takes a network
    /// back to the version before this generation).
    pub replaced: Vec<i8>,
    /// Mean cross-entropy of the best candidate on the batch.
    pub best_loss: f64,
    /// Its top-1 on the batch, percent.
    pub best_top1: f64,
}

/// What [`Trainer::roll_back`] changed in the global network.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Rollback {
    /// Variables set, and their new codes.
    pub changes: Vec<(u32, i8)>,
    /// The code each of `changes` replaced, in the same order.
    pub replaced: Vec<i8>,
}

/// Counters that reports and budgets read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub generations: u64,
    pub evaluations: u64,
    /// Completed passes over the free variables.
    pub cycles: u64,
    pub groups: u64,
    pub adoptions: u64,
    /// Times every variable had frozen and the distributions were re-centred
    /// (`search.restarts`).
    #[serde(default)]
    pub restarts: u64,
    /// Times the search went back to the best network (`search.rollback`).
    #[serde(default)]
    pub rollbacks: u64,
}

/// Everything a [`Trainer`] needs to continue exactly where it was, apart from the
/// quantized network it started from (which a resumed run rebuilds and checks).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerSnapshot {
    pub codes: Vec<i8>,
    pub eda: EdaState,
    /// Positions of the two ChaCha streams (words consumed), as decimal strings because
    /// JSON numbers cannot carry 128 bits. The seeds are derived from the run seed.
    pub batch_rng_pos: String,
    pub sample_rng_pos: String,
    /// Position of the grouping stream; absent in checkpoints written before strategies
    /// existed (which never used it, so position 0 is exact).
    #[serde(default)]
    pub group_rng_pos: Option<String>,
    pub queue: GroupQueue,
    /// The groups in progress (one, or up to `search.window` with a window).
    pub active: Vec<Active>,
    pub progress: Progress,
    /// A candidate waiting for its confirmation (`search.acceptance = "confirm"`).
    #[serde(default)]
    pub pending: Option<Pending>,
    /// The generations handed out and not merged yet, oldest first (`search.window`); a
    /// resumed run evaluates them again.
    #[serde(default)]
    pub in_flight: Vec<Generation>,
}

/// A group in progress. Its generations run one after another, each sampling from the
/// distribution the one before updated; a window runs several groups side by side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Active {
    pub group: Group,
    /// Its generations handed out so far.
    pub issued: usize,
    /// Its generation in flight, if any.
    pub in_flight: Option<u64>,
}

/// A candidate that beat the context on its batch and waits to be confirmed on a fresh
/// one before it is adopted (`search.acceptance = "confirm"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    /// Its group's variables and its code for each; variables that froze when it was
    /// selected carry their pinned mode.
    pub vars: Vec<u32>,
    pub codes: Vec<i8>,
    pub layer: u32,
}

/// The groups left in a cycle. A cycle's groups are formed once and only taken from the
/// front, so they are kept whole behind a reference count with a cursor: a snapshot
/// shares them (up to 4 bytes per free variable that a checkpoint need not copy), and
/// sees, like the serialised form, only the groups not yet started. The cycle's groups
/// are freed together when the next cycle replaces them.
#[derive(Debug, Clone, Default)]
pub struct GroupQueue {
    groups: Arc<Vec<Group>>,
    next: usize,
}

impl GroupQueue {
    /// The groups not yet started, in order.
    pub fn remaining(&self) -> &[Group] {
        &self.groups[self.next..]
    }

    pub fn is_empty(&self) -> bool {
        self.remaining().is_empty()
    }

    fn pop_front(&mut self) -> Option<Group> {
        let g = self.remaining().first().cloned();
        self.next += usize::from(g.is_some());
        g
    }
}

impl From<Vec<Group>> for GroupQueue {
    fn from(groups: Vec<Group>) -> Self {
        GroupQueue {
            groups: Arc::new(groups),
            next: 0,
        }
    }
}

impl PartialEq for GroupQueue {
    fn eq(&self, other: &Self) -> bool {
        self.remaining() == other.remaining()
    }
}

/// A sequence of the remaining groups, as `Vec<Group>` was.
impl Serialize for GroupQueue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.remaining().serialize(s)
    }
}

impl<'de> Deserialize<'de> for GroupQueue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<Group>::deserialize(d).map(GroupQueue::from)
    }
}

pub struct Trainer {
    search: SearchConfig,
    net: QNetwork,
    codes: Vec<i8>,
    eda: EdaState,
    batch_rng: ChaCha8Rng,
    sample_rng: ChaCha8Rng,
    group_rng: ChaCha8Rng,
    /// Batches are drawn from training indices `0..search_len`.
    search_len: usize,
    /// Groups left in this cycle, and the ones in progress.
    queue: GroupQueue,
    active: Vec<Active>,
    progress: Progress,
    /// The candidate the next generation confirms or rejects.
    pending: Option<Pending>,
    /// Generations handed out and not merged yet, oldest first: at most `window`.
    in_flight: VecDeque<Generation>,
    /// Generations in flight at once, resolved from the config and the network.
    window: usize,
}

impl Trainer {
    /// Generations in flight at once (`search.window`, or its default for this network:
    /// `SearchConfig::window_for`).
    pub fn window(&self) -> usize {
        self.window
    }

    pub fn new(
        net: QNetwork,
        eda: EdaParams,
        search: SearchConfig,
        seed: u64,
        search_len: usize,
    ) -> Result<Trainer, Error> {
        if search_len == 0 {
            return Err(Error::setting(
                "data.validation",
                search_len,
                "leaves no training images to search on",
            ));
        }
        let codes = net.codes();
        let window = search.window_for(net.num_vars(), eda.group_size);
        let eda = EdaState::new(eda, variables(&net, &codes))?;
        Ok(Trainer {
            search,
            net,
            codes,
            eda,
            batch_rng: batch_rng(seed),
            sample_rng: sample_rng(seed),
            group_rng: group_rng(seed),
            search_len,
            queue: GroupQueue::default(),
            active: Vec::new(),
            progress: Progress::default(),
            pending: None,
            in_flight: VecDeque::new(),
            window,
        })
    }

    /// The state to put in a checkpoint. Cheap to take on the event loop and to hold
    /// while it is written elsewhere: the codes are copied (a byte per variable), the EDA
    /// state and the group queue are shared with the live trainer, copy on write.
    pub fn snapshot(&self) -> TrainerSnapshot {
        TrainerSnapshot {
            codes: self.codes.clone(),
            eda: self.eda.clone(),
            batch_rng_pos: self.batch_rng.get_word_pos().to_string(),
            sample_rng_pos: self.sample_rng.get_word_pos().to_string(),
            group_rng_pos: Some(self.group_rng.get_word_pos().to_string()),
            queue: self.queue.clone(),
            active: self.active.clone(),
            progress: self.progress,
            pending: self.pending.clone(),
            in_flight: self.in_flight.iter().cloned().collect(),
        }
    }

    /// Continues from a snapshot taken of a trainer built with the same network, EDA
    /// parameters, search settings and seed. Every part is checked against `net` first:
    /// a snapshot that does not fit is an error, never a half-restored trainer.
    pub fn restore(
        net: QNetwork,
        search: SearchConfig,
        seed: u64,
        search_len: usize,
        snap: TrainerSnapshot,
        origin: &str,
    ) -> Result<Trainer, Error> {
        let bad = |field: &str, why: String| Error::Snapshot {
            origin: origin.to_string(),
            reason: format!("trainer.{field}: {why}"),
        };
        let n = net.num_vars();
        if snap.codes.len() != n || snap.eda.num_variables() != n {
            return Err(bad(
                "codes",
                format!(
                    "holds {} codes and {} distributions, the network has {n} variables",
                    snap.codes.len(),
                    snap.eda.num_variables()
                ),
            ));
        }
        for (i, &c) in snap.codes.iter().enumerate() {
            if !snap.eda.allowed_values(i).contains(&c) {
                return Err(bad(
                    "codes",
                    format!(
                        "variable {i} has code {c}, outside its allowed range {:?}",
                        snap.eda.allowed_values(i)
                    ),
                ));
            }
        }
        let groups = (snap.queue.remaining().iter()).chain(snap.active.iter().map(|a| &a.group));
        for g in groups {
            if let Some(&v) = g.vars.iter().find(|&&v| v as usize >= n) {
                return Err(bad("queue", format!("group names variable {v} of {n}")));
            }
        }
        if let Some(p) = &snap.pending {
            if p.vars.len() != p.codes.len() {
                return Err(bad(
                    "pending",
                    format!("{} variables but {} codes", p.vars.len(), p.codes.len()),
                ));
            }
            for (&v, &c) in p.vars.iter().zip(&p.codes) {
                if v as usize >= n {
                    return Err(bad("pending", format!("names variable {v} of {n}")));
                }
                if !snap.eda.allowed_values(v as usize).contains(&c) {
                    return Err(bad(
                        "pending",
                        format!("variable {v} has code {c}, outside its allowed range"),
                    ));
                }
            }
        }
        for (k, g) in snap.in_flight.iter().enumerate() {
            let field = format!("in_flight[{k}]");
            if g.id != snap.progress.generations + k as u64 {
                return Err(bad(
                    &field,
                    format!(
                        "is generation {}, expected {} (generations merge in order)",
                        g.id,
                        snap.progress.generations + k as u64
                    ),
                ));
            }
            if let Some(&v) = g.vars.iter().find(|&&v| v as usize >= n) {
                return Err(bad(&field, format!("names variable {v} of {n}")));
            }
            if let Some(&i) = g.images.iter().find(|&&i| i >= search_len as u64) {
                return Err(bad(
                    &field,
                    format!("names image {i} of the {search_len} searched"),
                ));
            }
            if g.local {
                // Its jobs carry the pool's block targets, so its images must be there.
                let pool = search.local_pool(search_len);
                if search.local_evaluations == 0 {
                    return Err(bad(
                        &field,
                        "is block-local in a run without that phase".into(),
                    ));
                }
                if let Some(&i) = g.images.iter().find(|i| pool.binary_search(i).is_err()) {
                    return Err(bad(
                        &field,
                        format!("is block-local but names image {i}, not in the local pool"),
                    ));
                }
            }
            for c in &g.candidates {
                if c.len() != g.vars.len() {
                    return Err(bad(
                        &field,
                        format!(
                            "a candidate has {} codes for {} variables",
                            c.len(),
                            g.vars.len()
                        ),
                    ));
                }
                for (&v, &code) in g.vars.iter().zip(c) {
                    if !snap.eda.allowed_values(v as usize).contains(&code) {
                        return Err(bad(
                            &field,
                            format!("variable {v} has code {code}, outside its allowed range"),
                        ));
                    }
                }
            }
        }
        for a in &snap.active {
            if let Some(id) = a
                .in_flight
                .filter(|id| !snap.in_flight.iter().any(|g| g.id == *id))
            {
                return Err(bad(
                    "active",
                    format!("a group's generation {id} is not among those in flight"),
                ));
            }
        }
        let pos = |field: &str, s: &str| {
            s.parse::<u128>()
                .map_err(|_| bad(field, format!("{s:?} is not a stream position")))
        };
        let mut batch = batch_rng(seed);
        batch.set_word_pos(pos("batch_rng_pos", &snap.batch_rng_pos)?);
        let mut sample = sample_rng(seed);
        sample.set_word_pos(pos("sample_rng_pos", &snap.sample_rng_pos)?);
        let mut group = group_rng(seed);
        if let Some(p) = &snap.group_rng_pos {
            group.set_word_pos(pos("group_rng_pos", p)?);
        }
        let mut net = net;
        net.set_codes(&snap.codes)?;
        let window = search.window_for(net.num_vars(), snap.eda.params().group_size);
        Ok(Trainer {
            search,
            net,
            codes: snap.codes,
            eda: snap.eda,
            batch_rng: batch,
            sample_rng: sample,
            group_rng: group,
            search_len,
            queue: snap.queue,
            active: snap.active,
            progress: snap.progress,
            pending: snap.pending,
            in_flight: snap.in_flight.into(),
            window,
        })
    }

    pub fn network(&self) -> &QNetwork {
        &self.net
    }
    pub fn eda(&self) -> &EdaState {
        &self.eda
    }
    pub fn progress(&self) -> Progress {
        self.progress
    }
    pub fn strategy(&self) -> Strategy {
        self.search.strategy
    }

    /// The generations handed out and not merged yet, oldest first.
    pub fn in_flight(&self) -> &VecDeque<Generation> {
        &self.in_flight
    }

    /// The next generation, or `None` when none can start now: the window is full, a
    /// cycle ends and waits for the generations in flight, or — with nothing in flight —
    /// there is nothing left to search (every variable is frozen, or the strategy is
    /// `rtn`). The generation is in flight until [`Trainer::complete`] merges it.
    pub fn next_generation(&mut self) -> Result<Option<Generation>, Error> {
        if self.in_flight.len() >= self.window {
            return Ok(None);
        }
        let generation = self.draw_generation()?;
        if let Some(g) = &generation {
            self.in_flight.push_back(g.clone());
        }
        Ok(generation)
    }

    fn draw_generation(&mut self) -> Result<Option<Generation>, Error> {
        let id = self.progress.generations + self.in_flight.len() as u64;
        if let Some(p) = &self.pending {
            // The context and the pending candidate, on a fresh batch. The pending
            // candidate stays set until `complete` decides, so that a snapshot taken
            // while this generation is out resumes into the same decision.
            let context = p.vars.iter().map(|&v| self.codes[v as usize]).collect();
            let (vars, codes, layer) = (p.vars.clone(), p.codes.clone(), p.layer);
            let local = self.local();
            let images = self.draw_batch(local);
            return Ok(Some(Generation {
                id,
                images,
                vars,
                candidates: vec![context, codes],
                layer,
                local,
            }));
        }
        match self.search.strategy {
            Strategy::Rtn => return Ok(None),
            Strategy::Hill => {
                let images = self.draw_batch(false);
                let (group, candidates) = self.eda.local_moves(
                    &self.codes,
                    self.eda.params().population,
                    self.search.hill_flips,
                    &mut self.sample_rng,
                )?;
                return Ok(Some(Generation {
                    id,
                    images,
                    vars: group.vars,
                    candidates,
                    layer: group.layer,
                    local: false,
                }));
            }
            Strategy::EdaCc | Strategy::CcRandom | Strategy::CcLayer | Strategy::Eda => {}
        }
        // The oldest group in progress with no generation in flight; else a new group,
        // while the window has room for it.
        let free = self.active.iter().position(|a| a.in_flight.is_none());
        let slot = if let Some(k) = free {
            k
        } else {
            if self.queue.is_empty() {
                if !self.in_flight.is_empty() {
                    // A new cycle's groups are formed from every generation's results.
                    return Ok(None);
                }
                if self.progress.groups > 0 {
                    self.progress.cycles += 1;
                }
                self.queue = self.groups().into();
                if self.queue.is_empty() && self.search.restarts {
                    // Every variable has frozen: re-centre each distribution on the
                    // variable's current code and search on from there.
                    self.recentre()?;
                    self.progress.restarts += 1;
                    self.queue = self.groups().into();
                }
                if self.queue.is_empty() {
                    return Ok(None);
                }
            }
            let group = self.queue.pop_front().expect("queue is not empty");
            self.active.push(Active {
                group,
                issued: 0,
                in_flight: None,
            });
            self.active.len() - 1
        };
        let local = self.local();
        let images = self.draw_batch(local);
        let a = &mut self.active[slot];
        let candidates = self
            .eda
            .sample(&a.group.vars, &self.codes, &mut self.sample_rng)?;
        a.issued += 1;
        a.in_flight = Some(id);
        Ok(Some(Generation {
            id,
            images,
            vars: a.group.vars.clone(),
            candidates,
            layer: a.group.layer,
            local,
        }))
    }

    /// Sets the global network to `codes` (the best network a validation measurement
    /// found, `search.rollback`) and re-centres every distribution on them, as a restart
    /// does; the cycle in progress ends, along with any candidate awaiting its
    /// confirmation. Only between generations: with any in flight it is refused and
    /// nothing changes.
    pub fn roll_back(&mut self, codes: &[i8]) -> Result<Rollback, Error> {
        if !self.in_flight.is_empty() {
            return Err(Error::Rollback(format!(
                "{} generation(s) in flight",
                self.in_flight.len()
            )));
        }
        if codes.len() != self.codes.len() {
            return Err(Error::Rollback(format!(
                "{} codes for a network of {} variables",
                codes.len(),
                self.codes.len()
            )));
        }
        // Within each layer's code range (not the distributions' current range: the
        // best network may predate a restart that moved them).
        if let Some((i, v)) = (variables(&self.net, codes).enumerate())
            .find(|(_, v)| !(v.lo..=v.hi).contains(&v.initial))
        {
            return Err(Error::Rollback(format!(
                "variable {i} has code {}, outside its layer's range {}..={}",
                v.initial, v.lo, v.hi
            )));
        }
        let mut out = Rollback::default();
        for (i, (&new, old)) in codes.iter().zip(self.codes.iter_mut()).enumerate() {
            if new != *old {
                out.changes.push((i as u32, new));
                out.replaced.push(*old);
                *old = new;
            }
        }
        if !out.changes.is_empty() {
            self.net.apply_changes(&out.changes)?;
        }
        self.recentre()?;
        // The groups left were formed from the old distributions: a new cycle starts.
        self.queue = GroupQueue::default();
        self.active.clear();
        self.pending = None;
        self.progress.rollbacks += 1;
        Ok(out)
    }

    /// Fresh distributions, each centred on its variable's current code (a restart, and
    /// a rollback once the codes are set).
    fn recentre(&mut self) -> Result<(), Error> {
        let params = self.eda.params().clone();
        self.eda = EdaState::new(params, variables(&self.net, &self.codes))?;
        Ok(())
    }

    /// Whether `candidate`'s gain over `context` on the same images clears
    /// `search.margin` (always, with margin 0 and a lower loss: the caller has compared
    /// the fitness keys already).
    fn credible(&self, candidate: &EvalStats, context: &EvalStats) -> bool {
        self.search.margin <= 0.0 || candidate.beats_by_margin(context, self.search.margin)
    }

    /// The next cycle's groups of free variables, as the strategy forms them.
    fn groups(&mut self) -> Vec<Group> {
        match self.search.strategy {
            Strategy::CcRandom => self.eda.random_groups(&mut self.group_rng),
            Strategy::CcLayer => self.eda.layer_groups(),
            Strategy::Eda => self.eda.joint_group(),
            _ => self.eda.groups(&mut self.group_rng),
        }
    }

    /// Whether the next generation belongs to the block-local phase.
    fn local(&self) -> bool {
        self.progress.evaluations < self.search.local_evaluations
    }

    /// A fresh batch from the search part of the training split (from the local pool in
    /// the block-local phase), ascending.
    fn draw_batch(&mut self, local: bool) -> Vec<u64> {
        let pool = local.then(|| self.search.local_pool(self.search_len));
        let from = pool.as_ref().map_or(self.search_len, Vec::len);
        let batch = self.search.batch_size.min(from);
        let mut images: Vec<u64> = rand::seq::index::sample(&mut self.batch_rng, from, batch)
            .into_iter()
            .map(|i| pool.as_ref().map_or(i as u64, |p| p[i]))
            .collect();
        images.sort_unstable();
        images
    }

    /// Selection, distribution update, adoption and freezing for a generation whose
    /// candidates scored `stats` (summed over the whole batch, in candidate order). It
    /// must be the oldest generation in flight: generations merge in order. Refused
    /// results change nothing.
    pub fn complete(
        &mut self,
        generation: &Generation,
        stats: &[EvalStats],
    ) -> Result<Outcome, Error> {
        // Checked against the generation as it was handed out: refused results change
        // nothing.
        let Some(out) = self.in_flight.front().filter(|g| g.id == generation.id) else {
            return Err(Error::Results(format!(
                "generation {} completed, but the oldest in flight is {}",
                generation.id,
                (self.in_flight.front()).map_or_else(|| "none".to_string(), |g| g.id.to_string())
            )));
        };
        let n = out.candidates.len();
        if generation.candidates.len() != n
            || stats.len() != n
            || stats.iter().any(|s| s.images != out.images.len() as u64)
        {
            return Err(Error::Results(format!(
                "generation {} got {} results over {:?} images for {n} candidates of {} images",
                generation.id,
                stats.len(),
                stats.iter().map(|s| s.images).collect::<Vec<_>>(),
                out.images.len()
            )));
        }
        let fitness = self.search.fitness;
        let key = |i: usize| -> (u64, u64, usize) {
            let s = &stats[i];
            match fitness {
                // The loss is the distillation loss when the jobs carry a teacher.
                Fitness::Loss | Fitness::Distill => (s.loss_fixed, 0, i),
                Fitness::Error => (s.images - s.correct, s.loss_fixed, i),
            }
        };
        if self.pending.is_some() {
            return self.confirm(stats, n, key);
        }
        let generation = self.in_flight.pop_front().expect("checked above");
        // Its group may hand out its next generation, or is done.
        if let Some(k) = (self.active.iter()).position(|a| a.in_flight == Some(generation.id)) {
            self.active[k].in_flight = None;
            if self.active[k].issued >= self.search.generations_per_group {
                self.active.remove(k);
                self.progress.groups += 1;
            }
        }
        let generation = &generation;
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| key(i));
        let k = self.eda.params().top_k.min(n);
        let selected: Vec<&Vec<i8>> = order[..k]
            .iter()
            .map(|&i| &generation.candidates[i])
            .collect();
        let best = order[0];
        let wins = best != 0 && key(best) < key(0) && self.credible(&stats[best], &stats[0]);
        let confirm = wins && self.search.acceptance == Acceptance::Confirm;
        let adopted = wins && !confirm;

        let mut changes = Vec::new();
        let mut replaced = Vec::new();
        if adopted {
            for (&v, &c) in generation.vars.iter().zip(&generation.candidates[best]) {
                if self.codes[v as usize] != c {
                    replaced.push(self.codes[v as usize]);
                    self.codes[v as usize] = c;
                    changes.push((v, c));
                }
            }
        }
        // Local search keeps no model: nothing to update, nothing ever freezes.
        let frozen = match self.search.strategy {
            Strategy::Hill => Vec::new(),
            _ => self.eda.update(&generation.vars, &selected)?,
        };
        for v in frozen {
            let mode = self.eda.mode(v as usize);
            if self.codes[v as usize] != mode {
                // Adopted and then pinned: one change, from the code before adoption.
                let old = match changes.iter().position(|&(x, _)| x == v) {
                    Some(k) => {
                        changes.remove(k);
                        replaced.remove(k)
                    }
                    None => self.codes[v as usize],
                };
                self.codes[v as usize] = mode;
                changes.push((v, mode));
                replaced.push(old);
            }
        }
        if !changes.is_empty() {
            self.net.apply_changes(&changes)?;
        }
        if confirm {
            // Frozen variables keep their pinned mode; a candidate left equal to the
            // context has nothing to confirm.
            let codes: Vec<i8> = (generation.vars.iter().zip(&generation.candidates[best]))
                .map(|(&v, &c)| {
                    if self.eda.is_frozen(v as usize) {
                        self.codes[v as usize]
                    } else {
                        c
                    }
                })
                .collect();
            if (generation.vars.iter().zip(&codes)).any(|(&v, &c)| self.codes[v as usize] != c) {
                self.pending = Some(Pending {
                    vars: generation.vars.clone(),
                    codes,
                    layer: generation.layer,
                });
            }
        }

        self.progress.generations += 1;
        self.progress.evaluations += n as u64;
        self.progress.adoptions += adopted as u64;
        let s = &stats[best];
        Ok(Outcome {
            adopted,
            changes,
            replaced,
            best_loss: s.mean_loss(),
            best_top1: s.top1(),
        })
    }

    /// Completes a confirmation generation (candidate 0 the context, 1 the pending
    /// candidate): the candidate is adopted when it beats the context again. The group's
    /// distribution has learnt from its own generation already; this only decides.
    fn confirm(
        &mut self,
        stats: &[EvalStats],
        n: usize,
        key: impl Fn(usize) -> (u64, u64, usize),
    ) -> Result<Outcome, Error> {
        // Checked before the candidate is taken: refused results change nothing.
        if n != 2 {
            return Err(Error::Results(format!(
                "confirmation generation got {n} candidates, expected 2"
            )));
        }
        self.in_flight.pop_front();
        let p = self
            .pending
            .take()
            .expect("a confirmation has a pending candidate");
        let adopted = key(1) < key(0) && self.credible(&stats[1], &stats[0]);
        let mut changes = Vec::new();
        let mut replaced = Vec::new();
        if adopted {
            for (&v, &c) in p.vars.iter().zip(&p.codes) {
                // A variable frozen since is pinned at its mode.
                if self.codes[v as usize] != c && !self.eda.is_frozen(v as usize) {
                    replaced.push(self.codes[v as usize]);
                    self.codes[v as usize] = c;
                    changes.push((v, c));
                }
            }
            self.net.apply_changes(&changes)?;
        }
        self.progress.generations += 1;
        self.progress.evaluations += n as u64;
        self.progress.adoptions += adopted as u64;
        let s = &stats[usize::from(adopted)];
        Ok(Outcome {
            adopted,
            changes,
            replaced,
            best_loss: s.mean_loss(),
            best_top1: s.top1(),
        })
    }
}

/// The network's variables, each centred on its code in `codes`. One pass over the flat
/// codes (an exact-size iterator, so that `EdaState::new` allocates its per-variable
/// arrays once, at their final size: a flat_map of the layers gives no size hint and the
/// arrays would grow by doubling to up to twice the memory they need). Layers are
/// contiguous and in order.
fn variables<'a>(
    net: &'a QNetwork,
    codes: &'a [i8],
) -> impl ExactSizeIterator<Item = Variable> + 'a {
    let layers = &net.layers;
    let mut li = 0;
    codes.iter().enumerate().map(move |(i, &c)| {
        while i >= layers[li].offset + layers[li].len {
            li += 1;
        }
        let l = &layers[li];
        Variable {
            initial: c,
            lo: l.lo,
            hi: l.hi,
            layer: li as u32,
        }
    })
}

// Distinct streams: changing the batch size must not change the candidates.
fn batch_rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ 0xba7c4e5)
}

fn sample_rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ 0x5a3b1e)
}

fn group_rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ 0x6e0c9a7)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DEFAULT_WINDOW, WINDOW_SHARE};
    use ccq_common::fitness::evaluate_candidates;
    use ccq_common::model::Normalization;
    use ccq_common::qnet::{Targets, VarKind};
    use ccq_common::quant::{quantize, Calibration, QuantConfig, Rounding, WeightScale};
    use rand::Rng;

    fn setup() -> (QNetwork, Vec<u8>, Vec<u8>) {
        setup_with(None, None)
    }

    fn setup_with(
        channel_scale_step: Option<f64>,
        act_clip_step: Option<f64>,
    ) -> (QNetwork, Vec<u8>, Vec<u8>) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../common/tests/fixtures/mnist_cnn.onnx");
        let graph = ccq_common::onnx::load_onnx(&path).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let n = 120;
        let pixels: Vec<u8> = (0..n * 784).map(|_| rng.random()).collect();
        let labels: Vec<u8> = (0..n).map(|_| rng.random_range(0..10)).collect();
        let q = QuantConfig {
            weight_bits: 2,
            act_bits: 8,
            calibration: Calibration::Max,
            weight_scale: WeightScale::Max,
            rounding: Rounding::Nearest,
            bias_correction: false,
            first_last_bits: None,
            channel_scale_step,
            act_clip_step,
        };
        let net = quantize(&graph, &Normalization::identity(1), &pixels, n, &q).unwrap();
        (net, pixels, labels)
    }

    /// Candidates only carry the group's variables and candidate 0 is the context; a
    /// generation changes nothing outside its group; a frozen variable never changes
    /// again and sits at its mode.
    #[test]
    fn generations_touch_only_their_group_and_frozen_variables_stay_put() {
        let (net, pixels, labels) = setup();
        let eda = EdaParams {
            population: 6,
            top_k: 2,
            group_size: 16,
            alpha: 0.9,
            freeze_threshold: 0.95,
            ..EdaParams::default()
        };
        let search = SearchConfig {
            generations_per_group: 2,
            batch_size: 48,
            window: Some(1),
            fitness: Fitness::Loss,
            ..SearchConfig::default()
        };
        let mut t = Trainer::new(net, eda, search, 11, labels.len()).unwrap();
        let mut frozen_at: std::collections::HashMap<usize, i8> = Default::default();
        let mut adoptions = 0;
        for _ in 0..150 {
            let g = t.next_generation().unwrap().unwrap();
            let before = t.network().codes();
            assert!(g.candidates.iter().all(|c| c.len() == g.vars.len()));
            let context: Vec<i8> = g.vars.iter().map(|&v| before[v as usize]).collect();
            assert_eq!(g.candidates[0], context, "candidate 0 is the context");
            let layer = t.network().layer_of(g.vars[0] as usize);
            assert!(
                g.vars
                    .iter()
                    .all(|&v| t.network().layer_of(v as usize) == layer),
                "one layer per group"
            );
            let il = 784;
            let px: Vec<u8> = g
                .images
                .iter()
                .flat_map(|&i| pixels[i as usize * il..(i as usize + 1) * il].to_vec())
                .collect();
            let lb: Vec<u8> = g.images.iter().map(|&i| labels[i as usize]).collect();
            let stats = evaluate_candidates(
                t.network(),
                &px,
                &Targets::labels(&lb),
                &g.vars,
                &g.candidates,
                1,
            )
            .unwrap();
            let out = t.complete(&g, &stats).unwrap();
            adoptions += out.adopted as usize;
            let after = t.network().codes();
            for (i, (a, b)) in before.iter().zip(&after).enumerate() {
                if a != b {
                    assert!(
                        g.vars.contains(&(i as u32)),
                        "variable {i} outside the group changed"
                    );
                }
            }
            for (&v, &code) in &frozen_at {
                assert_eq!(after[v], code, "frozen variable {v} changed");
            }
            for (i, &code) in after.iter().enumerate() {
                if t.eda().is_frozen(i) {
                    assert_eq!(
                        code,
                        t.eda().mode(i),
                        "frozen variable {i} is not at its mode"
                    );
                    frozen_at.entry(i).or_insert(code);
                }
            }
        }
        assert!(!frozen_at.is_empty(), "the test must exercise freezing");
        assert!(adoptions > 0, "the test must exercise adoption");
    }

    /// Same seed, same sequence of batches and candidates.
    /// Channel scale variables are grouped per layer like codes, searched, and adopted;
    /// the network stays consistent (its stages follow its scale codes) and a snapshot
    /// restores the scales with everything else.
    #[test]
    fn channel_scales_are_searched_and_adopted() {
        let (net, pixels, labels) = setup_with(Some(0.125), None);
        let first_scale = (net.layers.iter())
            .find(|l| l.kind == VarKind::Scales)
            .map(|l| l.offset)
            .unwrap();
        let eda = EdaParams {
            population: 8,
            top_k: 2,
            group_size: 64,
            ..EdaParams::default()
        };
        let search = SearchConfig {
            generations_per_group: 2,
            batch_size: 48,
            window: Some(1),
            ..SearchConfig::default()
        };
        let mut t = Trainer::new(net, eda, search.clone(), 3, labels.len()).unwrap();
        let (mut scale_generations, mut moved) = (0, false);
        for _ in 0..400 {
            let (g, _) = run_one(&mut t, &pixels, &labels).unwrap();
            scale_generations += usize::from(g.vars[0] as usize >= first_scale);
            moved |= t.network().codes()[first_scale..].iter().any(|&k| k != 0);
            if moved && scale_generations >= 4 {
                break;
            }
        }
        assert!(
            scale_generations >= 4,
            "{scale_generations} generations on scales"
        );
        assert!(moved, "no scale change adopted");
        t.network().validate("searched").unwrap();
        let snap = t.snapshot();
        let (fresh, _, _) = setup_with(Some(0.125), None);
        let back = Trainer::restore(fresh, search, 3, labels.len(), snap, "snapshot").unwrap();
        assert_eq!(back.network().codes(), t.network().codes());
        back.network().validate("restored").unwrap();
    }

    /// Activation clips are searched like codes: generations draw them into groups, a
    /// moved clip is adopted, the network stays consistent (stages, biases and adds follow
    /// the scales) and a snapshot restores the clips with everything else.
    #[test]
    fn activation_clips_are_searched_and_adopted() {
        let (net, pixels, labels) = setup_with(None, Some(0.125));
        let clip_layer = net.layers.last().unwrap().clone();
        assert_eq!(clip_layer.kind, VarKind::Clip);
        let first_clip = clip_layer.offset;
        let eda = EdaParams {
            population: 8,
            top_k: 2,
            group_size: 8,
            p0: 0.5,
            ..EdaParams::default()
        };
        let search = SearchConfig {
            generations_per_group: 2,
            batch_size: 48,
            window: Some(1),
            ..SearchConfig::default()
        };
        let mut t = Trainer::new(net, eda, search.clone(), 3, labels.len()).unwrap();
        let (mut clip_generations, mut moved) = (0, false);
        for _ in 0..2000 {
            let Some((g, _)) = run_one(&mut t, &pixels, &labels) else {
                break;
            };
            clip_generations += usize::from(g.vars.iter().any(|&v| v as usize >= first_clip));
            moved |= t.network().clips.iter().any(|c| c.code != 0);
            if moved && clip_generations >= 2 {
                break;
            }
        }
        assert!(
            clip_generations >= 2,
            "{clip_generations} generations on clips"
        );
        assert!(moved, "no clip change adopted");
        t.network().validate("searched").unwrap();
        let snap = t.snapshot();
        let (fresh, _, _) = setup_with(None, Some(0.125));
        let back = Trainer::restore(fresh, search, 3, labels.len(), snap, "snapshot").unwrap();
        assert_eq!(back.network().codes(), t.network().codes());
        assert_eq!(back.network().clips, t.network().clips);
        back.network().validate("restored").unwrap();
    }

    #[test]
    fn generations_are_reproducible() {
        let (net, _, labels) = setup();
        let mk = || {
            Trainer::new(
                net.clone(),
                EdaParams::default(),
                SearchConfig::default(),
                3,
                labels.len(),
            )
            .unwrap()
        };
        let (mut a, mut b) = (mk(), mk());
        for _ in 0..3 {
            assert_eq!(a.next_generation().unwrap(), b.next_generation().unwrap());
        }
        let mut c = Trainer::new(
            net.clone(),
            EdaParams::default(),
            SearchConfig::default(),
            4,
            labels.len(),
        )
        .unwrap();
        assert_ne!(
            mk().next_generation().unwrap(),
            c.next_generation().unwrap()
        );
    }

    /// An unset window is resolved from the network when the trainer is built, and again
    /// identically when it is restored; a set one is kept.
    #[test]
    fn an_unset_window_is_sized_to_the_network() {
        let (net, _, labels) = setup();
        let n = net.num_vars();
        let mk = |eda: EdaParams, search: SearchConfig| {
            Trainer::new(net.clone(), eda, search, 3, labels.len()).unwrap()
        };
        let groups = |group_size| EdaParams {
            group_size,
            ..EdaParams::default()
        };
        // One group in 64 of the network's: groups of one variable give n / 64 of them.
        let t = mk(groups(1), SearchConfig::default());
        assert_eq!(t.window(), (n / WINDOW_SHARE).clamp(1, DEFAULT_WINDOW));
        assert!(t.window() > 1, "{n} variables give a window");
        let back = Trainer::restore(
            net.clone(),
            SearchConfig::default(),
            3,
            labels.len(),
            t.snapshot(),
            "snapshot",
        )
        .unwrap();
        assert_eq!(back.window(), t.window());
        // Fewer than 64 groups: one generation at a time.
        assert_eq!(mk(groups(n), SearchConfig::default()).window(), 1);
        let confirm = SearchConfig {
            acceptance: Acceptance::Confirm,
            ..SearchConfig::default()
        };
        assert_eq!(mk(groups(1), confirm).window(), 1);
        let set = SearchConfig {
            window: Some(3),
            ..SearchConfig::default()
        };
        assert_eq!(mk(groups(1), set).window(), 3);
    }

    const STRATEGIES: [Strategy; 5] = [
        Strategy::EdaCc,
        Strategy::CcRandom,
        Strategy::CcLayer,
        Strategy::Eda,
        Strategy::Hill,
    ];

    fn small_search(strategy: Strategy) -> (EdaParams, SearchConfig) {
        let eda = EdaParams {
            population: 6,
            top_k: 2,
            group_size: 16,
            alpha: 0.5,
            freeze_threshold: 0.95,
            ..EdaParams::default()
        };
        let search = SearchConfig {
            strategy,
            generations_per_group: 2,
            batch_size: 48,
            window: Some(1),
            hill_flips: 3,
            ..SearchConfig::default()
        };
        (eda, search)
    }

    /// Evaluates a generation on the fixture data, as the workers would.
    fn run_one(t: &mut Trainer, pixels: &[u8], labels: &[u8]) -> Option<(Generation, Outcome)> {
        let g = t.next_generation().unwrap()?;
        let px: Vec<u8> = g
            .images
            .iter()
            .flat_map(|&i| pixels[i as usize * 784..(i as usize + 1) * 784].to_vec())
            .collect();
        let lb: Vec<u8> = g.images.iter().map(|&i| labels[i as usize]).collect();
        let stats = evaluate_candidates(
            t.network(),
            &px,
            &Targets::labels(&lb),
            &g.vars,
            &g.candidates,
            1,
        )
        .unwrap();
        let out = t.complete(&g, &stats).unwrap();
        Some((g, out))
    }

    /// Going back to an earlier network sets exactly its codes, reports what it changed
    /// (the way back to the network before), re-centres every distribution there and
    /// starts a new cycle; it waits for generations in flight, and a snapshot taken after
    /// it resumes identically.
    #[test]
    fn a_rollback_returns_to_the_given_network_and_searches_on_from_it() {
        let (net, pixels, labels) = setup();
        let (eda, mut search) = small_search(Strategy::EdaCc);
        search.acceptance = Acceptance::Confirm;
        let mut t = Trainer::new(net.clone(), eda, search.clone(), 9, labels.len()).unwrap();
        let start = t.network().codes();
        let mut steps = 0;
        while t.progress().adoptions < 2 {
            run_one(&mut t, &pixels, &labels).expect("the search adopts before it ends");
            steps += 1;
            assert!(steps < 400, "no adoptions to roll back");
        }
        // Stop inside a group, with a generation in flight: refused, nothing changes.
        let g = t.next_generation().unwrap().unwrap();
        let before = t.snapshot();
        assert!(matches!(t.roll_back(&start), Err(Error::Rollback(_))));
        assert_eq!(t.snapshot(), before);
        let stats = vec![
            EvalStats {
                images: g.images.len() as u64,
                ..EvalStats::default()
            };
            g.candidates.len()
        ];
        t.complete(&g, &stats).unwrap();
        // Between generations, with a candidate awaiting its confirmation.
        while t.snapshot().pending.is_none() {
            run_one(&mut t, &pixels, &labels).expect("the search goes on");
            steps += 1;
            assert!(steps < 800, "no candidate to confirm");
        }
        let before = t.snapshot();
        assert!(
            t.roll_back(&start[1..]).is_err(),
            "a short code vector is refused"
        );
        let mut outside = start.clone();
        outside[3] = 100;
        assert!(
            matches!(t.roll_back(&outside), Err(Error::Rollback(e)) if e.contains("variable 3")),
            "a code outside its layer's range is refused"
        );
        assert_eq!(t.snapshot(), before, "refusals change nothing");

        let moved = t.network().codes();
        assert_ne!(moved, start);
        let r = t.roll_back(&start).unwrap();
        assert_eq!(t.network().codes(), start);
        assert_eq!(t.snapshot().codes, start);
        assert_eq!(t.progress().rollbacks, 1);
        // The changes and the codes they replaced lead from `moved` to `start` and back.
        let mut back = moved.clone();
        for (&(v, c), &old) in r.changes.iter().zip(&r.replaced) {
            assert_eq!(back[v as usize], old);
            back[v as usize] = c;
        }
        assert_eq!(back, start);
        assert_eq!(
            r.changes.len(),
            (moved.iter().zip(&start)).filter(|(a, b)| a != b).count()
        );
        // Every variable is free again and centred on its restored code.
        assert_eq!(t.eda().frozen_count(), 0);
        for (i, &c) in start.iter().enumerate() {
            assert_eq!(t.eda().mode(i), c, "variable {i}");
        }
        let snap = t.snapshot();
        assert!(snap.active.is_empty() && snap.queue.is_empty() && snap.pending.is_none());

        let json = serde_json::to_string(&snap).unwrap();
        let mut u = Trainer::restore(
            net,
            search,
            9,
            labels.len(),
            serde_json::from_str(&json).unwrap(),
            "t",
        )
        .unwrap();
        for step in 0..10 {
            let a = run_one(&mut t, &pixels, &labels);
            assert!(a.is_some(), "the search goes on after a rollback");
            assert_eq!(
                a,
                run_one(&mut u, &pixels, &labels),
                "step {step} after resume differs"
            );
        }
    }

    /// A trainer restored from a snapshot taken mid-run (after a JSON round trip, as a
    /// checkpoint does) continues exactly as the original, for every strategy.
    #[test]
    fn every_strategy_resumes_identically_from_a_snapshot() {
        let (net, pixels, labels) = setup();
        for strategy in STRATEGIES {
            let (eda, search) = small_search(strategy);
            let mut a = Trainer::new(net.clone(), eda, search.clone(), 21, labels.len()).unwrap();
            // Stop inside a group (odd generation count) so queue and progress matter.
            for _ in 0..7 {
                run_one(&mut a, &pixels, &labels).unwrap();
            }
            let json = serde_json::to_string(&a.snapshot()).unwrap();
            let snap: TrainerSnapshot = serde_json::from_str(&json).unwrap();
            let mut b = Trainer::restore(net.clone(), search, 21, labels.len(), snap, "t").unwrap();
            for step in 0..12 {
                let ra = run_one(&mut a, &pixels, &labels);
                let rb = run_one(&mut b, &pixels, &labels);
                assert_eq!(ra, rb, "{strategy:?}: step {step} after resume differs");
            }
            assert_eq!(a.snapshot(), b.snapshot(), "{strategy:?}");
        }
    }

    /// Per strategy, what a generation searches.
    #[test]
    fn strategies_search_what_they_say() {
        let (net, pixels, labels) = setup();
        let n = net.num_vars();
        // eda: every generation's candidates carry every free variable.
        let (eda, search) = small_search(Strategy::Eda);
        let mut t = Trainer::new(net.clone(), eda, search, 2, labels.len()).unwrap();
        for gen in 0..6 {
            let free: Vec<u32> = (0..n as u32)
                .filter(|&v| !t.eda().is_frozen(v as usize))
                .collect();
            let (g, _) = run_one(&mut t, &pixels, &labels).unwrap();
            // A group is formed every G generations; variables frozen since are sampled
            // at their mode, so the group contains at least the free ones.
            assert!(free.iter().all(|v| g.vars.contains(v)));
            if gen == 0 {
                assert_eq!(g.vars.len(), n, "nothing is frozen yet: all variables");
            }
        }

        // cc-layer: the first cycle walks the layers in order with consecutive groups.
        let (eda, search) = small_search(Strategy::CcLayer);
        let mut t = Trainer::new(net.clone(), eda, search, 2, labels.len()).unwrap();
        let mut last = None;
        loop {
            let (g, _) = run_one(&mut t, &pixels, &labels).unwrap();
            if t.progress().cycles > 0 {
                break;
            }
            if let Some((prev_first, prev_layer)) = last {
                assert!(g.vars[0] >= prev_first && g.layer >= prev_layer);
            }
            last = Some((g.vars[0], g.layer));
        }

        // cc-random: same seed, same groups; another seed, other groups.
        let groups = |seed| {
            let (eda, mut search) = small_search(Strategy::CcRandom);
            // Eight generations handed out without results.
            search.window = Some(8);
            let mut t = Trainer::new(net.clone(), eda, search, seed, labels.len()).unwrap();
            (0..8)
                .map(|_| t.next_generation().unwrap().unwrap().vars)
                .collect::<Vec<_>>()
        };
        assert_eq!(groups(5), groups(5));
        assert_ne!(groups(5), groups(6));

        // hill: candidates move exactly hill_flips variables, the distributions never
        // change, and the context only ever changes by adopting a candidate.
        let (eda, search) = small_search(Strategy::Hill);
        let mut t = Trainer::new(net.clone(), eda, search, 2, labels.len()).unwrap();
        let model = t.eda().clone();
        let mut adopted = 0;
        for _ in 0..60 {
            let before = t.network().codes();
            let (g, out) = run_one(&mut t, &pixels, &labels).unwrap();
            for c in &g.candidates[1..] {
                let moved = c.iter().zip(&g.candidates[0]).filter(|(a, b)| a != b);
                assert_eq!(moved.count(), 3);
            }
            let after = t.network().codes();
            if out.adopted {
                adopted += 1;
                let hit = g.candidates[1..].iter().any(|c| {
                    g.vars
                        .iter()
                        .zip(c)
                        .all(|(&v, &code)| after[v as usize] == code)
                });
                assert!(hit, "the adopted network is one of the candidates");
            } else {
                assert_eq!(before, after);
            }
        }
        assert!(adopted > 0, "the test must exercise adoption");
        assert_eq!(t.eda(), &model, "local search keeps no model");

        // rtn: no generation at all; the network stays the post-training one.
        let (eda, search) = small_search(Strategy::Rtn);
        let mut t = Trainer::new(net.clone(), eda, search, 2, labels.len()).unwrap();
        assert!(t.next_generation().unwrap().is_none());
        assert_eq!(t.network().codes(), net.codes());
        assert_eq!(t.progress(), Progress::default());
    }

    /// The default strategy is the method: confidence groups, ties broken by the
    /// grouping stream (its own seeded stream, so the batches and candidates stay put).
    #[test]
    fn eda_cc_is_the_default_and_uses_confidence_groups() {
        let (net, _, labels) = setup();
        let (eda, search) = small_search(Strategy::EdaCc);
        assert_eq!(SearchConfig::default().strategy, Strategy::EdaCc);
        let mut t = Trainer::new(net, eda, search, 2, labels.len()).unwrap();
        let g = t.next_generation().unwrap().unwrap();
        assert_eq!(g.vars, t.eda().groups(&mut group_rng(2))[0].vars);
        assert_ne!(g.vars, t.eda().groups(&mut group_rng(3))[0].vars);
    }

    /// Every seed gets its own streams: seeds that a weaker derivation (`|` or `&` with
    /// the stream constants instead of `^`) would merge still draw different batches,
    /// candidates and random groups.
    #[test]
    fn distinct_seeds_draw_distinct_streams() {
        let (net, _, labels) = setup();
        let first = |strategy, seed: u64| {
            let (eda, search) = small_search(strategy);
            let mut t = Trainer::new(net.clone(), eda, search, seed, labels.len()).unwrap();
            t.next_generation().unwrap().unwrap()
        };
        for (a, b) in [(0, 0xba7c4e5), (0, 0x5a3b1e), (0, 0x6e0c9a7), (0, 1 << 40)] {
            let (ga, gb) = (first(Strategy::CcRandom, a), first(Strategy::CcRandom, b));
            assert_ne!(ga.images, gb.images, "batches of seeds {a} and {b}");
            assert_ne!(ga.vars, gb.vars, "random groups of seeds {a} and {b}");
            let (ha, hb) = (first(Strategy::Hill, a), first(Strategy::Hill, b));
            assert_ne!(ha.vars, hb.vars, "local moves of seeds {a} and {b}");
        }
    }

    /// cc-random draws its groups from the grouping stream with the random rule, not the
    /// confidence rule.
    #[test]
    fn cc_random_uses_random_groups() {
        let (net, _, labels) = setup();
        let (eda, search) = small_search(Strategy::CcRandom);
        let mut t = Trainer::new(net, eda, search, 2, labels.len()).unwrap();
        let g = t.next_generation().unwrap().unwrap();
        assert_eq!(g.vars, t.eda().random_groups(&mut group_rng(2))[0].vars);
        assert_ne!(g.vars, t.eda().groups(&mut group_rng(2))[0].vars);
    }

    /// A snapshot's queue is the groups not yet started: it compares and serialises by
    /// those alone, whatever the cycle's groups before the cursor; and a snapshot taken
    /// before a group starts differs from one taken after.
    #[test]
    fn a_queue_is_the_groups_not_yet_started() {
        let g = |layer: u32, v: u32| Group {
            layer,
            vars: vec![v, v + 1],
        };
        let mut cycle = GroupQueue::from(vec![g(0, 0), g(0, 2), g(1, 4)]);
        assert_eq!(cycle.pop_front(), Some(g(0, 0)));
        let rest = GroupQueue::from(vec![g(0, 2), g(1, 4)]);
        assert_eq!(cycle, rest);
        assert_eq!(
            serde_json::to_string(&cycle).unwrap(),
            serde_json::to_string(&rest).unwrap()
        );
        let shared = cycle.clone();
        assert_eq!(cycle.pop_front(), Some(g(0, 2)));
        assert_ne!(cycle, shared, "the clone kept its cursor");
        assert_eq!(shared.remaining(), &[g(0, 2), g(1, 4)]);
        assert_eq!(cycle.pop_front(), Some(g(1, 4)));
        assert!(cycle.is_empty() && cycle.pop_front().is_none());

        let (net, pixels, labels) = setup();
        let (eda, search) = small_search(Strategy::CcLayer);
        let mut t = Trainer::new(net, eda, search, 3, labels.len()).unwrap();
        run_one(&mut t, &pixels, &labels).unwrap();
        let before = t.snapshot();
        let mut popped = before.clone();
        popped.queue.pop_front();
        assert_ne!(before, popped, "snapshots with different queues differ");
    }

    /// Checkpoints written before strategies existed have no grouping stream position;
    /// they never used the stream, so they resume at position 0, identically.
    #[test]
    fn snapshots_without_a_grouping_stream_still_resume() {
        let (net, pixels, labels) = setup();
        let (eda, search) = small_search(Strategy::CcLayer);
        let mut a = Trainer::new(net.clone(), eda, search.clone(), 4, labels.len()).unwrap();
        for _ in 0..3 {
            run_one(&mut a, &pixels, &labels).unwrap();
        }
        let mut json: serde_json::Value = serde_json::to_value(a.snapshot()).unwrap();
        assert_eq!(json["group_rng_pos"], "0");
        json.as_object_mut().unwrap().remove("group_rng_pos");
        let snap: TrainerSnapshot = serde_json::from_value(json).unwrap();
        let mut b = Trainer::restore(net, search, 4, labels.len(), snap, "old").unwrap();
        for _ in 0..4 {
            assert_eq!(
                run_one(&mut a, &pixels, &labels),
                run_one(&mut b, &pixels, &labels)
            );
        }
    }

    /// The block-local phase: its generations draw their batches from the local pool and
    /// say so until the phase's evaluations are spent, then the search goes on over the
    /// whole split. Scored against the float model's block outputs, it lowers the first
    /// block's reconstruction error on the pool (a batch is the whole pool, so every
    /// adoption there lowers it). A snapshot resumes it identically, and one whose local
    /// generation names an image outside the pool is refused.
    #[test]
    fn the_block_local_phase_lowers_block_error_on_its_pool() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../common/tests/fixtures/mnist_cnn.onnx");
        let graph = ccq_common::onnx::load_onnx(&path).unwrap();
        let (net, pixels, labels) = setup();
        let norm = Normalization::identity(1);
        let ends = net.block_ends();
        let all =
            ccq_common::blocks::targets(&graph, &norm, &net, &ends, &pixels, labels.len()).unwrap();
        let (mut eda, mut search) = small_search(Strategy::EdaCc);
        eda.population = 8;
        search.local_evaluations = 400;
        search.local_images = 24;
        search.batch_size = 24;
        let pool = search.local_pool(labels.len());
        let rows = |end: usize, images: &[u64]| -> Vec<u8> {
            let k = ends.iter().position(|&e| e == end).unwrap();
            let per = net.nodes[end].out.len();
            (images.iter())
                .flat_map(|&i| all[k][i as usize * per..(i as usize + 1) * per].to_vec())
                .collect()
        };
        let step = |t: &mut Trainer| -> (Generation, Outcome) {
            let g = t.next_generation().unwrap().unwrap();
            let px: Vec<u8> = (g.images.iter())
                .flat_map(|&i| pixels[i as usize * 784..(i as usize + 1) * 784].to_vec())
                .collect();
            let lb: Vec<u8> = g.images.iter().map(|&i| labels[i as usize]).collect();
            let node = t.network().layers[g.layer as usize].node;
            let end = g.local.then(|| t.network().block_end(node)).flatten();
            let codes = end.map_or(Vec::new(), |e| rows(e, &g.images));
            let targets = Targets {
                block: end.map(|node| ccq_common::qnet::BlockTarget {
                    node,
                    codes: &codes,
                }),
                ..Targets::labels(&lb)
            };
            let stats =
                evaluate_candidates(t.network(), &px, &targets, &g.vars, &g.candidates, 1).unwrap();
            let out = t.complete(&g, &stats).unwrap();
            (g, out)
        };
        let first_block_error = |net: &QNetwork| -> u64 {
            let px: Vec<u8> = (pool.iter())
                .flat_map(|&i| pixels[i as usize * 784..(i as usize + 1) * 784].to_vec())
                .collect();
            let mut acts = ccq_common::qnet::Activations::default();
            net.forward(&px, pool.len(), &mut acts);
            let per = net.nodes[ends[0]].out.len();
            let codes = rows(ends[0], &pool);
            (acts.values[ends[0] + 1].chunks_exact(per))
                .zip(codes.chunks_exact(per))
                .map(|(a, b)| ccq_common::qnet::block_loss(a, b))
                .sum()
        };
        let start = first_block_error(&net);
        let mut t = Trainer::new(net.clone(), eda, search.clone(), 8, labels.len()).unwrap();
        let (mut local, mut first_layer_adoptions) = (0, 0);
        let mut snap = None;
        while t.progress().evaluations < search.local_evaluations {
            if local == 5 {
                snap = Some(t.snapshot());
            }
            let (g, out) = step(&mut t);
            assert!(g.local, "generation {} is in the phase", g.id);
            assert!(g.images.iter().all(|i| pool.contains(i)), "from the pool");
            local += 1;
            first_layer_adoptions += usize::from(out.adopted && g.layer == 0);
        }
        assert!(
            first_layer_adoptions > 0,
            "the test must adopt in the first block"
        );
        let end = first_block_error(t.network());
        assert!(end < start, "first block error {start} -> {end}");
        let outside = (0..20)
            .map(|_| step(&mut t).0)
            .inspect(|g| assert!(!g.local))
            .any(|g| g.images.iter().any(|i| !pool.contains(i)));
        assert!(outside, "after the phase batches come from the whole split");

        // Resumed from inside the phase: the same generations and outcomes.
        let fresh = || {
            let eda = t.eda().params().clone();
            Trainer::new(net.clone(), eda, search.clone(), 8, labels.len()).unwrap()
        };
        let snap = snap.unwrap();
        let mut b =
            Trainer::restore(net.clone(), search.clone(), 8, labels.len(), snap, "t").unwrap();
        let mut c = fresh();
        for _ in 0..5 {
            step(&mut c);
        }
        for k in 0..8 {
            assert_eq!(step(&mut b), step(&mut c), "step {k} after resume");
        }
        // A local generation in flight that names an image outside the pool.
        let mut bad = fresh();
        bad.next_generation().unwrap().unwrap();
        let mut snap = bad.snapshot();
        let outside = (0..labels.len() as u64)
            .find(|i| !pool.contains(i))
            .unwrap();
        snap.in_flight[0].images[0] = outside;
        snap.in_flight[0].images.sort_unstable();
        let err = Trainer::restore(net, search, 8, labels.len(), snap, "t")
            .err()
            .expect("refused");
        assert!(err.to_string().contains("local pool"), "{err}");
    }
}
