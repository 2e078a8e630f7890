//! egressd started for one test, stopped when dropped.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tempfile::TempDir;

use crate::bins::{egressctl_bin, egressd_bin, probe_bin, run_bounded};
use crate::cgroup::{cgroup2_root, require_root};

/// How long egressd may take to answer `status` after it starts, unless
/// `EGRESSD_TEST_READY_TIMEOUT_SECS` says otherwise (see [`ready_timeout`]).
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Overrides [`READY_TIMEOUT`]: scripts/kernel-matrix.sh runs the tests in VMs under
/// software emulation, where the verifier alone takes minutes.
const READY_TIMEOUT_VAR: &str = "EGRESSD_TEST_READY_TIMEOUT_SECS";
/// How long a test waits for an event to show up in `egressctl events`.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on one `egressctl` run.
const CTL_TIMEOUT: Duration = Duration::from_secs(15);
/// How long egressd has to exit after SIGTERM before it gets SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a test waits for the daemons of other tests to finish.
const SERIAL_TIMEOUT: Duration = Duration::from_secs(600);
/// Where test daemons pin their programs and maps, one folder each.
pub const PIN_ROOT: &str = "/sys/fs/bpf";
/// Lock file shared by every test process that runs a daemon.
const LOCK_FILE: &str = "/tmp/egressd-tests.lock";

/// [`READY_TIMEOUT`], or `EGRESSD_TEST_READY_TIMEOUT_SECS` seconds when set; panics when that
/// is not a whole number.
pub fn ready_timeout() -> Duration {
    match std::env::var(READY_TIMEOUT_VAR) {
        Ok(secs) => Duration::from_secs(secs.trim().parse().unwrap_or_else(|err| {
            panic!("{READY_TIMEOUT_VAR}={secs:?} is not a number of seconds: {err}")
        })),
        Err(_) => READY_TIMEOUT,
    }
}

/// Whether a [`DaemonLock`] is held in this process (the lock file orders processes). A flag
/// and a condition variable rather than a mutex guard, so that the lock can move between
/// threads (a `Daemon` is shared with the threads of a load test).
static HELD: Mutex<bool> = Mutex::new(false);
static RELEASED: Condvar = Condvar::new();

/// The right to attach egressd at the cgroup root: one holder at a time, in this process
/// (a mutex) and across processes (a lock file, so test binaries run in parallel and
/// nextest take turns too). [`Daemon::start`] takes it for the life of its daemon. A
/// benchmark that alternates egressd with other firewalls holds it across several daemons
/// ([`DaemonLock::acquire`], [`Daemon::start_holding`]) so that no test daemon attaches in
/// between and slows the configurations it compares with.
pub struct DaemonLock {
    _file: File,
}

impl DaemonLock {
    /// Waits (at most 10 minutes) until no other daemon of the tests runs, then holds the
    /// lock until dropped.
    pub fn acquire() -> DaemonLock {
        let deadline = Instant::now() + SERIAL_TIMEOUT;
        let mut held = HELD.lock().unwrap_or_else(PoisonError::into_inner);
        while *held {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "another test of this process held the daemon lock for more than {SERIAL_TIMEOUT:?}"
            );
            held = RELEASED
                .wait_timeout(held, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        *held = true;
        drop(held);
        // Taken after the in-process flag, so a panic here must give the flag back.
        let file = std::panic::catch_unwind(lock_file).unwrap_or_else(|panic| {
            release_in_process();
            std::panic::resume_unwind(panic)
        });
        DaemonLock { _file: file }
    }

    /// The lock if no one holds it now, without waiting (a caller that must stay responsive
    /// polls this).
    pub fn try_acquire() -> Option<DaemonLock> {
        {
            let mut held = HELD.lock().unwrap_or_else(PoisonError::into_inner);
            if *held {
                return None;
            }
            *held = true;
        }
        let file = open_lock_file();
        if file.try_lock().is_err() {
            release_in_process();
            return None;
        }
        Some(DaemonLock { _file: file })
    }
}

impl Drop for DaemonLock {
    fn drop(&mut self) {
        release_in_process();
    }
}

fn release_in_process() {
    *HELD.lock().unwrap_or_else(PoisonError::into_inner) = false;
    RELEASED.notify_one();
}

fn open_lock_file() -> File {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_FILE)
        .unwrap_or_else(|err| panic!("cannot open {LOCK_FILE}: {err}"))
}

/// [`LOCK_FILE`], locked (waiting at most [`SERIAL_TIMEOUT`]).
fn lock_file() -> File {
    let file = open_lock_file();
    let deadline = Instant::now() + SERIAL_TIMEOUT;
    loop {
        match file.try_lock() {
            Ok(()) => return file,
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            Err(err) => panic!(
                "another egressd test held {LOCK_FILE} for more than {SERIAL_TIMEOUT:?}: {err}"
            ),
        }
    }
}

/// Name prefix of the test daemons' bpffs folders: `egressd-test-<pid>-<unique>`.
const PIN_PREFIX: &str = "egressd-test-";

/// Removes the pins (and so ends the enforcement) of test daemons whose test process no
/// longer runs: a run killed before its guards ran leaves its programs attached at the cgroup
/// root. Folders without a pid in their name predate that naming and are stale too.
fn sweep_stale_pins() {
    let Ok(entries) = fs::read_dir(PIN_ROOT) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|name| name.strip_prefix(PIN_PREFIX)) else {
            continue;
        };
        let owner = rest
            .split_once('-')
            .and_then(|(pid, _)| pid.parse::<u32>().ok());
        let alive = owner.is_some_and(|pid| {
            pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists()
        });
        if !alive {
            let path = entry.path();
            match fs::remove_dir_all(&path) {
                Ok(()) => eprintln!("egressd-tests: removed stale pins {}", path.display()),
                Err(err) => eprintln!("egressd-tests: stale pins {}: {err}", path.display()),
            }
        }
    }
}

/// A running egressd with its own policy file, state dir and control socket
/// in a temporary directory. Its stdout and stderr go to files there; they are
/// printed when the test fails. Dropping it stops the daemon (SIGTERM, then
/// SIGKILL after 10 s).
pub struct Daemon {
    child: Option<Child>,
    dir: TempDir,
    policy: PathBuf,
    socket: PathBuf,
    state_dir: PathBuf,
    /// This daemon's own bpffs folder, removed (ending enforcement) when dropped.
    pin_dir: PathBuf,
    extra_args: Vec<String>,
    stdout_log: PathBuf,
    stderr_log: PathBuf,
    // Released after `drop` has stopped the daemon (fields drop after the body).
    _lock: Arc<DaemonLock>,
}

impl Daemon {
    /// Writes `policy_toml`, starts egressd on it and waits until `egressctl
    /// status` answers (polling every 50 ms, at most [`ready_timeout`]).
    pub fn start(policy_toml: &str) -> Daemon {
        Daemon::start_with_args(policy_toml, &[])
    }

    /// [`Daemon::start`] with extra command-line arguments for egressd.
    pub fn start_with_args(policy_toml: &str, extra_args: &[&str]) -> Daemon {
        require_root();
        cgroup2_root();
        egressd_bin();
        egressctl_bin();
        probe_bin();
        Daemon::start_holding(Arc::new(DaemonLock::acquire()), policy_toml, extra_args)
    }

    /// [`Daemon::start_with_args`] under a [`DaemonLock`] the caller already holds; the
    /// daemon keeps it until it has stopped.
    pub fn start_holding(lock: Arc<DaemonLock>, policy_toml: &str, extra_args: &[&str]) -> Daemon {
        require_root();
        cgroup2_root();
        egressd_bin();
        egressctl_bin();
        let dir = tempfile::Builder::new()
            .prefix("egressd-test-")
            .tempdir()
            .expect("create a temporary directory");
        let policy = dir.path().join("policy.toml");
        let state_dir = dir.path().join("state");
        let socket = dir.path().join("egressd.sock");
        let stdout_log = dir.path().join("egressd.stdout");
        let stderr_log = dir.path().join("egressd.stderr");
        fs::write(&policy, policy_toml).expect("write policy.toml");
        fs::create_dir(&state_dir).expect("create the state dir");
        sweep_stale_pins();
        // `egressd-test-<pid>-<unique>`: the pid lets a later run find pins that a killed
        // run left enforcing.
        let unique = dir
            .path()
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.strip_prefix(PIN_PREFIX))
            .expect("a temporary directory has the name given")
            .to_owned();
        let pin_dir =
            PathBuf::from(PIN_ROOT).join(format!("{PIN_PREFIX}{}-{unique}", std::process::id()));
        let mut daemon = Daemon {
            child: None,
            dir,
            policy,
            socket,
            state_dir,
            pin_dir,
            extra_args: extra_args.iter().map(|arg| (*arg).to_owned()).collect(),
            stdout_log,
            stderr_log,
            _lock: lock,
        };
        daemon.spawn();
        daemon.wait_ready();
        daemon
    }

    /// Starts egressd on this daemon's files (its pins, state and socket).
    fn spawn(&mut self) {
        let egressd = egressd_bin();
        let append = |path: &Path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("open a daemon log")
        };
        let child = Command::new(&egressd)
            .arg("--config")
            .arg(&self.policy)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(append(&self.stdout_log))
            .stderr(append(&self.stderr_log))
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}", egressd.display()));
        self.child = Some(child);
    }

    /// Starts egressd again after it stopped or was killed, on the same policy, state and
    /// pins (a restart, or an upgrade in place), and waits until it answers.
    pub fn restart(&mut self) {
        assert!(
            self.child
                .as_mut()
                .is_none_or(|child| matches!(child.try_wait(), Ok(Some(_)))),
            "restart: egressd is still running"
        );
        self.spawn();
        self.wait_ready();
    }

    /// SIGKILL, as a crash: nothing runs in the daemon after it. Returns once it is reaped.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `egressd --uninstall` on this daemon's pins (bounded); panics unless it succeeds.
    pub fn uninstall(&self) -> Output {
        let output = run_bounded(
            Command::new(egressd_bin())
                .arg("--uninstall")
                .arg("--pin-dir")
                .arg(&self.pin_dir),
            CTL_TIMEOUT,
        );
        assert!(
            output.status.success(),
            "egressd --uninstall failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    /// The bpffs folder of this daemon's pins.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    fn wait_ready(&mut self) {
        let ready_timeout = ready_timeout();
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "egressd exited with {status} before it was ready\n{}",
                    self.logs()
                );
            }
            let output = self.ctl(&["status", "--json"]);
            if output.status.success() {
                let status: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
                    panic!(
                        "`egressctl status --json` printed no JSON ({err}): {}",
                        String::from_utf8_lossy(&output.stdout)
                    )
                });
                assert_eq!(
                    status["pid"].as_u64(),
                    Some(u64::from(self.pid())),
                    "the control socket answers for another daemon: {status}"
                );
                return;
            }
            if started.elapsed() > ready_timeout {
                panic!(
                    "egressd did not answer `status` within {ready_timeout:?}; last egressctl \
                     stderr: {}\n{}",
                    String::from_utf8_lossy(&output.stderr),
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn policy_path(&self) -> &Path {
        &self.policy
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The daemon's stdout and stderr so far.
    pub fn logs(&self) -> String {
        let read = |path: &Path| fs::read_to_string(path).unwrap_or_default();
        format!(
            "----- egressd stdout -----\n{}----- egressd stderr -----\n{}----- end of egressd output -----",
            read(&self.stdout_log),
            read(&self.stderr_log)
        )
    }

    /// Runs `egressctl --socket SOCK ARGS...` (bounded) and returns its output.
    pub fn ctl(&self, args: &[&str]) -> Output {
        run_bounded(
            Command::new(egressctl_bin())
                .arg("--socket")
                .arg(&self.socket)
                .args(args)
                .env_remove("EGRESSD_SOCKET"),
            CTL_TIMEOUT,
        )
    }

    /// Runs egressctl and returns its stdout; panics (with its stderr and the
    /// daemon's logs) when it fails.
    #[track_caller]
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let output = self.ctl(args);
        assert!(
            output.status.success(),
            "`egressctl {}` failed ({}): {}\n{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `egressctl status --json`.
    pub fn status(&self) -> Value {
        let stdout = self.ctl_ok(&["status", "--json"]);
        serde_json::from_str(&stdout)
            .unwrap_or_else(|err| panic!("`status --json` is not JSON ({err}): {stdout}"))
    }

    /// The status entry of the workload `name`.
    #[track_caller]
    pub fn workload(&self, name: &str) -> Value {
        let status = self.status();
        status["workloads"]
            .as_array()
            .and_then(|workloads| workloads.iter().find(|w| w["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no workload {name:?} in status: {status}"))
    }

    /// Polls `status` (every 100 ms, at most `timeout`) until `predicate`
    /// holds; returns that status or panics with the last one.
    pub fn wait_for_status(
        &self,
        what: &str,
        timeout: Duration,
        predicate: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status();
            if predicate(&status) {
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "status never showed {what} within {timeout:?}; last: {status}\n{}",
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// `egressctl events --json --limit N`, one JSON value per event.
    pub fn events(&self, limit: usize) -> Vec<Value> {
        let stdout = self.ctl_ok(&["events", "--json", "--limit", &limit.to_string()]);
        stdout
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|err| panic!("event line is not JSON ({err}): {line}"))
            })
            .collect()
    }

    /// Polls `events` (every 100 ms, at most `timeout`) until one matches;
    /// panics with every event seen when none does.
    pub fn wait_for_event(
        &self,
        what: &str,
        timeout: Duration,
        predicate: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.events(10_000);
            if let Some(event) = events.iter().find(|event| predicate(event)) {
                return event.clone();
            }
            if Instant::now() >= deadline {
                let lines: Vec<String> = events.iter().map(Value::to_string).collect();
                panic!(
                    "no event {what} within {timeout:?}; the daemon has {} events:\n{}\n{}",
                    lines.len(),
                    lines.join("\n"),
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// `egressctl dns --json`: `{"names":[{"workload","name","pattern","hits",
    /// "addresses":[{"address","expires_in_secs"}]}],"stats":{..}}`.
    pub fn dns(&self) -> Value {
        let stdout = self.ctl_ok(&["dns", "--json"]);
        serde_json::from_str(&stdout)
            .unwrap_or_else(|err| panic!("`dns --json` is not JSON ({err}): {stdout}"))
    }

    /// The names of [`Daemon::dns`] that `workload` resolved, each with its addresses.
    pub fn dns_names(&self, workload: &str) -> Vec<Value> {
        let report = self.dns();
        report["names"]
            .as_array()
            .map(|names| {
                names
                    .iter()
                    .filter(|name| name["workload"] == workload)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Replaces the policy file (takes effect on `reload` or SIGHUP).
    pub fn rewrite_policy(&self, policy_toml: &str) {
        fs::write(&self.policy, policy_toml).expect("rewrite policy.toml");
    }

    /// `egressctl reload`.
    pub fn reload(&self) -> Output {
        self.ctl(&["reload"])
    }

    pub fn sighup(&self) {
        kill(self.nix_pid(), Signal::SIGHUP).expect("send SIGHUP to egressd");
    }

    fn nix_pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.pid()).expect("pid fits i32"))
    }

    /// Stops the daemon: SIGTERM, then SIGKILL after 10 s. Returns how it exited
    /// and whether it needed SIGKILL.
    pub fn stop(&mut self) -> Option<(ExitStatus, bool)> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some((status, false));
        }
        let _ = kill(
            Pid::from_raw(i32::try_from(child.id()).ok()?),
            Signal::SIGTERM,
        );
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some((status, false)),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = child.kill();
                    return child.wait().ok().map(|status| (status, true));
                }
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let stopped = self.stop();
        // Pinned programs outlive the daemon: remove them so nothing stays enforced.
        if let Err(err) = fs::remove_dir_all(&self.pin_dir)
            && err.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!(
                "egressd-tests: removing pins {}: {err}",
                self.pin_dir.display()
            );
        }
        if thread::panicking() {
            eprintln!(
                "egressd (stopped: {stopped:?}) in {}:\n{}",
                self.dir.path().display(),
                self.logs()
            );
        } else if let Some((_, true)) = stopped {
            eprintln!(
                "egressd-tests: egressd needed SIGKILL: it ignored SIGTERM for {STOP_TIMEOUT:?}"
            );
        }
    }
}
