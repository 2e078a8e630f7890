//! The probe's DNS actions (FQDN tests): resolve a name through a resolver, the way a
//! stub resolver does (a fresh socket per lookup, a random id), and connect to what it
//! answered at once.
//!
//! ```text
//! resolve-connect RESOLVER NAME PORT [aaaa] [tcp-dns]
//!     query A (AAAA with `aaaa`) over UDP (TCP with `tcp-dns`), connect TCP to the first
//!     address at PORT: {"ok","errno","step","addresses":[..],"rcode","id"}
//! race RESOLVER COUNT PORT LIMIT_SECS
//!     for i in 0..COUNT: resolve r<i>.race.test, connect to its address at PORT at once;
//!     stops at LIMIT_SECS: {"ok","count","completed","connected","eperm","other_errors",
//!     "dns_errors","failures":[first 10],"elapsed_ms"}
//! connect-hold ADDR PORT GO_FILE
//!     connect, send a byte and read its echo; wait for GO_FILE (at most 60 s); send and
//!     read the echo again: {"ok","step","errno"}
//! dns-query RESOLVER NAME WAIT_MS [aaaa]
//!     send one query from an unconnected UDP socket and report every datagram that
//!     arrives within WAIT_MS: {"ok":true,"local_port","id","received":[{"from","len",
//!     "id","parsed","addresses"}]}
//! ```

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use serde_json::{Value, json};

use super::Failure;

const DNS_PORT: u16 = 53;
/// Bound on each step (a DNS exchange, a connect, an echo).
const STEP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `connect-hold` waits for its go file.
const HOLD_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bounds of the arguments.
const MAX_RACE_COUNT: u64 = 1_000_000;
const MAX_RACE_SECS: u64 = 600;
const MAX_WAIT_MS: u64 = 60_000;
/// Failures `race` lists in full.
const RACE_FAILURES_LISTED: usize = 10;

#[derive(Debug)]
pub enum Action {
    ResolveConnect {
        resolver: IpAddr,
        name: String,
        port: u16,
        kind: RecordType,
        tcp: bool,
    },
    Race {
        resolver: IpAddr,
        count: u64,
        port: u16,
        limit: Duration,
    },
    ConnectHold {
        addr: SocketAddr,
        go_file: PathBuf,
    },
    Query {
        resolver: IpAddr,
        name: String,
        wait: Duration,
        kind: RecordType,
    },
}

/// The DNS action `words` name; `None` when they name none.
pub fn parse(words: &[&str]) -> Option<Result<Action, String>> {
    let action = match words {
        ["resolve-connect", resolver, name, port, flags @ ..] => (|| {
            let mut kind = RecordType::A;
            let mut tcp = false;
            for flag in flags {
                match *flag {
                    "aaaa" => kind = RecordType::AAAA,
                    "tcp-dns" => tcp = true,
                    other => return Err(format!("unknown flag {other:?}")),
                }
            }
            Ok(Action::ResolveConnect {
                resolver: ip(resolver)?,
                name: dns_name(name)?,
                port: number(port, u16::MAX.into())?,
                kind,
                tcp,
            })
        })(),
        ["race", resolver, count, port, limit] => (|| {
            Ok(Action::Race {
                resolver: ip(resolver)?,
                count: number(count, MAX_RACE_COUNT)?,
                port: number(port, u16::MAX.into())?,
                limit: Duration::from_secs(number(limit, MAX_RACE_SECS)?),
            })
        })(),
        ["connect-hold", addr, port, go_file] => (|| {
            Ok(Action::ConnectHold {
                addr: SocketAddr::new(ip(addr)?, number(port, u16::MAX.into())?),
                go_file: PathBuf::from(go_file),
            })
        })(),
        ["dns-query", resolver, name, wait_ms, flags @ ..] => (|| {
            let kind = match flags {
                [] => RecordType::A,
                ["aaaa"] => RecordType::AAAA,
                other => return Err(format!("unknown flags {other:?}")),
            };
            Ok(Action::Query {
                resolver: ip(resolver)?,
                name: dns_name(name)?,
                wait: Duration::from_millis(number(wait_ms, MAX_WAIT_MS)?),
                kind,
            })
        })(),
        _ => return None,
    };
    Some(action)
}

fn ip(text: &str) -> Result<IpAddr, String> {
    text.parse()
        .map_err(|err| format!("bad address {text:?}: {err}"))
}

fn dns_name(text: &str) -> Result<String, String> {
    Name::from_ascii(text).map_err(|err| format!("bad name {text:?}: {err}"))?;
    Ok(text.to_owned())
}

fn number<T: TryFrom<u64>>(text: &str, max: u64) -> Result<T, String> {
    let value: u64 = text
        .parse()
        .map_err(|err| format!("bad number {text:?}: {err}"))?;
    if value > max {
        return Err(format!("{value} is above the limit {max}"));
    }
    T::try_from(value).map_err(|_| format!("{value} is out of range"))
}

pub fn run(action: Action) -> Value {
    match action {
        Action::ResolveConnect {
            resolver,
            name,
            port,
            kind,
            tcp,
        } => resolve_connect(resolver, &name, port, kind, tcp),
        Action::Race {
            resolver,
            count,
            port,
            limit,
        } => race(resolver, count, port, limit),
        Action::ConnectHold { addr, go_file } => connect_hold(addr, &go_file),
        Action::Query {
            resolver,
            name,
            wait,
            kind,
        } => query(resolver, &name, wait, kind),
    }
}

/// Query ids: random enough (time and pid), never repeated within one probe.
fn next_id() -> u16 {
    static COUNTER: AtomicU16 = AtomicU16::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.subsec_nanos())
        .unwrap_or(0);
    let seed = (nanos ^ std::process::id().rotate_left(16)) as u16;
    seed.wrapping_add(COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(40503))
}

fn query_bytes(id: u16, name: &str, kind: RecordType) -> Result<Vec<u8>, Failure> {
    let mut qname =
        Name::from_ascii(name).map_err(|err| Failure::other("query", err.to_string()))?;
    qname.set_fqdn(true);
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(qname, kind));
    message
        .to_vec()
        .map_err(|err| Failure::other("query", err.to_string()))
}

fn unspecified(for_addr: IpAddr) -> SocketAddr {
    match for_addr {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// A decoded answer: its id, response code and A/AAAA addresses in order.
struct Answer {
    id: u16,
    rcode: String,
    addresses: Vec<IpAddr>,
}

fn decode(bytes: &[u8]) -> Result<Answer, String> {
    let message = Message::from_vec(bytes).map_err(|err| err.to_string())?;
    Ok(Answer {
        id: message.metadata.id,
        rcode: format!("{:?}", message.metadata.response_code),
        addresses: message
            .answers
            .iter()
            .filter_map(|record| match &record.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                _ => None,
            })
            .collect(),
    })
}

/// One lookup over UDP from a fresh connected socket (as glibc does); waits for the
/// answer with the query's id.
fn resolve_udp(resolver: IpAddr, name: &str, kind: RecordType) -> Result<Answer, Failure> {
    let server = SocketAddr::new(resolver, DNS_PORT);
    let socket = UdpSocket::bind(unspecified(resolver)).map_err(|err| Failure::io("bind", &err))?;
    socket
        .connect(server)
        .map_err(|err| Failure::io("dns connect", &err))?;
    let id = next_id();
    socket
        .send(&query_bytes(id, name, kind)?)
        .map_err(|err| Failure::io("dns send", &err))?;
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut buf = [0u8; 65535];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Failure::other("dns recv", "no answer with the query's id"));
        }
        socket
            .set_read_timeout(Some(left))
            .map_err(|err| Failure::io("setsockopt", &err))?;
        let len = socket
            .recv(&mut buf)
            .map_err(|err| Failure::io("dns recv", &err))?;
        match decode(&buf[..len]) {
            Ok(answer) if answer.id == id => return Ok(answer),
            // Another id or garbage: a stub resolver keeps waiting.
            _ => continue,
        }
    }
}

/// One lookup over TCP (two-byte length prefix).
fn resolve_tcp(resolver: IpAddr, name: &str, kind: RecordType) -> Result<Answer, Failure> {
    let server = SocketAddr::new(resolver, DNS_PORT);
    let mut stream = TcpStream::connect_timeout(&server, STEP_TIMEOUT)
        .map_err(|err| Failure::io("dns connect", &err))?;
    stream
        .set_read_timeout(Some(STEP_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(STEP_TIMEOUT)))
        .map_err(|err| Failure::io("setsockopt", &err))?;
    let id = next_id();
    let query = query_bytes(id, name, kind)?;
    let len = u16::try_from(query.len()).map_err(|_| Failure::other("query", "too long"))?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(&query);
    stream
        .write_all(&framed)
        .map_err(|err| Failure::io("dns send", &err))?;
    let mut prefix = [0u8; 2];
    stream
        .read_exact(&mut prefix)
        .map_err(|err| Failure::io("dns recv", &err))?;
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
    stream
        .read_exact(&mut message)
        .map_err(|err| Failure::io("dns recv", &err))?;
    let answer = decode(&message).map_err(|err| Failure::other("dns decode", err))?;
    if answer.id != id {
        return Err(Failure::other("dns decode", "the answer has another id"));
    }
    Ok(answer)
}

fn resolve_connect(resolver: IpAddr, name: &str, port: u16, kind: RecordType, tcp: bool) -> Value {
    let answer = if tcp {
        resolve_tcp(resolver, name, kind)
    } else {
        resolve_udp(resolver, name, kind)
    };
    let answer = match answer {
        Ok(answer) => answer,
        Err(failure) => return failure.json(),
    };
    let addresses: Vec<String> = answer.addresses.iter().map(IpAddr::to_string).collect();
    let outcome = match answer.addresses.first() {
        None => Err(Failure::other("dns answer", "the answer has no address")),
        Some(addr) => TcpStream::connect_timeout(&SocketAddr::new(*addr, port), STEP_TIMEOUT)
            .map(drop)
            .map_err(|err| Failure::io("connect", &err)),
    };
    let mut report = match outcome {
        Ok(()) => json!({ "ok": true }),
        Err(failure) => failure.json(),
    };
    report["addresses"] = json!(addresses);
    report["rcode"] = json!(answer.rcode);
    report["id"] = json!(answer.id);
    report
}

fn race(resolver: IpAddr, count: u64, port: u16, limit: Duration) -> Value {
    let started = Instant::now();
    let (mut completed, mut connected, mut eperm, mut other, mut dns_errors) = (0u64, 0, 0, 0, 0);
    let mut failures = Vec::new();
    let note = |failures: &mut Vec<Value>, value: Value| {
        if failures.len() < RACE_FAILURES_LISTED {
            failures.push(value);
        }
    };
    for i in 0..count {
        if started.elapsed() > limit {
            break;
        }
        let name = format!("r{i}.race.test");
        completed += 1;
        let addr = match resolve_udp(resolver, &name, RecordType::A) {
            Ok(answer) => match answer.addresses.first() {
                Some(addr) => *addr,
                None => {
                    dns_errors += 1;
                    note(
                        &mut failures,
                        json!({ "i": i, "name": name, "step": "dns answer", "rcode": answer.rcode }),
                    );
                    continue;
                }
            },
            Err(failure) => {
                dns_errors += 1;
                note(
                    &mut failures,
                    json!({ "i": i, "name": name, "step": failure.step, "errno": failure.errno, "error": failure.error }),
                );
                continue;
            }
        };
        match TcpStream::connect_timeout(&SocketAddr::new(addr, port), STEP_TIMEOUT) {
            Ok(_) => connected += 1,
            Err(err) => {
                let failure = Failure::io("connect", &err);
                if failure.errno == libc::EPERM {
                    eperm += 1;
                } else {
                    other += 1;
                }
                note(
                    &mut failures,
                    json!({ "i": i, "name": name, "address": addr.to_string(), "step": "connect",
                            "errno": failure.errno, "error": failure.error,
                            "ms_since_start": started.elapsed().as_millis() as u64 }),
                );
            }
        }
    }
    json!({
        "ok": completed == count && connected == count,
        "count": count,
        "completed": completed,
        "connected": connected,
        "eperm": eperm,
        "other_errors": other,
        "dns_errors": dns_errors,
        "failures": failures,
        "elapsed_ms": started.elapsed().as_millis() as u64,
    })
}

fn echo(stream: &mut TcpStream, byte: u8, step: &'static str) -> Result<(), Failure> {
    stream
        .write_all(&[byte])
        .map_err(|err| Failure::io(step, &err))?;
    let mut back = [0u8; 1];
    stream
        .read_exact(&mut back)
        .map_err(|err| Failure::io(step, &err))?;
    if back[0] != byte {
        return Err(Failure::other(step, format!("echoed {:?}", back[0])));
    }
    Ok(())
}

fn connect_hold(addr: SocketAddr, go_file: &std::path::Path) -> Value {
    let outcome = (|| {
        let mut stream = TcpStream::connect_timeout(&addr, STEP_TIMEOUT)
            .map_err(|err| Failure::io("connect", &err))?;
        stream
            .set_read_timeout(Some(STEP_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(STEP_TIMEOUT)))
            .map_err(|err| Failure::io("setsockopt", &err))?;
        echo(&mut stream, b'1', "first echo")?;
        let deadline = Instant::now() + HOLD_TIMEOUT;
        while !go_file.exists() {
            if Instant::now() > deadline {
                return Err(Failure::other("wait", "the go file never appeared"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        echo(&mut stream, b'2', "second echo")
    })();
    match outcome {
        Ok(()) => json!({ "ok": true }),
        Err(failure) => failure.json(),
    }
}

fn query(resolver: IpAddr, name: &str, wait: Duration, kind: RecordType) -> Value {
    let outcome = (|| {
        let socket =
            UdpSocket::bind(unspecified(resolver)).map_err(|err| Failure::io("bind", &err))?;
        let local_port = socket
            .local_addr()
            .map_err(|err| Failure::io("getsockname", &err))?
            .port();
        let id = next_id();
        socket
            .send_to(
                &query_bytes(id, name, kind)?,
                SocketAddr::new(resolver, DNS_PORT),
            )
            .map_err(|err| Failure::io("dns send", &err))?;
        let deadline = Instant::now() + wait;
        let mut received = Vec::new();
        let mut buf = [0u8; 65535];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            socket
                .set_read_timeout(Some(left))
                .map_err(|err| Failure::io("setsockopt", &err))?;
            let (len, from) = match socket.recv_from(&mut buf) {
                Ok(got) => got,
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                Err(err) => return Err(Failure::io("dns recv", &err)),
            };
            let mut entry = json!({ "from": from.to_string(), "len": len });
            match decode(&buf[..len]) {
                Ok(answer) => {
                    entry["parsed"] = json!(true);
                    entry["id"] = json!(answer.id);
                    entry["addresses"] = json!(
                        answer
                            .addresses
                            .iter()
                            .map(IpAddr::to_string)
                            .collect::<Vec<_>>()
                    );
                }
                Err(err) => {
                    entry["parsed"] = json!(false);
                    entry["error"] = json!(err);
                }
            }
            received.push(entry);
        }
        Ok(json!({ "ok": true, "local_port": local_port, "id": id, "received": received }))
    })();
    outcome.unwrap_or_else(|failure| failure.json())
}
