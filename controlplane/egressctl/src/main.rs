//! `egressctl`: the command-line client of egressd.
//!
//! Every subcommand but `check` talks to the daemon over its control socket
//! (newline-delimited JSON, see `egressd-proto`). Exit codes: 0 success,
//! 1 failure (daemon error, invalid policy, no daemon), 2 usage error.
#![forbid(unsafe_code)]

use std::io;
use std::process::ExitCode;

use clap::Parser;

use egressctl::cli::Cli;
use egressctl::cmd;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cmd::run(cli) {
        Ok(code) => code,
        // `egressctl events | head`: the reader left, nothing to report.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("egressctl: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether writing to stdout failed because its reader went away. Socket
/// errors arrive wrapped in `ProtoError`, so a bare `io::Error` is stdout's.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain()
        .filter_map(|cause| cause.downcast_ref::<io::Error>())
        .any(|io_err| io_err.kind() == io::ErrorKind::BrokenPipe)
}
