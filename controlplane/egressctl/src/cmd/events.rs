//! `egressctl events [--follow] [--json] [--limit N]`

use std::io::{self, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::bail;
use egressd_proto::{EventKind, EventRecord, Request, Response};

use crate::client::{Client, TIMEOUT, unexpected};
use crate::text::clean;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// After the recent events, keep printing new ones until interrupted.
    #[arg(long, short)]
    pub follow: bool,
    /// Print each event as a JSON line.
    #[arg(long)]
    pub json: bool,
    /// Show at most N recent events.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
}

pub fn run(socket: &Path, args: &Args) -> anyhow::Result<ExitCode> {
    // Following waits for events as long as it takes.
    let timeout = if args.follow { None } else { Some(TIMEOUT) };
    let mut client = Client::connect(socket, timeout)?;
    client.send(&Request::Events {
        follow: args.follow,
        limit: args.limit,
    })?;
    let mut out = io::stdout().lock();
    loop {
        match client.receive()? {
            Some(Response::Event(event)) => {
                let line = if args.json {
                    serde_json::to_string(&event)?
                } else {
                    format_event(&event)
                };
                writeln!(out, "{line}")?;
                out.flush()?;
            }
            Some(Response::EndOfEvents) => return Ok(ExitCode::SUCCESS),
            Some(other) => return Err(unexpected(other)),
            None if args.follow => {
                eprintln!("egressctl: egressd closed the connection");
                return Ok(ExitCode::SUCCESS);
            }
            None => bail!("egressd closed the connection before the end of the events"),
        }
    }
}

/// One line per event:
/// `TIME KIND WORKLOAD PROTO [SOURCE ]-> DEST [(NAME)] pid=PID comm=COMM (REASON, HOOK)`.
pub fn format_event(event: &EventRecord) -> String {
    let kind = match event.kind {
        EventKind::NewDestination => "NEW",
        EventKind::Denied => "DENIED",
        EventKind::WouldDeny => "WOULD_DENY",
    };
    let workload = event.workload.as_deref().map_or("-".into(), clean);
    let source = event
        .source
        .as_deref()
        .map(|source| format!("{source} "))
        .unwrap_or_default();
    let name = event
        .dns_name
        .as_deref()
        .map(|name| format!(" ({})", clean(name)))
        .unwrap_or_default();
    format!(
        "{} {kind} {workload} {} {source}-> {}{name} pid={} comm={} ({}, {})",
        event.time,
        event.protocol,
        event.destination,
        event.pid,
        clean(&event.comm),
        event.reason,
        event.hook,
    ) + &held_back(event.suppressed)
}

/// ` +N like it held back` when the daemon's rate limit folded refusals into this one.
fn held_back(suppressed: u64) -> String {
    if suppressed > 0 {
        format!(" +{suppressed} like it held back")
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use egressd_proto::Mode;

    use super::*;

    fn event() -> EventRecord {
        EventRecord {
            time: "2026-11-23T10:00:00.123Z".into(),
            kind: EventKind::Denied,
            workload: Some("vendor-agent".into()),
            cgroup_id: 4242,
            pid: 123,
            tid: 123,
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

    #[test]
    fn denied_event() {
        assert_eq!(
            format_event(&event()),
            "2026-11-23T10:00:00.123Z DENIED vendor-agent tcp 10.0.0.1:5555 -> 127.0.0.9:80 \
             pid=123 comm=curl (no_rule, connect4)"
        );
    }

    #[test]
    fn held_back_refusals_are_counted_on_the_line() {
        let mut event = event();
        event.suppressed = 999;
        assert!(
            format_event(&event).ends_with("(no_rule, connect4) +999 like it held back"),
            "{}",
            format_event(&event)
        );
    }

    #[test]
    fn new_destination_without_workload_or_source() {
        let mut event = event();
        event.kind = EventKind::NewDestination;
        event.workload = None;
        event.source = None;
        event.protocol = "udp".into();
        event.destination = "[2001:db8::1]:53".into();
        event.reason = "learning".into();
        event.hook = "sendmsg6".into();
        assert_eq!(
            format_event(&event),
            "2026-11-23T10:00:00.123Z NEW - udp -> [2001:db8::1]:53 pid=123 comm=curl \
             (learning, sendmsg6)"
        );
    }

    #[test]
    fn would_deny_and_hostile_comm() {
        let mut event = event();
        event.kind = EventKind::WouldDeny;
        event.comm = "x\x1b]0;pwned\x07".into();
        let line = format_event(&event);
        assert!(line.contains(" WOULD_DENY "), "{line}");
        assert!(line.contains("comm=x\\u{1b}]0;pwned\\u{7} "), "{line}");
        assert!(!line.chars().any(char::is_control), "{line}");
    }
}
