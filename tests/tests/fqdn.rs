//! FQDN allow rules against the real kernel: a workload resolves a name through a
//! configured resolver and may connect to the answer's addresses at once; other
//! names, other ports, forged or malformed answers grant nothing; addresses expire
//! with their TTL while established connections stay up.
//!
//! Privileged: root, cgroup v2, built binaries (`cargo build --bins`), dnsmasq
//! (`/usr/sbin/dnsmasq`). Each test starts its own cgroup, resolver(s) and egressd;
//! each uses its own resolver address (`127.0.53.N`) and answer addresses.

use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

use egressd_tests::{
    AnswerRecord, DNS_PORT, Daemon, DnsSettings, Dnsmasq, EVENT_TIMEOUT, FakeResolver, ProbeResult,
    ReceivedQuery, TcpServer, TestCgroup, WorkloadSpec, allow_fqdn, answer_bytes, destination,
    policy_toml, run_probe_in, spawn_probe_in, wire,
};
use hickory_proto::rr::RecordType;
use serde_json::{Value, json};

/// The name every test gives the workload under test.
const PROBE: &str = "probe";
/// How long a test waits for the daemon to list or drop a name.
const DNS_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the spoofing and malformed-answer probes listen for answers.
const LISTEN_MS: &str = "300";

fn strict_with_dns(workloads: &[WorkloadSpec], dns: &DnsSettings) -> String {
    let mut text = policy_toml("strict", &[], workloads);
    text.push_str(&dns.toml());
    text
}

fn tcp_rule(pattern: &str, port: u16) -> String {
    allow_fqdn(pattern, &[port], "tcp")
}

fn resolve_connect(cgroup: &TestCgroup, resolver: &str, name: &str, port: u16) -> ProbeResult {
    run_probe_in(
        cgroup,
        &["resolve-connect", resolver, name, &port.to_string()],
    )
}

fn connect(cgroup: &TestCgroup, addr: &str, port: u16) -> ProbeResult {
    run_probe_in(cgroup, &["tcp-connect", addr, &port.to_string()])
}

/// The resolve succeeded and the answer named exactly `addresses`.
#[track_caller]
fn assert_answered(result: &ProbeResult, addresses: &[&str]) {
    assert_eq!(
        result.report["addresses"],
        json!(addresses),
        "the resolver's answer: {result}"
    );
}

/// Resolved fine, but the connect to the answer failed with EPERM.
#[track_caller]
fn assert_connect_eperm(result: &ProbeResult, context: &str) {
    result.assert_eperm(context);
    assert_eq!(
        result.report["step"], "connect",
        "{context}: the lookup itself must work: {result}"
    );
}

/// The names the daemon lists for the workload under test, as `name → [addresses]`.
fn listed(daemon: &Daemon) -> Vec<(String, Vec<String>)> {
    daemon
        .dns_names(PROBE)
        .iter()
        .map(|name| {
            let addresses = name["addresses"]
                .as_array()
                .map(|addresses| {
                    addresses
                        .iter()
                        .filter_map(|a| a["address"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            (
                name["name"].as_str().unwrap_or_default().to_owned(),
                addresses,
            )
        })
        .collect()
}

fn lists_address(daemon: &Daemon, addr: &str) -> bool {
    listed(daemon)
        .iter()
        .any(|(_, addresses)| addresses.iter().any(|a| a == addr))
}

/// Polls `egressctl dns` until `predicate` holds on the workload's names (bounded).
fn wait_for_names(
    daemon: &Daemon,
    what: &str,
    predicate: impl Fn(&[(String, Vec<String>)]) -> bool,
) -> Vec<(String, Vec<String>)> {
    let deadline = Instant::now() + DNS_TIMEOUT;
    loop {
        let names = listed(daemon);
        if predicate(&names) {
            return names;
        }
        assert!(
            Instant::now() < deadline,
            "`egressctl dns` never showed {what} within {DNS_TIMEOUT:?}; last: {}\n{}",
            daemon.dns(),
            daemon.logs()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn privileged_fqdn_exact_and_wildcard_names_are_allowed_on_their_ports() {
    let cgroup = TestCgroup::new();
    let bystander = TestCgroup::new();
    let server = TcpServer::bind("0.0.0.0");
    let other_port = TcpServer::bind("0.0.0.0");
    let dnsmasq = Dnsmasq::builder("127.0.53.11")
        .host("api.example.test", "127.0.61.1")
        .host("img.cdn.test", "127.0.61.2")
        .host("a.b.cdn.test", "127.0.61.3")
        .host("cdn.test", "127.0.61.4")
        .host("other.test", "127.0.61.5")
        .host("upper.example.test", "127.0.61.6")
        .local_ttl(300)
        .start();
    let resolver = dnsmasq.addr_str();
    let port = server.port;
    let _daemon = Daemon::start(&strict_with_dns(
        &[
            WorkloadSpec::new(PROBE, &cgroup)
                .allow(tcp_rule("api.example.test", port))
                .allow(tcp_rule("*.cdn.test", port))
                .allow(tcp_rule("Upper.Example.TEST.", port)),
            WorkloadSpec::new("bystander", &bystander),
        ],
        &DnsSettings::resolvers(&[&resolver]),
    ));

    connect(&cgroup, "127.0.61.1", port)
        .assert_eperm("an address of an allowed name before any lookup");

    let exact = resolve_connect(&cgroup, &resolver, "api.example.test", port);
    exact.assert_ok("the exact name on its port, right after the lookup");
    assert_answered(&exact, &["127.0.61.1"]);
    for (name, addr) in [
        ("img.cdn.test", "127.0.61.2"),
        ("a.b.cdn.test", "127.0.61.3"),
    ] {
        let result = resolve_connect(&cgroup, &resolver, name, port);
        result.assert_ok(&format!("{name}: below the wildcard *.cdn.test"));
        assert_answered(&result, &[addr]);
    }
    let upper = resolve_connect(&cgroup, &resolver, "UPPER.example.Test", port);
    upper.assert_ok("names match case-insensitively, the rule's trailing dot is ignored");
    assert_answered(&upper, &["127.0.61.6"]);

    let apex = resolve_connect(&cgroup, &resolver, "cdn.test", port);
    assert_answered(&apex, &["127.0.61.4"]);
    assert_connect_eperm(&apex, "cdn.test: the apex of *.cdn.test is not below it");
    let other = resolve_connect(&cgroup, &resolver, "other.test", port);
    assert_answered(&other, &["127.0.61.5"]);
    assert_connect_eperm(&other, "a name without a rule");
    let wrong_port = resolve_connect(&cgroup, &resolver, "api.example.test", other_port.port);
    assert_connect_eperm(&wrong_port, "the allowed name on a port outside its rule");

    // The address is allowed for the workload (any of its processes), not for others.
    connect(&cgroup, "127.0.61.1", port).assert_ok("a later connect by another process");
    connect(&bystander, "127.0.61.1", port)
        .assert_eperm("another workload that never resolved the name");

    // DNS to an address that is not a resolver is judged like any destination.
    let stray = run_probe_in(
        &cgroup,
        &["dns-query", "127.0.53.99", "api.example.test", "100"],
    );
    stray.assert_eperm("a DNS query to an address that is not a configured resolver");
}

/// Every connect made right after a lookup succeeds: the kernel allows the answer's
/// address before the socket receives it, so a fast client never races the daemon.
#[test]
fn privileged_fqdn_connect_right_after_the_answer_never_races_10000_lookups() {
    const COUNT: u32 = 10_000;
    let cgroup = TestCgroup::new();
    let server = TcpServer::bind("0.0.0.0");
    let dnsmasq = Dnsmasq::builder("127.0.53.12")
        .hosts((0..COUNT).map(|i| {
            (
                format!("r{i}.race.test"),
                IpAddr::V4(Ipv4Addr::new(
                    127,
                    10,
                    u8::try_from(i / 256).expect("i < 65536"),
                    u8::try_from(i % 256).expect("a byte"),
                )),
            )
        }))
        .local_ttl(300)
        .start();
    let resolver = dnsmasq.addr_str();
    let daemon = Daemon::start(&strict_with_dns(
        &[WorkloadSpec::new(PROBE, &cgroup).allow(tcp_rule("*.race.test", server.port))],
        &DnsSettings::resolvers(&[&resolver]),
    ));

    let started = Instant::now();
    let result = spawn_probe_in(
        &cgroup,
        &[
            "race",
            &resolver,
            &COUNT.to_string(),
            &server.port_str(),
            "300",
        ],
    )
    .wait(Duration::from_secs(330));
    let elapsed = started.elapsed();
    eprintln!(
        "race: {} of {COUNT} lookups, {} connects succeeded, {} EPERM, {} other errors, {} DNS errors in {elapsed:?} (probe: {} ms); server accepted {}",
        result.report["completed"],
        result.report["connected"],
        result.report["eperm"],
        result.report["other_errors"],
        result.report["dns_errors"],
        result.report["elapsed_ms"],
        server.accepted()
    );
    assert_eq!(
        result.report["eperm"],
        0,
        "connects refused right after their lookup: {result}\n{}",
        daemon.logs()
    );
    assert_eq!(result.report["completed"], COUNT, "{result}");
    assert_eq!(
        result.report["connected"], COUNT,
        "every connect succeeds: {result}"
    );
}

/// With a 1 s TTL, `min_ttl = 1` and `grace = 0`, an address stops being allowed for new
/// connections about a second after the answer; a connection made while it was allowed
/// keeps working.
#[test]
fn privileged_fqdn_addresses_expire_but_established_connections_stay() {
    let cgroup = TestCgroup::new();
    let server = TcpServer::bind("0.0.0.0");
    let dnsmasq = Dnsmasq::builder("127.0.53.13")
        .host("ttl.test", "127.0.62.1")
        .local_ttl(1)
        .start();
    let resolver = dnsmasq.addr_str();
    let port = server.port;
    let daemon = Daemon::start(&strict_with_dns(
        &[WorkloadSpec::new(PROBE, &cgroup).allow(tcp_rule("ttl.test", port))],
        &DnsSettings::resolvers(&[&resolver]).expiry(1, 0),
    ));
    let go_file = daemon.dir().join("go");

    let resolved = resolve_connect(&cgroup, &resolver, "ttl.test", port);
    resolved.assert_ok("ttl.test right after its lookup");
    let answered_at = Instant::now();
    let hold = spawn_probe_in(
        &cgroup,
        &[
            "connect-hold",
            "127.0.62.1",
            &port.to_string(),
            go_file.to_str().expect("a UTF-8 temp path"),
        ],
    );

    // New connects fail once the address expired (bounded: 1 s TTL, 8 s at most).
    let deadline = Instant::now() + Duration::from_secs(8);
    let expired_after = loop {
        let result = connect(&cgroup, "127.0.62.1", port);
        if result.is_eperm() {
            break answered_at.elapsed();
        }
        result.assert_ok("a new connect while the address is valid");
        assert!(
            Instant::now() < deadline,
            "127.0.62.1 was still allowed 8 s after an answer with TTL 1 (min_ttl 1, grace 0); dns: {}\n{}",
            daemon.dns(),
            daemon.logs()
        );
        thread::sleep(Duration::from_millis(200));
    };
    eprintln!("ttl.test (TTL 1 s) stopped being allowed {expired_after:?} after its answer");
    assert!(
        !lists_address(&daemon, "127.0.62.1"),
        "`egressctl dns` still lists the expired address: {}",
        daemon.dns()
    );

    std::fs::write(&go_file, b"go").expect("write the go file");
    let held = hold.wait(Duration::from_secs(20));
    held.assert_ok("the connection established before expiry still carries data");

    // A new lookup allows the address again.
    resolve_connect(&cgroup, &resolver, "ttl.test", port).assert_ok("ttl.test after a new lookup");
}

/// The probe queries a fake resolver the test plays; the test learns the socket and id
/// from the query, has `send` forge an answer, and returns what the probe received.
/// A strict workload allowed `api.example.test` on the port of the server, resolving through
/// the fake resolver at `resolver`: what the tests of forged and malformed answers start from.
/// Bound in this order, the daemon stops first and the cgroup goes last.
fn one_name(resolver: &str) -> (TestCgroup, TcpServer, FakeResolver, Daemon) {
    let cgroup = TestCgroup::new();
    let server = TcpServer::bind("0.0.0.0");
    let fake = FakeResolver::bind(resolver);
    let daemon = Daemon::start(&strict_with_dns(
        &[WorkloadSpec::new(PROBE, &cgroup).allow(tcp_rule("api.example.test", server.port))],
        &DnsSettings::resolvers(&[&fake.addr_str()]),
    ));
    (cgroup, server, fake, daemon)
}

/// `fake` answers `query` with one A record, `addr`, for 300 s.
fn answer_address(fake: &FakeResolver, query: &ReceivedQuery, addr: &str) {
    let records = [AnswerRecord::address(&query.name, 300, addr)];
    fake.send(
        &answer_bytes(query.id, &query.name, RecordType::A, &records),
        query.from,
    );
}

fn forged_exchange(
    cgroup: &TestCgroup,
    resolver: &FakeResolver,
    name: &str,
    send: impl FnOnce(&ReceivedQuery),
) -> ProbeResult {
    let probe = spawn_probe_in(
        cgroup,
        &["dns-query", &resolver.addr_str(), name, LISTEN_MS],
    );
    let query = resolver.recv_query(Duration::from_secs(5));
    assert_eq!(query.name, name, "the fake resolver got {query:?}");
    send(&query);
    let result = probe.wait(Duration::from_secs(10));
    assert!(result.ok, "dns-query failed: {result}");
    result
}

#[test]
fn privileged_fqdn_spoofed_and_unsolicited_answers_grant_nothing() {
    let cgroup = TestCgroup::new();
    let server = TcpServer::bind("0.0.0.0");
    let asked = FakeResolver::bind("127.0.53.14");
    let other_resolver = FakeResolver::bind("127.0.53.15");
    let spoofer = UdpSocket::bind(("127.0.0.99", DNS_PORT)).expect("bind 127.0.0.99:53");
    let port = server.port;
    let daemon = Daemon::start(&strict_with_dns(
        &[WorkloadSpec::new(PROBE, &cgroup).allow(tcp_rule("api.example.test", port))],
        &DnsSettings::resolvers(&[&asked.addr_str(), &other_resolver.addr_str()]),
    ));
    let answer = |id: u16, question: &str, addr: &str| {
        answer_bytes(
            id,
            question,
            RecordType::A,
            &[AnswerRecord::address(question, 300, addr)],
        )
    };

    // From port 53 of an address that is not a resolver, with the right id.
    let spoofed = forged_exchange(&cgroup, &asked, "api.example.test", |query| {
        spoofer
            .send_to(
                &answer(query.id, "api.example.test", "127.0.63.1"),
                query.from,
            )
            .expect("send the spoofed answer");
    });
    // From a configured resolver the socket never asked.
    let unasked = forged_exchange(&cgroup, &asked, "api.example.test", |query| {
        other_resolver.send(
            &answer(query.id, "api.example.test", "127.0.63.2"),
            query.from,
        );
    });
    // From the resolver asked, with another id.
    let wrong_id = forged_exchange(&cgroup, &asked, "api.example.test", |query| {
        asked.send(
            &answer(query.id.wrapping_add(1), "api.example.test", "127.0.63.3"),
            query.from,
        );
    });
    // From the resolver asked, with the right id, for a question that was not asked.
    let other_question = forged_exchange(&cgroup, &asked, "other.test", |query| {
        asked.send(
            &answer(query.id, "api.example.test", "127.0.63.4"),
            query.from,
        );
    });
    // The real answer, then a replay of the same id naming another address.
    let genuine = forged_exchange(&cgroup, &asked, "api.example.test", |query| {
        asked.send(
            &answer(query.id, "api.example.test", "127.0.63.5"),
            query.from,
        );
        asked.send(
            &answer(query.id, "api.example.test", "127.0.63.6"),
            query.from,
        );
    });
    eprintln!(
        "what the probe received:\nspoofed {spoofed}\nunasked {unasked}\nwrong id {wrong_id}\nother question {other_question}\ngenuine + replay {genuine}"
    );

    connect(&cgroup, "127.0.63.5", port)
        .assert_ok("the answer of the resolver asked, with the right id and question");
    for (addr, what) in [
        (
            "127.0.63.1",
            "an answer from a non-resolver (127.0.0.99:53)",
        ),
        (
            "127.0.63.2",
            "an answer from a resolver the socket did not ask",
        ),
        ("127.0.63.3", "an answer with another id"),
        ("127.0.63.4", "an answer to a question that was not asked"),
        ("127.0.63.6", "a second answer to a query already answered"),
    ] {
        let result = connect(&cgroup, addr, port);
        assert!(
            result.is_eperm(),
            "{what} granted {addr}: {result}\ndns: {}\n{}",
            daemon.dns(),
            daemon.logs()
        );
    }
    let names = wait_for_names(&daemon, "api.example.test → 127.0.63.5", |names| {
        names.iter().any(|(name, addresses)| {
            name == "api.example.test" && addresses.iter().any(|a| a == "127.0.63.5")
        })
    });
    for (name, addresses) in &names {
        assert_eq!(
            addresses,
            &vec!["127.0.63.5".to_owned()],
            "{name}: only the genuine answer's address is listed: {}",
            daemon.dns()
        );
    }
}

#[test]
fn privileged_fqdn_cname_chain_to_an_allowed_name() {
    let cgroup = TestCgroup::new();
    let server = TcpServer::bind("0.0.0.0");
    let dnsmasq = Dnsmasq::builder("127.0.53.16")
        .host("target.test", "127.0.64.1")
        .cname("alias.test", "target.test")
        .local_ttl(300)
        .start();
    let fake = FakeResolver::bind("127.0.53.17");
    let port = server.port;
    let daemon = Daemon::start(&strict_with_dns(
        &[WorkloadSpec::new(PROBE, &cgroup)
            .allow(tcp_rule("alias.test", port))
            .allow(tcp_rule("chain.test", port))],
        &DnsSettings::resolvers(&[&dnsmasq.addr_str(), &fake.addr_str()]),
    ));

    connect(&cgroup, "127.0.64.1", port).assert_eperm("the target before any lookup");
    let alias = resolve_connect(&cgroup, &dnsmasq.addr_str(), "alias.test", port);
    alias.assert_ok("alias.test → target.test → 127.0.64.1, asked as alias.test");
    assert_answered(&alias, &["127.0.64.1"]);
    wait_for_names(&daemon, "alias.test → 127.0.64.1", |names| {
        names
            .iter()
            .any(|(name, addresses)| name == "alias.test" && *addresses == ["127.0.64.1"])
    });

    // Two hops, plus an A record of an owner the chain never reaches: the kernel may
    // allow it for a moment, the daemon keeps only the chain's address.
    let result = forged_exchange(&cgroup, &fake, "chain.test", |query| {
        let bytes = answer_bytes(
            query.id,
            "chain.test",
            RecordType::A,
            &[
                AnswerRecord::cname("chain.test", 300, "hop.test"),
                AnswerRecord::cname("hop.test", 300, "end.test"),
                AnswerRecord::address("end.test", 300, "127.0.64.2"),
                AnswerRecord::address("unrelated.test", 300, "127.0.64.3"),
            ],
        );
        fake.send(&bytes, query.from);
    });
    assert_eq!(
        result.report["received"][0]["addresses"],
        json!(["127.0.64.2", "127.0.64.3"]),
        "{result}"
    );
    connect(&cgroup, "127.0.64.2", port).assert_ok("the end of a two-hop chain");
    let deadline = Instant::now() + DNS_TIMEOUT;
    loop {
        let off_chain = connect(&cgroup, "127.0.64.3", port);
        if off_chain.is_eperm() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "an A record off the CNAME chain (unrelated.test) stayed allowed for {DNS_TIMEOUT:?}: {off_chain}\ndns: {}\n{}",
            daemon.dns(),
            daemon.logs()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn privileged_fqdn_aaaa_answers() {
    let cgroup = TestCgroup::new();
    let server = TcpServer::bind("::1");
    let dnsmasq = Dnsmasq::builder("127.0.53.18")
        .host_record("v6.test", "::1")
        .local_ttl(300)
        .start();
    let resolver = dnsmasq.addr_str();
    let port = server.port;
    let daemon = Daemon::start(&strict_with_dns(
        &[WorkloadSpec::new(PROBE, &cgroup).allow(tcp_rule("v6.test", port))],
        &DnsSettings::resolvers(&[&resolver]),
    ));

    connect(&cgroup, "::1", port).assert_eperm("::1 before any lookup");
    let result = run_probe_in(
        &cgroup,
        &[
            "resolve-connect",
            &resolver,
            "v6.test",
            &port.to_string(),
            "aaaa",
        ],
    );
    result.assert_ok("v6.test AAAA ::1, right after the lookup");
    assert_answered(&result, &["::1"]);
    wait_for_names(&daemon, "v6.test → ::1", |names| {
        names
            .iter()
            .any(|(name, addresses)| name == "v6.test" && *addresses == ["::1"])
    });
}

#[test]
fn privileged_fqdn_dns_over_tcp() {
    let cgroup = TestCgroup::new();
    let server = TcpServer::bind("0.0.0.0");
    let dnsmasq = Dnsmasq::builder("127.0.53.19")
        .host("tcp.test", "127.0.65.1")
        .local_ttl(300)
        .start();
    let resolver = dnsmasq.addr_str();
    let port = server.port;
    let _daemon = Daemon::start(&strict_with_dns(
        &[WorkloadSpec::new(PROBE, &cgroup).allow(tcp_rule("tcp.test", port))],
        &DnsSettings::resolvers(&[&resolver]),
    ));

    connect(&cgroup, "127.0.65.1", port).assert_eperm("before any lookup");
    let result = run_probe_in(
        &cgroup,
        &[
            "resolve-connect",
            &resolver,
            "tcp.test",
            &port.to_string(),
            "tcp-dns",
        ],
    );
    result.assert_ok("a lookup over TCP, then connect at once");
    assert_answered(&result, &["127.0.65.1"]);
}

/// Messages the kernel must refuse before granting anything, each with the query's id
/// and (where one fits) the allowed question, each naming a distinct address.
fn refused_messages(query: &ReceivedQuery, index: usize) -> (String, Vec<u8>) {
    let id = query.id;
    let qname = query.name.as_str();
    let a = |n: u8| [127, 0, 66, n];
    let mut message;
    let what = match index {
        0 => {
            message = id.to_be_bytes().to_vec();
            message.extend_from_slice(&[0x81, 0x80]);
            // Deterministic garbage.
            let mut x: u32 = 0x2545_f491;
            for _ in 0..300 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                message.push(x.to_le_bytes()[0]);
            }
            "garbage after the id"
        }
        1 => {
            message = id.to_be_bytes().to_vec();
            "only the id"
        }
        2 => {
            message = wire::header(id, wire::RESPONSE, 1, 1);
            "a header promising a question and an answer, and nothing else"
        }
        3 => {
            // The question name is a pointer to itself.
            message = wire::header(id, wire::RESPONSE, 1, 1);
            message.extend_from_slice(&wire::pointer(12));
            message.extend_from_slice(&[0, 1, 0, 1]);
            message.extend_from_slice(&wire::pointer(12));
            message.extend(wire::record_tail(wire::TYPE_A, 300, &a(4)));
            "a compression-pointer loop in the question"
        }
        4 => {
            message = wire::header(id, wire::RESPONSE, 1, 1);
            message.extend(wire::question(qname, wire::TYPE_A));
            message.extend_from_slice(&wire::pointer(12));
            message.extend(wire::record_tail(wire::TYPE_A, 300, &a(5)));
            message.truncate(message.len() - 2);
            "an answer cut inside the address"
        }
        5 => {
            message = wire::header(id, wire::RESPONSE, 1, 1);
            message.extend(wire::question(qname, wire::TYPE_A));
            message.extend_from_slice(&wire::pointer(12));
            let mut tail = wire::record_tail(wire::TYPE_A, 300, &a(6));
            // rdlength 0xffff with four bytes of data.
            tail[8] = 0xff;
            tail[9] = 0xff;
            message.extend(tail);
            "an A record whose length runs past the end"
        }
        6 => {
            // A CNAME loop: the question → x.<question> → the question, no address.
            message = wire::header(id, wire::RESPONSE, 1, 2);
            message.extend(wire::question(qname, wire::TYPE_A));
            let x = message.len() + 2 + 10;
            let mut target = wire::name("x");
            target.extend_from_slice(&wire::pointer(12));
            message.extend_from_slice(&wire::pointer(12));
            message.extend(wire::record_tail(wire::TYPE_CNAME, 300, &target));
            message.extend_from_slice(&wire::pointer(u16::try_from(x).expect("small")));
            message.extend(wire::record_tail(wire::TYPE_CNAME, 300, &wire::pointer(12)));
            "a CNAME loop without addresses"
        }
        7 => {
            // A label of the reserved type 0x40 in a CNAME target, then an A record of it.
            message = wire::header(id, wire::RESPONSE, 1, 1);
            message.extend(wire::question(qname, wire::TYPE_A));
            message.extend_from_slice(&wire::pointer(12));
            message.extend(wire::record_tail(wire::TYPE_CNAME, 300, &[0x41, b'x', 0]));
            "a reserved label type in a CNAME target"
        }
        _ => unreachable!("8 refused messages"),
    };
    (what.to_owned(), message)
}
const REFUSED_MESSAGES: usize = 8;

/// Messages the kernel's fast walk may accept (a complete A record with a compressed
/// owner) but that do not parse as a whole: the daemon must not keep their addresses.
fn unparsable_messages(query: &ReceivedQuery, index: usize) -> (String, Vec<u8>, [u8; 4]) {
    let id = query.id;
    let qname = query.name.as_str();
    let mut message = wire::header(id, wire::RESPONSE, 1, 1);
    message.extend(wire::question(qname, wire::TYPE_A));
    let (what, addr) = match index {
        0 => {
            let owner = u16::try_from(message.len()).expect("small");
            message.extend_from_slice(&wire::pointer(owner));
            message.extend(wire::record_tail(wire::TYPE_A, 300, &[127, 0, 67, 1]));
            ("an answer owner that points to itself", [127, 0, 67, 1])
        }
        1 => {
            message.extend_from_slice(&wire::pointer(0x3fff));
            message.extend(wire::record_tail(wire::TYPE_A, 300, &[127, 0, 67, 2]));
            ("an answer owner pointing past the end", [127, 0, 67, 2])
        }
        2 => {
            // Five answers promised, one present.
            message[7] = 5;
            message.extend_from_slice(&wire::pointer(12));
            message.extend(wire::record_tail(wire::TYPE_A, 300, &[127, 0, 67, 3]));
            (
                "an answer count larger than the records present",
                [127, 0, 67, 3],
            )
        }
        _ => unreachable!("3 unparsable messages"),
    };
    (what.to_owned(), message, addr)
}
const UNPARSABLE_MESSAGES: usize = 3;

#[test]
fn privileged_fqdn_malformed_answers_grant_nothing_and_the_daemon_survives() {
    let (cgroup, server, fake, daemon) = one_name("127.0.53.20");
    let port = server.port;

    let mut sent = Vec::new();
    for index in 0..REFUSED_MESSAGES {
        forged_exchange(&cgroup, &fake, "api.example.test", |query| {
            let (what, bytes) = refused_messages(query, index);
            fake.send(&bytes, query.from);
            sent.push(what);
        });
    }
    let status = daemon.status();
    assert!(status["pid"].as_u64().is_some(), "status after: {status}");
    for n in 4..=6 {
        let addr = format!("127.0.66.{n}");
        let result = connect(&cgroup, &addr, port);
        assert!(
            result.is_eperm(),
            "a malformed answer granted {addr} (sent: {sent:?}): {result}\ndns: {}\n{}",
            daemon.dns(),
            daemon.logs()
        );
    }
    assert!(
        listed(&daemon)
            .iter()
            .all(|(_, addresses)| addresses.is_empty()),
        "malformed answers listed addresses: {}",
        daemon.dns()
    );

    // The daemon still learns from a good answer.
    forged_exchange(&cgroup, &fake, "api.example.test", |query| {
        answer_address(&fake, query, "127.0.66.100");
    });
    connect(&cgroup, "127.0.66.100", port).assert_ok("a good answer after the malformed ones");
    wait_for_names(&daemon, "api.example.test → 127.0.66.100", |names| {
        names
            .iter()
            .any(|(_, addresses)| *addresses == ["127.0.66.100"])
    });
}

/// An answer whose question matches and whose first A record is complete, but which does
/// not parse as a whole, grants nothing: not even until the daemon's next sweep.
#[test]
fn privileged_fqdn_answers_that_do_not_parse_grant_nothing() {
    let (cgroup, server, fake, daemon) = one_name("127.0.53.21");
    let port = server.port;

    let mut failures = Vec::new();
    for index in 0..UNPARSABLE_MESSAGES {
        let mut sent = None;
        forged_exchange(&cgroup, &fake, "api.example.test", |query| {
            let (what, bytes, addr) = unparsable_messages(query, index);
            fake.send(&bytes, query.from);
            sent = Some((what, addr));
        });
        let (what, addr) = sent.expect("the message was sent");
        let addr = Ipv4Addr::from(addr).to_string();
        let result = connect(&cgroup, &addr, port);
        if result.is_eperm() {
            continue;
        }
        // How long it stays allowed (bounded), for the report.
        let started = Instant::now();
        let mut refused_after = None;
        while started.elapsed() < Duration::from_secs(15) {
            thread::sleep(Duration::from_millis(250));
            if connect(&cgroup, &addr, port).is_eperm() {
                refused_after = Some(started.elapsed());
                break;
            }
        }
        failures.push(format!(
            "{what}: {addr} was allowed right after the answer ({result}); refused again after {refused_after:?} (None: still allowed after 15 s)"
        ));
    }
    let status = daemon.status();
    assert!(status["pid"].as_u64().is_some(), "status after: {status}");
    assert!(
        failures.is_empty(),
        "answers that do not parse granted addresses:\n{}\ndns: {}\n{}",
        failures.join("\n"),
        daemon.dns(),
        daemon.logs()
    );
}

/// An answer to `query` whose A record (`addr`) starts past the 2 KiB the daemon gets of
/// each answer: a TXT record of nine 250-byte strings comes first.
fn long_answer(query: &ReceivedQuery, addr: &str) -> Vec<u8> {
    let mut message = wire::header(query.id, wire::RESPONSE, 1, 2);
    message.extend(wire::question(&query.name, wire::TYPE_A));
    let text: Vec<u8> = (0..9)
        .flat_map(|_| std::iter::once(250u8).chain([b'x'; 250]))
        .collect();
    message.extend_from_slice(&wire::pointer(12));
    message.extend(wire::record_tail(wire::TYPE_TXT, 300, &text));
    assert!(
        message.len() > 2048,
        "the A record starts at {}",
        message.len()
    );
    message.extend_from_slice(&wire::pointer(12));
    message.extend(wire::record_tail(
        wire::TYPE_A,
        300,
        &addr.parse::<Ipv4Addr>().expect("ip").octets(),
    ));
    message
}

/// The kernel's count of addresses it allowed straight from answers.
fn kernel_inserts(daemon: &Daemon) -> u64 {
    let report = daemon.dns();
    report["stats"]["kernel_inserts"]
        .as_u64()
        .unwrap_or_else(|| panic!("`dns --json` has no stats.kernel_inserts: {report}"))
}

/// The workload asks `name`; `fake` answers with [`long_answer`] for `addr`, which the
/// kernel must have allowed (else the test that sends it proves nothing).
fn send_long_answer(
    daemon: &Daemon,
    cgroup: &TestCgroup,
    fake: &FakeResolver,
    name: &str,
    addr: &str,
) {
    let before = kernel_inserts(daemon);
    forged_exchange(cgroup, fake, name, |query| {
        fake.send(&long_answer(query, addr), query.from);
    });
    let after = kernel_inserts(daemon);
    assert!(
        after > before,
        "the kernel allowed nothing from the long answer for {name} (kernel_inserts {before} → {after})\n{}",
        daemon.logs()
    );
}

/// Connects to `addr:port` until refused (bounded): what the daemon must take back.
#[track_caller]
fn assert_refused_within(daemon: &Daemon, cgroup: &TestCgroup, addr: &str, port: u16, what: &str) {
    const TAKE_BACK_TIMEOUT: Duration = Duration::from_secs(10);
    let started = Instant::now();
    loop {
        let result = connect(cgroup, addr, port);
        if result.is_eperm() {
            return;
        }
        assert!(
            started.elapsed() < TAKE_BACK_TIMEOUT,
            "{what}: {addr}:{port} still allowed after {TAKE_BACK_TIMEOUT:?}: {result}\ndns: {}\n{}",
            daemon.dns(),
            daemon.logs()
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// The daemon gets the first 2 KiB of an answer; the kernel walks all of it. An address past
/// the daemon's copy is allowed by the kernel for a moment, then taken back by the daemon's
/// check of the addresses it never adopted: a cut answer brings that check forward (it
/// otherwise runs every 30 s).
#[test]
fn privileged_fqdn_an_address_past_the_daemons_copy_of_a_long_answer_is_taken_back() {
    const ADDR: &str = "127.0.70.1";
    let (cgroup, server, fake, daemon) = one_name("127.0.53.24");
    let port = server.port;
    send_long_answer(&daemon, &cgroup, &fake, "api.example.test", ADDR);
    assert_refused_within(
        &daemon,
        &cgroup,
        ADDR,
        port,
        "an address past the daemon's copy of the answer",
    );
    assert!(
        !lists_address(&daemon, ADDR),
        "the daemon lists {ADDR}: {}",
        daemon.dns()
    );
}

/// A long answer for one allowed name can make the kernel add that name's ports to the entry
/// of an address the daemon holds for another name; the daemon, which cannot read the answer
/// whole, writes the workload's held addresses again at its next tick (within half a second).
#[test]
fn privileged_fqdn_a_long_answer_does_not_add_its_ports_to_an_address_another_name_holds() {
    const ADDR: &str = "127.0.70.2";
    let cgroup = TestCgroup::new();
    let api_server = TcpServer::bind("0.0.0.0");
    let big_server = TcpServer::bind("0.0.0.0");
    let fake = FakeResolver::bind("127.0.53.25");
    let (api_port, big_port) = (api_server.port, big_server.port);
    let daemon = Daemon::start(&strict_with_dns(
        &[WorkloadSpec::new(PROBE, &cgroup)
            .allow(tcp_rule("api.example.test", api_port))
            .allow(tcp_rule("big.example.test", big_port))],
        &DnsSettings::resolvers(&[&fake.addr_str()]),
    ));
    forged_exchange(&cgroup, &fake, "api.example.test", |query| {
        answer_address(&fake, query, ADDR);
    });
    wait_for_names(&daemon, &format!("api.example.test → {ADDR}"), |names| {
        names.iter().any(|(_, addresses)| *addresses == [ADDR])
    });
    connect(&cgroup, ADDR, api_port).assert_ok("api.example.test's address on its port");
    connect(&cgroup, ADDR, big_port).assert_eperm("api.example.test's address on another port");

    send_long_answer(&daemon, &cgroup, &fake, "big.example.test", ADDR);
    assert_refused_within(
        &daemon,
        &cgroup,
        ADDR,
        big_port,
        "big.example.test's port on api.example.test's address",
    );
    connect(&cgroup, ADDR, api_port).assert_ok("api.example.test's address keeps its port");
}

#[test]
fn privileged_fqdn_egressctl_dns_lists_names_addresses_and_ttls() {
    let cgroup = TestCgroup::new();
    let server = TcpServer::bind("0.0.0.0");
    let dnsmasq = Dnsmasq::builder("127.0.53.22")
        .host("api.example.test", "127.0.68.1")
        .host("img.cdn.test", "127.0.68.2")
        .local_ttl(120)
        .start();
    let resolver = dnsmasq.addr_str();
    let port = server.port;
    let daemon = Daemon::start(&strict_with_dns(
        &[WorkloadSpec::new(PROBE, &cgroup)
            .allow(tcp_rule("api.example.test", port))
            .allow(tcp_rule("*.cdn.test", port))],
        &DnsSettings::resolvers(&[&resolver]),
    ));

    resolve_connect(&cgroup, &resolver, "api.example.test", port).assert_ok("api.example.test");
    resolve_connect(&cgroup, &resolver, "api.example.test", port)
        .assert_ok("api.example.test again");
    resolve_connect(&cgroup, &resolver, "img.cdn.test", port).assert_ok("img.cdn.test");
    wait_for_names(&daemon, "both names", |names| names.len() >= 2);

    let report = daemon.dns();
    let find = |name: &str| -> Value {
        report["names"]
            .as_array()
            .and_then(|names| {
                names
                    .iter()
                    .find(|n| n["name"] == name && n["workload"] == PROBE)
            })
            .cloned()
            .unwrap_or_else(|| panic!("{name} is not listed: {report}"))
    };
    for (name, pattern, addr, min_hits) in [
        ("api.example.test", "api.example.test", "127.0.68.1", 2),
        ("img.cdn.test", "*.cdn.test", "127.0.68.2", 1),
    ] {
        let entry = find(name);
        assert_eq!(entry["pattern"], pattern, "{entry}");
        assert!(
            entry["hits"].as_u64().is_some_and(|hits| hits >= min_hits),
            "{name}: at least {min_hits} answers seen: {entry}"
        );
        let addresses = entry["addresses"].as_array().cloned().unwrap_or_default();
        assert_eq!(addresses.len(), 1, "{entry}");
        assert_eq!(addresses[0]["address"], addr, "{entry}");
        // TTL 120 (above min_ttl 60) plus the default grace of 10 s.
        let left = addresses[0]["expires_in_secs"].as_u64().unwrap_or(0);
        assert!(
            (1..=130).contains(&left),
            "{name}: remaining TTL {left} s, expected in 1..=130: {entry}"
        );
    }

    let only = daemon.ctl_ok(&["dns", "--workload", PROBE, "--json"]);
    let only: Value = serde_json::from_str(&only).expect("dns --workload --json is JSON");
    assert_eq!(only["names"].as_array().map(Vec::len), Some(2), "{only}");
    let text = daemon.ctl_ok(&["dns"]);
    assert!(
        text.contains("api.example.test") && text.contains("127.0.68.1"),
        "the text form lists the name and its address:\n{text}"
    );
}

#[test]
fn privileged_fqdn_denied_connect_event_names_the_answer() {
    let cgroup = TestCgroup::new();
    let server = TcpServer::bind("0.0.0.0");
    let dnsmasq = Dnsmasq::builder("127.0.53.23")
        .host("api.example.test", "127.0.69.1")
        .host("blocked.test", "127.0.69.2")
        .local_ttl(300)
        .start();
    let resolver = dnsmasq.addr_str();
    let port = server.port;
    let daemon = Daemon::start(&strict_with_dns(
        &[WorkloadSpec::new(PROBE, &cgroup).allow(tcp_rule("api.example.test", port))],
        &DnsSettings::resolvers(&[&resolver]),
    ));

    let blocked = resolve_connect(&cgroup, &resolver, "blocked.test", port);
    assert_connect_eperm(&blocked, "a name without a rule");
    let target = destination("127.0.69.2".parse().expect("ip"), port);
    let event = daemon.wait_for_event("denied connect to 127.0.69.2", EVENT_TIMEOUT, |event| {
        event["kind"] == "denied" && event["workload"] == PROBE && event["destination"] == target
    });
    assert_eq!(
        event["dns_name"], "blocked.test",
        "the event names what the answer called the address: {event}"
    );

    // An address no answer named carries no name.
    connect(&cgroup, "127.0.69.3", port).assert_eperm("an address nobody resolved");
    let plain = destination("127.0.69.3".parse().expect("ip"), port);
    let event = daemon.wait_for_event("denied connect to 127.0.69.3", EVENT_TIMEOUT, |event| {
        event["kind"] == "denied" && event["destination"] == plain
    });
    assert!(
        event.get("dns_name").is_none_or(Value::is_null),
        "no answer named 127.0.69.3: {event}"
    );
}
