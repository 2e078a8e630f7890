//! Pinned state under a bpffs folder, so that enforcement outlives the daemon:
//!
//! ```text
//! <pin dir>/v<LAYOUT_VERSION>/maps/<MAP>        every stateful map, reused by the next daemon
//! <pin dir>/v<LAYOUT_VERSION>/links/<PROGRAM>-<id>  one bpf_link per attached program
//! ```
//!
//! A daemon attaches its own links first and only then retires the links it found (of its
//! own layout or an older one), after its policy is in the maps: while both are attached the
//! kernel runs both (a connect passes only if every program allows it), so there is no
//! moment in which a governed workload is unprotected. Maps of another layout version are
//! never opened by this version: their folder is removed with its links.

use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, PinnedLink};

use crate::DatapathError;

/// `statfs` magic of a bpf file system.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs lives when the distribution mounts it.
const BPF_FS_ROOT: &str = "/sys/fs/bpf";

/// Maps whose contents are state: pinned and reused by the next daemon.
pub(crate) const PINNED_MAPS: [&str; 15] = [
    "WORKLOAD_CGROUPS",
    "WORKLOADS",
    "SETTINGS",
    "ALLOW",
    "DENY",
    "EVENTS",
    "DNS_ANSWERS",
    "DECISION_COUNTERS",
    "COUNTERS",
    "SOCKET_STATE",
    "FQDN",
    "FQDN_ADDRESSES",
    "RESOLVERS",
    "DNS_QUERIES",
    "FLOWS",
];

/// Per-CPU scratch space and the program log: nothing in them survives a program run.
/// The program array is each daemon's own: its egress program tail-calls its dns_query.
pub(crate) const UNPINNED_MAPS: [&str; 5] = [
    "SCRATCH",
    "FLOW_SCRATCH",
    "ANSWER_SCRATCH",
    "AYA_LOGS",
    "DNS_QUERY_PROGRAM",
];

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("pin folder {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "pin folder {path} is not on a bpf file system (mount one: \
         `mount -t bpf bpf /sys/fs/bpf`, or pass --pin-dir under it)"
    )]
    NotBpfFs { path: PathBuf },
    #[error("mounting a bpf file system on {BPF_FS_ROOT}: {source}")]
    Mount {
        #[source]
        source: std::io::Error,
    },
}

impl From<PinError> for DatapathError {
    fn from(error: PinError) -> Self {
        DatapathError::Pins(Box::new(error))
    }
}

fn io(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> PinError {
    let path = path.to_owned();
    move |source| PinError::Io { path, what, source }
}

/// The pin folder of one daemon, for one layout version.
#[derive(Debug, Clone)]
pub(crate) struct PinDir {
    root: PathBuf,
    layout: u32,
}

impl PinDir {
    /// Prepares `root` (mounting bpffs on /sys/fs/bpf if `root` is below it and nothing is
    /// mounted there) and the folders of `layout`.
    pub(crate) fn prepare(root: &Path, layout: u32) -> Result<PinDir, PinError> {
        if !is_bpf_fs(root) {
            let below_default = root.starts_with(BPF_FS_ROOT);
            if below_default && !is_bpf_fs(Path::new(BPF_FS_ROOT)) {
                mount_bpf_fs()?;
            }
        }
        std::fs::create_dir_all(root).map_err(io(root, "creating it"))?;
        if !is_bpf_fs(root) {
            return Err(PinError::NotBpfFs {
                path: root.to_owned(),
            });
        }
        let dir = PinDir {
            root: root.to_owned(),
            layout,
        };
        for folder in [dir.maps(), dir.links()] {
            std::fs::create_dir_all(&folder).map_err(io(&folder, "creating it"))?;
        }
        Ok(dir)
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    fn version_dir(&self, layout: u32) -> PathBuf {
        self.root.join(format!("v{layout}"))
    }

    pub(crate) fn maps(&self) -> PathBuf {
        self.version_dir(self.layout).join("maps")
    }

    fn links(&self) -> PathBuf {
        self.version_dir(self.layout).join("links")
    }

    pub(crate) fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    /// Whether a previous daemon of this layout left its maps (then they hold its policy).
    pub(crate) fn has_maps(&self) -> bool {
        self.map("SETTINGS").exists()
    }

    /// The pins of map `name` in the folders of other layout versions (an older or newer
    /// egressd's), for the few maps whose contents can be carried over when their key and
    /// value sizes still match.
    pub(crate) fn other_layout_maps(&self, name: &str) -> Vec<PathBuf> {
        let current = self.version_dir(self.layout);
        self.version_dirs()
            .unwrap_or_default()
            .into_iter()
            .filter(|version| *version != current)
            .map(|version| version.join("maps").join(name))
            .filter(|path| path.exists())
            .collect()
    }

    /// Every link pin left by earlier daemons, of any layout version, opened so that they
    /// stay attached until [`PinDir::retire`].
    pub(crate) fn previous_links(&self) -> Result<Vec<PinnedLink>, PinError> {
        let mut links = Vec::new();
        for version in self.version_dirs()? {
            let folder = version.join("links");
            let Ok(entries) = std::fs::read_dir(&folder) else {
                continue;
            };
            for entry in entries {
                let entry = entry.map_err(io(&folder, "listing it"))?;
                match PinnedLink::from_pin(entry.path()) {
                    Ok(link) => links.push(link),
                    // Not a link (a stray file): removed with the rest at retirement.
                    Err(e) => log::warn!("ignoring {}: {e}", entry.path().display()),
                }
            }
        }
        Ok(links)
    }

    /// Pins a link this daemon attached, under a name no earlier daemon used.
    pub(crate) fn pin_link(&self, program: &str, link: FdLink) -> Result<PinnedLink, PinError> {
        let unique = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos());
        // bpffs refuses names with dots.
        let path = self
            .links()
            .join(format!("{program}-{}-{unique}", std::process::id()));
        link.pin(&path).map_err(|e| PinError::Io {
            path,
            what: "pinning a link",
            source: std::io::Error::other(e),
        })
    }

    /// Detaches the links of earlier daemons (now that this one's are attached and its policy
    /// is in the maps) and removes the folders of other layout versions.
    pub(crate) fn retire(&self, previous: Vec<PinnedLink>) -> Result<usize, PinError> {
        let count = previous.len();
        for link in previous {
            // Unpinning drops the last reference: the kernel detaches the program.
            if let Err(e) = link.unpin() {
                log::warn!("removing a previous daemon's link: {e}");
            }
        }
        for version in self.version_dirs()? {
            if version != self.version_dir(self.layout) {
                std::fs::remove_dir_all(&version).map_err(io(&version, "removing it"))?;
            }
        }
        Ok(count)
    }

    fn version_dirs(&self) -> Result<Vec<PathBuf>, PinError> {
        let entries = std::fs::read_dir(&self.root).map_err(io(&self.root, "listing it"))?;
        let mut dirs = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io(&self.root, "listing it"))?;
            let name = entry.file_name();
            let is_version = name
                .to_str()
                .and_then(|name| name.strip_prefix('v'))
                .is_some_and(|n| n.parse::<u32>().is_ok());
            if is_version {
                dirs.push(entry.path());
            }
        }
        Ok(dirs)
    }
}

/// Removes every pin under `root`: programs detach once no process holds them, and the maps
/// go with them. Returns whether there was anything to remove.
pub fn uninstall(root: &Path) -> Result<bool, DatapathError> {
    if !root.exists() {
        return Ok(false);
    }
    std::fs::remove_dir_all(root).map_err(io(root, "removing it"))?;
    Ok(true)
}

fn is_bpf_fs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|stat| stat.filesystem_type().0 == BPF_FS_MAGIC)
}

fn mount_bpf_fs() -> Result<(), PinError> {
    std::fs::create_dir_all(BPF_FS_ROOT).map_err(|source| PinError::Mount { source })?;
    nix::mount::mount(
        Some("bpf"),
        BPF_FS_ROOT,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|errno| PinError::Mount {
        source: std::io::Error::from(errno),
    })
}

#[cfg(test)]
mod tests {
    use std::mem::size_of;

    use egressd_common::{
        LAYOUT_VERSION, dns, event, flow, policy,
        socket::{DestinationKey, SocketState},
    };

    /// Pinned maps are reused by the next daemon without any check of their layout but
    /// this version number. If this test fails, a map's key, value or size changed: bump
    /// `LAYOUT_VERSION` in egressd-common (a daemon of the new layout then builds new maps
    /// and retires the old pin set instead of misreading it), then update the table.
    #[test]
    fn the_layout_version_moves_with_the_pinned_layouts() {
        let layout = [
            size_of::<policy::AllowKey>(),
            size_of::<policy::AllowValue>(),
            size_of::<policy::DenyKey>(),
            size_of::<policy::WorkloadConfig>(),
            size_of::<policy::Settings>(),
            size_of::<SocketState>(),
            size_of::<DestinationKey>(),
            size_of::<flow::FlowStats>(),
            size_of::<dns::FqdnKey>(),
            size_of::<dns::FqdnValue>(),
            size_of::<dns::PendingQueries>(),
            policy::MAX_ALLOW_ENTRIES as usize,
            policy::MAX_DENY_ENTRIES as usize,
            policy::MAX_WORKLOADS as usize,
            policy::MAX_WORKLOAD_CGROUPS as usize,
            flow::MAX_FLOWS as usize,
            dns::MAX_FQDN_ENTRIES as usize,
            dns::MAX_FQDN_ADDRESSES as usize,
            event::COUNTERS_LEN as usize,
            event::RING_BUFFER_BYTES as usize,
            event::DNS_RING_BUFFER_BYTES as usize,
            // Records of the pinned ring buffers, which a new daemon reads on adoption.
            size_of::<event::Event>(),
            size_of::<event::DnsAnswer>(),
            event::DNS_ANSWER_HEADER_LEN,
        ];
        assert_eq!(
            (LAYOUT_VERSION, layout),
            (
                6,
                [
                    20, 104, 16, 8, 16, 72, 24, 120, 16, 208, 264, 262144, 4096, 4096, 65536,
                    65536, 65536, 131072, 16, 2097152, 1048576, 104, 2144, 96
                ]
            ),
            "bump LAYOUT_VERSION, then record the new layout here"
        );
    }

    #[test]
    fn every_map_is_classified_once() {
        for name in super::PINNED_MAPS {
            assert!(!super::UNPINNED_MAPS.contains(&name), "{name}");
        }
    }
}
