//! Test cgroups under the cgroup v2 mount, removed (with whatever still runs in
//! them) when dropped.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long cleanup waits for killed processes to leave a cgroup.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Name prefix of every cgroup the tests create: `egressd-test-<pid>-<n>`.
const PREFIX: &str = "egressd-test-";

static NEXT: AtomicUsize = AtomicUsize::new(0);
static SWEEP: Once = Once::new();

/// Fails the test unless it runs as root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this privileged test needs root (it loads eBPF and creates cgroups): \
         run `sudo -E cargo test -p egressd-tests -- --test-threads=1`"
    );
}

/// The cgroup v2 mount point, from `/proc/self/mounts` (`/sys/fs/cgroup` on a
/// unified host, `/sys/fs/cgroup/unified` on a hybrid one). Fails the test
/// when there is none.
pub fn cgroup2_root() -> PathBuf {
    let mounts = fs::read_to_string("/proc/self/mounts").expect("read /proc/self/mounts");
    mounts
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() >= 3 && fields[2] == "cgroup2").then(|| unescape_mount(fields[1]))
        })
        .next()
        .unwrap_or_else(|| {
            panic!(
                "no cgroup v2 mount in /proc/self/mounts: egressd needs cgroup v2 \
                 (mount -t cgroup2 none /sys/fs/cgroup/unified)"
            )
        })
}

/// `/proc/self/mounts` escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            std::str::from_utf8(digits)
                .ok()
                .and_then(|text| u8::from_str_radix(text, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    PathBuf::from(String::from_utf8_lossy(&out).into_owned())
}

/// A cgroup created for one test: `<root>/egressd-test-<pid>-<n>`, or a child
/// of one. Dropping it kills every process left in it and its descendants and
/// removes them all, children first.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
    relative: String,
}

impl TestCgroup {
    /// Creates a fresh top-level test cgroup (and first removes leftovers of
    /// earlier test processes that no longer run).
    #[expect(
        clippy::new_without_default,
        reason = "creating a cgroup is a side effect, not a default value"
    )]
    pub fn new() -> TestCgroup {
        require_root();
        let root = cgroup2_root();
        SWEEP.call_once(|| sweep_stale(&root));
        let relative = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = root.join(&relative);
        fs::create_dir(&path)
            .unwrap_or_else(|err| panic!("cannot create cgroup {}: {err}", path.display()));
        TestCgroup { path, relative }
    }

    /// Creates the child cgroup `name` (its own guard; the parent's drop also
    /// removes it).
    pub fn child(&self, name: &str) -> TestCgroup {
        let path = self.path.join(name);
        fs::create_dir(&path)
            .unwrap_or_else(|err| panic!("cannot create cgroup {}: {err}", path.display()));
        TestCgroup {
            path,
            relative: format!("{}/{name}", self.relative),
        }
    }

    /// The absolute path of the cgroup directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path relative to the cgroup v2 mount, as policies name cgroups.
    pub fn relative_path(&self) -> &str {
        &self.relative
    }

    /// `cgroup.procs`: writing a pid (or "0" for oneself) moves a process here.
    pub fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// The cgroup id (the inode number of its directory), as the datapath and
    /// events report it.
    pub fn id(&self) -> u64 {
        fs::metadata(&self.path)
            .unwrap_or_else(|err| panic!("stat {}: {err}", self.path.display()))
            .ino()
    }

    /// The processes directly in this cgroup.
    pub fn pids(&self) -> Vec<i32> {
        read_pids(&self.path)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(err) = remove_tree(&self.path) {
            // Never panic in drop (it would abort a panicking test): say it.
            eprintln!("egressd-tests: cleanup of {}: {err}", self.path.display());
        }
    }
}

fn read_pids(cgroup: &Path) -> Vec<i32> {
    fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect()
}

fn child_dirs(cgroup: &Path) -> Vec<PathBuf> {
    fs::read_dir(cgroup)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
                .map(|entry| entry.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Kills every process in `cgroup` and its descendants: `cgroup.kill` when the
/// kernel has it (5.14+), else SIGKILL to each pid in each `cgroup.procs`.
fn kill_all(cgroup: &Path) {
    let kill_file = cgroup.join("cgroup.kill");
    if kill_file.exists() && fs::write(&kill_file, "1").is_ok() {
        return;
    }
    for pid in read_pids(cgroup) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    for child in child_dirs(cgroup) {
        kill_all(&child);
    }
}

/// True when no process is left in `cgroup` or below.
fn is_empty(cgroup: &Path) -> bool {
    match fs::read_to_string(cgroup.join("cgroup.events")) {
        Ok(events) => events.lines().any(|line| line.trim() == "populated 0"),
        Err(_) => read_pids(cgroup).is_empty() && child_dirs(cgroup).iter().all(|c| is_empty(c)),
    }
}

/// Kills what runs in `cgroup` and below, then removes the directories,
/// deepest first. Bounded by [`CLEANUP_TIMEOUT`].
fn remove_tree(cgroup: &Path) -> io::Result<()> {
    if !cgroup.exists() {
        return Ok(());
    }
    let deadline = Instant::now() + CLEANUP_TIMEOUT;
    kill_all(cgroup);
    while !is_empty(cgroup) {
        if Instant::now() >= deadline {
            return Err(io::Error::other(format!(
                "processes {:?} still in it after {CLEANUP_TIMEOUT:?}",
                read_pids(cgroup)
            )));
        }
        thread::sleep(Duration::from_millis(10));
        kill_all(cgroup);
    }
    rmdir_tree(cgroup, deadline)
}

fn rmdir_tree(cgroup: &Path, deadline: Instant) -> io::Result<()> {
    for child in child_dirs(cgroup) {
        rmdir_tree(&child, deadline)?;
    }
    loop {
        match fs::remove_dir(cgroup) {
            Ok(()) => return Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
            // EBUSY while the kernel finishes taking exited tasks out.
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Err(err) => return Err(err),
        }
    }
}

/// Removes `egressd-test-<pid>-*` cgroups of test processes that no longer run
/// (left behind by a run that was killed).
fn sweep_stale(root: &Path) {
    for dir in child_dirs(root) {
        let Some(name) = dir.file_name().and_then(|name| name.to_str()) else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
            && let Err(err) = remove_tree(&dir)
        {
            eprintln!("egressd-tests: stale cgroup {}: {err}", dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_fields_are_unescaped() {
        assert_eq!(
            unescape_mount("/sys/fs/cgroup/my\\040dir"),
            PathBuf::from("/sys/fs/cgroup/my dir")
        );
        assert_eq!(unescape_mount("/a\\b"), PathBuf::from("/a\\b"));
    }
}
