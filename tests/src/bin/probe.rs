//! `egressd-probe`: performs ONE network action and prints one JSON line,
//! `{"ok":true}` or `{"ok":false,"errno":N,"error":"...","step":"..."}`, then
//! exits 0. Only a usage error exits non-zero (2).
//!
//! The tests start it inside a workload cgroup (it is moved there before
//! `exec`), so every socket it creates belongs to that cgroup.
//!
//! ```text
//! egressd-probe tcp-connect ADDR PORT          # AF_INET, or AF_INET6 for v6 and ::ffff:a.b.c.d
//! egressd-probe udp-connect-send ADDR PORT     # connect(), then send()
//! egressd-probe udp-sendto ADDR PORT           # unconnected sendto()
//! egressd-probe icmp-raw ADDR                  # SOCK_RAW IPPROTO_ICMP(V6) echo request
//! egressd-probe icmp-ping ADDR                 # SOCK_DGRAM IPPROTO_ICMP(V6) ping socket;
//!                                              # adds "reply": whether the echo reply came
//! egressd-probe raw-create                     # socket(AF_INET, SOCK_RAW, IPPROTO_ICMP)
//! egressd-probe fork-connect ADDR PORT PROCS   # socket, fork, child moves to PROCS, connects
//! egressd-probe pass-socket UNIX_PATH          # TCP socket sent with SCM_RIGHTS to UNIX_PATH
//! egressd-probe receive-connect UNIX_PATH ADDR PORT   # a socket received over UNIX_PATH
//!                                              # (SCM_RIGHTS) connects to ADDR PORT
//! egressd-probe receive-sendto UNIX_PATH ADDR PORT    # ... sends a datagram to ADDR PORT
//! egressd-probe sleep SECS
//! egressd-probe connect-pair ALLOWED_ADDR PORT REFUSED_ADDR PORT STOP_FILE
//!                                              # alternates connects to both until STOP_FILE
//!                                              # exists (at most 120 s); reports counts
//! egressd-probe thread-write ADDR PORT BYTES GO_FILE   # connects, a thread named
//!                                              # "probe-writer" writes BYTES, then holds the
//!                                              # connection until GO_FILE exists
//! egressd-probe resolve-connect RESOLVER NAME PORT [aaaa] [tcp-dns]   # DNS actions: see dns.rs
//! egressd-probe race RESOLVER COUNT PORT LIMIT_SECS
//! egressd-probe connect-hold ADDR PORT GO_FILE
//! egressd-probe dns-query RESOLVER NAME WAIT_MS [aaaa]
//! egressd-probe connect-loop STOP_FILE LIMIT_SECS ADDR PORT [ADDR PORT]...   # load actions:
//! egressd-probe dns-flood STOP_FILE LIMIT_SECS RESOLVER SUFFIX NAMES          # see load.rs
//! ```

use std::fs;
use std::io::{self, IoSlice, Read};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    self, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockProtocol, SockType,
    SockaddrStorage, UnixAddr, sockopt,
};
use nix::sys::time::{TimeVal, TimeValLike};
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, fork, pipe};
use serde_json::{Value, json};

// Beside this crate root in its own folder, so cargo does not take it for a binary.
#[path = "probe/dns.rs"]
mod dns;
#[path = "probe/load.rs"]
mod load;

/// Bound on every blocking step (connect, send, waiting for a peer).
const STEP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `pass-socket` waits for the receiver to close the connection.
const PASS_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `icmp-ping` waits for the echo reply.
const REPLY_TIMEOUT: Duration = Duration::from_millis(1000);
/// Upper bound for `sleep`.
const MAX_SLEEP_SECS: u64 = 600;
/// Payload after the ICMP echo header.
const ECHO_PAYLOAD: &[u8] = b"egressd-probe";

const USAGE: &str = "usage: egressd-probe <tcp-connect ADDR PORT | udp-connect-send ADDR PORT | \
udp-sendto ADDR PORT | icmp-raw ADDR | icmp-ping ADDR | raw-create | \
fork-connect ADDR PORT CGROUP_PROCS_FILE | pass-socket UNIX_PATH | \
receive-connect UNIX_PATH ADDR PORT | receive-sendto UNIX_PATH ADDR PORT | sleep SECS | \
resolve-connect RESOLVER NAME PORT [aaaa] [tcp-dns] | race RESOLVER COUNT PORT LIMIT_SECS | \
connect-hold ADDR PORT GO_FILE | dns-query RESOLVER NAME WAIT_MS [aaaa] | \
thread-write ADDR PORT BYTES GO_FILE | \
tcp-serve ADDR PORT BYTES GO_FILE OUT_ADDR OUT_PORT | \
connect-pair ALLOWED_ADDR PORT REFUSED_ADDR PORT STOP_FILE | \
connect-loop STOP_FILE LIMIT_SECS ADDR PORT... | \
dns-flood STOP_FILE LIMIT_SECS RESOLVER SUFFIX NAMES>";

/// Upper bound on one `connect-pair` run.
const MAX_LOOP: Duration = Duration::from_secs(120);

/// The name of the thread `thread-write` writes from.
const WRITER_THREAD: &str = "probe-writer";
/// Upper bound for `thread-write` BYTES.
const MAX_WRITE_BYTES: usize = 1 << 20;

#[derive(Debug)]
enum Action {
    TcpConnect(SocketAddr),
    UdpConnectSend(SocketAddr),
    UdpSendto(SocketAddr),
    IcmpRaw(IpAddr),
    IcmpPing(IpAddr),
    RawCreate,
    ForkConnect(SocketAddr, PathBuf),
    PassSocket(PathBuf),
    /// Receives a socket over UNIX_PATH (SCM_RIGHTS) and connects it.
    ReceiveConnect(PathBuf, SocketAddr),
    /// Receives a (UDP) socket over UNIX_PATH and sends one datagram with it to ADDR PORT.
    ReceiveSendto(PathBuf, SocketAddr),
    Sleep(u64),
    /// Connects a UDP socket and sends once (must succeed), waits until GO_FILE exists, then
    /// sends again with plain send(): the result reported is the second send's.
    UdpResendAfter(SocketAddr, PathBuf),
    /// Connects from the main thread, writes BYTES from another thread (connection pools
    /// do this), then keeps the socket open until GO_FILE exists.
    ThreadWrite(SocketAddr, usize, PathBuf),
    /// Connects alternately to an address expected to be allowed and one expected to be
    /// refused until STOP_FILE exists, and reports how each attempt ended.
    ConnectLoop(SocketAddr, SocketAddr, PathBuf),
    /// A server with an outbound connection of its own: listens on ADDR:PORT and connects to
    /// OUT; accepts one connection, waits until GO_FILE exists, then writes a little to OUT
    /// and BYTES to the accepted connection; then accepts one more and writes BYTES to it.
    TcpServe {
        listen: SocketAddr,
        bytes: usize,
        go_file: PathBuf,
        outbound: SocketAddr,
    },
    /// An action of the FQDN tests (`dns.rs`), which reports its own JSON.
    Dns(dns::Action),
    /// A long-running action of the reload and load tests (`load.rs`), which reports its
    /// own JSON.
    Load(load::Action),
}

/// Why the action failed: the step, the errno (0 when there is none) and a text.
#[derive(Debug)]
struct Failure {
    step: &'static str,
    errno: i32,
    error: String,
}

impl Failure {
    fn io(step: &'static str, err: &io::Error) -> Failure {
        Failure {
            step,
            // A timeout from connect_timeout carries no errno: report ETIMEDOUT.
            errno: err.raw_os_error().unwrap_or(match err.kind() {
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => libc::ETIMEDOUT,
                _ => 0,
            }),
            error: err.to_string(),
        }
    }

    fn errno(step: &'static str, errno: Errno) -> Failure {
        Failure {
            step,
            errno: errno as i32,
            error: errno.desc().to_owned(),
        }
    }

    fn other(step: &'static str, error: impl Into<String>) -> Failure {
        Failure {
            step,
            errno: 0,
            error: error.into(),
        }
    }

    fn json(&self) -> Value {
        json!({ "ok": false, "errno": self.errno, "error": self.error, "step": self.step })
    }
}

type Outcome = Result<(), Failure>;

fn report(outcome: Outcome) -> Value {
    match outcome {
        Ok(()) => json!({ "ok": true }),
        Err(failure) => failure.json(),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let action = match parse(&args) {
        Ok(action) => action,
        Err(message) => {
            eprintln!("egressd-probe: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let line = match action {
        Action::ForkConnect(addr, procs) => fork_connect(addr, &procs),
        Action::ConnectLoop(allowed, refused, stop_file) => {
            connect_loop(allowed, refused, &stop_file)
        }
        Action::IcmpPing(ip) => icmp_ping(ip),
        Action::Dns(action) => dns::run(action),
        Action::Load(action) => load::run(action),
        action => report(run(action)),
    };
    println!("{line}");
    ExitCode::SUCCESS
}

fn parse(args: &[String]) -> Result<Action, String> {
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    if let Some(action) = dns::parse(&words) {
        return action.map(Action::Dns);
    }
    if let Some(action) = load::parse(&words) {
        return action.map(Action::Load);
    }
    match words.as_slice() {
        ["tcp-connect", addr, port] => Ok(Action::TcpConnect(socket_addr(addr, port)?)),
        ["udp-connect-send", addr, port] => Ok(Action::UdpConnectSend(socket_addr(addr, port)?)),
        ["udp-sendto", addr, port] => Ok(Action::UdpSendto(socket_addr(addr, port)?)),
        ["icmp-raw", addr] => Ok(Action::IcmpRaw(ip(addr)?)),
        ["icmp-ping", addr] => Ok(Action::IcmpPing(ip(addr)?)),
        ["raw-create"] => Ok(Action::RawCreate),
        ["fork-connect", addr, port, procs] => Ok(Action::ForkConnect(
            socket_addr(addr, port)?,
            PathBuf::from(procs),
        )),
        ["pass-socket", path] => Ok(Action::PassSocket(PathBuf::from(path))),
        ["receive-connect", path, addr, port] => Ok(Action::ReceiveConnect(
            PathBuf::from(path),
            socket_addr(addr, port)?,
        )),
        ["receive-sendto", path, addr, port] => Ok(Action::ReceiveSendto(
            PathBuf::from(path),
            socket_addr(addr, port)?,
        )),
        ["udp-resend-after", addr, port, go_file] => Ok(Action::UdpResendAfter(
            socket_addr(addr, port)?,
            PathBuf::from(go_file),
        )),
        [
            "connect-pair",
            allowed,
            allowed_port,
            refused,
            refused_port,
            stop_file,
        ] => Ok(Action::ConnectLoop(
            socket_addr(allowed, allowed_port)?,
            socket_addr(refused, refused_port)?,
            PathBuf::from(stop_file),
        )),
        ["thread-write", addr, port, bytes, go_file] => {
            let bytes: usize = bytes
                .parse()
                .map_err(|err| format!("bad BYTES {bytes:?}: {err}"))?;
            if bytes > MAX_WRITE_BYTES {
                return Err(format!("BYTES must be at most {MAX_WRITE_BYTES}"));
            }
            Ok(Action::ThreadWrite(
                socket_addr(addr, port)?,
                bytes,
                PathBuf::from(go_file),
            ))
        }
        ["tcp-serve", addr, port, bytes, go_file, out_addr, out_port] => {
            let bytes: usize = bytes
                .parse()
                .map_err(|err| format!("bad BYTES {bytes:?}: {err}"))?;
            if bytes > MAX_WRITE_BYTES {
                return Err(format!("BYTES must be at most {MAX_WRITE_BYTES}"));
            }
            Ok(Action::TcpServe {
                listen: socket_addr(addr, port)?,
                bytes,
                go_file: PathBuf::from(go_file),
                outbound: socket_addr(out_addr, out_port)?,
            })
        }
        ["sleep", secs] => {
            let secs: u64 = secs
                .parse()
                .map_err(|err| format!("bad SECS {secs:?}: {err}"))?;
            if secs > MAX_SLEEP_SECS {
                return Err(format!("SECS must be at most {MAX_SLEEP_SECS}"));
            }
            Ok(Action::Sleep(secs))
        }
        _ => Err(format!("bad arguments {args:?}")),
    }
}

/// `{"ok":true,"allowed_ok":N,"allowed_refused":N,"refused_ok":N,"refused_refused":N,
/// "other_errors":N,"first_error":"..."}`: every attempt counted by outcome.
fn connect_loop(allowed: SocketAddr, refused: SocketAddr, stop_file: &std::path::Path) -> Value {
    let started = std::time::Instant::now();
    let (mut allowed_ok, mut allowed_refused, mut refused_ok, mut refused_refused) = (0, 0, 0, 0);
    let mut other_errors = 0u64;
    let mut first_error = String::new();
    while !stop_file.exists() && started.elapsed() < MAX_LOOP {
        for (target, ok, eperm) in [
            (allowed, &mut allowed_ok, &mut allowed_refused),
            (refused, &mut refused_ok, &mut refused_refused),
        ] {
            match TcpStream::connect_timeout(&target, STEP_TIMEOUT) {
                Ok(_) => *ok += 1,
                Err(err) if err.raw_os_error() == Some(libc::EPERM) => *eperm += 1,
                Err(err) => {
                    other_errors += 1;
                    if first_error.is_empty() {
                        first_error = format!("{target}: {err}");
                    }
                }
            }
        }
        // A few hundred rounds a second is plenty to catch a gap and spares the server.
        std::thread::sleep(Duration::from_millis(2));
    }
    json!({
        "ok": true,
        "allowed_ok": allowed_ok,
        "allowed_refused": allowed_refused,
        "refused_ok": refused_ok,
        "refused_refused": refused_refused,
        "other_errors": other_errors,
        "first_error": first_error,
    })
}

fn thread_write(addr: SocketAddr, bytes: usize, go_file: &std::path::Path) -> Outcome {
    use std::io::Write as _;
    let stream = TcpStream::connect_timeout(&addr, STEP_TIMEOUT)
        .map_err(|err| Failure::io("connect", &err))?;
    let mut writer = stream
        .try_clone()
        .map_err(|err| Failure::io("clone", &err))?;
    let go_file = go_file.to_owned();
    // The writer stays alive until the go file appears, as a pool's threads do, so that
    // the daemon can read its name.
    std::thread::Builder::new()
        .name(WRITER_THREAD.to_owned())
        .spawn(move || -> Outcome {
            writer
                .write_all(&vec![b'x'; bytes])
                .map_err(|err| Failure::io("write", &err))?;
            // Bounded wait for the test's signal: 400 polls of 50 ms.
            for _ in 0..400 {
                if go_file.exists() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(Failure::other("wait", "go file never appeared"))
        })
        .map_err(|err| Failure::io("spawn", &err))?
        .join()
        .map_err(|_| Failure::other("write", "the writer thread panicked"))??;
    drop(stream);
    Ok(())
}

fn tcp_serve(
    listen: SocketAddr,
    bytes: usize,
    go_file: &std::path::Path,
    outbound: SocketAddr,
) -> Outcome {
    use std::io::Write as _;
    let listener =
        std::net::TcpListener::bind(listen).map_err(|err| Failure::io("listen", &err))?;
    listener
        .set_nonblocking(true)
        .map_err(|err| Failure::io("set_nonblocking", &err))?;
    let mut out = TcpStream::connect_timeout(&outbound, STEP_TIMEOUT)
        .map_err(|err| Failure::io("connect", &err))?;
    let mut first = accept_bounded(&listener)?;
    // Bounded wait for the test's signal: 400 polls of 50 ms.
    let mut go = false;
    for _ in 0..400 {
        if go_file.exists() {
            go = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !go {
        return Err(Failure::other("wait", "go file never appeared"));
    }
    // Queued locally whatever the firewall does with it: the test checks what arrives.
    out.write_all(ECHO_PAYLOAD)
        .map_err(|err| Failure::io("write", &err))?;
    first
        .write_all(&vec![b'x'; bytes])
        .map_err(|err| Failure::io("write", &err))?;
    drop(first);
    let mut second = accept_bounded(&listener)?;
    second
        .write_all(&vec![b'y'; bytes])
        .map_err(|err| Failure::io("write", &err))?;
    Ok(())
}

/// Accepts one connection within PASS_TIMEOUT, as a blocking stream with a write timeout.
fn accept_bounded(listener: &std::net::TcpListener) -> Result<TcpStream, Failure> {
    let deadline = std::time::Instant::now() + PASS_TIMEOUT;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream
                    .set_nonblocking(false)
                    .and_then(|()| stream.set_write_timeout(Some(PASS_TIMEOUT)))
                    .map_err(|err| Failure::io("accept", &err))?;
                return Ok(stream);
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() > deadline {
                    return Err(Failure::other("accept", "no connection arrived"));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(err) => return Err(Failure::io("accept", &err)),
        }
    }
}

fn ip(text: &str) -> Result<IpAddr, String> {
    text.parse()
        .map_err(|err| format!("bad address {text:?}: {err}"))
}

fn socket_addr(addr: &str, port: &str) -> Result<SocketAddr, String> {
    let port: u16 = port
        .parse()
        .map_err(|err| format!("bad port {port:?}: {err}"))?;
    // A v6 address (mapped ones included) makes std open an AF_INET6 socket.
    Ok(SocketAddr::new(ip(addr)?, port))
}

fn run(action: Action) -> Outcome {
    match action {
        Action::TcpConnect(addr) => {
            TcpStream::connect_timeout(&addr, STEP_TIMEOUT)
                .map_err(|err| Failure::io("connect", &err))?;
            Ok(())
        }
        Action::UdpConnectSend(addr) => {
            let socket = udp_socket(addr)?;
            socket
                .connect(addr)
                .map_err(|err| Failure::io("connect", &err))?;
            socket
                .send(ECHO_PAYLOAD)
                .map_err(|err| Failure::io("send", &err))?;
            Ok(())
        }
        Action::UdpSendto(addr) => {
            let socket = udp_socket(addr)?;
            socket
                .send_to(ECHO_PAYLOAD, addr)
                .map_err(|err| Failure::io("sendto", &err))?;
            Ok(())
        }
        Action::IcmpRaw(ip) => icmp_echo(ip, SockType::Raw).map(drop),
        Action::IcmpPing(..) => Err(Failure::other("internal", "handled in main")),
        Action::RawCreate => {
            socket::socket(
                AddressFamily::Inet,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::Icmp,
            )
            .map_err(|errno| Failure::errno("socket", errno))?;
            Ok(())
        }
        Action::PassSocket(path) => pass_socket(&path),
        Action::ReceiveConnect(path, addr) => {
            let fd = receive_socket(&path)?;
            socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(addr))
                .map_err(|errno| Failure::errno("connect", errno))
        }
        Action::ReceiveSendto(path, addr) => {
            let fd = receive_socket(&path)?;
            socket::sendto(
                fd.as_raw_fd(),
                ECHO_PAYLOAD,
                &SockaddrStorage::from(addr),
                MsgFlags::empty(),
            )
            .map(|_| ())
            .map_err(|errno| Failure::errno("sendto", errno))
        }
        Action::Sleep(secs) => {
            std::thread::sleep(Duration::from_secs(secs));
            Ok(())
        }
        Action::ForkConnect(..) | Action::Dns(..) | Action::ConnectLoop(..) | Action::Load(..) => {
            Err(Failure::other("internal", "handled in main"))
        }
        Action::ThreadWrite(addr, bytes, go_file) => thread_write(addr, bytes, &go_file),
        Action::TcpServe {
            listen,
            bytes,
            go_file,
            outbound,
        } => tcp_serve(listen, bytes, &go_file, outbound),
        Action::UdpResendAfter(addr, go_file) => {
            let socket = udp_socket(addr)?;
            socket
                .connect(addr)
                .map_err(|err| Failure::io("connect", &err))?;
            socket
                .send(ECHO_PAYLOAD)
                .map_err(|err| Failure::io("first send", &err))?;
            // Bounded wait for the test's signal: 200 polls of 50 ms.
            let mut polls = 0;
            while !go_file.exists() {
                if polls == 200 {
                    return Err(Failure::other("wait", "go file never appeared"));
                }
                std::thread::sleep(Duration::from_millis(50));
                polls += 1;
            }
            socket
                .send(ECHO_PAYLOAD)
                .map_err(|err| Failure::io("second send", &err))?;
            Ok(())
        }
    }
}

fn udp_socket(addr: SocketAddr) -> Result<UdpSocket, Failure> {
    let local: SocketAddr = match addr {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).map_err(|err| Failure::io("bind", &err))?;
    socket
        .set_write_timeout(Some(STEP_TIMEOUT))
        .map_err(|err| Failure::io("setsockopt", &err))?;
    Ok(socket)
}

/// Sends an echo request on a ping socket, then waits up to [`REPLY_TIMEOUT`]
/// for the reply: `{"ok":true,"reply":BOOL}`. The reply shows whether the
/// request left: an ICMPv6 ping socket reports success even when egress
/// dropped the packet (`icmpv6_push_pending_frames` ignores the error of
/// `ip6_push_pending_frames`), so only the missing reply tells.
fn icmp_ping(ip: IpAddr) -> Value {
    let fd = match icmp_echo(ip, SockType::Datagram) {
        Ok(fd) => fd,
        Err(failure) => return report(Err(failure)),
    };
    let timeout = TimeVal::milliseconds(i64::try_from(REPLY_TIMEOUT.as_millis()).unwrap_or(1000));
    if let Err(errno) = socket::setsockopt(&fd, sockopt::ReceiveTimeout, &timeout) {
        return report(Err(Failure::errno("setsockopt", errno)));
    }
    let reply_type = if ip.is_ipv4() { 0u8 } else { 129u8 };
    let mut buf = [0u8; 256];
    let reply = loop {
        match socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(n) if n > 0 && buf[0] == reply_type => break true,
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(_) => break false,
        }
    };
    let mut value = report(Ok(()));
    value["reply"] = Value::from(reply);
    value
}

/// Sends one echo request on a raw (`SockType::Raw`) or ping
/// (`SockType::Datagram`) socket and returns the socket.
fn icmp_echo(ip: IpAddr, kind: SockType) -> Result<OwnedFd, Failure> {
    let (family, protocol, echo_type) = match ip {
        IpAddr::V4(_) => (AddressFamily::Inet, SockProtocol::Icmp, 8u8),
        IpAddr::V6(_) => (AddressFamily::Inet6, SockProtocol::IcmpV6, 128u8),
    };
    let fd = socket::socket(family, kind, SockFlag::SOCK_CLOEXEC, protocol)
        .map_err(|errno| Failure::errno("socket", errno))?;
    set_send_timeout(&fd)?;
    // type, code, checksum, identifier, sequence, payload. Ping sockets fill
    // in the identifier and checksum; raw ICMPv6 sockets the checksum; raw
    // ICMPv4 needs it from us.
    let mut packet = vec![echo_type, 0, 0, 0, 0x45, 0x67, 0, 1];
    packet.extend_from_slice(ECHO_PAYLOAD);
    if kind == SockType::Raw && ip.is_ipv4() {
        let sum = internet_checksum(&packet);
        packet[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    let dest = SockaddrStorage::from(SocketAddr::new(ip, 0));
    socket::sendto(fd.as_raw_fd(), &packet, &dest, MsgFlags::empty())
        .map_err(|errno| Failure::errno("sendto", errno))?;
    Ok(fd)
}

fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|pair| {
            let hi = u32::from(pair[0]) << 8;
            let lo = pair.get(1).copied().map_or(0, u32::from);
            hi | lo
        })
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop above folded `sum` into 16 bits.
    !(u16::try_from(sum).unwrap_or(u16::MAX))
}

fn set_send_timeout(fd: &OwnedFd) -> Outcome {
    let timeout = TimeVal::milliseconds(i64::try_from(STEP_TIMEOUT.as_millis()).unwrap_or(2000));
    socket::setsockopt(fd, sockopt::SendTimeout, &timeout)
        .map_err(|errno| Failure::errno("setsockopt", errno))
}

fn tcp_socket(addr: SocketAddr) -> Result<OwnedFd, Failure> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|errno| Failure::errno("socket", errno))?;
    // SO_SNDTIMEO also bounds a blocking connect().
    set_send_timeout(&fd)?;
    Ok(fd)
}

/// Creates a TCP socket here, forks; the child moves itself to the cgroup of
/// `procs` and connects the inherited socket. The parent relays its report.
fn fork_connect(addr: SocketAddr, procs: &std::path::Path) -> Value {
    let fd = match tcp_socket(addr) {
        Ok(fd) => fd,
        Err(failure) => return report(Err(failure)),
    };
    let (read_end, write_end) = match pipe() {
        Ok(ends) => ends,
        Err(errno) => return report(Err(Failure::errno("pipe", errno))),
    };
    // SAFETY: the probe is single-threaded, so the child may do anything.
    match unsafe { fork() } {
        Err(errno) => report(Err(Failure::errno("fork", errno))),
        Ok(ForkResult::Child) => {
            drop(read_end);
            let line = child_connect(&fd, addr, procs).to_string();
            let code = match nix::unistd::write(&write_end, format!("{line}\n").as_bytes()) {
                Ok(_) => 0,
                Err(_) => 1,
            };
            // SAFETY: leaves the forked child without running the parent's
            // atexit handlers or flushing its inherited stdio buffers.
            unsafe { libc::_exit(code) }
        }
        Ok(ForkResult::Parent { child }) => {
            drop(write_end);
            let mut text = String::new();
            let read = fs::File::from(read_end).read_to_string(&mut text);
            let status = waitpid(child, None);
            match (read, serde_json::from_str::<Value>(text.trim())) {
                (Ok(_), Ok(value)) => value,
                (read, _) => report(Err(Failure::other(
                    "child",
                    format!("no report from the child (read {read:?}, wait {status:?}): {text:?}"),
                ))),
            }
        }
    }
}

fn child_connect(fd: &OwnedFd, addr: SocketAddr, procs: &std::path::Path) -> Value {
    if let Err(err) = fs::write(procs, "0") {
        return report(Err(Failure::io("move", &err)));
    }
    let cgroup = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let outcome = socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(addr))
        .map_err(|errno| Failure::errno("connect", errno));
    let mut value = report(outcome);
    // Shows the test where the child ended up (the v2 line starts with "0::").
    value["child_cgroup"] = Value::from(
        cgroup
            .lines()
            .find_map(|line| line.strip_prefix("0::"))
            .unwrap_or("?"),
    );
    value
}

/// Sends an unconnected TCP socket created here over the Unix stream socket at
/// `path`, then waits until the peer closes the connection.
fn pass_socket(path: &std::path::Path) -> Outcome {
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|errno| Failure::errno("socket", errno))?;
    let mut stream = UnixStream::connect(path).map_err(|err| Failure::io("unix_connect", &err))?;
    stream
        .set_read_timeout(Some(PASS_TIMEOUT))
        .map_err(|err| Failure::io("setsockopt", &err))?;
    let fds = [fd.as_raw_fd()];
    socket::sendmsg::<UnixAddr>(
        stream.as_fd().as_raw_fd(),
        &[IoSlice::new(b"s")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(|errno| Failure::errno("sendmsg", errno))?;
    let mut buf = [0u8; 64];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => continue,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(Failure::io("wait_close", &err)),
        }
    }
}

/// Receives one socket from the peer at `path` and connects it to `addr`.
/// The first socket that arrives over the UNIX socket at `path` (SCM_RIGHTS).
fn receive_socket(path: &std::path::Path) -> Result<OwnedFd, Failure> {
    let stream = UnixStream::connect(path).map_err(|err| Failure::io("unix_connect", &err))?;
    stream
        .set_read_timeout(Some(PASS_TIMEOUT))
        .map_err(|err| Failure::io("setsockopt", &err))?;
    let mut byte = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let message = socket::recvmsg::<UnixAddr>(
        stream.as_fd().as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|errno| Failure::errno("recvmsg", errno))?;
    let mut received = None;
    for cmsg in message
        .cmsgs()
        .map_err(|errno| Failure::errno("cmsgs", errno))?
    {
        if let socket::ControlMessageOwned::ScmRights(fds) = cmsg {
            for fd in fds {
                // SAFETY: the kernel just installed this descriptor for us; it is owned once.
                let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
                received.get_or_insert(owned);
            }
        }
    }
    received.ok_or_else(|| Failure::other("recvmsg", "no file descriptor received"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_an_echo_request() {
        // 08 00 [csum] 00 01 00 01: sum 0x0801 + 0x0001 = 0x0802 -> !0x0802 = 0xf7fd
        let packet = [8u8, 0, 0, 0, 0, 1, 0, 1];
        assert_eq!(internet_checksum(&packet), 0xf7fd);
    }

    #[test]
    fn parses_mapped_addresses_as_v6() {
        let args: Vec<String> = ["tcp-connect", "::ffff:127.0.0.2", "80"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let Ok(Action::TcpConnect(addr)) = parse(&args) else {
            panic!("parse")
        };
        assert!(addr.is_ipv6());
    }

    #[test]
    fn rejects_bad_usage() {
        for args in [&["tcp-connect", "x", "1"][..], &["sleep", "9999"], &[]] {
            let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            assert!(parse(&args).is_err(), "{args:?}");
        }
    }
}
