use std::path::Path;
use std::time::{Duration, SystemTime};

use egressd_policy::{Destination, Policy};

use super::*;
use crate::model::{FlowKey, FlowSample, SampleVerdict};

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_714_564_800 + secs)
}

fn observation(
    workload: &str,
    address: &str,
    port: Option<u16>,
    protocol: u8,
    names: &[&str],
) -> Observation {
    let key = FlowKey::new(workload, address.parse().expect("ip"), port, protocol);
    let mut sample = FlowSample::new(key, at(0));
    sample.last_seen = at(3600);
    sample.connections = 3;
    sample.bytes_sent = 2048;
    sample.bytes_received = 3 * 1024 * 1024;
    sample.connect_process = Some(Process::new("agent", Some("/opt/vendor/bin/agent")));
    let mut observation = Observation::from_sample(&sample);
    observation.add_names(names.iter().copied());
    observation
}

fn parse(text: &str) -> Policy {
    egressd_policy::parse(text, Path::new("suggested.toml"))
        .unwrap_or_else(|error| panic!("suggestion does not parse:\n{error}\n---\n{text}"))
}

/// The property `egressctl suggest` promises: the policy allows what was observed.
fn assert_allows_all(policy: &Policy, observations: &[Observation]) {
    for observation in observations {
        let key = &observation.key;
        let workload = policy
            .workload(&key.workload)
            .unwrap_or_else(|| panic!("no workload {}", key.workload));
        let by_cidr = workload.allows(&[], key.address, key.protocol, key.port);
        let by_name = workload.allow.iter().any(|rule| match &rule.destination {
            Destination::Fqdn(pattern) => {
                rule.matches_traffic(key.protocol, key.port)
                    && observation
                        .dns_names
                        .iter()
                        .any(|name| pattern.matches(name))
            }
            Destination::Cidr(_) => false,
        });
        assert!(by_cidr || by_name, "not allowed: {observation:?}");
        assert!(
            crate::diff::allowed(policy, observation),
            "diff disagrees: {observation:?}"
        );
    }
}

fn fleet() -> Vec<Observation> {
    vec![
        observation("agent", "203.0.113.7", Some(443), 6, &["api.vendor.com"]),
        observation("agent", "203.0.113.8", Some(443), 6, &["api.vendor.com"]),
        observation("agent", "203.0.113.8", Some(8443), 6, &["api.vendor.com"]),
        observation(
            "agent",
            "198.51.100.1",
            Some(80),
            6,
            &["updates.vendor.com"],
        ),
        observation("agent", "198.51.100.2", Some(8000), 17, &[]),
        observation("agent", "198.51.100.2", Some(8001), 17, &[]),
        observation("agent", "198.51.100.2", Some(8002), 17, &[]),
        observation("agent", "198.51.100.2", Some(9000), 17, &[]),
        observation("agent", "2001:db8::5", None, 58, &[]),
        observation(
            "agent",
            "::ffff:192.0.2.9",
            Some(53),
            17,
            &["ns1.example.net"],
        ),
        observation("agent", "192.0.2.10", Some(3868), 132, &[]),
        observation(
            "backup",
            "192.0.2.44",
            Some(443),
            6,
            &["a.s3.example.com", "b.s3.example.com"],
        ),
        observation("host", "192.0.2.50", Some(123), 17, &[]),
    ]
}

#[test]
fn suggestion_parses_and_allows_every_observation() {
    let observations = fleet();
    let text = suggest(&observations, &SuggestOptions::default());
    let policy = parse(&text);
    assert_eq!(
        policy
            .workloads
            .iter()
            .map(|w| w.name.as_str())
            .collect::<Vec<_>>(),
        ["agent", "backup", "host"]
    );
    assert_allows_all(&policy, &observations);
    // Every rule carries an (empty) reason for the operator.
    let missing = egressd_policy::missing_reasons(&policy);
    let rules: usize = policy.workloads.iter().map(|w| w.allow.len()).sum();
    assert_eq!(missing.len(), rules);
    assert_eq!(text.matches("reason = \"\"").count(), rules);
}

#[test]
fn rules_merge_ports_per_destination_and_protocol() {
    let text = suggest(&fleet(), &SuggestOptions::default());
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .collect();
    assert_eq!(
        lines,
        [
            r#"  { fqdn = "api.vendor.com", ports = [443, 8443], protocol = "tcp", reason = "" },"#,
            r#"  { fqdn = "ns1.example.net", ports = [53], protocol = "udp", reason = "" },"#,
            r#"  { fqdn = "updates.vendor.com", ports = [80], protocol = "tcp", reason = "" },"#,
            r#"  { cidr = "192.0.2.10", ports = [3868], protocol = "any", reason = "" },"#,
            r#"  { cidr = "198.51.100.2", ports = ["8000-8002", 9000], protocol = "udp", reason = "" },"#,
            r#"  { cidr = "2001:db8::5", protocol = "icmp", reason = "" },"#,
            r#"  { fqdn = "a.s3.example.com", ports = [443], protocol = "tcp", reason = "" },"#,
            r#"  { fqdn = "b.s3.example.com", ports = [443], protocol = "tcp", reason = "" },"#,
            r#"  { cidr = "192.0.2.50", ports = [123], protocol = "udp", reason = "" },"#,
        ]
    );
}

#[test]
fn evidence_comments_precede_each_rule() {
    let mut observations = fleet();
    observations[3].denied = 4;
    observations[3].would_deny = 2;
    let text = suggest(&observations, &SuggestOptions::default());
    let block = text
        .split("\n\n")
        .find(|block| block.contains("updates.vendor.com"))
        .expect("agent block");
    let rule_at = block.find("{ fqdn = \"updates.vendor.com\"").expect("rule");
    let evidence = &block[..rule_at];
    let evidence = &evidence[evidence.rfind("reason = \"\" },").map_or(0, |i| i + 14)..];
    for expected in [
        "# seen 2024-05-01T12:00:00Z .. 2024-05-01T13:00:00Z: 3 connection(s), sent 2.0 KiB, received 3.0 MiB",
        "# processes: agent (/opt/vendor/bin/agent)",
        "# addresses: 198.51.100.1",
        "# PLAINTEXT: port 80",
        "# DENIED: 4 attempt(s)",
        "# WOULD DENY: 2 attempt(s)",
    ] {
        assert!(
            evidence.contains(expected),
            "missing {expected:?} in:\n{evidence}"
        );
    }
    assert!(
        text.contains("# protocol ip-proto-132 has no name in the policy"),
        "{text}"
    );
    let api = &text[..text.find("{ fqdn = \"api.vendor.com\"").expect("api rule")];
    assert!(
        api.ends_with("# addresses: 203.0.113.7, 203.0.113.8\n  "),
        "{api}"
    );
    assert!(api.contains(": 9 connection(s)"), "{api}");
}

#[test]
fn cgroups_come_from_the_options_or_a_placeholder() {
    let running = egressd_policy::parse(
        r#"
[[workload]]
name = "agent"
cgroup = "system.slice/vendor-agent.service"
"#,
        Path::new("policy.toml"),
    )
    .expect("policy");
    let opts = SuggestOptions::default().with_cgroups_from(&running);
    let policy = parse(&suggest(&fleet(), &opts));
    let cgroup = |name: &str| {
        policy
            .workload(name)
            .and_then(|w| w.cgroup.as_ref())
            .map(|c| c.as_str().to_owned())
    };
    assert_eq!(
        cgroup("agent").as_deref(),
        Some("system.slice/vendor-agent.service")
    );
    assert_eq!(cgroup("backup").as_deref(), Some("TODO/backup"));
    assert_eq!(cgroup("host"), None, "the host workload needs no cgroup");
    let text = suggest(&fleet(), &SuggestOptions::default());
    assert!(text.contains("# TODO: this workload's cgroup"), "{text}");
}

#[test]
fn wildcard_min_collapses_siblings_under_their_parent() {
    let observations = vec![
        observation("w", "192.0.2.1", Some(443), 6, &["a.cdn.vendor.com"]),
        observation("w", "192.0.2.2", Some(443), 6, &["b.cdn.vendor.com"]),
        observation(
            "w",
            "192.0.2.3",
            Some(8443),
            6,
            &["c.cdn.vendor.com", "x.y.cdn.vendor.com"],
        ),
        observation("w", "192.0.2.4", Some(443), 17, &["d.cdn.vendor.com"]),
        observation("w", "192.0.2.5", Some(443), 6, &["cdn.vendor.com"]),
        observation(
            "w",
            "192.0.2.6",
            Some(443),
            6,
            &["one.example.org", "two.example.org"],
        ),
        // Two-label parents are never wildcarded: no `*.com`.
        observation(
            "w",
            "192.0.2.7",
            Some(443),
            6,
            &["aa.com", "bb.com", "cc.com"],
        ),
    ];
    let opts = SuggestOptions {
        wildcard_min: Some(3),
        ..SuggestOptions::default()
    };
    let text = suggest(&observations, &opts);
    let policy = parse(&text);
    assert_allows_all(&policy, &observations);
    let fqdns: Vec<String> = policy.workloads[0]
        .allow
        .iter()
        .map(|rule| {
            format!(
                "{} {} {:?}",
                rule.destination,
                rule.protocol,
                rule.ports
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
            )
        })
        .collect();
    assert_eq!(
        fqdns,
        [
            r#"aa.com tcp ["443"]"#,
            r#"bb.com tcp ["443"]"#,
            r#"cc.com tcp ["443"]"#,
            r#"cdn.vendor.com tcp ["443"]"#,
            r#"one.example.org tcp ["443"]"#,
            r#"two.example.org tcp ["443"]"#,
            // a, b, c and the deeper x.y are one tcp rule; d was udp only.
            r#"*.cdn.vendor.com tcp ["443", "8443"]"#,
            r#"*.cdn.vendor.com udp ["443"]"#,
        ]
    );
    assert!(
        text.contains(
            "# names: a.cdn.vendor.com, b.cdn.vendor.com, c.cdn.vendor.com, x.y.cdn.vendor.com"
        ),
        "{text}"
    );
    // An observation with several names counts once in the merged evidence.
    let pair = &text[..text.find("{ fqdn = \"cdn.vendor.com\"").expect("apex rule")];
    assert!(!pair.contains("*.example.org"), "{text}");
    let opts2 = SuggestOptions {
        wildcard_min: Some(2),
        ..SuggestOptions::default()
    };
    let text2 = suggest(&observations, &opts2);
    let org = &text2[..text2
        .find("{ fqdn = \"*.example.org\"")
        .expect("org wildcard")];
    let org = &org[org.rfind("reason").unwrap_or(0)..];
    assert!(org.contains(": 3 connection(s)"), "{org}");
    // A lower threshold also collapses the pair; 0 and 1 act as 2.
    for min in [0, 1, 2] {
        let opts = SuggestOptions {
            wildcard_min: Some(min),
            ..SuggestOptions::default()
        };
        let policy = parse(&suggest(&observations, &opts));
        assert_allows_all(&policy, &observations);
        let destinations: Vec<String> = policy.workloads[0]
            .allow
            .iter()
            .map(|r| r.destination.to_string())
            .collect();
        assert!(
            destinations.contains(&"*.example.org".to_owned()),
            "{destinations:?}"
        );
        assert!(
            !destinations.iter().any(|d| d == "*.com"),
            "{destinations:?}"
        );
    }
}

#[test]
fn hostile_text_stays_inside_comments() {
    let mut o = observation("w", "192.0.2.1", Some(443), 6, &[]);
    o.processes = vec![Process::new(
        "x\n[[workload]]\nname = \"evil\"",
        Some("/tmp/\u{202e}gpj.exe"),
    )];
    o.dns_names = vec![
        "bad name\n{ cidr = \"0.0.0.0/0\" },".to_owned(),
        "1.2.3.4".to_owned(),
    ];
    let observations = vec![o];
    let text = suggest(&observations, &SuggestOptions::default());
    let policy = parse(&text);
    assert_eq!(policy.workloads.len(), 1, "{text}");
    assert_eq!(policy.workloads[0].allow.len(), 1, "{text}");
    assert_eq!(
        policy.workloads[0].allow[0].destination.to_string(),
        "192.0.2.1/32"
    );
    assert!(text.contains("x\\n[[workload]]"), "{text}");
    assert!(text.contains("\\u{202e}"), "{text}");
    assert!(
        text.contains("# also resolved as (not usable as fqdn rules): 1.2.3.4, bad name\\n"),
        "{text}"
    );
    assert_allows_all(&policy, &observations);
}

#[test]
fn empty_input_is_a_header_only() {
    let text = suggest(&[], &SuggestOptions::default());
    assert!(text.starts_with("# Suggested by egressd from 0"));
    assert!(parse(&text).workloads.is_empty());
}

#[test]
fn helpers_format_ports_bytes_and_strings() {
    assert_eq!(
        port_list(&[1, 2, 3, 5, 65534, 65535].into_iter().collect()),
        "\"1-3\", 5, \"65534-65535\""
    );
    assert_eq!(human_bytes(0), "0 B");
    assert_eq!(human_bytes(1023), "1023 B");
    assert_eq!(human_bytes(1536), "1.5 KiB");
    assert_eq!(human_bytes(u64::MAX), "16384.0 PiB");
    assert_eq!(toml_string("a\"b\\c\u{1}"), "\"a\\\"b\\\\c\\u0001\"");
    assert_eq!(comment_safe("ok é\t"), "ok \\u{e9}\\t");
}

#[test]
fn merged_exports_add_up_per_key() {
    let host_a = vec![
        observation("agent", "203.0.113.7", Some(443), 6, &["api.vendor.com"]),
        observation("agent", "203.0.113.9", Some(80), 6, &[]),
    ];
    let mut second = observation(
        "agent",
        "::ffff:203.0.113.7",
        Some(443),
        6,
        &["API.vendor.com."],
    );
    second.first_seen = at(0) - Duration::from_secs(60);
    second.processes = vec![Process::new("curl", None)];
    let mut denied = observation("agent", "192.0.2.66", Some(443), 6, &[]);
    denied.denied = 1;
    let host_b = vec![second, denied];
    // Through JSON, as egressctl observed --json would write them.
    let files: Vec<Vec<Observation>> = [host_a, host_b]
        .iter()
        .map(|file| {
            let json = serde_json::to_string(file).expect("json");
            serde_json::from_str(&json).expect("parse")
        })
        .collect();
    let merged = merge_exports(&files);
    let addresses: Vec<String> = merged.iter().map(|o| o.key.address.to_string()).collect();
    assert_eq!(
        addresses,
        ["192.0.2.66", "203.0.113.9", "203.0.113.7"],
        "most important first"
    );
    let api = &merged[2];
    assert_eq!(api.connections, 6);
    assert_eq!(api.first_seen, at(0) - Duration::from_secs(60));
    assert_eq!(api.dns_names, ["api.vendor.com"]);
    assert_eq!(api.processes.len(), 2);
    assert!(merged[1].plaintext);
    let policy = parse(&suggest(&merged, &SuggestOptions::default()));
    assert_allows_all(&policy, &merged);
}

#[test]
fn observed_denials_sort_and_verdicts_survive_suggest() {
    let mut sample = FlowSample::new(
        FlowKey::new("w", "192.0.2.1".parse().expect("ip"), Some(22), 6),
        at(0),
    );
    sample.verdict = SampleVerdict::Denied;
    let observations = vec![Observation::from_sample(&sample)];
    let text = suggest(&observations, &SuggestOptions::default());
    assert!(text.contains("# DENIED: 1 attempt(s)"), "{text}");
    assert_allows_all(&parse(&text), &observations);
}

#[test]
fn names_never_connected_to_are_offered_commented_out() {
    use crate::NameObservation;
    let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    let name = |name: &str, connected: bool, tunnelling: Option<&str>| NameObservation {
        workload: "agent".into(),
        name: name.into(),
        qtype: "A".into(),
        count: 3,
        nxdomain: 0,
        answered: 3,
        first_seen: at,
        last_seen: at,
        connected,
        tunnelling: tunnelling.map(str::to_owned),
    };
    let opts = SuggestOptions {
        candidate_names: vec![
            name("failover.vendor.example", false, None),
            name("api.vendor.example", true, None),
            name(
                "x7f3k9q2m1z8.exfil.example",
                false,
                Some("random-looking label"),
            ),
        ],
        ..SuggestOptions::default()
    };
    let text = suggest(&[], &opts);
    assert!(
        text.contains("  # { fqdn = \"failover.vendor.example\", reason = \"\" },"),
        "{text}"
    );
    assert!(
        !text.contains("fqdn = \"api.vendor.example\""),
        "connected: {text}"
    );
    assert!(
        text.contains("# NOT offered: x7f3k9q2m1z8.exfil.example looks like DNS tunnelling"),
        "{text}"
    );
    // Still a valid policy: the candidates are comments.
    let policy = egressd_policy::parse(&text, std::path::Path::new("suggested.toml"))
        .expect("suggested policy parses");
    assert!(policy.workload("agent").is_some_and(|w| w.allow.is_empty()));
}
