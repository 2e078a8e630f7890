//! Errors of the store, `--since` parsing and export.

use std::path::PathBuf;

/// What failed, and on what.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("cannot create the observation store {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the observation store {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// An SQL statement failed; `step` says which part of the store was running it.
    #[error("observation store {}: {step} failed", path.display())]
    Sql {
        path: PathBuf,
        step: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "observation store {} has schema version {found}, newer than the {supported} this \
         egressd understands: upgrade egressd, or move the file away to start afresh",
        path.display()
    )]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error(
        "observation store {} has schema version {found} and was opened read-only, so it \
         cannot be migrated to {supported}: open it once read-write (the daemon does)",
        path.display()
    )]
    SchemaTooOld {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error(
        "observation store {} holds an invalid {what} {value:?} (row {row}): the file was \
         not written by egressd",
        path.display()
    )]
    Corrupt {
        path: PathBuf,
        what: &'static str,
        value: String,
        row: i64,
    },
    #[error(
        "invalid --since {text:?}: {reason} (examples: \"72h\", \"30m\", \"2024-05-01T00:00:00Z\")"
    )]
    InvalidSince { text: String, reason: String },
    #[error("the policy has no workload named {name:?}")]
    UnknownWorkload { name: String },
    #[error("cannot write the {what} as YAML")]
    Yaml {
        what: &'static str,
        #[source]
        source: serde_yaml_ng::Error,
    },
}
