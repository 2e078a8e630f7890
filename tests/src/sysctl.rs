//! Sysctls set for a test and restored afterwards.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// Which groups may open ICMP ping sockets (`SOCK_DGRAM`, `IPPROTO_ICMP`);
/// ICMPv6 ping sockets obey it too.
pub const PING_GROUP_RANGE: &str = "/proc/sys/net/ipv4/ping_group_range";

struct Entry {
    original: String,
    value: String,
    users: usize,
}

/// Sysctls currently held by guards in this process: tests running in parallel
/// share one setting, and the last guard restores the original value.
static HELD: Mutex<Option<HashMap<PathBuf, Entry>>> = Mutex::new(None);

/// Sets a sysctl while alive; the last guard for a path restores the value
/// found before the first.
#[derive(Debug)]
pub struct SysctlGuard {
    path: PathBuf,
}

fn normalize(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl SysctlGuard {
    /// Panics when the sysctl cannot be set, or is already held with another value.
    pub fn set(path: impl AsRef<Path>, value: &str) -> SysctlGuard {
        let path = path.as_ref().to_path_buf();
        let value = normalize(value);
        let mut held = HELD.lock().unwrap_or_else(PoisonError::into_inner);
        let held = held.get_or_insert_with(HashMap::new);
        if let Some(entry) = held.get_mut(&path) {
            assert_eq!(
                entry.value,
                value,
                "{} is already held with another value",
                path.display()
            );
            entry.users += 1;
            return SysctlGuard { path };
        }
        let original = fs::read_to_string(&path)
            .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()));
        fs::write(&path, &value)
            .unwrap_or_else(|err| panic!("cannot set {} to {value:?}: {err}", path.display()));
        let now = fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(
            normalize(&now),
            value,
            "{} did not take {value:?}",
            path.display()
        );
        held.insert(
            path.clone(),
            Entry {
                original: normalize(&original),
                value,
                users: 1,
            },
        );
        SysctlGuard { path }
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        let mut held = HELD.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(map) = held.as_mut() else { return };
        let Some(entry) = map.get_mut(&self.path) else {
            return;
        };
        entry.users -= 1;
        if entry.users == 0 {
            if let Err(err) = fs::write(&self.path, &entry.original) {
                eprintln!(
                    "egressd-tests: cannot restore {} to {:?}: {err}",
                    self.path.display(),
                    entry.original
                );
            }
            map.remove(&self.path);
        }
    }
}

/// Lets root (gid 0) open ping sockets until the guard is dropped.
pub fn allow_ping_sockets() -> SysctlGuard {
    SysctlGuard::set(PING_GROUP_RANGE, "0 2147483647")
}
