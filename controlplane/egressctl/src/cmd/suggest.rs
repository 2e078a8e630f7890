//! `egressctl suggest [--workload NAME] [--since 72h] [--wildcard-min N] [--from FILE...]`

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use egressd_observe::{SuggestOptions, suggest};

use crate::cmd::observations::{self, SourceArgs};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Collapse N or more names below one parent domain into one `*.parent` rule.
    #[arg(long, value_name = "N")]
    pub wildcard_min: Option<usize>,
    /// Learn from `egressctl observed --json` exports (of several hosts) instead of
    /// this host's store.
    #[arg(long, value_name = "FILE", num_args = 1..)]
    pub from: Vec<PathBuf>,
    /// Take the workloads' cgroup patterns from this policy file.
    #[arg(long, value_name = "FILE", default_value = "/etc/egressd/policy.toml")]
    pub policy: PathBuf,
}

pub fn run(socket: &Path, args: &Args) -> anyhow::Result<ExitCode> {
    let (observations, candidate_names) = if args.from.is_empty() {
        let source = observations::Source::open(socket, &args.source, false)?;
        let names = source
            .names()?
            .into_iter()
            .filter(|n| !n.connected)
            .collect();
        (source.observations()?, names)
    } else {
        (
            observations::load_exports(&args.from, &args.source)?,
            Vec::new(),
        )
    };
    let mut options = SuggestOptions {
        wildcard_min: args.wildcard_min,
        candidate_names,
        ..SuggestOptions::default()
    };
    // The cgroup patterns are a convenience: without a readable policy, suggest still
    // works and marks each cgroup as a TODO.
    match observations::load_policy(&args.policy) {
        Ok(policy) => options = options.with_cgroups_from(&policy),
        Err(e) if args.policy.exists() => {
            eprintln!("egressctl: cgroup patterns not taken from the policy: {e:#}");
        }
        Err(_) => {}
    }
    let text = suggest(&observations, &options);
    std::io::stdout().lock().write_all(text.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}
