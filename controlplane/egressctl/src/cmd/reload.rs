//! `egressctl reload`

use std::io::{self, Write};
use std::path::Path;
use std::process::ExitCode;

use egressd_proto::Request;

use crate::client::{Client, RELOAD_TIMEOUT};

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(socket: &Path, _args: &Args) -> anyhow::Result<ExitCode> {
    let message =
        Client::connect(socket, Some(RELOAD_TIMEOUT))?.call_for_message(&Request::Reload)?;
    writeln!(io::stdout().lock(), "{message}")?;
    Ok(ExitCode::SUCCESS)
}
