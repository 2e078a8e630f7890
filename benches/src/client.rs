//! The client: this binary re-executed as `egressd-bench client`, which moves itself into
//! the measured cgroup before it opens a socket, runs one scenario for a bounded time and
//! count, and prints one JSON report. Every configuration runs the same client.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockType, SockaddrIn, connect, sendto, setsockopt, socket,
    sockopt,
};
use nix::sys::time::{TimeVal, TimeValLike as _};
use serde::{Deserialize, Serialize};

use crate::client_dns::{self, DnsReport};

/// Bound on one connect or send: a dropped SYN must not stall a loop for minutes.
const STEP_TIMEOUT_MS: i64 = 2000;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Spec {
    /// Is the configuration in force? Each step's errno (0: success).
    Check {
        allowed: SocketAddrV4,
        blocked: SocketAddrV4,
        udp: SocketAddrV4,
    },
    /// connect() then close() to `target` in a loop on `threads` threads; the close resets
    /// (SO_LINGER 0) so no TIME_WAIT piles up. An operation counts when its connect ends
    /// with `expect` (0: success, else an errno: the refused-connect scenario).
    Connect {
        target: SocketAddrV4,
        threads: usize,
        millis: u64,
        max: u64,
        expect: i32,
    },
    /// connect() then close() to `base + i`, `i` in 0..count: each a new destination.
    NewDestinations {
        base: Ipv4Addr,
        port: u16,
        count: u64,
        millis: u64,
    },
    /// One TCP connection writing 128 KiB at a time.
    Stream { target: SocketAddrV4, millis: u64 },
    /// Unconnected sendto() of `payload`-byte datagrams.
    Udp {
        target: SocketAddrV4,
        payload: usize,
        millis: u64,
    },
    /// Paced DNS queries and answer-to-usable probes (see `client_dns`).
    Dns(client_dns::DnsSpec),
}

/// What a client measured.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Report {
    /// Operations that ended as the scenario expects.
    pub ops: u64,
    pub elapsed_ns: u64,
    pub bytes: u64,
    /// Every operation by outcome: errno, 0 for success.
    pub outcomes: BTreeMap<i32, u64>,
    /// `Check`: each step's errno.
    pub steps: BTreeMap<String, i32>,
    pub dns: Option<DnsReport>,
    /// Busy CPU time of the whole machine during the timed loop (`procfs::host_busy_ns`):
    /// what the operations cost every CPU, the receiving ends' and the kernel's included.
    #[serde(default)]
    pub host_busy_ns: u64,
}

impl Report {
    /// Busy CPU time of the whole machine per `count` (NaN when none).
    pub fn cpu_ns_per(&self, count: u64) -> f64 {
        if count == 0 {
            return f64::NAN;
        }
        self.host_busy_ns as f64 / count as f64
    }

    pub fn per_second(&self, count: u64) -> f64 {
        if self.elapsed_ns == 0 {
            return 0.0;
        }
        count as f64 * 1e9 / self.elapsed_ns as f64
    }

    /// Operations that did not end as expected.
    pub fn unexpected(&self) -> u64 {
        self.outcomes.values().sum::<u64>().saturating_sub(self.ops)
    }
}

/// Entry point of `egressd-bench client`.
pub fn main(cgroup: &Path, spec: &str) -> anyhow::Result<()> {
    let spec: Spec = serde_json::from_str(spec).context("parsing the client spec")?;
    join_cgroup(cgroup)?;
    let report = match spec {
        Spec::Check {
            allowed,
            blocked,
            udp,
        } => check(allowed, blocked, udp),
        Spec::Connect {
            target,
            threads,
            millis,
            max,
            expect,
        } => connect_loop(target, threads.max(1), millis, max, expect)?,
        Spec::NewDestinations {
            base,
            port,
            count,
            millis,
        } => new_destinations(base, port, count, millis),
        Spec::Stream { target, millis } => stream(target, millis)?,
        Spec::Udp {
            target,
            payload,
            millis,
        } => udp(target, payload, millis)?,
        Spec::Dns(spec) => client_dns::run(&spec)?,
    };
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer(&mut stdout, &report).context("writing the report")?;
    writeln!(stdout).context("writing the report")?;
    Ok(())
}

/// Moves this process into `cgroup` (every socket opened later belongs to it) and checks.
fn join_cgroup(cgroup: &Path) -> anyhow::Result<()> {
    let procs = cgroup.join("cgroup.procs");
    fs::write(&procs, "0").with_context(|| format!("joining {}", procs.display()))?;
    let own = fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let name = cgroup
        .file_name()
        .and_then(|name| name.to_str())
        .unwrap_or_default();
    ensure!(
        own.lines()
            .any(|line| line.starts_with("0::/") && line.ends_with(&format!("/{name}"))),
        "still outside {} after joining it: {own}",
        cgroup.display()
    );
    Ok(())
}

fn errno_of(err: Errno) -> i32 {
    err as i32
}

fn timeout() -> TimeVal {
    TimeVal::milliseconds(STEP_TIMEOUT_MS)
}

/// One connect() and close() (a reset: SO_LINGER 0); the connect's errno, 0 on success.
pub fn connect_once(target: &SockaddrIn) -> i32 {
    let fd = match socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    ) {
        Ok(fd) => fd,
        Err(err) => return errno_of(err),
    };
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    if let Err(err) = setsockopt(&fd, sockopt::Linger, &linger)
        .and_then(|()| setsockopt(&fd, sockopt::SendTimeout, &timeout()))
    {
        return errno_of(err);
    }
    match connect(fd.as_raw_fd(), target) {
        Ok(()) => 0,
        Err(err) => errno_of(err),
    }
}

fn check(allowed: SocketAddrV4, blocked: SocketAddrV4, udp_target: SocketAddrV4) -> Report {
    let mut report = Report::default();
    report.steps.insert(
        "tcp_allowed".to_owned(),
        connect_once(&SockaddrIn::from(allowed)),
    );
    report.steps.insert(
        "tcp_blocked".to_owned(),
        connect_once(&SockaddrIn::from(blocked)),
    );
    let udp_errno = match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .and_then(|socket| socket.send_to(&[0u8; 8], udp_target))
    {
        Ok(_) => 0,
        Err(err) => err.raw_os_error().unwrap_or(-1),
    };
    report.steps.insert("udp_allowed".to_owned(), udp_errno);
    report
}

fn connect_loop(
    target: SocketAddrV4,
    threads: usize,
    millis: u64,
    max: u64,
    expect: i32,
) -> anyhow::Result<Report> {
    let target = SockaddrIn::from(target);
    let per_thread = max / threads as u64;
    let busy_before = crate::procfs::host_busy_ns()?;
    let started = Instant::now();
    let deadline = started + Duration::from_millis(millis);
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            thread::spawn(move || {
                let mut outcomes: BTreeMap<i32, u64> = BTreeMap::new();
                let mut done = 0u64;
                while done < per_thread && Instant::now() < deadline {
                    *outcomes.entry(connect_once(&target)).or_default() += 1;
                    done += 1;
                }
                outcomes
            })
        })
        .collect();
    let mut report = Report::default();
    for worker in workers {
        let outcomes = worker
            .join()
            .map_err(|_| anyhow::anyhow!("a connect thread panicked"))?;
        for (errno, count) in outcomes {
            *report.outcomes.entry(errno).or_default() += count;
        }
    }
    report.elapsed_ns = elapsed_ns(started);
    report.host_busy_ns = crate::procfs::host_busy_ns()?.saturating_sub(busy_before);
    report.ops = report.outcomes.get(&expect).copied().unwrap_or(0);
    Ok(report)
}

fn new_destinations(base: Ipv4Addr, port: u16, count: u64, millis: u64) -> Report {
    let started = Instant::now();
    let deadline = started + Duration::from_millis(millis);
    let mut report = Report::default();
    let base = u32::from(base);
    for i in 0..count {
        if Instant::now() >= deadline {
            break;
        }
        let Some(addr) = u32::try_from(i).ok().and_then(|i| base.checked_add(i)) else {
            break;
        };
        let target = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::from(addr), port));
        *report.outcomes.entry(connect_once(&target)).or_default() += 1;
    }
    report.elapsed_ns = elapsed_ns(started);
    report.ops = report.outcomes.get(&0).copied().unwrap_or(0);
    report
}

fn stream(target: SocketAddrV4, millis: u64) -> anyhow::Result<Report> {
    let mut connection = TcpStream::connect_timeout(
        &target.into(),
        Duration::from_millis(STEP_TIMEOUT_MS.unsigned_abs()),
    )
    .with_context(|| format!("connecting to {target}"))?;
    connection
        .set_write_timeout(Some(Duration::from_millis(STEP_TIMEOUT_MS.unsigned_abs())))
        .context("SO_SNDTIMEO")?;
    let buf = vec![0x5au8; 128 * 1024];
    let busy_before = crate::procfs::host_busy_ns()?;
    let started = Instant::now();
    let deadline = started + Duration::from_millis(millis);
    let mut report = Report::default();
    while Instant::now() < deadline {
        let written = connection
            .write(&buf)
            .with_context(|| format!("writing to {target}"))?;
        report.bytes += written as u64;
        report.ops += 1;
    }
    report.elapsed_ns = elapsed_ns(started);
    report.host_busy_ns = crate::procfs::host_busy_ns()?.saturating_sub(busy_before);
    report.outcomes.insert(0, report.ops);
    Ok(report)
}

fn udp(target: SocketAddrV4, payload: usize, millis: u64) -> anyhow::Result<Report> {
    let fd: OwnedFd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("socket(AF_INET, SOCK_DGRAM)")?;
    setsockopt(&fd, sockopt::SendTimeout, &timeout()).context("SO_SNDTIMEO")?;
    let target = SockaddrIn::from(target);
    let buf = vec![0x5au8; payload];
    let busy_before = crate::procfs::host_busy_ns()?;
    let started = Instant::now();
    let deadline = started + Duration::from_millis(millis);
    let mut report = Report::default();
    while Instant::now() < deadline {
        let errno = match sendto(fd.as_raw_fd(), &buf, &target, MsgFlags::empty()) {
            Ok(_) => 0,
            Err(err) => errno_of(err),
        };
        *report.outcomes.entry(errno).or_default() += 1;
    }
    report.elapsed_ns = elapsed_ns(started);
    report.host_busy_ns = crate::procfs::host_busy_ns()?.saturating_sub(busy_before);
    report.ops = report.outcomes.get(&0).copied().unwrap_or(0);
    report.bytes = report.ops * payload as u64;
    Ok(report)
}

pub fn elapsed_ns(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX)
}
