//! The Prometheus endpoint: counters move with traffic; and a connected UDP socket opened
//! before a switch to strict is judged by the new mode on its next plain send().
//!
//! Privileged: root, cgroup v2, built binaries (`cargo build --bins`).

use std::time::{Duration, Instant};

use egressd_tests::metrics::{self, free_port};
use egressd_tests::{
    Daemon, TcpTarget, TestCgroup, UdpTarget, WorkloadSpec, allow, policy_toml, run_probe_in,
    spawn_probe_in,
};

const PROBE: &str = "probe";

fn scrape(port: u16) -> String {
    let response = metrics::scrape(port);
    assert!(
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
        "{response}"
    );
    response
}

/// The value of the sample line that starts with `series`, if any.
fn sample(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

fn wait_for_sample(port: u16, series: &str, at_least: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = scrape(port);
        if sample(&text, series).is_some_and(|v| v >= at_least) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{series} never reached {at_least}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn privileged_metrics_count_decisions_per_workload() {
    let cgroup = TestCgroup::new();
    let allowed = TcpTarget::bind("127.0.0.2");
    let refused = TcpTarget::bind("127.0.0.4");
    let port = free_port();
    let policy = format!(
        "{}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n",
        policy_toml(
            "strict",
            &[],
            &[WorkloadSpec::new(PROBE, &cgroup).allow(allow("127.0.0.2", &[allowed.port], "tcp"))],
        )
    );
    let _daemon = Daemon::start(&policy);
    let before = scrape(port);
    assert_eq!(
        sample(
            &before,
            r#"egressd_workload_mode{workload="probe",mode="strict"}"#
        ),
        Some(1),
        "{before}"
    );
    assert!(before.contains("egressd_policy_info{sha256="), "{before}");
    assert!(
        before.contains(r#"egressd_map_capacity{map="allow"}"#),
        "{before}"
    );

    run_probe_in(&cgroup, &["tcp-connect", "127.0.0.2", &allowed.port_str()]).assert_ok("allowed");
    run_probe_in(&cgroup, &["tcp-connect", "127.0.0.4", &refused.port_str()])
        .assert_eperm("refused");
    run_probe_in(&cgroup, &["tcp-connect", "127.0.0.4", &refused.port_str()])
        .assert_eperm("refused");

    let text = wait_for_sample(
        port,
        r#"egressd_decisions_total{workload="probe",protocol="tcp",verdict="deny"}"#,
        2,
    );
    assert!(
        sample(
            &text,
            r#"egressd_decisions_total{workload="probe",protocol="tcp",verdict="allow"}"#
        )
        .is_some_and(|v| v >= 1),
        "{text}"
    );
    assert!(
        sample(&text, "egressd_events_total").is_some_and(|v| v >= 3),
        "{text}"
    );
    assert_eq!(
        sample(&text, "egressd_ring_buffer_drops_total"),
        Some(0),
        "{text}"
    );
}

#[test]
fn privileged_connected_udp_socket_is_rejudged_after_a_switch_to_strict() {
    let cgroup = TestCgroup::new();
    let target = UdpTarget::bind("127.0.0.4");
    let daemon = Daemon::start(&policy_toml(
        "audit",
        &[],
        &[WorkloadSpec::new(PROBE, &cgroup)],
    ));
    let go = tempfile::tempdir().expect("tempdir");
    let go_file = go.path().join("go");
    let go_arg = go_file.to_str().expect("utf-8 temp path");
    let probe = spawn_probe_in(
        &cgroup,
        &["udp-resend-after", "127.0.0.4", &target.port_str(), go_arg],
    );
    // The first send happens in audit mode; then the workload goes strict.
    daemon.wait_for_event("would_deny udp", Duration::from_secs(5), |event| {
        event["kind"] == "would_deny" && event["destination"] == target.destination()
    });
    daemon.ctl_ok(&["mode", "strict", "--workload", PROBE]);
    std::fs::write(&go_file, b"go").expect("signal the probe");
    probe
        .wait(Duration::from_secs(15))
        .assert_eperm("plain send() on a socket connected before the switch to strict");
}
