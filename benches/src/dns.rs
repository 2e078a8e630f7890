//! The DNS scenario's names and the resolver that answers them (in the benchmark process,
//! on port 53 of a loopback address of its namespace, as egressd requires of resolvers).
//!
//! Every name is `<label>.bench.test` and its address follows from the label, so the
//! client knows it before the answer comes: `n<i>` (the load, names reused) answers
//! 127.32.0.0 + i, `p<j>` (probes, each name new) 127.40.0.0 + j.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::Context as _;
use egressd_tests::{AnswerRecord, DNS_PORT, answer_bytes};
use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;

/// Where the resolver listens.
pub const RESOLVER: Ipv4Addr = Ipv4Addr::new(127, 0, 53, 1);
/// The domain every name is in (egressd's rule is `*.bench.test`).
pub const DOMAIN: &str = "bench.test";
/// TTL of every answer: longer than any run, so load names stay allowed.
const TTL: u32 = 600;
/// Labels index 2^19 addresses each (127.32.0.0/13, 127.40.0.0/13).
const INDEX_MASK: u32 = (1 << 19) - 1;
const LOAD_BASE: u32 = u32::from_be_bytes([127, 32, 0, 0]);
const PROBE_BASE: u32 = u32::from_be_bytes([127, 40, 0, 0]);

pub fn load_name(i: u32) -> String {
    format!("n{}.{DOMAIN}", i & INDEX_MASK)
}

pub fn probe_name(j: u32) -> String {
    format!("p{}.{DOMAIN}", j & INDEX_MASK)
}

pub fn probe_address(j: u32) -> Ipv4Addr {
    Ipv4Addr::from(PROBE_BASE + (j & INDEX_MASK))
}

/// The address a name answers, from its label; 127.0.0.1 for names of no series.
pub fn address_of(name: &str) -> Ipv4Addr {
    let label = name.split('.').next().unwrap_or_default();
    let index = |digits: &str| digits.parse::<u32>().ok().map(|i| i & INDEX_MASK);
    match (label.get(..1), label.get(1..).and_then(index)) {
        (Some("n"), Some(i)) => Ipv4Addr::from(LOAD_BASE + i),
        (Some("p"), Some(j)) => Ipv4Addr::from(PROBE_BASE + j),
        _ => Ipv4Addr::LOCALHOST,
    }
}

/// Answers every A query on `RESOLVER:53` until dropped.
pub struct Resolver {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Resolver {
    pub fn start() -> anyhow::Result<Resolver> {
        let socket = UdpSocket::bind((RESOLVER, DNS_PORT))
            .with_context(|| format!("bind {RESOLVER}:{DNS_PORT} (udp)"))?;
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .context("resolver read timeout")?;
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, answered) = (Arc::clone(&stop), Arc::clone(&answered));
            thread::spawn(move || serve(&socket, &stop, &answered))
        };
        Ok(Resolver {
            stop,
            answered,
            thread: Some(thread),
        })
    }

    pub fn address(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(RESOLVER), DNS_PORT)
    }

    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }
}

fn serve(socket: &UdpSocket, stop: &AtomicBool, answered: &AtomicU64) {
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        let Ok((len, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let Ok(query) = Message::from_vec(&buf[..len]) else {
            continue;
        };
        let Some(question) = query.queries.first() else {
            continue;
        };
        let name = question.name().to_ascii();
        let name = name.trim_end_matches('.');
        let address = address_of(name).to_string();
        let answer = answer_bytes(
            query.metadata.id,
            name,
            RecordType::A,
            &[AnswerRecord::address(name, TTL, &address)],
        );
        if socket.send_to(&answer, from).is_ok() {
            answered.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses_agree() {
        assert_eq!(address_of(&load_name(5)), Ipv4Addr::new(127, 32, 0, 5));
        assert_eq!(address_of(&probe_name(300)), probe_address(300));
        assert_eq!(probe_address(300), Ipv4Addr::new(127, 40, 1, 44));
        assert_eq!(address_of("ready.bench.test"), Ipv4Addr::LOCALHOST);
        assert!(address_of(&probe_name(u32::MAX)).is_loopback());
    }
}
