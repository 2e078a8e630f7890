//! Kernel events: named, printed as JSON lines on stdout (or readable lines on a terminal),
//! kept in a bounded backlog for `egressctl events`, and fanned out to followers.

use std::collections::VecDeque;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Instant;

use egressd_datapath::{Event, EventKind, Hook};
use egressd_proto::{EventKind as WireKind, EventRecord, EventsStatus};
use serde::Serialize;
use tokio::sync::broadcast;

use crate::ratelimit::RefusalLimiter;

/// Events kept for `egressctl events` without `--follow`.
pub const BACKLOG: usize = 10_000;
const FOLLOWER_QUEUE: usize = 4096;

fn protocol_name(protocol: u8, hook: Hook) -> String {
    match (protocol, hook) {
        (_, Hook::SockCreate) => "raw".to_owned(),
        (6, _) => "tcp".to_owned(),
        (17, _) => "udp".to_owned(),
        (1, _) => "icmp".to_owned(),
        (58, _) => "icmpv6".to_owned(),
        (other, _) => other.to_string(),
    }
}

fn endpoint(addr: Option<IpAddr>, port: Option<u16>) -> Option<String> {
    let addr = addr?;
    Some(match port {
        Some(port) => SocketAddr::new(addr, port).to_string(),
        None => addr.to_string(),
    })
}

pub fn record(event: &Event, workload: Option<String>, dns_name: Option<String>) -> EventRecord {
    EventRecord {
        time: crate::engine::rfc3339(event.time),
        kind: match event.kind {
            EventKind::NewDestination => WireKind::NewDestination,
            EventKind::Denied => WireKind::Denied,
            EventKind::WouldDeny => WireKind::WouldDeny,
        },
        workload,
        cgroup_id: event.cgroup_id,
        pid: event.tgid,
        tid: event.tid,
        comm: event.comm.clone(),
        protocol: protocol_name(event.protocol, event.hook),
        source: endpoint(event.source, event.source_port),
        destination: endpoint(event.destination, event.destination_port)
            .unwrap_or_else(|| "-".to_owned()),
        verdict: match event.verdict {
            egressd_datapath::Verdict::Allow => "allow",
            egressd_datapath::Verdict::Deny => "deny",
            egressd_datapath::Verdict::WouldDeny => "would_deny",
        }
        .to_owned(),
        reason: event.reason.as_str().to_owned(),
        hook: event.hook.as_str().to_owned(),
        mode: event.mode,
        dns_name,
        suppressed: 0,
    }
}

/// The event for a DNS query the kernel refused (or, in audit mode, would refuse): its name
/// matches none of the workload's FQDN rules (`dns_queries = "allowlisted"`).
pub fn refused_query(
    query: &egressd_datapath::DnsAnswer,
    verdict: egressd_datapath::Verdict,
    workload: Option<String>,
    name: Option<String>,
    mode: egressd_proto::Mode,
) -> EventRecord {
    let denied = verdict == egressd_datapath::Verdict::Deny;
    EventRecord {
        time: crate::engine::rfc3339(query.time),
        kind: if denied {
            WireKind::Denied
        } else {
            WireKind::WouldDeny
        },
        workload,
        cgroup_id: query.cgroup_id,
        pid: query.pid,
        tid: query.tid,
        comm: query.comm.clone(),
        protocol: if query.tcp { "tcp" } else { "udp" }.to_owned(),
        source: endpoint(Some(query.client.ip()), Some(query.client.port())),
        destination: endpoint(Some(query.server.ip()), Some(query.server.port()))
            .unwrap_or_else(|| "-".to_owned()),
        verdict: if denied { "deny" } else { "would_deny" }.to_owned(),
        reason: "dns_query".to_owned(),
        hook: "egress".to_owned(),
        mode,
        dns_name: name,
        suppressed: 0,
    }
}

#[derive(Serialize)]
struct StdoutLine<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(flatten)]
    event: &'a EventRecord,
}

pub struct EventHub {
    backlog: Mutex<VecDeque<EventRecord>>,
    followers: broadcast::Sender<EventRecord>,
    json_stdout: bool,
    /// Holds back refusals beyond the rate limit (see `ratelimit`).
    limiter: Mutex<RefusalLimiter>,
}

impl EventHub {
    pub fn new(json_stdout: bool) -> Self {
        EventHub {
            // Exactly the backlog's size (grown by doubling it would end at 16,384 slots);
            // slots are resident only once written.
            backlog: Mutex::new(VecDeque::with_capacity(BACKLOG)),
            followers: broadcast::channel(FOLLOWER_QUEUE).0,
            json_stdout,
            limiter: Mutex::new(RefusalLimiter::default()),
        }
    }

    /// Publishes `record` unless the refusal rate limit holds it back; returns whether it
    /// was published.
    pub fn offer(&self, record: EventRecord) -> bool {
        let admitted = match self.limiter.lock() {
            Ok(mut limiter) => limiter.admit(record, Instant::now()),
            // A poisoned limiter limits nothing.
            Err(_) => Some(record),
        };
        match admitted {
            Some(record) => {
                self.publish(record);
                true
            }
            None => false,
        }
    }

    /// Publishes what the rate limit held back and may now be reported (each the newest
    /// refusal of its destination, carrying the count of the others).
    pub fn flush_held(&self) {
        let records = match self.limiter.lock() {
            Ok(mut limiter) => limiter.flush(Instant::now()),
            Err(_) => Vec::new(),
        };
        for record in records {
            self.publish(record);
        }
    }

    /// The rate limit and what it held back.
    pub fn limit_status(&self) -> EventsStatus {
        self.limiter
            .lock()
            .map(|limiter| limiter.status())
            .unwrap_or_default()
    }

    pub fn publish(&self, record: EventRecord) {
        self.print(&record);
        if let Ok(mut backlog) = self.backlog.lock() {
            if backlog.len() == BACKLOG {
                backlog.pop_front();
            }
            backlog.push_back(record.clone());
        }
        // No followers is not an error.
        let _ = self.followers.send(record);
    }

    fn print(&self, record: &EventRecord) {
        let mut out = std::io::stdout().lock();
        let written = if self.json_stdout {
            serde_json::to_string(&StdoutLine {
                kind: "event",
                event: record,
            })
            .map(|line| writeln!(out, "{line}"))
        } else {
            Ok(writeln!(
                out,
                "{} {:<10} {} {} {} -> {} pid={} comm={} ({}, {}){}",
                record.time,
                record.kind.as_str().to_uppercase(),
                record.workload.as_deref().unwrap_or("-"),
                record.protocol,
                record.source.as_deref().unwrap_or("-"),
                record.destination,
                record.pid,
                record.comm,
                record.reason,
                record.hook,
                if record.suppressed > 0 {
                    format!(" +{} like it held back", record.suppressed)
                } else {
                    String::new()
                }
            ))
        };
        // stdout closed (journald restarting): events stay in the backlog.
        drop(written);
    }

    /// The newest `limit` events, oldest first.
    pub fn recent(&self, limit: usize) -> Vec<EventRecord> {
        match self.backlog.lock() {
            Ok(backlog) => {
                let skip = backlog.len().saturating_sub(limit);
                backlog.iter().skip(skip).cloned().collect()
            }
            Err(_) => Vec::new(),
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<EventRecord> {
        self.followers.subscribe()
    }
}
