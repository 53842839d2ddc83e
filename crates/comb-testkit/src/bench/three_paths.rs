//! What `comb bench l7` and `comb bench mtls` share: three paths from one client pod to the
//! same kind of server (a reference with no proxy, the haproxy sidecar pair, Comb), and the
//! fixed-rate latency rounds run through them. A round runs h2load at the same rate through
//! each path, in an order rotated every round, and keeps per run the p50/p99 of h2load's
//! per-request log, the largest RSS of the processes the path adds, and the host's steal.

use std::path::Path;

use anyhow::{Result, bail};
use comb_lab::Lab;

use super::host_steal::StealLog;
use super::l7_tools as t;
use super::report::{Metric, median};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path3 {
    /// No proxy: what the others add to.
    Reference,
    /// The haproxy sidecar pair: the baseline of the added_* and rss metrics.
    Sidecar,
    Comb,
}

impl Path3 {
    pub const ALL: [Path3; 3] = [Path3::Reference, Path3::Sidecar, Path3::Comb];

    /// The three paths in round `round`'s order: each path goes first, second and third equally
    /// often, so a drift of the machine during a round does not always favour the same one.
    pub fn rotated(round: usize) -> [Path3; 3] {
        let mut order = Self::ALL;
        order.rotate_left(round % 3);
        order
    }
}

/// A scenario's three paths: the reference's name ("direct", "plain") and each base URL as
/// the client pod reaches it.
pub struct Paths {
    pub reference: &'static str,
    pub urls: [String; 3],
}

impl Paths {
    pub fn label(&self, p: Path3) -> &'static str {
        match p {
            Path3::Reference => self.reference,
            Path3::Sidecar => "sidecar",
            Path3::Comb => "comb",
        }
    }

    pub fn url(&self, p: Path3) -> &str {
        &self.urls[p as usize]
    }
}

/// The fixed-rate load of the latency runs: the same options in every scenario that has them.
#[derive(Clone, Debug, clap::Args)]
pub struct RateArgs {
    /// Seconds of each fixed-rate latency run (`--secs` is for the scenario's other runs).
    #[arg(long, default_value = "10")]
    pub latency_secs: u32,
    /// Requests per second of the latency runs, over all connections.
    #[arg(long, default_value = "1000")]
    pub rate: f64,
    /// h2load connections.
    #[arg(long, default_value = "16")]
    pub conns: usize,
}

impl RateArgs {
    pub fn check(&self) -> Result<()> {
        if self.latency_secs == 0 || self.rate <= 0.0 || self.conns == 0 {
            bail!("--latency-secs, --rate and --conns must be positive");
        }
        Ok(())
    }
}

/// The fixed-rate load every latency run applies, and where it runs from.
pub struct Load<'a> {
    pub lab: &'a Lab,
    /// The pod h2load runs in.
    pub client: &'a str,
    /// Appended to each path's base URL.
    pub request: &'a str,
    pub rate: &'a RateArgs,
    /// Where h2load's per-request logs go.
    pub logs: &'a Path,
    /// Print a progress line per run.
    pub progress: bool,
}

impl Load<'_> {
    /// One short run per path, not measured: connection pools, page cache, the agent's first
    /// flows.
    pub fn warm_up(&self, paths: &Paths) -> Result<()> {
        for p in Path3::ALL {
            let url = format!("{}{}", paths.url(p), self.request);
            let r = self.rate;
            t::h2load(self.lab, self.client, &url, r.conns, Some(r.rate), 1, None)?;
        }
        Ok(())
    }
}

/// Per-run results of the latency rounds, indexed by [`Path3`].
#[derive(Default)]
pub struct LatencyRuns {
    p50: [Vec<f64>; 3],
    p99: [Vec<f64>; 3],
    /// Largest RSS of the processes the path adds (none for the reference).
    rss: [Vec<f64>; 3],
    /// What the hypervisor took during each run.
    pub steal: StealLog,
}

impl LatencyRuns {
    /// Round `round` of `rounds`: one run through each path. `watched[p]`: the processes path
    /// `p` adds, whose RSS is sampled during its run.
    pub fn round(
        &mut self,
        load: &Load<'_>,
        paths: &Paths,
        watched: &[Vec<u32>; 3],
        round: usize,
        rounds: usize,
    ) -> Result<()> {
        for p in Path3::rotated(round) {
            let (i, label) = (p as usize, paths.label(p));
            let log = load.logs.join(format!("h2load-{label}.tsv"));
            let url = format!("{}{}", paths.url(p), load.request);
            let ((h, rss), steal) = self.steal.measure(label, || {
                t::max_rss_during(&watched[i], || {
                    t::h2load(
                        load.lab,
                        load.client,
                        &url,
                        load.rate.conns,
                        Some(load.rate.rate),
                        load.rate.latency_secs,
                        Some(&log),
                    )
                })
            })?;
            let (p50, p99) = t::log_p50_p99_ms(&log)?;
            self.p50[i].push(p50);
            self.p99[i].push(p99);
            if !watched[i].is_empty() {
                self.rss[i].push(rss);
            }
            if load.progress {
                let rss = if watched[i].is_empty() {
                    String::new()
                } else {
                    format!(", max RSS {rss:.1} MiB")
                };
                eprintln!(
                    "latency round {}/{rounds} {label:7}: {:.0} req/s, p50 {p50:.3} ms, p99 {p99:.3} ms{rss}, host steal {:.0} ms",
                    round + 1,
                    h.req_per_sec,
                    steal.steal_ms,
                );
            }
        }
        Ok(())
    }

    /// The reference path's median p50 and p99, in ms.
    pub fn reference_ms(&self) -> (f64, f64) {
        let r = Path3::Reference as usize;
        (median(&self.p50[r]), median(&self.p99[r]))
    }

    /// `added_p50_ms` and `added_p99_ms`: per round, the path's figure minus the reference's of
    /// the same round; the sidecar pair is the baseline.
    pub fn added_metrics(&self) -> [Metric; 2] {
        let added = |runs: &[Vec<f64>; 3], p: Path3| -> Vec<f64> {
            let r = &runs[Path3::Reference as usize];
            runs[p as usize].iter().zip(r).map(|(x, y)| x - y).collect()
        };
        let metric = |name: &str, runs: &[Vec<f64>; 3]| {
            Metric::from_runs(
                name,
                "ms",
                &added(runs, Path3::Sidecar),
                &added(runs, Path3::Comb),
            )
        };
        [
            metric("added_p50_ms", &self.p50),
            metric("added_p99_ms", &self.p99),
        ]
    }

    /// `rss_mib`: Comb's processes against the sidecar pair's.
    pub fn rss_metric(&self) -> Metric {
        Metric::from_runs(
            "rss_mib",
            "MiB",
            &self.rss[Path3::Sidecar as usize],
            &self.rss[Path3::Comb as usize],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_takes_every_place_once_in_three_rounds() {
        for p in Path3::ALL {
            let mut places: Vec<usize> = (0..3)
                .map(|round| Path3::rotated(round).iter().position(|&q| q == p).unwrap())
                .collect();
            places.sort_unstable();
            assert_eq!(places, [0, 1, 2], "{p:?}");
        }
        assert_eq!(Path3::rotated(3), Path3::rotated(0));
    }

    #[test]
    fn added_figures_subtract_the_same_rounds_reference() {
        let runs = LatencyRuns {
            p50: [
                vec![1.0, 2.0, 3.0],
                vec![3.0, 4.0, 5.0],
                vec![2.0, 3.0, 4.0],
            ],
            // Round 2's reference spike must not count against either path.
            p99: [
                vec![1.0, 9.0, 1.0],
                vec![5.0, 13.0, 5.0],
                vec![2.0, 11.0, 2.0],
            ],
            rss: [vec![], vec![20.0, 22.0, 21.0], vec![28.0, 27.0, 30.0]],
            steal: StealLog::default(),
        };
        let [p50, p99] = runs.added_metrics();
        assert_eq!(
            (p50.name.as_str(), p50.baseline, p50.comb),
            ("added_p50_ms", 2.0, 1.0)
        );
        assert_eq!(
            (p99.name.as_str(), p99.baseline, p99.comb),
            ("added_p99_ms", 4.0, 1.0)
        );
        assert_eq!(p99.ratio, 0.25);
        let rss = runs.rss_metric();
        assert_eq!((rss.baseline, rss.comb), (21.0, 28.0));
        assert_eq!(runs.reference_ms(), (2.0, 1.0));
    }
}
