//! `egressctl status [--json]`

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use egressd_proto::{LimitsStatus, ModeSource, ObserveStatus, Request, Response, StatusReport};

use crate::client::{Client, TIMEOUT, unexpected};
use crate::text::{clean, print_report, table};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the daemon's status report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(socket: &Path, args: &Args) -> anyhow::Result<ExitCode> {
    let report = match Client::connect(socket, Some(TIMEOUT))?.call(&Request::Status)? {
        Response::Status(report) => *report,
        other => return Err(unexpected(other)),
    };
    print_report(&report, args.json, format_status)?;
    Ok(ExitCode::SUCCESS)
}

/// Length of the hash prefix shown in human output.
const SHORT_SHA: usize = 12;

/// The human form of a status report.
pub fn format_status(report: &StatusReport) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_status(&mut out, report);
    out
}

fn write_status(out: &mut String, report: &StatusReport) -> std::fmt::Result {
    let policy = &report.policy;
    let sha = policy.sha256.get(..SHORT_SHA).unwrap_or(&policy.sha256);
    writeln!(
        out,
        "egressd {} (pid {}), running since {}",
        report.version, report.pid, report.started_at
    )?;
    writeln!(
        out,
        "policy:       {} (sha256 {sha}, loaded {})",
        clean(&policy.path),
        policy.loaded_at
    )?;
    if let Some(failure) = &policy.last_error {
        writeln!(out)?;
        writeln!(
            out,
            "!! LAST RELOAD FAILED at {}; the policy above is still in force:",
            failure.at
        )?;
        for line in failure.message.lines() {
            writeln!(out, "!!   {}", clean(line))?;
        }
        writeln!(out)?;
    }
    let default = &report.default_mode;
    writeln!(
        out,
        "default mode: {} ({})",
        default.mode,
        describe_source(default.source)
    )?;
    writeln!(out, "unmatched:    {}", clean(&report.unmatched))?;
    writeln!(out)?;

    if report.workloads.is_empty() {
        writeln!(out, "no workloads")?;
    } else {
        let rows: Vec<Vec<String>> = report
            .workloads
            .iter()
            .map(|workload| {
                vec![
                    clean(&workload.name).into_owned(),
                    match workload.kernel_mode {
                        Some(kernel) => format!("{} (kernel: {kernel}, map full)", workload.mode),
                        None => workload.mode.to_string(),
                    },
                    workload.mode_source.to_string(),
                    workload.cgroups.len().to_string(),
                    format!("{}/{}", workload.cidr_rules, workload.fqdn_rules),
                    if workload.raw_sockets { "yes" } else { "no" }.to_owned(),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "WORKLOAD",
                "MODE",
                "SOURCE",
                "CGROUPS",
                "RULES(cidr/fqdn)",
                "RAW",
            ],
            &rows,
        ));
    }
    writeln!(out)?;

    let datapath = &report.datapath;
    let programs = if datapath.programs.is_empty() {
        "none".to_owned()
    } else {
        datapath.programs.join(", ")
    };
    writeln!(
        out,
        "datapath:     cgroup root {}, programs: {programs}",
        clean(&datapath.cgroup_root)
    )?;
    writeln!(
        out,
        "counters:     events {}, ring buffer drops {}, allowed {}, denied {}, would-deny {}",
        datapath.events,
        datapath.ring_buffer_drops,
        datapath.allowed,
        datapath.denied,
        datapath.would_deny
    )?;
    let resolvers = if datapath.dns_resolvers.is_empty() {
        "none".to_owned()
    } else {
        datapath.dns_resolvers.join(", ")
    };
    writeln!(
        out,
        "dns:          resolvers {resolvers}; answers seen {}, lost {}",
        datapath.dns_answers, datapath.dns_answer_drops
    )?;
    if !datapath.dns_search_domains.is_empty() || datapath.dns_queries_refused > 0 {
        let domains = if datapath.dns_search_domains.is_empty() {
            "none".to_owned()
        } else {
            datapath.dns_search_domains.join(", ")
        };
        writeln!(
            out,
            "dns queries:  search domains {domains}; refused {} (dns_queries = \"allowlisted\")",
            datapath.dns_queries_refused
        )?;
    }
    if datapath.ring_buffer_drops > 0 {
        writeln!(
            out,
            "warning:      {} events were lost (ring buffer full)",
            datapath.ring_buffer_drops
        )?;
    }
    for map in datapath.maps.iter().filter(|map| map.nearly_full()) {
        writeln!(
            out,
            "warning:      kernel map {} is {}% full ({} of {}): new entries will fail",
            clean(&map.map),
            map.entries * 100 / map.capacity.max(1),
            map.entries,
            map.capacity
        )?;
    }
    let on_full_allow = report
        .limits
        .as_ref()
        .is_some_and(|limits| limits.on_full == "allow");
    if datapath.fqdn_insert_failures > 0 {
        writeln!(
            out,
            "warning:      {} learned addresses could not be stored (map full): {}",
            datapath.fqdn_insert_failures,
            if on_full_allow {
                "strict workloads run as audit while theirs do not fit (on_full = \"allow\")"
            } else {
                "connections to them are refused in strict mode"
            }
        )?;
    }
    if let Some(limits) = &report.limits {
        write_limits(out, limits)?;
    }
    if let Some(events) = &report.events
        && (events.suppressed > 0 || events.unreported > 0)
    {
        writeln!(
            out,
            "events:       {} refusals reported, {} more held back by the rate limit ({}){}",
            events.published,
            events.suppressed,
            clean(&events.limit),
            if events.unreported > 0 {
                format!(
                    "; {} of them are counted only here (their destinations were forgotten)",
                    events.unreported
                )
            } else {
                String::new()
            }
        )?;
        for workload in events
            .by_workload
            .iter()
            .filter(|w| w.suppressed > 0)
            .take(5)
        {
            writeln!(
                out,
                "              {}: {} reported, {} held back",
                clean(&workload.workload),
                workload.published,
                workload.suppressed
            )?;
        }
    }
    if let Some(pin_dir) = &datapath.pin_dir {
        writeln!(
            out,
            "pins:         {} ({}); enforcement continues while egressd is stopped",
            clean(pin_dir),
            if datapath.adopted {
                "adopted from the previous egressd"
            } else {
                "created by this egressd"
            }
        )?;
    }
    if let Some(observe) = &report.observe {
        write_observe(out, observe)?;
    }
    Ok(())
}

fn write_limits(out: &mut String, limits: &LimitsStatus) -> std::fmt::Result {
    for overflow in &limits.overflows {
        let what = match overflow.map.as_str() {
            "fqdn_addresses" => "learned addresses",
            "workload_cgroups" => "cgroups",
            _ => "entries",
        };
        writeln!(
            out,
            "!! MAP FULL:  {} ({} entries): {} {what} of workload {} do not fit, since {}: {}",
            clean(&overflow.map),
            overflow.capacity,
            overflow.entries,
            clean(&overflow.workload),
            overflow.since,
            clean(&overflow.effect)
        )?;
        if !overflow.examples.is_empty() {
            let examples: Vec<String> = overflow
                .examples
                .iter()
                .map(|example| clean(example).into_owned())
                .collect();
            writeln!(out, "!!            e.g. {}", examples.join(", "))?;
        }
    }
    Ok(())
}

fn write_observe(out: &mut String, observe: &ObserveStatus) -> std::fmt::Result {
    if !observe.enabled {
        return writeln!(out, "observe:      off ([observe] enabled = false)");
    }
    writeln!(
        out,
        "observe:      store {}, flushed every {} ms, last {}; {} samples written",
        clean(&observe.store),
        observe.flush_interval_ms,
        observe.last_flush.as_deref().unwrap_or("never"),
        observe.samples_written
    )?;
    writeln!(
        out,
        "flows:        {} of {} kernel summaries in use; {} recovered from events",
        observe.kernel_flows, observe.kernel_flow_capacity, observe.recovered_from_events
    )?;
    if observe.kernel_flows >= observe.kernel_flow_capacity && observe.kernel_flow_capacity > 0 {
        writeln!(
            out,
            "warning:      the kernel's flow table is full: least recently used summaries are \
             evicted (destinations are still recorded from their first-sight events)"
        )?;
    }
    if observe.kernel_flow_insert_failures > 0 {
        writeln!(
            out,
            "warning:      {} flow summaries or events were lost in the kernel: some \
             destinations may be missing from the store",
            observe.kernel_flow_insert_failures
        )?;
    }
    if let Some(error) = &observe.last_error {
        writeln!(
            out,
            "!! OBSERVATION STORE: {} (after {} failed flushes)",
            clean(error),
            observe.flush_failures
        )?;
    }
    Ok(())
}

fn describe_source(source: ModeSource) -> &'static str {
    match source {
        ModeSource::File => "from the policy file",
        ModeSource::Command => "set by egressctl mode; `egressctl mode file` reverts",
        ModeSource::Default => "built-in default",
    }
}

#[cfg(test)]
mod tests {
    use egressd_proto::{
        DatapathStatus, MapFill, Mode, ModeStatus, PolicyStatus, ReloadFailure, WorkloadStatus,
    };

    use super::*;

    fn report() -> StatusReport {
        StatusReport {
            version: "0.1.0".into(),
            pid: 77,
            started_at: "2026-11-23T09:00:00Z".into(),
            policy: PolicyStatus {
                path: "/etc/egressd/policy.toml".into(),
                sha256: "0123456789abcdef".repeat(4),
                loaded_at: "2026-11-23T09:00:01Z".into(),
                last_error: None,
            },
            default_mode: ModeStatus {
                mode: Mode::Audit,
                source: ModeSource::File,
            },
            unmatched: "allow".into(),
            workloads: vec![
                WorkloadStatus {
                    name: "vendor-agent".into(),
                    id: 1,
                    mode: Mode::Strict,
                    mode_source: ModeSource::Command,
                    cgroup: Some("system.slice/vendor-agent.service".into()),
                    cgroups: vec!["/sys/fs/cgroup/system.slice/vendor-agent.service".into()],
                    cidr_rules: 2,
                    fqdn_rules: 1,
                    raw_sockets: false,
                    kernel_mode: None,
                },
                WorkloadStatus {
                    name: "host".into(),
                    id: 2,
                    mode: Mode::Audit,
                    mode_source: ModeSource::File,
                    cgroup: None,
                    cgroups: vec![],
                    cidr_rules: 10,
                    fqdn_rules: 0,
                    raw_sockets: true,
                    kernel_mode: None,
                },
            ],
            datapath: DatapathStatus {
                cgroup_root: "/sys/fs/cgroup".into(),
                programs: vec!["connect4".into(), "connect6".into()],
                events: 10,
                ring_buffer_drops: 0,
                allowed: 5,
                denied: 3,
                would_deny: 2,
                dns_answers: 0,
                dns_answer_drops: 0,
                dns_resolvers: Vec::new(),
                dns_search_domains: Vec::new(),
                dns_queries_refused: 0,
                pin_dir: None,
                adopted: false,
                maps: vec![MapFill {
                    map: "allow".into(),
                    entries: 250_000,
                    capacity: 262_144,
                }],
                fqdn_insert_failures: 2,
            },
            observe: Some(ObserveStatus {
                enabled: true,
                store: "/var/lib/egressd/observations.db".into(),
                flush_interval_ms: 5000,
                last_flush: Some("2026-11-23T09:01:00Z".into()),
                flush_failures: 1,
                last_error: Some("disk I/O error".into()),
                samples_written: 42,
                kernel_flows: 65536,
                kernel_flow_capacity: 65536,
                kernel_flow_insert_failures: 3,
                recovered_from_events: 2,
            }),
            limits: None,
            events: None,
        }
    }

    #[test]
    fn human_status() {
        assert_eq!(
            format_status(&report()),
            "\
egressd 0.1.0 (pid 77), running since 2026-11-23T09:00:00Z
policy:       /etc/egressd/policy.toml (sha256 0123456789ab, loaded 2026-11-23T09:00:01Z)
default mode: audit (from the policy file)
unmatched:    allow

WORKLOAD      MODE    SOURCE   CGROUPS  RULES(cidr/fqdn)  RAW
vendor-agent  strict  command  1        2/1               no
host          audit   file     0        10/0              yes

datapath:     cgroup root /sys/fs/cgroup, programs: connect4, connect6
counters:     events 10, ring buffer drops 0, allowed 5, denied 3, would-deny 2
dns:          resolvers none; answers seen 0, lost 0
warning:      kernel map allow is 95% full (250000 of 262144): new entries will fail
warning:      2 learned addresses could not be stored (map full): connections to them are refused in strict mode
observe:      store /var/lib/egressd/observations.db, flushed every 5000 ms, last 2026-11-23T09:01:00Z; 42 samples written
flows:        65536 of 65536 kernel summaries in use; 2 recovered from events
warning:      the kernel's flow table is full: least recently used summaries are evicted (destinations are still recorded from their first-sight events)
warning:      3 flow summaries or events were lost in the kernel: some destinations may be missing from the store
!! OBSERVATION STORE: disk I/O error (after 1 failed flushes)
"
        );
    }

    #[test]
    fn reload_failure_is_prominent() {
        let mut report = report();
        report.policy.last_error = Some(ReloadFailure {
            at: "2026-11-23T09:30:00Z".into(),
            message: "p.toml:3:1: unknown field `alow`\np.toml:9:5: bad CIDR".into(),
        });
        report.default_mode.source = ModeSource::Command;
        report.datapath.ring_buffer_drops = 4;
        report.workloads.clear();
        let text = format_status(&report);
        assert!(
            text.contains(
                "\n!! LAST RELOAD FAILED at 2026-11-23T09:30:00Z; the policy above is still in force:\n\
                 !!   p.toml:3:1: unknown field `alow`\n\
                 !!   p.toml:9:5: bad CIDR\n\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("default mode: audit (set by egressctl mode;"),
            "{text}"
        );
        assert!(text.contains("\nno workloads\n"), "{text}");
        assert!(text.contains("warning:      4 events were lost"), "{text}");
    }

    #[test]
    fn full_maps_and_held_back_events_are_shown() {
        let mut report = report();
        report.workloads[0].kernel_mode = Some(Mode::Audit);
        report.limits = Some(LimitsStatus {
            on_full: "allow".into(),
            overflows: vec![egressd_proto::MapOverflow {
                map: "fqdn_addresses".into(),
                capacity: 4,
                workload: "vendor-agent".into(),
                entries: 2,
                since: "2026-11-23T09:40:00Z".into(),
                effect: "the workload runs as audit".into(),
                examples: vec!["127.0.0.9".into(), "127.0.0.10".into()],
            }],
            fqdn_store_failures: 2,
            cgroup_store_failures: 0,
        });
        report.events = Some(egressd_proto::EventsStatus {
            limit: "5 then 1/s".into(),
            published: 6,
            suppressed: 994,
            unreported: 0,
            by_workload: vec![egressd_proto::WorkloadEvents {
                workload: "vendor-agent".into(),
                published: 6,
                suppressed: 994,
            }],
        });
        let text = format_status(&report);
        for expected in [
            "vendor-agent  strict (kernel: audit, map full)  command",
            "warning:      2 learned addresses could not be stored (map full): strict workloads \
             run as audit while theirs do not fit (on_full = \"allow\")",
            "!! MAP FULL:  fqdn_addresses (4 entries): 2 learned addresses of workload \
             vendor-agent do not fit, since 2026-11-23T09:40:00Z: the workload runs as audit\n\
             !!            e.g. 127.0.0.9, 127.0.0.10\n",
            "events:       6 refusals reported, 994 more held back by the rate limit (5 then \
             1/s)\n              vendor-agent: 6 reported, 994 held back\n",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
    }

    #[test]
    fn short_hashes_are_shown_whole() {
        let mut report = report();
        report.policy.sha256 = "abc".into();
        assert!(format_status(&report).contains("(sha256 abc, loaded"));
    }
}
