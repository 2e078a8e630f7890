//! Finding the workspace binaries and running commands with a deadline.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// A binary of the workspace, next to the running test executable
/// (`target/<profile>/deps/test-hash` → `target/<profile>/NAME`).
///
/// Panics (failing the test) when it is missing.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the path of the running test executable");
    let mut dir = exe
        .parent()
        .expect("the test executable has a directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build them first: cargo build --bins",
        path.display()
    );
    path
}

pub fn egressd_bin() -> PathBuf {
    binary("egressd")
}

pub fn egressctl_bin() -> PathBuf {
    binary("egressctl")
}

/// The probe of this crate (the same file as `CARGO_BIN_EXE_egressd-probe`,
/// which only integration tests can name; `tests/harness.rs` checks that).
pub fn probe_bin() -> PathBuf {
    binary("egressd-probe")
}

/// Runs `command` to completion with stdin closed, capturing its output;
/// kills it and panics when it takes longer than `timeout`.
pub fn run_bounded(command: &mut Command, timeout: Duration) -> Output {
    let description = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start {description}: {err}"));
    let stdout = child.stdout.take().map(reader_thread);
    let stderr = child.stderr.take().map(reader_thread);
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{description} did not finish within {timeout:?}");
            }
            Err(err) => panic!("waiting for {description}: {err}"),
        }
    };
    let join = |handle: Option<thread::JoinHandle<Vec<u8>>>| {
        handle
            .map(|handle| handle.join().expect("output reader thread"))
            .unwrap_or_default()
    };
    Output {
        status,
        stdout: join(stdout),
        stderr: join(stderr),
    }
}

fn reader_thread<R: Read + Send + 'static>(mut pipe: R) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        // A read error only truncates the captured output.
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}
