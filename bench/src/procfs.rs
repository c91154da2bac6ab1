//! What the benchmarks read from `/proc` (CPU time and memory of a
//! process and its children) and CPU pinning through `taskset`.

use std::{fs, process::Command, sync::OnceLock, time::Duration};

/// Clock ticks per second of `utime` / `stime` (`getconf CLK_TCK`, 100 when
/// that is not available).
fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// The fields of `/proc/PID/stat` after the command name: field 3 (state)
/// is index 0.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// The parent of `pid`.
fn parent(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// `pid` and all its descendants that are alive now.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut all: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            if let Some(child) = entry.file_name().to_str().and_then(|n| n.parse().ok())
                && let Some(ppid) = parent(child)
            {
                all.push((child, ppid));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(all.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    tree
}

fn ticks_to_duration(ticks: u64) -> Duration {
    let hz = clock_ticks();
    Duration::from_secs(ticks / hz) + Duration::from_nanos((ticks % hz) * 1_000_000_000 / hz)
}

/// User and system CPU time of one process (all its threads).
fn cpu_times_of(pid: u32) -> Option<CpuTimes> {
    let fields = stat_fields(pid)?;
    // utime and stime are fields 14 and 15 of the whole line.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(CpuTimes {
        user: ticks_to_duration(utime),
        system: ticks_to_duration(stime),
    })
}

fn cpu_time_of(pid: u32) -> Option<Duration> {
    cpu_times_of(pid).map(|t| t.user + t.system)
}

/// CPU time in user space and in the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// User space.
    pub user: Duration,
    /// The kernel (system calls, and here mostly the loopback TCP stack).
    pub system: Duration,
}

impl CpuTimes {
    /// `self - earlier`, per field.
    pub fn since(self, earlier: CpuTimes) -> CpuTimes {
        CpuTimes {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }

    /// User plus system.
    pub fn total(self) -> Duration {
        self.user + self.system
    }
}

/// CPU times of `pid` and its descendants.
pub fn tree_cpu_times(pid: u32) -> CpuTimes {
    process_tree(pid)
        .into_iter()
        .filter_map(cpu_times_of)
        .fold(CpuTimes::default(), |a, b| CpuTimes {
            user: a.user + b.user,
            system: a.system + b.system,
        })
}

/// CPU time all CPUs spent busy (user, nice, system, irq, softirq, and
/// steal: time the hypervisor gave to someone else), from `/proc/stat`.
pub fn machine_busy_time() -> Duration {
    let text = fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: u64 = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|v| v.parse::<u64>().ok())
                .enumerate()
                // user nice system idle iowait irq softirq steal
                .filter(|(i, _)| matches!(i, 0 | 1 | 2 | 5 | 6 | 7))
                .map(|(_, v)| v)
                .sum()
        })
        .unwrap_or(0);
    ticks_to_duration(ticks)
}

/// This process's CPU time (user + system).
pub fn self_cpu_time() -> Duration {
    cpu_time_of(std::process::id()).unwrap_or_default()
}

/// A `kB` line of `/proc/PID/status`, in bytes.
fn status_bytes(pid: u32, key: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_kb(&text, key)
}

fn parse_status_kb(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Resident memory of `pid` and its descendants, in bytes.
pub fn tree_rss(pid: u32) -> u64 {
    process_tree(pid)
        .into_iter()
        .filter_map(|p| status_bytes(p, "VmRSS"))
        .sum()
}

/// This process's resident memory, in bytes.
pub fn self_rss() -> u64 {
    status_bytes(std::process::id(), "VmRSS").unwrap_or(0)
}

/// How the server and the load generator are placed on the CPUs.
#[derive(Debug, Clone)]
pub struct Pinning {
    /// The `taskset -c CPU` prefix for server processes, if pinning works.
    pub server_cpu: Option<usize>,
    /// The CPU this process (the load generator) was pinned to.
    pub load_cpu: Option<usize>,
    /// Why pinning is off, when it is.
    pub note: Option<String>,
}

impl Pinning {
    /// Pins this process (and the threads it starts later) to the last CPU
    /// and reserves CPU 0 for servers, when there are at least two CPUs
    /// and `taskset` works. Call it before starting any thread.
    pub fn setup(enabled: bool) -> Pinning {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let off = |note: String| Pinning {
            server_cpu: None,
            load_cpu: None,
            note: Some(note),
        };
        if !enabled {
            return off("pinning disabled (--no-pin)".into());
        }
        if cpus < 2 {
            return off(format!("only {cpus} CPU available: nothing pinned"));
        }
        let load_cpu = cpus - 1;
        let pid = std::process::id().to_string();
        let status = Command::new("taskset")
            .args(["-a", "-c", "-p", &load_cpu.to_string(), &pid])
            .stdout(std::process::Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() => Pinning {
                server_cpu: Some(0),
                load_cpu: Some(load_cpu),
                note: None,
            },
            Ok(s) => off(format!("taskset failed ({s}): nothing pinned")),
            Err(e) => off(format!("taskset not available ({e}): nothing pinned")),
        }
    }

    /// The command that runs `program` on the server CPU.
    pub fn command(&self, program: &str) -> Command {
        match self.server_cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.args(["-c", &cpu.to_string(), program]);
                c
            }
            None => Command::new(program),
        }
    }

    /// One line saying where things run.
    pub fn describe(&self) -> String {
        match (&self.server_cpu, &self.load_cpu, &self.note) {
            (Some(s), Some(l), _) => format!("server pinned to CPU {s}, load generator to CPU {l}"),
            (_, _, Some(note)) => note.clone(),
            _ => "not pinned".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        let text = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(parse_status_kb(text, "VmRSS"), Some(1024 * 1024));
        assert_eq!(parse_status_kb(text, "VmHWM"), Some(2048 * 1024));
        assert_eq!(parse_status_kb(text, "VmSwap"), None);
    }

    #[test]
    fn own_process() {
        let me = std::process::id();
        assert!(process_tree(me).contains(&me));
        assert!(self_rss() > 0);
        assert!(cpu_time_of(me).is_some());
    }
}
