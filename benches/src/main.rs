//! egressd-bench: egressd against no firewall, nftables and iptables, side by side in one
//! run, as ratios of values measured in the same round.
//!
//! ```text
//! egressd-bench run [--quick] [--rounds N] [--seconds S] [--entries 10,10000,100000] [--out DIR]
//! ```
//!
//! `run` needs root and cgroup v2: it moves into a network namespace of its own (all
//! traffic goes over that namespace's loopback; nft and iptables rules are loaded there
//! only), creates 1,000 workload cgroups, and alternates the configurations round by round.
//! It writes `results.json` (every value, the machine, the kernel, the commit) and
//! `results.md` (the tables and targets) to `--out`. `--quick` runs each scenario once,
//! briefly, to prove it works (the test suite does this); it evaluates no target.
//! Benchmarks are not tests: a missed target does not fail the run; a configuration that is
//! not in force, a client that fails or a setup error does.
#![forbid(unsafe_code)]

mod allowlist;
mod bench;
mod client;
mod client_dns;
mod dns;
mod firewall;
mod netns;
mod procfs;
mod results;
mod sinks;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context as _;
use clap::Parser as _;

#[derive(Debug, clap::Parser)]
#[command(
    name = "egressd-bench",
    version,
    about = "Benchmarks of egressd against no firewall, nftables and iptables"
)]
enum Cli {
    /// Run the benchmarks (root; installs nothing: scripts/bench.sh does).
    Run(RunArgs),
    /// The measuring client, run by `run` inside the measured cgroup.
    #[command(hide = true)]
    Client {
        /// The cgroup directory to join before opening any socket.
        #[arg(long)]
        cgroup: PathBuf,
        /// The scenario, as JSON.
        #[arg(long)]
        spec: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    Datapath,
    Dns,
    Learning,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Each scenario once, briefly, with 10 entries: proves the harness works.
    #[arg(long)]
    quick: bool,
    /// Rounds per scenario (each runs every configuration once).
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds per measurement.
    #[arg(long)]
    seconds: Option<f64>,
    /// Allowlist sizes of the measured workload.
    #[arg(long, value_delimiter = ',')]
    entries: Option<Vec<usize>>,
    /// Offered DNS answer rates (per second).
    #[arg(long, value_delimiter = ',')]
    dns_rates: Option<Vec<u32>>,
    /// New destinations in the learning-mode scenario.
    #[arg(long)]
    learning_flows: Option<u64>,
    /// Which parts to run: datapath, dns, learning (all by default).
    #[arg(long, value_delimiter = ',', default_value = "datapath,dns,learning")]
    parts: Vec<Part>,
    /// Seconds to wait in all for someone else's egressd or cgroup programs to go before
    /// measuring anyway (default 600; 0 with --quick).
    #[arg(long)]
    foreign_wait: Option<u64>,
    /// Where results.json and results.md go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// How the machine was shared during the run, for the report.
    #[arg(long, default_value = "not described (pass --conditions).")]
    conditions: String,
}

impl RunArgs {
    fn options(&self) -> bench::Options {
        let quick = self.quick;
        let seconds = self.seconds.unwrap_or(if quick { 0.5 } else { 1.5 });
        let millis = (seconds * 1000.0).round().max(50.0) as u64;
        let rounds = self.rounds.unwrap_or(if quick { 1 } else { 7 }).max(1);
        bench::Options {
            quick,
            rounds,
            millis,
            dns_millis: if quick {
                millis.max(500)
            } else {
                millis.max(3000)
            },
            entries: self.entries.clone().unwrap_or_else(|| {
                if quick {
                    vec![10]
                } else {
                    vec![10, 10_000, 100_000]
                }
            }),
            datapath: self.parts.contains(&Part::Datapath),
            dns_rates: if self.parts.contains(&Part::Dns) {
                self.dns_rates.clone().unwrap_or_else(|| vec![1000, 20_000])
            } else {
                Vec::new()
            },
            learning_flows: self
                .learning_flows
                .unwrap_or(if quick { 2000 } else { 100_000 }),
            learning_rounds: match (self.parts.contains(&Part::Learning), quick) {
                (false, _) => 0,
                (true, true) => 1,
                (true, false) => rounds.min(3),
            },
            learning_millis: if quick { 10_000 } else { 90_000 },
            idle_millis: if quick { 200 } else { 2000 },
            foreign_wait: std::time::Duration::from_secs(self.foreign_wait.unwrap_or(if quick {
                0
            } else {
                600
            })),
            out: self.out.clone(),
            conditions: self.conditions.clone(),
        }
    }
}

fn main() -> ExitCode {
    let result = match Cli::parse() {
        Cli::Client { cgroup, spec } => client::main(&cgroup, &spec),
        Cli::Run(args) => run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("egressd-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &RunArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "egressd-bench must run as root (it loads eBPF and firewall rules and creates cgroups): \
         sudo scripts/bench.sh"
    );
    // Before any thread exists: unshare moves only the calling thread.
    netns::enter_private()?;
    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&interrupted))
            .context("installing the signal handlers")?;
    }
    let opts = args.options();
    let meta = report::meta(&opts);
    let mut bench = bench::Bench::new(opts.clone(), interrupted)?;
    bench.set_meta(meta);
    let results = bench.run()?;
    report::write(&results, &opts.out)
}

mod report {
    //! The run's description and the files written from the results.

    use std::fs;
    use std::path::Path;
    use std::process::Command;

    use anyhow::Context as _;

    use crate::bench::Options;
    use crate::firewall::tool_versions;
    use crate::procfs;
    use crate::results::{Meta, Results};

    fn git(args: &[&str]) -> Option<String> {
        let output = Command::new("git").args(args).output().ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    pub fn meta(opts: &Options) -> Meta {
        let commit = match git(&["rev-parse", "--short=12", "HEAD"]) {
            Some(hash) => match git(&["status", "--porcelain", "--untracked-files=no"]) {
                Some(changes) if !changes.is_empty() => format!("{hash} + uncommitted changes"),
                _ => hash,
            },
            None => "unknown (not a git checkout)".to_owned(),
        };
        Meta {
            date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            commit,
            kernel: procfs::kernel(),
            machine: procfs::machine(),
            build: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            quick: opts.quick,
            rounds: opts.rounds,
            seconds_per_measurement: opts.millis as f64 / 1000.0,
            entries: opts.entries.clone(),
            workloads: crate::allowlist::OTHER_WORKLOADS + 1,
            tools: tool_versions(),
            conditions: opts.conditions.clone(),
            ..Meta::default()
        }
    }

    pub fn write(results: &Results, out: &Path) -> anyhow::Result<()> {
        fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let json = serde_json::to_string_pretty(&results.json()).context("encoding the results")?;
        let json_path = out.join("results.json");
        fs::write(&json_path, json + "\n")
            .with_context(|| format!("writing {}", json_path.display()))?;
        let markdown = results.markdown();
        let md_path = out.join("results.md");
        fs::write(&md_path, &markdown).with_context(|| format!("writing {}", md_path.display()))?;
        println!("{markdown}");
        eprintln!(
            "egressd-bench: wrote {} and {}",
            json_path.display(),
            md_path.display()
        );
        Ok(())
    }
}
