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

/// The cgroups that a set of workloads' patterns match.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Table {
    /// What the kernel needs: cgroup id → workload. A matched cgroup whose nearest matched
    /// ancestor belongs to the same workload is left out: the kernel finds the ancestor
    /// anyway, and a workload that creates cgroups below its own (systemd delegation,
    /// containers) cannot fill the table with them.
    pub kernel: BTreeMap<u64, u32>,
    /// Every matched path per workload (for `egressctl status` and the recorder).
    pub paths: BTreeMap<u32, Vec<String>>,
    /// The path of each cgroup id in `kernel`.
    pub path_of: BTreeMap<u64, String>,
}

/// The cgroup table for a set of workloads, in declaration order: a cgroup two patterns match
/// belongs to the first workload that names it.
pub fn table(root: &Path, workloads: &[(u32, &CgroupPattern)]) -> Table {
    let mut found: BTreeMap<u64, (u32, String)> = BTreeMap::new();
    let mut paths: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for &(workload, pattern) in workloads {
        for cgroup in matching(root, pattern) {
            if found.contains_key(&cgroup.id) {
                continue;
            }
            paths.entry(workload).or_default().push(cgroup.path.clone());
            found.insert(cgroup.id, (workload, cgroup.path));
        }
    }
    let by_path: std::collections::HashMap<&str, u32> = found
        .values()
        .map(|(workload, path)| (path.as_str(), *workload))
        .collect();
    let nearest_ancestor = |path: &str| {
        let mut rest = path;
        while let Some((parent, _)) = rest.rsplit_once('/') {
            if let Some(&workload) = by_path.get(parent) {
                return Some(workload);
            }
            rest = parent;
        }
        None
    };
    let mut table = Table {
        paths,
        ..Table::default()
    };
    for (&id, (workload, path)) in &found {
        if nearest_ancestor(path) == Some(*workload) {
            continue;
        }
        table.kernel.insert(id, *workload);
        table.path_of.insert(id, path.clone());
    }
    table
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

        let found = table(dir.path(), &[(1, &literal), (2, &glob)]);
        assert_eq!(found.kernel.len(), 2);
        assert_eq!(found.paths.get(&1).map(Vec::len), Some(1));
        assert_eq!(
            found.paths.get(&2).map(Vec::len),
            Some(1),
            "a.service went to workload 1"
        );
    }

    #[test]
    fn cgroups_below_a_cgroup_of_the_same_workload_need_no_entry() {
        let dir = tempfile::tempdir().expect("tempdir");
        for path in [
            "pods/a/x/y",
            "pods/b",
            "pods/c/inner",
            "pods/c/inner/deeper",
        ] {
            std::fs::create_dir_all(dir.path().join(path)).expect("mkdir");
        }
        let everything = CgroupPattern::parse("pods/**").expect("pattern");
        let inner = CgroupPattern::parse("pods/c/inner").expect("pattern");
        // `inner` (workload 1) sits between pods/c and pods/c/inner/deeper (workload 2).
        let found = table(dir.path(), &[(1, &inner), (2, &everything)]);
        let kernel: Vec<&str> = {
            let mut paths: Vec<&str> = found.path_of.values().map(String::as_str).collect();
            paths.sort_unstable();
            paths
        };
        // `pods/**` matches `pods` itself: everything below is found through it, except
        // what lies below another workload's cgroup.
        assert_eq!(kernel, ["pods", "pods/c/inner", "pods/c/inner/deeper"]);
        for redundant in ["pods/a", "pods/a/x/y", "pods/b", "pods/c"] {
            assert!(
                found.paths[&2].iter().any(|path| path == redundant),
                "{redundant} is still listed as matched"
            );
        }
        assert_eq!(found.kernel.len(), found.path_of.len());
        assert_eq!(found.kernel.values().filter(|&&w| w == 1).count(), 1);
    }
}
