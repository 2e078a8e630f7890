//! One module per subcommand, each with its `Args` and a `run`.

pub mod check;
pub mod diff;
pub mod dns;
pub mod events;
pub mod export;
pub mod mode;
mod observations;
pub mod observed;
pub mod reload;
pub mod status;
pub mod suggest;

use std::process::ExitCode;

use crate::cli::{Cli, Command};

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Mode(args) => mode::run(&cli.socket, &args),
        Command::Status(args) => status::run(&cli.socket, &args),
        Command::Reload(args) => reload::run(&cli.socket, &args),
        Command::Check(args) => check::run(&args),
        Command::Events(args) => events::run(&cli.socket, &args),
        Command::Dns(args) => dns::run(&cli.socket, &args),
        Command::Observed(args) => observed::run(&cli.socket, &args),
        Command::Suggest(args) => suggest::run(&cli.socket, &args),
        Command::Diff(args) => diff::run(&cli.socket, &args),
        Command::Export(args) => export::run(&args),
    }
}
