//! ccq's wire protocol: the code generated from `proto/ccq.proto` (at build time; nothing
//! generated is committed) and the protocol version both ends compare on registration.
//!
//! - [`client`]: how a process reaches the coordinator (endpoint, TLS, token, errors);
//!   used by workers and `coordinator status`;
//! - [`process`]: the shutdown signal and log setup shared by both binaries.

pub mod client;
pub mod process;

/// Bumped on any incompatible change to `ccq.proto` or to the meaning of its fields.
/// 2: `SyncNetworkResponse.full` is the binary network form, no longer the JSON `.ccq`.
/// 3: `Job.teacher_logits` (distillation): a worker that ignored it would score the
/// labels instead, silently.
/// 4: measurement jobs (`Job.measure`) and `SyncNetworkRequest.want_version`: the
/// coordinator no longer measures validation and test accuracy itself; training jobs
/// carry the network changes since the worker's last job (`Job.changes`).
/// 5: `search.window`: a training job's `network_version` may be older than the latest
/// (or than the worker's), and the worker asks for exactly that version
/// (`SyncNetworkRequest.want_version`); change lists may go back as well as forward.
/// 6: `CandidateResult.paired_sq` (`search.margin`): a worker that left it 0 would make
/// every gain look noise-free, silently.
/// 7: the job loop is one stream (`Work`) instead of a `PollJob` / `SubmitResult` call
/// per job; network changes are two parallel arrays (`Changes`), not a message each.
/// 8: the network's binary form carries channel scales (`QConv.scales`, `LayerVars.kind`);
/// an older worker could not decode it.
/// 9: and activation clips (`QNetwork.clips`, `QConv.clip`).
/// 10: `Job.block_end` / `Job.block_targets` (block-local fitness): an older worker would
/// ignore them and score the logits instead, silently.
pub const PROTOCOL_VERSION: u32 = 10;

/// Request metadata key carrying the cluster token, as `Bearer <token>`.
pub const TOKEN_METADATA: &str = "authorization";

pub mod v1 {
    tonic::include_proto!("ccq.v1");

    impl Changes {
        /// The wire form of `(variable, code)` pairs.
        pub fn from_pairs(pairs: &[(u32, i8)]) -> Changes {
            Changes {
                vars: pairs.iter().map(|&(v, _)| v).collect(),
                codes: pairs.iter().map(|&(_, c)| c as u8).collect(),
            }
        }

        /// The `(variable, code)` pairs; an error when the two arrays differ in length.
        /// (Whether each variable exists and its code is in range is the network's to
        /// check when it applies them.)
        pub fn to_pairs(&self) -> Result<Vec<(u32, i8)>, String> {
            if self.vars.len() != self.codes.len() {
                return Err(format!(
                    "{} changed variables but {} codes",
                    self.vars.len(),
                    self.codes.len()
                ));
            }
            Ok(self
                .vars
                .iter()
                .zip(&self.codes)
                .map(|(&v, &c)| (v, c as i8))
                .collect())
        }

        pub fn len(&self) -> usize {
            self.vars.len()
        }

        pub fn is_empty(&self) -> bool {
            self.vars.is_empty()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::v1::Changes;

    #[test]
    fn changes_round_trip_and_mismatched_arrays_are_refused() {
        let pairs = vec![(0, -8), (7, 7), (123_456, -1), (u32::MAX, i8::MIN)];
        let wire = Changes::from_pairs(&pairs);
        assert_eq!(wire.len(), 4);
        assert_eq!(wire.to_pairs().unwrap(), pairs);
        let short = Changes {
            vars: vec![1, 2],
            codes: vec![0],
        };
        let e = short.to_pairs().unwrap_err();
        assert!(e.contains("2 changed variables but 1 codes"), "{e}");
        assert!(Changes::default().to_pairs().unwrap().is_empty());
    }
}
