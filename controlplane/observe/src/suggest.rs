//! `egressctl suggest`: observations -> `policy.toml` `[[workload]]` blocks, one allow
//! rule per destination, each with its evidence as comments and an empty `reason` for
//! the operator to fill in.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::SystemTime;

use egressd_policy::{
    CgroupPattern, FqdnPattern, HOST_WORKLOAD, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP,
    IPPROTO_UDP, Policy, canonical_ip,
};

use crate::model::{Observation, Process, is_plaintext, protocol_name};
use crate::store::sort_most_important_first;
use crate::time::format_rfc3339;

/// How [`suggest`] writes its rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SuggestOptions {
    /// `--wildcard-min N`: N or more names directly below one parent domain become a
    /// single `*.parent` rule. `None`: every name gets its own rule. Values below 2 act
    /// as 2. Parents must have two labels at least (`*.com` is never suggested).
    pub wildcard_min: Option<usize>,
    /// The cgroup pattern of each workload, as in the policy file. A workload missing
    /// here gets a placeholder that matches no cgroup and a TODO comment.
    /// [`SuggestOptions::with_cgroups_from`] fills it from the policy the daemon runs,
    /// which defined the workloads that were observed.
    pub cgroups: BTreeMap<String, String>,
    /// Names the workloads resolved but never connected to (failover and heartbeat
    /// endpoints): offered as commented-out rules, so the operator decides knowingly.
    pub candidate_names: Vec<crate::NameObservation>,
}

impl SuggestOptions {
    /// These options, with the cgroup of every workload of `policy`.
    pub fn with_cgroups_from(mut self, policy: &Policy) -> Self {
        for workload in &policy.workloads {
            if let Some(cgroup) = &workload.cgroup {
                self.cgroups
                    .insert(workload.name.clone(), cgroup.as_str().to_owned());
            }
        }
        self
    }
}

/// The policy's view of an IP protocol number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Proto {
    Tcp,
    Udp,
    Icmp,
    /// Any other protocol: the policy can only say `any`.
    Other,
}

impl Proto {
    fn of(protocol: u8) -> Proto {
        match protocol {
            IPPROTO_TCP => Proto::Tcp,
            IPPROTO_UDP => Proto::Udp,
            IPPROTO_ICMP | IPPROTO_ICMPV6 => Proto::Icmp,
            _ => Proto::Other,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
            Proto::Other => "any",
        }
    }
}

/// A rule's destination, in output order: names, then wildcards, then addresses.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Name(String),
    /// `*.parent`, holding the parent.
    Wildcard(String),
    Address(IpAddr),
}

/// One suggested rule: the observations behind it (indices into the workload's list, so
/// an observation with several names is counted once when their rules merge) and, for
/// a wildcard, the names it stands for.
#[derive(Debug, Clone, Default)]
struct Rule {
    members: BTreeSet<usize>,
    names: BTreeSet<String>,
}

impl Rule {
    fn absorb(&mut self, other: Rule) {
        self.members.extend(other.members);
        self.names.extend(other.names);
    }
}

/// What a rule's comments say, summed over its observations.
#[derive(Debug, Clone)]
struct Evidence {
    ports: BTreeSet<u16>,
    /// Something was seen without a port (ICMP, or another portless protocol).
    portless: bool,
    protocols: BTreeSet<u8>,
    first_seen: SystemTime,
    last_seen: SystemTime,
    connections: u64,
    bytes_sent: u64,
    bytes_received: u64,
    denied: u64,
    would_deny: u64,
    processes: BTreeSet<Process>,
    addresses: BTreeSet<IpAddr>,
    /// Names that were seen but cannot be fqdn rules (shown, escaped, in the comment).
    unusable_names: BTreeSet<String>,
    plaintext_ports: BTreeSet<u16>,
}

impl Evidence {
    fn of(rule: &Rule, observations: &[&Observation]) -> Evidence {
        let mut evidence = Evidence {
            ports: BTreeSet::new(),
            portless: false,
            protocols: BTreeSet::new(),
            first_seen: SystemTime::UNIX_EPOCH,
            last_seen: SystemTime::UNIX_EPOCH,
            connections: 0,
            bytes_sent: 0,
            bytes_received: 0,
            denied: 0,
            would_deny: 0,
            processes: BTreeSet::new(),
            addresses: BTreeSet::new(),
            unusable_names: BTreeSet::new(),
            plaintext_ports: BTreeSet::new(),
        };
        let members = rule
            .members
            .iter()
            .filter_map(|&index| observations.get(index).copied());
        for (i, observation) in members.enumerate() {
            let key = &observation.key;
            match key.port {
                Some(port) => {
                    evidence.ports.insert(port);
                }
                None => evidence.portless = true,
            }
            if is_plaintext(key.protocol, key.port) {
                evidence.plaintext_ports.extend(key.port);
            }
            evidence.protocols.insert(key.protocol);
            if i == 0 {
                evidence.first_seen = observation.first_seen;
                evidence.last_seen = observation.last_seen;
            }
            evidence.first_seen = evidence.first_seen.min(observation.first_seen);
            evidence.last_seen = evidence.last_seen.max(observation.last_seen);
            evidence.connections = evidence.connections.saturating_add(observation.connections);
            evidence.bytes_sent = evidence.bytes_sent.saturating_add(observation.bytes_sent);
            evidence.bytes_received = evidence
                .bytes_received
                .saturating_add(observation.bytes_received);
            evidence.denied = evidence.denied.saturating_add(observation.denied);
            evidence.would_deny = evidence.would_deny.saturating_add(observation.would_deny);
            evidence
                .processes
                .extend(observation.processes.iter().cloned());
            evidence.addresses.insert(canonical_ip(key.address));
            evidence.unusable_names.extend(
                observation
                    .dns_names
                    .iter()
                    .filter(|name| !usable_name(name))
                    .cloned(),
            );
        }
        evidence
    }
}

/// Whether a seen name can be an `fqdn` rule as is.
fn usable_name(name: &str) -> bool {
    FqdnPattern::parse(name).is_ok_and(|pattern| !pattern.is_wildcard())
}

/// Most items listed in one evidence comment line before "(+N more)".
const MAX_LISTED: usize = 8;

/// Writes `policy.toml` `[[workload]]` blocks that allow everything in `observations`:
///
/// - one block per workload (alphabetical), with its cgroup from
///   [`SuggestOptions::cgroups`] or a placeholder and a TODO;
/// - one allow rule per destination and protocol: `fqdn = "name"` for each DNS name
///   the workload resolved to reach it, else `cidr = "address"` (a host prefix);
///   ports are all ports seen (consecutive ones as ranges); a rule gets no ports when
///   traffic without ports (ICMP) was seen;
/// - above each rule, comments with the evidence: first and last seen (RFC 3339),
///   connections, bytes, processes, addresses or names, `PLAINTEXT` for unencrypted
///   ports ([`crate::PLAINTEXT_PORTS`]), `DENIED` / `WOULD DENY` counts;
/// - `reason = ""` on every rule, so `egressctl check --require-reasons` fails until
///   a person has said why each one is needed.
///
/// Text that comes from the workload (process names, paths, names that are not valid
/// DNS names) only appears in comments, with everything but printable ASCII escaped.
pub fn suggest(observations: &[Observation], opts: &SuggestOptions) -> String {
    let mut by_workload: BTreeMap<&str, Vec<&Observation>> = BTreeMap::new();
    for observation in observations {
        by_workload
            .entry(observation.key.workload.as_str())
            .or_default()
            .push(observation);
    }
    for name in &opts.candidate_names {
        by_workload.entry(name.workload.as_str()).or_default();
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Suggested by egressd from {} observed destination(s) of {} workload(s).",
        observations.len(),
        by_workload.len()
    );
    out.push_str(
        "# Review every rule: delete what the workload should not need, fill in each `reason`,\n\
         # then run `egressctl check --require-reasons` and `egressctl diff`.\n",
    );
    for (workload, observations) in by_workload {
        out.push('\n');
        write_workload(&mut out, workload, &observations, opts);
    }
    out
}

fn write_workload(
    out: &mut String,
    workload: &str,
    observations: &[&Observation],
    opts: &SuggestOptions,
) {
    let rules = rules_for(observations, opts.wildcard_min);
    out.push_str("[[workload]]\n");
    let _ = writeln!(out, "name = {}", toml_string(workload));
    match opts.cgroups.get(workload) {
        Some(cgroup) => {
            let _ = writeln!(out, "cgroup = {}", toml_string(cgroup));
        }
        None if workload == HOST_WORKLOAD => {}
        None => {
            let placeholder = format!("TODO/{}", workload.replace('/', "_"));
            let placeholder = if CgroupPattern::parse(&placeholder).is_ok() {
                placeholder
            } else {
                "TODO/workload".to_owned()
            };
            out.push_str(
                "# TODO: this workload's cgroup, relative to the cgroup v2 mount, e.g.\n\
                 # \"system.slice/NAME.service\". The placeholder matches no cgroup.\n",
            );
            let _ = writeln!(out, "cgroup = {}", toml_string(&placeholder));
        }
    }
    out.push_str("# mode = \"audit\"   # then \"strict\" once `egressctl diff` stays empty\n");
    out.push_str("allow = [\n");
    for ((target, proto), rule) in &rules {
        write_rule(out, target, *proto, rule, &Evidence::of(rule, observations));
    }
    write_candidates(out, workload, &rules, &opts.candidate_names);
    out.push_str("]\n");
}

/// Names the workload resolved but never connected to, as commented-out rules (names that
/// look like tunnelling are named as such and never offered).
fn write_candidates(
    out: &mut String,
    workload: &str,
    rules: &BTreeMap<(Target, Proto), Rule>,
    candidates: &[crate::NameObservation],
) {
    let mut offered: BTreeSet<String> = BTreeSet::new();
    let mut lines = Vec::new();
    for candidate in candidates
        .iter()
        .filter(|c| c.workload == workload && !c.connected)
    {
        let name = crate::model::normalize_name(&candidate.name);
        let covered = rules.keys().any(|(target, _)| match target {
            Target::Name(rule) => *rule == name,
            Target::Wildcard(parent) => name.ends_with(&format!(".{parent}")),
            Target::Address(_) => false,
        });
        if covered || !offered.insert(name.clone()) {
            continue;
        }
        if let Some(why) = &candidate.tunnelling {
            lines.push(format!(
                "  # NOT offered: {} looks like DNS tunnelling ({})\n",
                comment_safe(&name),
                comment_safe(why)
            ));
            continue;
        }
        if !usable_name(&name) {
            continue;
        }
        lines.push(format!(
            "  # {{ fqdn = {}, reason = \"\" }},   # {} {}, asked {} times ({} NXDOMAIN), last {}\n",
            toml_string(&name),
            comment_safe(&candidate.qtype),
            if candidate.answered > 0 { "answered" } else { "never answered" },
            candidate.count,
            candidate.nxdomain,
            format_rfc3339(candidate.last_seen),
        ));
    }
    if !lines.is_empty() {
        out.push_str(
            "  # Resolved but never connected to while observed (failover or heartbeat\n  \
             # endpoints?). Uncomment what the workload needs (ports: add them):\n",
        );
        for line in lines {
            out.push_str(&line);
        }
    }
}

/// Groups a workload's observations into rules.
fn rules_for(
    observations: &[&Observation],
    wildcard_min: Option<usize>,
) -> BTreeMap<(Target, Proto), Rule> {
    let mut rules: BTreeMap<(Target, Proto), Rule> = BTreeMap::new();
    for (index, observation) in observations.iter().enumerate() {
        let proto = Proto::of(observation.key.protocol);
        let usable: Vec<&String> = observation
            .dns_names
            .iter()
            .filter(|name| usable_name(name))
            .collect();
        let targets: Vec<Target> = if usable.is_empty() {
            vec![Target::Address(canonical_ip(observation.key.address))]
        } else {
            usable
                .iter()
                .map(|name| Target::Name(crate::model::normalize_name(name)))
                .collect()
        };
        for target in targets {
            rules
                .entry((target, proto))
                .or_default()
                .members
                .insert(index);
        }
    }
    if let Some(min) = wildcard_min {
        collapse_wildcards(&mut rules, min.max(2));
    }
    rules
}

/// `min` or more names with the same parent (of two labels or more) become `*.parent`;
/// then any name rule a wildcard of the same protocol covers is folded into it.
fn collapse_wildcards(rules: &mut BTreeMap<(Target, Proto), Rule>, min: usize) {
    let mut children: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (target, _) in rules.keys() {
        if let Target::Name(name) = target
            && let Some((_, parent)) = name.split_once('.')
            && parent.contains('.')
        {
            children
                .entry(parent.to_owned())
                .or_default()
                .insert(name.clone());
        }
    }
    let wildcards: Vec<(String, FqdnPattern)> = children
        .into_iter()
        .filter(|(_, names)| names.len() >= min)
        .filter_map(|(parent, _)| {
            FqdnPattern::parse(&format!("*.{parent}"))
                .ok()
                .map(|pattern| (parent, pattern))
        })
        .collect();
    if wildcards.is_empty() {
        return;
    }
    let names: Vec<(Target, Proto)> = rules
        .keys()
        .filter(|(target, _)| matches!(target, Target::Name(_)))
        .cloned()
        .collect();
    for (target, proto) in names {
        let Target::Name(name) = &target else {
            continue;
        };
        // The closest (longest) covering parent.
        let Some((parent, _)) = wildcards
            .iter()
            .filter(|(_, pattern)| pattern.matches(name))
            .max_by_key(|(parent, _)| parent.len())
        else {
            continue;
        };
        let Some(mut rule) = rules.remove(&(target.clone(), proto)) else {
            continue;
        };
        rule.names.insert(name.clone());
        match rules.entry((Target::Wildcard(parent.clone()), proto)) {
            std::collections::btree_map::Entry::Occupied(mut entry) => entry.get_mut().absorb(rule),
            std::collections::btree_map::Entry::Vacant(entry) => {
                entry.insert(rule);
            }
        }
    }
}

fn write_rule(out: &mut String, target: &Target, proto: Proto, rule: &Rule, evidence: &Evidence) {
    let _ = writeln!(
        out,
        "  # seen {} .. {}: {} connection(s), sent {}, received {}",
        format_rfc3339(evidence.first_seen),
        format_rfc3339(evidence.last_seen),
        evidence.connections,
        human_bytes(evidence.bytes_sent),
        human_bytes(evidence.bytes_received),
    );
    if !evidence.processes.is_empty() {
        let processes: Vec<String> = evidence
            .processes
            .iter()
            .map(|process| match &process.exe {
                Some(exe) => format!("{} ({})", comment_safe(&process.comm), comment_safe(exe)),
                None => comment_safe(&process.comm),
            })
            .collect();
        let _ = writeln!(out, "  # processes: {}", listing(&processes));
    }
    match target {
        Target::Address(_) => {}
        Target::Name(_) | Target::Wildcard(_) => {
            let addresses: Vec<String> = evidence.addresses.iter().map(IpAddr::to_string).collect();
            let _ = writeln!(out, "  # addresses: {}", listing(&addresses));
        }
    }
    if !rule.names.is_empty() {
        let names: Vec<String> = rule.names.iter().cloned().collect();
        let _ = writeln!(out, "  # names: {}", listing(&names));
    }
    if !evidence.unusable_names.is_empty() {
        let names: Vec<String> = evidence
            .unusable_names
            .iter()
            .map(|n| comment_safe(n))
            .collect();
        let _ = writeln!(
            out,
            "  # also resolved as (not usable as fqdn rules): {}",
            listing(&names)
        );
    }
    if proto == Proto::Other {
        let protocols: Vec<String> = evidence
            .protocols
            .iter()
            .map(|p| protocol_name(*p))
            .collect();
        let _ = writeln!(
            out,
            "  # protocol {} has no name in the policy: \"any\" also covers tcp and udp",
            protocols.join(", ")
        );
    }
    if !evidence.plaintext_ports.is_empty() {
        let ports: Vec<String> = evidence
            .plaintext_ports
            .iter()
            .map(u16::to_string)
            .collect();
        let _ = writeln!(
            out,
            "  # PLAINTEXT: port {} carries unencrypted traffic by default",
            ports.join(", ")
        );
    }
    if evidence.denied > 0 {
        let _ = writeln!(
            out,
            "  # DENIED: {} attempt(s) refused in strict mode",
            evidence.denied
        );
    }
    if evidence.would_deny > 0 {
        let _ = writeln!(
            out,
            "  # WOULD DENY: {} attempt(s) reported in audit mode",
            evidence.would_deny
        );
    }
    let destination = match target {
        Target::Name(name) => format!("fqdn = {}", toml_string(name)),
        Target::Wildcard(parent) => format!("fqdn = {}", toml_string(&format!("*.{parent}"))),
        Target::Address(address) => format!("cidr = {}", toml_string(&address.to_string())),
    };
    let ports = if evidence.portless || proto == Proto::Icmp || evidence.ports.is_empty() {
        String::new()
    } else {
        format!(", ports = [{}]", port_list(&evidence.ports))
    };
    let _ = writeln!(
        out,
        "  {{ {destination}{ports}, protocol = \"{}\", reason = \"\" }},",
        proto.as_str()
    );
}

/// `443, 8000-8002, "9000-9001"`: single ports as numbers, runs as range strings.
fn port_list(ports: &BTreeSet<u16>) -> String {
    let mut runs: Vec<(u16, u16)> = Vec::new();
    for &port in ports {
        match runs.last_mut() {
            Some((_, last)) if last.checked_add(1) == Some(port) => *last = port,
            _ => runs.push((port, port)),
        }
    }
    runs.iter()
        .map(|&(first, last)| {
            if first == last {
                first.to_string()
            } else {
                format!("\"{first}-{last}\"")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn listing(items: &[String]) -> String {
    let shown = items
        .iter()
        .take(MAX_LISTED)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    match items.len().checked_sub(MAX_LISTED) {
        Some(more) if more > 0 => format!("{shown} (+{more} more)"),
        _ => shown,
    }
}

/// `1.5 KiB`, `3.0 MiB`, `12 B`.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Printable ASCII as is, everything else escaped: a process can name itself
/// `x\n[[workload]]`, and a comment must not end early or hide text (bidi controls).
pub(crate) fn comment_safe(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let keep = c.is_ascii_graphic() || c == ' ';
            let escaped: Vec<char> = if keep {
                vec![c]
            } else {
                c.escape_default().collect()
            };
            escaped
        })
        .collect()
}

/// A TOML basic string.
fn toml_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Fleet learning: the `egressctl observed --json` exports of many hosts as one list,
/// one observation per key (counters added, times widened, names and processes united),
/// most important first.
pub fn merge_exports(files: &[Vec<Observation>]) -> Vec<Observation> {
    let mut merged: BTreeMap<crate::model::FlowKey, Observation> = BTreeMap::new();
    for observation in files.iter().flatten() {
        let key = observation.key.canonical();
        match merged.entry(key.clone()) {
            std::collections::btree_map::Entry::Occupied(mut entry) => {
                entry.get_mut().absorb(observation)
            }
            std::collections::btree_map::Entry::Vacant(entry) => {
                let mut first = observation.clone();
                first.key = key;
                // Re-normalize: exports are files people may have edited.
                let names = std::mem::take(&mut first.dns_names);
                first.add_names(names.iter().map(String::as_str));
                let processes = std::mem::take(&mut first.processes);
                first.add_processes(processes);
                first.plaintext = is_plaintext(first.key.protocol, first.key.port);
                entry.insert(first);
            }
        }
    }
    let mut observations: Vec<Observation> = merged.into_values().collect();
    sort_most_important_first(&mut observations);
    observations
}

#[cfg(test)]
mod tests;
