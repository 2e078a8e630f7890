//! Limits are visible, and never fail open by accident: a policy that does not fit in the
//! kernel's maps is refused with the map, its capacity and the count, and the policy in
//! force stays; learned addresses that do not fit are refused under `[limits] on_full =
//! "deny"` and let through as audit under `"allow"`; cgroups that do not fit are reported;
//! deny entries, FQDN names and workload ids that do not fit refuse the policy; a full flow
//! table is reported and loses no destination; a deny flood is rate limited in the event
//! stream with every refusal still counted.
//!
//! The maps are made small with egressd's `--test-map-capacity MAP=N` so that filling
//! them takes a handful of entries; the kernel, its maps and its refusals are real.
//!
//! Privileged: root, cgroup v2, built binaries (`cargo build --bins`), dnsmasq.

use std::thread;
use std::time::{Duration, Instant};

use egressd_tests::metrics::{free_port, scrape};
use egressd_tests::{
    Daemon, DnsSettings, Dnsmasq, StopFile, TcpServer, TestCgroup, WorkloadSpec, allow, allow_fqdn,
    connect_counts, policy_toml, run_probe_in, spawn_connect_loop,
};
use serde_json::Value;

const PROBE: &str = "probe";
/// How long a test waits for the daemon to notice something (a rescan, an answer, expiry).
const NOTICE_TIMEOUT: Duration = Duration::from_secs(10);

fn connect(cgroup: &TestCgroup, addr: &str, port: u16) -> egressd_tests::ProbeResult {
    run_probe_in(cgroup, &["tcp-connect", addr, &port.to_string()])
}

fn with_metrics(policy: String, port: u16) -> String {
    format!("{policy}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n")
}

/// The `limits.overflows` entry of `map` for the workload under test, if any.
fn overflow(status: &Value, map: &str) -> Option<Value> {
    status["limits"]["overflows"]
        .as_array()?
        .iter()
        .find(|o| o["map"] == map && o["workload"] == PROBE)
        .cloned()
}

#[track_caller]
fn reload_refused(daemon: &Daemon, expected: &[&str]) -> String {
    let output = daemon.reload();
    let message = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !output.status.success(),
        "the reload should be refused: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    for needle in expected {
        assert!(
            message.contains(needle),
            "the refusal should say {needle:?}: {message}"
        );
    }
    message
}

#[test]
fn privileged_a_policy_that_does_not_fit_is_refused_and_the_one_in_force_stays() {
    let cgroup = TestCgroup::new();
    let server = TcpServer::bind("127.0.0.2");
    let port = server.port;
    let rules = |count: u8, base: u8| -> WorkloadSpec {
        let mut spec = WorkloadSpec::new(PROBE, &cgroup).allow(allow("127.0.0.2", &[port], "tcp"));
        for i in 0..count {
            spec = spec.allow(allow(&format!("127.0.{base}.{i}"), &[], "tcp"));
        }
        spec
    };
    let daemon = Daemon::start_with_args(
        &policy_toml("strict", &[], &[rules(7, 1)]),
        &["--test-map-capacity", "allow=16"],
    );
    let before = daemon.status();
    let allow_map = before["datapath"]["maps"]
        .as_array()
        .and_then(|maps| maps.iter().find(|m| m["map"] == "allow"))
        .cloned()
        .expect("the allow map in status");
    assert_eq!(allow_map["capacity"], 16, "{allow_map}");
    assert_eq!(allow_map["entries"], 8, "{allow_map}");
    connect(&cgroup, "127.0.0.2", port).assert_ok("allowed by the policy in force");
    connect(&cgroup, "127.0.0.3", port).assert_eperm("refused by the policy in force");

    // 20 entries: the policy alone does not fit.
    daemon.rewrite_policy(&policy_toml("strict", &[], &[rules(19, 2)]));
    reload_refused(
        &daemon,
        &[
            "the policy needs 20 entries in the kernel's allow map, which holds 16",
            "workload \"probe\" needs 20 of them",
            "the previous policy stays in force",
        ],
    );
    let status = daemon.status();
    assert_eq!(status["policy"]["sha256"], before["policy"]["sha256"]);
    assert!(
        status["policy"]["last_error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("the kernel's allow map, which holds 16")),
        "status shows the last error: {status}"
    );
    let human = daemon.ctl_ok(&["status"]);
    assert!(human.contains("LAST RELOAD FAILED"), "{human}");
    connect(&cgroup, "127.0.0.2", port).assert_ok("still allowed: the old policy stays");
    connect(&cgroup, "127.0.0.3", port).assert_eperm("still refused: the old policy stays");

    // 12 entries, 11 of them new: each fits alone, not both while switching.
    daemon.rewrite_policy(&policy_toml("strict", &[], &[rules(11, 3)]));
    reload_refused(
        &daemon,
        &[
            "switching to the new policy needs 19 entries in the kernel's allow map at once",
            "reload in two steps",
        ],
    );
    connect(&cgroup, "127.0.0.2", port).assert_ok("still allowed");

    // 12 entries that keep the 8 in force: fits while switching.
    let mut growing = rules(7, 1);
    for i in 0..4 {
        growing = growing.allow(allow(&format!("127.0.4.{i}"), &[], "tcp"));
    }
    daemon.rewrite_policy(&policy_toml("strict", &[], &[growing]));
    let output = daemon.reload();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let status = daemon.status();
    assert!(status["policy"]["last_error"].is_null(), "{status}");
    connect(&cgroup, "127.0.0.2", port).assert_ok("allowed by the new policy");
}

#[test]
fn privileged_cgroups_that_do_not_fit_are_reported_and_picked_up_once_there_is_room() {
    let parent = TestCgroup::new();
    let children: Vec<TestCgroup> = (1..=2).map(|i| parent.child(&format!("c{i}"))).collect();
    let server = TcpServer::bind("127.0.0.2");
    let port = server.port;
    let mut pods = WorkloadSpec::new(PROBE, &parent);
    pods.cgroup = format!("{}/*", parent.relative_path());
    let metrics = free_port();
    let policy = with_metrics(policy_toml("strict", &[], &[pods]), metrics);
    let daemon = Daemon::start_with_args(&policy, &["--test-map-capacity", "workload_cgroups=3"]);
    connect(&children[0], "127.0.0.2", port).assert_eperm("c1 is governed");

    // Three more cgroups appear; the table has room for one of them.
    let late: Vec<TestCgroup> = (3..=5).map(|i| parent.child(&format!("c{i}"))).collect();
    let status = daemon.wait_for_status("cgroups left out", NOTICE_TIMEOUT, |status| {
        overflow(status, "workload_cgroups").is_some()
    });
    let left_out = overflow(&status, "workload_cgroups").expect("an overflow");
    assert_eq!(left_out["entries"], 2, "{left_out}");
    assert_eq!(left_out["capacity"], 3, "{left_out}");
    assert!(
        left_out["effect"]
            .as_str()
            .is_some_and(|e| e.contains("NOT governed")),
        "{left_out}"
    );
    let examples: Vec<&str> = left_out["examples"]
        .as_array()
        .map(|e| e.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    // The oldest cgroups (lowest ids) keep their place.
    assert_eq!(
        examples,
        [late[1].relative_path(), late[2].relative_path()],
        "{left_out}"
    );
    assert_eq!(status["limits"]["cgroup_store_failures"], 2, "{status}");
    connect(&late[0], "127.0.0.2", port).assert_eperm("c3 found room: governed");
    // What the report says: a left-out cgroup counts as in no workload (unmatched = allow).
    connect(&late[2], "127.0.0.2", port)
        .assert_ok("c5 is left out: not governed, as status and the logs say");
    let human = daemon.ctl_ok(&["status"]);
    assert!(
        human.contains("!! MAP FULL:  workload_cgroups (3 entries): 2 cgroups of workload probe"),
        "{human}"
    );
    let text = scrape(metrics);
    assert!(
        text.contains("egressd_map_overflow{map=\"workload_cgroups\",workload=\"probe\"} 2"),
        "{text}"
    );
    assert!(
        daemon
            .logs()
            .contains("the kernel's workload_cgroups map is full (3 entries): 2 cgroups"),
        "logged"
    );

    // A reload while they do not fit is refused, naming the map.
    daemon.rewrite_policy(&format!("{policy}\n# touched\n"));
    reload_refused(
        &daemon,
        &[
            "the policy needs 5 entries in the kernel's workload_cgroups map, which holds 3",
            "workload \"probe\" matches 5 of them",
        ],
    );

    // Two go away: the one left out finds room.
    let mut late = late;
    drop(late.remove(0));
    drop(late.remove(0));
    let status = daemon.wait_for_status("no cgroup left out", NOTICE_TIMEOUT, |status| {
        overflow(status, "workload_cgroups").is_none()
    });
    assert_eq!(status["limits"]["overflows"], serde_json::json!([]));
    connect(&late[0], "127.0.0.2", port).assert_eperm("c5 is governed now");
    assert!(
        daemon
            .logs()
            .contains("every cgroup of workload probe is in the kernel's cgroup table again")
    );
}

/// How long learned addresses stay allowed (`dns.min_ttl`, no grace): long enough to try
/// each address, short enough to see the overflow end.
const EXPIRY_SECS: u64 = 5;

/// dnsmasq answering `many.limits.test` with 8 addresses, and a policy allowing the name.
fn many_addresses(resolver: &str) -> (Dnsmasq, Vec<String>) {
    let addresses: Vec<String> = (1..=8).map(|i| format!("127.0.70.{i}")).collect();
    let mut builder = Dnsmasq::builder(resolver).local_ttl(0);
    for address in &addresses {
        builder = builder.host("many.limits.test", address);
    }
    (builder.start(), addresses)
}

fn fqdn_policy(cgroup: &TestCgroup, resolver: &str, port: u16, on_full: &str) -> String {
    let mut text = policy_toml(
        "strict",
        &[],
        &[WorkloadSpec::new(PROBE, cgroup).allow(allow_fqdn("many.limits.test", &[port], "tcp"))],
    );
    text.push_str(
        &DnsSettings::resolvers(&[resolver])
            .expiry(EXPIRY_SECS, 0)
            .toml(),
    );
    text.push_str(&format!("\n[limits]\non_full = {on_full:?}\n"));
    text
}

fn lookup(cgroup: &TestCgroup, resolver: &str) {
    let result = run_probe_in(cgroup, &["dns-query", resolver, "many.limits.test", "500"]);
    assert!(result.ok, "dns-query failed: {result}");
}

#[test]
fn privileged_learned_addresses_that_do_not_fit_are_refused_under_on_full_deny() {
    let cgroup = TestCgroup::new();
    let server = TcpServer::bind("0.0.0.0");
    let port = server.port;
    let (dnsmasq, addresses) = many_addresses("127.0.53.201");
    let resolver = dnsmasq.addr_str();
    let metrics = free_port();
    let daemon = Daemon::start_with_args(
        &with_metrics(fqdn_policy(&cgroup, &resolver, port, "deny"), metrics),
        &["--test-map-capacity", "fqdn_addresses=4"],
    );
    lookup(&cgroup, &resolver);
    let status = daemon.wait_for_status("addresses not stored", NOTICE_TIMEOUT, |status| {
        overflow(status, "fqdn_addresses").is_some()
    });
    let results: Vec<(String, bool)> = addresses
        .iter()
        .map(|address| {
            let result = connect(&cgroup, address, port);
            assert!(
                result.ok || result.is_eperm(),
                "{address}: allowed or refused, nothing else: {result}"
            );
            (address.clone(), result.ok)
        })
        .collect();
    let passed = results.iter().filter(|(_, ok)| *ok).count();
    assert_eq!(
        passed, 4,
        "the 4 addresses that fit pass, the 4 that do not are refused: {results:?}"
    );
    let left_out = overflow(&status, "fqdn_addresses").expect("an overflow");
    assert_eq!(left_out["entries"], 4, "{left_out}");
    assert_eq!(left_out["capacity"], 4, "{left_out}");
    assert!(
        left_out["effect"]
            .as_str()
            .is_some_and(|e| e.contains("refused")),
        "{left_out}"
    );
    for (address, ok) in &results {
        let listed = left_out["examples"]
            .as_array()
            .is_some_and(|e| e.iter().any(|a| a == address.as_str()));
        assert_eq!(listed, !ok, "{address}: listed as not stored iff refused");
    }
    assert_eq!(status["limits"]["on_full"], "deny");
    assert_eq!(status["limits"]["fqdn_store_failures"], 4, "{status}");
    assert!(
        status["datapath"]["fqdn_insert_failures"]
            .as_u64()
            .is_some_and(|n| n >= 4),
        "the kernel counted its own failures: {status}"
    );
    assert!(
        daemon.workload(PROBE)["kernel_mode"].is_null(),
        "stays strict"
    );
    let refused = results
        .iter()
        .find(|(_, ok)| !ok)
        .map(|(address, _)| format!("{address}:{port}"))
        .expect("a refused address");
    let event = daemon.wait_for_event("the refusal", NOTICE_TIMEOUT, |event| {
        event["kind"] == "denied" && event["destination"] == refused.as_str()
    });
    assert_eq!(event["dns_name"], "many.limits.test", "{event}");
    let text = scrape(metrics);
    for expected in [
        "egressd_map_overflow{map=\"fqdn_addresses\",workload=\"probe\"} 4",
        "egressd_map_store_failures_total{map=\"fqdn_addresses\"} 4",
    ] {
        assert!(text.contains(expected), "{expected} in\n{text}");
    }
    let logs = daemon.logs();
    assert_eq!(
        logs.matches("the kernel's fqdn_addresses map is full")
            .count(),
        1,
        "logged once, not once per address"
    );

    // The addresses expire (min_ttl): nothing is missing any more.
    let status = daemon.wait_for_status("the overflow to end", NOTICE_TIMEOUT, |status| {
        overflow(status, "fqdn_addresses").is_none()
    });
    assert_eq!(status["limits"]["overflows"], serde_json::json!([]));
    assert!(
        daemon
            .logs()
            .contains("every learned address of workload probe is stored again")
    );
}

#[test]
fn privileged_on_full_allow_runs_the_workload_as_audit_while_its_addresses_do_not_fit() {
    let cgroup = TestCgroup::new();
    let server = TcpServer::bind("0.0.0.0");
    let port = server.port;
    let (dnsmasq, addresses) = many_addresses("127.0.53.202");
    let resolver = dnsmasq.addr_str();
    let metrics = free_port();
    let daemon = Daemon::start_with_args(
        &with_metrics(fqdn_policy(&cgroup, &resolver, port, "allow"), metrics),
        &["--test-map-capacity", "fqdn_addresses=4"],
    );
    connect(&cgroup, "127.0.0.9", port).assert_eperm("strict before anything overflows");
    lookup(&cgroup, &resolver);
    let status = daemon.wait_for_status("the workload let through", NOTICE_TIMEOUT, |status| {
        status["workloads"]
            .as_array()
            .and_then(|w| w.iter().find(|w| w["name"] == PROBE))
            .is_some_and(|w| w["kernel_mode"] == "audit")
    });
    assert_eq!(status["limits"]["on_full"], "allow");
    let left_out = overflow(&status, "fqdn_addresses").expect("an overflow");
    assert!(
        left_out["effect"]
            .as_str()
            .is_some_and(|e| e.contains("runs as audit")),
        "{left_out}"
    );
    for address in &addresses {
        connect(&cgroup, address, port).assert_ok(&format!(
            "{address}: passes while the workload runs as audit"
        ));
    }
    connect(&cgroup, "127.0.0.9", port).assert_ok("audit lets everything through");
    daemon.wait_for_event("a would-deny", NOTICE_TIMEOUT, |event| {
        event["kind"] == "would_deny" && event["destination"] == format!("127.0.0.9:{port}")
    });
    let human = daemon.ctl_ok(&["status"]);
    assert!(
        human.contains("strict (kernel: audit, map full)"),
        "{human}"
    );
    let text = scrape(metrics);
    assert!(
        text.contains("egressd_limits_audit{workload=\"probe\"} 1"),
        "{text}"
    );
    assert!(
        daemon.logs().contains("workload probe runs as audit"),
        "logged"
    );

    // The addresses expire (min_ttl): strict again.
    daemon.wait_for_status("strict again", NOTICE_TIMEOUT, |status| {
        overflow(status, "fqdn_addresses").is_none()
            && status["workloads"]
                .as_array()
                .and_then(|w| w.iter().find(|w| w["name"] == PROBE))
                .is_some_and(|w| w["kernel_mode"].is_null() && w["mode"] == "strict")
    });
    connect(&cgroup, "127.0.0.9", port).assert_eperm("strict once everything fits");
    assert!(
        daemon
            .logs()
            .contains("workload probe is enforced as strict again")
    );
}

#[test]
fn privileged_a_deny_flood_is_rate_limited_in_events_and_every_refusal_counted() {
    let cgroup = TestCgroup::new();
    let daemon = Daemon::start(&policy_toml(
        "strict",
        &[],
        &[WorkloadSpec::new(PROBE, &cgroup)],
    ));
    let stop = StopFile::new();
    let targets = [
        ("127.0.0.7".to_owned(), 4701),
        ("127.0.0.8".to_owned(), 4702),
    ];
    let started = Instant::now();
    let probe = spawn_connect_loop(&cgroup, &stop, 30, &targets);
    thread::sleep(Duration::from_secs(3));
    stop.stop();
    let result = probe.wait(Duration::from_secs(30));
    let elapsed = started.elapsed();
    let counts = connect_counts(&result);
    for count in &counts {
        assert_eq!(
            count.eperm, count.attempts,
            "every attempt refused: {count}"
        );
        assert!(count.attempts >= 100, "a flood: {count}");
    }

    // Each destination's refusals: a handful of records, the rest counted in them. The last
    // ones held back are reported once the destination may report again (within a second).
    let deadline = Instant::now() + NOTICE_TIMEOUT;
    let (records, represented) = loop {
        let events = daemon.events(10_000);
        let per_target: Vec<(usize, u64)> = counts
            .iter()
            .map(|count| {
                let records: Vec<&Value> = events
                    .iter()
                    .filter(|e| e["kind"] == "denied" && e["destination"] == count.address)
                    .collect();
                let represented = records
                    .iter()
                    .map(|e| 1 + e["suppressed"].as_u64().unwrap_or(0))
                    .sum();
                (records.len(), represented)
            })
            .collect();
        let drops = daemon.status()["datapath"]["ring_buffer_drops"]
            .as_u64()
            .unwrap_or(0);
        let total: u64 = per_target.iter().map(|&(_, n)| n).sum();
        let attempts: u64 = counts.iter().map(|c| c.attempts).sum();
        if total + drops >= attempts || Instant::now() >= deadline {
            assert!(
                total <= attempts && total + drops >= attempts,
                "records stand for {total} refusals of {attempts} ({drops} lost in the ring \
                 buffer): {per_target:?}"
            );
            break (
                per_target.iter().map(|&(n, _)| n).collect::<Vec<_>>(),
                total,
            );
        }
        thread::sleep(Duration::from_millis(200));
    };
    let bound = 5 + elapsed.as_secs() as usize + 3;
    for (count, records) in counts.iter().zip(&records) {
        assert!(
            *records <= bound,
            "{}: {records} records for {} refusals, at most {bound}",
            count.address,
            count.attempts
        );
    }
    let status = daemon.status();
    let events = &status["events"];
    assert_eq!(
        events["published"].as_u64().unwrap_or(0) + events["suppressed"].as_u64().unwrap_or(0),
        represented,
        "status accounts for every refusal reported or held back: {events}"
    );
    assert!(
        events["suppressed"].as_u64().is_some_and(|n| n > 0),
        "{events}"
    );
    let denied_lines = daemon
        .logs()
        .lines()
        .filter(|line| line.contains("\"type\":\"event\"") && line.contains("\"kind\":\"denied\""))
        .count();
    assert!(
        denied_lines <= records.iter().sum::<usize>(),
        "the log holds no more than the event stream: {denied_lines}"
    );
    let human = daemon.ctl_ok(&["status"]);
    assert!(
        human.contains("more held back by the rate limit"),
        "{human}"
    );
    // The kernel's summaries still count every refusal.
    let observed = daemon.ctl_ok(&["observed", "--workload", PROBE, "--json"]);
    let observed: Vec<Value> = serde_json::from_str(&observed).expect("observed --json");
    for count in &counts {
        let (address, port) = count.address.rsplit_once(':').expect("ip:port");
        let summary = observed
            .iter()
            .find(|o| {
                o["key"]["address"] == address
                    && o["key"]["port"].as_u64() == port.parse::<u64>().ok()
            })
            .unwrap_or_else(|| panic!("{} observed: {observed:?}", count.address));
        assert_eq!(
            summary["denied"].as_u64(),
            Some(count.attempts),
            "{}: {summary}",
            count.address
        );
    }
    eprintln!(
        "deny flood: {} refusals in {elapsed:?} became {records:?} event records (at most {bound} \
         each); status: {events}",
        counts.iter().map(|c| c.attempts).sum::<u64>()
    );
}

#[test]
fn privileged_deny_names_and_workload_ids_that_do_not_fit_are_refused_and_the_policy_stays() {
    let cgroup = TestCgroup::new();
    let server = TcpServer::bind("127.0.0.2");
    let port = server.port;
    let denied = TcpServer::bind("127.0.0.7");
    // Workloads whose cgroups do not exist still take an id each.
    let policy = |deny: &[&str], names: usize, idle: &str, idle_count: usize| -> String {
        let mut spec = WorkloadSpec::new(PROBE, &cgroup).allow(allow("127.0.0.0/24", &[], "tcp"));
        for i in 0..names {
            spec = spec.allow(allow_fqdn(&format!("n{i}.vendor.test"), &[443], "tcp"));
        }
        let mut text = policy_toml("strict", deny, &[spec]);
        for i in 0..idle_count {
            text.push_str(&format!(
                "\n[[workload]]\nname = \"{idle}-{i}\"\ncgroup = \"egressd-test-absent/{idle}-{i}\"\nallow = []\n"
            ));
        }
        text
    };
    const IDLE: usize = 2100;
    let daemon = Daemon::start_with_args(
        &policy(&["127.0.0.7/32", "127.0.0.8/32"], 2, "old", IDLE),
        &[
            "--test-map-capacity",
            "deny=4",
            "--test-map-capacity",
            "fqdn=3",
        ],
    );
    let before = daemon.status()["policy"]["sha256"].clone();
    let enforcing = || {
        connect(&cgroup, "127.0.0.2", port).assert_ok("allowed by the policy in force");
        connect(&cgroup, "127.0.0.7", denied.port)
            .assert_eperm("denied for every workload by the policy in force");
    };
    enforcing();

    let six_denied = [
        "127.0.0.7/32",
        "127.0.0.8/32",
        "127.0.0.9/32",
        "127.0.0.10/32",
        "127.0.0.11/32",
        "127.0.0.12/32",
    ];
    let cases: [(String, &[&str]); 4] = [
        (
            policy(&six_denied, 2, "old", IDLE),
            &[
                "kernel's deny map, which holds 4",
                "the previous policy stays in force",
            ],
        ),
        (
            policy(&["127.0.0.7/32"], 5, "old", IDLE),
            &[
                "kernel's fqdn map, which holds 3",
                "the previous policy stays in force",
            ],
        ),
        // Each policy fits alone; both at once do not (ids stay taken until the switch).
        (
            policy(&["127.0.0.7/32"], 2, "new", IDLE),
            &["workload ids at once", "reload in two steps"],
        ),
        (
            policy(&["127.0.0.7/32"], 2, "old", 4001),
            &["too many workloads: at most 4000"],
        ),
    ];
    for (text, expected) in cases {
        daemon.rewrite_policy(&text);
        let message = reload_refused(&daemon, expected);
        let status = daemon.status();
        assert_eq!(status["policy"]["sha256"], before, "{message}");
        assert!(
            status["policy"]["last_error"]["message"].is_string(),
            "status shows the refusal: {status}"
        );
        enforcing();
    }
}

#[test]
fn privileged_a_full_flow_table_is_reported_and_every_destination_still_recorded() {
    const DESTINATIONS: usize = 10;
    let cgroup = TestCgroup::new();
    let targets: Vec<TcpServer> = (0..DESTINATIONS)
        .map(|i| TcpServer::bind(&format!("127.0.0.{}", 10 + i)))
        .collect();
    let metrics = free_port();
    // Flushed every second: a first-sight event is trusted once its summary has had two
    // flush intervals to appear.
    let policy = format!(
        "{}\n[observe]\nflush_interval = \"1s\"\n",
        with_metrics(
            policy_toml("learning", &[], &[WorkloadSpec::new(PROBE, &cgroup)]),
            metrics
        )
    );
    let daemon = Daemon::start_with_args(&policy, &["--test-map-capacity", "flows=4"]);
    for target in &targets {
        connect(&cgroup, &target.ip.to_string(), target.port).assert_ok("learning allows");
    }

    let recorded = |observed: &[Value], target: &TcpServer| {
        let address = target.ip.to_string();
        observed.iter().any(|o| {
            o["key"]["address"] == address.as_str() && o["key"]["port"] == u64::from(target.port)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let observed = loop {
        let text = daemon.ctl_ok(&["observed", "--workload", PROBE, "--json"]);
        let observed: Vec<Value> = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("observed --json is not a JSON list ({e}): {text}"));
        if targets.iter().all(|t| recorded(&observed, t)) || Instant::now() > deadline {
            break observed;
        }
        thread::sleep(Duration::from_millis(250));
    };
    for target in &targets {
        assert!(
            recorded(&observed, target),
            "{}:{} is recorded: {observed:?}",
            target.ip,
            target.port
        );
    }
    let status = daemon.status();
    let observe = &status["observe"];
    assert_eq!(observe["kernel_flow_capacity"], 4, "{observe}");
    let in_kernel = observe["kernel_flows"].as_u64().expect("kernel_flows");
    assert!(in_kernel <= 4, "{observe}");
    let recovered = observe["recovered_from_events"]
        .as_u64()
        .expect("recovered_from_events");
    assert!(
        recovered > 0,
        "what the table could not hold came from first-sight events: {observe}"
    );
    let human = daemon.ctl_ok(&["status"]);
    assert!(human.contains("the kernel's flow table is full"), "{human}");
    let scraped = scrape(metrics);
    assert!(
        scraped.contains("egressd_map_capacity{map=\"flows\"} 4"),
        "{scraped}"
    );
    assert!(
        daemon.logs().contains("the kernel's flow table is full"),
        "the daemon logs it: {}",
        daemon.logs()
    );
}
