//! The command line. A contract: later work adds subcommands and options,
//! never renames them.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use egressd_proto::DEFAULT_SOCKET;

use crate::cmd::{check, diff, dns, events, export, mode, observed, reload, status, suggest};

/// Control and inspect egressd, the eBPF egress firewall.
#[derive(Debug, Parser)]
#[command(name = "egressctl", version, propagate_version = true)]
pub struct Cli {
    /// Control socket of the daemon.
    #[arg(
        long,
        global = true,
        env = "EGRESSD_SOCKET",
        hide_env_values = true,
        value_name = "PATH",
        default_value = DEFAULT_SOCKET
    )]
    pub socket: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Override the enforcement mode of the daemon or of one workload.
    Mode(mode::Args),
    /// Show the policy in force, workload modes and datapath counters.
    Status(status::Args),
    /// Re-read the policy file; the last good policy stays on failure.
    Reload(reload::Args),
    /// Validate a policy file, without a daemon.
    Check(check::Args),
    /// Show recent connection events, optionally following new ones.
    Events(events::Args),
    /// Show the names workloads resolved through fqdn rules and their addresses.
    Dns(dns::Args),
    /// Show what each workload contacted, most important first (from the observation store).
    Observed(observed::Args),
    /// Print policy.toml [[workload]] blocks that allow exactly what was observed.
    Suggest(suggest::Args),
    /// List observed destinations the policy does not allow (exit 1 if any, 2 on error).
    Diff(diff::Args),
    /// Write the policy as Kubernetes NetworkPolicy or CiliumNetworkPolicy YAML.
    Export(export::Args),
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::CommandFactory;
    use clap::error::ErrorKind;
    use egressd_proto::ModeSetting;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("egressctl").chain(args.iter().copied()))
    }

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn socket_defaults_and_overrides() {
        // `EGRESSD_SOCKET` is covered by the integration tests, which control
        // the environment of a child process.
        let cli = parse(&["status", "--socket", "/tmp/x.sock"]).expect("parse");
        assert_eq!(cli.socket, Path::new("/tmp/x.sock"));
        let cli = parse(&["--socket", "/tmp/y.sock", "reload"]).expect("parse");
        assert_eq!(cli.socket, Path::new("/tmp/y.sock"));
    }

    #[test]
    fn mode_takes_a_setting_and_an_optional_workload() {
        let cli = parse(&["mode", "strict", "--workload", "web"]).expect("parse");
        let Command::Mode(args) = cli.command else {
            panic!("not mode: {cli:?}")
        };
        assert_eq!(args.setting(), ModeSetting::Strict);
        assert_eq!(args.workload.as_deref(), Some("web"));

        for (word, setting) in [
            ("learning", ModeSetting::Learning),
            ("audit", ModeSetting::Audit),
            ("file", ModeSetting::File),
        ] {
            let cli = parse(&["mode", word]).expect("parse");
            let Command::Mode(args) = cli.command else {
                panic!("not mode")
            };
            assert_eq!(args.setting(), setting);
            assert_eq!(args.workload, None);
        }

        let err = parse(&["mode", "enforce"]).expect_err("bad mode");
        assert_eq!(err.kind(), ErrorKind::InvalidValue);
        assert_eq!(err.exit_code(), 2);
        let err = parse(&["mode"]).expect_err("missing mode");
        assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn status_json_flag() {
        let cli = parse(&["status"]).expect("parse");
        let Command::Status(args) = cli.command else {
            panic!("not status")
        };
        assert!(!args.json);
        let cli = parse(&["status", "--json"]).expect("parse");
        let Command::Status(args) = cli.command else {
            panic!("not status")
        };
        assert!(args.json);
    }

    #[test]
    fn check_defaults_to_the_installed_policy() {
        let cli = parse(&["check"]).expect("parse");
        let Command::Check(args) = cli.command else {
            panic!("not check")
        };
        assert_eq!(args.file, Path::new("/etc/egressd/policy.toml"));
        assert!(!args.require_reasons);
        let cli = parse(&["check", "p.toml", "--require-reasons"]).expect("parse");
        let Command::Check(args) = cli.command else {
            panic!("not check")
        };
        assert_eq!(args.file, Path::new("p.toml"));
        assert!(args.require_reasons);
    }

    #[test]
    fn events_options() {
        let cli = parse(&["events"]).expect("parse");
        let Command::Events(args) = cli.command else {
            panic!("not events")
        };
        assert!(!args.follow && !args.json);
        assert_eq!(args.limit, None);
        let cli = parse(&["events", "--follow", "--json", "--limit", "20"]).expect("parse");
        let Command::Events(args) = cli.command else {
            panic!("not events")
        };
        assert!(args.follow && args.json);
        assert_eq!(args.limit, Some(20));
        let err = parse(&["events", "--limit", "many"]).expect_err("bad limit");
        assert_eq!(err.kind(), ErrorKind::ValueValidation);
    }

    #[test]
    fn unknown_subcommands_and_flags_are_usage_errors() {
        for args in [&["frobnicate"][..], &["status", "--yaml"], &[]] {
            let err = parse(args).expect_err("usage error");
            assert_eq!(err.exit_code(), 2, "{args:?}: {err}");
        }
    }
}
