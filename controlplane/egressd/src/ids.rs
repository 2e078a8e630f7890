//! Workload ids kept across restarts (`<state dir>/workload-ids.json`): the kernel's maps are
//! keyed by id, so a daemon that adopts pinned maps must give every workload the id it had.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const FILE_NAME: &str = "workload-ids.json";
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Default, Serialize, Deserialize)]
struct StoredIds {
    version: u32,
    ids: BTreeMap<String, u32>,
}

/// Where the ids are kept.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// The ids of the last run; empty (with a warning) when the file is missing or unreadable:
/// ids are then assigned afresh and the policy rewritten under them.
pub fn load(path: &Path) -> BTreeMap<String, u32> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return BTreeMap::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), "reading workload ids: {e}; assigning afresh");
            return BTreeMap::new();
        }
    };
    match serde_json::from_str::<StoredIds>(&text) {
        Ok(stored) if stored.version == FORMAT_VERSION => stored.ids,
        Ok(stored) => {
            tracing::warn!(path = %path.display(), version = stored.version, "unknown workload id file version; assigning afresh");
            BTreeMap::new()
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), "workload id file is not valid ({e}); assigning afresh");
            BTreeMap::new()
        }
    }
}

pub fn save(path: &Path, ids: &BTreeMap<String, u32>) -> std::io::Result<()> {
    crate::modes::write_json_atomically(
        path,
        &StoredIds {
            version: FORMAT_VERSION,
            ids: ids.clone(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_bad_files_start_afresh() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = path(dir.path());
        assert!(load(&file).is_empty());
        let ids = BTreeMap::from([("agent".to_owned(), 3), ("host".to_owned(), 1)]);
        save(&file, &ids).expect("save");
        assert_eq!(load(&file), ids);
        std::fs::write(&file, "{broken").expect("write");
        assert!(load(&file).is_empty());
    }
}
