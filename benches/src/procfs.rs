//! What /proc says about egressd and the machine: memory, CPU time, load, other daemons.

use std::fs;
use std::time::Instant;

use anyhow::{Context as _, anyhow};

/// USER_HZ: the unit of /proc/PID/stat times, 100 on every Linux architecture egressd
/// supports.
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    at: Instant,
    cpu_ticks: u64,
    /// Resident and peak resident memory, KiB.
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

impl ProcSample {
    /// CPU time between `earlier` and this sample, in percent of one CPU.
    pub fn cpu_percent_since(&self, earlier: &ProcSample) -> f64 {
        let seconds = self.at.duration_since(earlier.at).as_secs_f64();
        if seconds <= 0.0 {
            return 0.0;
        }
        let ticks = self.cpu_ticks.saturating_sub(earlier.cpu_ticks) as f64;
        100.0 * ticks / TICKS_PER_SECOND / seconds
    }
}

/// Busy CPU time of the whole machine since boot, all CPUs, in nanoseconds: user, system and
/// interrupt time, not idle, I/O wait or time the hypervisor gave to someone else (steal).
/// Both ends of a loopback connection and the kernel's softirq work on either CPU are in it.
pub fn host_busy_ns() -> anyhow::Result<u64> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    busy_ns_of(&stat)
}

/// [`host_busy_ns`] of /proc/stat's text.
fn busy_ns_of(stat: &str) -> anyhow::Result<u64> {
    let line = stat
        .lines()
        .next()
        .filter(|line| line.starts_with("cpu "))
        .ok_or_else(|| anyhow!("/proc/stat: no summary `cpu` line first"))?;
    let fields: Vec<&str> = line.split_whitespace().skip(1).collect();
    // user nice system idle iowait irq softirq steal ...; guest time is counted in user.
    let ticks = |index: usize, name: &str| -> anyhow::Result<u64> {
        fields
            .get(index)
            .and_then(|value| value.parse::<u64>().ok())
            .ok_or_else(|| anyhow!("/proc/stat: no {name} time in {line:?}"))
    };
    let busy = ticks(0, "user")?
        + ticks(1, "nice")?
        + ticks(2, "system")?
        + ticks(5, "irq")?
        + ticks(6, "softirq")?;
    Ok((busy as f64 / TICKS_PER_SECOND * 1e9) as u64)
}

/// Memory and CPU time (user + system, all threads) of `pid`.
pub fn sample(pid: u32) -> anyhow::Result<ProcSample> {
    let at = Instant::now();
    let stat_path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&stat_path).with_context(|| format!("reading {stat_path}"))?;
    // Fields after the command name (which may hold spaces) start with field 3, state.
    let after_comm = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("{stat_path}: no command name"))?;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let field = |number: usize| -> anyhow::Result<u64> {
        fields
            .get(number - 3)
            .and_then(|value| value.parse().ok())
            .ok_or_else(|| anyhow!("{stat_path}: no field {number}"))
    };
    let cpu_ticks = field(14)? + field(15)?;
    let status_path = format!("/proc/{pid}/status");
    let status =
        fs::read_to_string(&status_path).with_context(|| format!("reading {status_path}"))?;
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse().ok())
            .unwrap_or(0)
    };
    Ok(ProcSample {
        at,
        cpu_ticks,
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
    })
}

/// SYNs dropped because a listener's accept queue was full (`TcpExt: ListenDrops` of this
/// network namespace): a sink that falls behind stalls its clients for a second per drop,
/// which would be charged to whichever configuration was running.
pub fn listen_drops() -> u64 {
    let text = fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|line| line.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "ListenDrops")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0)
}

/// Programs attached to the cgroup v2 root, as `bpftool cgroup show` lists them (`None` when
/// bpftool is missing or fails). Called when the benchmark itself runs no egressd, so every
/// program listed belongs to someone else and runs on every packet of every configuration.
pub fn root_programs(root: &std::path::Path) -> Option<Vec<String>> {
    let output = std::process::Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(root)
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let listed: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    Some(
        listed
            .as_array()?
            .iter()
            .map(|program| {
                format!(
                    "{} ({})",
                    program["name"].as_str().unwrap_or("?"),
                    program["attach_type"].as_str().unwrap_or("?")
                )
            })
            .collect(),
    )
}

/// The 1-minute load average.
pub fn loadavg() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Pids of running egressd processes, called between configurations (when the benchmark runs
/// none): a daemon of someone else's tests slows every configuration it overlaps (its
/// programs are attached at the cgroup root).
pub fn other_egressd() -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "egressd")
        })
        .collect()
}

/// The CPU model, the number of CPUs and the memory size, for the report.
pub fn machine() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cpus = cpuinfo
        .lines()
        .filter(|line| line.starts_with("processor"))
        .count();
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let virt = if cpuinfo.contains(" hypervisor") {
        ", virtual machine"
    } else {
        ""
    };
    format!("{model}, {cpus} CPUs{virt}, {mem_gib:.0} GiB")
}

pub fn kernel() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|text| text.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_has_memory_and_cpu_time() {
        let first = sample(std::process::id()).expect("sample self");
        assert!(first.rss_kib > 0 && first.hwm_kib >= first.rss_kib);
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        let second = sample(std::process::id()).expect("sample self");
        assert!(second.cpu_percent_since(&first) >= 0.0);
    }

    #[test]
    fn busy_time_leaves_idle_iowait_and_steal_out() {
        // user nice system idle iowait irq softirq steal guest guest_nice
        let stat = "cpu  100 2 30 5000 40 5 6 700 0 0\ncpu0 50 1 15 2500 20 2 3 350 0 0\n";
        assert_eq!(busy_ns_of(stat).expect("parse"), 143 * 10_000_000);
        assert!(busy_ns_of("intr 1 2 3\n").is_err());
        assert!(busy_ns_of("cpu  1 2\n").is_err());
        assert!(host_busy_ns().expect("this machine's /proc/stat") > 0);
    }
}
