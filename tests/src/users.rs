//! Other identities for the control-socket tests: system groups created for one test (and
//! deleted when dropped), and commands run under a uid, gid and supplementary groups.

use std::io;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once, PoisonError};
use std::time::Duration;

use crate::bins::{egressctl_bin, run_bounded};
use crate::cgroup::require_root;
use crate::daemon::Daemon;

const GROUPADD: &str = "/usr/sbin/groupadd";
const GROUPDEL: &str = "/usr/sbin/groupdel";
/// Name prefix of every group the tests create: `egressd-test-<pid>-<n>` (at most 32 chars).
const PREFIX: &str = "egressd-test-";
/// Bound on one groupadd or groupdel (they take a lock on /etc/group).
const GROUP_TOOL_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one egressctl run.
const CTL_TIMEOUT: Duration = Duration::from_secs(15);

/// `nobody`: the uid the tests run unprivileged clients as (Debian's nobody/nogroup).
pub const NOBODY: u32 = 65534;

static NEXT: AtomicUsize = AtomicUsize::new(0);
static SWEEP: Once = Once::new();
/// groupadd and groupdel of one test process, one at a time (they lock /etc/group).
static GROUP_TOOLS: Mutex<()> = Mutex::new(());

/// A system group created for one test with `groupadd --system`, deleted (`groupdel`) when
/// dropped. Group names resolve through the system's group database, as egressd's
/// `[control] read_group` does.
#[derive(Debug)]
pub struct TestGroup {
    name: String,
    gid: u32,
}

impl TestGroup {
    #[expect(
        clippy::new_without_default,
        reason = "creating a system group is a side effect, not a default value"
    )]
    pub fn new() -> TestGroup {
        require_root();
        for tool in [GROUPADD, GROUPDEL] {
            assert!(
                Path::new(tool).is_file(),
                "{tool} is missing: the control-socket tests create groups (apt install passwd)"
            );
        }
        SWEEP.call_once(sweep_stale);
        let name = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        group_tool(Command::new(GROUPADD).arg("--system").arg(&name));
        let gid = nix::unistd::Group::from_name(&name)
            .unwrap_or_else(|err| panic!("looking up the new group {name}: {err}"))
            .unwrap_or_else(|| panic!("groupadd created no group {name}"))
            .gid
            .as_raw();
        TestGroup { name, gid }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn gid(&self) -> u32 {
        self.gid
    }
}

impl Drop for TestGroup {
    fn drop(&mut self) {
        if let Err(err) = delete_group(&self.name) {
            // Never panic in drop (it would abort a panicking test): say it.
            eprintln!("egressd-tests: cleanup of group {}: {err}", self.name);
        }
    }
}

fn group_tool(command: &mut Command) {
    let _one_at_a_time = GROUP_TOOLS.lock().unwrap_or_else(PoisonError::into_inner);
    let output = run_bounded(command, GROUP_TOOL_TIMEOUT);
    assert!(
        output.status.success(),
        "{command:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

fn delete_group(name: &str) -> io::Result<()> {
    let _one_at_a_time = GROUP_TOOLS.lock().unwrap_or_else(PoisonError::into_inner);
    let output = run_bounded(Command::new(GROUPDEL).arg(name), GROUP_TOOL_TIMEOUT);
    if output.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "groupdel {name}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// Deletes `egressd-test-<pid>-*` groups of test processes that no longer run (left behind
/// by a run that was killed).
fn sweep_stale() {
    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    for name in groups.lines().filter_map(|line| line.split(':').next()) {
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
            && let Err(err) = delete_group(name)
        {
            eprintln!("egressd-tests: stale group {name}: {err}");
        }
    }
}

/// Who a command runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (empty: none).
    pub groups: Vec<u32>,
}

impl Identity {
    /// `nobody`, with `groups` as its supplementary groups.
    pub fn nobody_in(groups: &[u32]) -> Identity {
        Identity {
            uid: NOBODY,
            gid: NOBODY,
            groups: groups.to_vec(),
        }
    }
}

/// Makes `command` run as `who`: between fork and exec it sets the supplementary groups,
/// then the gid, then the uid (std's `uid`/`gid` cannot set supplementary groups).
pub fn run_as<'a>(command: &'a mut Command, who: &Identity) -> &'a mut Command {
    let groups: Vec<libc::gid_t> = who.groups.clone();
    let (uid, gid) = (who.uid, who.gid);
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls
    // (setgroups, setgid, setuid) on memory prepared before the fork; it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

/// `egressctl --socket SOCK ARGS...` of `daemon`, run as `who` (bounded). The daemon's
/// directory must let `who` reach the socket (see [`open_to_everyone`]).
pub fn ctl_as(daemon: &Daemon, who: &Identity, args: &[&str]) -> Output {
    let mut command = Command::new(egressctl_bin());
    command
        .arg("--socket")
        .arg(daemon.socket())
        .args(args)
        .env_remove("EGRESSD_SOCKET");
    run_bounded(run_as(&mut command, who), CTL_TIMEOUT)
}

/// Lets every user reach the control socket inside the daemon's private temporary directory
/// (mode 0755, like /run/egressd): the socket's own permissions are then the only file
/// system gate, as in production.
pub fn open_to_everyone(dir: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|err| panic!("chmod 755 {}: {err}", dir.display()));
}
