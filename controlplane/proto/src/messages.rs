//! Requests, responses and the reports they carry.
//!
//! Everything here is a wire contract between `egressctl` and `egressd`: add
//! variants and optional fields, never rename or renumber.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use egressd_policy::Mode;

/// One request from a client; the `request` field names the kind.
///
/// Unknown fields are rejected, except on the field-less kinds (`status`,
/// `reload`), where serde ignores them.
///
/// ```json
/// {"request":"set_mode","mode":"strict","workload":"vendor-agent"}
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Answered by [`Response::Status`].
    Status,
    /// Overrides the mode of one workload, or the default mode when `workload`
    /// is `None`. Answered by [`Response::Done`] or [`Response::Error`].
    SetMode {
        mode: ModeSetting,
        #[serde(default)]
        workload: Option<String>,
    },
    /// Re-reads the policy file. Answered by [`Response::Done`] or
    /// [`Response::Error`] (the last good policy stays in force).
    Reload,
    /// The recent events the daemon keeps (at most `limit`, newest last), then,
    /// if `follow`, live ones. Answered by [`Response::Event`] frames, then
    /// [`Response::EndOfEvents`]. When following, no `EndOfEvents` separates the
    /// backlog from live events; the stream ends when the connection closes (or
    /// with `EndOfEvents`, e.g. at shutdown, after which clients stop reading).
    Events {
        #[serde(default)]
        follow: bool,
        #[serde(default)]
        limit: Option<usize>,
    },
    /// The names workloads resolved through FQDN rules and their addresses. Answered by
    /// [`Response::Dns`], preceded by [`Response::DnsNames`] frames when it is large.
    Dns {
        #[serde(default)]
        workload: Option<String>,
    },
    /// Writes the kernel's flow summaries to the observation store now, so that a reader
    /// of the store sees everything up to this moment. Answered by [`Response::Flushed`].
    Flush,
}

impl Request {
    /// The request's `request` tag, as the wire and error messages name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::SetMode { .. } => "set_mode",
            Request::Reload => "reload",
            Request::Events { .. } => "events",
            Request::Dns { .. } => "dns",
            Request::Flush => "flush",
        }
    }

    /// Whether the request only reads what the daemon shows (status, events, learned
    /// names): what members of `[control] read_group` may send. A flush writes the
    /// observation store, so it is not.
    pub fn is_read_only(&self) -> bool {
        match self {
            Request::Status | Request::Events { .. } | Request::Dns { .. } => true,
            Request::SetMode { .. } | Request::Reload | Request::Flush => false,
        }
    }
}

/// The mode a `set_mode` request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeSetting {
    Learning,
    Audit,
    Strict,
    /// Drop the command override: back to what the policy file says.
    File,
}

impl ModeSetting {
    pub const ALL: [ModeSetting; 4] = [
        ModeSetting::Learning,
        ModeSetting::Audit,
        ModeSetting::Strict,
        ModeSetting::File,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ModeSetting::Learning => "learning",
            ModeSetting::Audit => "audit",
            ModeSetting::Strict => "strict",
            ModeSetting::File => "file",
        }
    }

    /// The mode to force, or `None` for [`ModeSetting::File`].
    pub fn mode(self) -> Option<Mode> {
        match self {
            ModeSetting::Learning => Some(Mode::Learning),
            ModeSetting::Audit => Some(Mode::Audit),
            ModeSetting::Strict => Some(Mode::Strict),
            ModeSetting::File => None,
        }
    }
}

impl From<Mode> for ModeSetting {
    fn from(mode: Mode) -> Self {
        match mode {
            Mode::Learning => ModeSetting::Learning,
            Mode::Audit => ModeSetting::Audit,
            Mode::Strict => ModeSetting::Strict,
        }
    }
}

impl fmt::Display for ModeSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no [`ModeSetting`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown mode {0:?}: expected learning, audit, strict or file")]
pub struct UnknownModeSetting(pub String);

impl FromStr for ModeSetting {
    type Err = UnknownModeSetting;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ModeSetting::ALL
            .into_iter()
            .find(|setting| setting.as_str() == s)
            .ok_or_else(|| UnknownModeSetting(s.to_owned()))
    }
}

/// One response frame from the daemon; the `response` field names the kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum Response {
    Status(Box<StatusReport>),
    /// The request was carried out; `message` says what changed.
    Done {
        message: String,
    },
    /// The request failed; nothing changed.
    Error {
        message: String,
    },
    Event(EventRecord),
    /// No more events follow (the end of the backlog of a non-follow request).
    EndOfEvents,
    /// Some of the names of the [`Response::Dns`] that ends the answer to [`Request::Dns`]: a
    /// report too large for one frame comes as parts (see `DnsReport::into_frames`).
    DnsNames {
        names: Vec<DnsName>,
    },
    Dns(DnsReport),
    Flushed(FlushReport),
}

/// The outcome of [`Request::Flush`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlushReport {
    /// The observation store's file (readers open it read-only).
    pub store: String,
    /// Flow samples written by this flush.
    pub samples: u64,
}

/// The observation store as `egressctl status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObserveStatus {
    pub enabled: bool,
    pub store: String,
    pub flush_interval_ms: u64,
    /// RFC 3339 time of the last successful flush.
    pub last_flush: Option<String>,
    /// Flushes that failed, and the last failure (cleared by a successful flush).
    pub flush_failures: u64,
    pub last_error: Option<String>,
    /// Samples written since the daemon started.
    pub samples_written: u64,
    /// Flow summaries the kernel holds now, and how many it can hold.
    pub kernel_flows: u64,
    pub kernel_flow_capacity: u64,
    /// Summaries the kernel could not create, and events lost to a full ring buffer: the
    /// destinations they concern may be missing from the store.
    pub kernel_flow_insert_failures: u64,
    /// Destinations known only from their first-sight event (their kernel summary was
    /// evicted before a flush could read it).
    pub recovered_from_events: u64,
}

/// What `egressctl status` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Daemon version (`CARGO_PKG_VERSION`).
    pub version: String,
    pub pid: u32,
    /// RFC 3339.
    pub started_at: String,
    pub policy: PolicyStatus,
    pub default_mode: ModeStatus,
    /// What happens to processes in no workload: `"allow"` or `"apply"`.
    pub unmatched: String,
    pub workloads: Vec<WorkloadStatus>,
    pub datapath: DatapathStatus,
    /// Absent from daemons that predate the observation store.
    #[serde(default)]
    pub observe: Option<ObserveStatus>,
    /// `[limits]` and what does not fit in the kernel's maps now. Absent from daemons that
    /// predate it.
    #[serde(default)]
    pub limits: Option<LimitsStatus>,
    /// Refusal events folded by the rate limit. Absent from daemons that predate it.
    #[serde(default)]
    pub events: Option<EventsStatus>,
}

/// `[limits]` and the kernel maps that had no room for something a workload needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitsStatus {
    /// `[limits] on_full`: `deny` or `allow`.
    pub on_full: String,
    /// What does not fit now: one entry per map and workload (empty when all is stored).
    pub overflows: Vec<MapOverflow>,
    /// Learned addresses the daemon could not store since it started, counted each time
    /// (the kernel's own failures are `datapath.fqdn_insert_failures`).
    pub fqdn_store_failures: u64,
    /// Cgroups that found no room in the cgroup table since the daemon started, counted
    /// once each time they are left out.
    pub cgroup_store_failures: u64,
}

/// Entries of one workload that one kernel map has no room for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapOverflow {
    /// `fqdn_addresses` or `workload_cgroups`.
    pub map: String,
    /// What the map holds at most.
    pub capacity: u64,
    pub workload: String,
    /// How many of the workload's entries (addresses, cgroups) are not stored.
    pub entries: u64,
    /// RFC 3339: since when some are not.
    pub since: String,
    /// What this does to the workload's traffic, in one sentence.
    pub effect: String,
    /// A few of them: addresses or cgroup paths.
    pub examples: Vec<String>,
}

/// The rate limit on refusal events (`denied`, `would_deny`): per workload and destination,
/// and per workload. What it holds back is counted in the next event of the same kind and
/// destination (its `suppressed` field) and here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsStatus {
    /// The limit, in words.
    pub limit: String,
    /// Refusal events reported since the daemon started.
    pub published: u64,
    /// Refusal events held back since the daemon started; each is counted in the
    /// `suppressed` field of a later event, or in `unreported`.
    pub suppressed: u64,
    /// Held-back events whose count no event carries (their destination had to be
    /// forgotten to bound memory): counted only here and in the metrics.
    pub unreported: u64,
    /// `suppressed` per workload, most first.
    pub by_workload: Vec<WorkloadEvents>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadEvents {
    pub workload: String,
    pub published: u64,
    pub suppressed: u64,
}

/// The policy in force and the outcome of the last reload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyStatus {
    pub path: String,
    /// Hex SHA-256 of the file contents in force.
    pub sha256: String,
    /// RFC 3339.
    pub loaded_at: String,
    /// The last reload failed (the policy above is still in force); cleared by
    /// the next successful load.
    pub last_error: Option<ReloadFailure>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReloadFailure {
    /// RFC 3339.
    pub at: String,
    /// The loader's diagnostics, one `PATH:LINE:COL: message` per line.
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModeStatus {
    pub mode: Mode,
    pub source: ModeSource,
}

/// Where an effective mode comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeSource {
    /// The policy file.
    File,
    /// An `egressctl mode` override.
    Command,
    /// Nothing set it: the built-in default.
    Default,
}

impl ModeSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ModeSource::File => "file",
            ModeSource::Command => "command",
            ModeSource::Default => "default",
        }
    }
}

impl fmt::Display for ModeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadStatus {
    pub name: String,
    /// The datapath's workload id.
    pub id: u32,
    /// Effective mode.
    pub mode: Mode,
    pub mode_source: ModeSource,
    /// The cgroup pattern from the policy, if any.
    pub cgroup: Option<String>,
    /// Cgroup paths currently matched.
    pub cgroups: Vec<String>,
    pub cidr_rules: usize,
    pub fqdn_rules: usize,
    pub raw_sockets: bool,
    /// The mode the kernel enforces when it is not `mode`: `audit` while `[limits] on_full
    /// = "allow"` lets a strict workload through because some of its learned addresses do
    /// not fit (see `limits.overflows`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_mode: Option<Mode>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatapathStatus {
    pub cgroup_root: String,
    /// Names of the attached programs.
    pub programs: Vec<String>,
    pub events: u64,
    pub ring_buffer_drops: u64,
    pub allowed: u64,
    pub denied: u64,
    pub would_deny: u64,
    /// DNS answers handed from the kernel to the daemon, and those lost because the daemon
    /// fell behind.
    #[serde(default)]
    pub dns_answers: u64,
    #[serde(default)]
    pub dns_answer_drops: u64,
    /// The resolvers whose answers back FQDN rules.
    #[serde(default)]
    pub dns_resolvers: Vec<String>,
    /// The search domains whose expansions of allowed names `dns_queries = "allowlisted"`
    /// workloads may ask about, and the questions refused for naming nothing allowed.
    #[serde(default)]
    pub dns_search_domains: Vec<String>,
    #[serde(default)]
    pub dns_queries_refused: u64,
    /// The bpffs folder holding the pinned programs and maps (enforcement outlives the
    /// daemon), and whether this daemon adopted them from a previous one.
    #[serde(default)]
    pub pin_dir: Option<String>,
    #[serde(default)]
    pub adopted: bool,
    /// Fill level of the kernel maps with a fixed capacity.
    #[serde(default)]
    pub maps: Vec<MapFill>,
    /// Learned addresses the kernel could not store (the map was full): connections to
    /// them are refused in strict mode until space frees up.
    #[serde(default)]
    pub fqdn_insert_failures: u64,
}

/// Entries in one kernel map, and how many it holds at most.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapFill {
    pub map: String,
    pub entries: u64,
    pub capacity: u64,
}

impl MapFill {
    /// At or above this share of its capacity a map is reported as nearly full.
    pub const WARN_PERCENT: u64 = 90;

    pub fn nearly_full(&self) -> bool {
        self.capacity > 0 && self.entries * 100 >= self.capacity * Self::WARN_PERCENT
    }
}

/// One datapath event as the daemon reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// RFC 3339 UTC with milliseconds.
    pub time: String,
    pub kind: EventKind,
    pub workload: Option<String>,
    pub cgroup_id: u64,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    /// `tcp`, `udp`, `icmp`, `icmpv6`, `raw` or the IP protocol number.
    pub protocol: String,
    /// `ip:port`, `[v6]:port` or a bare ip, when known.
    pub source: Option<String>,
    pub destination: String,
    /// `allow`, `deny` or `would_deny`.
    pub verdict: String,
    /// Why: `allow_rule`, `no_rule`, `deny_list`, `raw_socket`, `learning`, ...
    pub reason: String,
    /// `connect4`, `connect6`, `sendmsg4`, `sendmsg6`, `egress` or `sock_create`.
    pub hook: String,
    pub mode: Mode,
    /// The name a recent DNS answer gave for the destination, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_name: Option<String>,
    /// Events of the same kind, workload, protocol and destination that the rate limit
    /// held back since the previous one reported: this record stands for `1 + suppressed`
    /// events. Absent when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub suppressed: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

/// Names resolved through FQDN rules (`egressctl dns`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DnsReport {
    pub names: Vec<DnsName>,
    pub stats: DnsStats,
}

/// One allowed name of one workload and the addresses it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DnsName {
    pub workload: String,
    /// The name the workload asked for.
    pub name: String,
    /// The rule that allows it (`api.vendor.com` or `*.vendor-cdn.com`).
    pub pattern: String,
    /// Answers seen for the name.
    pub hits: u64,
    pub addresses: Vec<DnsAddress>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DnsAddress {
    pub address: String,
    /// Seconds until the address stops being allowed for new connections.
    pub expires_in_secs: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DnsStats {
    pub names: usize,
    pub addresses: usize,
    pub answers_seen: u64,
    pub answers_allowed: u64,
    /// Answers the kernel ignored: not from a resolver, or matching no query.
    pub answers_rejected: u64,
    /// Addresses the kernel allowed straight from answers.
    pub kernel_inserts: u64,
    pub evicted_names: u64,
    pub dropped_addresses: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A destination not seen before for this workload.
    NewDestination,
    Denied,
    /// Strict mode would have denied it (audit mode).
    WouldDeny,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::NewDestination => "new_destination",
            EventKind::Denied => "denied",
            EventKind::WouldDeny => "would_deny",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Examples of every message kind, shared with the framing tests.
    pub(crate) fn sample_event() -> EventRecord {
        EventRecord {
            time: "2026-11-23T10:00:00.123Z".into(),
            kind: EventKind::Denied,
            workload: Some("vendor-agent".into()),
            cgroup_id: 4242,
            pid: 123,
            tid: 124,
            comm: "curl".into(),
            protocol: "tcp".into(),
            source: Some("10.0.0.1:5555".into()),
            destination: "127.0.0.9:80".into(),
            verdict: "deny".into(),
            reason: "no_rule".into(),
            hook: "connect4".into(),
            mode: Mode::Strict,
            dns_name: None,
            suppressed: 0,
        }
    }

    pub(crate) fn sample_status() -> StatusReport {
        StatusReport {
            version: "0.1.0".into(),
            pid: 77,
            started_at: "2026-11-23T09:00:00Z".into(),
            policy: PolicyStatus {
                path: "/etc/egressd/policy.toml".into(),
                sha256: "ab".repeat(32),
                loaded_at: "2026-11-23T09:00:01Z".into(),
                last_error: Some(ReloadFailure {
                    at: "2026-11-23T09:30:00Z".into(),
                    message: "/etc/egressd/policy.toml:3:1: unknown field `alow`".into(),
                }),
            },
            default_mode: ModeStatus {
                mode: Mode::Audit,
                source: ModeSource::File,
            },
            unmatched: "allow".into(),
            workloads: vec![WorkloadStatus {
                name: "vendor-agent".into(),
                id: 1,
                mode: Mode::Strict,
                mode_source: ModeSource::Command,
                cgroup: Some("system.slice/vendor-agent.service".into()),
                cgroups: vec!["/sys/fs/cgroup/system.slice/vendor-agent.service".into()],
                cidr_rules: 2,
                fqdn_rules: 1,
                raw_sockets: false,
                kernel_mode: None,
            }],
            datapath: DatapathStatus {
                cgroup_root: "/sys/fs/cgroup".into(),
                programs: vec!["connect4".into(), "connect6".into()],
                events: 10,
                ring_buffer_drops: 0,
                allowed: 5,
                denied: 3,
                would_deny: 2,
                dns_answers: 0,
                dns_answer_drops: 0,
                dns_resolvers: Vec::new(),
                dns_search_domains: Vec::new(),
                dns_queries_refused: 0,
                pin_dir: None,
                adopted: false,
                maps: Vec::new(),
                fqdn_insert_failures: 0,
            },
            observe: None,
            limits: None,
            events: None,
        }
    }

    pub(crate) fn all_requests() -> Vec<Request> {
        let mut requests = vec![Request::Status, Request::Reload];
        for mode in ModeSetting::ALL {
            requests.push(Request::SetMode {
                mode,
                workload: None,
            });
            requests.push(Request::SetMode {
                mode,
                workload: Some("web".into()),
            });
        }
        requests.push(Request::Events {
            follow: false,
            limit: None,
        });
        requests.push(Request::Events {
            follow: true,
            limit: Some(50),
        });
        requests
    }

    pub(crate) fn all_responses() -> Vec<Response> {
        let mut no_error = sample_status();
        no_error.policy.last_error = None;
        let mut new_destination = sample_event();
        new_destination.kind = EventKind::NewDestination;
        new_destination.workload = None;
        new_destination.source = None;
        let mut would_deny = sample_event();
        would_deny.kind = EventKind::WouldDeny;
        would_deny.suppressed = 41;
        let mut limited = sample_status();
        limited.workloads[0].kernel_mode = Some(Mode::Audit);
        limited.limits = Some(LimitsStatus {
            on_full: "allow".into(),
            overflows: vec![MapOverflow {
                map: "fqdn_addresses".into(),
                capacity: 131_072,
                workload: "vendor-agent".into(),
                entries: 3,
                since: "2026-11-23T09:40:00Z".into(),
                effect: "runs as audit".into(),
                examples: vec!["127.0.0.9".into()],
            }],
            fqdn_store_failures: 3,
            cgroup_store_failures: 0,
        });
        limited.events = Some(EventsStatus {
            limit: "5 then 1/s".into(),
            published: 7,
            suppressed: 1000,
            unreported: 0,
            by_workload: vec![WorkloadEvents {
                workload: "vendor-agent".into(),
                published: 7,
                suppressed: 1000,
            }],
        });
        vec![
            Response::Status(Box::new(sample_status())),
            Response::Status(Box::new(no_error)),
            Response::Status(Box::new(limited)),
            Response::Done {
                message: "reloaded".into(),
            },
            Response::Error {
                message: "no workload named \"x\"".into(),
            },
            Response::Event(sample_event()),
            Response::Event(new_destination),
            Response::Event(would_deny),
            Response::EndOfEvents,
        ]
    }

    #[test]
    fn kind_is_the_wire_tag_and_only_reads_are_read_only() {
        let mut requests = all_requests();
        requests.extend([Request::Dns { workload: None }, Request::Flush]);
        for request in requests {
            let json = serde_json::to_value(&request).expect("serialize");
            assert_eq!(json["request"], request.kind(), "{json}");
            let read_only = matches!(request.kind(), "status" | "events" | "dns");
            assert_eq!(request.is_read_only(), read_only, "{json}");
        }
    }

    #[test]
    fn every_request_round_trips() {
        for request in all_requests() {
            let json = serde_json::to_string(&request).expect("serialize");
            let back: Request = serde_json::from_str(&json).expect(&json);
            assert_eq!(back, request, "{json}");
        }
    }

    #[test]
    fn every_response_round_trips() {
        for response in all_responses() {
            let json = serde_json::to_string(&response).expect("serialize");
            let back: Response = serde_json::from_str(&json).expect(&json);
            assert_eq!(back, response, "{json}");
        }
    }

    #[test]
    fn wire_shapes_are_stable() {
        let set_mode = Request::SetMode {
            mode: ModeSetting::File,
            workload: Some("web".into()),
        };
        assert_eq!(
            serde_json::to_value(&set_mode).expect("serialize"),
            serde_json::json!({"request": "set_mode", "mode": "file", "workload": "web"})
        );
        assert_eq!(
            serde_json::to_value(Request::Status).expect("serialize"),
            serde_json::json!({"request": "status"})
        );
        assert_eq!(
            serde_json::to_value(Response::EndOfEvents).expect("serialize"),
            serde_json::json!({"response": "end_of_events"})
        );
        let event = serde_json::to_value(Response::Event(sample_event())).expect("serialize");
        assert!(
            event.get("suppressed").is_none(),
            "absent when nothing was held back: {event}"
        );
        assert_eq!(event["response"], "event");
        assert_eq!(event["kind"], "denied");
        assert_eq!(event["mode"], "strict");
        let status =
            serde_json::to_value(Response::Status(Box::new(sample_status()))).expect("serialize");
        assert_eq!(status["response"], "status");
        assert_eq!(status["default_mode"]["source"], "file");
        assert_eq!(status["workloads"][0]["mode_source"], "command");
    }

    #[test]
    fn optional_request_fields_may_be_omitted() {
        let request: Request =
            serde_json::from_str(r#"{"request":"set_mode","mode":"audit"}"#).expect("parse");
        assert_eq!(
            request,
            Request::SetMode {
                mode: ModeSetting::Audit,
                workload: None
            }
        );
        let request: Request = serde_json::from_str(r#"{"request":"events"}"#).expect("parse");
        assert_eq!(
            request,
            Request::Events {
                follow: false,
                limit: None
            }
        );
    }

    #[test]
    fn unknown_request_fields_are_rejected() {
        // serde cannot deny unknown fields of unit variants of an internally
        // tagged enum: they are ignored there (documented on `Request`).
        let request: Request = serde_json::from_str(r#"{"request":"reload","force":true}"#)
            .expect("unit variant ignores fields");
        assert_eq!(request, Request::Reload);
        let err = serde_json::from_str::<Request>(r#"{"request":"events","folow":true}"#)
            .expect_err("unknown field");
        assert!(err.to_string().contains("folow"), "{err}");
        let err = serde_json::from_str::<Request>(
            r#"{"request":"set_mode","mode":"audit","workloads":"x"}"#,
        )
        .expect_err("unknown field");
        assert!(err.to_string().contains("workloads"), "{err}");
    }

    #[test]
    fn mode_setting_parses_and_prints() {
        for setting in ModeSetting::ALL {
            assert_eq!(setting.as_str().parse::<ModeSetting>(), Ok(setting));
            assert_eq!(setting.to_string(), setting.as_str());
        }
        assert_eq!(
            "enforce".parse::<ModeSetting>(),
            Err(UnknownModeSetting("enforce".into()))
        );
        for mode in Mode::ALL {
            assert_eq!(ModeSetting::from(mode).mode(), Some(mode));
        }
        assert_eq!(ModeSetting::File.mode(), None);
    }
}
