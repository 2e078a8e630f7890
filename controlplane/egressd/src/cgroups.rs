//! Finding the cgroups that workloads' `cgroup` patterns name.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use egressd_policy::CgroupPattern;

/// Bounds on a pattern's directory walk, so a `**` over a huge hierarchy stays cheap.
const MAX_WALK_DEPTH: usize = 16;
const MAX_WALK_DIRECTORIES: usize = 100_000;

/// A cgroup directory: its id (kernfs inode, what the kernel's cgroup-id helpers return)
/// and its path relative to the cgroup v2 mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    pub id: u64,
    pub path: String,
}

/// Every existing cgroup below `root` that `pattern` matches.
pub fn matching(root: &Path, pattern: &CgroupPattern) -> Vec<Cgroup> {
    let mut found = Vec::new();
    if pattern.is_literal() {
        if let Ok(meta) = std::fs::metadata(root.join(pattern.as_str()))
            && meta.is_dir()
        {
            found.push(Cgroup {
                id: meta.ino(),
                path: pattern.as_str().to_owned(),
            });
        }
        return found;
    }
    let start = pattern.literal_prefix().trim_end_matches('/');
    let mut budget = MAX_WALK_DIRECTORIES;
    walk(root, start, 0, pattern, &mut found, &mut budget);
    found
}

fn walk(
    root: &Path,
    relative: &str,
    depth: usize,
    pattern: &CgroupPattern,
    found: &mut Vec<Cgroup>,
    budget: &mut usize,
) {
    if *budget == 0 || depth > MAX_WALK_DEPTH {
        return;
    }
    *budget -= 1;
    let dir = if relative.is_empty() {
        root.to_owned()
    } else {
        root.join(relative)
    };
    let Ok(meta) = std::fs::metadata(&dir) else {
        return;
    };
    if !relative.is_empty() && pattern.matches(relative) {
        found.push(Cgroup {
            id: meta.ino(),
            path: relative.to_owned(),
        });
    }
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let child = if relative.is_empty() {
            name.to_owned()
        } else {
            format!("{relative}/{name}")
        };
        walk(root, &child, depth + 1, pattern, found, budget);
    }
}

/// The cgroup table for a set of workloads, in declaration order: a cgroup two patterns match
/// belongs to the first workload that names it.
pub fn table(
    root: &Path,
    workloads: &[(u32, &CgroupPattern)],
) -> (BTreeMap<u64, u32>, BTreeMap<u32, Vec<String>>) {
    let mut ids = BTreeMap::new();
    let mut paths: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for &(workload, pattern) in workloads {
        for cgroup in matching(root, pattern) {
            if ids.contains_key(&cgroup.id) {
                continue;
            }
            ids.insert(cgroup.id, workload);
            paths.entry(workload).or_default().push(cgroup.path);
        }
    }
    (ids, paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_and_glob_patterns_find_directories() {
        let dir = tempfile::tempdir().expect("tempdir");
        for path in [
            "system.slice/a.service",
            "system.slice/b.service/x",
            "user.slice",
        ] {
            std::fs::create_dir_all(dir.path().join(path)).expect("mkdir");
        }
        let literal = CgroupPattern::parse("system.slice/a.service").expect("pattern");
        assert_eq!(matching(dir.path(), &literal).len(), 1);
        let glob = CgroupPattern::parse("system.slice/*.service").expect("pattern");
        let mut paths: Vec<String> = matching(dir.path(), &glob)
            .into_iter()
            .map(|c| c.path)
            .collect();
        paths.sort();
        assert_eq!(paths, ["system.slice/a.service", "system.slice/b.service"]);
        let missing = CgroupPattern::parse("nope/x").expect("pattern");
        assert!(matching(dir.path(), &missing).is_empty());

        let (ids, by_workload) = table(dir.path(), &[(1, &literal), (2, &glob)]);
        assert_eq!(ids.len(), 2);
        assert_eq!(by_workload.get(&1).map(Vec::len), Some(1));
        assert_eq!(
            by_workload.get(&2).map(Vec::len),
            Some(1),
            "a.service went to workload 1"
        );
    }
}
