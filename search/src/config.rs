//! The `[search]` section of a run config: which strategy searches, how long each group
//! is searched, the batch and the fitness. Plain data with serde defaults; the
//! coordinator's config embeds it and calls [`SearchConfig::validate`].

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// What a generation optimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Fitness {
    /// Mean cross-entropy on the batch.
    Loss,
    /// Error rate on the batch, cross-entropy breaking ties.
    Error,
    /// Distillation: mean `T^2 * KL(softmax(teacher / T) || softmax(logits / T))` to the
    /// float model's logits on the same images (`T` = `search.temperature`). The float
    /// logits are computed once per training image at setup and travel with the jobs;
    /// inference stays integer-only.
    Distill,
}

/// When the best candidate of a generation replaces the context (the current network).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Acceptance {
    /// When it beats the context on the generation's batch (the paper's rule). The best of
    /// many candidates on one batch beats the context by chance alone once true gains are
    /// smaller than the batch noise, so late in a search the network random-walks.
    #[default]
    Batch,
    /// When it beats the context on its batch and then again on a fresh batch: the next
    /// generation evaluates just the two of them (2 evaluations), with no selection among
    /// candidates on that batch to bias it.
    Confirm,
}

impl Acceptance {
    pub fn name(self) -> &'static str {
        match self {
            Acceptance::Batch => "batch",
            Acceptance::Confirm => "confirm",
        }
    }
}

/// How the search chooses what to evaluate: ccq's method and the baselines/ablations it
/// is compared with. All run on the same cluster and engine, draw batches the
/// same way, count budgets in the same evaluations, and adopt the best candidate of a
/// generation when it beats the context on the batch.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// EDA + cooperative coevolution, groups of the least confident free variables of a
    /// layer, confidence ties in a seeded random order (the method of the paper; the
    /// default).
    #[default]
    EdaCc,
    /// EDA + CC with random groups (random free variables of one layer, random order).
    CcRandom,
    /// EDA + CC with static groups: consecutive free variables, layer after layer.
    CcLayer,
    /// EDA without CC: one distribution over all variables, every generation samples all
    /// free variables jointly (one group of all free variables).
    Eda,
    /// (1+λ) random local search: λ = population - 1 candidates each move
    /// `hill_flips` random variables of one layer to another allowed code; the best is
    /// kept when it beats the context. No distributions, no freezing.
    Hill,
    /// No search: the round-to-nearest post-training network is the output.
    Rtn,
}

impl Strategy {
    /// Every strategy, in the order the docs list them.
    pub const ALL: [Strategy; 6] = [
        Strategy::EdaCc,
        Strategy::CcRandom,
        Strategy::CcLayer,
        Strategy::Eda,
        Strategy::Hill,
        Strategy::Rtn,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::EdaCc => "eda-cc",
            Strategy::CcRandom => "cc-random",
            Strategy::CcLayer => "cc-layer",
            Strategy::Eda => "eda",
            Strategy::Hill => "hill",
            Strategy::Rtn => "rtn",
        }
    }
}

/// How the search runs: the strategy, how long each group is searched, the batch and what
/// a generation optimises.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct SearchConfig {
    /// The search method: ccq's EDA+CC or one of the baselines it is compared with.
    pub strategy: Strategy,
    /// Generations spent on one group before moving to the next (group strategies).
    pub generations_per_group: usize,
    /// Training images per generation (one fresh batch each generation).
    pub batch_size: usize,
    /// What a generation optimises on its batch.
    pub fitness: Fitness,
    /// Variables each `hill` candidate moves (`strategy = "hill"` only).
    pub hill_flips: usize,
    /// Softmax temperature of the distillation fitness (`fitness = "distill"` only); above
    /// 1 the teacher's smaller probabilities weigh more.
    pub temperature: f32,
    /// When the best candidate replaces the current network.
    pub acceptance: Acceptance,
    /// How credible a gain must be for the best candidate to count as beating the
    /// context (under either acceptance rule): its mean loss on the batch must be lower
    /// by more than `margin` standard errors of the per-image paired loss difference
    /// (the same images scored by both networks). 0 is the paper's rule: any lower loss.
    /// Costs no evaluations; needs `fitness = "loss"` or `"distill"`.
    pub margin: f64,
    /// When every variable has frozen and budget remains, re-centre each variable's
    /// distribution on its current code (the same radius around it, within its layer's
    /// code range) and search on, instead of ending the search. Over restarts a code can
    /// move further than `eda.radius` from round-to-nearest.
    pub restarts: bool,
    /// Go back to the best network when the search has drifted below it: when a
    /// measurement of the global network (every `eval.every_generations`) scores more
    /// than this many points of validation top-1 below the run's best, the global
    /// network is set to that best network and every distribution re-centred on its
    /// codes (as a restart does), and the search goes on from there. Each such
    /// measurement holds the search at its generation until it is in (generations in
    /// flight finish first), so where the search turns back depends on the config and
    /// the seed alone. The final measurement, when the search ends, is one too: a search
    /// that drifted more than this after its last measurement ends on the best network,
    /// measured again as the final. Unset: never (the measurements run beside the
    /// search).
    pub rollback: Option<f64>,
    /// Generations in flight at once (windowed cooperative coevolution): up to `window`
    /// groups are searched side by side, one generation of each in flight, so a group's
    /// generations still run one after another (each samples from the distribution its
    /// previous one updated). Generation `g` is created when generation `g - window` has
    /// been merged and samples against the network as it was then; results merge
    /// strictly in generation order, and a cycle's end waits for every generation in
    /// flight. 1 is the sequential algorithm. The result depends on the config, the seed
    /// and the window only, never on the number of workers or the order their answers
    /// arrive in; a larger window keeps more workers busy at the cost of scoring each
    /// group against a network that misses up to `window - 1` other groups' latest
    /// merges. Unset: with `acceptance = "batch"` one group in 64 of the network's
    /// (variables / `eda.group_size` / 64), at least 1 and at most 32 — ResNet-20: 32,
    /// measured to cost nothing at 4-bit weights from the GPTQ start and what keeps
    /// 32–128 workers busy; the MNIST quickstart CNN: 1, where 32 in flight (a third of its
    /// groups) cost 13.6 points at 2-bit weights; with `"confirm"` 1, as a confirmation
    /// needs the generation before it merged.
    pub window: Option<usize>,
    /// A block-local phase first: while fewer than this many evaluations are done, a
    /// generation scores its group by the group's block alone — the mean squared
    /// difference between the integer network's codes where the block ends and the
    /// float model's output there, quantized the same way — running the network only up
    /// to that point. Groups in the network's last block (which ends at the logits) keep
    /// `fitness`. Batches of the phase come from `local_images` fixed training images,
    /// whose block outputs the coordinator computes once at setup (one byte per value:
    /// about 100 KB per image for ResNet-20) and sends with each job. A run's history
    /// shows that block error as the phase's best fitness. 0: no local phase. Group
    /// strategies only (`eda-cc`, `cc-random`, `cc-layer`); not with
    /// `quant.act_clip_step`.
    pub local_evaluations: u64,
    /// Training images the block-local phase draws its batches from, spread evenly over
    /// the search part of the training split (at most all of it).
    pub local_images: usize,
}

impl Default for SearchConfig {
    fn default() -> Self {
        SearchConfig {
            strategy: Strategy::EdaCc,
            generations_per_group: 4,
            batch_size: 256,
            fitness: Fitness::Loss,
            hill_flips: 4,
            temperature: 1.0,
            acceptance: Acceptance::Batch,
            margin: 0.0,
            restarts: false,
            rollback: None,
            window: None,
            local_evaluations: 0,
            local_images: 1024,
        }
    }
}

impl SearchConfig {
    /// Checks every field, naming the first bad one as `search.FIELD`.
    pub fn validate(&self) -> Result<()> {
        if self.generations_per_group == 0 {
            return Err(Error::setting(
                "search.generations_per_group",
                0,
                "must be at least 1",
            ));
        }
        if self.hill_flips == 0 {
            return Err(Error::setting("search.hill_flips", 0, "must be at least 1"));
        }
        if self.batch_size == 0 {
            return Err(Error::setting("search.batch_size", 0, "must be at least 1"));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(Error::setting(
                "search.temperature",
                self.temperature,
                "must be a positive number",
            ));
        }
        if !(self.margin.is_finite() && (0.0..=MAX_MARGIN).contains(&self.margin)) {
            return Err(Error::setting(
                "search.margin",
                self.margin,
                format!("must be a number of standard errors between 0 and {MAX_MARGIN}"),
            ));
        }
        if self.margin > 0.0 && self.fitness == Fitness::Error {
            return Err(Error::setting(
                "search.margin",
                self.margin,
                "must be 0 with search.fitness = \"error\" (the margin weighs loss \
                 differences)",
            ));
        }
        if let Some(r) = self.rollback {
            if !(r.is_finite() && (0.0..=100.0).contains(&r)) {
                return Err(Error::setting(
                    "search.rollback",
                    r,
                    "must be a number of validation points between 0 and 100",
                ));
            }
        }
        if let Some(window) = self.window {
            if !(1..=MAX_WINDOW).contains(&window) {
                return Err(Error::setting(
                    "search.window",
                    window,
                    format!("must be between 1 and {MAX_WINDOW}"),
                ));
            }
            if window > 1 && self.acceptance == Acceptance::Confirm {
                return Err(Error::setting(
                    "search.window",
                    window,
                    "must be 1 with search.acceptance = \"confirm\" (a confirmation waits \
                     for the generation before it)",
                ));
            }
        }
        if self.local_images == 0 {
            return Err(Error::setting(
                "search.local_images",
                0,
                "must be at least 1",
            ));
        }
        if self.local_evaluations > 0
            && !matches!(
                self.strategy,
                Strategy::EdaCc | Strategy::CcRandom | Strategy::CcLayer
            )
        {
            return Err(Error::setting(
                "search.local_evaluations",
                self.local_evaluations,
                format!(
                    "needs a strategy whose groups stay in one layer (eda-cc, cc-random, \
                     cc-layer), not {}",
                    self.strategy.name()
                ),
            ));
        }
        Ok(())
    }

    /// Generations in flight for a network of `variables` searched in groups of
    /// `group_size`: `search.window`, or when it is unset 1 with confirmation and, with
    /// batch acceptance, one group in [`WINDOW_SHARE`] of the network's, between 1 and
    /// [`DEFAULT_WINDOW`]. A function of the config and the network alone, so the same
    /// on every worker count and across resumes.
    pub fn window_for(&self, variables: usize, group_size: usize) -> usize {
        match (self.window, self.acceptance) {
            (Some(w), _) => w,
            (None, Acceptance::Confirm) => 1,
            (None, Acceptance::Batch) => {
                (variables / group_size.max(1) / WINDOW_SHARE).clamp(1, DEFAULT_WINDOW)
            }
        }
    }

    /// The training images (indices into the search part, `0..search_len`) the
    /// block-local phase draws its batches from: `local_images` of them, evenly spaced,
    /// so every shard holds its share.
    pub fn local_pool(&self, search_len: usize) -> Vec<u64> {
        let p = self.local_images.clamp(1, search_len.max(1));
        (0..p as u64)
            .map(|i| i * search_len as u64 / p as u64)
            .collect()
    }
}

/// The largest `search.margin`: beyond it hardly a candidate is ever adopted.
pub const MAX_MARGIN: f64 = 10.0;

/// The largest window an unset `search.window` gets (with batch adoption): at ResNet-20
/// W4A8 from the GPTQ start 32 generations in flight end at 83.05 +- 0.24 % against
/// 83.17 +- 0.15 % for the sequential search (3 seeds each, docs/RESULTS.md), and 128
/// emulated workers run at 85 % of one worker's rate each, against 19 % with one
/// generation at a time (README, "Scaling").
pub const DEFAULT_WINDOW: usize = 32;

/// An unset `search.window` keeps at most one group in this many of the network's in
/// flight: ResNet-20's 32 of 2,096 groups cost nothing measurable at 4-bit weights, the
/// MNIST CNN's 32 of 93 cost 13.6 points at 2-bit weights from round to nearest.
pub const WINDOW_SHARE: usize = 64;

/// The largest `search.window`: beyond it the searched network is too stale to matter,
/// and a checkpoint holds every generation in flight.
pub const MAX_WINDOW: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(r: Result<()>) -> String {
        match r {
            Err(Error::InvalidSetting { field, .. }) => field,
            other => panic!("expected an invalid setting, got {other:?}"),
        }
    }

    #[test]
    fn an_unset_window_follows_the_network_and_the_acceptance_rule() {
        let batch = SearchConfig::default();
        assert_eq!(batch.window, None);
        // ResNet-20 (268,336 variables, groups of 128): 2,096 groups, 32 in flight.
        assert_eq!(batch.window_for(268_336, 128), DEFAULT_WINDOW);
        assert_eq!(
            batch.window_for(10_000_000, 128),
            DEFAULT_WINDOW,
            "at most 32"
        );
        // One group in 64: 16 of 1,024 groups.
        assert_eq!(batch.window_for(1024 * 64, 64), 16);
        // The MNIST CNN (5,960 variables, groups of 64): 93 groups, one at a time.
        assert_eq!(batch.window_for(5_960, 64), 1);
        assert_eq!(batch.window_for(0, 64), 1, "at least 1");
        let confirm = SearchConfig {
            acceptance: Acceptance::Confirm,
            ..SearchConfig::default()
        };
        assert_eq!(confirm.window_for(268_336, 128), 1);
        assert!(confirm.validate().is_ok(), "confirmation alone is valid");
        let set = SearchConfig {
            window: Some(4),
            ..SearchConfig::default()
        };
        assert_eq!(set.window_for(268_336, 128), 4, "a set window is kept");
        assert_eq!(set.window_for(5_960, 64), 4, "a set window is kept");
    }

    #[test]
    fn validation_names_the_bad_field_and_accepts_the_defaults() {
        assert!(SearchConfig::default().validate().is_ok());
        let one = SearchConfig {
            generations_per_group: 1,
            batch_size: 1,
            hill_flips: 1,
            ..SearchConfig::default()
        };
        assert!(one.validate().is_ok(), "1 is allowed everywhere");
        // A window goes with batch acceptance; confirmation with no window.
        for (window, acceptance) in [(2, Acceptance::Batch), (1, Acceptance::Confirm)] {
            let cfg = SearchConfig {
                window: Some(window),
                acceptance,
                ..one.clone()
            };
            assert!(cfg.validate().is_ok(), "window {window}, {acceptance:?}");
        }
        for (margin, fitness) in [
            (MAX_MARGIN, Fitness::Loss),
            (1.5, Fitness::Distill),
            (0.0, Fitness::Error),
        ] {
            let cfg = SearchConfig {
                margin,
                fitness,
                ..one.clone()
            };
            assert!(cfg.validate().is_ok(), "margin {margin}, {fitness:?}");
        }
        for rollback in [0.0, 0.3, 100.0] {
            let cfg = SearchConfig {
                rollback: Some(rollback),
                ..one.clone()
            };
            assert!(cfg.validate().is_ok(), "rollback {rollback}");
        }
        // A block-local phase with a group strategy; any strategy without one.
        for (local_evaluations, strategy) in [(100, Strategy::EdaCc), (0, Strategy::Hill)] {
            let cfg = SearchConfig {
                local_evaluations,
                strategy,
                ..one.clone()
            };
            assert!(cfg.validate().is_ok(), "{local_evaluations}, {strategy:?}");
        }
        for (field, cfg) in [
            (
                "search.generations_per_group",
                SearchConfig {
                    generations_per_group: 0,
                    ..one.clone()
                },
            ),
            (
                "search.hill_flips",
                SearchConfig {
                    hill_flips: 0,
                    ..one.clone()
                },
            ),
            (
                "search.batch_size",
                SearchConfig {
                    batch_size: 0,
                    ..one.clone()
                },
            ),
            (
                "search.temperature",
                SearchConfig {
                    temperature: 0.0,
                    ..one.clone()
                },
            ),
            (
                "search.temperature",
                SearchConfig {
                    temperature: f32::NAN,
                    ..one.clone()
                },
            ),
            (
                "search.window",
                SearchConfig {
                    window: Some(0),
                    ..one.clone()
                },
            ),
            (
                "search.window",
                SearchConfig {
                    window: Some(MAX_WINDOW + 1),
                    ..one.clone()
                },
            ),
            (
                "search.window",
                SearchConfig {
                    window: Some(2),
                    acceptance: Acceptance::Confirm,
                    ..one.clone()
                },
            ),
            (
                "search.rollback",
                SearchConfig {
                    rollback: Some(-0.1),
                    ..one.clone()
                },
            ),
            (
                "search.rollback",
                SearchConfig {
                    rollback: Some(f64::INFINITY),
                    ..one.clone()
                },
            ),
            (
                "search.rollback",
                SearchConfig {
                    rollback: Some(100.5),
                    ..one.clone()
                },
            ),
            (
                "search.margin",
                SearchConfig {
                    margin: -0.5,
                    ..one.clone()
                },
            ),
            (
                "search.margin",
                SearchConfig {
                    margin: MAX_MARGIN + 0.5,
                    ..one.clone()
                },
            ),
            (
                "search.margin",
                SearchConfig {
                    margin: f64::NAN,
                    ..one.clone()
                },
            ),
            (
                "search.margin",
                SearchConfig {
                    margin: 1.0,
                    fitness: Fitness::Error,
                    ..one.clone()
                },
            ),
            (
                "search.local_images",
                SearchConfig {
                    local_images: 0,
                    ..one.clone()
                },
            ),
            (
                "search.local_evaluations",
                SearchConfig {
                    local_evaluations: 100,
                    strategy: Strategy::Hill,
                    ..one.clone()
                },
            ),
        ] {
            assert_eq!(field_of(cfg.validate()), field);
        }
    }

    /// The local pool spreads evenly over the search split, every index in range and
    /// distinct; asked for more images than there are, it takes them all.
    #[test]
    fn the_local_pool_spreads_over_the_search_split() {
        let cfg = SearchConfig {
            local_images: 4,
            ..SearchConfig::default()
        };
        assert_eq!(cfg.local_pool(100), vec![0, 25, 50, 75]);
        assert_eq!(cfg.local_pool(3), vec![0, 1, 2]);
        let pool = SearchConfig::default().local_pool(45_000);
        assert_eq!(pool.len(), 1024);
        assert!(pool.windows(2).all(|w| w[0] < w[1]) && *pool.last().unwrap() < 45_000);
        // Two shards of 22,500 hold half each.
        assert_eq!(pool.iter().filter(|&&i| i < 22_500).count(), 512);
    }

    /// The names are the config's spelling: reports and grid file names use them.
    #[test]
    fn strategy_names_round_trip_through_the_config_spelling() {
        for s in Strategy::ALL {
            let text = format!("strategy = \"{}\"", s.name());
            #[derive(Deserialize)]
            struct S {
                strategy: Strategy,
            }
            let parsed: S = serde_json::from_str(&format!("{{\"strategy\": \"{}\"}}", s.name()))
                .unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(parsed.strategy, s);
        }
        assert_eq!(Strategy::EdaCc.name(), "eda-cc");
        for a in [Acceptance::Batch, Acceptance::Confirm] {
            let parsed: Acceptance = serde_json::from_str(&format!("\"{}\"", a.name())).unwrap();
            assert_eq!(parsed, a);
        }
        assert_eq!(Acceptance::default(), Acceptance::Batch);
    }
}
