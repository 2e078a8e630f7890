//! Whole-file tests: parsing, diagnostics and matching semantics.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;

use crate::*;

const PATH: &str = "/etc/egressd/policy.toml";

const BRIEF_EXAMPLE: &str = r#"mode = "learning"

[defaults]
unmatched = "allow"
deny = ["169.254.169.254/32"]

[dns]
resolvers = ["127.0.0.53"]
min_ttl = 60
max_ips_per_name = 512
grace = 10

[[workload]]
name = "vendor-agent"
cgroup = "system.slice/vendor-agent.service"
mode = "strict"
raw_sockets = false
allow = [
  { cidr = "10.0.0.0/8", reason = "cluster-internal" },
  { cidr = "127.0.0.2", ports = [8443], protocol = "tcp", reason = "metrics gateway" },
  { fqdn = "region-1.control-plane.vendor.com", ports = [443], reason = "heartbeat" },
  { fqdn = "*.vendor-cdn.com", ports = ["8000-8100"], protocol = "udp", reason = "…" },
]
"#;

fn ok(text: &str) -> Policy {
    match parse(text, Path::new(PATH)) {
        Ok(policy) => policy,
        Err(error) => panic!("policy should parse:\n{error}"),
    }
}

fn errors(text: &str) -> Vec<Diagnostic> {
    match parse(text, Path::new(PATH)) {
        Ok(policy) => panic!("policy should be rejected: {policy:?}"),
        Err(PolicyError::Invalid { diagnostics, path }) => {
            assert_eq!(path, Path::new(PATH));
            assert!(!diagnostics.is_empty());
            diagnostics
        }
        Err(error) => panic!("unexpected error {error:?}"),
    }
}

/// 1-based line and column of the `nth` occurrence of `needle`, computed
/// independently of the crate's SourceMap.
fn position(text: &str, needle: &str, nth: usize) -> (usize, usize) {
    let offset = text
        .match_indices(needle)
        .nth(nth)
        .unwrap_or_else(|| panic!("{needle:?} #{nth} not in text"))
        .0;
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Asserts the file yields exactly one diagnostic, at `needle`, mentioning `message`.
fn assert_error(text: &str, needle: &str, message: &str) {
    let diagnostics = errors(text);
    assert_eq!(diagnostics.len(), 1, "{diagnostics:#?}");
    assert_diagnostic(text, &diagnostics[0], needle, 0, message);
}

fn assert_diagnostic(text: &str, diagnostic: &Diagnostic, needle: &str, nth: usize, message: &str) {
    let (line, column) = position(text, needle, nth);
    assert_eq!(
        (diagnostic.line, diagnostic.column),
        (line, column),
        "position of {needle:?} for {diagnostic:?}"
    );
    assert!(
        diagnostic.message.contains(message),
        "{:?} should mention {message:?}",
        diagnostic.message
    );
}

fn workload_with_rules(rules: &str) -> String {
    format!("[[workload]]\nname = \"w\"\ncgroup = \"w.slice\"\nallow = [\n{rules}\n]\n")
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("ip")
}

fn net(text: &str) -> IpNet {
    text.parse().expect("net")
}

// ---- structure -------------------------------------------------------------

#[test]
fn brief_example_parses_to_the_expected_structure() {
    let policy = ok(BRIEF_EXAMPLE);
    assert_eq!(policy.mode, Mode::Learning);
    assert_eq!(policy.defaults.unmatched, Unmatched::Allow);
    assert_eq!(policy.defaults.deny, vec![net("169.254.169.254/32")]);
    assert_eq!(
        policy.dns,
        DnsSettings {
            resolvers: vec![ip("127.0.0.53")],
            search_domains: None,
            min_ttl: Duration::from_secs(60),
            max_ips_per_name: 512,
            grace: Duration::from_secs(10),
        }
    );
    assert_eq!(policy.source.path, Path::new(PATH));
    assert_eq!(policy.workloads.len(), 1);

    let workload = &policy.workloads[0];
    assert_eq!(workload.name, "vendor-agent");
    assert_eq!(
        workload.cgroup.as_ref().map(CgroupPattern::as_str),
        Some("system.slice/vendor-agent.service")
    );
    assert_eq!(workload.mode, Some(Mode::Strict));
    assert!(!workload.raw_sockets);
    assert_eq!(
        workload.location,
        Location {
            line: 13,
            column: 1
        }
    );
    assert_eq!(policy.effective_file_mode(workload), Mode::Strict);
    assert_eq!(policy.workload("vendor-agent"), Some(workload));
    assert_eq!(policy.workload("other"), None);

    let expected = [
        (
            Destination::Cidr(net("10.0.0.0/8")),
            vec![],
            Protocol::Any,
            "cluster-internal",
            Location {
                line: 19,
                column: 3,
            },
        ),
        (
            Destination::Cidr(net("127.0.0.2/32")),
            vec![PortRange::single(8443)],
            Protocol::Tcp,
            "metrics gateway",
            Location {
                line: 20,
                column: 3,
            },
        ),
        (
            Destination::Fqdn(
                FqdnPattern::parse("region-1.control-plane.vendor.com").expect("fqdn"),
            ),
            vec![PortRange::single(443)],
            Protocol::Any,
            "heartbeat",
            Location {
                line: 21,
                column: 3,
            },
        ),
        (
            Destination::Fqdn(FqdnPattern::parse("*.vendor-cdn.com").expect("fqdn")),
            vec![PortRange {
                first: 8000,
                last: 8100,
            }],
            Protocol::Udp,
            "…",
            Location {
                line: 22,
                column: 3,
            },
        ),
    ];
    assert_eq!(workload.allow.len(), expected.len());
    for (rule, (destination, ports, protocol, reason, location)) in
        workload.allow.iter().zip(expected)
    {
        assert_eq!(
            rule,
            &AllowRule {
                destination,
                ports,
                protocol,
                reason: Some(reason.to_owned()),
                location,
            }
        );
    }
}

#[test]
fn table_array_form_is_equivalent_to_inline_arrays() {
    let tables = r#"mode = "learning"

[defaults]
unmatched = "allow"
deny = ["169.254.169.254/32"]

[dns]
resolvers = ["127.0.0.53"]
min_ttl = "60s"
max_ips_per_name = 512
grace = "10s"

[[workload]]
name = "vendor-agent"
cgroup = "system.slice/vendor-agent.service"
mode = "strict"

[[workload.allow]]
cidr = "10.0.0.0/8"
reason = "cluster-internal"

[[workload.allow]]
cidr = "127.0.0.2"
ports = [8443]
protocol = "tcp"
reason = "metrics gateway"

[[workload.allow]]
fqdn = "region-1.control-plane.vendor.com"
ports = [443]
reason = "heartbeat"

[[workload.allow]]
fqdn = "*.vendor-cdn.com"
ports = ["8000-8100"]
protocol = "udp"
reason = "…"
"#;
    let inline = ok(BRIEF_EXAMPLE);
    let table = ok(tables);
    assert_eq!(table.mode, inline.mode);
    assert_eq!(table.defaults, inline.defaults);
    assert_eq!(table.dns, inline.dns);
    assert_eq!(table.workloads.len(), 1);
    let (a, b) = (&inline.workloads[0], &table.workloads[0]);
    assert_eq!(
        (&a.name, &a.cgroup, a.mode, a.raw_sockets),
        (&b.name, &b.cgroup, b.mode, b.raw_sockets)
    );
    let strip = |rules: &[AllowRule]| -> Vec<_> {
        rules
            .iter()
            .map(|r| {
                (
                    r.destination.clone(),
                    r.ports.clone(),
                    r.protocol,
                    r.reason.clone(),
                )
            })
            .collect()
    };
    assert_eq!(strip(&a.allow), strip(&b.allow));
    // A table-form rule is located at its header.
    assert_eq!(
        b.allow[0].location,
        Location {
            line: 18,
            column: 1
        }
    );
    assert_eq!(
        b.allow[3].location,
        Location {
            line: 33,
            column: 1
        }
    );
}

#[test]
fn empty_file_gets_defaults() {
    let policy = ok("");
    assert_eq!(policy.mode, Mode::Learning);
    assert_eq!(policy.defaults, Defaults::default());
    assert_eq!(policy.defaults.unmatched, Unmatched::Allow);
    assert_eq!(policy.dns, DnsSettings::default());
    assert_eq!(policy.dns.min_ttl, Duration::from_secs(60));
    assert_eq!(policy.dns.max_ips_per_name, 512);
    assert_eq!(policy.dns.grace, Duration::from_secs(10));
    assert!(policy.dns.resolvers.is_empty());
    assert!(policy.workloads.is_empty());
}

#[test]
fn optional_fields_have_defaults() {
    let policy = ok("mode = \"audit\"\n[[workload]]\nname = \"w\"\ncgroup = \"a/b\"\n");
    let workload = &policy.workloads[0];
    assert_eq!(workload.mode, None);
    assert_eq!(policy.effective_file_mode(workload), Mode::Audit);
    assert!(!workload.raw_sockets);
    assert!(workload.allow.is_empty());
    let rule = &ok(&workload_with_rules(r#"{ cidr = "::1" }"#)).workloads[0].allow[0];
    assert_eq!(rule.protocol, Protocol::Any);
    assert!(rule.ports.is_empty());
    assert_eq!(rule.reason, None);
}

#[test]
fn values_are_normalized() {
    let policy = ok(&workload_with_rules(
        r#"{ cidr = "::ffff:10.0.0.0/104" },
{ cidr = "::ffff:192.0.2.1" },
{ cidr = "2001:db8::/32" },
{ fqdn = "API.Example.COM." },
{ cidr = "10.0.0.1", ports = [80, "443", "1000-2000", "7-7"] },"#,
    ));
    let rules = &policy.workloads[0].allow;
    assert_eq!(rules[0].destination, Destination::Cidr(net("10.0.0.0/8")));
    assert_eq!(rules[1].destination, Destination::Cidr(net("192.0.2.1/32")));
    assert_eq!(
        rules[2].destination,
        Destination::Cidr(net("2001:db8::/32"))
    );
    assert_eq!(rules[3].destination.to_string(), "api.example.com");
    assert_eq!(
        rules[4].ports,
        vec![
            PortRange::single(80),
            PortRange::single(443),
            PortRange {
                first: 1000,
                last: 2000
            },
            PortRange::single(7),
        ]
    );
    let deny = ok("[defaults]\ndeny = [\"::ffff:169.254.169.254\"]\n");
    assert_eq!(deny.defaults.deny, vec![net("169.254.169.254/32")]);
}

#[test]
fn dns_durations_accept_seconds_and_humantime() {
    let policy = ok(
        "[dns]\nmin_ttl = \"5m\"\ngrace = 0\nmax_ips_per_name = 65536\nresolvers = [\"::1\", \"10.0.0.2\"]\n",
    );
    assert_eq!(policy.dns.min_ttl, Duration::from_secs(300));
    assert_eq!(policy.dns.grace, Duration::ZERO);
    assert_eq!(policy.dns.max_ips_per_name, 65536);
    assert_eq!(policy.dns.resolvers, vec![ip("::1"), ip("10.0.0.2")]);
    assert_eq!(policy.dns.search_domains, None, "left out: resolv.conf's");
    let policy = ok("[dns]\nsearch_domains = [\"Corp.Example.\", \"svc.cluster.local\"]\n");
    assert_eq!(
        policy.dns.search_domains,
        Some(vec![
            "corp.example".to_owned(),
            "svc.cluster.local".to_owned()
        ])
    );
    let policy = ok("[dns]\nsearch_domains = []\n");
    assert_eq!(policy.dns.search_domains, Some(Vec::new()), "none at all");
    let policy = ok("[dns]\nmin_ttl = \"1m 30s\"\ngrace = \"1500ms\"\n");
    assert_eq!(policy.dns.min_ttl, Duration::from_secs(90));
    assert_eq!(policy.dns.grace, Duration::from_millis(1500));
}

#[test]
fn host_workload_may_omit_cgroup() {
    let policy = ok(
        "[defaults]\nunmatched = \"apply\"\n[[workload]]\nname = \"host\"\nmode = \"audit\"\nallow = [{ cidr = \"0.0.0.0/0\", ports = [53] }]\n",
    );
    assert_eq!(policy.defaults.unmatched, Unmatched::Apply);
    let host = policy.workload(HOST_WORKLOAD).expect("host workload");
    assert_eq!(host.cgroup, None);
    assert_eq!(policy.effective_file_mode(host), Mode::Audit);
}

#[test]
fn source_records_path_and_sha256_of_the_bytes() {
    let policy = ok("");
    assert_eq!(
        policy.source.sha256,
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    let policy = ok("mode = \"strict\"\n");
    assert_eq!(policy.source.sha256.len(), 64);
    assert_ne!(policy.source.sha256, ok("mode = \"audit\"\n").source.sha256);
}

#[test]
fn load_reads_the_file_and_reports_io_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, BRIEF_EXAMPLE).expect("write");
    let policy = load(&path).expect("load");
    assert_eq!(policy.source.path, path);
    assert_eq!(policy, ok(BRIEF_EXAMPLE).with_path(&path));

    std::fs::write(&path, "mode = \"loud\"\n").expect("write");
    let error = load(&path).expect_err("invalid");
    assert_eq!(error.path(), path);
    assert_eq!(error.diagnostics().len(), 1);
    assert!(
        error
            .to_string()
            .starts_with(&format!("{}:1:8: unknown mode", path.display()))
    );

    let missing = dir.path().join("missing.toml");
    match load(&missing) {
        Err(PolicyError::Io { path, source }) => {
            assert_eq!(path, missing);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected an I/O error, got {other:?}"),
    }
}

impl Policy {
    fn with_path(mut self, path: &Path) -> Self {
        self.source.path = path.to_path_buf();
        self
    }
}

#[test]
fn shipped_config_files_parse() {
    let default = ok(include_str!("../../../config/policy.toml"));
    assert_eq!(default.mode, Mode::Learning);
    assert_eq!(default.defaults.unmatched, Unmatched::Allow);
    assert_eq!(default.defaults.deny, vec![net("169.254.169.254/32")]);
    assert!(default.workloads.is_empty());

    let example = ok(include_str!("../../../config/policy.example.toml"));
    assert_eq!(example.mode, Mode::Learning);
    assert_eq!(example.defaults.unmatched, Unmatched::Allow);
    assert_eq!(example.defaults.deny, vec![net("169.254.169.254/32")]);
    let agent = example.workload("vendor-agent").expect("vendor-agent");
    assert_eq!(
        agent.cgroup.as_ref().map(CgroupPattern::as_str),
        Some("system.slice/vendor-agent.service")
    );
    assert!(
        agent
            .allow
            .iter()
            .any(|r| matches!(r.destination, Destination::Fqdn(_)))
    );
    assert!(missing_reasons(&example).is_empty());
}

// ---- diagnostics -------------------------------------------------------------

#[test]
fn syntax_errors_report_their_location() {
    let text = "mode = \"learning\"\n[defaults]\nunmatched = \"allow\nx = 1\n";
    let diagnostics = errors(text);
    assert_eq!(diagnostics.len(), 1);
    assert_eq!((diagnostics[0].line, diagnostics[0].column), (3, 19));
    assert!(
        diagnostics[0].message.contains("string"),
        "{}",
        diagnostics[0].message
    );

    let text = "[[workload]]\nname = \"a\"\nallow = [ { cidr = \"10.0.0.0/8\" ]\n";
    let diagnostics = errors(text);
    assert_eq!(diagnostics.len(), 1);
    assert_eq!(diagnostics[0].line, 3);
}

#[test]
fn wrong_value_types_are_reported_at_the_value() {
    assert_error("[[workload]]\nname = 5\n", "5", "invalid type");
    assert_error(
        "[[workload]]\nname = \"a\"\ncgroup = \"a\"\nraw_sockets = \"yes\"\n",
        "\"yes\"",
        "invalid type",
    );
    assert_error(
        &workload_with_rules(r#"{ cidr = "::1", ports = [1.5] }"#),
        "1.5",
        "port number",
    );
    assert_error("[dns]\nmin_ttl = true\n", "true", "duration string");
}

#[test]
fn unknown_keys_are_errors_naming_the_key() {
    assert_error("mod = \"strict\"\n", "mod", "unknown field `mod`");
    assert_error(
        "[defaults]\nmode = \"strict\"\n",
        "mode",
        "unknown field `mode`",
    );
    assert_error("[dns]\nmin_tll = 5\n", "min_tll", "unknown field `min_tll`");
    assert_error(
        "[[workloads]]\nname = \"a\"\n",
        "workloads",
        "unknown field `workloads`",
    );
    assert_error(
        "[[workload]]\nname = \"a\"\ncgroup = \"a\"\nraw_socket = true\n",
        "raw_socket",
        "unknown field `raw_socket`",
    );
    assert_error(
        &workload_with_rules(r#"{ cidr = "10.0.0.0/8", port = 443 }"#),
        "port",
        "unknown field `port`",
    );
    assert_error(
        "[[workload]]\nname = \"a\"\ncgroup = \"a\"\n[[workload.allow]]\ncidr = \"::1\"\nresaon = \"x\"\n",
        "resaon",
        "unknown field `resaon`",
    );
}

#[test]
fn invalid_modes_list_the_valid_values() {
    assert_error(
        "mode = \"enforce\"\n",
        "\"enforce\"",
        "expected learning, audit or strict",
    );
    assert_error(
        "[[workload]]\nname = \"a\"\ncgroup = \"a\"\nmode = \"Strict\"\n",
        "\"Strict\"",
        "expected learning, audit or strict",
    );
    assert_error(
        "[defaults]\nunmatched = \"deny\"\n",
        "\"deny\"",
        "expected allow or apply",
    );
}

#[test]
fn workload_names_are_required_valid_and_unique() {
    let text = "[[workload]]\ncgroup = \"a\"\n";
    assert_error(text, "[[workload]]", "workload has no name");
    let diagnostics = errors("[[workload]]\nmode = \"audit\"\n");
    let messages: Vec<_> = diagnostics.iter().map(|d| d.message.as_str()).collect();
    assert_eq!(messages[0], "workload has no name");
    assert!(
        messages[1].starts_with("workload has no cgroup"),
        "{messages:?}"
    );
    let text = "[[workload]]\nname = \"\"\ncgroup = \"a\"\n";
    assert_error(text, "\"\"", "invalid workload name");
    let text = "[[workload]]\nname = \"my agent\"\ncgroup = \"a\"\n";
    assert_error(text, "\"my agent\"", "invalid workload name \"my agent\"");
    let long = "a".repeat(65);
    let text = format!("[[workload]]\nname = \"{long}\"\ncgroup = \"a\"\n");
    assert_error(&text, &format!("\"{long}\""), "1 to 64");
    ok(&format!(
        "[[workload]]\nname = \"{}\"\ncgroup = \"a\"\n",
        &long[..64]
    ));
    ok("[[workload]]\nname = \"A-z_0.9\"\ncgroup = \"a\"\n");

    let text = "[[workload]]\nname = \"dup\"\ncgroup = \"a\"\n\n[[workload]]\nname = \"dup\"\ncgroup = \"b\"\n";
    let diagnostics = errors(text);
    assert_eq!(diagnostics.len(), 1);
    assert_diagnostic(
        text,
        &diagnostics[0],
        "\"dup\"",
        1,
        "duplicate workload name \"dup\" (first defined at line 2)",
    );
}

#[test]
fn every_workload_but_host_needs_a_cgroup() {
    let text = "[[workload]]\nname = \"agent\"\nmode = \"strict\"\n";
    assert_error(text, "[[workload]]", "workload \"agent\" has no cgroup");
}

#[test]
fn invalid_cgroups_are_reported_at_the_value() {
    let cases = [
        (
            "/sys/fs/cgroup/system.slice/x.service",
            "without the leading '/'",
        ),
        ("system.slice/", "end with '/'"),
        ("a//b", "empty path segment"),
        ("a/../b", "\"..\" segments"),
        ("a/./b", "\".\" segments"),
        ("a/b**", "whole path segment"),
        ("", "empty cgroup path"),
    ];
    for (cgroup, message) in cases {
        let text = format!("[[workload]]\nname = \"a\"\ncgroup = \"{cgroup}\"\n");
        assert_error(&text, &format!("\"{cgroup}\""), message);
    }
}

#[test]
fn too_many_workloads_are_rejected() {
    let mut text = String::new();
    for i in 0..=MAX_WORKLOADS {
        text.push_str(&format!(
            "[[workload]]\nname = \"w{i}\"\ncgroup = \"w{i}.slice\"\n"
        ));
    }
    let diagnostics = errors(&text);
    assert_eq!(diagnostics.len(), 1);
    assert_diagnostic(
        &text,
        &diagnostics[0],
        "[[workload]]",
        MAX_WORKLOADS,
        "at most 4000",
    );

    let limit: String = text.split_inclusive('\n').take(3 * MAX_WORKLOADS).collect();
    assert_eq!(ok(&limit).workloads.len(), MAX_WORKLOADS);
}

#[test]
fn allow_rules_need_exactly_one_destination() {
    let text = workload_with_rules(r#"  { ports = [443], reason = "nothing" },"#);
    assert_error(&text, "{ ports", "exactly one of cidr or fqdn");
    let text = workload_with_rules(r#"  { cidr = "10.0.0.0/8", fqdn = "a.example.com" },"#);
    assert_error(&text, "\"a.example.com\"", "both cidr and fqdn");
    let text = "[[workload]]\nname = \"a\"\ncgroup = \"a\"\n[[workload.allow]]\nreason = \"x\"\n";
    assert_error(text, "[[workload.allow]]", "exactly one of cidr or fqdn");
}

#[test]
fn invalid_cidrs_are_explained() {
    let text = workload_with_rules(r#"  { cidr = "10.0.0.1/8" },"#);
    assert_error(&text, "\"10.0.0.1/8\"", "did you mean 10.0.0.0/8?");
    let text = workload_with_rules(r#"  { cidr = "2001:db8::1/32" },"#);
    assert_error(&text, "\"2001:db8::1/32\"", "did you mean 2001:db8::/32?");
    let text = workload_with_rules(r#"  { cidr = "10.0.0.0/40" },"#);
    assert_error(&text, "\"10.0.0.0/40\"", "0 to 32");
    let text = workload_with_rules(r#"  { cidr = "example.com" },"#);
    assert_error(
        &text,
        "\"example.com\"",
        "invalid allow cidr \"example.com\"",
    );
    assert_error(
        "[defaults]\ndeny = [\"169.254.169.254/16\"]\n",
        "\"169.254.169.254/16\"",
        "did you mean 169.254.0.0/16?",
    );
}

#[test]
fn invalid_ports_are_explained() {
    let cases = [
        ("[]", "[]", "omit ports to allow all ports"),
        ("[0]", "0]", "port 0 is out of range"),
        ("[65536]", "65536", "port 65536 is out of range"),
        ("[-1]", "-1", "port -1 is out of range"),
        ("[\"100-50\"]", "\"100-50\"", "reversed"),
        ("[\"http\"]", "\"http\"", "invalid port \"http\""),
        ("[\"1-70000\"]", "\"1-70000\"", "70000 is out of range"),
        ("[\"1-\"]", "\"1-\"", "invalid port"),
    ];
    for (ports, needle, message) in cases {
        let text = workload_with_rules(&format!("  {{ cidr = \"10.0.0.0/8\", ports = {ports} }},"));
        assert_error(&text, needle, message);
    }
    ok(&workload_with_rules(
        r#"{ cidr = "::1", ports = [1, 65535, "1-65535"] }"#,
    ));
}

#[test]
fn invalid_protocols_and_icmp_ports_are_reported() {
    let text = workload_with_rules(r#"  { cidr = "10.0.0.0/8", protocol = "sctp" },"#);
    assert_error(&text, "\"sctp\"", "expected tcp, udp, icmp or any");
    let text = workload_with_rules(r#"  { cidr = "10.0.0.0/8", protocol = "icmp", ports = [8] },"#);
    assert_error(&text, "[8]", "ICMP has no ports");
    ok(&workload_with_rules(
        r#"{ cidr = "10.0.0.0/8", protocol = "icmp" }"#,
    ));
}

#[test]
fn invalid_fqdns_are_explained() {
    let cases = [
        ("*", "alone"),
        ("*.", "alone"),
        ("a.*.example.com", "whole first label"),
        ("*example.com", "whole first label"),
        ("a..example.com", "empty label"),
        ("exa_mple!.com", "invalid character '!'"),
        ("10.0.0.1", "use a cidr rule"),
    ];
    for (fqdn, message) in cases {
        let text = workload_with_rules(&format!("  {{ fqdn = \"{fqdn}\" }},"));
        assert_error(&text, &format!("\"{fqdn}\""), message);
    }
    let long = format!("{}.com", "a".repeat(64));
    let text = workload_with_rules(&format!("  {{ fqdn = \"{long}\" }},"));
    assert_error(&text, &format!("\"{long}\""), "at most 63");
}

#[test]
fn invalid_dns_settings_are_reported() {
    assert_error(
        "[dns]\nmin_ttl = -5\n",
        "-5",
        "min_ttl must not be negative",
    );
    assert_error(
        "[dns]\ngrace = \"soon\"\n",
        "\"soon\"",
        "invalid grace \"soon\"",
    );
    assert_error("[dns]\ngrace = 1.5\n", "1.5", "whole seconds");
    assert_error("[dns]\nmax_ips_per_name = 0\n", "0", "expected 1 to 65536");
    assert_error(
        "[dns]\nmax_ips_per_name = 65537\n",
        "65537",
        "expected 1 to 65536",
    );
    assert_error(
        "[dns]\nsearch_domains = [\"*.corp.example\"]\n",
        "\"*.corp.example\"",
        "without a wildcard",
    );
    assert_error(
        "[dns]\nsearch_domains = [\"corp..example\"]\n",
        "\"corp..example\"",
        "empty label",
    );
    assert_error(
        "[dns]\nresolvers = [\"127.0.0.53:53\"]\n",
        "\"127.0.0.53:53\"",
        "expected an IP address",
    );
}

#[test]
fn all_semantic_errors_are_reported_at_once_in_file_order() {
    let text = r#"mode = "enforcing"

[[workload]]
name = "bad name"
cgroup = "/system.slice/a.service"
mode = "strict"
allow = [
  { cidr = "10.0.0.1/8" },
  { fqdn = "*", ports = [] },
  { cidr = "10.0.0.0/8", protocol = "icmp", ports = [7] },
]

[[workload]]
name = "ok"
cgroup = "a"

[[workload]]
name = "ok"
cgroup = "b/**x"

[defaults]
unmatched = "maybe"
deny = ["1.2.3.4/0"]

[dns]
min_ttl = -1
max_ips_per_name = 0
"#;
    let diagnostics = errors(text);
    let expected = [
        ("\"enforcing\"", 0, "unknown mode"),
        ("\"bad name\"", 0, "invalid workload name"),
        ("\"/system.slice/a.service\"", 0, "leading '/'"),
        ("\"10.0.0.1/8\"", 0, "did you mean 10.0.0.0/8?"),
        ("\"*\"", 0, "alone"),
        ("[]", 0, "omit ports"),
        ("[7]", 0, "ICMP has no ports"),
        ("\"ok\"", 1, "duplicate workload name"),
        ("\"b/**x\"", 0, "whole path segment"),
        ("\"maybe\"", 0, "expected allow or apply"),
        ("\"1.2.3.4/0\"", 0, "did you mean 0.0.0.0/0?"),
        ("-1", 0, "must not be negative"),
        ("= 0", 0, "max_ips_per_name"),
    ];
    assert_eq!(diagnostics.len(), expected.len(), "{diagnostics:#?}");
    for (diagnostic, (needle, nth, message)) in diagnostics.iter().zip(expected) {
        let needle_offset = if needle == "= 0" { 2 } else { 0 };
        let (line, column) = position(text, needle, nth);
        assert_eq!(
            (diagnostic.line, diagnostic.column),
            (line, column + needle_offset),
            "{diagnostic:?}"
        );
        assert!(
            diagnostic.message.contains(message),
            "{diagnostic:?} should mention {message:?}"
        );
    }

    // Display: one `PATH:LINE:COLUMN: message` line per diagnostic.
    let error = parse(text, Path::new(PATH)).expect_err("invalid");
    let rendered = error.to_string();
    assert_eq!(rendered.lines().count(), expected.len());
    assert!(
        rendered
            .lines()
            .next()
            .is_some_and(|l| l.starts_with("/etc/egressd/policy.toml:1:8: unknown mode"))
    );
    assert!(
        rendered
            .lines()
            .all(|line| line.starts_with("/etc/egressd/policy.toml:"))
    );
}

#[test]
fn missing_reasons_lists_rules_without_a_reason() {
    let text = r#"[[workload]]
name = "a"
cgroup = "a"
allow = [
  { cidr = "10.0.0.0/8", reason = "cluster" },
  { cidr = "192.0.2.0/24" },
  { fqdn = "api.example.com", reason = "  " },
]
"#;
    let policy = ok(text);
    let missing = missing_reasons(&policy);
    assert_eq!(missing.len(), 2);
    assert_diagnostic(
        text,
        &missing[0],
        "{ cidr = \"192",
        0,
        "192.0.2.0/24 in workload \"a\" has no reason",
    );
    assert_diagnostic(text, &missing[1], "{ fqdn", 0, "api.example.com");
    assert!(missing_reasons(&ok(BRIEF_EXAMPLE)).is_empty());
}

// ---- matching semantics ------------------------------------------------------

fn matcher() -> (Policy, Workload) {
    let policy = ok(r#"[defaults]
deny = ["169.254.169.254/32", "10.9.0.0/16", "2001:db8:dead::/48"]

[[workload]]
name = "w"
cgroup = "w.slice"
allow = [
  { cidr = "10.0.0.0/8" },
  { cidr = "192.0.2.10", ports = [443], protocol = "tcp" },
  { cidr = "192.0.2.20", ports = ["8000-8100", 53], protocol = "udp" },
  { cidr = "192.0.2.30", protocol = "icmp" },
  { cidr = "192.0.2.40", ports = [22] },
  { cidr = "2001:db8::/32", ports = [443] },
  { cidr = "169.254.0.0/16" },
  { fqdn = "*.example.com" },
]
"#);
    let workload = policy.workloads[0].clone();
    (policy, workload)
}

#[test]
fn allows_matches_v4_cidrs_and_ports() {
    let (policy, w) = matcher();
    let deny = &policy.defaults.deny;
    assert!(w.allows(deny, ip("10.1.2.3"), IPPROTO_TCP, Some(1)));
    assert!(w.allows(deny, ip("10.255.255.255"), IPPROTO_UDP, Some(65535)));
    assert!(w.allows(deny, ip("10.1.2.3"), IPPROTO_ICMP, None));
    assert!(!w.allows(deny, ip("11.0.0.1"), IPPROTO_TCP, Some(443)));

    assert!(w.allows(deny, ip("192.0.2.10"), IPPROTO_TCP, Some(443)));
    assert!(!w.allows(deny, ip("192.0.2.10"), IPPROTO_TCP, Some(444)));
    assert!(!w.allows(deny, ip("192.0.2.10"), IPPROTO_UDP, Some(443)));
    assert!(!w.allows(deny, ip("192.0.2.11"), IPPROTO_TCP, Some(443)));

    assert!(w.allows(deny, ip("192.0.2.20"), IPPROTO_UDP, Some(8000)));
    assert!(w.allows(deny, ip("192.0.2.20"), IPPROTO_UDP, Some(8050)));
    assert!(w.allows(deny, ip("192.0.2.20"), IPPROTO_UDP, Some(8100)));
    assert!(w.allows(deny, ip("192.0.2.20"), IPPROTO_UDP, Some(53)));
    assert!(!w.allows(deny, ip("192.0.2.20"), IPPROTO_UDP, Some(7999)));
    assert!(!w.allows(deny, ip("192.0.2.20"), IPPROTO_UDP, Some(8101)));
    assert!(!w.allows(deny, ip("192.0.2.20"), IPPROTO_TCP, Some(8050)));
}

#[test]
fn allows_honours_protocols_and_portless_packets() {
    let (policy, w) = matcher();
    let deny = &policy.defaults.deny;
    assert!(w.allows(deny, ip("192.0.2.30"), IPPROTO_ICMP, None));
    assert!(w.allows(deny, ip("192.0.2.30"), IPPROTO_ICMPV6, None));
    assert!(!w.allows(deny, ip("192.0.2.30"), IPPROTO_TCP, Some(80)));
    // protocol any with ports: TCP and UDP on that port, never ICMP (no port).
    assert!(w.allows(deny, ip("192.0.2.40"), IPPROTO_TCP, Some(22)));
    assert!(w.allows(deny, ip("192.0.2.40"), IPPROTO_UDP, Some(22)));
    assert!(!w.allows(deny, ip("192.0.2.40"), IPPROTO_ICMP, None));
    assert!(!w.allows(deny, ip("192.0.2.10"), IPPROTO_TCP, None));
}

#[test]
fn allows_matches_v6_and_v4_mapped_destinations() {
    let (policy, w) = matcher();
    let deny = &policy.defaults.deny;
    assert!(w.allows(deny, ip("2001:db8::1"), IPPROTO_TCP, Some(443)));
    assert!(!w.allows(deny, ip("2001:db8::1"), IPPROTO_TCP, Some(80)));
    assert!(!w.allows(deny, ip("2001:db9::1"), IPPROTO_TCP, Some(443)));
    assert!(w.allows(deny, ip("::ffff:10.1.2.3"), IPPROTO_TCP, Some(80)));
    assert!(w.allows(deny, ip("::ffff:192.0.2.10"), IPPROTO_TCP, Some(443)));
    assert!(!w.allows(deny, ip("::ffff:192.0.2.10"), IPPROTO_TCP, Some(80)));
    // An IPv4 prefix does not cover IPv6 addresses that are not v4-mapped.
    assert!(!w.allows(deny, ip("::a01:203"), IPPROTO_TCP, Some(80)));
    // A v4-mapped rule was normalized, so plain IPv4 matches it too.
    let mapped = ok(&workload_with_rules(
        r#"{ cidr = "::ffff:198.51.100.0/120" }"#,
    ));
    assert!(mapped.workloads[0].allows(&[], ip("198.51.100.7"), IPPROTO_TCP, Some(1)));
    assert!(mapped.workloads[0].allows(&[], ip("::ffff:198.51.100.7"), IPPROTO_TCP, Some(1)));
}

#[test]
fn deny_list_wins_over_allow_rules() {
    let (policy, w) = matcher();
    let deny = &policy.defaults.deny;
    assert!(w.allows(deny, ip("169.254.1.1"), IPPROTO_TCP, Some(80)));
    assert!(!w.allows(deny, ip("169.254.169.254"), IPPROTO_TCP, Some(80)));
    assert!(!w.allows(deny, ip("::ffff:169.254.169.254"), IPPROTO_TCP, Some(80)));
    assert!(!w.allows(deny, ip("10.9.1.1"), IPPROTO_TCP, Some(80)));
    assert!(w.allows(&[], ip("10.9.1.1"), IPPROTO_TCP, Some(80)));
    assert!(!w.allows(deny, ip("2001:db8:dead::1"), IPPROTO_TCP, Some(443)));
    assert!(!policy.allows(&w, ip("169.254.169.254"), IPPROTO_TCP, Some(80)));
    assert!(policy.allows(&w, ip("10.1.1.1"), IPPROTO_TCP, Some(80)));
}

#[test]
fn fqdn_rules_are_not_matched_by_address() {
    let w = ok(&workload_with_rules(r#"{ fqdn = "*.example.com" }"#)).workloads[0].clone();
    assert!(!w.allows(&[], ip("93.184.216.34"), IPPROTO_TCP, Some(443)));
    match &w.allow[0].destination {
        Destination::Fqdn(pattern) => {
            assert!(pattern.matches("www.EXAMPLE.com."));
            assert!(!pattern.matches("example.com"));
        }
        other => panic!("expected an fqdn rule, got {other:?}"),
    }
}

#[test]
fn workloads_match_cgroups_through_their_patterns() {
    let policy = ok(r#"[[workload]]
name = "services"
cgroup = "system.slice/*.service"
[[workload]]
name = "pods"
cgroup = "kubepods/**"
[[workload]]
name = "nested"
cgroup = "a/**/b"
"#);
    let pattern = |name: &str| {
        policy
            .workload(name)
            .and_then(|w| w.cgroup.clone())
            .expect("cgroup")
    };
    assert!(pattern("services").matches("system.slice/ssh.service"));
    assert!(!pattern("services").matches("system.slice/ssh.service/x"));
    assert!(pattern("pods").matches("kubepods/besteffort/pod1"));
    assert!(pattern("nested").matches("a/b"));
    assert!(pattern("nested").matches("a/x/y/b"));
    assert_eq!(pattern("nested").literal_prefix(), "a");
}

#[test]
fn metrics_section_defaults_and_overrides() {
    let default = ok("");
    assert!(default.metrics.enabled);
    assert_eq!(default.metrics.listen, MetricsSettings::DEFAULT_LISTEN);
    let custom = ok("[metrics]\nenabled = false\nlisten = \"[::1]:9500\"\n");
    assert!(!custom.metrics.enabled);
    assert_eq!(custom.metrics.listen, "[::1]:9500".parse().expect("addr"));
    assert_error(
        "[metrics]\nlisten = \"localhost\"\n",
        "\"localhost\"",
        "invalid metrics listen address",
    );
}

#[test]
fn syntax_errors_print_on_one_line_each() {
    // Found by fuzzing: the toml crate's syntax errors span two lines.
    for text in ["e=e", "[[a]"] {
        let error = parse(text, Path::new("broken.toml")).expect_err("syntax error");
        let printed = error.to_string();
        assert_eq!(printed.lines().count(), 1, "{printed:?}");
        assert!(printed.starts_with("broken.toml:1:"), "{printed:?}");
    }
}

#[test]
fn observe_section_defaults_overrides_and_errors() {
    let default = ok("");
    assert_eq!(default.observe, ObserveSettings::default());
    assert_eq!(default.observe.flush_interval, Duration::from_secs(5));
    let custom = ok(
        "[observe]\nenabled = false\nflush_interval = \"1s\"\nretention_days = 3\nmax_rows = 500\n",
    );
    assert!(!custom.observe.enabled);
    assert_eq!(custom.observe.flush_interval, Duration::from_secs(1));
    assert_eq!(custom.observe.retention_days, 3);
    assert_eq!(custom.observe.max_rows, 500);
    for (text, needle, expected) in [
        (
            "[observe]\nretention_days = -1\n",
            "-1",
            "retention_days = -1 must not be negative",
        ),
        (
            "[observe]\nmax_rows = -5\n",
            "-5",
            "max_rows = -5 must not be negative",
        ),
        (
            "[observe]\nflush_interval = \"2h\"\n",
            "\"2h\"",
            "flush_interval = 7200s is out of range",
        ),
        (
            "[observe]\nflush_interval = \"soon\"\n",
            "\"soon\"",
            "invalid flush_interval \"soon\"",
        ),
        (
            "[observe]\nretention = 3\n",
            "retention",
            "unknown field `retention`",
        ),
    ] {
        assert_error(text, needle, expected);
    }
}

#[test]
fn daemon_on_stop_defaults_to_keep() {
    assert_eq!(ok("").daemon.on_stop, OnStop::Keep);
    assert_eq!(
        ok("[daemon]\non_stop = \"detach\"\n").daemon.on_stop,
        OnStop::Detach
    );
    assert_error(
        "[daemon]\non_stop = \"unload\"\n",
        "\"unload\"",
        "invalid on_stop \"unload\": expected \"keep\" or \"detach\"",
    );
}

#[test]
fn limits_on_full_defaults_to_deny() {
    assert_eq!(ok("").limits.on_full, OnFull::Deny);
    assert_eq!(
        ok("[limits]\non_full = \"allow\"\n").limits.on_full,
        OnFull::Allow
    );
    assert_eq!(
        ok("[limits]\non_full = \"deny\"\n").limits.on_full,
        OnFull::Deny
    );
    assert_error(
        "[limits]\non_full = \"open\"\n",
        "\"open\"",
        "invalid on_full \"open\": expected \"deny\" or \"allow\"",
    );
    assert_error(
        "[limits]\nallow_entries = 3\n",
        "allow_entries",
        "unknown field `allow_entries`",
    );
}

#[test]
fn control_read_group_by_name_or_gid() {
    assert_eq!(ok("").control, ControlSettings::default());
    let text = "mode = \"strict\"\n\n[control]\nread_group = \"egressd-readers\"\n";
    let by_name = ok(text).control.read_group.expect("a read group");
    assert_eq!(by_name.group, GroupRef::Name("egressd-readers".to_owned()));
    let (line, column) = position(text, "\"egressd-readers\"", 0);
    assert_eq!(
        (by_name.location.line, by_name.location.column),
        (line, column),
        "the daemon reports an unknown group at the value"
    );
    for (value, expected) in [
        ("1042", GroupRef::Id(1042)),
        ("\"1042\"", GroupRef::Id(1042)),
        ("0", GroupRef::Id(0)),
        ("\"build$\"", GroupRef::Name("build$".to_owned())),
        (
            "\"Domain.Users_1\"",
            GroupRef::Name("Domain.Users_1".to_owned()),
        ),
    ] {
        let policy = ok(&format!("[control]\nread_group = {value}\n"));
        assert_eq!(
            policy.control.read_group.map(|setting| setting.group),
            Some(expected),
            "{value}"
        );
    }
}

#[test]
fn control_read_group_errors_name_the_value() {
    for (text, needle, expected) in [
        (
            "[control]\nread_group = -1\n",
            "-1",
            "read_group: GID -1 is out of range: expected 0 to 4294967294",
        ),
        (
            "[control]\nread_group = 4294967295\n",
            "4294967295",
            "read_group: GID 4294967295 is out of range",
        ),
        (
            "[control]\nread_group = \"99999999999\"\n",
            "\"99999999999\"",
            "read_group: GID 99999999999 is out of range",
        ),
        (
            "[control]\nread_group = \"\"\n",
            "\"\"",
            "read_group: invalid group name \"\"",
        ),
        (
            "[control]\nread_group = \"wheel group\"\n",
            "\"wheel group\"",
            "read_group: invalid group name \"wheel group\"",
        ),
        (
            "[control]\nread_group = \"-x\"\n",
            "\"-x\"",
            "read_group: invalid group name \"-x\"",
        ),
        (
            "[control]\nread_group = \"a-name-that-is-much-longer-than-32-chars\"\n",
            "\"a-name",
            "read_group: invalid group name",
        ),
        (
            "[control]\nread_group = true\n",
            "true",
            "expected a group name or a numeric GID",
        ),
        (
            "[control]\nwrite_group = \"adm\"\n",
            "write_group",
            "unknown field `write_group`",
        ),
    ] {
        assert_error(text, needle, expected);
    }
}

#[test]
fn dns_queries_defaults_to_any() {
    let policy = ok("[[workload]]\nname = \"a\"\ncgroup = \"a\"\n");
    assert_eq!(policy.workloads[0].dns_queries, DnsQueries::Any);
    let policy = ok("[[workload]]\nname = \"a\"\ncgroup = \"a\"\ndns_queries = \"allowlisted\"\n");
    assert_eq!(policy.workloads[0].dns_queries, DnsQueries::Allowlisted);
    assert_error(
        "[[workload]]\nname = \"a\"\ncgroup = \"a\"\ndns_queries = \"some\"\n",
        "\"some\"",
        "invalid dns_queries \"some\": expected \"any\" or \"allowlisted\"",
    );
}
