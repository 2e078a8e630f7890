//! The DNS scenario's client, inside the measured workload.
//!
//! - Load: queries paced at `rate - probe_rate` per second over [`SOCKETS`] connected
//!   sockets, names reused from a pool, each query's round trip (send to answer received)
//!   timed: what an application sees of a DNS query.
//! - Probes, `probe_rate` per second: a query for a name never asked before, and from the
//!   moment its answer is received, connect() attempts to the answered address until one is
//!   let through. Answer-to-usable is that time. Probes alternate between a UDP connect()
//!   (it runs egressd's connect hook and sends nothing: the time is the firewall's and the
//!   syscall's) and a non-blocking TCP connect() (EINPROGRESS or success: the SYN left;
//!   on loopback the kernel runs the whole handshake inside that call).

use std::net::{IpAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use egressd_tests::{answer_addresses, query_bytes};
use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;
use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrIn, connect, setsockopt, socket, sockopt,
};
use serde::{Deserialize, Serialize};

use crate::client::elapsed_ns;
use crate::dns::{load_name, probe_address, probe_name};

/// Load sockets; query ids count per socket, so a run sends at most `SOCKETS * 65536`.
const SOCKETS: usize = 8;
const MAX_QUERIES: u64 = (SOCKETS as u64) * 65_536;
/// Distinct load names (answers for them are refreshed, as for a real application's names).
const LOAD_NAMES: u64 = 4096;
/// How long a probe waits for its answer, and then for its address to become usable.
const PROBE_WAIT: Duration = Duration::from_secs(1);
/// How long receivers wait for late answers after the last query.
const GRACE: Duration = Duration::from_millis(300);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DnsSpec {
    pub resolver: SocketAddrV4,
    /// Answers per second in all (load and probes).
    pub rate: u32,
    pub probe_rate: u32,
    /// The port probes connect to (a listener on 0.0.0.0, so every loopback address has it).
    pub probe_port: u16,
    pub millis: u64,
}

/// Nearest-rank percentiles of a sample, in nanoseconds.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

impl Percentiles {
    pub fn of(mut sample: Vec<u64>) -> Percentiles {
        sample.sort_unstable();
        let rank = |q: f64| -> u64 {
            if sample.is_empty() {
                return 0;
            }
            let index = ((q * sample.len() as f64).ceil() as usize).clamp(1, sample.len()) - 1;
            sample[index]
        };
        Percentiles {
            count: sample.len() as u64,
            p50: rank(0.50),
            p99: rank(0.99),
            max: sample.last().copied().unwrap_or(0),
        }
    }
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct DnsReport {
    pub sent: u64,
    pub answered: u64,
    /// Round trips of the load queries.
    pub rtt: Percentiles,
    pub probes: u64,
    /// Answer received → first UDP connect() the firewall lets through.
    pub usable: Percentiles,
    /// Answer received → first non-blocking TCP connect() the firewall lets start.
    pub usable_tcp: Percentiles,
    /// Probes (both kinds) whose first connect() already passed.
    pub usable_first_try: u64,
    /// Answer received → start of the connect() that passed, both kinds: how long the
    /// address was not yet usable. The passing connect's own duration is the syscall's (and
    /// the hooks'), which `usable` includes and no firewall has as well.
    pub lag: Percentiles,
    /// Probes whose query got no answer within 1 s (the resolver fell behind).
    pub probes_unanswered: u64,
    /// Probes answered with a wrong address, or whose address never became usable within
    /// 1 s: the configuration failed.
    pub probe_failures: u64,
}

pub fn run(spec: &DnsSpec) -> anyhow::Result<crate::client::Report> {
    ensure!(
        spec.rate > spec.probe_rate,
        "the rate must exceed the probe rate"
    );
    let load_rate = u64::from(spec.rate - spec.probe_rate);
    let total = (load_rate * spec.millis / 1000).min(MAX_QUERIES);
    let sockets: Vec<Arc<UdpSocket>> = (0..SOCKETS)
        .map(|_| -> anyhow::Result<Arc<UdpSocket>> {
            let socket = UdpSocket::bind(("127.0.0.1", 0)).context("bind a DNS socket")?;
            socket
                .connect(spec.resolver)
                .context("connect to the resolver")?;
            socket
                .set_read_timeout(Some(Duration::from_millis(50)))
                .context("SO_RCVTIMEO")?;
            Ok(Arc::new(socket))
        })
        .collect::<anyhow::Result<_>>()?;
    let start = Instant::now();
    let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let done = Arc::new(AtomicBool::new(false));

    let receivers: Vec<_> = sockets
        .iter()
        .enumerate()
        .map(|(index, socket)| {
            let (socket, sent_at, done) =
                (Arc::clone(socket), Arc::clone(&sent_at), Arc::clone(&done));
            thread::spawn(move || receive(&socket, index, &sent_at, &done, start))
        })
        .collect();
    let prober = {
        let spec = spec.clone();
        let done = Arc::clone(&done);
        thread::spawn(move || probe(&spec, &done))
    };

    // The sender paces itself on the clock: query k leaves at start + k / rate.
    precise_sleep();
    let mut sent = 0u64;
    let deadline = start + Duration::from_millis(spec.millis);
    for k in 0..total {
        let due = start + Duration::from_nanos(k * 1_000_000_000 / load_rate);
        if due >= deadline {
            break;
        }
        wait_until(due);
        let socket_index = (k % SOCKETS as u64) as usize;
        let id = u16::try_from(k / SOCKETS as u64).unwrap_or(u16::MAX);
        let query = query_bytes(id, &load_name((k % LOAD_NAMES) as u32), RecordType::A);
        sent_at[k as usize].store(elapsed_ns(start).max(1), Ordering::Relaxed);
        if sockets[socket_index].send(&query).is_ok() {
            sent += 1;
        }
    }
    thread::sleep(GRACE);
    done.store(true, Ordering::Relaxed);
    let mut rtts = Vec::new();
    for receiver in receivers {
        rtts.extend(
            receiver
                .join()
                .map_err(|_| anyhow::anyhow!("a DNS receiver panicked"))?,
        );
    }
    let probe = prober
        .join()
        .map_err(|_| anyhow::anyhow!("the DNS prober panicked"))??;
    let elapsed = elapsed_ns(start).saturating_sub(u64::try_from(GRACE.as_nanos()).unwrap_or(0));
    let answered = rtts.len() as u64;
    let report = DnsReport {
        sent,
        answered,
        rtt: Percentiles::of(rtts),
        probes: probe.probes,
        usable: Percentiles::of(probe.usable),
        usable_tcp: Percentiles::of(probe.usable_tcp),
        usable_first_try: probe.first_try,
        lag: Percentiles::of(probe.lag),
        probes_unanswered: probe.unanswered,
        probe_failures: probe.failures,
    };
    let probed = report.usable.count + report.usable_tcp.count;
    Ok(crate::client::Report {
        ops: answered + probed,
        elapsed_ns: elapsed,
        outcomes: [(0, answered + probed)].into(),
        dns: Some(report),
        ..Default::default()
    })
}

/// Sleeps until `due` (spinning only for the last microseconds). A late wake-up sends the
/// queries that fell due at once, so the rate holds on average without burning a CPU that
/// the resolver and egressd need. Call [`precise_sleep`] on the thread first.
fn wait_until(due: Instant) {
    loop {
        let now = Instant::now();
        if now >= due {
            return;
        }
        let left = due - now;
        if left > Duration::from_micros(5) {
            thread::sleep(left);
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Timer slack of 1 µs for this thread (the default 50 µs would pace 20,000 queries a
/// second in bursts).
fn precise_sleep() {
    // Pacing only gets coarser without it.
    let _ = nix::sys::prctl::set_timerslack(1000);
}

fn receive(
    socket: &UdpSocket,
    index: usize,
    sent_at: &[AtomicU64],
    done: &AtomicBool,
    start: Instant,
) -> Vec<u64> {
    let mut rtts = Vec::new();
    let mut buf = [0u8; 1500];
    while !done.load(Ordering::Relaxed) {
        let Ok(len) = socket.recv(&mut buf) else {
            continue;
        };
        let now = elapsed_ns(start);
        if len < 2 {
            continue;
        }
        let id = u64::from(u16::from_be_bytes([buf[0], buf[1]]));
        let k = id * SOCKETS as u64 + index as u64;
        let Some(slot) = sent_at.get(k as usize) else {
            continue;
        };
        // Swap so a duplicate answer is not counted twice.
        let sent = slot.swap(0, Ordering::Relaxed);
        if sent != 0 {
            rtts.push(now.saturating_sub(sent));
        }
    }
    rtts
}

struct ProbeResults {
    probes: u64,
    usable: Vec<u64>,
    usable_tcp: Vec<u64>,
    lag: Vec<u64>,
    first_try: u64,
    unanswered: u64,
    failures: u64,
}

fn probe(spec: &DnsSpec, done: &AtomicBool) -> anyhow::Result<ProbeResults> {
    precise_sleep();
    let socket = UdpSocket::bind(("127.0.0.1", 0)).context("bind the probe socket")?;
    socket
        .connect(spec.resolver)
        .context("connect the probe socket")?;
    socket
        .set_read_timeout(Some(PROBE_WAIT))
        .context("SO_RCVTIMEO")?;
    let mut results = ProbeResults {
        probes: 0,
        usable: Vec::new(),
        usable_tcp: Vec::new(),
        lag: Vec::new(),
        first_try: 0,
        unanswered: 0,
        failures: 0,
    };
    let start = Instant::now();
    let deadline = start + Duration::from_millis(spec.millis);
    let mut buf = [0u8; 1500];
    for j in 0u32.. {
        let due = start
            + Duration::from_nanos(
                u64::from(j) * 1_000_000_000 / u64::from(spec.probe_rate.max(1)),
            );
        if due >= deadline || done.load(Ordering::Relaxed) {
            break;
        }
        wait_until(due);
        results.probes += 1;
        let id = (j & 0xffff) as u16;
        if socket
            .send(&query_bytes(id, &probe_name(j), RecordType::A))
            .is_err()
        {
            results.unanswered += 1;
            continue;
        }
        // The answer to this query (an older one's late answer is skipped).
        let answer = loop {
            match socket.recv(&mut buf) {
                Ok(len) if len >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id => {
                    break Some(len);
                }
                Ok(_) => continue,
                Err(_) => break None,
            }
        };
        let Some(len) = answer else {
            results.unanswered += 1;
            continue;
        };
        let received = Instant::now();
        let address = probe_address(j);
        let target = SockaddrIn::from(SocketAddrV4::new(address, spec.probe_port));
        let tcp = j % 2 == 1;
        let mut attempts = 0u64;
        let usable = loop {
            attempts += 1;
            let attempt_started = Instant::now();
            let attempt = if tcp {
                try_connect(&target)
            } else {
                try_connect_udp(&target)
            };
            match attempt {
                Ok(()) => {
                    break Some((
                        received.elapsed(),
                        attempt_started.saturating_duration_since(received),
                    ));
                }
                Err(Errno::EPERM) if received.elapsed() < PROBE_WAIT => thread::yield_now(),
                Err(_) => break None,
            }
        };
        // Checked after the clock stopped: the answer named the address connected to.
        let named = Message::from_vec(&buf[..len])
            .map(|message| answer_addresses(&message).contains(&IpAddr::V4(address)))
            .unwrap_or(false);
        match usable {
            Some((latency, lag)) if named => {
                let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
                results
                    .lag
                    .push(u64::try_from(lag.as_nanos()).unwrap_or(u64::MAX));
                if tcp {
                    results.usable_tcp.push(nanos);
                } else {
                    results.usable.push(nanos);
                }
                if attempts == 1 {
                    results.first_try += 1;
                }
            }
            _ => results.failures += 1,
        }
    }
    Ok(results)
}

/// A UDP connect(): Ok once the firewall's connect hook lets it through (no packet is sent).
fn try_connect_udp(target: &SockaddrIn) -> Result<(), Errno> {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), target)
}

/// A non-blocking connect(): Ok once the firewall let it start (EINPROGRESS or done).
fn try_connect(target: &SockaddrIn) -> Result<(), Errno> {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(&fd, sockopt::Linger, &linger)?;
    match connect(fd.as_raw_fd(), target) {
        Ok(()) | Err(Errno::EINPROGRESS) => Ok(()),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let p = Percentiles::of((1..=100).collect());
        assert_eq!((p.count, p.p50, p.p99, p.max), (100, 50, 99, 100));
        let one = Percentiles::of(vec![7]);
        assert_eq!((one.p50, one.p99), (7, 7));
        assert_eq!(Percentiles::of(Vec::new()).count, 0);
    }
}
