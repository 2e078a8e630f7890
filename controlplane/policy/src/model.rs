//! The validated policy and its reference matching semantics.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use crate::cgroup::CgroupPattern;
use crate::cidr::canonical_ip;
use crate::error::Location;
use crate::fqdn::FqdnPattern;
use crate::types::{Mode, PortRange, Protocol, Unmatched};

/// The workload that processes in no workload join when `unmatched = "apply"`.
pub const HOST_WORKLOAD: &str = "host";

/// Most workloads one policy may define (bounded by the datapath's map sizes).
pub const MAX_WORKLOADS: usize = 4000;

/// A validated `/etc/egressd/policy.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Mode of workloads that set none.
    pub mode: Mode,
    pub defaults: Defaults,
    pub dns: DnsSettings,
    pub metrics: MetricsSettings,
    pub observe: ObserveSettings,
    pub daemon: DaemonSettings,
    pub control: ControlSettings,
    pub limits: LimitsSettings,
    pub workloads: Vec<Workload>,
    pub source: PolicySource,
}

/// `[daemon]`: the daemon's own lifecycle.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DaemonSettings {
    pub on_stop: OnStop,
}

/// What stopping egressd (SIGTERM, `systemctl stop`) does to enforcement.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnStop {
    /// Programs and maps stay pinned and keep enforcing; the next egressd adopts them.
    #[default]
    Keep,
    /// Programs detach and the pins are removed: nothing is enforced until egressd starts.
    Detach,
}

impl std::str::FromStr for OnStop {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "keep" => Ok(OnStop::Keep),
            "detach" => Ok(OnStop::Detach),
            other => Err(format!(
                "invalid on_stop {other:?}: expected \"keep\" or \"detach\""
            )),
        }
    }
}

/// `[limits]`: what happens when a kernel map that fills at run time has no room.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitsSettings {
    pub on_full: OnFull,
}

/// What a strict workload gets when a map it needs is full: today the learned addresses of
/// its FQDN rules (`fqdn_addresses`). Maps that only the policy fills (allow, deny, fqdn,
/// cgroups at load) never take part: a policy that does not fit is refused whatever this
/// says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnFull {
    /// Fail closed: a connection to an address that could not be stored is refused
    /// (reported as denied, counted).
    #[default]
    Deny,
    /// Fail open for the workload concerned, loudly: while some of its learned addresses
    /// could not be stored, the strict workload runs as audit (refusals become `would_deny`
    /// events), and goes back to strict once they are stored or expire.
    Allow,
}

impl OnFull {
    pub fn as_str(self) -> &'static str {
        match self {
            OnFull::Deny => "deny",
            OnFull::Allow => "allow",
        }
    }
}

impl std::str::FromStr for OnFull {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "deny" => Ok(OnFull::Deny),
            "allow" => Ok(OnFull::Allow),
            other => Err(format!(
                "invalid on_full {other:?}: expected \"deny\" or \"allow\""
            )),
        }
    }
}

impl std::fmt::Display for OnFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[control]`: who may use the control socket besides root and the members of
/// `egressd --socket-group` (who may do everything).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ControlSettings {
    /// Members may use the read-only requests (`egressctl status`, `events`, `dns`) and
    /// nothing else. Default: none.
    pub read_group: Option<GroupSetting>,
}

/// A group named in the policy, with where it is named: the daemon resolves names against
/// the system's group database and reports an unknown one at this location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSetting {
    pub group: GroupRef,
    pub location: Location,
}

/// A Unix group, by name or number.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum GroupRef {
    Id(u32),
    Name(String),
}

impl GroupRef {
    /// Longest group name accepted (shadow-utils' default limit).
    pub const MAX_NAME_LEN: usize = 32;
}

impl std::fmt::Display for GroupRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GroupRef::Id(gid) => write!(f, "{gid}"),
            GroupRef::Name(name) => write!(f, "{name:?}"),
        }
    }
}

/// `[observe]`: the durable record of what workloads contacted (`egressctl observed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObserveSettings {
    /// Off switch. Default on.
    pub enabled: bool,
    /// How often the kernel's flow summaries are written to the store: what a crash can
    /// lose at most. Default 5 s.
    pub flush_interval: Duration,
    /// Destinations not seen for this many days are forgotten (0: never). Default 30.
    pub retention_days: u32,
    /// At most this many destinations are kept, least recently seen dropped first
    /// (0: no limit). Default 1,000,000.
    pub max_rows: u64,
}

impl ObserveSettings {
    pub const MIN_FLUSH_INTERVAL: Duration = Duration::from_millis(100);
    pub const MAX_FLUSH_INTERVAL: Duration = Duration::from_secs(3600);
}

impl Default for ObserveSettings {
    fn default() -> Self {
        ObserveSettings {
            enabled: true,
            flush_interval: Duration::from_secs(5),
            retention_days: 30,
            max_rows: 1_000_000,
        }
    }
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsSettings {
    /// Off switch. Default on.
    pub enabled: bool,
    /// Default 127.0.0.1:9469 (loopback: scrape through a local agent or a tunnel).
    pub listen: std::net::SocketAddr,
}

impl MetricsSettings {
    pub const DEFAULT_LISTEN: std::net::SocketAddr = std::net::SocketAddr::V4(
        std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 9469),
    );
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings {
            enabled: true,
            listen: Self::DEFAULT_LISTEN,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Defaults {
    /// Default `allow`: processes in no workload are left alone.
    pub unmatched: Unmatched,
    /// Denied for every workload, even where an allow rule matches. Default empty.
    pub deny: Vec<IpNet>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// Empty (the default) means the resolvers of /etc/resolv.conf.
    pub resolvers: Vec<IpAddr>,
    /// Domains stub resolvers append to names (the `search` list), lowercase, no trailing
    /// dot. `None` (the key left out) means the search list of /etc/resolv.conf. Workloads
    /// with `dns_queries = "allowlisted"` may ask about an allowed name with one of these
    /// appended, so that resolvers that try `name.search.domain` first still get to `name`.
    pub search_domains: Option<Vec<String>>,
    /// Shortest time a learned address stays allowed. Default 60 s.
    pub min_ttl: Duration,
    /// Cap on addresses remembered per name. Default 512.
    pub max_ips_per_name: u32,
    /// Extra time an address stays allowed after its TTL ran out. Default 10 s.
    pub grace: Duration,
}

impl DnsSettings {
    pub const DEFAULT_MIN_TTL: Duration = Duration::from_secs(60);
    pub const DEFAULT_MAX_IPS_PER_NAME: u32 = 512;
    pub const MAX_IPS_PER_NAME_LIMIT: u32 = 65536;
    pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            resolvers: Vec::new(),
            search_domains: None,
            min_ttl: Self::DEFAULT_MIN_TTL,
            max_ips_per_name: Self::DEFAULT_MAX_IPS_PER_NAME,
            grace: Self::DEFAULT_GRACE,
        }
    }
}

/// Where the policy came from, for status output and change detection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySource {
    pub path: PathBuf,
    /// Lowercase hex SHA-256 of the file's bytes.
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub name: String,
    /// `None` only for the `host` workload.
    pub cgroup: Option<CgroupPattern>,
    /// `None` = the policy's top-level mode.
    pub mode: Option<Mode>,
    pub raw_sockets: bool,
    /// Which DNS questions the workload may send to the resolvers.
    pub dns_queries: DnsQueries,
    pub allow: Vec<AllowRule>,
    /// Where the workload's table starts.
    pub location: Location,
}

/// `dns_queries`: which names a workload may ask the resolvers about.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DnsQueries {
    /// Any name (the default).
    #[default]
    Any,
    /// In strict mode, only names that one of the workload's `fqdn` rules matches: other
    /// questions never leave the host (audit reports them, learning records them).
    Allowlisted,
}

impl std::str::FromStr for DnsQueries {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "any" => Ok(DnsQueries::Any),
            "allowlisted" => Ok(DnsQueries::Allowlisted),
            other => Err(format!(
                "invalid dns_queries {other:?}: expected \"any\" or \"allowlisted\""
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowRule {
    pub destination: Destination,
    /// Empty = all ports.
    pub ports: Vec<PortRange>,
    pub protocol: Protocol,
    pub reason: Option<String>,
    pub location: Location,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Destination {
    Cidr(IpNet),
    Fqdn(FqdnPattern),
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Cidr(net) => write!(f, "{net}"),
            Destination::Fqdn(pattern) => write!(f, "{pattern}"),
        }
    }
}

impl Policy {
    pub fn workload(&self, name: &str) -> Option<&Workload> {
        self.workloads.iter().find(|workload| workload.name == name)
    }

    /// The mode the file asks for this workload: its own, else the policy's.
    pub fn effective_file_mode(&self, workload: &Workload) -> Mode {
        workload.mode.unwrap_or(self.mode)
    }

    /// [`Workload::allows`] with this policy's deny list.
    pub fn allows(
        &self,
        workload: &Workload,
        destination: IpAddr,
        ip_protocol: u8,
        port: Option<u16>,
    ) -> bool {
        workload.allows(&self.defaults.deny, destination, ip_protocol, port)
    }
}

impl Workload {
    /// Reference semantics of the kernel datapath for CIDR rules (FQDN rules are not
    /// matched here): the deny list wins, then any matching CIDR rule allows.
    /// IPv4-mapped IPv6 destinations are judged as IPv4.
    pub fn allows(
        &self,
        deny: &[IpNet],
        destination: IpAddr,
        ip_protocol: u8,
        port: Option<u16>,
    ) -> bool {
        let destination = canonical_ip(destination);
        if deny.iter().any(|net| net.contains(&destination)) {
            return false;
        }
        self.allow
            .iter()
            .any(|rule| rule.matches_cidr(destination, ip_protocol, port))
    }
}

impl AllowRule {
    /// Whether this rule is a CIDR rule covering the packet.
    pub fn matches_cidr(&self, destination: IpAddr, ip_protocol: u8, port: Option<u16>) -> bool {
        match &self.destination {
            Destination::Cidr(net) => {
                net.contains(&canonical_ip(destination)) && self.matches_traffic(ip_protocol, port)
            }
            Destination::Fqdn(_) => false,
        }
    }

    /// Protocol and port part of the match. A rule with ports never matches a packet
    /// without one (ICMP).
    pub fn matches_traffic(&self, ip_protocol: u8, port: Option<u16>) -> bool {
        self.protocol.covers(ip_protocol)
            && (self.ports.is_empty()
                || port.is_some_and(|port| self.ports.iter().any(|range| range.contains(port))))
    }
}
