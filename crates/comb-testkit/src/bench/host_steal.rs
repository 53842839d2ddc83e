//! CPU time the hypervisor takes from the machine while a latency run goes on (`/proc/stat`'s
//! `steal` column). On a virtual machine whose host is busy, the vCPUs stop for milliseconds
//! at a time, and a run's p99 then measures the host more than the paths (measured:
//! docs/benchmarks.md, "Session of 2026-12-06 (night)"). The latency scenarios log it per run
//! and warn when it was large enough to move a p99.

use std::time::Instant;

use anyhow::{Context, Result};

/// A run is flagged when steal took more than this share of the machine's CPU time during it:
/// a p99 is decided by 1 % of the requests.
const FLAG_SHARE: f64 = 0.01;

/// Steal and total ticks of the machine from `/proc/stat`'s `cpu` line (the sum over its CPUs),
/// and how many CPUs that line sums (the `cpuN` lines).
fn cpu_ticks(stat: &str) -> Option<(u64, u64, usize)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let cols: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is already
    // counted in user and nice.
    let steal = *cols.get(7)?;
    let cpus = stat
        .lines()
        .filter(|l| {
            l.strip_prefix("cpu")
                .is_some_and(|n| n.starts_with(|c: char| c.is_ascii_digit()))
        })
        .count();
    Some((steal, cols.iter().take(8).sum(), cpus.max(1)))
}

fn read_ticks() -> Result<(u64, u64, usize)> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    cpu_ticks(&text).context("/proc/stat: no cpu line with a steal column")
}

/// One latency run's steal.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSteal {
    pub label: String,
    /// Steal summed over the CPUs, in ms.
    pub steal_ms: f64,
    /// Steal's share of the machine's CPU time during the run.
    pub share: f64,
}

/// The steal of every latency run of one bench.
#[derive(Default)]
pub struct StealLog {
    runs: Vec<RunSteal>,
}

impl StealLog {
    /// Runs `work` and records the steal during it under `label`.
    pub fn measure<T>(
        &mut self,
        label: &str,
        work: impl FnOnce() -> Result<T>,
    ) -> Result<(T, RunSteal)> {
        let (s0, t0, _) = read_ticks()?;
        let w0 = Instant::now();
        let out = work()?;
        let (s1, t1, cpus) = read_ticks()?;
        // The run's ticks span `cpus` × its wall time, which converts ticks to ms without
        // asking for USER_HZ.
        let ticks = t1.saturating_sub(t0).max(1) as f64;
        let stolen = s1.saturating_sub(s0) as f64;
        let run = RunSteal {
            label: label.into(),
            steal_ms: stolen / ticks * w0.elapsed().as_secs_f64() * cpus as f64 * 1000.0,
            share: stolen / ticks,
        };
        self.runs.push(run.clone());
        Ok((out, run))
    }

    /// A warning when any run lost more than [`FLAG_SHARE`] of the machine to the host.
    pub fn warning(&self) -> Option<String> {
        let flagged: Vec<&RunSteal> = self.runs.iter().filter(|r| r.share > FLAG_SHARE).collect();
        let worst = flagged.iter().max_by(|a, b| a.share.total_cmp(&b.share))?;
        Some(format!(
            "warning: the hypervisor took over {:.0} % of the CPU time in {} of {} latency runs \
             (most: {:.0} ms, {:.1} %, in a {} run); their p99 measures the host as much as the \
             paths: rerun on a quieter machine before reading added_p99",
            FLAG_SHARE * 100.0,
            flagged.len(),
            self.runs.len(),
            worst.steal_ms,
            worst.share * 100.0,
            worst.label,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_is_the_eighth_column_guest_time_is_not_counted_twice_and_cpus_are_counted() {
        let stat = "cpu  323123 0 111159 395521 2266 0 16042 2193 50 0\n\
                    cpu0 1 2 3 4 5 6 7 8 9 10\ncpu1 1 2 3 4 5 6 7 8 9 10\nintr 1 2\n";
        let total = 323123 + 111159 + 395521 + 2266 + 16042 + 2193;
        assert_eq!(cpu_ticks(stat), Some((2193, total, 2)));
        assert_eq!(cpu_ticks("cpu  1 2 3\n"), None, "no steal column");
        assert_eq!(cpu_ticks("intr 1\n"), None);
    }

    fn run(label: &str, share: f64) -> RunSteal {
        RunSteal {
            label: label.into(),
            steal_ms: share * 10_000.0,
            share,
        }
    }

    #[test]
    fn only_runs_above_the_share_are_flagged() {
        let mut log = StealLog {
            runs: vec![run("direct", 0.0), run("comb", 0.005)],
        };
        assert_eq!(log.warning(), None);
        log.runs.push(run("sidecar", 0.24));
        log.runs.push(run("comb", 0.02));
        let w = log.warning().unwrap();
        assert!(w.contains("in 2 of 4 latency runs"), "{w}");
        assert!(w.contains("2400 ms, 24.0 %, in a sidecar run"), "{w}");
    }
}
