//! `egressctl export`: a policy as Kubernetes NetworkPolicy or CiliumNetworkPolicy YAML,
//! for clusters that enforce with their CNI what egressd learned on a host.
//!
//! One document per workload, selecting pods labelled `app: <workload>`. Both outputs
//! allow DNS to kube-dns (port 53, UDP and TCP), as egressd allows DNS to its resolvers
//! without a rule. What a format cannot express is listed in YAML comments above the
//! document, never silently widened:
//!
//! - NetworkPolicy has no names: `fqdn` rules are listed; the deny list becomes
//!   `ipBlock.except` (an allow rule entirely inside a denied prefix is left out);
//! - neither format here expresses "all ICMP": `icmp` rules are listed;
//! - Cilium gets the deny list as `egressDeny`, and `*.x` as `matchPattern: "*.x"`,
//!   whose `*` covers one label only (egressd's covers any depth).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::str::FromStr;

use egressd_policy::{
    AllowRule, Destination, HOST_WORKLOAD, Policy, PortRange, Protocol, Workload,
};
use ipnet::IpNet;
use serde::Serialize;

use crate::error::ObserveError;
use crate::suggest::comment_safe;

/// The label that selects a workload's pods: `app: <workload>`.
pub const APP_LABEL: &str = "app";

/// Which kind of object [`export`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExportFormat {
    /// `networking.k8s.io/v1` NetworkPolicy.
    Kubernetes,
    /// `cilium.io/v2` CiliumNetworkPolicy.
    Cilium,
}

impl ExportFormat {
    pub const ALL: [ExportFormat; 2] = [ExportFormat::Kubernetes, ExportFormat::Cilium];

    pub fn as_str(self) -> &'static str {
        match self {
            ExportFormat::Kubernetes => "kubernetes",
            ExportFormat::Cilium => "cilium",
        }
    }
}

impl std::fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown export format {0:?}: expected kubernetes or cilium")]
pub struct UnknownExportFormat(pub String);

impl FromStr for ExportFormat {
    type Err = UnknownExportFormat;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "kubernetes" | "k8s" | "networkpolicy" => Ok(ExportFormat::Kubernetes),
            "cilium" | "ciliumnetworkpolicy" => Ok(ExportFormat::Cilium),
            _ => Err(UnknownExportFormat(s.to_owned())),
        }
    }
}

/// `policy` (or only its workload `workload`) as YAML documents, separated by `---`,
/// in `namespace`. Without `workload`, every workload but `host` (processes outside
/// any pod). Fails on an unknown workload name.
pub fn export(
    policy: &Policy,
    format: ExportFormat,
    workload: Option<&str>,
    namespace: &str,
) -> Result<String, ObserveError> {
    let workloads: Vec<&Workload> = match workload {
        Some(name) => vec![
            policy
                .workload(name)
                .ok_or_else(|| ObserveError::UnknownWorkload {
                    name: name.to_owned(),
                })?,
        ],
        // The host workload is processes outside any pod: only exported when asked for.
        None => policy
            .workloads
            .iter()
            .filter(|workload| workload.name != HOST_WORKLOAD)
            .collect(),
    };
    let mut out = String::new();
    for (i, workload) in workloads.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        let mut notes = Notes::default();
        let body = match format {
            ExportFormat::Kubernetes => {
                let document = kubernetes(policy, workload, namespace, &mut notes);
                serde_yaml_ng::to_string(&document).map_err(|source| ObserveError::Yaml {
                    what: "NetworkPolicy",
                    source,
                })?
            }
            ExportFormat::Cilium => {
                let document = cilium(policy, workload, namespace, &mut notes);
                serde_yaml_ng::to_string(&document).map_err(|source| ObserveError::Yaml {
                    what: "CiliumNetworkPolicy",
                    source,
                })?
            }
        };
        let _ = writeln!(
            out,
            "# egressd workload {:?} from {} (sha256 {})",
            workload.name,
            comment_safe(&policy.source.path.display().to_string()),
            policy.source.sha256
        );
        for (heading, items) in &notes.0 {
            let _ = writeln!(out, "# {heading}:");
            for item in items {
                let _ = writeln!(out, "#   {item}");
            }
        }
        out.push_str(&body);
    }
    Ok(out)
}

/// Comment lines about what the document leaves out, by heading.
#[derive(Debug, Default)]
struct Notes(BTreeMap<&'static str, Vec<String>>);

impl Notes {
    fn add(&mut self, heading: &'static str, rule: &AllowRule) {
        self.0.entry(heading).or_default().push(describe(rule));
    }
}

/// `api.vendor.com ports 443 tcp (reason: heartbeat)`.
fn describe(rule: &AllowRule) -> String {
    let mut text = rule.destination.to_string();
    if !rule.ports.is_empty() {
        let ports: Vec<String> = rule.ports.iter().map(PortRange::to_string).collect();
        let _ = write!(text, " ports {}", ports.join(","));
    }
    let _ = write!(text, " {}", rule.protocol);
    if let Some(reason) = rule.reason.as_deref().filter(|r| !r.trim().is_empty()) {
        let _ = write!(text, " (reason: {})", comment_safe(reason));
    }
    text
}

/// A DNS-1123 object name: `egressd-<workload>`, lowercase, other characters as `-`.
fn object_name(workload: &str) -> String {
    let name: String = format!("egressd-{workload}")
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '.' | '-') => c,
            _ => '-',
        })
        .take(253)
        .collect();
    name.trim_end_matches(['-', '.']).to_owned()
}

#[derive(Debug, Serialize)]
struct Metadata {
    name: String,
    namespace: String,
    labels: BTreeMap<&'static str, String>,
    annotations: BTreeMap<&'static str, String>,
}

impl Metadata {
    fn new(policy: &Policy, workload: &Workload, namespace: &str) -> Metadata {
        Metadata {
            name: object_name(&workload.name),
            namespace: namespace.to_owned(),
            labels: BTreeMap::from([("app.kubernetes.io/managed-by", "egressd".to_owned())]),
            annotations: BTreeMap::from([
                ("egressd.io/workload", workload.name.clone()),
                ("egressd.io/policy-sha256", policy.source.sha256.clone()),
            ]),
        }
    }
}

#[derive(Debug, Serialize)]
struct LabelSelector {
    #[serde(rename = "matchLabels")]
    match_labels: BTreeMap<&'static str, String>,
}

impl LabelSelector {
    fn app(workload: &Workload) -> LabelSelector {
        LabelSelector {
            match_labels: BTreeMap::from([(APP_LABEL, workload.name.clone())]),
        }
    }
}

// ---- networking.k8s.io/v1 NetworkPolicy ----

#[derive(Debug, Serialize)]
struct NetworkPolicy {
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    kind: &'static str,
    metadata: Metadata,
    spec: NetworkPolicySpec,
}

#[derive(Debug, Serialize)]
struct NetworkPolicySpec {
    #[serde(rename = "podSelector")]
    pod_selector: LabelSelector,
    #[serde(rename = "policyTypes")]
    policy_types: Vec<&'static str>,
    /// Always written: an empty list with policyTypes [Egress] denies all egress.
    egress: Vec<NetworkPolicyEgressRule>,
}

#[derive(Debug, Serialize)]
struct NetworkPolicyEgressRule {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    to: Vec<NetworkPolicyPeer>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ports: Vec<NetworkPolicyPort>,
}

#[derive(Debug, Default, Serialize)]
struct NetworkPolicyPeer {
    #[serde(rename = "ipBlock", skip_serializing_if = "Option::is_none")]
    ip_block: Option<IpBlock>,
    #[serde(rename = "namespaceSelector", skip_serializing_if = "Option::is_none")]
    namespace_selector: Option<LabelSelector>,
    #[serde(rename = "podSelector", skip_serializing_if = "Option::is_none")]
    pod_selector: Option<LabelSelector>,
}

#[derive(Debug, Serialize)]
struct IpBlock {
    cidr: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    except: Vec<String>,
}

#[derive(Debug, Serialize)]
struct NetworkPolicyPort {
    protocol: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    #[serde(rename = "endPort", skip_serializing_if = "Option::is_none")]
    end_port: Option<u16>,
}

fn kubernetes(
    policy: &Policy,
    workload: &Workload,
    namespace: &str,
    notes: &mut Notes,
) -> NetworkPolicy {
    let mut egress = vec![NetworkPolicyEgressRule {
        to: vec![NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector {
                match_labels: BTreeMap::from([(
                    "kubernetes.io/metadata.name",
                    "kube-system".to_owned(),
                )]),
            }),
            pod_selector: Some(LabelSelector {
                match_labels: BTreeMap::from([("k8s-app", "kube-dns".to_owned())]),
            }),
            ..NetworkPolicyPeer::default()
        }],
        ports: ["UDP", "TCP"]
            .into_iter()
            .map(|protocol| NetworkPolicyPort {
                protocol,
                port: Some(53),
                end_port: None,
            })
            .collect(),
    }];
    for rule in &workload.allow {
        let net = match &rule.destination {
            Destination::Fqdn(_) => {
                notes.add("not expressible in a NetworkPolicy (DNS names)", rule);
                continue;
            }
            Destination::Cidr(net) => *net,
        };
        if rule.protocol == Protocol::Icmp {
            notes.add("not expressible in a NetworkPolicy (ICMP)", rule);
            continue;
        }
        let deny = &policy.defaults.deny;
        if deny.iter().any(|denied| denied.contains(&net)) {
            notes.add("left out: entirely inside the deny list", rule);
            continue;
        }
        let except = deny
            .iter()
            .filter(|denied| net.contains(*denied))
            .map(IpNet::to_string)
            .collect();
        egress.push(NetworkPolicyEgressRule {
            to: vec![NetworkPolicyPeer {
                ip_block: Some(IpBlock {
                    cidr: net.to_string(),
                    except,
                }),
                ..NetworkPolicyPeer::default()
            }],
            ports: kubernetes_ports(rule),
        });
    }
    NetworkPolicy {
        api_version: "networking.k8s.io/v1",
        kind: "NetworkPolicy",
        metadata: Metadata::new(policy, workload, namespace),
        spec: NetworkPolicySpec {
            pod_selector: LabelSelector::app(workload),
            policy_types: vec!["Egress"],
            egress,
        },
    }
}

/// The protocols a rule's ports stand for in Kubernetes; `None`: every protocol.
fn port_protocols(protocol: Protocol) -> Option<&'static [&'static str]> {
    match protocol {
        Protocol::Tcp => Some(&["TCP"]),
        Protocol::Udp => Some(&["UDP"]),
        Protocol::Any => None,
        // Callers leave ICMP rules out before asking.
        Protocol::Icmp => Some(&[]),
    }
}

fn kubernetes_ports(rule: &AllowRule) -> Vec<NetworkPolicyPort> {
    let protocols: &[&str] = match port_protocols(rule.protocol) {
        Some(protocols) => protocols,
        // `any` with ports: the protocols that have ports.
        None if !rule.ports.is_empty() => &["TCP", "UDP", "SCTP"],
        // `any` without ports: no ports field, all traffic.
        None => return Vec::new(),
    };
    let mut ports = Vec::new();
    for &protocol in protocols {
        if rule.ports.is_empty() {
            ports.push(NetworkPolicyPort {
                protocol,
                port: None,
                end_port: None,
            });
        }
        for range in &rule.ports {
            ports.push(NetworkPolicyPort {
                protocol,
                port: Some(range.first),
                end_port: (range.last > range.first).then_some(range.last),
            });
        }
    }
    ports
}

// ---- cilium.io/v2 CiliumNetworkPolicy ----

#[derive(Debug, Serialize)]
struct CiliumNetworkPolicy {
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    kind: &'static str,
    metadata: Metadata,
    spec: CiliumSpec,
}

#[derive(Debug, Serialize)]
struct CiliumSpec {
    #[serde(rename = "endpointSelector")]
    endpoint_selector: LabelSelector,
    egress: Vec<CiliumEgressRule>,
    #[serde(rename = "egressDeny", skip_serializing_if = "Vec::is_empty")]
    egress_deny: Vec<CiliumEgressRule>,
}

#[derive(Debug, Default, Serialize)]
struct CiliumEgressRule {
    #[serde(rename = "toEndpoints", skip_serializing_if = "Vec::is_empty")]
    to_endpoints: Vec<LabelSelector>,
    #[serde(rename = "toFQDNs", skip_serializing_if = "Vec::is_empty")]
    to_fqdns: Vec<FqdnSelector>,
    #[serde(rename = "toCIDR", skip_serializing_if = "Vec::is_empty")]
    to_cidr: Vec<String>,
    #[serde(rename = "toPorts", skip_serializing_if = "Vec::is_empty")]
    to_ports: Vec<PortRule>,
}

/// One of the two fields is set. (A struct, not an enum: serde_yaml_ng writes enums as
/// YAML tags.)
#[derive(Debug, Default, Serialize)]
struct FqdnSelector {
    #[serde(rename = "matchName", skip_serializing_if = "Option::is_none")]
    match_name: Option<String>,
    #[serde(rename = "matchPattern", skip_serializing_if = "Option::is_none")]
    match_pattern: Option<String>,
}

impl FqdnSelector {
    fn name(name: &str) -> FqdnSelector {
        FqdnSelector {
            match_name: Some(name.to_owned()),
            match_pattern: None,
        }
    }

    fn pattern(pattern: &str) -> FqdnSelector {
        FqdnSelector {
            match_name: None,
            match_pattern: Some(pattern.to_owned()),
        }
    }
}

#[derive(Debug, Serialize)]
struct PortRule {
    ports: Vec<PortProtocol>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rules: Option<L7Rules>,
}

#[derive(Debug, Serialize)]
struct PortProtocol {
    /// A string in Cilium's schema; "0" means every port of the protocol.
    port: String,
    #[serde(rename = "endPort", skip_serializing_if = "Option::is_none")]
    end_port: Option<u16>,
    protocol: &'static str,
}

#[derive(Debug, Serialize)]
struct L7Rules {
    dns: Vec<FqdnSelector>,
}

fn cilium(
    policy: &Policy,
    workload: &Workload,
    namespace: &str,
    notes: &mut Notes,
) -> CiliumNetworkPolicy {
    let mut egress = vec![CiliumEgressRule {
        to_endpoints: vec![LabelSelector {
            match_labels: BTreeMap::from([
                ("k8s:io.kubernetes.pod.namespace", "kube-system".to_owned()),
                ("k8s:k8s-app", "kube-dns".to_owned()),
            ]),
        }],
        to_ports: vec![PortRule {
            ports: ["UDP", "TCP"]
                .into_iter()
                .map(|protocol| PortProtocol {
                    port: "53".to_owned(),
                    end_port: None,
                    protocol,
                })
                .collect(),
            // Cilium only learns the addresses of names through its DNS proxy.
            rules: Some(L7Rules {
                dns: vec![FqdnSelector::pattern("*")],
            }),
        }],
        ..CiliumEgressRule::default()
    }];
    for rule in &workload.allow {
        if rule.protocol == Protocol::Icmp {
            notes.add(
                "not expressed (Cilium needs ICMP types; egressd allows all)",
                rule,
            );
            continue;
        }
        let mut egress_rule = CiliumEgressRule {
            to_ports: cilium_ports(rule),
            ..CiliumEgressRule::default()
        };
        match &rule.destination {
            Destination::Cidr(net) => egress_rule.to_cidr.push(net.to_string()),
            Destination::Fqdn(pattern) if pattern.is_wildcard() => {
                notes.add(
                    "Cilium's `*` matches one label; egressd's matches any depth",
                    rule,
                );
                egress_rule
                    .to_fqdns
                    .push(FqdnSelector::pattern(pattern.as_str()));
            }
            Destination::Fqdn(pattern) => egress_rule
                .to_fqdns
                .push(FqdnSelector::name(pattern.as_str())),
        }
        egress.push(egress_rule);
    }
    let egress_deny = if policy.defaults.deny.is_empty() {
        Vec::new()
    } else {
        vec![CiliumEgressRule {
            to_cidr: policy.defaults.deny.iter().map(IpNet::to_string).collect(),
            ..CiliumEgressRule::default()
        }]
    };
    CiliumNetworkPolicy {
        api_version: "cilium.io/v2",
        kind: "CiliumNetworkPolicy",
        metadata: Metadata::new(policy, workload, namespace),
        spec: CiliumSpec {
            endpoint_selector: LabelSelector::app(workload),
            egress,
            egress_deny,
        },
    }
}

fn cilium_ports(rule: &AllowRule) -> Vec<PortRule> {
    let protocol = match port_protocols(rule.protocol) {
        Some(&[protocol]) => protocol,
        None if !rule.ports.is_empty() => "ANY",
        // `any` without ports: no toPorts, all traffic.
        _ => return Vec::new(),
    };
    let ports = if rule.ports.is_empty() {
        vec![PortProtocol {
            port: "0".to_owned(),
            end_port: None,
            protocol,
        }]
    } else {
        rule.ports
            .iter()
            .map(|range| PortProtocol {
                port: range.first.to_string(),
                end_port: (range.last > range.first).then_some(range.last),
                protocol,
            })
            .collect()
    };
    vec![PortRule { ports, rules: None }]
}

#[cfg(test)]
mod tests;
