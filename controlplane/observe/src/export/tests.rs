use std::path::Path;

use serde::Deserialize;
use serde_yaml_ng::Value;

use super::*;

const POLICY: &str = r#"
[defaults]
deny = ["169.254.169.254/32", "10.96.0.0/12", "192.0.2.0/24"]

[[workload]]
name = "vendor-agent"
cgroup = "system.slice/vendor-agent.service"
allow = [
  { cidr = "10.0.0.0/8", reason = "cluster-internal" },
  { cidr = "192.0.2.128/25", reason = "inside the deny list" },
  { cidr = "2001:db8::/32", ports = [8443], protocol = "tcp", reason = "v6 gateway" },
  { cidr = "198.51.100.7", ports = ["8000-8100"], protocol = "udp", reason = "downloads" },
  { cidr = "198.51.100.8", ports = [3868], reason = "any protocol" },
  { cidr = "198.51.100.9", protocol = "tcp", reason = "all tcp ports" },
  { cidr = "198.51.100.10", protocol = "icmp", reason = "ping" },
  { fqdn = "region-1.control-plane.vendor.com", ports = [443], reason = "heartbeat" },
  { fqdn = "*.vendor-cdn.com", ports = [443], protocol = "tcp", reason = "cdn\nsneaky" },
]

[[workload]]
name = "Backup_Job"
cgroup = "system.slice/backup.service"

[[workload]]
name = "host"
allow = [{ cidr = "0.0.0.0/0", reason = "node" }]
"#;

fn policy() -> Policy {
    egressd_policy::parse(POLICY, Path::new("/etc/egressd/policy.toml")).expect("policy")
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|document| Value::deserialize(document).expect("YAML parses back"))
        .collect()
}

/// `path`: keys and list indices separated by spaces (keys contain dots).
fn get<'a>(value: &'a Value, path: &str) -> &'a Value {
    path.split(' ')
        .fold(value, |value, key| match key.parse::<usize>() {
            Ok(index) => value
                .get(index)
                .unwrap_or_else(|| panic!("no [{index}] in {value:?}")),
            Err(_) => value
                .get(key)
                .unwrap_or_else(|| panic!("no {key:?} in {value:?}")),
        })
}

fn string<'a>(value: &'a Value, path: &str) -> &'a str {
    get(value, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string"))
}

fn seq<'a>(value: &'a Value, path: &str) -> &'a Vec<Value> {
    get(value, path)
        .as_sequence()
        .unwrap_or_else(|| panic!("{path} is not a list"))
}

#[test]
fn network_policy_has_the_required_fields() {
    let yaml = export(&policy(), ExportFormat::Kubernetes, None, "vendor").expect("export");
    let docs = documents(&yaml);
    assert_eq!(docs.len(), 2, "{yaml}");
    for doc in &docs {
        assert_eq!(string(doc, "apiVersion"), "networking.k8s.io/v1");
        assert_eq!(string(doc, "kind"), "NetworkPolicy");
        assert_eq!(string(doc, "metadata namespace"), "vendor");
        assert!(get(doc, "spec podSelector matchLabels").is_mapping());
        assert_eq!(seq(doc, "spec policyTypes"), &[Value::from("Egress")]);
        // DNS to kube-dns first, as egressd allows DNS to its resolvers.
        assert_eq!(
            string(doc, "spec egress 0 to 0 podSelector matchLabels k8s-app"),
            "kube-dns"
        );
        assert_eq!(
            string(
                doc,
                "spec egress 0 to 0 namespaceSelector matchLabels kubernetes.io/metadata.name"
            ),
            "kube-system"
        );
    }
    let agent = &docs[0];
    assert_eq!(string(agent, "metadata name"), "egressd-vendor-agent");
    assert_eq!(
        string(agent, "spec podSelector matchLabels app"),
        "vendor-agent"
    );
    let backup = &docs[1];
    assert_eq!(string(backup, "metadata name"), "egressd-backup-job");
    assert_eq!(
        string(backup, "spec podSelector matchLabels app"),
        "Backup_Job"
    );
    assert_eq!(
        seq(backup, "spec egress").len(),
        1,
        "only DNS: everything else is denied"
    );
}

#[test]
fn network_policy_rules_map_cidrs_ports_and_the_deny_list() {
    let yaml = export(
        &policy(),
        ExportFormat::Kubernetes,
        Some("vendor-agent"),
        "default",
    )
    .expect("export");
    let docs = documents(&yaml);
    assert_eq!(docs.len(), 1);
    let egress = seq(&docs[0], "spec egress");
    let rules: Vec<String> = egress[1..]
        .iter()
        .map(|rule| serde_json::to_string(rule).expect("json"))
        .collect();
    assert_eq!(
        rules,
        [
            r#"{"to":[{"ipBlock":{"cidr":"10.0.0.0/8","except":["10.96.0.0/12"]}}]}"#,
            r#"{"to":[{"ipBlock":{"cidr":"2001:db8::/32"}}],"ports":[{"protocol":"TCP","port":8443}]}"#,
            r#"{"to":[{"ipBlock":{"cidr":"198.51.100.7/32"}}],"ports":[{"protocol":"UDP","port":8000,"endPort":8100}]}"#,
            r#"{"to":[{"ipBlock":{"cidr":"198.51.100.8/32"}}],"ports":[{"protocol":"TCP","port":3868},{"protocol":"UDP","port":3868},{"protocol":"SCTP","port":3868}]}"#,
            r#"{"to":[{"ipBlock":{"cidr":"198.51.100.9/32"}}],"ports":[{"protocol":"TCP"}]}"#,
        ]
    );
    // What cannot be expressed is listed in comments, with reasons, safely.
    for expected in [
        "# egressd workload \"vendor-agent\" from /etc/egressd/policy.toml (sha256 ",
        "# not expressible in a NetworkPolicy (DNS names):\n#   region-1.control-plane.vendor.com ports 443 any (reason: heartbeat)\n#   *.vendor-cdn.com ports 443 tcp (reason: cdn\\nsneaky)\n",
        "# not expressible in a NetworkPolicy (ICMP):\n#   198.51.100.10/32 icmp (reason: ping)\n",
        "# left out: entirely inside the deny list:\n#   192.0.2.128/25 any",
    ] {
        assert!(yaml.contains(expected), "missing {expected:?} in:\n{yaml}");
    }
    assert_eq!(
        string(&docs[0], "metadata annotations egressd.io/policy-sha256"),
        policy().source.sha256
    );
}

#[test]
fn cilium_policy_has_the_required_fields_and_rules() {
    let yaml = export(&policy(), ExportFormat::Cilium, None, "vendor").expect("export");
    let docs = documents(&yaml);
    assert_eq!(docs.len(), 2, "{yaml}");
    for doc in &docs {
        assert_eq!(string(doc, "apiVersion"), "cilium.io/v2");
        assert_eq!(string(doc, "kind"), "CiliumNetworkPolicy");
        assert!(!string(doc, "metadata name").is_empty());
        assert_eq!(string(doc, "metadata namespace"), "vendor");
        assert!(get(doc, "spec endpointSelector matchLabels app").is_string());
        let dns = get(doc, "spec egress 0");
        assert_eq!(
            string(dns, "toEndpoints 0 matchLabels k8s:k8s-app"),
            "kube-dns"
        );
        assert_eq!(
            string(
                dns,
                "toEndpoints 0 matchLabels k8s:io.kubernetes.pod.namespace"
            ),
            "kube-system"
        );
        assert_eq!(string(dns, "toPorts 0 ports 0 port"), "53");
        assert_eq!(string(dns, "toPorts 0 ports 0 protocol"), "UDP");
        assert_eq!(string(dns, "toPorts 0 ports 1 protocol"), "TCP");
        assert_eq!(string(dns, "toPorts 0 rules dns 0 matchPattern"), "*");
        assert_eq!(seq(doc, "spec egressDeny 0 toCIDR").len(), 3);
    }
    let rules: Vec<String> = seq(&docs[0], "spec egress")[1..]
        .iter()
        .map(|rule| serde_json::to_string(rule).expect("json"))
        .collect();
    assert_eq!(
        rules,
        [
            r#"{"toCIDR":["10.0.0.0/8"]}"#,
            r#"{"toCIDR":["192.0.2.128/25"]}"#,
            r#"{"toCIDR":["2001:db8::/32"],"toPorts":[{"ports":[{"port":"8443","protocol":"TCP"}]}]}"#,
            r#"{"toCIDR":["198.51.100.7/32"],"toPorts":[{"ports":[{"port":"8000","endPort":8100,"protocol":"UDP"}]}]}"#,
            r#"{"toCIDR":["198.51.100.8/32"],"toPorts":[{"ports":[{"port":"3868","protocol":"ANY"}]}]}"#,
            r#"{"toCIDR":["198.51.100.9/32"],"toPorts":[{"ports":[{"port":"0","protocol":"TCP"}]}]}"#,
            r#"{"toFQDNs":[{"matchName":"region-1.control-plane.vendor.com"}],"toPorts":[{"ports":[{"port":"443","protocol":"ANY"}]}]}"#,
            r#"{"toFQDNs":[{"matchPattern":"*.vendor-cdn.com"}],"toPorts":[{"ports":[{"port":"443","protocol":"TCP"}]}]}"#,
        ]
    );
    assert!(yaml.contains("# Cilium's `*` matches one label"), "{yaml}");
    assert!(
        yaml.contains("198.51.100.10/32 icmp (reason: ping)"),
        "{yaml}"
    );
}

#[test]
fn the_host_workload_is_only_exported_when_named() {
    let yaml =
        export(&policy(), ExportFormat::Kubernetes, Some("host"), "default").expect("export");
    let docs = documents(&yaml);
    assert_eq!(docs.len(), 1);
    assert_eq!(
        string(&docs[0], "spec egress 1 to 0 ipBlock cidr"),
        "0.0.0.0/0"
    );
    let except = seq(&docs[0], "spec egress 1 to 0 ipBlock except");
    assert_eq!(except.len(), 3, "the whole deny list");
}

#[test]
fn unknown_workloads_and_formats_are_errors() {
    let error =
        export(&policy(), ExportFormat::Cilium, Some("nope"), "default").expect_err("unknown");
    assert_eq!(
        error.to_string(),
        "the policy has no workload named \"nope\""
    );
    assert_eq!("k8s".parse::<ExportFormat>(), Ok(ExportFormat::Kubernetes));
    assert_eq!("Cilium".parse::<ExportFormat>(), Ok(ExportFormat::Cilium));
    for format in ExportFormat::ALL {
        assert_eq!(format.as_str().parse::<ExportFormat>(), Ok(format));
        assert_eq!(format.to_string(), format.as_str());
    }
    let error = "calico"
        .parse::<ExportFormat>()
        .expect_err("unknown format");
    assert!(error.to_string().contains("kubernetes or cilium"));
}

#[test]
fn a_policy_without_workloads_exports_nothing() {
    let empty = egressd_policy::parse("", Path::new("p.toml")).expect("policy");
    assert_eq!(
        export(&empty, ExportFormat::Kubernetes, None, "default").expect("export"),
        ""
    );
}

#[test]
fn object_names_are_dns_labels() {
    assert_eq!(object_name("vendor-agent"), "egressd-vendor-agent");
    assert_eq!(object_name("Backup_Job."), "egressd-backup-job");
    assert!(object_name(&"x".repeat(300)).len() <= 253);
}
