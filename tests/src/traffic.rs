//! Long-running probes of the reload and load tests (a stop file to end them, their reports
//! read back), and a sampler of the daemon's status latency and memory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use crate::bins::{egressctl_bin, run_bounded};
use crate::cgroup::TestCgroup;
use crate::probe::{ProbeResult, RunningProbe, spawn_probe_in};

/// Bound on one `egressctl status` of the sampler: beyond it the test fails.
const STATUS_BOUND: Duration = Duration::from_secs(30);

/// The file whose creation ends `connect-loop` and `dns-flood` probes (they also stop at
/// their time limit). Lives in its own temporary directory, removed when dropped.
#[derive(Debug)]
pub struct StopFile {
    dir: TempDir,
    path: PathBuf,
}

impl StopFile {
    #[expect(
        clippy::new_without_default,
        reason = "creating a temporary directory is a side effect, not a default value"
    )]
    pub fn new() -> StopFile {
        let dir = tempfile::Builder::new()
            .prefix("egressd-test-stop-")
            .tempdir()
            .expect("create a temporary directory for the stop file");
        let path = dir.path().join("stop");
        StopFile { dir, path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn path_str(&self) -> String {
        self.path.display().to_string()
    }

    /// Tells every probe watching this file to finish and report.
    pub fn stop(&self) {
        std::fs::write(&self.path, b"stop").unwrap_or_else(|err| {
            panic!(
                "cannot create the stop file in {}: {err}",
                self.dir.path().display()
            )
        });
    }
}

/// Starts `connect-loop` in `cgroup`: TCP connects to each of `targets` (`(ip, port)`) in
/// turn until `stop` exists or `limit_secs` pass.
pub fn spawn_connect_loop(
    cgroup: &TestCgroup,
    stop: &StopFile,
    limit_secs: u64,
    targets: &[(String, u16)],
) -> RunningProbe {
    let mut args = vec![
        "connect-loop".to_owned(),
        stop.path_str(),
        limit_secs.to_string(),
    ];
    for (ip, port) in targets {
        args.push(ip.clone());
        args.push(port.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    spawn_probe_in(cgroup, &args)
}

/// What `connect-loop` reported for one target.
#[derive(Debug, Clone)]
pub struct ConnectCounts {
    /// `ip:port`.
    pub address: String,
    pub attempts: u64,
    pub connected: u64,
    /// Refused by the datapath.
    pub eperm: u64,
    /// Anything else (a timeout, a full backlog): neither allowed nor refused by egressd.
    pub other_errors: u64,
    pub max_connect_us: u64,
    /// The target's whole entry (first outcomes of each kind with their time).
    pub report: Value,
}

impl std::fmt::Display for ConnectCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} attempts, {} connected, {} EPERM, {} other errors, slowest connect {} us",
            self.address,
            self.attempts,
            self.connected,
            self.eperm,
            self.other_errors,
            self.max_connect_us
        )
    }
}

/// The per-target counts of a `connect-loop` report, in the order the targets were given.
pub fn connect_counts(result: &ProbeResult) -> Vec<ConnectCounts> {
    let count = |entry: &Value, field: &str| {
        entry[field]
            .as_u64()
            .unwrap_or_else(|| panic!("connect-loop report without {field}: {result}"))
    };
    result.report["targets"]
        .as_array()
        .unwrap_or_else(|| panic!("connect-loop report without targets: {result}"))
        .iter()
        .map(|entry| ConnectCounts {
            address: entry["address"].as_str().unwrap_or("?").to_owned(),
            attempts: count(entry, "attempts"),
            connected: count(entry, "connected"),
            eperm: count(entry, "eperm"),
            other_errors: count(entry, "other_errors"),
            max_connect_us: count(entry, "max_connect_us"),
            report: entry.clone(),
        })
        .collect()
}

/// One `egressctl status --json` of a [`StatusSampler`].
#[derive(Debug, Clone)]
pub struct StatusSample {
    /// Since the sampler started.
    pub at: Duration,
    /// Wall time of the whole command (process start included).
    pub latency: Duration,
    /// The daemon's part: one `status` request and its answer on a connection the sampler
    /// opens itself (`None` when it failed).
    pub request_latency: Option<Duration>,
    /// It exited 0 and printed the daemon's status.
    pub answered: bool,
    /// egressctl's stderr when it did not.
    pub error: Option<String>,
    /// The daemon's resident memory right after (VmRSS of /proc/PID/status).
    pub rss_kib: Option<u64>,
}

/// Runs `egressctl status --json` against a daemon every `every` on a thread of its own and
/// records how long each took and the daemon's memory; stopped (and joined) by
/// [`StatusSampler::finish`] or when dropped.
#[derive(Debug)]
pub struct StatusSampler {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<Vec<StatusSample>>>,
}

impl StatusSampler {
    pub fn start(socket: &Path, daemon_pid: u32, every: Duration) -> StatusSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let socket = socket.to_owned();
        let thread = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let started = Instant::now();
                let mut samples = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let at = started.elapsed();
                    let before = Instant::now();
                    let output = run_bounded(
                        Command::new(egressctl_bin())
                            .arg("--socket")
                            .arg(&socket)
                            .args(["status", "--json"])
                            .env_remove("EGRESSD_SOCKET"),
                        STATUS_BOUND,
                    );
                    let latency = before.elapsed();
                    let answered = output.status.success()
                        && serde_json::from_slice::<Value>(&output.stdout)
                            .is_ok_and(|status| status["pid"] == daemon_pid);
                    let request_latency = status_request(&socket);
                    samples.push(StatusSample {
                        at,
                        latency,
                        request_latency,
                        answered,
                        error: (!answered)
                            .then(|| String::from_utf8_lossy(&output.stderr).into_owned()),
                        rss_kib: rss_kib(daemon_pid),
                    });
                    thread::sleep(every.saturating_sub(latency));
                }
                samples
            })
        };
        StatusSampler {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling and returns every sample.
    pub fn finish(mut self) -> Vec<StatusSample> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take().map(thread::JoinHandle::join) {
            Some(Ok(samples)) => samples,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => Vec::new(),
        }
    }
}

impl Drop for StatusSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How long one `status` request takes on a fresh connection to `socket`, answer read.
fn status_request(socket: &Path) -> Option<Duration> {
    use std::io::{BufRead as _, Write as _};
    let started = Instant::now();
    let mut stream = std::os::unix::net::UnixStream::connect(socket).ok()?;
    stream.set_read_timeout(Some(STATUS_BOUND)).ok()?;
    stream.write_all(b"{\"request\":\"status\"}\n").ok()?;
    let mut answer = String::new();
    std::io::BufReader::new(&stream)
        .read_line(&mut answer)
        .ok()?;
    answer
        .contains("\"response\":\"status\"")
        .then(|| started.elapsed())
}

/// Resident memory of `pid` in KiB (`VmRSS:` of /proc/PID/status).
pub fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `p50 X ms, p99 Y ms, max Z ms` of latencies.
pub fn latency_summary(latencies: &[Duration]) -> String {
    let ms = |p| percentile(latencies, p).map_or(f64::NAN, |d: Duration| d.as_secs_f64() * 1e3);
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} samples)",
        ms(50),
        ms(99),
        ms(100),
        latencies.len()
    )
}

/// `p` (0..=100) percentile of `samples` (nearest rank); `None` when there are none.
pub fn percentile<T: Copy + Ord>(samples: &[T], p: u32) -> Option<T> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = (u64::from(p.min(100)) * sorted.len() as u64).div_ceil(100);
    let index = usize::try_from(rank.saturating_sub(1)).unwrap_or(usize::MAX);
    sorted.get(index.min(sorted.len() - 1)).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let samples: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&samples, 50), Some(50));
        assert_eq!(percentile(&samples, 99), Some(99));
        assert_eq!(percentile(&samples, 100), Some(100));
        assert_eq!(percentile(&[7u32], 99), Some(7));
        assert_eq!(percentile::<u32>(&[], 50), None);
        assert_eq!(percentile(&[3u32, 1, 2], 0), Some(1));
    }
}
