//! `egressctl observed [--workload NAME] [--since 72h] [--internet-only] [--json]`

use std::path::Path;
use std::process::ExitCode;

use egressd_observe::{Observation, format_rfc3339, protocol_name};

use crate::cmd::observations::{self, SourceArgs};
use crate::text::{clean, print_report, table};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Hide loopback, RFC 1918, CGNAT, link-local, ULA and multicast destinations.
    #[arg(long)]
    pub internet_only: bool,
    /// Print the observations as JSON (the input of `egressctl suggest --from`).
    #[arg(long)]
    pub json: bool,
}

pub fn run(socket: &Path, args: &Args) -> anyhow::Result<ExitCode> {
    let observations = observations::load(socket, &args.source, args.internet_only)?;
    print_report(&observations, args.json, |observations| {
        format_observed(observations)
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `address:port/protocol`, brackets around IPv6 addresses with a port.
pub fn destination(observation: &Observation) -> String {
    let key = &observation.key;
    let protocol = protocol_name(key.protocol);
    match (key.port, key.address) {
        (Some(port), std::net::IpAddr::V6(v6)) => format!("[{v6}]:{port}/{protocol}"),
        (Some(port), address) => format!("{address}:{port}/{protocol}"),
        (None, address) => format!("{address}/{protocol}"),
    }
}

/// The DNS names of a destination, or `-`.
pub fn names(observation: &Observation) -> String {
    if observation.dns_names.is_empty() {
        "-".to_owned()
    } else {
        clean(&observation.dns_names.join(",")).into_owned()
    }
}

/// Denied, would-deny and plaintext markers.
pub fn flags(observation: &Observation) -> String {
    let mut flags = Vec::new();
    if observation.denied > 0 {
        flags.push(format!("DENIED×{}", observation.denied));
    }
    if observation.would_deny > 0 {
        flags.push(format!("WOULD-DENY×{}", observation.would_deny));
    }
    if observation.plaintext {
        flags.push("PLAINTEXT".to_owned());
    }
    flags.join(" ")
}

/// 1536 → `1.5KiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n}B")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

fn format_observed(observations: &[Observation]) -> String {
    if observations.is_empty() {
        return "nothing observed yet (or nothing matches the filters)\n".to_owned();
    }
    let rows: Vec<Vec<String>> = observations
        .iter()
        .map(|o| {
            let processes: Vec<String> = o
                .processes
                .iter()
                .map(|p| match &p.exe {
                    Some(exe) => format!("{} ({})", clean(&p.comm), clean(exe)),
                    None => clean(&p.comm).into_owned(),
                })
                .collect();
            vec![
                clean(&o.key.workload).into_owned(),
                destination(o),
                names(o),
                o.connections.to_string(),
                format!("{}/{}", bytes(o.bytes_sent), bytes(o.bytes_received)),
                format_rfc3339(o.first_seen),
                format_rfc3339(o.last_seen),
                if processes.is_empty() {
                    "-".to_owned()
                } else {
                    processes.join(", ")
                },
                flags(o),
            ]
        })
        .collect();
    table(
        &[
            "WORKLOAD",
            "DESTINATION",
            "NAMES",
            "CONNS",
            "SENT/RECV",
            "FIRST SEEN",
            "LAST SEEN",
            "PROCESSES",
            "FLAGS",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_read_well() {
        assert_eq!(bytes(0), "0B");
        assert_eq!(bytes(1023), "1023B");
        assert_eq!(bytes(1536), "1.5KiB");
        assert_eq!(bytes(5 * 1024 * 1024), "5.0MiB");
    }
}
