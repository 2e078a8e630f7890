//! Learning and audit modes, and switching modes with `egressctl mode` while
//! the daemon runs.
//!
//! Privileged: root, cgroup v2, built binaries (`cargo build --bins`).

use std::time::Duration;

use egressd_tests::{
    Daemon, EVENT_TIMEOUT, TcpTarget, TestCgroup, UdpTarget, WorkloadSpec, allow, policy_toml,
    run_probe_in,
};
use serde_json::Value;

const PROBE: &str = "probe";
/// How long a mode change may take to show in `status`.
const MODE_TIMEOUT: Duration = Duration::from_secs(5);

fn is_event(event: &Value, kind: &str, destination: &str) -> bool {
    event["kind"] == kind && event["workload"] == PROBE && event["destination"] == destination
}

#[test]
fn privileged_audit_allows_everything_and_reports_would_deny() {
    let cgroup = TestCgroup::new();
    let allowed = TcpTarget::bind("127.0.0.2");
    let refused = TcpTarget::bind("127.0.0.4");
    let refused_udp = UdpTarget::bind("127.0.0.4");
    let daemon = Daemon::start(&policy_toml(
        "audit",
        &[],
        &[WorkloadSpec::new(PROBE, &cgroup).allow(allow("127.0.0.2", &[allowed.port], "tcp"))],
    ));
    assert_eq!(daemon.workload(PROBE)["mode"], "audit");

    run_probe_in(&cgroup, &["tcp-connect", "127.0.0.2", &allowed.port_str()])
        .assert_ok("audit: the allowed destination");
    let tcp = run_probe_in(&cgroup, &["tcp-connect", "127.0.0.4", &refused.port_str()]);
    tcp.assert_ok("audit: a destination strict mode would refuse");
    run_probe_in(
        &cgroup,
        &["udp-sendto", "127.0.0.4", &refused_udp.port_str()],
    )
    .assert_ok("audit: udp that strict mode would refuse");
    run_probe_in(&cgroup, &["raw-create"])
        .assert_ok("audit: a raw socket strict mode would refuse");

    let event = daemon.wait_for_event("would_deny tcp", EVENT_TIMEOUT, |event| {
        is_event(event, "would_deny", &refused.destination())
    });
    assert_eq!(event["verdict"], "would_deny", "{event}");
    assert_eq!(event["mode"], "audit", "{event}");
    assert_eq!(event["protocol"], "tcp", "{event}");
    assert_eq!(event["hook"], "connect4", "{event}");
    assert_eq!(event["pid"], tcp.pid, "{event}");
    daemon.wait_for_event("would_deny udp", EVENT_TIMEOUT, |event| {
        is_event(event, "would_deny", &refused_udp.destination()) && event["protocol"] == "udp"
    });
    daemon.wait_for_event("would_deny raw socket", EVENT_TIMEOUT, |event| {
        event["kind"] == "would_deny"
            && event["workload"] == PROBE
            && event["hook"] == "sock_create"
    });
    let events = daemon.events(10_000);
    assert!(
        !events.iter().any(|event| event["kind"] == "denied"),
        "audit mode denied something: {events:?}"
    );
}

#[test]
fn privileged_learning_allows_and_records_new_destinations() {
    let cgroup = TestCgroup::new();
    let first = TcpTarget::bind("127.0.0.4");
    let second = TcpTarget::bind("::1");
    let udp = UdpTarget::bind("127.0.0.5");
    let daemon = Daemon::start(&policy_toml(
        "learning",
        &[],
        &[WorkloadSpec::new(PROBE, &cgroup)],
    ));
    assert_eq!(daemon.workload(PROBE)["mode"], "learning");

    run_probe_in(&cgroup, &["tcp-connect", "127.0.0.4", &first.port_str()])
        .assert_ok("learning: tcp v4");
    run_probe_in(&cgroup, &["tcp-connect", "::1", &second.port_str()])
        .assert_ok("learning: tcp v6");
    run_probe_in(&cgroup, &["udp-sendto", "127.0.0.5", &udp.port_str()]).assert_ok("learning: udp");

    for (destination, protocol) in [
        (first.destination(), "tcp"),
        (second.destination(), "tcp"),
        (udp.destination(), "udp"),
    ] {
        let event = daemon.wait_for_event(
            &format!("new_destination {destination}"),
            EVENT_TIMEOUT,
            |event| is_event(event, "new_destination", &destination),
        );
        assert_eq!(event["protocol"], protocol, "{event}");
        assert_eq!(event["mode"], "learning", "{event}");
    }
    let events = daemon.events(10_000);
    assert!(
        !events
            .iter()
            .any(|event| event["kind"] == "denied" || event["kind"] == "would_deny"),
        "learning mode denied something: {events:?}"
    );
}

#[test]
fn privileged_mode_command_switches_strict_and_audit_without_restart() {
    let cgroup = TestCgroup::new();
    let refused = TcpTarget::bind("127.0.0.4");
    let daemon = Daemon::start(&policy_toml(
        "learning",
        &[],
        &[WorkloadSpec::new(PROBE, &cgroup).mode("strict")],
    ));
    let pid = daemon.status()["pid"].clone();
    let workload = daemon.workload(PROBE);
    assert_eq!(workload["mode"], "strict", "{workload}");
    assert_eq!(workload["mode_source"], "file", "{workload}");
    let connect = || run_probe_in(&cgroup, &["tcp-connect", "127.0.0.4", &refused.port_str()]);
    connect().assert_eperm("strict from the file");

    daemon.ctl_ok(&["mode", "audit", "--workload", PROBE]);
    wait_for_mode(&daemon, "audit", "command");
    connect().assert_ok("after `egressctl mode audit`");
    daemon.wait_for_event(
        "would_deny after switching to audit",
        EVENT_TIMEOUT,
        |event| is_event(event, "would_deny", &refused.destination()),
    );

    daemon.ctl_ok(&["mode", "strict", "--workload", PROBE]);
    wait_for_mode(&daemon, "strict", "command");
    connect().assert_eperm("after `egressctl mode strict`");

    daemon.ctl_ok(&["mode", "learning", "--workload", PROBE]);
    wait_for_mode(&daemon, "learning", "command");
    connect().assert_ok("after `egressctl mode learning`");

    daemon.ctl_ok(&["mode", "file", "--workload", PROBE]);
    wait_for_mode(&daemon, "strict", "file");
    connect().assert_eperm("after `egressctl mode file` (the file says strict)");

    assert_eq!(daemon.status()["pid"], pid, "the daemon was not restarted");
    let unknown = daemon.ctl(&["mode", "audit", "--workload", "no-such-workload"]);
    assert!(
        !unknown.status.success(),
        "`mode --workload no-such-workload` must fail"
    );
}

fn wait_for_mode(daemon: &Daemon, mode: &str, source: &str) {
    daemon.wait_for_status(
        &format!("workload {PROBE} in mode {mode} from {source}"),
        MODE_TIMEOUT,
        |status| {
            status["workloads"].as_array().is_some_and(|workloads| {
                workloads
                    .iter()
                    .any(|w| w["name"] == PROBE && w["mode"] == mode && w["mode_source"] == source)
            })
        },
    );
}

#[test]
fn privileged_default_mode_command_applies_to_workloads_without_a_mode() {
    let cgroup = TestCgroup::new();
    let refused = TcpTarget::bind("127.0.0.4");
    let daemon = Daemon::start(&policy_toml(
        "strict",
        &[],
        &[WorkloadSpec::new(PROBE, &cgroup)],
    ));
    let status = daemon.status();
    assert_eq!(status["default_mode"]["mode"], "strict", "{status}");
    assert_eq!(status["default_mode"]["source"], "file", "{status}");
    let connect = || run_probe_in(&cgroup, &["tcp-connect", "127.0.0.4", &refused.port_str()]);
    connect().assert_eperm("strict from the file's top-level mode");

    daemon.ctl_ok(&["mode", "audit"]);
    let status = daemon.wait_for_status("default mode audit from command", MODE_TIMEOUT, |s| {
        s["default_mode"]["mode"] == "audit" && s["default_mode"]["source"] == "command"
    });
    let workload = status["workloads"]
        .as_array()
        .and_then(|workloads| workloads.iter().find(|w| w["name"] == PROBE))
        .cloned()
        .unwrap_or_default();
    assert_eq!(workload["mode"], "audit", "{status}");
    connect().assert_ok("the default mode is now audit");

    daemon.ctl_ok(&["mode", "file"]);
    daemon.wait_for_status("default mode back to the file", MODE_TIMEOUT, |s| {
        s["default_mode"]["mode"] == "strict" && s["default_mode"]["source"] == "file"
    });
    connect().assert_eperm("the default mode is strict again");
}
