//! `egressctl export --format kubernetes|cilium [--workload NAME] [--namespace NS]`

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use egressd_observe::{ExportFormat, export};

use crate::cmd::observations;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// NetworkPolicy (`kubernetes`) or CiliumNetworkPolicy (`cilium`).
    #[arg(long, value_name = "FORMAT", value_parser = parse_format)]
    pub format: ExportFormat,
    /// Only this workload (default: every workload but `host`).
    #[arg(long, value_name = "NAME")]
    pub workload: Option<String>,
    /// The namespace of the policies.
    #[arg(long, value_name = "NS", default_value = "default")]
    pub namespace: String,
    /// The policy to export.
    #[arg(long, value_name = "FILE", default_value = "/etc/egressd/policy.toml")]
    pub policy: PathBuf,
}

fn parse_format(text: &str) -> Result<ExportFormat, String> {
    text.parse()
        .map_err(|e: egressd_observe::UnknownExportFormat| e.to_string())
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let policy = observations::load_policy(&args.policy)?;
    let yaml = export(
        &policy,
        args.format,
        args.workload.as_deref(),
        &args.namespace,
    )?;
    std::io::stdout().lock().write_all(yaml.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}
