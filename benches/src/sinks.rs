//! The receiving ends, in the benchmark process (in no workload, in its namespace): they
//! accept and discard so that only the client's side differs between configurations.

use std::io::Read as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::Context as _;
use socket2::{Domain, Socket, Type};

/// A stream reader gives up on a silent peer after this long.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections may queue faster than the accept threads take them when the machine is busy;
/// a full queue drops SYNs and stalls the client a second per drop. The benchmark's namespace
/// raises net.core.somaxconn to match (`netns::enter_private`).
pub const BACKLOG: i32 = 65_535;

fn listener(addr: SocketAddrV4) -> anyhow::Result<TcpListener> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).context("socket")?;
    socket.set_reuse_address(true).context("SO_REUSEADDR")?;
    socket
        .bind(&SocketAddr::V4(addr).into())
        .with_context(|| format!("bind {addr}"))?;
    socket
        .listen(BACKLOG)
        .with_context(|| format!("listen {addr}"))?;
    Ok(socket.into())
}

/// Threads accepting on one listener: when the machine is busy one of them may wait for a
/// CPU; a full accept queue drops SYNs, and each drop stalls a client for a second.
const ACCEPT_THREADS: usize = 2;

/// A listener whose accept loops run `handle` on each connection until dropped.
pub struct TcpSink {
    pub addr: SocketAddrV4,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl TcpSink {
    /// Accepts and closes at once: the far end of connect loops.
    pub fn accept_and_close(ip: Ipv4Addr) -> anyhow::Result<TcpSink> {
        TcpSink::start(ip, drop)
    }

    /// Reads and discards until EOF, one thread per connection: the far end of streams.
    pub fn discard(ip: Ipv4Addr) -> anyhow::Result<TcpSink> {
        TcpSink::start(ip, |mut stream| {
            thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
                let mut buf = vec![0u8; 256 * 1024];
                while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
            });
        })
    }

    fn start(ip: Ipv4Addr, handle: fn(TcpStream)) -> anyhow::Result<TcpSink> {
        let listener = listener(SocketAddrV4::new(ip, 0))?;
        let addr = match listener.local_addr().context("listener address")? {
            SocketAddr::V4(addr) => addr,
            SocketAddr::V6(addr) => anyhow::bail!("an IPv4 listener has address {addr}"),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::with_capacity(ACCEPT_THREADS);
        for _ in 0..ACCEPT_THREADS {
            let listener = listener.try_clone().context("sharing the listener")?;
            let stop = Arc::clone(&stop);
            threads.push(thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Ok(stream) = stream {
                        handle(stream);
                    }
                }
            }));
        }
        Ok(TcpSink {
            addr,
            stop,
            threads,
        })
    }

    /// Where a client connects: the bound address, or 127.0.0.1 for a wildcard listener.
    pub fn target(&self) -> SocketAddrV4 {
        if self.addr.ip().is_unspecified() {
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.addr.port())
        } else {
            self.addr
        }
    }
}

impl Drop for TcpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Each connection wakes one accept loop (the benchmark process is in no workload).
        for _ in &self.threads {
            let _ =
                TcpStream::connect_timeout(&SocketAddr::V4(self.target()), Duration::from_secs(2));
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// A bound UDP socket nobody reads: datagrams past its buffer are dropped on arrival, the
/// same way in every configuration.
pub struct UdpSink {
    pub addr: SocketAddrV4,
    _socket: UdpSocket,
}

impl UdpSink {
    pub fn bind(ip: Ipv4Addr) -> anyhow::Result<UdpSink> {
        let socket = UdpSocket::bind((ip, 0)).with_context(|| format!("bind {ip} (udp)"))?;
        let addr = match socket.local_addr().context("udp address")? {
            SocketAddr::V4(addr) => addr,
            SocketAddr::V6(addr) => anyhow::bail!("an IPv4 socket has address {addr}"),
        };
        Ok(UdpSink {
            addr,
            _socket: socket,
        })
    }
}
