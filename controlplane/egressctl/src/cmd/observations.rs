//! Where `observed`, `suggest` and `diff` get their observations: the daemon's SQLite
//! store (read-only, after asking the daemon to flush what the kernel holds), or
//! `egressctl observed --json` exports given with `--from`.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context as _;
use egressd_observe::{Filter, NameObservation, Observation, Store, merge_exports, parse_since};
use egressd_policy::Policy;
use egressd_proto::{Request, Response};

use crate::client::{Client, TIMEOUT};

/// Where the daemon keeps its store unless `--state-dir` says otherwise.
pub const DEFAULT_STORE: &str = "/var/lib/egressd/observations.db";

/// Options shared by the commands that read observations.
#[derive(Debug, Clone, clap::Args)]
pub struct SourceArgs {
    /// Only this workload.
    #[arg(long, value_name = "NAME")]
    pub workload: Option<String>,
    /// Only destinations seen within this long (e.g. 72h, 30m, 7d) or since this
    /// RFC 3339 time.
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,
    /// The observation store to read (default: the running daemon's, else
    /// /var/lib/egressd/observations.db).
    #[arg(
        long,
        value_name = "PATH",
        env = "EGRESSD_STORE",
        hide_env_values = true
    )]
    pub store: Option<PathBuf>,
}

/// The store (flushed by the daemon first) and the filter `args` describe.
pub struct Source {
    store: Store,
    filter: Filter,
}

impl Source {
    pub fn open(socket: &Path, args: &SourceArgs, internet_only: bool) -> anyhow::Result<Source> {
        let filter = Filter {
            workload: args.workload.clone(),
            since: since(args.since.as_deref())?,
            internet_only,
        };
        let path = flush_and_locate(socket, args.store.as_deref());
        let store = Store::open_read_only(&path).with_context(|| {
            format!(
                "reading observations from {} (is egressd running, with [observe] enabled? \
                 --store names another file)",
                path.display()
            )
        })?;
        Ok(Source { store, filter })
    }

    /// The destinations that match, most important first.
    pub fn observations(&self) -> anyhow::Result<Vec<Observation>> {
        Ok(self.store.observations(&self.filter)?)
    }

    /// The DNS questions that match, most asked first.
    pub fn names(&self) -> anyhow::Result<Vec<NameObservation>> {
        Ok(self.store.names(&self.filter)?)
    }
}

/// The observations that match `args`, most important first.
pub fn load(
    socket: &Path,
    args: &SourceArgs,
    internet_only: bool,
) -> anyhow::Result<Vec<Observation>> {
    Source::open(socket, args, internet_only)?.observations()
}

/// Observation exports (`egressctl observed --json`) of many hosts, merged, filtered.
pub fn load_exports(files: &[PathBuf], args: &SourceArgs) -> anyhow::Result<Vec<Observation>> {
    let mut exports = Vec::with_capacity(files.len());
    for file in files {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading observations from {}", file.display()))?;
        let observations: Vec<Observation> = serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: not an observation export (expected the JSON of `egressctl observed --json`)",
                file.display()
            )
        })?;
        exports.push(observations);
    }
    let since = since(args.since.as_deref())?;
    Ok(merge_exports(&exports)
        .into_iter()
        .filter(|o| args.workload.as_ref().is_none_or(|w| &o.key.workload == w))
        .filter(|o| since.is_none_or(|since| o.last_seen >= since))
        .collect())
}

fn since(text: Option<&str>) -> anyhow::Result<Option<SystemTime>> {
    text.map(|text| parse_since(text, SystemTime::now()))
        .transpose()
        .map_err(|e| anyhow::anyhow!("--since: {e}"))
}

/// Asks the daemon to write what the kernel holds, and where its store is. Without a
/// daemon, the store given or the default one is read as it is.
fn flush_and_locate(socket: &Path, store: Option<&Path>) -> PathBuf {
    let flushed =
        Client::connect(socket, Some(TIMEOUT)).and_then(|mut client| client.call(&Request::Flush));
    let daemon_store = match flushed {
        Ok(Response::Flushed(report)) => Some(PathBuf::from(report.store)),
        Ok(Response::Error { message }) => {
            eprintln!("egressctl: egressd could not flush its latest observations: {message}");
            None
        }
        Ok(_) => None,
        // No daemon: the store on disk is all there is.
        Err(_) => None,
    };
    store
        .map(Path::to_owned)
        .or(daemon_store)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STORE))
}

/// A policy file, or its diagnostics (one `FILE:LINE:COL: message` per line) as the error.
pub fn load_policy(path: &Path) -> anyhow::Result<Policy> {
    egressd_policy::load(path).map_err(|err| anyhow::anyhow!(crate::text::error_chain(&err)))
}
