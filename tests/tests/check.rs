//! `egressctl check` on the shipped example and on a broken file. Needs no
//! daemon and no root, only the built `egressctl` (`cargo build --bins`).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use egressd_tests::{egressctl_bin, line_of, run_bounded};

const TIMEOUT: Duration = Duration::from_secs(15);

#[test]
fn check_accepts_the_example_policy() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/policy.example.toml");
    let output = run_bounded(
        Command::new(egressctl_bin()).arg("check").arg(&example),
        TIMEOUT,
    );
    assert!(
        output.status.success(),
        "check {}: {}",
        example.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("ok"), "{stdout}");
}

#[test]
fn check_rejects_a_broken_policy_with_file_line_and_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("broken.toml");
    let text = "mode = \"strict\"\n\n[[workload]]\nname = \"w\"\ncgroup = \"a.slice\"\nmode = \"enforce\"\n";
    std::fs::write(&path, text).expect("write the broken policy");
    let line = line_of(text, "enforce");

    let output = run_bounded(
        Command::new(egressctl_bin()).arg("check").arg(&path),
        TIMEOUT,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    let prefix = format!("{}:{line}:", path.display());
    let rest = stderr
        .split_once(&prefix)
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("no {prefix}COLUMN: in {stderr:?}"));
    let column: String = rest.chars().take_while(char::is_ascii_digit).collect();
    assert!(
        !column.is_empty() && rest[column.len()..].starts_with(':'),
        "no column after {prefix}: {stderr:?}"
    );
}
