//! The little statistics the report needs over a handful of seeds: mean and sample standard
//! deviation, and the difference of two rows' means with a Welch t interval (unequal variances,
//! Welch–Satterthwaite degrees of freedom) or, for runs paired by seed, the paired t interval.
//! With three seeds per row the normal quantile (1.96) would be far too narrow, so the Student-t
//! quantile is computed, not approximated.

/// Arithmetic mean (NaN for no values).
pub fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Sample standard deviation (n − 1 in the denominator); `None` for fewer than two values.
pub fn sample_std(v: &[f64]) -> Option<f64> {
    if v.len() < 2 {
        return None;
    }
    let m = mean(v);
    Some((v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt())
}

/// ln Γ(x) by the Lanczos approximation (g = 7, 9 terms; relative error ~1e-15), with the
/// reflection formula below ½.
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let t = x + G + 0.5;
    let a = C[0] + (1..9).map(|i| C[i] / (x + i as f64)).sum::<f64>();
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// The continued fraction of the incomplete beta function (modified Lentz), which converges
/// quickly for x < (a + 1)/(a + b + 2); [`inc_beta`] uses the symmetry I_x(a,b) = 1 − I_{1−x}(b,a)
/// for the rest.
fn beta_cf(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let clamp = |v: f64| if v.abs() < TINY { TINY } else { v };
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 / clamp(1.0 - qab * x / qap);
    let mut h = d;
    for m in 1..=300 {
        let m = m as f64;
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
        d = 1.0 / clamp(1.0 + aa * d);
        c = clamp(1.0 + aa / c);
        h *= d * c;
        let aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2));
        d = 1.0 / clamp(1.0 + aa * d);
        c = clamp(1.0 + aa / c);
        let step = d * c;
        h *= step;
        if (step - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// The regularized incomplete beta function I_x(a, b), a, b > 0.
fn inc_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front = (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_cf(a, b, x) / a
    } else {
        1.0 - front * beta_cf(b, a, 1.0 - x) / b
    }
}

/// P(T ≤ t) for Student's t with `df` degrees of freedom (any real df > 0).
fn student_t_cdf(t: f64, df: f64) -> f64 {
    let tail = 0.5 * inc_beta(df / 2.0, 0.5, df / (df + t * t));
    if t >= 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// The `p` quantile of Student's t with `df` degrees of freedom (real df > 0, 0 < p < 1):
/// bisection on the exact CDF (regularized incomplete beta), so fractional Welch df need no
/// table or interpolation.
pub fn student_t_quantile(p: f64, df: f64) -> f64 {
    assert!(p > 0.0 && p < 1.0 && df > 0.0, "t quantile needs 0 < p < 1 and df > 0");
    if p < 0.5 {
        return -student_t_quantile(1.0 - p, df);
    }
    let mut hi = 1.0;
    while student_t_cdf(hi, df) < p {
        hi *= 2.0;
    }
    let mut lo = 0.0;
    // 100 halvings take the bracket below f64 resolution for any quantile we can represent.
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if student_t_cdf(mid, df) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// The difference of two samples' means with its two-sided 95% t interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DiffInterval {
    /// mean(a) − mean(b).
    pub diff: f64,
    pub lo: f64,
    pub hi: f64,
    /// Degrees of freedom of the t quantile (Welch–Satterthwaite, or pairs − 1).
    pub df: f64,
}

impl DiffInterval {
    /// Whether the interval leaves out 0, i.e. the difference is significant at the 5% level.
    pub fn excludes_zero(&self) -> bool {
        self.lo > 0.0 || self.hi < 0.0
    }
}

/// mean(a) − mean(b) with a 95% Welch t interval. `None` when either sample has fewer than two
/// values, or when neither varies (the Welch df is then 0/0 and no interval is meaningful).
pub fn welch_interval(a: &[f64], b: &[f64]) -> Option<DiffInterval> {
    let (sa, sb) = (sample_std(a)?, sample_std(b)?);
    let (na, nb) = (a.len() as f64, b.len() as f64);
    // Squared standard errors of the two means.
    let (va, vb) = (sa * sa / na, sb * sb / nb);
    if va + vb == 0.0 {
        return None;
    }
    let df = (va + vb).powi(2) / (va * va / (na - 1.0) + vb * vb / (nb - 1.0));
    Some(t_interval(mean(a) - mean(b), (va + vb).sqrt(), df))
}

/// mean(a_i − b_i) over pairs (a_i, b_i) with the paired 95% t interval (pairs − 1 df): for
/// samples whose i-th values share a cause of spread (runs of one seed), which then cancels.
/// `None` for unequal lengths, fewer than two pairs, or differences that do not vary.
pub fn paired_interval(a: &[f64], b: &[f64]) -> Option<DiffInterval> {
    if a.len() != b.len() {
        return None;
    }
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let sd = sample_std(&d)?;
    if sd == 0.0 {
        return None;
    }
    let n = d.len() as f64;
    Some(t_interval(mean(&d), sd / n.sqrt(), n - 1.0))
}

/// `diff` ± t(0.975, df) · `se`.
fn t_interval(diff: f64, se: f64, df: f64) -> DiffInterval {
    let half = student_t_quantile(0.975, df) * se;
    DiffInterval {
        diff,
        lo: diff - half,
        hi: diff + half,
        df,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * b.abs().max(1.0)
    }

    #[test]
    fn t_quantiles_match_tables() {
        // Printed t tables (two-sided 95%): 12.706, 4.303, 2.776, 2.042.
        for (df, t) in [(1.0, 12.706), (2.0, 4.303), (4.0, 2.776), (30.0, 2.042)] {
            let q = student_t_quantile(0.975, df);
            assert!((q - t).abs() < 5e-4, "df {df}: {q} vs {t}");
        }
        // Full precision and fractional df, from scipy 1.17.1: stats.t.ppf(0.975, df).
        for (df, t) in [
            (1.0, 12.706204736174694),
            (2.0, 4.302652729749462),
            (4.0, 2.7764451051977934),
            (30.0, 2.0422724563012378),
            (2.5, 3.5746548420036817),
            (7.3, 2.345066736547703),
        ] {
            let q = student_t_quantile(0.975, df);
            assert!(close(q, t, 1e-10), "df {df}: {q} vs {t}");
            assert!(close(student_t_quantile(0.025, df), -t, 1e-10));
        }
    }

    #[test]
    fn welch_interval_matches_scipy() {
        // Reference: scipy 1.17.1, stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
        // and its .df (the script also recomputes df and the interval by hand; they agree).
        let w = welch_interval(&[1.0, 1.2, 0.9], &[2.0, 2.3, 2.1]).unwrap();
        assert!(close(w.diff, -1.1, 1e-12), "{w:?}");
        assert!(close(w.df, 4.0, 1e-10), "{w:?}");
        assert!(close(w.lo, -1.446283544561189, 1e-10), "{w:?}");
        assert!(close(w.hi, -0.7537164554388107, 1e-10), "{w:?}");
        assert!(w.excludes_zero());
        // Unequal sizes and variances: a fractional df.
        let w = welch_interval(&[1.0, 1.2, 0.9, 1.4], &[2.0, 2.9, 2.1]).unwrap();
        assert!(close(w.diff, -1.2083333333333335, 1e-12), "{w:?}");
        assert!(close(w.df, 2.6121030098692524, 1e-10), "{w:?}");
        assert!(close(w.lo, -2.2679892899064837, 1e-10), "{w:?}");
        assert!(close(w.hi, -0.14867737676018344, 1e-10), "{w:?}");
        // Overlapping samples: the interval covers 0.
        let w = welch_interval(&[1.0, 2.0, 3.0], &[1.5, 2.5, 2.0]).unwrap();
        assert!(!w.excludes_zero() && w.lo < 0.0 && w.hi > 0.0, "{w:?}");
        // Too few seeds, or no spread at all: no interval.
        assert!(welch_interval(&[1.0], &[2.0, 3.0]).is_none());
        assert!(welch_interval(&[1.0, 1.0], &[2.0, 2.0]).is_none());
    }

    #[test]
    fn paired_interval_matches_scipy() {
        // Reference: scipy 1.17.1, stats.ttest_rel(a, b).confidence_interval(0.95) and its .df.
        let p = paired_interval(&[1.0, 1.2, 0.9], &[2.0, 2.3, 2.1]).unwrap();
        assert!(close(p.diff, -1.0999999999999999, 1e-12), "{p:?}");
        assert_eq!(p.df, 2.0);
        assert!(close(p.lo, -1.348413771175033, 1e-10), "{p:?}");
        assert!(close(p.hi, -0.8515862288249667, 1e-10), "{p:?}");
        // Narrower than Welch's on the same numbers: the pairs move together.
        let w = welch_interval(&[1.0, 1.2, 0.9], &[2.0, 2.3, 2.1]).unwrap();
        assert!(p.hi - p.lo < w.hi - w.lo);
        let p = paired_interval(&[1.0, 1.2, 0.9, 1.4], &[2.0, 2.9, 2.1, 1.7]).unwrap();
        assert!(close(p.diff, -1.05, 1e-12), "{p:?}");
        assert_eq!(p.df, 3.0);
        assert!(close(p.lo, -1.9732751544941367, 1e-10), "{p:?}");
        assert!(close(p.hi, -0.1267248455058635, 1e-10), "{p:?}");
        // Unpaired lengths, one pair, or a constant difference: no interval.
        assert!(paired_interval(&[1.0, 2.0], &[1.0, 2.0, 3.0]).is_none());
        assert!(paired_interval(&[1.0], &[2.0]).is_none());
        assert!(paired_interval(&[1.0, 2.0], &[2.0, 3.0]).is_none());
    }

    #[test]
    fn mean_and_sample_std() {
        assert_eq!(mean(&[1.0, 2.0, 3.0]), 2.0);
        assert_eq!(sample_std(&[1.0, 2.0, 3.0]), Some(1.0));
        assert_eq!(sample_std(&[4.0]), None);
    }
}
