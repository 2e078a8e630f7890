//! The daemon's command line, in a library so packaging can render man pages from it.

use std::path::PathBuf;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "egressd",
    version,
    about = "Node-level egress firewall: eBPF on cgroup v2"
)]
pub struct Args {
    /// Policy file.
    #[arg(long, default_value = "/etc/egressd/policy.toml")]
    pub config: PathBuf,
    /// Where modes set with `egressctl mode` are kept across restarts.
    #[arg(long, default_value = "/var/lib/egressd")]
    pub state_dir: PathBuf,
    /// Control socket for egressctl.
    #[arg(long, default_value = egressd_proto::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Group (name or number) whose members may use the control socket like root (owns the
    /// socket, mode 0660). Read-only access: `[control] read_group` in the policy.
    #[arg(long)]
    pub socket_group: Option<String>,
    /// Cgroup v2 mount to attach at (default: found in /proc/self/mounts).
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// bpffs folder where programs, links and maps are pinned, so that enforcement
    /// continues while egressd is stopped or restarting (bpffs is mounted on /sys/fs/bpf
    /// if nothing is).
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Remove the pinned programs and maps (ending enforcement) and exit.
    #[arg(long)]
    pub uninstall: bool,
    /// For tests: create a map smaller than the eBPF object declares, `MAP=ENTRIES` (allow,
    /// deny, workload_cgroups, fqdn, fqdn_addresses, flows), so that filling it takes a
    /// handful of entries. Only when the maps are created: adopted pins keep their size.
    #[arg(long, value_name = "MAP=ENTRIES", hide = true)]
    pub test_map_capacity: Vec<String>,
}

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/egressd";

/// The clap command, for man pages and completions.
pub fn command() -> clap::Command {
    <Args as clap::CommandFactory>::command()
}
