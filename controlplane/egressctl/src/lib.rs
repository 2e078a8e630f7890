//! `egressctl` as a library: the command line and the subcommands behind it.
//!
//! The binary (`main.rs`) is a thin wrapper around [`cmd::run`]; packaging
//! (`cargo xtask dist`) renders the man page and shell completions from
//! [`cli::Cli`], so they cannot drift from the real command line.
#![forbid(unsafe_code)]

pub mod cli;
mod client;
pub mod cmd;
mod text;

/// The clap command, for man pages and completions.
pub fn command() -> clap::Command {
    <cli::Cli as clap::CommandFactory>::command()
}
