//! The probe's long-running actions (reload and load tests): open connections as fast as
//! possible and count what happened, or flood a resolver with queries. Each is bounded by a
//! count and a time limit, and ends early when the test creates its stop file.
//!
//! ```text
//! connect-loop STOP_FILE LIMIT_SECS ADDR PORT [ADDR PORT]...
//!     TCP connects to each target in turn, each connection reset at once (SO_LINGER 0, so
//!     no TIME_WAIT piles up), until STOP_FILE exists, LIMIT_SECS pass or 10,000,000
//!     attempts: {"ok":true,"attempts","elapsed_ms","targets":[{"address","attempts",
//!     "connected","eperm","other_errors","connected_at_ms":[first 10],"eperm_at_ms":[first
//!     10],"other_failures":[first 10],"max_connect_us"}]}
//! dns-flood STOP_FILE LIMIT_SECS RESOLVER SUFFIX NAMES
//!     queries A records of n<i>.SUFFIX (i cycling through 0..NAMES) as fast as the resolver
//!     answers, from one connected UDP socket keeping a window of queries in flight (fewer
//!     than the kernel's pending-query slots per socket): {"ok":true,"queries","answers",
//!     "addresses","timeouts","errors","elapsed_ms"}
//! ```

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use nix::sys::socket::{setsockopt, sockopt};
use serde_json::{Value, json};

use super::Failure;

/// Bound on one connect (the listener may briefly fall behind).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bounds of the arguments and of the work.
const MAX_LIMIT_SECS: u64 = 3600;
const MAX_ATTEMPTS: u64 = 10_000_000;
const MAX_TARGETS: usize = 16;
const MAX_NAMES: u32 = 1_000_000;
/// Outcomes of each kind listed with their time.
const LISTED: usize = 10;
/// The stop file is looked for every this many attempts (a stat per connect would be most of
/// the work).
const STOP_CHECK_EVERY: u64 = 16;
/// Queries in flight at once on the flood's socket: the kernel remembers 8 per socket.
const DNS_WINDOW: usize = 6;
/// A query without an answer for this long is given up (and counted as a timeout).
const DNS_TIMEOUT: Duration = Duration::from_secs(2);
const DNS_PORT: u16 = 53;

#[derive(Debug)]
pub enum Action {
    ConnectLoop {
        stop_file: PathBuf,
        limit: Duration,
        targets: Vec<SocketAddr>,
    },
    DnsFlood {
        stop_file: PathBuf,
        limit: Duration,
        resolver: IpAddr,
        suffix: String,
        names: u32,
    },
}

/// The load action `words` name; `None` when they name none.
pub fn parse(words: &[&str]) -> Option<Result<Action, String>> {
    let action = match words {
        ["connect-loop", stop_file, limit, targets @ ..] => (|| {
            if targets.is_empty() || targets.len() % 2 != 0 || targets.len() / 2 > MAX_TARGETS {
                return Err(format!("expected 1 to {MAX_TARGETS} ADDR PORT pairs"));
            }
            let targets = targets
                .chunks(2)
                .map(|pair| {
                    let ip: IpAddr = pair[0]
                        .parse()
                        .map_err(|err| format!("bad address {:?}: {err}", pair[0]))?;
                    let port: u16 = pair[1]
                        .parse()
                        .map_err(|err| format!("bad port {:?}: {err}", pair[1]))?;
                    Ok(SocketAddr::new(ip, port))
                })
                .collect::<Result<Vec<_>, String>>()?;
            Ok(Action::ConnectLoop {
                stop_file: PathBuf::from(stop_file),
                limit: limit_secs(limit)?,
                targets,
            })
        })(),
        ["dns-flood", stop_file, limit, resolver, suffix, names] => (|| {
            Name::from_ascii(suffix).map_err(|err| format!("bad suffix {suffix:?}: {err}"))?;
            let names: u32 = names
                .parse()
                .map_err(|err| format!("bad NAMES {names:?}: {err}"))?;
            if !(1..=MAX_NAMES).contains(&names) {
                return Err(format!("NAMES must be 1 to {MAX_NAMES}"));
            }
            Ok(Action::DnsFlood {
                stop_file: PathBuf::from(stop_file),
                limit: limit_secs(limit)?,
                resolver: resolver
                    .parse()
                    .map_err(|err| format!("bad resolver {resolver:?}: {err}"))?,
                suffix: (*suffix).to_owned(),
                names,
            })
        })(),
        _ => return None,
    };
    Some(action)
}

fn limit_secs(text: &str) -> Result<Duration, String> {
    let secs: u64 = text
        .parse()
        .map_err(|err| format!("bad LIMIT_SECS {text:?}: {err}"))?;
    if secs == 0 || secs > MAX_LIMIT_SECS {
        return Err(format!("LIMIT_SECS must be 1 to {MAX_LIMIT_SECS}"));
    }
    Ok(Duration::from_secs(secs))
}

pub fn run(action: Action) -> Value {
    match action {
        Action::ConnectLoop {
            stop_file,
            limit,
            targets,
        } => connect_loop(&stop_file, limit, &targets),
        Action::DnsFlood {
            stop_file,
            limit,
            resolver,
            suffix,
            names,
        } => dns_flood(&stop_file, limit, resolver, &suffix, names),
    }
}

/// What happened to the connects to one target.
struct TargetCounts {
    address: SocketAddr,
    attempts: u64,
    connected: u64,
    eperm: u64,
    other_errors: u64,
    connected_at_ms: Vec<u64>,
    eperm_at_ms: Vec<u64>,
    other_failures: Vec<Value>,
    max_connect: Duration,
}

impl TargetCounts {
    fn new(address: SocketAddr) -> Self {
        TargetCounts {
            address,
            attempts: 0,
            connected: 0,
            eperm: 0,
            other_errors: 0,
            connected_at_ms: Vec::new(),
            eperm_at_ms: Vec::new(),
            other_failures: Vec::new(),
            max_connect: Duration::ZERO,
        }
    }

    fn json(&self) -> Value {
        json!({
            "address": self.address.to_string(),
            "attempts": self.attempts,
            "connected": self.connected,
            "eperm": self.eperm,
            "other_errors": self.other_errors,
            "connected_at_ms": self.connected_at_ms,
            "eperm_at_ms": self.eperm_at_ms,
            "other_failures": self.other_failures,
            "max_connect_us": u64::try_from(self.max_connect.as_micros()).unwrap_or(u64::MAX),
        })
    }
}

fn note<T>(list: &mut Vec<T>, item: T) {
    if list.len() < LISTED {
        list.push(item);
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// One connect, reset at once; the outcome's errno (0 on success).
fn connect_once(addr: SocketAddr) -> Result<(), Failure> {
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .map_err(|err| Failure::io("connect", &err))?;
    // SO_LINGER 0: close sends RST, so neither side keeps the connection in TIME_WAIT and
    // millions of connects never run out of ports.
    setsockopt(
        &stream,
        sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )
    .map_err(|errno| Failure::errno("setsockopt", errno))?;
    Ok(())
}

fn connect_loop(stop_file: &Path, limit: Duration, targets: &[SocketAddr]) -> Value {
    let started = Instant::now();
    let mut counts: Vec<TargetCounts> = targets.iter().copied().map(TargetCounts::new).collect();
    let mut attempts = 0u64;
    'outer: while attempts < MAX_ATTEMPTS {
        for target in &mut counts {
            if attempts.is_multiple_of(STOP_CHECK_EVERY)
                && (started.elapsed() >= limit || stop_file.exists())
            {
                break 'outer;
            }
            attempts += 1;
            target.attempts += 1;
            let before = Instant::now();
            let outcome = connect_once(target.address);
            let at_ms = millis(started.elapsed());
            target.max_connect = target.max_connect.max(before.elapsed());
            match outcome {
                Ok(()) => {
                    target.connected += 1;
                    note(&mut target.connected_at_ms, at_ms);
                }
                Err(failure) if failure.errno == libc::EPERM => {
                    target.eperm += 1;
                    note(&mut target.eperm_at_ms, at_ms);
                }
                Err(failure) => {
                    target.other_errors += 1;
                    let mut entry = failure.json();
                    entry["at_ms"] = json!(at_ms);
                    note(&mut target.other_failures, entry);
                }
            }
        }
    }
    json!({
        "ok": true,
        "attempts": attempts,
        "elapsed_ms": millis(started.elapsed()),
        "targets": counts.iter().map(TargetCounts::json).collect::<Vec<_>>(),
    })
}

fn query(id: u16, name: &str) -> Result<Vec<u8>, Failure> {
    let mut qname =
        Name::from_ascii(name).map_err(|err| Failure::other("query", err.to_string()))?;
    qname.set_fqdn(true);
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(qname, RecordType::A));
    message
        .to_vec()
        .map_err(|err| Failure::other("query", err.to_string()))
}

/// Totals of a flood.
#[derive(Default)]
struct FloodCounts {
    queries: u64,
    answers: u64,
    addresses: u64,
    timeouts: u64,
    errors: u64,
}

fn dns_flood(
    stop_file: &Path,
    limit: Duration,
    resolver: IpAddr,
    suffix: &str,
    names: u32,
) -> Value {
    let started = Instant::now();
    let mut counts = FloodCounts::default();
    let outcome = flood(
        stop_file,
        limit,
        resolver,
        suffix,
        names,
        started,
        &mut counts,
    );
    let mut report = match outcome {
        Ok(()) => json!({ "ok": true }),
        Err(failure) => failure.json(),
    };
    report["queries"] = json!(counts.queries);
    report["answers"] = json!(counts.answers);
    report["addresses"] = json!(counts.addresses);
    report["timeouts"] = json!(counts.timeouts);
    report["errors"] = json!(counts.errors);
    report["elapsed_ms"] = json!(millis(started.elapsed()));
    report
}

fn flood(
    stop_file: &Path,
    limit: Duration,
    resolver: IpAddr,
    suffix: &str,
    names: u32,
    started: Instant,
    counts: &mut FloodCounts,
) -> Result<(), Failure> {
    let local: SocketAddr = match resolver {
        IpAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).map_err(|err| Failure::io("bind", &err))?;
    socket
        .connect(SocketAddr::new(resolver, DNS_PORT))
        .map_err(|err| Failure::io("connect", &err))?;
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|err| Failure::io("setsockopt", &err))?;
    // Query id -> when it was sent.
    let mut in_flight: HashMap<u16, Instant> = HashMap::new();
    let mut next_id: u16 = (std::process::id() as u16).wrapping_mul(7919);
    let mut buf = [0u8; 4096];
    let mut index = 0u32;
    loop {
        let stop = started.elapsed() >= limit
            || counts.queries >= MAX_ATTEMPTS
            || (counts.queries.is_multiple_of(STOP_CHECK_EVERY) && stop_file.exists());
        if stop {
            return Ok(());
        }
        while in_flight.len() < DNS_WINDOW {
            next_id = next_id.wrapping_add(1);
            if in_flight.contains_key(&next_id) {
                continue;
            }
            let name = format!("n{index}.{suffix}");
            index = (index + 1) % names;
            socket
                .send(&query(next_id, &name)?)
                .map_err(|err| Failure::io("send", &err))?;
            in_flight.insert(next_id, Instant::now());
            counts.queries += 1;
        }
        match socket.recv(&mut buf) {
            Ok(len) => match Message::from_vec(&buf[..len]) {
                Ok(message) if in_flight.remove(&message.metadata.id).is_some() => {
                    counts.answers += 1;
                    counts.addresses += message
                        .answers
                        .iter()
                        .filter(|record| matches!(record.data, RData::A(_)))
                        .count() as u64;
                }
                _ => counts.errors += 1,
            },
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(err) => return Err(Failure::io("recv", &err)),
        }
        let before = in_flight.len();
        in_flight.retain(|_, sent| sent.elapsed() < DNS_TIMEOUT);
        counts.timeouts += (before - in_flight.len()) as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words<'a>(args: &[&'a str]) -> Vec<&'a str> {
        args.to_vec()
    }

    #[test]
    fn parses_connect_loop_targets_in_pairs() {
        let Some(Ok(Action::ConnectLoop { targets, limit, .. })) = parse(&words(&[
            "connect-loop",
            "/tmp/stop",
            "30",
            "127.0.0.2",
            "80",
            "::1",
            "443",
        ])) else {
            panic!("parse")
        };
        assert_eq!(limit, Duration::from_secs(30));
        assert_eq!(targets.len(), 2);
        assert!(targets[1].is_ipv6());
        for bad in [
            &["connect-loop", "/tmp/stop", "30"][..],
            &["connect-loop", "/tmp/stop", "30", "127.0.0.2"],
            &["connect-loop", "/tmp/stop", "0", "127.0.0.2", "80"],
            &["connect-loop", "/tmp/stop", "30", "127.0.0.2", "x"],
        ] {
            assert!(matches!(parse(bad), Some(Err(_))), "{bad:?}");
        }
    }

    #[test]
    fn parses_dns_flood() {
        assert!(matches!(
            parse(&words(&[
                "dns-flood",
                "/tmp/stop",
                "5",
                "127.0.53.1",
                "flood.test",
                "100"
            ])),
            Some(Ok(Action::DnsFlood { names: 100, .. }))
        ));
        assert!(matches!(
            parse(&words(&[
                "dns-flood",
                "/tmp/stop",
                "5",
                "127.0.53.1",
                "flood.test",
                "0"
            ])),
            Some(Err(_))
        ));
        assert!(parse(&words(&["sleep", "1"])).is_none());
    }
}
