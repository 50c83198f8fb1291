//! Small statistics over samples (ms unless said otherwise).

use std::time::Duration;

/// The samples in ascending order (NaN last).
pub fn sorted(v: &[f64]) -> Vec<f64> {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s
}

/// Nearest-rank percentile (`p` in 0..=1) of a sorted slice; NaN when empty.
pub fn pct(s: &[f64], p: f64) -> f64 {
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = (p * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

/// The median (the mean of the two middle samples for an even count); NaN when empty.
pub fn median(v: &[f64]) -> f64 {
    let s = sorted(v);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// A duration in ms.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// "median (min–max)" with `prec` decimals (nearest-rank median), or why there is none.
pub fn med_range(v: &[f64], prec: usize) -> String {
    if v.is_empty() {
        return "no sample".into();
    }
    let s = sorted(v);
    format!(
        "{:.prec$} ({:.prec$}–{:.prec$})",
        pct(&s, 0.5),
        s[0],
        s[s.len() - 1]
    )
}

/// The samples, comma-separated, with `prec` decimals.
pub fn list(v: &[f64], prec: usize) -> String {
    v.iter()
        .map(|x| format!("{x:.prec$}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_medians_and_ranges() {
        let v = [5.0, 1.0, 3.0, 2.0];
        assert_eq!(sorted(&v), [1.0, 2.0, 3.0, 5.0]);
        assert_eq!(pct(&sorted(&v), 0.5), 2.0);
        assert_eq!(pct(&sorted(&v), 1.0), 5.0);
        assert_eq!(pct(&sorted(&v), 0.0), 1.0);
        assert!(pct(&[], 0.5).is_nan());
        assert_eq!(median(&v), 2.5);
        assert_eq!(median(&[4.0, 1.0, 9.0]), 4.0);
        assert!(median(&[]).is_nan());
        assert_eq!(med_range(&v, 1), "2.0 (1.0–5.0)");
        assert_eq!(med_range(&[], 1), "no sample");
        assert_eq!(list(&[1.0, 2.25], 1), "1.0, 2.2");
        assert_eq!(ms(Duration::from_micros(1500)), 1.5);
    }
}
