//! Learning mode for egressd, in userspace only (no aya, no tokio), so both the daemon
//! and `egressctl` can use it:
//!
//! - [`Store`]: the durable SQLite store of observed flows under `/var/lib/egressd`,
//!   fed with the datapath's periodic snapshots ([`FlowSample`]s) and read back as
//!   aggregated [`Observation`]s (`egressctl observed`);
//! - [`suggest()`]: observations -> `policy.toml` `[[workload]]` blocks with the evidence
//!   as comments (`egressctl suggest`), and [`merge_exports`] for fleet learning;
//! - [`diff()`]: what was observed that a policy does not allow (`egressctl diff`);
//! - [`export()`]: a policy as Kubernetes NetworkPolicy or CiliumNetworkPolicy YAML
//!   (`egressctl export`).
#![forbid(unsafe_code)]

mod classify;
mod diff;
mod error;
mod export;
mod model;
mod names;
mod store;
mod suggest;
mod time;

pub use classify::is_internal;
pub use diff::diff;
pub use error::ObserveError;
pub use export::{APP_LABEL, ExportFormat, UnknownExportFormat, export};
pub use model::{
    FlowKey, FlowSample, MAX_NAMES, MAX_PROCESSES, Observation, PLAINTEXT_PORTS, Process,
    SampleVerdict, is_plaintext, protocol_name,
};
pub use names::{
    NameObservation, QueryOutcome, QuerySample, QueryTallies, QueryTally, flag_tunnelling,
    label_entropy,
};
pub use store::{Filter, PruneStats, Retention, SCHEMA_VERSION, Store, sort_most_important_first};
pub use suggest::{SuggestOptions, merge_exports, suggest};
pub use time::{format_rfc3339, parse_since};
