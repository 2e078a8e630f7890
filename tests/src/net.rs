//! Loopback listeners the probes talk to. The kernel picks each port (bind to
//! port 0); the test writes it into the policy. Keep a target alive for the
//! whole test so nothing else takes its port.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

/// The event form of a destination: `ip:port`, `[v6]:port`.
pub fn destination(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

fn loopback(ip: &str) -> IpAddr {
    let addr: IpAddr = ip
        .parse()
        .unwrap_or_else(|err| panic!("bad test address {ip:?}: {err}"));
    assert!(
        addr.is_loopback(),
        "{ip} is not a loopback address: the tests only talk to 127.0.0.0/8 and ::1"
    );
    addr
}

/// A TCP listener on a loopback address. Connections stay in its backlog
/// (nobody accepts them); a handful per test is far below the limit.
#[derive(Debug)]
pub struct TcpTarget {
    pub listener: TcpListener,
    pub ip: IpAddr,
    pub port: u16,
}

impl TcpTarget {
    pub fn bind(ip: &str) -> TcpTarget {
        let ip = loopback(ip);
        let listener = TcpListener::bind((ip, 0))
            .unwrap_or_else(|err| panic!("cannot listen on {ip} (tcp): {err}"));
        let port = listener.local_addr().expect("listener address").port();
        TcpTarget { listener, ip, port }
    }

    pub fn ip_str(&self) -> String {
        self.ip.to_string()
    }

    pub fn port_str(&self) -> String {
        self.port.to_string()
    }

    /// `ip:port` or `[v6]:port`, as events name it.
    pub fn destination(&self) -> String {
        destination(self.ip, self.port)
    }
}

/// A bound UDP socket on a loopback address (so sends to it find a receiver).
#[derive(Debug)]
pub struct UdpTarget {
    pub socket: UdpSocket,
    pub ip: IpAddr,
    pub port: u16,
}

impl UdpTarget {
    pub fn bind(ip: &str) -> UdpTarget {
        let ip = loopback(ip);
        let socket =
            UdpSocket::bind((ip, 0)).unwrap_or_else(|err| panic!("cannot bind {ip} (udp): {err}"));
        let port = socket.local_addr().expect("socket address").port();
        UdpTarget { socket, ip, port }
    }

    pub fn ip_str(&self) -> String {
        self.ip.to_string()
    }

    pub fn port_str(&self) -> String {
        self.port.to_string()
    }

    pub fn destination(&self) -> String {
        destination(self.ip, self.port)
    }
}

/// A TCP server that accepts every connection and echoes what it reads (one thread per
/// connection, each ending at EOF or after 60 s idle), stopped when dropped. Unlike
/// [`TcpTarget`] it never fills its backlog, so thousands of connections may come.
///
/// `bind("0.0.0.0")` reaches every address of 127.0.0.0/8 at once (the FQDN tests
/// resolve names to many of them); the tests still only connect to loopback addresses.
#[derive(Debug)]
pub struct TcpServer {
    pub ip: IpAddr,
    pub port: u16,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    thread: Option<thread::JoinHandle<()>>,
}

impl TcpServer {
    pub fn bind(ip: &str) -> TcpServer {
        let addr: IpAddr = ip
            .parse()
            .unwrap_or_else(|err| panic!("bad test address {ip:?}: {err}"));
        assert!(
            addr.is_loopback() || addr.is_unspecified(),
            "{ip}: a test server listens on loopback or on 0.0.0.0/::"
        );
        let listener = TcpListener::bind((addr, 0))
            .unwrap_or_else(|err| panic!("cannot listen on {addr} (tcp): {err}"));
        let port = listener.local_addr().expect("listener address").port();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let thread = {
            let stop = Arc::clone(&stop);
            let accepted = Arc::clone(&accepted);
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    thread::spawn(move || echo(stream));
                }
            })
        };
        TcpServer {
            ip: addr,
            port,
            stop,
            accepted,
            thread: Some(thread),
        }
    }

    pub fn port_str(&self) -> String {
        self.port.to_string()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// A listener with the longest backlog the system allows (`net.core.somaxconn`): std's 128
/// overflows when the accepting thread loses the CPU for a moment, and a dropped SYN costs
/// the connect a one-second retransmission.
fn listen_with_long_backlog(addr: SocketAddr) -> nix::Result<TcpListener> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, listen, socket,
    };
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )?;
    listen(&fd, Backlog::MAXALLOWABLE)?;
    Ok(TcpListener::from(fd))
}

/// A TCP listener on a loopback address that accepts every connection and closes it at
/// once, on one thread, stopped when dropped: the other end of connect loops that open
/// thousands of connections a second (a [`TcpTarget`]'s backlog would fill, a
/// [`TcpServer`] would start a thread for each).
#[derive(Debug)]
pub struct TcpSink {
    pub ip: IpAddr,
    pub port: u16,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    thread: Option<thread::JoinHandle<()>>,
}

impl TcpSink {
    pub fn bind(ip: &str) -> TcpSink {
        let ip = loopback(ip);
        let listener = listen_with_long_backlog(SocketAddr::new(ip, 0))
            .unwrap_or_else(|err| panic!("cannot listen on {ip} (tcp): {err}"));
        let port = listener.local_addr().expect("listener address").port();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let thread = {
            let stop = Arc::clone(&stop);
            let accepted = Arc::clone(&accepted);
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if stream.is_ok() {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        TcpSink {
            ip,
            port,
            stop,
            accepted,
            thread: Some(thread),
        }
    }

    pub fn ip_str(&self) -> String {
        self.ip.to_string()
    }

    pub fn port_str(&self) -> String {
        self.port.to_string()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for TcpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop (the test process is in no workload: nothing refuses it).
        let _ = TcpStream::connect_timeout(
            &SocketAddr::new(self.ip, self.port),
            Duration::from_secs(2),
        );
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn echo(mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let mut buf = [0u8; 512];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop (the test process is in no workload: nothing refuses it).
        let wake: IpAddr = match self.ip {
            ip if ip.is_loopback() => ip,
            IpAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            IpAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        };
        let _ =
            TcpStream::connect_timeout(&SocketAddr::new(wake, self.port), Duration::from_secs(2));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
