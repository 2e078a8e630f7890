//! Modes set with `egressctl mode`, persisted under the state directory so they survive
//! restarts, and the precedence that decides each workload's mode.
//!
//! Precedence, most specific first: a command for the workload, the workload's `mode` in the
//! file, a command for every workload, the file's top-level `mode`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use egressd_policy::{Mode, Policy, Workload};
use egressd_proto::ModeSource;
use serde::{Deserialize, Serialize};

const FILE_NAME: &str = "modes.json";
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ModeStoreError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is not a valid mode file ({message}); fix or remove it (removing it returns every \
         workload to the modes in the policy file)"
    )]
    Corrupt { path: PathBuf, message: String },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredModes {
    version: u32,
    #[serde(default)]
    default: Option<Mode>,
    #[serde(default)]
    workloads: BTreeMap<String, Mode>,
}

/// Command overrides, mirrored on disk.
#[derive(Debug)]
pub struct ModeOverrides {
    path: PathBuf,
    stored: StoredModes,
}

impl ModeOverrides {
    pub fn load(state_dir: &Path) -> Result<Self, ModeStoreError> {
        let path = state_dir.join(FILE_NAME);
        let stored = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let stored: StoredModes =
                    serde_json::from_str(&text).map_err(|e| ModeStoreError::Corrupt {
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
                if stored.version != FORMAT_VERSION {
                    return Err(ModeStoreError::Corrupt {
                        path,
                        message: format!("unsupported version {}", stored.version),
                    });
                }
                stored
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StoredModes {
                version: FORMAT_VERSION,
                ..Default::default()
            },
            Err(source) => return Err(ModeStoreError::Read { path, source }),
        };
        Ok(ModeOverrides { path, stored })
    }

    pub fn workload_override(&self, name: &str) -> Option<Mode> {
        self.stored.workloads.get(name).copied()
    }

    /// Sets (Some) or clears (None) an override and persists it; on a write error nothing
    /// changes.
    pub fn set(
        &mut self,
        workload: Option<&str>,
        mode: Option<Mode>,
    ) -> Result<(), ModeStoreError> {
        let mut next = self.stored.clone();
        match (workload, mode) {
            (None, mode) => next.default = mode,
            (Some(name), Some(mode)) => {
                next.workloads.insert(name.to_owned(), mode);
            }
            (Some(name), None) => {
                next.workloads.remove(name);
            }
        }
        write_atomically(&self.path, &next)?;
        self.stored = next;
        Ok(())
    }

    /// The mode of `workload` and where it came from.
    pub fn resolve(&self, policy: &Policy, workload: &Workload) -> (Mode, ModeSource) {
        if let Some(mode) = self.workload_override(&workload.name) {
            (mode, ModeSource::Command)
        } else if let Some(mode) = workload.mode {
            (mode, ModeSource::File)
        } else {
            self.resolve_default(policy)
        }
    }

    pub fn resolve_default(&self, policy: &Policy) -> (Mode, ModeSource) {
        match self.stored.default {
            Some(mode) => (mode, ModeSource::Command),
            None => (policy.mode, ModeSource::File),
        }
    }
}

fn write_atomically(path: &Path, stored: &StoredModes) -> Result<(), ModeStoreError> {
    write_json_atomically(path, stored).map_err(|source| ModeStoreError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Writes `value` as JSON to `path` so that a crash leaves the old file or the new one,
/// never a mix: a synced temporary file renamed over it, then the directory synced.
pub(crate) fn write_json_atomically<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    let temporary = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(&text)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    // The rename is durable only once the directory is synced.
    if let Some(dir) = path.parent()
        && let Ok(dir) = std::fs::File::open(dir)
    {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Policy {
        egressd_policy::parse(text, Path::new("test.toml")).expect("valid policy")
    }

    #[test]
    fn precedence_and_persistence() {
        let dir = tempfile::tempdir().expect("tempdir");
        let policy = policy(
            r#"
mode = "learning"
[[workload]]
name = "a"
cgroup = "a"
mode = "audit"
[[workload]]
name = "b"
cgroup = "b"
"#,
        );
        let a = policy.workload("a").expect("a");
        let b = policy.workload("b").expect("b");
        let mut modes = ModeOverrides::load(dir.path()).expect("empty store");
        assert_eq!(modes.resolve(&policy, a), (Mode::Audit, ModeSource::File));
        assert_eq!(
            modes.resolve(&policy, b),
            (Mode::Learning, ModeSource::File)
        );

        modes.set(None, Some(Mode::Strict)).expect("set default");
        assert_eq!(modes.resolve(&policy, a), (Mode::Audit, ModeSource::File));
        assert_eq!(
            modes.resolve(&policy, b),
            (Mode::Strict, ModeSource::Command)
        );

        modes.set(Some("a"), Some(Mode::Strict)).expect("set a");
        let reloaded = ModeOverrides::load(dir.path()).expect("reload");
        assert_eq!(
            reloaded.resolve(&policy, a),
            (Mode::Strict, ModeSource::Command)
        );

        modes.set(Some("a"), None).expect("clear a");
        assert_eq!(modes.resolve(&policy, a), (Mode::Audit, ModeSource::File));
    }

    #[test]
    fn corrupt_store_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(FILE_NAME), "{not json").expect("write");
        let err = ModeOverrides::load(dir.path()).expect_err("corrupt");
        assert!(err.to_string().contains("modes.json"), "{err}");
    }
}
