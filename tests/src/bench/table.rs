//! Medians and the printed table.

use std::fmt::Write as _;

/// Median of the finite values; `None` when there are none.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// The `q` quantile (0..=1) by nearest rank.
pub fn quantile(values: &[f64], q: f64) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

pub fn pps(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.3}M/s", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k/s", v / 1e3)
    } else {
        format!("{v:.0}/s")
    }
}

pub fn ns(v: f64) -> String {
    format!("{v:.1} ns")
}

pub fn percent(v: f64) -> String {
    format!("{v:.2}%")
}

pub fn seconds(v: f64) -> String {
    if v < 1.0 {
        format!("{:.0} ms", v * 1e3)
    } else {
        format!("{v:.2} s")
    }
}

pub fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

pub fn count(v: f64) -> String {
    format!("{v:.0}")
}

/// A value per run, shown as its median.
pub fn cell(values: &[f64], fmt: fn(f64) -> String) -> String {
    median(values).map_or_else(|| "-".to_owned(), fmt)
}

/// `median(with) / median(without)`: what the table's columns show.
pub fn ratio(without: &[f64], with: &[f64]) -> Option<f64> {
    let (a, b) = (median(without)?, median(with)?);
    (a > 0.0).then(|| b / a)
}

/// Median of per-run ratios `with[i] / without[i]`: pairs taken close in
/// time cancel slow drift (shown next to [`ratio`] in the per-run values).
pub fn paired_ratio(without: &[f64], with: &[f64]) -> Option<f64> {
    let r: Vec<f64> = without
        .iter()
        .zip(with)
        .filter(|(a, _)| **a > 0.0)
        .map(|(a, b)| b / a)
        .collect();
    median(&r)
}

#[derive(Clone, Debug, Default)]
pub struct Row {
    pub figure: String,
    pub without: String,
    pub with: String,
    pub ratio: Option<f64>,
    pub target: String,
    /// Whether the stalewatch value meets the target (informational only).
    pub met: Option<bool>,
    pub bpftrace: String,
    pub bpftrace_ratio: Option<f64>,
}

/// The whole printed report.
#[derive(Default)]
pub struct Report {
    pub header: Vec<String>,
    pub sections: Vec<(String, Vec<Row>)>,
    pub notes: Vec<String>,
    pub details: Vec<String>,
}

fn ratio_text(r: Option<f64>) -> String {
    r.map_or_else(|| "-".to_owned(), |r| format!("{r:.3}"))
}

impl Report {
    pub fn render(&self) -> String {
        let head = [
            "figure",
            "without",
            "stalewatch",
            "ratio",
            "target",
            "",
            "bpftrace",
            "ratio",
        ];
        let rows: Vec<[String; 8]> = self
            .sections
            .iter()
            .flat_map(|(_, rows)| rows)
            .map(|r| {
                [
                    r.figure.clone(),
                    r.without.clone(),
                    r.with.clone(),
                    ratio_text(r.ratio),
                    r.target.clone(),
                    match r.met {
                        Some(true) => "met".into(),
                        Some(false) => "MISSED".into(),
                        None => String::new(),
                    },
                    r.bpftrace.clone(),
                    ratio_text(r.bpftrace_ratio),
                ]
            })
            .collect();
        let mut width = head.map(str::len);
        for r in &rows {
            for (w, c) in width.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: &[String]| -> String {
            let mut s = String::new();
            for (i, (c, w)) in cells.iter().zip(width).enumerate() {
                let pad = w - c.chars().count();
                if i == 0 {
                    let _ = write!(s, "{c}{}", " ".repeat(pad));
                } else {
                    let _ = write!(s, "  {}{c}", " ".repeat(pad));
                }
            }
            s.trim_end().to_owned()
        };
        let mut out = String::new();
        for h in &self.header {
            let _ = writeln!(out, "{h}");
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "{}", line(&head.map(String::from)));
        let total: usize = width.iter().sum::<usize>() + 2 * (width.len() - 1);
        let mut i = 0;
        for (title, section) in &self.sections {
            let _ = writeln!(out, "{}", "-".repeat(total));
            let _ = writeln!(out, "{title}");
            for _ in section {
                let _ = writeln!(out, "{}", line(&rows[i]));
                i += 1;
            }
        }
        let _ = writeln!(out, "{}", "-".repeat(total));
        if !self.notes.is_empty() {
            let _ = writeln!(out);
            for n in &self.notes {
                let _ = writeln!(out, "{n}");
            }
        }
        if !self.details.is_empty() {
            let _ = writeln!(out, "\nper-run values (in run order):");
            for d in &self.details {
                let _ = writeln!(out, "  {d}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_quantiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN]), None);
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.95), Some(4.0));
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.5), Some(2.0));
        assert_eq!(
            paired_ratio(&[100.0, 200.0, 0.0], &[99.0, 196.0, 5.0]),
            Some(0.985)
        );
        assert_eq!(
            ratio(&[100.0, 300.0, 200.0], &[99.0, 196.0, 5.0]),
            Some(0.495)
        );
    }
}
