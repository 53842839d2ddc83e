//! Medians, ratios and the two output shapes (table, JSON).

use serde::Serialize;

use comb_api::table;

#[derive(Clone, Debug, Serialize)]
pub struct Metric {
    pub name: String,
    pub unit: String,
    pub baseline: f64,
    pub comb: f64,
    /// comb / baseline.
    pub ratio: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub metrics: Vec<Metric>,
    /// How many baseline/Comb pairs each median is taken over.
    pub pairs: usize,
    pub baseline_label: String,
    pub comb_label: String,
}

pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Nearest-rank percentile of unsorted samples.
pub fn percentile(samples: &mut [f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

impl Metric {
    pub fn from_runs(name: &str, unit: &str, baseline: &[f64], comb: &[f64]) -> Self {
        let (b, c) = (median(baseline), median(comb));
        Metric {
            name: name.into(),
            unit: unit.into(),
            baseline: b,
            comb: c,
            ratio: c / b,
        }
    }
}

impl Report {
    pub fn table(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .metrics
            .iter()
            .map(|m| {
                vec![
                    m.name.clone(),
                    m.unit.clone(),
                    format!("{:.3}", m.baseline),
                    format!("{:.3}", m.comb),
                    format!("{:.3}", m.ratio),
                ]
            })
            .collect();
        format!(
            "scenario {}: medians of {} interleaved pairs; baseline = {}, comb = {}\n{}",
            self.scenario,
            self.pairs,
            self.baseline_label,
            self.comb_label,
            table::render(&["METRIC", "UNIT", "BASELINE", "COMB", "RATIO"], &rows)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn percentile_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut v, 50.0), 50.0);
        assert_eq!(percentile(&mut v, 99.0), 99.0);
        assert_eq!(percentile(&mut v, 100.0), 100.0);
    }

    #[test]
    fn ratio_is_comb_over_baseline() {
        let m = Metric::from_runs("x", "us", &[10.0, 10.0], &[5.0, 5.0]);
        assert_eq!(m.ratio, 0.5);
    }
}
