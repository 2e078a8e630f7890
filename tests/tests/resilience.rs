//! Never fail open by accident: programs and maps are pinned, so enforcement goes on while
//! egressd is dead, and a new egressd adopts the pinned state (or replaces a pin set of
//! another layout) without a moment in which an allowed connection is refused or a refused
//! one allowed.
//!
//! Privileged: root, cgroup v2, bpffs, built binaries (`cargo build --bins`), dnsmasq.

use std::path::Path;
use std::time::Duration;

use egressd_tests::{
    Daemon, DnsSettings, Dnsmasq, EVENT_TIMEOUT, RunningProbe, TcpServer, TcpTarget, TestCgroup,
    WorkloadSpec, allow, allow_fqdn, policy_toml, run_probe_in, spawn_probe_in,
};
use serde_json::Value;

const PROBE: &str = "probe";
const RESOLVER: &str = "127.0.53.41";
const NAME: &str = "learned.vendor.test";
/// connect4/6, sendmsg4/6, sock_create, egress, ingress: one pinned link each.
const ATTACHED_PROGRAMS: usize = 7;

/// A connect loop to an allowed and a refused destination, running across whatever the test
/// does to the daemon.
struct Loop {
    probe: RunningProbe,
    stop_file: std::path::PathBuf,
}

impl Loop {
    fn start(cgroup: &TestCgroup, dir: &Path, allowed: &TcpServer, refused: &TcpTarget) -> Loop {
        let stop_file = dir.join("loop-stop");
        let probe = spawn_probe_in(
            cgroup,
            &[
                "connect-pair",
                &allowed.ip.to_string(),
                &allowed.port_str(),
                &refused.ip_str(),
                &refused.port_str(),
                &stop_file.display().to_string(),
            ],
        );
        Loop { probe, stop_file }
    }

    /// Stops the loop and asserts that no attempt got the other verdict.
    fn finish(self, context: &str) -> Value {
        std::fs::write(&self.stop_file, b"").expect("write the stop file");
        let result = self.probe.wait(Duration::from_secs(30));
        let report = result.report.clone();
        let count = |name: &str| report[name].as_u64().unwrap_or(u64::MAX);
        eprintln!("{context}: connect loop {report}");
        assert_eq!(
            count("allowed_refused"),
            0,
            "{context}: an allowed connect was refused: {report}"
        );
        assert_eq!(
            count("refused_ok"),
            0,
            "{context}: a refused connect got through: {report}"
        );
        assert_eq!(count("other_errors"), 0, "{context}: {report}");
        assert!(
            count("allowed_ok") > 0 && count("refused_refused") > 0,
            "{context}: {report}"
        );
        report
    }
}

fn policy(cgroup: &TestCgroup, allowed: &TcpServer, named_port: u16) -> String {
    let mut text = policy_toml(
        "strict",
        &[],
        &[WorkloadSpec::new(PROBE, cgroup)
            .allow(allow("127.0.0.2", &[allowed.port], "tcp"))
            .allow(allow_fqdn(NAME, &[named_port], "tcp"))],
    );
    text.push_str(&DnsSettings::resolvers(&[RESOLVER]).toml());
    text
}

/// The links pinned now (one per attached program of every daemon holding pins).
fn pinned_links(pin_dir: &Path) -> Vec<String> {
    let mut links = Vec::new();
    for version in std::fs::read_dir(pin_dir)
        .expect("list the pin dir")
        .flatten()
    {
        if let Ok(entries) = std::fs::read_dir(version.path().join("links")) {
            links.extend(
                entries
                    .flatten()
                    .map(|entry| format!("{}", entry.path().display())),
            );
        }
    }
    links.sort();
    links
}

#[test]
fn privileged_kill_9_keeps_enforcing_and_the_next_daemon_adopts_without_a_gap() {
    let cgroup = TestCgroup::new();
    let allowed = TcpServer::bind("127.0.0.2");
    let refused = TcpTarget::bind("127.0.0.4");
    let named = TcpTarget::bind("127.0.0.5");
    let unseen = TcpTarget::bind("127.0.0.9");
    let dnsmasq = Dnsmasq::builder(RESOLVER).host(NAME, "127.0.0.5").start();
    let mut daemon = Daemon::start(&policy(&cgroup, &allowed, named.port));
    run_probe_in(
        &cgroup,
        &["resolve-connect", RESOLVER, NAME, &named.port_str()],
    )
    .assert_ok("the name is allowed and its address learned");
    let links_before = pinned_links(daemon.pin_dir());
    assert_eq!(
        links_before.len(),
        ATTACHED_PROGRAMS,
        "one link per program: {links_before:?}"
    );

    let connect_loop = Loop::start(&cgroup, daemon.dir(), &allowed, &refused);
    std::thread::sleep(Duration::from_millis(300));
    daemon.kill9();

    // Nothing runs in userspace now: the pinned programs and maps decide.
    std::thread::sleep(Duration::from_millis(300));
    run_probe_in(&cgroup, &["tcp-connect", "127.0.0.5", &named.port_str()])
        .assert_ok("the learned address stays allowed while egressd is dead");
    run_probe_in(&cgroup, &["tcp-connect", "127.0.0.9", &unseen.port_str()])
        .assert_eperm("refused while egressd is dead");

    daemon.restart();
    let status = daemon.status();
    assert_eq!(status["datapath"]["adopted"], true, "{status}");
    assert_eq!(daemon.workload(PROBE)["mode"], "strict");
    std::thread::sleep(Duration::from_millis(300));
    let report = connect_loop.finish("kill -9 and restart");
    assert!(report["allowed_ok"].as_u64().unwrap_or(0) >= 2, "{report}");

    // The old programs were retired: the new daemon's links alone.
    let links_after = pinned_links(daemon.pin_dir());
    assert_eq!(links_after.len(), ATTACHED_PROGRAMS, "{links_after:?}");
    assert!(
        links_after.iter().all(|link| !links_before.contains(link)),
        "the killed daemon's links are gone: before {links_before:?}, after {links_after:?}"
    );
    // The refusal while no daemon ran was kept in the ring buffer for the next one.
    let destination = format!("127.0.0.9:{}", unseen.port);
    daemon.wait_for_event(
        "the refusal made while egressd was dead",
        EVENT_TIMEOUT,
        |event| event["kind"] == "denied" && event["destination"] == destination.as_str(),
    );
    // The adopted policy keeps working as a policy: the name is still allowed after a
    // fresh resolution, and learned addresses are still managed (status answers).
    run_probe_in(
        &cgroup,
        &["resolve-connect", RESOLVER, NAME, &named.port_str()],
    )
    .assert_ok("the name after adoption");
    drop(dnsmasq);
}

#[test]
fn privileged_pins_of_another_layout_are_replaced_without_a_gap() {
    let cgroup = TestCgroup::new();
    let allowed = TcpServer::bind("127.0.0.2");
    let refused = TcpTarget::bind("127.0.0.4");
    let named = TcpTarget::bind("127.0.0.5");
    let dnsmasq = Dnsmasq::builder(RESOLVER).host(NAME, "127.0.0.5").start();
    let mut daemon = Daemon::start(&policy(&cgroup, &allowed, named.port));
    run_probe_in(
        &cgroup,
        &["resolve-connect", RESOLVER, NAME, &named.port_str()],
    )
    .assert_ok("the name, learned before the upgrade");
    let connect_loop = Loop::start(&cgroup, daemon.dir(), &allowed, &refused);
    std::thread::sleep(Duration::from_millis(300));
    let (status, _) = daemon.stop().expect("the daemon was running");
    assert!(status.success(), "{status}");

    // Make the pins look like an older egressd's: same programs, other layout version.
    let versions: Vec<_> = std::fs::read_dir(daemon.pin_dir())
        .expect("list the pin dir")
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(versions.len(), 1, "{versions:?}");
    let current = &versions[0];
    std::fs::rename(daemon.pin_dir().join(current), daemon.pin_dir().join("v0"))
        .expect("rename the pinned layout folder");
    run_probe_in(&cgroup, &["tcp-connect", "127.0.0.4", &refused.port_str()])
        .assert_eperm("the old pin set still enforces");

    daemon.restart();
    let status = daemon.status();
    assert_eq!(
        status["datapath"]["adopted"], false,
        "maps of another layout are never opened: {status}"
    );
    // The learned address was carried over: the workload's cached address still works
    // without a new lookup.
    run_probe_in(&cgroup, &["tcp-connect", "127.0.0.5", &named.port_str()])
        .assert_ok("an address learned under the old layout, without resolving again");
    std::thread::sleep(Duration::from_millis(300));
    connect_loop.finish("replacing a pin set of another layout");
    drop(dnsmasq);
    let left: Vec<_> = std::fs::read_dir(daemon.pin_dir())
        .expect("list the pin dir")
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        left,
        vec![current.clone()],
        "the old layout's folder is removed"
    );
}
