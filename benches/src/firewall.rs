//! The configurations the benchmark alternates: no firewall, egressd, nftables, iptables.
//! Each active one is a guard that removes what it loaded when dropped.

use std::fmt;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use egressd_tests::{Daemon, DaemonLock};
use serde::Serialize;

use crate::allowlist::NFT_TABLE;
use crate::netns::{ensure_private, run};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Config {
    None,
    Egressd,
    /// egressd running, the client in a cgroup of no workload: what egressd costs the
    /// processes it does not govern (measured in the same daemon session as `Egressd`).
    #[serde(rename = "egressd-unmanaged")]
    EgressdUnmanaged,
    Nftables,
    Iptables,
}

impl Config {
    /// The configurations a round alternates (`EgressdUnmanaged` rides along with `Egressd`).
    pub const ALL: [Config; 4] = [
        Config::None,
        Config::Egressd,
        Config::Nftables,
        Config::Iptables,
    ];
    /// Every configuration, in the order of the report's columns.
    pub const COLUMNS: [Config; 5] = [
        Config::None,
        Config::Egressd,
        Config::EgressdUnmanaged,
        Config::Nftables,
        Config::Iptables,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Config::None => "none",
            Config::Egressd => "egressd",
            Config::EgressdUnmanaged => "egressd-unmanaged",
            Config::Nftables => "nftables",
            Config::Iptables => "iptables",
        }
    }

    /// The errno a connect to a closed port not on the allowlist fails with: the kernel's
    /// reset without a firewall, egressd's EPERM from connect4, the firewalls' reset.
    pub fn refused_errno(self) -> i32 {
        match self {
            Config::Egressd => libc::EPERM,
            Config::None | Config::EgressdUnmanaged | Config::Nftables | Config::Iptables => {
                libc::ECONNREFUSED
            }
        }
    }

    /// Whether a connect to a listening port not on the allowlist fails, and how.
    pub fn blocked_errno(self) -> Option<i32> {
        match self {
            Config::None | Config::EgressdUnmanaged => None,
            other => Some(other.refused_errno()),
        }
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `configs` rotated by `round`: each configuration takes each place in turn, so none is
/// always first after a pause or always next to the same neighbour.
pub fn rotated<T: Copy>(configs: &[T], round: usize) -> Vec<T> {
    let mut order = configs.to_vec();
    if !order.is_empty() {
        let len = order.len();
        order.rotate_left(round % len);
    }
    order
}

/// The nftables ruleset of the benchmark, loaded; deleted when dropped.
pub struct Nftables(());

impl Nftables {
    pub fn load(ruleset: &str, dir: &Path) -> anyhow::Result<(Nftables, Duration)> {
        ensure_private()?;
        let file = dir.join("ruleset.nft");
        std::fs::write(&file, ruleset).with_context(|| format!("writing {}", file.display()))?;
        let path = file.to_string_lossy().into_owned();
        let started = Instant::now();
        // The guard exists before the table does, so a half-loaded table goes too.
        let guard = Nftables(());
        run("nft", &["-f", &path]).context("loading the nftables ruleset")?;
        Ok((guard, started.elapsed()))
    }
}

impl Drop for Nftables {
    fn drop(&mut self) {
        if ensure_private().is_ok()
            && let Err(err) = run("nft", &["delete", "table", "inet", NFT_TABLE])
        {
            eprintln!("egressd-bench: removing the nftables table: {err:#}");
        }
    }
}

/// The iptables chains of the benchmark (iptables-nft, Debian's default backend), loaded;
/// removed with their table when dropped, so no hook is left behind to slow what follows.
pub struct Iptables(());

impl Iptables {
    pub fn load(rules: &str) -> anyhow::Result<(Iptables, Duration)> {
        ensure_private()?;
        let started = Instant::now();
        let guard = Iptables(());
        let mut child = Command::new("iptables-nft-restore")
            .arg("-n")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context(
                "cannot run iptables-nft-restore (run scripts/bench.sh, which installs iptables)",
            )?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(rules.as_bytes())
                .context("writing the rules to iptables-nft-restore")?;
        }
        let output = child
            .wait_with_output()
            .context("waiting for iptables-nft-restore")?;
        if !output.status.success() {
            bail!(
                "iptables-nft-restore failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok((guard, started.elapsed()))
    }
}

impl Drop for Iptables {
    fn drop(&mut self) {
        // iptables-nft keeps its chains in the nftables table `ip filter`: in this private
        // namespace nothing else uses it, and deleting it unregisters its hooks.
        if ensure_private().is_ok()
            && let Err(err) = run("nft", &["delete", "table", "ip", "filter"])
        {
            eprintln!("egressd-bench: removing the iptables chains: {err:#}");
        }
    }
}

/// Fails unless the namespace holds no firewall rules at all (checked after every
/// configuration, so "none" is never measured with a leftover hook).
pub fn ensure_no_rules() -> anyhow::Result<()> {
    ensure_private()?;
    let ruleset = run("nft", &["list", "ruleset"])?;
    ensure!(
        ruleset.trim().is_empty(),
        "rules are left in the benchmark's namespace:\n{ruleset}"
    );
    Ok(())
}

/// egressd started on a policy, with how long it took to answer `status`.
pub fn start_egressd(lock: &Arc<DaemonLock>, policy: &str) -> (Daemon, Duration) {
    let started = Instant::now();
    let daemon = Daemon::start_holding(Arc::clone(lock), policy, &[]);
    (daemon, started.elapsed())
}

/// How long a reload may take before the run fails.
const RELOAD_LIMIT: Duration = Duration::from_secs(120);

/// The policy hash `status` reports and its last reload error; `None` while the daemon does
/// not answer (it answers `status` only between reloads).
fn policy_status(daemon: &Daemon) -> Option<(String, Option<String>)> {
    let output = daemon.ctl(&["status", "--json"]);
    if !output.status.success() {
        return None;
    }
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    let sha = status["policy"]["sha256"].as_str()?.to_owned();
    let error = status["policy"]["last_error"]
        .as_object()
        .map(|error| serde_json::Value::Object(error.clone()).to_string());
    Some((sha, error))
}

/// Replaces the daemon's policy file, sends SIGHUP and times until `status` shows the new
/// policy in force (polling every 10 ms, at most [`RELOAD_LIMIT`]). Not `egressctl reload`:
/// its 10-second deadline would end the run when a reload is merely slow, which is a result.
pub fn reload_egressd(daemon: &Daemon, policy: &str) -> anyhow::Result<Duration> {
    let (before, _) = policy_status(daemon)
        .ok_or_else(|| anyhow::anyhow!("egressd does not answer `status` before the reload"))?;
    daemon.rewrite_policy(policy);
    let started = Instant::now();
    daemon.sighup();
    loop {
        if let Some((sha, error)) = policy_status(daemon) {
            if let Some(error) = error {
                bail!("egressd refused the reload: {error}");
            }
            if sha != before {
                return Ok(started.elapsed());
            }
        }
        ensure!(
            started.elapsed() < RELOAD_LIMIT,
            "egressd did not apply the new policy within {RELOAD_LIMIT:?} of SIGHUP"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Versions of the firewall tools, for the report.
pub fn tool_versions() -> Vec<String> {
    [("nft", "--version"), ("iptables-nft", "--version")]
        .iter()
        .map(|(program, arg)| match run(program, &[arg]) {
            Ok(out) => out.trim().to_owned(),
            Err(err) => format!("{program}: {err:#}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_puts_every_configuration_first_once() {
        let firsts: Vec<Config> = (0..4).map(|r| rotated(&Config::ALL, r)[0]).collect();
        assert_eq!(firsts, Config::ALL.to_vec());
        assert_eq!(rotated(&Config::ALL, 5), rotated(&Config::ALL, 1));
    }
}
