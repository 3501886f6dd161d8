//! The worker registry: who is connected, which shard each serves, when each was last
//! heard from, which job each holds, and what each has done (for status). Liveness rules
//! live here: a worker silent for three heartbeat intervals is dead, and an idle worker
//! that did not ask for its shard may be moved to a shard nobody serves.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use super::events::Refusal;

#[derive(Debug, Clone)]
pub struct WorkerEntry {
    pub name: String,
    pub address: String,
    pub shard: usize,
    /// The worker asked for its shard (`--shard`, Indexed Job); it is never moved.
    pub fixed_shard: bool,
    pub last_seen: Instant,
    pub job: Option<u64>,
    /// The network version of the last training job it was sent (it holds that version
    /// unless the job was lost on the way).
    pub version_sent: Option<u64>,
    pub jobs_done: u64,
    pub images: u64,
    pub eval_micros: u64,
}

#[derive(Debug)]
pub struct WorkerRegistry {
    workers: BTreeMap<u64, WorkerEntry>,
    next_id: u64,
    /// Registrations over the whole run (a resumed run continues the count).
    seen: u64,
    shards: usize,
}

impl WorkerRegistry {
    pub fn new(shards: usize) -> WorkerRegistry {
        WorkerRegistry {
            workers: BTreeMap::new(),
            next_id: 1,
            seen: 0,
            shards,
        }
    }

    /// Continues the registration count of an earlier process (a resumed run).
    pub fn restore_seen(&mut self, seen: u64) {
        self.seen = seen;
    }

    /// Adds a worker and picks its shard: the one it asked for (`(index, count)`, which
    /// must match this run), else the shard with the fewest live workers, ties to the
    /// lowest index. Returns its id and shard.
    pub fn register(
        &mut self,
        name: String,
        address: String,
        requested: Option<(u32, u32)>,
        now: Instant,
        has_work: impl Fn(usize) -> bool,
    ) -> Result<(u64, usize), Refusal> {
        let shards = self.shards;
        let shard = match requested {
            Some((k, s)) => {
                if s as usize != shards || k as usize >= shards {
                    return Err(Refusal::Invalid(format!(
                        "worker asked for shard {k}/{s}, but this run has {shards} shard(s) (0..{shards})"
                    )));
                }
                k as usize
            }
            // The fewest live workers; among those a shard with work waiting (the one an
            // idle worker was moved to serve, not the one it left: otherwise it would go
            // back and be moved again, forever); then the lowest index.
            None => {
                let live = self.live_per_shard();
                (0..shards)
                    .min_by_key(|&s| (live[s], !has_work(s), s))
                    .unwrap_or(0)
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        self.seen += 1;
        self.workers.insert(
            id,
            WorkerEntry {
                name,
                address,
                shard,
                fixed_shard: requested.is_some(),
                last_seen: now,
                job: None,
                version_sent: None,
                jobs_done: 0,
                images: 0,
                eval_micros: 0,
            },
        );
        Ok((id, shard))
    }

    /// Marks a worker alive; false if unknown.
    pub fn touch(&mut self, id: u64, now: Instant) -> bool {
        match self.workers.get_mut(&id) {
            Some(w) => {
                w.last_seen = now;
                true
            }
            None => false,
        }
    }

    pub fn get(&self, id: u64) -> Option<&WorkerEntry> {
        self.workers.get(&id)
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut WorkerEntry> {
        self.workers.get_mut(&id)
    }

    pub fn remove(&mut self, id: u64) -> Option<WorkerEntry> {
        self.workers.remove(&id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, &WorkerEntry)> {
        self.workers.iter().map(|(&id, w)| (id, w))
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Live workers per shard, in one pass over the workers (not one per shard).
    pub fn live_per_shard(&self) -> Vec<usize> {
        let mut live = vec![0usize; self.shards];
        for w in self.workers.values() {
            live[w.shard] += 1;
        }
        live
    }

    /// Removes the workers not heard from for longer than three heartbeat intervals and
    /// returns them (their jobs must go back to the queue).
    pub fn reap(&mut self, now: Instant, heartbeat: Duration) -> Vec<(u64, WorkerEntry)> {
        let dead: Vec<u64> = self
            .workers
            .iter()
            .filter(|(_, w)| now.duration_since(w.last_seen) > heartbeat * 3)
            .map(|(&id, _)| id)
            .collect();
        dead.into_iter()
            .filter_map(|id| self.workers.remove(&id).map(|w| (id, w)))
            .collect()
    }

    /// A shard that has work (`has_work`) and no live worker, if `id` is free to move
    /// there: it did not ask for its shard and its own shard has no work.
    pub fn orphaned_shard_for(&self, id: u64, has_work: impl Fn(usize) -> bool) -> Option<usize> {
        let w = self.workers.get(&id)?;
        if w.fixed_shard || has_work(w.shard) {
            return None;
        }
        let live = self.live_per_shard();
        (0..self.shards).find(|&s| has_work(s) && live[s] == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(r: &mut WorkerRegistry, shard: Option<(u32, u32)>, now: Instant) -> (u64, usize) {
        r.register("w".into(), String::new(), shard, now, |_| false)
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn workers_spread_over_shards_and_asked_shards_are_checked() {
        let now = Instant::now();
        let mut r = WorkerRegistry::new(3);
        let shards: Vec<usize> = (0..5).map(|_| reg(&mut r, None, now).1).collect();
        assert_eq!(
            shards,
            [0, 1, 2, 0, 1],
            "fewest live workers, lowest index first"
        );
        assert_eq!(reg(&mut r, Some((2, 3)), now).1, 2);
        for bad in [(3, 3), (0, 2), (0, 4)] {
            let e = r.register("x".into(), String::new(), Some(bad), now, |_| false);
            assert!(
                matches!(&e, Err(Refusal::Invalid(m)) if m.contains("3 shard(s)")),
                "{bad:?}: {e:?}"
            );
        }
        assert_eq!(r.len(), 6);
        assert_eq!(r.seen(), 6, "refused registrations are not counted");
        let ids: Vec<u64> = r.iter().map(|(id, _)| id).collect();
        assert_eq!(ids, [1, 2, 3, 4, 5, 6], "ids are never reused");
        r.remove(2);
        assert_eq!(
            reg(&mut r, None, now),
            (7, 1),
            "the shard that lost a worker"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn silent_workers_are_reaped_after_three_intervals() {
        let hb = Duration::from_millis(100);
        let t0 = Instant::now();
        let mut r = WorkerRegistry::new(1);
        let (a, _) = reg(&mut r, None, t0);
        let (b, _) = reg(&mut r, None, t0);
        assert!(
            r.reap(t0 + hb * 3, hb).is_empty(),
            "three intervals exactly: alive"
        );
        assert!(r.touch(b, t0 + hb * 2));
        let dead = r.reap(t0 + hb * 3 + Duration::from_millis(1), hb);
        assert_eq!(dead.iter().map(|d| d.0).collect::<Vec<_>>(), [a]);
        assert!(!r.touch(a, t0), "a reaped worker is unknown");
        assert!(r.get(b).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn only_idle_movable_workers_move_to_a_shard_nobody_serves() {
        let now = Instant::now();
        let mut r = WorkerRegistry::new(3);
        let (a, _) = reg(&mut r, None, now); // shard 0
        let (fixed, _) = reg(&mut r, Some((0, 3)), now);
        // Shard 2 has work and nobody; shard 1 has nobody and no work.
        let work = |s: usize| s == 2;
        assert_eq!(r.orphaned_shard_for(a, work), Some(2));
        assert_eq!(
            r.orphaned_shard_for(fixed, work),
            None,
            "asked for its shard"
        );
        assert_eq!(
            r.orphaned_shard_for(a, |s| s == 0 || s == 2),
            None,
            "own shard has work"
        );
        assert_eq!(r.orphaned_shard_for(99, work), None, "unknown worker");
        let (_, s) = reg(&mut r, None, now);
        assert_eq!(s, 1);
        let (_, s) = reg(&mut r, None, now);
        assert_eq!(s, 2);
        assert_eq!(r.orphaned_shard_for(a, work), None, "shard 2 is served now");
    }

    /// A worker moved off an idle shard to one with work and nobody serving it lands
    /// there when it registers again, not back on the shard it left (which has as few
    /// workers): otherwise it is moved again at its next poll, forever. Found by the
    /// emulated 128-worker cluster (`coordinator scale`), which spent its time doing so.
    #[tokio::test(start_paused = true)]
    async fn a_moved_worker_registers_where_the_work_is() {
        let now = Instant::now();
        let mut r = WorkerRegistry::new(3);
        let (a, _) = reg(&mut r, None, now);
        let work = |s: usize| s == 2;
        assert_eq!(r.orphaned_shard_for(a, work), Some(2));
        r.remove(a);
        let (_, shard) = r
            .register("a".into(), String::new(), None, now, work)
            .unwrap();
        assert_eq!(shard, 2, "the shard with work, not 0 where it came from");
        // Fewest live workers still comes first.
        let (_, shard) = r
            .register("b".into(), String::new(), None, now, work)
            .unwrap();
        assert_eq!(shard, 0);
    }
}
