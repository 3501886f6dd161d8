//! The network's version history in this process: how each version differs from the one
//! before (and what it replaced), so that a worker a few versions away — ahead or behind —
//! is sent the changes instead of the whole network, and so that the network of a
//! generation still in flight (`search.window`) can be rebuilt.

use std::collections::VecDeque;

use ccq_common::qnet::QNetwork;

/// One variable's change between two versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub var: u32,
    /// Its code in the version before.
    pub old: i8,
    /// Its code in this version.
    pub new: i8,
}

/// The network versions of this process: entry `k` turns version `base + k` into
/// `base + k + 1`. A resumed run starts at the checkpoint's version with the entries its
/// generations in flight need (older workers get the whole network). Entries that no sync
/// can use any more, and that no generation in flight needs, are dropped as new ones come,
/// so the log is bounded by the full-network threshold and the window instead of growing
/// with the run.
#[derive(Debug, Default)]
pub struct ChangeLog {
    entries: VecDeque<Vec<Change>>,
    base: u64,
    /// Changes in all entries together.
    changes: usize,
}

impl ChangeLog {
    /// A log ending at `version` that holds `entries`, the last ones before it (a
    /// checkpoint's).
    pub fn restore(version: u64, entries: Vec<Vec<Change>>) -> ChangeLog {
        ChangeLog {
            base: version - entries.len() as u64,
            changes: entries.iter().map(Vec::len).sum(),
            entries: entries.into(),
        }
    }

    pub fn version(&self) -> u64 {
        self.base + self.entries.len() as u64
    }

    /// The oldest version the log can rebuild.
    pub fn oldest(&self) -> u64 {
        self.base
    }

    /// The entries from version `from` to the current one (for a checkpoint); None if
    /// `from` is older than the log.
    pub fn entries_since(&self, from: u64) -> Option<Vec<Vec<Change>>> {
        let skip = from.checked_sub(self.base)? as usize;
        Some(self.entries.iter().skip(skip).cloned().collect())
    }

    /// Appends the next version. Then drops the oldest entry while the entries after it
    /// alone reach `limit` and it is older than `keep` (the oldest version a generation in
    /// flight was sampled against): a worker at a dropped version would have been sent the
    /// whole network anyway (lists only get longer going back), and still is.
    pub fn push(&mut self, changes: Vec<Change>, limit: usize, keep: u64) {
        self.changes += changes.len();
        self.entries.push_back(changes);
        while let Some(front) = self.entries.front() {
            if self.changes - front.len() < limit || self.base >= keep {
                break;
            }
            self.changes -= front.len();
            self.entries.pop_front();
            self.base += 1;
        }
    }

    /// The changes from version `have` to the current one, if `have` is known and the
    /// list is shorter than `limit`; otherwise the worker needs the whole network.
    pub fn since(&self, have: u64, limit: usize) -> Option<Vec<(u32, i8)>> {
        self.between(have, self.version(), limit)
    }

    /// The changes from version `have` to version `want`, forward or back (an older
    /// network a measurement measures or a generation in flight was sampled against), if
    /// both are known and the list is shorter than `limit`. Applied in order they turn the
    /// network at `have` into the one at `want`.
    pub fn between(&self, have: u64, want: u64, limit: usize) -> Option<Vec<(u32, i8)>> {
        let known = self.base..=self.version();
        if !known.contains(&have) || !known.contains(&want) {
            return None;
        }
        let (lo, hi) = (
            (have.min(want) - self.base) as usize,
            (have.max(want) - self.base) as usize,
        );
        if self.entries.range(lo..hi).map(Vec::len).sum::<usize>() >= limit {
            return None;
        }
        let range = self.entries.range(lo..hi);
        let list = if have <= want {
            range.flatten().map(|c| (c.var, c.new)).collect()
        } else {
            range
                .rev()
                .flat_map(|e| e.iter().rev())
                .map(|c| (c.var, c.old))
                .collect()
        };
        Some(list)
    }

    /// The network at version `want`, rebuilt from `current` (the network at the current
    /// version) by undoing the changes after it; None if the log does not reach back to it.
    pub fn network_at(&self, current: &QNetwork, want: u64) -> Option<QNetwork> {
        let changes = self.between(self.version(), want, usize::MAX)?;
        let mut net = current.clone();
        net.apply_changes(&changes).ok()?;
        Some(net)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Applies a change list to a copy of `codes`.
    fn applied(codes: &[i8], changes: &[(u32, i8)]) -> Vec<i8> {
        let mut c = codes.to_vec();
        for &(v, code) in changes {
            c[v as usize] = code;
        }
        c
    }

    /// On a random history of 300 versions of 50 variables: a change list between any two
    /// versions the log knows, forward or back, turns the one network into the other;
    /// trimming never changes an answer the log still gives (or "send the whole network");
    /// the log stays bounded, except that it keeps every version from `keep` on.
    #[test]
    fn change_lists_go_forward_and_back_and_trimming_changes_no_answer() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for limit in [1usize, 5, 40] {
            let mut trimmed = ChangeLog::restore(7, Vec::new());
            let mut whole = ChangeLog::restore(7, Vec::new());
            let mut history = vec![vec![0i8; 50]];
            for step in 0..300u64 {
                let mut codes = history.last().unwrap().clone();
                let n = rng.random_range(0..12);
                let mut changes = Vec::new();
                for _ in 0..n {
                    let var = rng.random_range(0..50u32);
                    let new = rng.random_range(-8..8);
                    // A variable changes at most once per version, as in the trainer.
                    if changes.iter().any(|c: &Change| c.var == var) {
                        continue;
                    }
                    changes.push(Change {
                        var,
                        old: codes[var as usize],
                        new,
                    });
                    codes[var as usize] = new;
                }
                history.push(codes);
                // Generations in flight pin the last four versions.
                let keep = (7 + step + 1).saturating_sub(4);
                trimmed.push(changes.clone(), limit, keep);
                whole.push(changes, usize::MAX, 0);
                assert_eq!(trimmed.version(), whole.version());
                let v = whole.version();
                assert!(trimmed.oldest() <= keep.max(7), "pinned versions are kept");
                let at = |version: u64| &history[(version - 7) as usize];
                for have in v.saturating_sub(6).max(7)..=v {
                    for want in v.saturating_sub(6).max(7)..=v {
                        let list = whole.between(have, want, usize::MAX).unwrap();
                        assert_eq!(&applied(at(have), &list), at(want), "{have} -> {want}");
                        let short = Some(list).filter(|l| l.len() < limit);
                        if have >= trimmed.oldest() && want >= trimmed.oldest() {
                            assert_eq!(trimmed.between(have, want, limit), short);
                        }
                    }
                }
                assert_eq!(whole.between(6, v, usize::MAX), None, "before the log");
                assert_eq!(whole.between(v, v + 1, usize::MAX), None, "after it");
                for have in 0..=v + 1 {
                    let full = whole.since(have, usize::MAX).filter(|l| l.len() < limit);
                    let got = trimmed.since(have, limit);
                    assert!(got == full || (got.is_none() && have < trimmed.oldest()));
                    if have >= keep {
                        assert_eq!(got, full, "have {have} limit {limit}");
                    }
                }
                // Bounded: past the pinned versions, the entries after the oldest kept
                // one hold fewer than `limit`.
                if trimmed.oldest() < keep {
                    let oldest = trimmed.entries.front().map_or(0, Vec::len);
                    assert!(trimmed.changes - oldest < limit);
                }
            }
            assert!(
                trimmed.oldest() > 7,
                "old entries were dropped (limit {limit})"
            );
            // A checkpoint's entries rebuild the same log.
            let from = trimmed.oldest() + 1;
            let back = ChangeLog::restore(trimmed.version(), trimmed.entries_since(from).unwrap());
            assert_eq!(back.oldest(), from);
            let v = trimmed.version();
            assert_eq!(
                back.between(v, from, usize::MAX),
                trimmed.between(v, from, usize::MAX)
            );
        }
    }
}
