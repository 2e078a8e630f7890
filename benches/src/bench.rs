//! One run: every scenario, every configuration, alternated round by round.
//!
//! A round holds the tests' daemon lock (so no test daemon attaches at the cgroup root in
//! the middle of it and slows one configuration but not the next) and runs each
//! configuration once, in an order rotated every round. Each configuration is set up, checked
//! to be in force, measured and removed; the namespace is checked to hold no rules after.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use egressd_tests::{Daemon, DaemonLock, TestCgroup, cgroup2_root, run_bounded};
use tempfile::TempDir;

use crate::allowlist::{self, OTHER_WORKLOADS, Plan};
use crate::client::{Report, Spec};
use crate::client_dns::DnsSpec;
use crate::dns::Resolver;
use crate::firewall::{
    Config, Iptables, Nftables, ensure_no_rules, reload_egressd, rotated, start_egressd,
};
use crate::procfs;
use crate::results::{Key, Results};
use crate::sinks::{TcpSink, UdpSink};

/// The allowed loopback destination.
const TARGET_IP: Ipv4Addr = Ipv4Addr::LOCALHOST;
/// A listening address on no allowlist: a configuration in force refuses it.
const BLOCKED_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
/// A closed port there: refused by the kernel without a firewall, by the firewall with one.
const REFUSED: SocketAddrV4 = SocketAddrV4::new(BLOCKED_IP, 9);
/// An allowed UDP port no socket is bound to: datagrams to it are dropped after the route
/// and protocol lookup, before any socket (and so any cgroup ingress hook) sees them. On
/// loopback the receive path runs on the sender's CPU; this shows the send side alone.
const UNBOUND_UDP: SocketAddrV4 = SocketAddrV4::new(TARGET_IP, 9);
/// Learning mode connects to BASE + i: a new destination every time.
const LEARNING_BASE: Ipv4Addr = Ipv4Addr::new(127, 64, 0, 0);
/// Bound on one connect loop's operations (the duration ends it long before).
const CONNECT_MAX: u64 = 50_000_000;
/// UDP payload of the packet-rate scenario.
const UDP_PAYLOAD: usize = 64;
/// A client may take this much longer than its scenario before it is killed.
const CLIENT_SLACK: Duration = Duration::from_secs(30);
/// How often a run waiting for someone else's egressd or cgroup programs to go looks.
const FOREIGN_POLL: Duration = Duration::from_secs(5);
/// Between rounds the lock is free this long, so waiting test daemons get their turn.
const LOCK_GAP: Duration = Duration::from_millis(300);
/// Tries of one measurement when the sink dropped SYNs (see `Bench::run_client`).
const ATTEMPTS: usize = 5;
/// Operations that end otherwise than expected: more than this share fails the run.
const MAX_UNEXPECTED: f64 = 0.01;
const MIB: f64 = 1024.0 * 1024.0;

#[derive(Debug, Clone)]
pub struct Options {
    pub quick: bool,
    pub rounds: usize,
    pub millis: u64,
    pub dns_millis: u64,
    pub entries: Vec<usize>,
    /// Whether to run the data-path scenarios (`entries` also sizes the learning policy).
    pub datapath: bool,
    pub dns_rates: Vec<u32>,
    pub learning_flows: u64,
    pub learning_rounds: usize,
    pub learning_millis: u64,
    pub idle_millis: u64,
    /// How long the run waits in all for someone else's egressd or cgroup programs to go.
    pub foreign_wait: Duration,
    pub out: PathBuf,
    pub conditions: String,
}

pub struct Bench {
    opts: Options,
    results: Results,
    interrupted: Arc<AtomicBool>,
    nft_prefix: String,
    cgroup_root: PathBuf,
    /// `Options::foreign_wait`, and when it runs out (set by the first wait: the run waits
    /// that long in all, by the clock).
    foreign_wait: Duration,
    foreign_deadline: Option<Instant>,
    tmp: TempDir,
    accept: TcpSink,
    stream: TcpSink,
    udp: UdpSink,
    blocked: TcpSink,
    wildcard: TcpSink,
    cgroups: Vec<String>,
    // The cgroups come last, so they are removed after everything that ran in them has gone
    // (fields drop in order).
    workload_cgroups: Vec<TestCgroup>,
    /// A cgroup of no workload, for `Config::EgressdUnmanaged`.
    unmanaged: TestCgroup,
    _parent: TestCgroup,
}

fn secs(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

impl Bench {
    pub fn new(opts: Options, interrupted: Arc<AtomicBool>) -> anyhow::Result<Bench> {
        let root = cgroup2_root();
        // nft resolves `socket cgroupv2` paths below /sys/fs/cgroup (TOOLCHAIN.md, note 7).
        let nft_prefix = match root.strip_prefix("/sys/fs/cgroup") {
            Ok(rest) if rest.as_os_str().is_empty() => String::new(),
            Ok(rest) => format!("{}/", rest.display()),
            Err(_) => bail!(
                "the cgroup v2 mount {} is not below /sys/fs/cgroup, where nftables looks for \
                 `socket cgroupv2` paths",
                root.display()
            ),
        };
        let parent = TestCgroup::new();
        let workload_cgroups: Vec<TestCgroup> = (0..=OTHER_WORKLOADS)
            .map(|k| parent.child(&format!("w{k:04}")))
            .collect();
        let cgroups = workload_cgroups
            .iter()
            .map(|c| c.relative_path().to_owned())
            .collect();
        let unmanaged = parent.child("unmanaged");
        Ok(Bench {
            results: Results::default(),
            interrupted,
            nft_prefix,
            cgroup_root: root,
            foreign_wait: opts.foreign_wait,
            foreign_deadline: None,
            tmp: tempfile::Builder::new()
                .prefix("egressd-bench-")
                .tempdir()
                .context("creating a temporary directory")?,
            accept: TcpSink::accept_and_close(TARGET_IP)?,
            stream: TcpSink::discard(TARGET_IP)?,
            udp: UdpSink::bind(TARGET_IP)?,
            blocked: TcpSink::accept_and_close(BLOCKED_IP)?,
            wildcard: TcpSink::accept_and_close(Ipv4Addr::UNSPECIFIED)?,
            cgroups,
            workload_cgroups,
            unmanaged,
            _parent: parent,
            opts,
        })
    }

    /// Where the client runs: the measured workload's cgroup, or one of no workload.
    fn client_cgroup(&self, config: Config) -> &TestCgroup {
        match config {
            Config::EgressdUnmanaged => &self.unmanaged,
            _ => &self.workload_cgroups[0],
        }
    }

    fn plan(&self, entries: usize) -> Plan {
        Plan {
            cgroups: self.cgroups.clone(),
            entries: allowlist::measured(entries, 0),
            target: TARGET_IP,
        }
    }

    fn check_interrupted(&self) -> anyhow::Result<()> {
        ensure!(
            !self.interrupted.load(Ordering::Relaxed),
            "interrupted: stopping (cleanup follows)"
        );
        Ok(())
    }

    /// Takes the daemon lock for one round (test daemons wait meanwhile), first waiting until
    /// no one else's egressd runs and nothing is attached at the cgroup root: those programs
    /// would run on every packet of every configuration. The run waits `Options::foreign_wait`
    /// in all for them; once that is spent, rounds start regardless and are listed as
    /// disturbed.
    fn begin_round(&mut self, label: &str) -> anyhow::Result<Arc<DaemonLock>> {
        let mut announced = false;
        let lock = loop {
            self.check_interrupted()?;
            let Some(lock) = DaemonLock::try_acquire() else {
                thread::sleep(Duration::from_millis(100));
                continue;
            };
            let daemons = procfs::other_egressd();
            let programs = procfs::root_programs(&self.cgroup_root).unwrap_or_default();
            if daemons.is_empty() && programs.is_empty() {
                break lock;
            }
            let waited_out = match self.foreign_deadline {
                Some(deadline) => Instant::now() >= deadline,
                None => self.foreign_wait.is_zero(),
            };
            if waited_out {
                self.results.meta.disturbed_rounds.push(format!(
                    "{label}: egressd pids {daemons:?}, programs at the cgroup root {programs:?}"
                ));
                eprintln!(
                    "egressd-bench: {label}: measured while someone else's egressd or cgroup programs are attached"
                );
                break lock;
            }
            let deadline = *self
                .foreign_deadline
                .get_or_insert_with(|| Instant::now() + self.foreign_wait);
            if !announced {
                eprintln!(
                    "egressd-bench: {label}: waiting (at most {:?} more in this run) for someone \
                     else's egressd (pids {daemons:?}) or cgroup programs {programs:?} to go",
                    deadline.saturating_duration_since(Instant::now())
                );
                announced = true;
            }
            drop(lock);
            thread::sleep(FOREIGN_POLL.min(deadline.saturating_duration_since(Instant::now())));
        };
        let load = procfs::loadavg();
        if load > self.results.meta.loadavg_max || self.results.meta.loadavg_max.is_nan() {
            self.results.meta.loadavg_max = load;
        }
        Ok(Arc::new(lock))
    }

    fn end_round(lock: Arc<DaemonLock>) {
        drop(lock);
        thread::sleep(LOCK_GAP);
    }

    pub fn set_meta(&mut self, meta: crate::results::Meta) {
        self.results.meta = meta;
    }

    pub fn run(mut self) -> anyhow::Result<Results> {
        let started = Instant::now();
        self.results.meta.loadavg_start = procfs::loadavg();
        self.results.meta.loadavg_max = self.results.meta.loadavg_start;
        if self.opts.datapath {
            for entries in self.opts.entries.clone() {
                self.datapath_rounds(entries)?;
            }
        }
        if !self.opts.dns_rates.is_empty() {
            self.dns_rounds()?;
        }
        if self.opts.learning_rounds > 0 {
            self.learning_rounds()?;
        }
        self.results.meta.loadavg_end = procfs::loadavg();
        self.results.meta.duration_seconds = started.elapsed().as_secs_f64();
        Ok(std::mem::take(&mut self.results))
    }

    // ---- data path: connect, stream, UDP, refused connect; every configuration ----

    fn datapath_rounds(&mut self, entries: usize) -> anyhow::Result<()> {
        eprintln!("egressd-bench: data path, {entries} entries: generating the rule sets");
        let plan = self.plan(entries);
        let policy = plan.egressd_policy("strict", None, None);
        let replacement =
            plan.egressd_policy("strict", Some(&allowlist::measured(entries, 1)), None);
        let nft = plan.nftables(&self.nft_prefix);
        let ipt = plan.iptables();
        for round in 0..self.opts.rounds {
            let label = format!("data path, {entries} entries, round {}", round + 1);
            let lock = self.begin_round(&label)?;
            for config in rotated(&Config::ALL, round) {
                self.check_interrupted()?;
                eprintln!(
                    "egressd-bench: data path, {entries} entries, round {}/{}: {config}",
                    round + 1,
                    self.opts.rounds
                );
                match config {
                    Config::None => self.datapath(entries, round, config, None)?,
                    // Measured within the egressd session below.
                    Config::EgressdUnmanaged => {}
                    Config::Egressd => {
                        let (daemon, ready) = start_egressd(&lock, &policy);
                        self.egressd_setup(&daemon, entries, round, ready, &replacement, &policy)?;
                        self.datapath(entries, round, config, Some(&daemon))?;
                        let unmanaged = Config::EgressdUnmanaged;
                        self.datapath(entries, round, unmanaged, Some(&daemon))?;
                    }
                    Config::Nftables => {
                        let (guard, loaded) = Nftables::load(&nft, self.tmp.path())?;
                        self.record_time(
                            "nft_load",
                            "nftables ruleset load (nft -f)",
                            entries,
                            round,
                            config,
                            loaded,
                        );
                        self.datapath(entries, round, config, None)?;
                        drop(guard);
                    }
                    Config::Iptables => {
                        let (guard, loaded) = Iptables::load(&ipt)?;
                        self.record_time(
                            "ipt_load",
                            "iptables rules load (iptables-nft-restore)",
                            entries,
                            round,
                            config,
                            loaded,
                        );
                        self.datapath(entries, round, config, None)?;
                        drop(guard);
                    }
                }
                ensure_no_rules()?;
            }
            Self::end_round(lock);
        }
        Ok(())
    }

    fn record_time(
        &mut self,
        id: &str,
        title: &str,
        entries: usize,
        round: usize,
        config: Config,
        time: Duration,
    ) {
        let key = Key {
            id,
            title,
            unit: "s",
            entries: Some(entries),
            higher_is_better: false,
        };
        self.results.record(&key, round, config, secs(time));
    }

    fn record(&mut self, key: &Key<'_>, round: usize, config: Config, value: f64) {
        self.results.record(key, round, config, value);
    }

    /// Start-up, idle use and two reloads that replace every rule of the measured workload
    /// (and back, so the data path is measured on the same rules as the other configurations).
    fn egressd_setup(
        &mut self,
        daemon: &Daemon,
        entries: usize,
        round: usize,
        ready: Duration,
        replacement: &str,
        policy: &str,
    ) -> anyhow::Result<()> {
        let e = Some(entries);
        let config = Config::Egressd;
        self.record_time(
            "egressd_ready",
            "egressd start to enforcing (status answers)",
            entries,
            round,
            config,
            ready,
        );
        let before = procfs::sample(daemon.pid())?;
        thread::sleep(Duration::from_millis(self.opts.idle_millis));
        let after = procfs::sample(daemon.pid())?;
        self.record(
            &Key::new(
                "egressd_idle_cpu",
                "egressd CPU at idle",
                "% of a CPU",
                e,
                false,
            ),
            round,
            config,
            after.cpu_percent_since(&before),
        );
        self.record(
            &Key::new("egressd_rss_idle", "egressd RSS at idle", "MiB", e, false),
            round,
            config,
            after.rss_kib as f64 / 1024.0,
        );
        for target in [replacement, policy] {
            let took = reload_egressd(daemon, target).with_context(|| daemon.logs())?;
            self.record_time(
                "egressd_reload",
                "egressd reload, every rule of the measured workload replaced",
                entries,
                round,
                config,
                took,
            );
        }
        let after_reload = procfs::sample(daemon.pid())?;
        self.record(
            &Key::new(
                "egressd_rss_reload",
                "egressd RSS after two reloads (peak in the process's life)",
                "MiB",
                e,
                false,
            ),
            round,
            config,
            after_reload.hwm_kib as f64 / 1024.0,
        );
        Ok(())
    }

    fn datapath(
        &mut self,
        entries: usize,
        round: usize,
        config: Config,
        daemon: Option<&Daemon>,
    ) -> anyhow::Result<()> {
        self.check(config, daemon)?;
        let e = Some(entries);
        let millis = self.opts.millis;
        let accept = self.accept.target();
        for threads in [1usize, 2] {
            let before = daemon.map(|d| procfs::sample(d.pid())).transpose()?;
            let report = self.client(
                config,
                &Spec::Connect {
                    target: accept,
                    threads,
                    millis,
                    max: CONNECT_MAX,
                    expect: 0,
                },
                daemon,
            )?;
            let title = format!(
                "TCP connect+close, {threads} thread{}",
                if threads == 1 { "" } else { "s" }
            );
            let id = format!("connect_{threads}");
            self.record(
                &Key::new(&id, &title, "connects/s", e, true),
                round,
                config,
                report.per_second(report.ops),
            );
            self.record(
                &Key::new(
                    &format!("connect_cpu_{threads}"),
                    &format!("{title}: CPU per connection, all CPUs"),
                    "µs",
                    e,
                    false,
                ),
                round,
                config,
                report.cpu_ns_per(report.ops) / 1000.0,
            );
            if let (Some(daemon), Some(before)) = (daemon, before)
                && threads == 1
            {
                let after = procfs::sample(daemon.pid())?;
                self.record(
                    &Key::new(
                        "egressd_connect_cpu",
                        "egressd CPU during connect, 1 thread",
                        "% of a CPU",
                        e,
                        false,
                    ),
                    round,
                    config,
                    after.cpu_percent_since(&before),
                );
                self.record(
                    &Key::new(
                        "egressd_rss_connect",
                        "egressd RSS after connect, 1 thread",
                        "MiB",
                        e,
                        false,
                    ),
                    round,
                    config,
                    after.rss_kib as f64 / 1024.0,
                );
            }
        }
        let report = self.client(
            config,
            &Spec::Stream {
                target: self.stream.target(),
                millis,
            },
            daemon,
        )?;
        self.record(
            &Key::new("stream", "TCP stream, one connection", "MiB/s", e, true),
            round,
            config,
            report.per_second(report.bytes) / MIB,
        );
        self.record(
            &Key::new(
                "stream_cpu",
                "TCP stream: CPU per MiB, all CPUs",
                "µs",
                e,
                false,
            ),
            round,
            config,
            report.cpu_ns_per(report.bytes) * MIB / 1000.0,
        );
        let report = self.client(
            config,
            &Spec::Udp {
                target: self.udp.addr,
                payload: UDP_PAYLOAD,
                millis,
            },
            daemon,
        )?;
        self.record(
            &Key::new(
                "udp",
                "UDP sendto, 64-byte datagrams, unconnected",
                "packets/s",
                e,
                true,
            ),
            round,
            config,
            report.per_second(report.ops),
        );
        self.record(
            &Key::new(
                "udp_cpu",
                "UDP sendto: CPU per datagram, all CPUs",
                "ns",
                e,
                false,
            ),
            round,
            config,
            report.cpu_ns_per(report.ops),
        );
        let report = self.client(
            config,
            &Spec::Udp {
                target: UNBOUND_UDP,
                payload: UDP_PAYLOAD,
                millis,
            },
            daemon,
        )?;
        self.record(
            &Key::new(
                "udp_unbound",
                "UDP sendto, to a port no socket has (no receive-side socket hooks)",
                "packets/s",
                e,
                true,
            ),
            round,
            config,
            report.per_second(report.ops),
        );
        let report = self.client(
            config,
            &Spec::Connect {
                target: REFUSED,
                threads: 1,
                millis,
                max: CONNECT_MAX,
                expect: config.refused_errno(),
            },
            daemon,
        )?;
        let micros = if report.ops == 0 {
            f64::NAN
        } else {
            report.elapsed_ns as f64 / report.ops as f64 / 1000.0
        };
        self.record(
            &Key::new(
                "refused",
                "refused connect, time until it returns (none: closed port)",
                "µs",
                e,
                false,
            ),
            round,
            config,
            micros,
        );
        Ok(())
    }

    /// Fails unless the configuration is in force: the target passes, a listening address
    /// off the allowlist is refused (reached without a firewall), UDP to the target passes.
    fn check(&mut self, config: Config, daemon: Option<&Daemon>) -> anyhow::Result<()> {
        let report = self.run_client(
            config,
            &Spec::Check {
                allowed: self.accept.target(),
                blocked: SocketAddrV4::new(BLOCKED_IP, self.blocked.target().port()),
                udp: self.udp.addr,
            },
            Duration::from_secs(10),
        )?;
        let expected = [
            ("tcp_allowed", 0),
            ("udp_allowed", 0),
            ("tcp_blocked", config.blocked_errno().unwrap_or(0)),
        ];
        for (step, errno) in expected {
            let got = report.steps.get(step).copied();
            if got != Some(errno) {
                bail!(
                    "{config} is not in force as configured: {step} ended with errno {got:?}, expected {errno}{}",
                    daemon
                        .map(|d| format!("\n{}", d.logs()))
                        .unwrap_or_default()
                );
            }
        }
        Ok(())
    }

    /// Runs the client; a measurement during which the sink's accept queue overflowed (a
    /// dropped SYN stalls the client for a second: the harness's fault, whatever the
    /// configuration) is repeated, at most [`ATTEMPTS`] times in all, and counted.
    fn run_client(
        &mut self,
        config: Config,
        spec: &Spec,
        budget: Duration,
    ) -> anyhow::Result<Report> {
        let mut attempt = 1;
        loop {
            let drops_before = procfs::listen_drops();
            let report = self.run_client_once(config, spec, budget)?;
            let drops = procfs::listen_drops().saturating_sub(drops_before);
            if drops == 0 {
                return Ok(report);
            }
            self.results.meta.repeated_for_syn_drops += 1;
            if attempt == ATTEMPTS {
                self.results.notes.push(format!(
                    "{drops} SYNs were dropped by a full accept queue in the last of {ATTEMPTS} \
                     attempts of {spec:?}; its value is kept and is low"
                ));
                return Ok(report);
            }
            attempt += 1;
        }
    }

    fn run_client_once(
        &self,
        config: Config,
        spec: &Spec,
        budget: Duration,
    ) -> anyhow::Result<Report> {
        let exe = std::env::current_exe().context("the benchmark's own path")?;
        let json = serde_json::to_string(spec).context("encoding the client spec")?;
        let output = run_bounded(
            Command::new(exe)
                .arg("client")
                .arg("--cgroup")
                .arg(self.client_cgroup(config).path())
                .arg("--spec")
                .arg(&json),
            budget + CLIENT_SLACK,
        );
        ensure!(
            output.status.success(),
            "the client ({json}) failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        serde_json::from_slice(&output.stdout).with_context(|| {
            format!(
                "the client printed no report: {}",
                String::from_utf8_lossy(&output.stdout)
            )
        })
    }

    /// Runs a measuring client; fails when more than 1% of its operations ended otherwise
    /// than expected (a number built on failures would mislead).
    fn client(
        &mut self,
        config: Config,
        spec: &Spec,
        daemon: Option<&Daemon>,
    ) -> anyhow::Result<Report> {
        let millis = match spec {
            Spec::Connect { millis, .. }
            | Spec::NewDestinations { millis, .. }
            | Spec::Stream { millis, .. }
            | Spec::Udp { millis, .. } => *millis,
            Spec::Dns(dns) => dns.millis,
            Spec::Check { .. } => 0,
        };
        let report = self.run_client(config, spec, Duration::from_millis(millis))?;
        let total: u64 = report.outcomes.values().sum();
        if report.ops == 0 || report.unexpected() as f64 > MAX_UNEXPECTED * total as f64 {
            bail!(
                "{spec:?}: {} of {total} operations as expected; outcomes by errno {:?}{}",
                report.ops,
                report.outcomes,
                daemon
                    .map(|d| format!("\n{}", d.logs()))
                    .unwrap_or_default()
            );
        }
        Ok(report)
    }

    // ---- DNS: query latency and answer-to-usable, with and without egressd ----

    fn dns_rounds(&mut self) -> anyhow::Result<()> {
        let resolver = Resolver::start()?;
        let plan = self.plan(10);
        let policy = plan.egressd_policy("strict", None, Some(&crate::dns::RESOLVER.to_string()));
        let resolver_addr = match resolver.address() {
            std::net::SocketAddr::V4(addr) => addr,
            std::net::SocketAddr::V6(addr) => bail!("resolver on {addr}"),
        };
        for rate in self.opts.dns_rates.clone() {
            for round in 0..self.opts.rounds {
                let lock = self.begin_round(&format!("DNS at {rate}/s, round {}", round + 1))?;
                for config in rotated(&[Config::None, Config::Egressd], round) {
                    self.check_interrupted()?;
                    eprintln!(
                        "egressd-bench: DNS, {rate} answers/s, round {}/{}: {config}",
                        round + 1,
                        self.opts.rounds
                    );
                    let daemon =
                        (config == Config::Egressd).then(|| start_egressd(&lock, &policy).0);
                    let before = daemon
                        .as_ref()
                        .map(|d| procfs::sample(d.pid()))
                        .transpose()?;
                    let spec = Spec::Dns(DnsSpec {
                        resolver: resolver_addr,
                        rate,
                        probe_rate: (rate / 10).min(200),
                        probe_port: self.wildcard.addr.port(),
                        millis: self.opts.dns_millis,
                    });
                    let report = self.client(config, &spec, daemon.as_ref())?;
                    let dns = report
                        .dns
                        .clone()
                        .context("the DNS client reported no DNS numbers")?;
                    if dns.probe_failures > 0 || dns.usable.count == 0 || dns.usable_tcp.count == 0
                    {
                        bail!(
                            "{config}: {} of {} DNS probes never became usable ({dns:?}){}",
                            dns.probe_failures,
                            dns.probes,
                            daemon
                                .as_ref()
                                .map(|d| format!("\n{}", d.logs()))
                                .unwrap_or_default()
                        );
                    }
                    if dns.probes_unanswered > 0 {
                        self.results.notes.push(format!(
                            "DNS at {rate}/s, {config}, round {}: {} of {} probes got no answer \
                             within 1 s (the benchmark's resolver fell behind: {} of {} load \
                             queries answered)",
                            round + 1,
                            dns.probes_unanswered,
                            dns.probes,
                            dns.answered,
                            dns.sent
                        ));
                    }
                    let id = |name: &str| format!("{name}@{rate}/s");
                    let micros = |nanos: u64| nanos as f64 / 1000.0;
                    let probed = dns.usable.count + dns.usable_tcp.count;
                    let rows: [(&str, &str, &'static str, bool, f64); 11] = [
                        (
                            "dns_lag_p50",
                            "DNS answer to address usable (until the connect that passes \
                             starts), p50",
                            "µs",
                            false,
                            micros(dns.lag.p50),
                        ),
                        (
                            "dns_lag_p99",
                            "DNS answer to address usable (until the connect that passes \
                             starts), p99",
                            "µs",
                            false,
                            micros(dns.lag.p99),
                        ),
                        (
                            "dns_rtt_p50",
                            "DNS query round trip, p50",
                            "µs",
                            false,
                            micros(dns.rtt.p50),
                        ),
                        (
                            "dns_rtt_p99",
                            "DNS query round trip, p99",
                            "µs",
                            false,
                            micros(dns.rtt.p99),
                        ),
                        (
                            "dns_usable_p50",
                            "DNS answer to address usable (UDP connect passes), p50",
                            "µs",
                            false,
                            micros(dns.usable.p50),
                        ),
                        (
                            "dns_usable_p99",
                            "DNS answer to address usable (UDP connect passes), p99",
                            "µs",
                            false,
                            micros(dns.usable.p99),
                        ),
                        (
                            "dns_usable_tcp_p50",
                            "DNS answer to TCP connect started, p50",
                            "µs",
                            false,
                            micros(dns.usable_tcp.p50),
                        ),
                        (
                            "dns_usable_tcp_p99",
                            "DNS answer to TCP connect started, p99",
                            "µs",
                            false,
                            micros(dns.usable_tcp.p99),
                        ),
                        (
                            "dns_first_try",
                            "DNS probes usable at the first connect",
                            "%",
                            true,
                            100.0 * dns.usable_first_try as f64 / probed as f64,
                        ),
                        (
                            "dns_answers",
                            "DNS answers received",
                            "answers/s",
                            true,
                            report.per_second(dns.answered + probed),
                        ),
                        (
                            "dns_sent",
                            "DNS load queries sent",
                            "queries/s",
                            true,
                            report.per_second(dns.sent),
                        ),
                    ];
                    for (name, title, unit, higher_is_better, value) in rows {
                        let title = format!("{title} at {rate}/s offered");
                        let name = id(name);
                        let key = Key::new(&name, &title, unit, None, higher_is_better);
                        self.results.record(&key, round, config, value);
                    }
                    if let (Some(daemon), Some(before)) = (daemon.as_ref(), before) {
                        let after = procfs::sample(daemon.pid())?;
                        let title = format!("egressd CPU during DNS at {rate}/s");
                        let name = id("dns_egressd_cpu");
                        let key = Key::new(&name, &title, "% of a CPU", None, false);
                        self.results
                            .record(&key, round, config, after.cpu_percent_since(&before));
                        // Answers the kernel could not hand over (its ring full): the daemon
                        // never learns what they allowed.
                        let status = daemon.status();
                        let drops =
                            status["datapath"]["dns_answer_drops"]
                                .as_u64()
                                .ok_or_else(|| {
                                    anyhow::anyhow!("`status` names no dns_answer_drops: {status}")
                                })?;
                        let title = format!("DNS answers lost (ring buffer full) at {rate}/s");
                        let name = id("dns_answer_drops");
                        let key = Key::new(&name, &title, "answers", None, false);
                        self.results.record(&key, round, config, drops as f64);
                        self.dns_idle(daemon, round, rate)?;
                    }
                    drop(daemon);
                    ensure_no_rules()?;
                }
                Self::end_round(lock);
            }
        }
        self.results.notes.push(format!(
            "The benchmark's resolver answered {} queries in all.",
            resolver.answered()
        ));
        Ok(())
    }

    /// How long the DNS idle measurement waits after the load before it starts.
    const DNS_IDLE_SETTLE: Duration = Duration::from_secs(1);

    /// egressd's CPU at idle once the DNS load stopped, holding every address it learned: what
    /// a daemon costs that has learned many names (its upkeep must not grow with them).
    fn dns_idle(&mut self, daemon: &Daemon, round: usize, rate: u32) -> anyhow::Result<()> {
        let config = Config::Egressd;
        let id = |name: &str| format!("{name}@{rate}/s");
        let learned = || -> anyhow::Result<f64> {
            let status = daemon.status();
            status["datapath"]["maps"]
                .as_array()
                .and_then(|maps| maps.iter().find(|map| map["map"] == "fqdn_addresses"))
                .and_then(|map| map["entries"].as_u64())
                .map(|entries| entries as f64)
                .ok_or_else(|| anyhow::anyhow!("`status` names no fqdn_addresses map: {status}"))
        };
        let held = learned()?;
        // The answers still in the ring, and the recorder's write of the questions, first.
        thread::sleep(Self::DNS_IDLE_SETTLE);
        let before = procfs::sample(daemon.pid())?;
        thread::sleep(Duration::from_millis(self.opts.idle_millis));
        let after = procfs::sample(daemon.pid())?;
        let key_name = id("dns_idle_cpu");
        let title =
            format!("egressd CPU at idle after DNS at {rate}/s, every learned address held");
        let key = Key::new(&key_name, &title, "% of a CPU", None, false);
        self.results
            .record(&key, round, config, after.cpu_percent_since(&before));
        let key_name = id("dns_learned_addresses");
        let title = format!("learned addresses held after DNS at {rate}/s");
        let key = Key::new(&key_name, &title, "addresses", None, true);
        self.results.record(&key, round, config, held);
        Ok(())
    }

    // ---- learning mode: every connect a new destination; memory after 100,000 flows ----

    fn learning_rounds(&mut self) -> anyhow::Result<()> {
        let entries = self.opts.entries.iter().copied().max().unwrap_or(10);
        let plan = self.plan(entries);
        let policy = plan.egressd_policy("learning", None, None);
        let e = Some(entries);
        for round in 0..self.opts.learning_rounds {
            let lock = self.begin_round(&format!("learning, round {}", round + 1))?;
            for config in rotated(&[Config::None, Config::Egressd], round) {
                self.check_interrupted()?;
                eprintln!(
                    "egressd-bench: learning, {} new destinations, round {}/{}: {config}",
                    self.opts.learning_flows,
                    round + 1,
                    self.opts.learning_rounds
                );
                let daemon = (config == Config::Egressd).then(|| start_egressd(&lock, &policy).0);
                let events_before = daemon
                    .as_ref()
                    .map(|d| d.status()["datapath"]["events"].as_u64().unwrap_or(0));
                let before = daemon
                    .as_ref()
                    .map(|d| procfs::sample(d.pid()))
                    .transpose()?;
                let report = self.client(
                    config,
                    &Spec::NewDestinations {
                        base: LEARNING_BASE,
                        port: self.wildcard.addr.port(),
                        count: self.opts.learning_flows,
                        millis: self.opts.learning_millis,
                    },
                    daemon.as_ref(),
                )?;
                self.record(
                    &Key::new(
                        "learning_rate",
                        "learning mode: connect+close, each to a new destination",
                        "connects/s",
                        e,
                        true,
                    ),
                    round,
                    config,
                    report.per_second(report.ops),
                );
                if let (Some(daemon), Some(before), Some(events_before)) =
                    (daemon.as_ref(), before, events_before)
                {
                    let during = procfs::sample(daemon.pid())?;
                    self.record(
                        &Key::new(
                            "learning_cpu",
                            "egressd CPU while learning",
                            "% of a CPU",
                            e,
                            false,
                        ),
                        round,
                        config,
                        during.cpu_percent_since(&before),
                    );
                    let (events, drops) = settle(daemon);
                    let after = procfs::sample(daemon.pid())?;
                    self.record(
                        &Key::new(
                            "learning_flows",
                            "flows egressd observed (new-destination events)",
                            "events",
                            e,
                            true,
                        ),
                        round,
                        config,
                        events.saturating_sub(events_before) as f64,
                    );
                    self.record(
                        &Key::new(
                            "learning_drops",
                            "events lost (ring buffer full)",
                            "events",
                            e,
                            false,
                        ),
                        round,
                        config,
                        drops as f64,
                    );
                    self.record(
                        &Key::new(
                            "learning_rss",
                            "egressd RSS after learning, rules and flows held",
                            "MiB",
                            e,
                            false,
                        ),
                        round,
                        config,
                        after.rss_kib as f64 / 1024.0,
                    );
                    self.record(
                        &Key::new(
                            "learning_hwm",
                            "egressd peak RSS over its life",
                            "MiB",
                            e,
                            false,
                        ),
                        round,
                        config,
                        after.hwm_kib as f64 / 1024.0,
                    );
                }
                drop(daemon);
                ensure_no_rules()?;
            }
            Self::end_round(lock);
        }
        Ok(())
    }
}

/// Waits (at most 10 s) until the daemon's event counter stops moving, so the memory it
/// reports is that of every flow handled; returns the counter and the ring-buffer drops.
fn settle(daemon: &Daemon) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let read = || {
        let status = daemon.status();
        (
            status["datapath"]["events"].as_u64().unwrap_or(0),
            status["datapath"]["ring_buffer_drops"]
                .as_u64()
                .unwrap_or(0),
        )
    };
    let mut last = read();
    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(500));
        let now = read();
        if now == last {
            break;
        }
        last = now;
    }
    last
}
