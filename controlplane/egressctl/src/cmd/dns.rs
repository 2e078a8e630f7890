//! `egressctl dns [--workload NAME] [--json]`

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::bail;
use egressd_proto::{DnsReport, Request, Response};

use crate::client::{Client, TIMEOUT, unexpected};
use crate::text::{clean, print_report, table};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only this workload's names.
    #[arg(long, value_name = "NAME")]
    pub workload: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(socket: &Path, args: &Args) -> anyhow::Result<ExitCode> {
    let request = Request::Dns {
        workload: args.workload.clone(),
    };
    let mut client = Client::connect(socket, Some(TIMEOUT))?;
    client.send(&request)?;
    // A large report comes in parts, then the rest with the stats.
    let mut earlier = Vec::new();
    let report = loop {
        match client.receive()? {
            Some(Response::DnsNames { mut names }) => earlier.append(&mut names),
            Some(Response::Dns(last)) => break last.after_parts(earlier),
            Some(other) => return Err(unexpected(other)),
            None => bail!("egressd closed the connection before the end of its answer"),
        }
    };
    print_report(&report, args.json, format_dns)?;
    Ok(ExitCode::SUCCESS)
}

/// The human form: one row per name, its addresses with the seconds each stays allowed.
pub fn format_dns(report: &DnsReport) -> String {
    let rows: Vec<Vec<String>> = report
        .names
        .iter()
        .map(|name| {
            let addresses: Vec<String> = name
                .addresses
                .iter()
                .map(|a| format!("{} ({}s)", a.address, a.expires_in_secs))
                .collect();
            vec![
                clean(&name.workload).into_owned(),
                clean(&name.name).into_owned(),
                clean(&name.pattern).into_owned(),
                name.hits.to_string(),
                if addresses.is_empty() {
                    "-".to_owned()
                } else {
                    addresses.join(", ")
                },
            ]
        })
        .collect();
    let mut out = if rows.is_empty() {
        "no names resolved through fqdn rules yet\n".to_owned()
    } else {
        table(
            &["WORKLOAD", "NAME", "RULE", "HITS", "ADDRESSES (EXPIRES IN)"],
            &rows,
        )
    };
    let stats = &report.stats;
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "\nanswers seen {}, for allowed names {}, ignored by the kernel {}; addresses allowed by the kernel {}; names evicted {}, addresses dropped {}",
        stats.answers_seen,
        stats.answers_allowed,
        stats.answers_rejected,
        stats.kernel_inserts,
        stats.evicted_names,
        stats.dropped_addresses
    );
    out
}

#[cfg(test)]
mod tests {
    use egressd_proto::{DnsAddress, DnsName, DnsStats};

    use super::*;

    #[test]
    fn lists_names_with_addresses_and_ttl() {
        let report = DnsReport {
            names: vec![DnsName {
                workload: "agent".into(),
                name: "api.vendor.com".into(),
                pattern: "api.vendor.com".into(),
                hits: 3,
                addresses: vec![DnsAddress {
                    address: "127.0.0.7".into(),
                    expires_in_secs: 42,
                }],
            }],
            stats: DnsStats::default(),
        };
        let text = format_dns(&report);
        assert!(text.contains("api.vendor.com"), "{text}");
        assert!(text.contains("127.0.0.7 (42s)"), "{text}");
        assert!(text.contains("WORKLOAD"), "{text}");
    }
}
