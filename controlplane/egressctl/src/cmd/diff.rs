//! `egressctl diff [--policy FILE] [--since T] [--json]`: destinations observed (or denied)
//! that the policy does not allow. Exit 0: none; 1: some (listed); 2: error. A pipeline
//! fails the rollout of an upgraded agent on status 1.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use egressd_observe::diff;

use crate::cmd::observations::{self, SourceArgs};
use crate::cmd::observed::{bytes, destination, flags, names};
use crate::text::{clean, print_report, table};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The policy to compare with.
    #[arg(long, value_name = "FILE", default_value = "/etc/egressd/policy.toml")]
    pub policy: PathBuf,
    #[command(flatten)]
    pub source: SourceArgs,
    /// Compare `egressctl observed --json` exports instead of this host's store.
    #[arg(long, value_name = "FILE", num_args = 1..)]
    pub from: Vec<PathBuf>,
    /// Print the destinations as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Exit status when the policy misses something.
const DIFFERENCES: u8 = 1;
/// Exit status on any error (unreadable policy, store, ...): never mistaken for "clean".
const ERROR: u8 = 2;

pub fn run(socket: &Path, args: &Args) -> anyhow::Result<ExitCode> {
    match differences(socket, args) {
        Ok(true) => Ok(ExitCode::from(DIFFERENCES)),
        Ok(false) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("egressctl: {e:#}");
            Ok(ExitCode::from(ERROR))
        }
    }
}

fn differences(socket: &Path, args: &Args) -> anyhow::Result<bool> {
    let policy = observations::load_policy(&args.policy)?;
    let observations = if args.from.is_empty() {
        observations::load(socket, &args.source, false)?
    } else {
        observations::load_exports(&args.from, &args.source)?
    };
    let missing = diff(&policy, &observations);
    print_report(&missing, args.json, |missing| {
        if missing.is_empty() {
            return format!(
                "{}: allows everything observed ({} destinations)\n",
                args.policy.display(),
                observations.len()
            );
        }
        let rows: Vec<Vec<String>> = missing
            .iter()
            .map(|o| {
                vec![
                    clean(&o.key.workload).into_owned(),
                    destination(o),
                    names(o),
                    o.connections.to_string(),
                    bytes(o.bytes_sent),
                    egressd_observe::format_rfc3339(o.last_seen),
                    flags(o),
                ]
            })
            .collect();
        format!(
            "{} does not allow {} observed destination(s):\n{}",
            args.policy.display(),
            missing.len(),
            table(
                &[
                    "WORKLOAD",
                    "DESTINATION",
                    "NAMES",
                    "CONNS",
                    "SENT",
                    "LAST SEEN",
                    "FLAGS"
                ],
                &rows
            )
        )
    })?;
    Ok(!missing.is_empty())
}
