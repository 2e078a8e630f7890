//! The benchmark runs in a network namespace of its own: its loopback carries all traffic,
//! and the nftables tables and iptables chains it loads live and die with it (even when
//! the benchmark is killed). cgroup hooks are not per namespace, so egressd still sees it.

use std::fs;
use std::os::unix::fs::MetadataExt as _;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context as _, bail, ensure};
use nix::sched::{CloneFlags, unshare};

/// The namespace the benchmark started in (the host's, as a rule).
static ORIGINAL: OnceLock<u64> = OnceLock::new();

fn net_ns_inode(pid: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/ns/net");
    Ok(fs::metadata(&path)
        .with_context(|| format!("stat {path}"))?
        .ino())
}

/// Moves this process into a new network namespace with its loopback up. Must run before
/// the process starts any thread (unshare applies to the calling thread only).
pub fn enter_private() -> anyhow::Result<()> {
    let before = net_ns_inode("self")?;
    ORIGINAL
        .set(before)
        .map_err(|_| anyhow::anyhow!("the benchmark entered its network namespace twice"))?;
    unshare(CloneFlags::CLONE_NEWNET)
        .context("unshare(CLONE_NEWNET) failed: the benchmark must run as root")?;
    ensure!(
        net_ns_inode("self")? != before,
        "unshare(CLONE_NEWNET) left the network namespace unchanged"
    );
    run("ip", &["link", "set", "lo", "up"])?;
    // Connect loops open tens of thousands of connections per second: give them every port,
    // and the listeners room for what arrives while their accept threads wait for a CPU.
    fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535")
        .context("widening net.ipv4.ip_local_port_range in the benchmark's namespace")?;
    fs::write(
        "/proc/sys/net/core/somaxconn",
        crate::sinks::BACKLOG.to_string(),
    )
    .context("raising net.core.somaxconn in the benchmark's namespace")?;
    Ok(())
}

/// Fails unless this process has left the network namespace it started in: every nft and
/// iptables command of the benchmark checks this first, so it never touches the host's.
pub fn ensure_private() -> anyhow::Result<()> {
    let original = ORIGINAL.get().copied();
    ensure!(
        original.is_some() && original != Some(net_ns_inode("self")?),
        "refusing to change firewall rules outside the benchmark's own network namespace"
    );
    Ok(())
}

/// Runs a command (stdin closed) and fails with its stderr unless it succeeds.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| {
            format!("cannot run {program} (run scripts/bench.sh, which installs it)")
        })?;
    if !output.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
