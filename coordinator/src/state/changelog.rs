//! The network's version history in this process: how each version differs from the one
//! before, so that a worker a few versions behind is sent the changes instead of the
//! whole network.

use std::collections::VecDeque;

/// The network versions of this process: entry `k` turns version `base + k` into
/// `base + k + 1`. A resumed run starts at the checkpoint's version with no entries
/// (older workers get the whole network). Entries that no sync can use any more are
/// dropped as new ones come, so the log is bounded by the full-network threshold instead
/// of growing with the run.
#[derive(Debug, Default)]
pub struct ChangeLog {
    entries: VecDeque<Vec<(u32, i8)>>,
    base: u64,
    /// Changes in all entries together.
    changes: usize,
}

impl ChangeLog {
    pub fn starting_at(version: u64) -> ChangeLog {
        ChangeLog {
            base: version,
            ..ChangeLog::default()
        }
    }

    pub fn version(&self) -> u64 {
        self.base + self.entries.len() as u64
    }

    /// Appends the next version. Then drops the oldest entry while the entries after it
    /// alone reach `limit`: a worker at a dropped version would have been sent the whole
    /// network anyway (lists only get longer going back), and still is.
    pub fn push(&mut self, changes: Vec<(u32, i8)>, limit: usize) {
        self.changes += changes.len();
        self.entries.push_back(changes);
        while let Some(front) = self.entries.front() {
            if self.changes - front.len() < limit {
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

    /// The changes from version `have` forward to version `want` (an older network a
    /// measurement measures), if both are known, `have` is not past `want` and the list
    /// is shorter than `limit`.
    pub fn between(&self, have: u64, want: u64, limit: usize) -> Option<Vec<(u32, i8)>> {
        if have < self.base || have > want || want > self.version() {
            return None;
        }
        let list: Vec<(u32, i8)> = self
            .entries
            .range((have - self.base) as usize..(want - self.base) as usize)
            .flatten()
            .copied()
            .collect();
        (list.len() < limit).then_some(list)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Trimming never changes an answer: for every version a worker may hold, the
    /// trimmed log gives the same change list (or the same "send the whole network") as
    /// a log that keeps everything, and its size stays bounded.
    #[test]
    fn trimmed_change_log_answers_like_the_whole_log() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for limit in [1usize, 5, 40] {
            let mut trimmed = ChangeLog::starting_at(7);
            let mut whole = ChangeLog::starting_at(7);
            for _ in 0..300 {
                let n = rng.random_range(0..12);
                let changes: Vec<(u32, i8)> = (0..n)
                    .map(|_| (rng.random_range(0..1000), rng.random_range(-8..8)))
                    .collect();
                trimmed.push(changes.clone(), limit);
                whole.push(changes, usize::MAX);
                assert_eq!(trimmed.version(), whole.version());
                // Forward to an older version: the entries in between, in order.
                let v = whole.version();
                for (have, want) in [(v.saturating_sub(3), v.saturating_sub(1)), (v, v)] {
                    let expect: Option<Vec<(u32, i8)>> = (have >= 7).then(|| {
                        whole
                            .entries
                            .range((have - 7) as usize..(want - 7) as usize)
                            .flatten()
                            .copied()
                            .collect()
                    });
                    assert_eq!(whole.between(have, want, usize::MAX), expect);
                }
                assert_eq!(
                    whole.between(v, v.saturating_sub(1), usize::MAX),
                    None,
                    "never backwards"
                );
                for have in 0..=whole.version() + 1 {
                    let full = whole.since(have, usize::MAX).filter(|l| l.len() < limit);
                    assert_eq!(
                        trimmed.since(have, limit),
                        full,
                        "have {have} limit {limit}"
                    );
                }
                // Bounded: the entries after the oldest kept one hold fewer than `limit`.
                let oldest = trimmed.entries.front().map_or(0, Vec::len);
                assert!(trimmed.changes - oldest < limit);
            }
            assert!(trimmed.base > 7, "old entries were dropped (limit {limit})");
        }
    }
}
