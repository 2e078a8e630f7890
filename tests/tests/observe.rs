//! Observe, then allowlist: learning records what a workload contacted (kernel flow
//! summaries flushed to the SQLite store), `egressctl suggest` turns it into a policy that
//! allows exactly that, `egressctl diff` flags what a policy misses, the store survives
//! kill -9, and `egressctl export` writes well-formed Kubernetes and Cilium YAML.
//!
//! Privileged: root, cgroup v2, built binaries (`cargo build --bins`), dnsmasq.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use egressd_tests::{
    Daemon, DnsSettings, Dnsmasq, TcpTarget, TestCgroup, UdpTarget, WorkloadSpec,
    allow_ping_sockets, egressctl_bin, policy_toml, run_bounded, run_probe_in, spawn_probe_in,
};
use serde_json::Value;

const PROBE: &str = "probe";
const RESOLVER: &str = "127.0.53.40";
const NAME: &str = "api.vendor.test";
/// Bytes the writer thread sends.
const WRITE_BYTES: usize = 5000;
/// The UDP and ICMP probes send 13 bytes of payload ("egressd-probe").
const PROBE_PAYLOAD: u64 = 13;

fn learning_policy(cgroup: &TestCgroup) -> String {
    let mut text = policy_toml("learning", &[], &[WorkloadSpec::new(PROBE, cgroup)]);
    text.push_str(&DnsSettings::resolvers(&[RESOLVER]).toml());
    text
}

/// `egressctl observed --json` for the probe workload, by destination text.
fn observed(daemon: &Daemon) -> BTreeMap<String, Value> {
    let text = daemon.ctl_ok(&["observed", "--workload", PROBE, "--json"]);
    let list: Vec<Value> = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("observed --json is not a JSON list ({e}): {text}"));
    list.into_iter()
        .map(|observation| (destination_of(&observation), observation))
        .collect()
}

/// `tcp 127.0.0.2:4711`, `icmp 127.0.0.4`.
fn destination_of(observation: &Value) -> String {
    let key = &observation["key"];
    let protocol = match key["protocol"].as_u64() {
        Some(6) => "tcp",
        Some(17) => "udp",
        Some(1) => "icmp",
        _ => "other",
    };
    let address = key["address"].as_str().unwrap_or("?");
    match key["port"].as_u64() {
        Some(port) => format!("{protocol} {address}:{port}"),
        None => format!("{protocol} {address}"),
    }
}

fn counter(observation: &Value, name: &str) -> u64 {
    observation[name]
        .as_u64()
        .unwrap_or_else(|| panic!("{name} missing in {observation}"))
}

fn diff(daemon: &Daemon) -> (i32, String) {
    let output = daemon.ctl(&[
        "diff",
        "--policy",
        &daemon.policy_path().display().to_string(),
        "--workload",
        PROBE,
    ]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), text)
}

#[test]
fn privileged_learning_records_destinations_and_suggest_diff_turn_them_into_a_policy() {
    let _ping = allow_ping_sockets();
    let cgroup = TestCgroup::new();
    let tcp = TcpTarget::bind("127.0.0.2");
    let udp = UdpTarget::bind("127.0.0.3");
    let named = TcpTarget::bind("127.0.0.5");
    let pooled = TcpTarget::bind("127.0.0.6");
    let later = TcpTarget::bind("127.0.0.7");
    let dnsmasq = Dnsmasq::builder(RESOLVER).host(NAME, "127.0.0.5").start();
    let daemon = Daemon::start(&learning_policy(&cgroup));

    let tcp_port = tcp.port_str();
    run_probe_in(&cgroup, &["tcp-connect", "127.0.0.2", &tcp_port]).assert_ok("tcp, first");
    run_probe_in(&cgroup, &["tcp-connect", "127.0.0.2", &tcp_port]).assert_ok("tcp, second");
    run_probe_in(&cgroup, &["udp-sendto", "127.0.0.3", &udp.port_str()]).assert_ok("udp");
    run_probe_in(&cgroup, &["icmp-ping", "127.0.0.4"]).assert_ok("icmp");
    run_probe_in(
        &cgroup,
        &["resolve-connect", RESOLVER, NAME, &named.port_str()],
    )
    .assert_ok("a name served by the test's resolver");
    // Connected on the main thread, written from another: both tasks are recorded.
    let go = daemon.dir().join("writer-go");
    let writer = spawn_probe_in(
        &cgroup,
        &[
            "thread-write",
            "127.0.0.6",
            &pooled.port_str(),
            &WRITE_BYTES.to_string(),
            &go.display().to_string(),
        ],
    );

    // `observed` flushes the daemon first; the writer may still be writing, so wait for
    // its bytes (bounded).
    let pooled_key = format!("tcp 127.0.0.6:{}", pooled.port);
    let deadline = Instant::now() + Duration::from_secs(10);
    let observations = loop {
        let observations = observed(&daemon);
        let written = observations
            .get(&pooled_key)
            .map_or(0, |o| counter(o, "bytes_sent"));
        if written >= WRITE_BYTES as u64 || Instant::now() > deadline {
            break observations;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    std::fs::write(&go, b"").expect("write the go file");
    writer
        .wait(Duration::from_secs(10))
        .assert_ok("thread-write");

    // Exactly the destinations contacted, the resolver included.
    let tcp_key = format!("tcp 127.0.0.2:{}", tcp.port);
    let udp_key = format!("udp 127.0.0.3:{}", udp.port);
    let named_key = format!("tcp 127.0.0.5:{}", named.port);
    let resolver_key = format!("udp {RESOLVER}:53");
    let mut expected: Vec<&str> = vec![
        &tcp_key,
        &udp_key,
        "icmp 127.0.0.4",
        &named_key,
        &pooled_key,
        &resolver_key,
    ];
    expected.sort_unstable();
    let seen: Vec<&str> = observations.keys().map(String::as_str).collect();
    assert_eq!(seen, expected, "observed: {observations:#?}");

    let tcp_seen = &observations[&tcp_key];
    assert_eq!(counter(tcp_seen, "connections"), 2, "{tcp_seen}");
    // SYN, ACK and FIN of each connection at least; IP headers are counted.
    assert!(counter(tcp_seen, "packets_sent") >= 6, "{tcp_seen}");
    assert!(counter(tcp_seen, "packets_received") >= 2, "{tcp_seen}");
    let udp_seen = &observations[&udp_key];
    assert_eq!(counter(udp_seen, "connections"), 1, "{udp_seen}");
    assert_eq!(counter(udp_seen, "packets_sent"), 1, "{udp_seen}");
    assert_eq!(
        counter(udp_seen, "bytes_sent"),
        20 + 8 + PROBE_PAYLOAD,
        "{udp_seen}"
    );
    let icmp_seen = &observations["icmp 127.0.0.4"];
    assert_eq!(counter(icmp_seen, "packets_sent"), 1, "{icmp_seen}");
    assert_eq!(
        counter(icmp_seen, "bytes_sent"),
        20 + 8 + PROBE_PAYLOAD,
        "{icmp_seen}"
    );
    assert_eq!(
        counter(icmp_seen, "packets_received"),
        1,
        "echo reply: {icmp_seen}"
    );
    let named_seen = &observations[&named_key];
    assert_eq!(
        named_seen["dns_names"],
        serde_json::json!([NAME]),
        "{named_seen}"
    );
    let pooled_seen = &observations[&pooled_key];
    let sent = counter(pooled_seen, "bytes_sent");
    assert!(
        sent >= WRITE_BYTES as u64 && sent < WRITE_BYTES as u64 + 2000,
        "payload plus headers: {pooled_seen}"
    );
    let processes: Vec<&str> = pooled_seen["processes"]
        .as_array()
        .map(|list| list.iter().filter_map(|p| p["comm"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        processes.contains(&"probe-writer") && processes.len() >= 2,
        "the connecting and the writing thread: {pooled_seen}"
    );
    assert!(
        pooled_seen["processes"][0]["exe"]
            .as_str()
            .is_some_and(|exe| exe.ends_with("egressd-probe")),
        "executable path: {pooled_seen}"
    );
    for observation in observations.values() {
        assert_eq!(counter(observation, "denied"), 0, "{observation}");
    }

    // suggest -> a policy: every rule carries `reason = ""` for a person to fill.
    let suggested = daemon.ctl_ok(&[
        "suggest",
        "--workload",
        PROBE,
        "--policy",
        &daemon.policy_path().display().to_string(),
    ]);
    assert!(
        suggested.contains(&format!("fqdn = \"{NAME}\"")),
        "{suggested}"
    );
    assert!(suggested.contains("reason = \"\""), "{suggested}");
    let mut strict = format!(
        "mode = \"strict\"\n{}\n",
        DnsSettings::resolvers(&[RESOLVER]).toml()
    );
    strict.push_str(&suggested.replace("reason = \"\"", "reason = \"observed in the test\""));
    daemon.rewrite_policy(&strict);
    let reloaded = daemon.reload();
    assert!(
        reloaded.status.success(),
        "the suggested policy loads: {}\n{strict}",
        String::from_utf8_lossy(&reloaded.stderr)
    );
    assert_eq!(daemon.workload(PROBE)["mode"], "strict");
    let check = daemon.ctl(&[
        "check",
        &daemon.policy_path().display().to_string(),
        "--require-reasons",
    ]);
    assert!(check.status.success(), "reasons filled in: {check:?}");

    // Strict with it: everything observed still works, a new destination does not.
    run_probe_in(&cgroup, &["tcp-connect", "127.0.0.2", &tcp_port]).assert_ok("strict: tcp");
    run_probe_in(&cgroup, &["udp-sendto", "127.0.0.3", &udp.port_str()]).assert_ok("strict: udp");
    run_probe_in(&cgroup, &["icmp-ping", "127.0.0.4"]).assert_ok("strict: icmp");
    run_probe_in(
        &cgroup,
        &["resolve-connect", RESOLVER, NAME, &named.port_str()],
    )
    .assert_ok("strict: the name rule");
    run_probe_in(&cgroup, &["tcp-connect", "127.0.0.6", &pooled.port_str()])
        .assert_ok("strict: the pooled destination");
    run_probe_in(&cgroup, &["tcp-connect", "127.0.0.7", &later.port_str()])
        .assert_eperm("strict: a destination never observed");

    // diff flags the refused destination (exit 1) until the policy allows it (exit 0).
    let (code, text) = diff(&daemon);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains(&format!("127.0.0.7:{}/tcp", later.port)),
        "{text}"
    );
    assert!(text.contains("DENIED"), "{text}");
    let amended = strict.replacen(
        "allow = [\n",
        &format!(
            "allow = [\n  {{ cidr = \"127.0.0.7\", ports = [{}], protocol = \"tcp\", reason = \"new upstream\" }},\n",
            later.port
        ),
        1,
    );
    daemon.rewrite_policy(&amended);
    let (code, text) = diff(&daemon);
    assert_eq!(code, 0, "{text}\n{amended}");

    // A policy that cannot be read is an error (2), never "no differences".
    std::fs::write(
        daemon.policy_path(),
        "mode = \"strict\"\n[[workload]]\nbogus = 1\n",
    )
    .expect("write a broken policy");
    let (code, text) = diff(&daemon);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("bogus"), "{text}");
    drop(dnsmasq);
}

#[test]
fn privileged_kill_9_while_flushing_leaves_a_readable_store() {
    let cgroup = TestCgroup::new();
    let udp = UdpTarget::bind("127.0.0.3");
    let mut policy = policy_toml("learning", &[], &[WorkloadSpec::new(PROBE, &cgroup)]);
    policy.push_str("\n[observe]\nflush_interval = \"100ms\"\n");
    let mut daemon = Daemon::start(&policy);
    // Many distinct destinations while the recorder writes every 100 ms.
    let port = udp.port_str();
    let start = Instant::now();
    let mut rounds = 0;
    while start.elapsed() < Duration::from_millis(1500) && rounds < 200 {
        let address = format!("127.0.{}.{}", 10 + rounds / 200, 1 + rounds % 200);
        run_probe_in(&cgroup, &["udp-sendto", &address, &port]).assert_ok("udp to many");
        rounds += 1;
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(daemon.pid()).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 egressd");
    let (status, _) = daemon.stop().expect("egressd was running");
    assert!(!status.success(), "killed: {status}");

    let store = daemon.state_dir().join("observations.db");
    // A reader, as egressctl after the crash.
    let output = run_bounded(
        std::process::Command::new(egressctl_bin())
            .args(["observed", "--json", "--socket"])
            .arg(daemon.dir().join("gone.sock"))
            .arg("--store")
            .arg(&store),
        Duration::from_secs(15),
    );
    assert!(
        output.status.success(),
        "observed after kill -9: {output:?}"
    );
    let list: Vec<Value> = serde_json::from_slice(&output.stdout).expect("JSON list");
    assert!(
        !list.is_empty() && list.len() <= rounds,
        "{} of {rounds} destinations flushed before the kill",
        list.len()
    );
    // The next daemon opens it read-write (recovering the WAL) and finds it intact.
    let reopened = egressd_observe::Store::open(Path::new(&store)).expect("reopen the store");
    assert_eq!(
        reopened.integrity_check().expect("integrity check"),
        vec!["ok".to_owned()]
    );
}

#[test]
fn export_writes_well_formed_kubernetes_and_cilium_yaml() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        r#"mode = "strict"
[[workload]]
name = "agent"
cgroup = "system.slice/agent.service"
allow = [
  { cidr = "203.0.113.0/24", ports = [443], protocol = "tcp", reason = "vendor API" },
  { fqdn = "updates.vendor.example", ports = [443], protocol = "tcp", reason = "updates" },
  { fqdn = "*.telemetry.vendor.example", ports = [443], reason = "telemetry" },
]
"#,
    )
    .expect("write the policy");
    let export = |format: &str| -> Vec<serde_yaml_ng::Value> {
        let output = run_bounded(
            std::process::Command::new(egressctl_bin())
                .args([
                    "export",
                    "--format",
                    format,
                    "--namespace",
                    "agents",
                    "--policy",
                ])
                .arg(&policy),
            Duration::from_secs(15),
        );
        assert!(output.status.success(), "export {format}: {output:?}");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        serde_yaml_ng::Deserializer::from_str(&text)
            .map(|document| {
                serde::Deserialize::deserialize(document)
                    .unwrap_or_else(|e| panic!("export {format} is not YAML ({e}):\n{text}"))
            })
            .collect()
    };

    // NetworkPolicy: the fields the upstream schema requires, ipBlock rules, and a note
    // on what it cannot express (names).
    let documents = export("kubernetes");
    assert_eq!(documents.len(), 1);
    let network_policy = &documents[0];
    assert_eq!(network_policy["apiVersion"], "networking.k8s.io/v1");
    assert_eq!(network_policy["kind"], "NetworkPolicy");
    assert_eq!(network_policy["metadata"]["namespace"], "agents");
    assert!(network_policy["metadata"]["name"].as_str().is_some());
    assert!(network_policy["spec"]["podSelector"].is_mapping());
    assert_eq!(network_policy["spec"]["policyTypes"][0], "Egress");
    let yaml = serde_yaml_ng::to_string(network_policy).expect("yaml");
    assert!(yaml.contains("cidr: 203.0.113.0/24"), "{yaml}");
    assert!(yaml.contains("port: 443"), "{yaml}");

    // CiliumNetworkPolicy: toFQDNs matchName and matchPattern, toCIDR, toPorts, and the
    // DNS rule Cilium needs to see the names resolved.
    let documents = export("cilium");
    assert_eq!(documents.len(), 1);
    let cilium = &documents[0];
    assert_eq!(cilium["apiVersion"], "cilium.io/v2");
    assert_eq!(cilium["kind"], "CiliumNetworkPolicy");
    assert!(cilium["spec"]["endpointSelector"].is_mapping());
    let yaml = serde_yaml_ng::to_string(cilium).expect("yaml");
    for needle in [
        "matchName: updates.vendor.example",
        "matchPattern: '*.telemetry.vendor.example'",
        "203.0.113.0/24",
        "toPorts",
        "dns:",
    ] {
        assert!(yaml.contains(needle), "{needle:?} missing:\n{yaml}");
    }
}

#[test]
fn privileged_every_name_asked_is_recorded_and_bursts_of_random_names_are_flagged() {
    const BURST: usize = 60;
    let cgroup = TestCgroup::new();
    let named = TcpTarget::bind("127.0.0.5");
    let dnsmasq = Dnsmasq::builder(RESOLVER)
        .host(NAME, "127.0.0.5")
        .host("failover.vendor.test", "127.0.0.8")
        .start();
    let daemon = Daemon::start(&learning_policy(&cgroup));
    run_probe_in(
        &cgroup,
        &["resolve-connect", RESOLVER, NAME, &named.port_str()],
    )
    .assert_ok("a name that is connected to");
    run_probe_in(
        &cgroup,
        &["dns-query", RESOLVER, "failover.vendor.test", "500"],
    )
    .assert_ok("a name only resolved");
    // Data leaving in question names: random labels, many of them below one parent.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..BURST {
        let mut label = String::new();
        for _ in 0..24 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            label.push(char::from(
                b"abcdefghijklmnopqrstuvwxyz234567"[(state % 32) as usize],
            ));
        }
        run_probe_in(
            &cgroup,
            &[
                "dns-query",
                RESOLVER,
                &format!("{label}.beacon.test"),
                "500",
            ],
        )
        .assert_ok("a tunnelling-like question");
    }

    let text = daemon.ctl_ok(&["observed", "--workload", PROBE, "--names", "--json"]);
    let names: Vec<Value> = serde_json::from_str(&text).expect("observed --names --json");
    let find = |name: &str| {
        names
            .iter()
            .find(|n| n["name"] == name)
            .unwrap_or_else(|| panic!("{name} not recorded: {text}"))
    };
    let connected = find(NAME);
    assert_eq!(connected["connected"], true, "{connected}");
    assert_eq!(connected["answered"], 1, "{connected}");
    assert!(connected.get("tunnelling").is_none(), "{connected}");
    let failover = find("failover.vendor.test");
    assert_eq!(failover["connected"], false, "{failover}");
    assert!(
        failover.get("tunnelling").is_none(),
        "ordinary names are not flagged: {failover}"
    );
    let burst: Vec<&Value> = names
        .iter()
        .filter(|n| {
            n["name"]
                .as_str()
                .is_some_and(|name| name.ends_with(".beacon.test"))
        })
        .collect();
    assert_eq!(burst.len(), BURST, "{text}");
    assert!(
        burst.iter().all(|n| n["tunnelling"].as_str().is_some()),
        "every name of the burst is flagged: {text}"
    );

    let human = daemon.ctl_ok(&["observed", "--workload", PROBE]);
    assert!(human.contains("resolved, never connected to"), "{human}");
    assert!(human.contains("look like DNS tunnelling"), "{human}");
    let suggested = daemon.ctl_ok(&[
        "suggest",
        "--workload",
        PROBE,
        "--policy",
        &daemon.policy_path().display().to_string(),
    ]);
    assert!(
        suggested.contains("  # { fqdn = \"failover.vendor.test\", reason = \"\" },"),
        "{suggested}"
    );
    assert!(suggested.contains("# NOT offered: "), "{suggested}");
    drop(dnsmasq);
}
