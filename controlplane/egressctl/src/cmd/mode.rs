//! `egressctl mode <learning|audit|strict|file> [--workload NAME]`

use std::io::{self, Write};
use std::path::Path;
use std::process::ExitCode;

use clap::ValueEnum;
use egressd_proto::{ModeSetting, Request};

use crate::client::{Client, TIMEOUT};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The mode to force, or `file` to drop the override.
    #[arg(value_enum, value_name = "MODE")]
    pub mode: ModeArg,
    /// Change only this workload (default: the daemon-wide default mode).
    #[arg(long, value_name = "NAME")]
    pub workload: Option<String>,
}

/// `ModeSetting` as the command line spells it, with help text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Deny nothing; record every new destination.
    Learning,
    /// Allow everything; log what strict mode would deny.
    Audit,
    /// Deny whatever the policy does not allow.
    Strict,
    /// Go back to the mode the policy file sets.
    File,
}

impl Args {
    pub fn setting(&self) -> ModeSetting {
        match self.mode {
            ModeArg::Learning => ModeSetting::Learning,
            ModeArg::Audit => ModeSetting::Audit,
            ModeArg::Strict => ModeSetting::Strict,
            ModeArg::File => ModeSetting::File,
        }
    }

    pub fn request(&self) -> Request {
        Request::SetMode {
            mode: self.setting(),
            workload: self.workload.clone(),
        }
    }
}

pub fn run(socket: &Path, args: &Args) -> anyhow::Result<ExitCode> {
    let message = Client::connect(socket, Some(TIMEOUT))?.call_for_message(&args.request())?;
    writeln!(io::stdout().lock(), "{message}")?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_arg_maps_to_its_setting() {
        for arg in ModeArg::value_variants() {
            let args = Args {
                mode: *arg,
                workload: None,
            };
            let name = arg
                .to_possible_value()
                .expect("visible")
                .get_name()
                .to_owned();
            assert_eq!(args.setting().as_str(), name);
        }
        let args = Args {
            mode: ModeArg::File,
            workload: Some("web".into()),
        };
        assert_eq!(
            args.request(),
            Request::SetMode {
                mode: ModeSetting::File,
                workload: Some("web".into())
            }
        );
    }
}
