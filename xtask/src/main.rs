//! Release tasks: `cargo xtask dist` (the alias lives in `.cargo/config.toml`).
//!
//! `dist` builds the release binaries once, renders the man pages and shell
//! completions from the clap definitions (so they cannot drift from the real
//! command lines), then hands everything to cargo-deb and cargo-generate-rpm,
//! whose asset lists are in `controlplane/egressd/Cargo.toml`. The packages land
//! in `target/dist/`. `scripts/setup-packaging.sh` installs the two tools.
#![forbid(unsafe_code)]

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail, ensure};
use clap::{Parser, Subcommand};
use clap_complete::Shell;
use flate2::Compression;
use flate2::GzBuilder;

/// The package whose `[package.metadata.deb]` and `[package.metadata.generate-rpm]`
/// describe the packages.
const PACKAGE: &str = "egressd";
const PACKAGE_DIR: &str = "controlplane/egressd";
/// The binaries the packages ship, from packages of the same names.
const BINARIES: [&str; 2] = ["egressd", "egressctl"];
/// Debian and rpm names of the one architecture built here.
const DEB_ARCH: &str = "amd64";
const RPM_ARCH: &str = "x86_64";
/// Where the generated assets go, below the release directory: cargo-deb and
/// cargo-generate-rpm map `target/release/` to the real target directory.
const ASSETS_DIR: &str = "packaging";

#[derive(Debug, Parser)]
#[command(name = "xtask", about = "Release tasks for egressd")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Build target/dist/egressd_<version>_amd64.deb and egressd-<version>-1.x86_64.rpm.
    Dist {
        /// Package the release binaries already built instead of running cargo build.
        #[arg(long)]
        no_build: bool,
    },
    /// Only render the man pages and completions into target/release/packaging.
    Assets,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let workspace = Workspace::locate()?;
    match cli.task {
        Task::Dist { no_build } => dist(&workspace, no_build),
        Task::Assets => {
            let dir = assets(&workspace)?;
            println!("{}", dir.display());
            Ok(())
        }
    }
}

/// Paths and the version, from `cargo metadata`.
struct Workspace {
    root: PathBuf,
    target: PathBuf,
    version: String,
}

impl Workspace {
    fn locate() -> anyhow::Result<Workspace> {
        let output = Command::new(cargo())
            .args([
                "metadata",
                "--format-version",
                "1",
                "--no-deps",
                "--offline",
            ])
            .output()
            .context("running cargo metadata")?;
        ensure!(
            output.status.success(),
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let metadata: serde_json::Value =
            serde_json::from_slice(&output.stdout).context("parsing cargo metadata")?;
        let field = |name: &str| -> anyhow::Result<PathBuf> {
            metadata[name]
                .as_str()
                .map(PathBuf::from)
                .with_context(|| format!("cargo metadata has no {name}"))
        };
        let version = metadata["packages"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|package| package["name"] == PACKAGE)
            .and_then(|package| package["version"].as_str())
            .with_context(|| format!("package {PACKAGE} is not in the workspace"))?
            .to_owned();
        Ok(Workspace {
            root: field("workspace_root")?,
            target: field("target_directory")?,
            version,
        })
    }

    fn release(&self) -> PathBuf {
        self.target.join("release")
    }

    fn dist(&self) -> PathBuf {
        self.target.join("dist")
    }

    /// Runs `cargo ARGS` in the workspace root.
    fn cargo<I, S>(&self, args: I) -> anyhow::Result<()>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Command::new(cargo());
        command.args(args).current_dir(&self.root);
        run(&mut command)
    }
}

fn dist(ws: &Workspace, no_build: bool) -> anyhow::Result<()> {
    if no_build {
        for bin in BINARIES {
            let path = ws.release().join(bin);
            ensure!(
                path.is_file(),
                "{} is missing: run without --no-build",
                path.display()
            );
        }
    } else {
        ws.cargo([
            "build",
            "--release",
            "--locked",
            "-p",
            "egressd",
            "-p",
            "egressctl",
        ])?;
    }
    assets(ws)?;
    require_tool("deb", "cargo-deb")?;
    require_tool("generate-rpm", "cargo-generate-rpm")?;

    let dist = ws.dist();
    fs::create_dir_all(&dist).with_context(|| format!("creating {}", dist.display()))?;
    let deb = dist.join(format!("egressd_{}_{DEB_ARCH}.deb", ws.version));
    let rpm = dist.join(format!("egressd-{}-1.{RPM_ARCH}.rpm", ws.version));
    for stale in [&deb, &rpm] {
        remove_if_present(stale)?;
    }

    // cargo-deb marks every asset under /etc as a conffile.
    ws.cargo([
        OsStr::new("deb"),
        OsStr::new("--locked"),
        OsStr::new("--no-build"),
        OsStr::new("-p"),
        OsStr::new(PACKAGE),
        OsStr::new("--output"),
        deb.as_os_str(),
    ])?;
    ws.cargo([
        OsStr::new("generate-rpm"),
        // cargo-generate-rpm takes the package's directory, not its name.
        OsStr::new("-p"),
        OsStr::new(PACKAGE_DIR),
        OsStr::new("--arch"),
        OsStr::new(RPM_ARCH),
        OsStr::new("--output"),
        rpm.as_os_str(),
    ])?;
    for package in [&deb, &rpm] {
        ensure!(package.is_file(), "{} was not produced", package.display());
        println!("{}", package.display());
    }
    Ok(())
}

/// Renders man pages (gzipped) and completions into `target/release/packaging`
/// and returns that directory.
fn assets(ws: &Workspace) -> anyhow::Result<PathBuf> {
    let dir = ws.release().join(ASSETS_DIR);
    let bin = dir.join("bin");
    let man = dir.join("man");
    let completions = dir.join("completions");
    for sub in [&bin, &man, &completions] {
        fs::create_dir_all(sub).with_context(|| format!("creating {}", sub.display()))?;
    }

    // Both packages ship the same stripped copies; target/release keeps its symbols.
    for name in BINARIES {
        let built = ws.release().join(name);
        if built.is_file() {
            run(Command::new("strip")
                .arg("--strip-unneeded")
                .arg("-o")
                .arg(bin.join(name))
                .arg(&built))?;
        }
    }

    write_gzipped(
        &man.join("egressd.8.gz"),
        &man_page(egressd::cli::command(), "8", EGRESSD_EXTRA)?,
    )?;
    write_gzipped(
        &man.join("egressctl.8.gz"),
        &man_page(egressctl::command(), "8", EGRESSCTL_EXTRA)?,
    )?;
    let policy_page = ws.root.join("packaging/man/egressd-policy.5");
    let policy =
        fs::read(&policy_page).with_context(|| format!("reading {}", policy_page.display()))?;
    write_gzipped(&man.join("egressd-policy.5.gz"), &policy)?;

    for (shell, file) in [
        (Shell::Bash, "egressctl"),
        (Shell::Zsh, "_egressctl"),
        (Shell::Fish, "egressctl.fish"),
    ] {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut egressctl::command(), "egressctl", &mut script);
        let path = completions.join(file);
        fs::write(&path, script).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(dir)
}

/// Sections of egressd(8) that clap does not know about (roff).
const EGRESSD_EXTRA: &str = r#".SH SIGNALS
.TP
.B SIGHUP
Re\-read the policy file (\fBsystemctl reload egressd\fR sends it). A bad file is
logged, shown by \fBegressctl status\fR, and changes nothing that is running.
.TP
.BR SIGTERM ", " SIGINT
Stop. The pinned programs keep enforcing the last policy until the next egressd adopts
them, unless the policy says \fB[daemon] on_stop = "detach"\fR.
.SH ENVIRONMENT
.TP
.B EGRESSD_LOG
Log filter, e.g. \fBdebug\fR or \fBegressd=debug\fR. Logs and events are JSON lines
on standard output (journald keeps them); on a terminal they are human\-readable.
.SH FILES
.TP
.I /etc/egressd/policy.toml
The policy, see \fBegressd\-policy\fR(5).
.TP
.I /var/lib/egressd/modes.json
Modes set with \fBegressctl mode\fR, kept across restarts.
.TP
.I /run/egressd/egressd.sock
The control socket: mode 0600, root only; 0660 for the \fB\-\-socket\-group\fR, whose
members may do everything; an ACL entry for the policy's \fB[control] read_group\fR,
whose members may use status, events and dns only. 64 clients at once (16 slots kept for
root and the socket group); when all are held, the client idle longest makes room, else the
newcomer is refused with a message saying so. Requests are at most 64 KiB.
.TP
.I /usr/lib/systemd/system/egressd.service
The unit: \fBType=notify\fR (ready once the programs are attached and the policy is
in force), capabilities CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON only.
"#;

/// Sections of egressctl(8) that clap does not know about (roff).
const EGRESSCTL_EXTRA: &str = r#".SH "EXIT STATUS"
0 on success; 1 on failure (an error from the daemon, an invalid policy, no daemon);
2 on a usage error.
.SH FILES
.TP
.I /run/egressd/egressd.sock
The daemon's control socket. Root and members of the daemon's \fB\-\-socket\-group\fR may
use every command; members of the policy's \fB[control] read_group\fR only \fBstatus\fR,
\fBevents\fR and \fBdns\fR (other commands are refused with a message saying so).
.TP
.I /etc/egressd/policy.toml
The policy that \fBegressctl check\fR reads by default, see \fBegressd\-policy\fR(5).
"#;

/// The roff of `command`'s man page in `section`, with every subcommand
/// folded into the one page (egressctl's are short), then `extra`.
fn man_page(command: clap::Command, section: &str, extra: &str) -> anyhow::Result<Vec<u8>> {
    let command = command.disable_help_subcommand(true);
    let name = command.get_name().to_owned();
    let mut page = Vec::new();
    let man = clap_mangen::Man::new(command.clone())
        .section(section)
        .manual("System Manager's Manual")
        .source(format!("egressd {}", env!("CARGO_PKG_VERSION")));
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    if command.has_subcommands() {
        // clap_mangen would point at one page per subcommand; they are all here.
        writeln!(page, ".SH COMMANDS")?;
        for sub in command.get_subcommands() {
            let about = sub.get_about().map(ToString::to_string).unwrap_or_default();
            writeln!(
                page,
                ".TP\n\\fB{name} {}\\fR\n{}",
                sub.get_name(),
                roff_text(&about)
            )?;
        }
        for sub in command.get_subcommands() {
            let sub_name = format!("{name} {}", sub.get_name());
            let sub_man = clap_mangen::Man::new(sub.clone().bin_name(sub_name.clone()));
            // One .SH per subcommand with its synopsis and options.
            writeln!(page, ".SH \"{}\"", sub_name.to_uppercase())?;
            let mut body = Vec::new();
            sub_man.render_synopsis_section(&mut body)?;
            sub_man.render_description_section(&mut body)?;
            sub_man.render_options_section(&mut body)?;
            page.extend(demote_headings(&body));
        }
    }
    page.extend_from_slice(extra.as_bytes());
    man.render_version_section(&mut page)?;
    write!(
        page,
        ".SH \"SEE ALSO\"\n\\fBegressd\\fR(8), \\fBegressctl\\fR(8), \\fBegressd-policy\\fR(5)\n"
    )?;
    Ok(page)
}

/// Escapes text for a roff body line.
fn roff_text(text: &str) -> String {
    let escaped = text.replace('\\', "\\e").replace('-', "\\-");
    if escaped.starts_with(['.', '\'']) {
        format!("\\&{escaped}")
    } else {
        escaped
    }
}

/// Turns `.SH` headings into `.SS` so a subcommand's sections nest under its own.
fn demote_headings(roff: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(roff);
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        match line.strip_prefix(".SH ") {
            Some(rest) => {
                out.push_str(".SS ");
                out.push_str(rest);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out.into_bytes()
}

/// gzip without a name or a timestamp, so the packages are reproducible.
fn write_gzipped(path: &Path, content: &[u8]) -> anyhow::Result<()> {
    let file = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut encoder = GzBuilder::new().mtime(0).write(file, Compression::best());
    encoder
        .write_all(content)
        .and_then(|()| encoder.finish().map(drop))
        .with_context(|| format!("writing {}", path.display()))
}

fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// Fails with the install hint when `cargo SUBCOMMAND` is not installed.
fn require_tool(subcommand: &str, crate_name: &str) -> anyhow::Result<()> {
    let found = Command::new(cargo())
        .args([subcommand, "--version"])
        .output()
        .is_ok_and(|output| output.status.success());
    if !found {
        bail!(
            "{crate_name} is not installed: run `sudo scripts/setup-packaging.sh` \
             (or `cargo install --locked {crate_name}`)"
        );
    }
    Ok(())
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    ensure!(status.success(), "{command:?} failed: {status}");
    Ok(())
}

/// The cargo that runs us (`cargo xtask` sets CARGO), else the one on PATH.
fn cargo() -> PathBuf {
    std::env::var_os("CARGO").map_or_else(|| PathBuf::from("cargo"), PathBuf::from)
}
