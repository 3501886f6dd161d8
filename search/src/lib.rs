//! ccq-search: the search that trains a quantized network, as pure, synchronous code.
//!
//! - [`eda`]: per-variable categorical distributions over the integer codes, their
//!   update, confidence and freezing, and the grouping rules of every strategy;
//! - [`config`]: the `[search]` settings (strategy, generations per group, batch,
//!   fitness);
//! - [`trainer`]: EDA + cooperative coevolution as a state machine: next generation,
//!   complete it with the candidates' summed scores, snapshot and restore.
//!
//! Nothing here knows about gRPC, tokio or time: the coordinator drives a
//! [`trainer::Trainer`] from its event loop, tests drive it in-process. Networks and
//! evaluation results come from [`ccq_common`].

pub mod config;
pub mod eda;
pub mod trainer;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The errors of the search. Each names the setting, snapshot field or generation at
/// fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A search or EDA setting, or a serialized EDA state, outside what the search
    /// supports.
    #[error("invalid setting {field} = {value}: {reason}")]
    InvalidSetting {
        field: String,
        value: String,
        reason: String,
    },

    /// A trainer snapshot (from a checkpoint) that does not fit the network it is
    /// restored onto.
    #[error("checkpoint {origin}: {reason}")]
    Snapshot { origin: String, reason: String },

    /// Summed results that cannot belong to the generation they are completing.
    #[error("protocol violation: {0}")]
    Results(String),

    /// A rollback asked of a trainer that cannot take it now (generations in flight) or
    /// with codes that do not fit its network.
    #[error("cannot go back to the best network: {0}")]
    Rollback(String),

    /// The network refused a change of codes.
    #[error(transparent)]
    Network(#[from] ccq_common::Error),
}

impl Error {
    pub fn setting(field: &str, value: impl ToString, reason: impl Into<String>) -> Self {
        Error::InvalidSetting {
            field: field.to_string(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}
