//! Loopback listeners the probes talk to. The kernel picks each port (bind to
//! port 0); the test writes it into the policy. Keep a target alive for the
//! whole test so nothing else takes its port.

use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};

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
