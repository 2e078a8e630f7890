//! `egressctl observed [--workload NAME] [--since 72h] [--internet-only] [--json]`

use std::path::Path;
use std::process::ExitCode;

use egressd_observe::{NameObservation, Observation, format_rfc3339, protocol_name};

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
    /// List the DNS names the workloads asked for instead: how often, the answers, whether
    /// a connection followed, and which look like DNS tunnelling.
    #[arg(long)]
    pub names: bool,
}

pub fn run(socket: &Path, args: &Args) -> anyhow::Result<ExitCode> {
    let source = observations::Source::open(socket, &args.source, args.internet_only)?;
    if args.names {
        let names = source.names()?;
        print_report(&names, args.json, |names| format_names(names))?;
        return Ok(ExitCode::SUCCESS);
    }
    let observations = source.observations()?;
    if args.json {
        print_report(&observations, true, |_| String::new())?;
        return Ok(ExitCode::SUCCESS);
    }
    let names = source.names()?;
    let mut text = format_observed(&observations);
    let unconnected: Vec<NameObservation> =
        names.iter().filter(|n| !n.connected).cloned().collect();
    if !unconnected.is_empty() {
        text.push_str("\nresolved, never connected to (failover or heartbeat endpoints?):\n");
        text.push_str(&format_names(&unconnected));
    }
    let tunnelling = names.iter().filter(|n| n.tunnelling.is_some()).count();
    if tunnelling > 0 {
        text.push_str(&format!(
            "\nwarning: {tunnelling} names look like DNS tunnelling: `egressctl observed --names`\n"
        ));
    }
    print_report(&(), false, |_| text)?;
    Ok(ExitCode::SUCCESS)
}

fn format_names(names: &[NameObservation]) -> String {
    if names.is_empty() {
        return "no DNS questions recorded (or none match the filters)\n".to_owned();
    }
    let rows: Vec<Vec<String>> = names
        .iter()
        .map(|n| {
            vec![
                clean(&n.workload).into_owned(),
                clean(&n.name).into_owned(),
                clean(&n.qtype).into_owned(),
                n.count.to_string(),
                format!("{}/{}", n.answered, n.nxdomain),
                if n.connected { "yes" } else { "no" }.to_owned(),
                format_rfc3339(n.last_seen),
                n.tunnelling
                    .as_deref()
                    .map_or_else(String::new, |why| format!("TUNNELLING? {}", clean(why))),
            ]
        })
        .collect();
    table(
        &[
            "WORKLOAD",
            "NAME",
            "TYPE",
            "ASKED",
            "ANSWERED/NXDOMAIN",
            "CONNECTED",
            "LAST SEEN",
            "FLAGS",
        ],
        &rows,
    )
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
