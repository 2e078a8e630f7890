//! What the datapath reports ([`FlowSample`]) and what the store hands back ([`Observation`]).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::SystemTime;

use egressd_policy::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, canonical_ip};
use serde::{Deserialize, Serialize};

/// Most distinct processes kept per observation; later ones are dropped.
pub const MAX_PROCESSES: usize = 16;

/// Most distinct DNS names kept per observation (a CDN address can serve thousands of
/// names; the first ones seen are kept).
pub const MAX_NAMES: usize = 32;

/// Destination ports whose protocol is unencrypted by default, flagged `plaintext` for
/// TCP and UDP flows:
///
/// | port | protocol |
/// |---|---|
/// | 21 | FTP control |
/// | 23 | telnet |
/// | 69 | TFTP |
/// | 80 | HTTP |
/// | 110 | POP3 |
/// | 143 | IMAP |
/// | 161 | SNMP (v1/v2c community strings) |
/// | 389 | LDAP |
/// | 514 | syslog |
/// | 1883 | MQTT |
/// | 2375 | Docker API without TLS |
/// | 5672 | AMQP |
/// | 6379 | Redis |
/// | 8080 | HTTP (alternate) |
/// | 9200 | Elasticsearch HTTP |
/// | 11211 | memcached |
///
/// Ports that negotiate TLS in-band (SMTP 25/587, PostgreSQL 5432, MySQL 3306) are not
/// listed: the port alone does not say whether the session was encrypted.
pub const PLAINTEXT_PORTS: [u16; 16] = [
    21, 23, 69, 80, 110, 143, 161, 389, 514, 1883, 2375, 5672, 6379, 8080, 9200, 11211,
];

/// Whether a TCP or UDP flow to this port is presumed unencrypted ([`PLAINTEXT_PORTS`]).
pub fn is_plaintext(protocol: u8, port: Option<u16>) -> bool {
    matches!(protocol, IPPROTO_TCP | IPPROTO_UDP)
        && port.is_some_and(|port| PLAINTEXT_PORTS.contains(&port))
}

/// `tcp`, `udp`, `icmp`, `icmpv6`, or the protocol number.
pub fn protocol_name(protocol: u8) -> String {
    match protocol {
        IPPROTO_TCP => "tcp".to_owned(),
        IPPROTO_UDP => "udp".to_owned(),
        IPPROTO_ICMP => "icmp".to_owned(),
        IPPROTO_ICMPV6 => "icmpv6".to_owned(),
        other => format!("ip-proto-{other}"),
    }
}

/// What the kernel aggregates on: one workload talking to one destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FlowKey {
    pub workload: String,
    /// IPv4-mapped IPv6 addresses are stored and compared as IPv4 (see [`FlowKey::new`]).
    pub address: IpAddr,
    /// `None` for protocols without ports (ICMP and others).
    pub port: Option<u16>,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, ...).
    pub protocol: u8,
}

impl FlowKey {
    /// A key with the address canonicalized (IPv4-mapped IPv6 becomes IPv4, as the
    /// datapath judges it).
    pub fn new(
        workload: impl Into<String>,
        address: IpAddr,
        port: Option<u16>,
        protocol: u8,
    ) -> Self {
        FlowKey {
            workload: workload.into(),
            address: canonical_ip(address),
            port,
            protocol,
        }
    }

    /// The same key with its address canonicalized.
    pub fn canonical(&self) -> FlowKey {
        FlowKey::new(
            self.workload.clone(),
            self.address,
            self.port,
            self.protocol,
        )
    }
}

/// The process behind a flow: its `comm` (16 bytes at most in the kernel, and set by the
/// process itself, so never trusted for anything but display) and, where the daemon could
/// resolve it, its executable path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Process {
    pub comm: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
}

impl Process {
    pub fn new(comm: impl Into<String>, exe: Option<&str>) -> Self {
        Process {
            comm: comm.into(),
            exe: exe.map(str::to_owned),
        }
    }
}

/// What the datapath did with the sample's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleVerdict {
    #[default]
    Allowed,
    /// Refused (strict mode).
    Denied,
    /// Allowed, but strict mode would have refused it (audit mode).
    WouldDeny,
}

/// One kernel aggregate as the daemon flushes it: the counters since the previous flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowSample {
    pub key: FlowKey,
    /// The name the workload resolved to reach this address, when the DNS proxy saw it.
    pub dns_name: Option<String>,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    pub connections: u64,
    pub bytes_sent: u64,
    pub packets_sent: u64,
    pub bytes_received: u64,
    pub packets_received: u64,
    /// The process that called connect() (or sent the first datagram).
    pub connect_process: Option<Process>,
    /// The process that sent data, when it differs (a socket passed to a child).
    pub send_process: Option<Process>,
    pub verdict: SampleVerdict,
}

impl FlowSample {
    /// A sample with zero counters, no name and no process, at `at`.
    pub fn new(key: FlowKey, at: SystemTime) -> Self {
        FlowSample {
            key,
            dns_name: None,
            first_seen: at,
            last_seen: at,
            connections: 0,
            bytes_sent: 0,
            packets_sent: 0,
            bytes_received: 0,
            packets_received: 0,
            connect_process: None,
            send_process: None,
            verdict: SampleVerdict::Allowed,
        }
    }

    /// How many attempts this sample adds to `denied` / `would_deny`: its connections,
    /// and at least one, since a denied sample means something was refused.
    pub fn verdict_count(&self) -> u64 {
        self.connections.max(1)
    }
}

/// Everything known about one [`FlowKey`] over the store's retention.
///
/// Serialized as the JSON of `egressctl observed --json` (times as RFC 3339 strings), so
/// exports from many hosts can be merged with [`crate::merge_exports`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    pub key: FlowKey,
    /// Distinct names, sorted, at most [`MAX_NAMES`].
    #[serde(default)]
    pub dns_names: Vec<String>,
    #[serde(with = "crate::time::rfc3339")]
    pub first_seen: SystemTime,
    #[serde(with = "crate::time::rfc3339")]
    pub last_seen: SystemTime,
    /// Every attempt, whatever its verdict.
    #[serde(default)]
    pub connections: u64,
    #[serde(default)]
    pub bytes_sent: u64,
    #[serde(default)]
    pub packets_sent: u64,
    #[serde(default)]
    pub bytes_received: u64,
    #[serde(default)]
    pub packets_received: u64,
    /// Distinct processes, sorted, at most [`MAX_PROCESSES`].
    #[serde(default)]
    pub processes: Vec<Process>,
    /// Attempts refused in strict mode.
    #[serde(default)]
    pub denied: u64,
    /// Attempts audit mode reported as would-deny.
    #[serde(default)]
    pub would_deny: u64,
    /// See [`PLAINTEXT_PORTS`]; derived from the key.
    #[serde(default)]
    pub plaintext: bool,
}

impl Observation {
    /// An observation of a single sample (what the store would return after recording
    /// only it).
    pub fn from_sample(sample: &FlowSample) -> Self {
        let mut observation = Observation {
            key: sample.key.canonical(),
            dns_names: Vec::new(),
            first_seen: sample.first_seen.min(sample.last_seen),
            last_seen: sample.last_seen.max(sample.first_seen),
            connections: sample.connections,
            bytes_sent: sample.bytes_sent,
            packets_sent: sample.packets_sent,
            bytes_received: sample.bytes_received,
            packets_received: sample.packets_received,
            processes: Vec::new(),
            denied: 0,
            would_deny: 0,
            plaintext: is_plaintext(sample.key.protocol, sample.key.port),
        };
        match sample.verdict {
            SampleVerdict::Allowed => {}
            SampleVerdict::Denied => observation.denied = sample.verdict_count(),
            SampleVerdict::WouldDeny => observation.would_deny = sample.verdict_count(),
        }
        observation.add_names(sample.dns_name.iter().map(String::as_str));
        observation.add_processes(
            sample
                .connect_process
                .iter()
                .chain(sample.send_process.iter())
                .cloned(),
        );
        observation
    }

    /// Whether anything of it was refused or would have been.
    pub fn is_denied(&self) -> bool {
        self.denied > 0 || self.would_deny > 0
    }

    /// Folds `other` (same key) into this one: counters add up (saturating), times widen,
    /// names and processes are united within their bounds.
    pub fn absorb(&mut self, other: &Observation) {
        self.first_seen = self.first_seen.min(other.first_seen);
        self.last_seen = self.last_seen.max(other.last_seen);
        for (mine, theirs) in [
            (&mut self.connections, other.connections),
            (&mut self.bytes_sent, other.bytes_sent),
            (&mut self.packets_sent, other.packets_sent),
            (&mut self.bytes_received, other.bytes_received),
            (&mut self.packets_received, other.packets_received),
            (&mut self.denied, other.denied),
            (&mut self.would_deny, other.would_deny),
        ] {
            *mine = mine.saturating_add(theirs);
        }
        self.add_names(other.dns_names.iter().map(String::as_str));
        self.add_processes(other.processes.iter().cloned());
        self.plaintext = is_plaintext(self.key.protocol, self.key.port);
    }

    /// Adds names (lowercased, trailing dot dropped), keeping them sorted, distinct and
    /// at most [`MAX_NAMES`].
    pub(crate) fn add_names<'a>(&mut self, names: impl IntoIterator<Item = &'a str>) {
        let mut set: BTreeSet<String> = std::mem::take(&mut self.dns_names).into_iter().collect();
        for name in names {
            let name = normalize_name(name);
            if !name.is_empty() && (set.len() < MAX_NAMES || set.contains(&name)) {
                set.insert(name);
            }
        }
        self.dns_names = set.into_iter().collect();
    }

    /// Adds processes, keeping them sorted, distinct and at most [`MAX_PROCESSES`].
    pub(crate) fn add_processes(&mut self, processes: impl IntoIterator<Item = Process>) {
        let mut set: BTreeSet<Process> = std::mem::take(&mut self.processes).into_iter().collect();
        for process in processes {
            if set.len() < MAX_PROCESSES || set.contains(&process) {
                set.insert(process);
            }
        }
        self.processes = set.into_iter().collect();
    }
}

/// Lowercase, without the trailing dot: how names are stored and compared.
pub(crate) fn normalize_name(name: &str) -> String {
    let name = name.trim();
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// [`normalize_name`] of an owned name: given back as it is when it is normalized already,
/// as the daemon's DNS parser leaves every question name.
pub(crate) fn normalized_name(name: String) -> String {
    let normal = !name.ends_with('.')
        && name.trim().len() == name.len()
        && !name.bytes().any(|b| b.is_ascii_uppercase());
    if normal { name } else { normalize_name(&name) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owned_name_is_normalized_like_a_borrowed_one() {
        for name in [
            "api.vendor.example",
            "API.vendor.example",
            "api.vendor.example.",
            " api.vendor.example",
            "api.vendor.example\t",
            "",
            " . ",
            "é.example",
        ] {
            assert_eq!(
                normalized_name(name.to_owned()),
                normalize_name(name),
                "{name:?}"
            );
        }
    }

    #[test]
    fn plaintext_needs_tcp_or_udp_and_a_listed_port() {
        assert!(is_plaintext(IPPROTO_TCP, Some(80)));
        assert!(is_plaintext(IPPROTO_UDP, Some(69)));
        assert!(is_plaintext(IPPROTO_TCP, Some(6379)));
        assert!(!is_plaintext(IPPROTO_TCP, Some(443)));
        assert!(!is_plaintext(IPPROTO_TCP, None));
        assert!(!is_plaintext(IPPROTO_ICMP, Some(80)));
        assert!(!is_plaintext(132, Some(80)));
    }

    #[test]
    fn keys_canonicalize_v4_mapped_addresses() {
        let key = FlowKey::new("w", "::ffff:1.2.3.4".parse().expect("ip"), Some(443), 6);
        assert_eq!(key.address, "1.2.3.4".parse::<IpAddr>().expect("ip"));
    }

    #[test]
    fn protocol_names() {
        assert_eq!(protocol_name(6), "tcp");
        assert_eq!(protocol_name(17), "udp");
        assert_eq!(protocol_name(1), "icmp");
        assert_eq!(protocol_name(58), "icmpv6");
        assert_eq!(protocol_name(132), "ip-proto-132");
    }

    #[test]
    fn names_and_processes_are_distinct_sorted_and_bounded() {
        let at = SystemTime::UNIX_EPOCH;
        let mut observation = Observation::from_sample(&FlowSample::new(
            FlowKey::new("w", [1, 1, 1, 1].into(), Some(443), 6),
            at,
        ));
        observation.add_names(["B.example.com.", "a.example.com", "b.example.com", ""]);
        assert_eq!(observation.dns_names, ["a.example.com", "b.example.com"]);
        let many: Vec<String> = (0..100).map(|i| format!("n{i}.example.com")).collect();
        observation.add_names(many.iter().map(String::as_str));
        assert_eq!(observation.dns_names.len(), MAX_NAMES);
        observation.add_processes((0..40).map(|i| Process::new(format!("p{i}"), None)));
        observation.add_processes([Process::new("p0", None)]);
        assert_eq!(observation.processes.len(), MAX_PROCESSES);
    }

    #[test]
    fn verdicts_count_at_least_one_attempt() {
        let at = SystemTime::UNIX_EPOCH;
        let mut sample = FlowSample::new(FlowKey::new("w", [1, 1, 1, 1].into(), Some(80), 6), at);
        sample.verdict = SampleVerdict::Denied;
        let observation = Observation::from_sample(&sample);
        assert_eq!((observation.denied, observation.would_deny), (1, 0));
        assert!(observation.plaintext && observation.is_denied());
        sample.verdict = SampleVerdict::WouldDeny;
        sample.connections = 5;
        let observation = Observation::from_sample(&sample);
        assert_eq!((observation.denied, observation.would_deny), (0, 5));
    }

    #[test]
    fn absorb_adds_saturating_and_widens_times() {
        let t = |secs| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        let key = FlowKey::new("w", [1, 1, 1, 1].into(), Some(443), 6);
        let mut a = FlowSample::new(key.clone(), t(100));
        a.connections = u64::MAX - 1;
        a.dns_name = Some("a.example.com".into());
        let mut b = FlowSample::new(key, t(50));
        b.last_seen = t(200);
        b.connections = 5;
        b.dns_name = Some("b.example.com".into());
        let mut merged = Observation::from_sample(&a);
        merged.absorb(&Observation::from_sample(&b));
        assert_eq!(merged.connections, u64::MAX);
        assert_eq!((merged.first_seen, merged.last_seen), (t(50), t(200)));
        assert_eq!(merged.dns_names, ["a.example.com", "b.example.com"]);
    }
}
