//! Harness of the end-to-end tests of egressd: real kernel, real cgroups, real
//! processes.
//!
//! Every kernel-touching test is named `privileged_*` and needs root and a
//! cgroup v2 mount; without them it fails with a message saying so (it never
//! skips). Run the suite with
//!
//! ```text
//! cargo build --bins && cargo test -p egressd-tests -- --test-threads=1
//! ```
//!
//! The daemon attaches at the cgroup v2 root, so two daemons at once would both
//! enforce: [`Daemon::start`] serializes the tests that run one (a process-wide
//! mutex plus a lock file, which also covers test binaries run in parallel).
//! `--test-threads=1` keeps the output readable; it is not needed for
//! correctness.
//!
//! Cleanup is done by Drop guards, so it also happens when an assertion fails:
//! [`TestCgroup`] kills what is left in it and removes it (children first),
//! [`Daemon`] stops egressd (SIGTERM, then SIGKILL after a deadline),
//! [`SysctlGuard`] restores a sysctl, [`RunningProbe`] kills its probe,
//! [`Dnsmasq`] stops the resolver of an FQDN test.
//! Traffic only ever goes to 127.0.0.0/8 and ::1.

mod bins;
mod cgroup;
mod daemon;
mod dns;
mod handoff;
pub mod metrics;
mod net;
mod policy;
mod probe;
mod stub;
mod sysctl;
mod traffic;
mod users;

pub use bins::{binary, egressctl_bin, egressd_bin, probe_bin, run_bounded};
pub use cgroup::{TestCgroup, cgroup2_root, require_root};
pub use daemon::{Daemon, DaemonLock, EVENT_TIMEOUT, READY_TIMEOUT, ready_timeout};
pub use dns::{
    AnswerRecord, DNS_PORT, DNSMASQ, Dnsmasq, DnsmasqBuilder, FakeResolver, ReceivedQuery,
    answer_addresses, answer_bytes, query_bytes, tcp_exchange, udp_exchange, wire,
};
pub use handoff::{connect_fd, receive_fd, send_fd};
pub use net::{TcpServer, TcpSink, TcpTarget, UdpTarget, destination};
pub use policy::{DnsSettings, WorkloadSpec, allow, allow_fqdn, line_of, policy_toml};
pub use probe::{ProbeResult, RunningProbe, run_probe, run_probe_in, spawn_probe_in};
pub use stub::{Libc, Lookup, resolve_in, stub_client};
pub use sysctl::{PING_GROUP_RANGE, SysctlGuard, allow_ping_sockets};
pub use traffic::{
    ConnectCounts, StatusSample, StatusSampler, StopFile, connect_counts, latency_summary,
    percentile, rss_kib, spawn_connect_loop,
};
pub use users::{Identity, NOBODY, TestGroup, ctl_as, open_to_everyone, run_as};

/// `EPERM`: what the datapath makes a refused syscall fail with.
pub const EPERM: i32 = libc::EPERM;
