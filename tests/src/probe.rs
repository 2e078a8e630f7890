//! Running `egressd-probe` inside a test cgroup and reading its report.

use std::ffi::{CStr, CString};
use std::fmt;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::bins::probe_bin;
use crate::cgroup::TestCgroup;

/// Bound on one probe run (its own steps are bounded by 2 s each).
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// What one probe run reported.
#[derive(Debug, Clone)]
pub struct ProbeResult {
    pub ok: bool,
    /// The errno of the failed step (`None` when `ok`).
    pub errno: Option<i32>,
    /// The whole JSON report (`error`, `step`, `child_cgroup`, ...).
    pub report: Value,
    pub pid: u32,
    pub args: Vec<String>,
    pub stderr: String,
}

impl ProbeResult {
    pub fn is_eperm(&self) -> bool {
        !self.ok && self.errno == Some(libc::EPERM)
    }

    /// Panics unless the action succeeded.
    #[track_caller]
    pub fn assert_ok(&self, context: &str) {
        assert!(self.ok, "{context}: expected success, got {self}");
    }

    /// Panics unless the action failed with EPERM.
    #[track_caller]
    pub fn assert_eperm(&self, context: &str) {
        assert!(
            self.is_eperm(),
            "{context}: expected EPERM (errno {}), got {self}",
            libc::EPERM
        );
    }
}

impl fmt::Display for ProbeResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`egressd-probe {}` (pid {}) -> {}",
            self.args.join(" "),
            self.pid,
            self.report
        )?;
        if !self.stderr.trim().is_empty() {
            write!(f, " stderr: {}", self.stderr.trim())?;
        }
        Ok(())
    }
}

/// A probe still running; killed (and reaped) when dropped.
#[derive(Debug)]
pub struct RunningProbe {
    child: Option<Child>,
    args: Vec<String>,
}

impl RunningProbe {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Waits (at most `timeout`) for the probe's report; panics on timeout,
    /// on a non-zero exit or on output that is not one JSON object.
    pub fn wait(mut self, timeout: Duration) -> ProbeResult {
        let mut child = self.child.take().expect("a running probe has a child");
        let pid = child.id();
        let deadline = Instant::now() + timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "`egressd-probe {}` did not finish within {timeout:?}",
                        self.args.join(" ")
                    );
                }
                Err(err) => panic!("waiting for the probe: {err}"),
            }
        };
        let mut stdout = String::new();
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stdout.take() {
            let _ = pipe.read_to_string(&mut stdout);
        }
        if let Some(mut pipe) = child.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr);
        }
        let args = std::mem::take(&mut self.args);
        assert!(
            status.success(),
            "`egressd-probe {}` exited with {status}: stdout {stdout:?} stderr {stderr:?}",
            args.join(" ")
        );
        let report: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|err| {
            panic!(
                "`egressd-probe {}` printed no JSON report ({err}): stdout {stdout:?} stderr {stderr:?}",
                args.join(" ")
            )
        });
        ProbeResult {
            ok: report["ok"].as_bool().unwrap_or(false),
            errno: report["errno"]
                .as_i64()
                .and_then(|errno| i32::try_from(errno).ok()),
            report,
            pid,
            args,
            stderr,
        }
    }
}

impl Drop for RunningProbe {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts the probe inside `cgroup`: the forked child moves itself there
/// (writes "0" to `cgroup.procs`) before `exec`, so the probe runs in the
/// cgroup from its first instruction.
pub fn spawn_probe_in(cgroup: &TestCgroup, args: &[&str]) -> RunningProbe {
    let procs = CString::new(cgroup.procs_file().as_os_str().as_bytes())
        .expect("a cgroup path has no NUL byte");
    let mut command = Command::new(probe_bin());
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe calls on memory prepared before the fork.
    unsafe {
        command.pre_exec(move || enter_cgroup(&procs));
    }
    spawn(command, args, &format!("in {}", cgroup.path().display()))
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is `procs`. For a forked
/// child before `exec`: only async-signal-safe calls (open, write, close), no allocation.
///
/// # Safety
/// Callable between fork and exec: it touches nothing but `procs` and the file it opens.
pub(crate) unsafe fn enter_cgroup(procs: &CStr) -> io::Result<()> {
    // SAFETY: `procs` is a valid C string; the fd is ours until closed below.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let written = libc::write(fd, b"0".as_ptr().cast(), 1);
        let err = io::Error::last_os_error();
        libc::close(fd);
        if written == 1 { Ok(()) } else { Err(err) }
    }
}

/// Runs the probe inside `cgroup` and returns its report (bounded wait).
pub fn run_probe_in(cgroup: &TestCgroup, args: &[&str]) -> ProbeResult {
    spawn_probe_in(cgroup, args).wait(PROBE_TIMEOUT)
}

/// Runs the probe in the test's own cgroup (in no workload).
pub fn run_probe(args: &[&str]) -> ProbeResult {
    spawn(Command::new(probe_bin()), args, "").wait(PROBE_TIMEOUT)
}

fn spawn(mut command: Command, args: &[&str], where_: &str) -> RunningProbe {
    let child = command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| {
            panic!(
                "cannot start `egressd-probe {}` {where_}: {err}",
                args.join(" ")
            )
        });
    RunningProbe {
        child: Some(child),
        args: args.iter().map(|arg| (*arg).to_owned()).collect(),
    }
}
