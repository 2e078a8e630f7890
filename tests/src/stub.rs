//! The C libraries' own stub resolvers as a workload uses them: `tests/c/resolve.c` built
//! against glibc and against musl, run inside a test cgroup with a resolv.conf of the test's
//! making (bind-mounted in a private mount namespace, so the host's stays untouched).

use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;

use crate::bins::run_bounded;
use crate::cgroup::TestCgroup;

/// Bound on one lookup (the test's resolv.conf sets short resolver timeouts).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on building the client.
const BUILD_TIMEOUT: Duration = Duration::from_secs(120);

/// Which C library's stub resolver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Libc {
    Glibc,
    Musl,
}

impl Libc {
    fn compiler(self) -> &'static str {
        match self {
            Libc::Glibc => "cc",
            Libc::Musl => "musl-gcc",
        }
    }

    fn package(self) -> &'static str {
        match self {
            Libc::Glibc => "gcc and libc6-dev",
            Libc::Musl => "musl-tools",
        }
    }
}

impl fmt::Display for Libc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Libc::Glibc => "glibc",
            Libc::Musl => "musl",
        })
    }
}

/// What one `getaddrinfo` reported.
#[derive(Debug, Clone)]
pub struct Lookup {
    pub libc: Libc,
    pub name: String,
    pub ok: bool,
    /// `EAI_AGAIN`, `EAI_NONAME`, ... when it failed.
    pub error: Option<String>,
    pub addresses: Vec<String>,
    /// How long `getaddrinfo` took, as the client measured it.
    pub elapsed: Duration,
    pub report: Value,
}

impl fmt::Display for Lookup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} getaddrinfo({:?}) -> {}",
            self.libc, self.name, self.report
        )
    }
}

/// The client built against `libc`, once per test process (under the build folder).
pub fn stub_client(libc: Libc) -> PathBuf {
    static GLIBC: OnceLock<PathBuf> = OnceLock::new();
    static MUSL: OnceLock<PathBuf> = OnceLock::new();
    let cell = match libc {
        Libc::Glibc => &GLIBC,
        Libc::Musl => &MUSL,
    };
    cell.get_or_init(|| build_client(libc)).clone()
}

fn build_client(libc: Libc) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("c/resolve.c");
    // Under the build folder, next to the test executables (target/<profile>/deps).
    let exe = std::env::current_exe().expect("the path of the running test executable");
    let out_dir = exe
        .parent()
        .expect("the test executable has a directory")
        .join("stub-clients");
    std::fs::create_dir_all(&out_dir)
        .unwrap_or_else(|err| panic!("creating {}: {err}", out_dir.display()));
    // Per process: parallel test binaries never write the same file.
    let binary = out_dir.join(format!("resolve-{libc}-{}", std::process::id()));
    let on_path = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| dir.join(libc.compiler()).is_file())
    });
    assert!(
        on_path,
        "{} is missing: it builds the {libc} DNS client; install {} \
         (scripts/setup-toolchain.sh does)",
        libc.compiler(),
        libc.package()
    );
    let output = run_bounded(
        Command::new(libc.compiler())
            .args(["-O1", "-Wall", "-Werror", "-static", "-o"])
            .arg(&binary)
            .arg(&source),
        BUILD_TIMEOUT,
    );
    assert!(
        output.status.success(),
        "building the {libc} DNS client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    binary
}

/// Resolves `name` with `libc`'s stub resolver from inside `cgroup`, seeing `resolv_conf` as
/// /etc/resolv.conf and "hosts: files dns" as its name service switch.
pub fn resolve_in(cgroup: &TestCgroup, libc: Libc, resolv_conf: &str, name: &str) -> Lookup {
    let client = stub_client(libc);
    let dir = tempfile::Builder::new()
        .prefix("egressd-test-stub-")
        .tempdir()
        .expect("create a temporary directory for resolv.conf");
    let resolv_path = dir.path().join("resolv.conf");
    let nsswitch_path = dir.path().join("nsswitch.conf");
    std::fs::write(&resolv_path, resolv_conf).expect("write the test's resolv.conf");
    // Only files and DNS: no systemd-resolved or mDNS module answering instead.
    std::fs::write(&nsswitch_path, "hosts: files dns\n").expect("write nsswitch.conf");

    let cstring = |path: &Path| CString::new(path.as_os_str().as_bytes()).expect("no NUL byte");
    let procs = cstring(&cgroup.procs_file());
    let mounts = [
        (
            cstring(&resolv_path),
            cstring(Path::new("/etc/resolv.conf")),
        ),
        (
            cstring(&nsswitch_path),
            cstring(Path::new("/etc/nsswitch.conf")),
        ),
    ];
    let root = cstring(Path::new("/"));
    let mut command = Command::new(&client);
    command.arg(name);
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe system
    // calls (open, write, close, unshare, mount) on memory prepared before the fork.
    unsafe {
        command.pre_exec(move || {
            crate::probe::enter_cgroup(&procs)?;
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(io::Error::last_os_error());
            }
            // Mounts made here must not propagate back to the host.
            let private = libc::MS_REC | libc::MS_PRIVATE;
            if libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                private,
                std::ptr::null(),
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            for (source, target) in &mounts {
                if libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let output = run_bounded(&mut command, LOOKUP_TIMEOUT);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|err| {
        panic!(
            "{libc} client resolving {name:?} printed no JSON ({err}): stdout {stdout:?}, \
             stderr {:?}, {}",
            String::from_utf8_lossy(&output.stderr),
            output.status
        )
    });
    Lookup {
        libc,
        name: name.to_owned(),
        ok: report["ok"] == true,
        error: report["error"].as_str().map(str::to_owned),
        addresses: report["addresses"]
            .as_array()
            .map(|list| {
                list.iter()
                    .filter_map(|addr| addr.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
        elapsed: Duration::from_millis(report["elapsed_ms"].as_u64().unwrap_or_default()),
        report,
    }
}
