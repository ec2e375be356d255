//! The float element types the kernels run on ([`Real`]) and their fast math: a branch-free f32
//! exp and a degree-5/5 rational f32 erf (`scripts/erf_table.py` fits it), written so that the
//! elementwise loops over them vectorise.

use candle_core::WithDType;

/// The float element types the kernels run on.
pub trait Real: WithDType {
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
    fn erf(self) -> Self;
    fn maximum(self, other: Self) -> Self;
}

macro_rules! real {
    ($t:ty, $erf:path, $exp:path) => {
        impl Real for $t {
            #[inline(always)]
            fn exp(self) -> Self {
                $exp(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn erf(self) -> Self {
                $erf(self)
            }
            fn maximum(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
        }
    };
}
// f64: libm (candle's own erf), so the fused GELU matches the composed `x·Φ(x)` bit for bit.
// f32: branch-free erf and exp ([`erf_f32`], [`exp_f32`]) so that the elementwise loops
// vectorise; libm's `erff` / `expf` are scalar calls, and the GELU kernels on them were 28% of a
// one-thread small-ViT training step under perf.
real!(f32, erf_f32, exp_f32);
real!(f64, candle_core::cpu::erf::erf_f64, f64::exp);

/// Horner's rule, lowest coefficient first (unrolled: the arrays are constants).
#[inline(always)]
fn horner<const N: usize>(c: &[f32; N], x: f32) -> f32 {
    c.iter().rev().fold(0.0, |acc, &k| acc.mul_add(x, k))
}

/// e^x in f32 within about 1 ulp, without a branch or a call (it vectorises): e^x = 2^n·e^r with
/// n = round(x·log₂e), r = x − n·ln 2 (ln 2 split in two, Cody–Waite) and e^r from Cephes'
/// `expf` polynomial. Below −87.33 (e^x subnormal) it returns 0; it is meant for x ≤ 88
/// (the kernels only take e^x of x ≤ 0); NaN stays NaN.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    // Adding 1.5·2²³ rounds to an integer n kept in the low mantissa bits: bits = 0x4B40_0000 + n.
    const SHIFT: f32 = 12_582_912.0;
    const EXP_R: [f32; 6] = [
        0.5,
        1.666_666_5e-1,
        4.166_579_6e-2,
        8.333_452e-3,
        1.398_2e-3,
        1.987_569_1e-4,
    ];
    let xc = x.clamp(-87.33, 88.0);
    let t = xc.mul_add(std::f32::consts::LOG2_E, SHIFT);
    let n = t - SHIFT;
    // 0.693_359_4 is 0.693359375 = 710/1024 in f32 (exact n·C1), C1 + C2 = ln 2 to f32 precision.
    let r = n.mul_add(-0.693_359_4, xc);
    let r = n.mul_add(2.121_944_4e-4, r);
    let p = horner(&EXP_R, r).mul_add(r * r, r) + 1.0;
    let scale = f32::from_bits((t.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127)) << 23);
    if x < -87.33 {
        0.0
    } else {
        p * scale
    }
}

/// erf in f32 within 3 ulp (worst 3.1e-7 absolute), without a branch or a call so that its
/// loops vectorise: z·P(z²)/Q(z²) for |z| < 3.92, ±1 beyond (1 − erf(3.92) ≈ 9.6e-9 < ulp(1)/2).
/// P and Q (degree 5, all coefficients positive, so the sums never cancel) and the error bound
/// come from `scripts/erf_table.py`. A third of the work of the polynomial-plus-exp erf it
/// replaced (~1 ulp): that one was 8.5% of a small-ViT forward, GELU's share.
#[inline(always)]
fn erf_f32(x: f32) -> f32 {
    // P's constant term is the fit's, one ulp below 2/√π (the slope of erf at 0).
    #[allow(clippy::approx_constant)]
    const ERF_P: [f32; 6] = [
        1.128379,
        0.19276358,
        0.053060096,
        0.0038682134,
        0.00028746075,
        2.0345321e-06,
    ];
    const ERF_Q: [f32; 6] = [1.0, 0.504164, 0.11508413, 0.0151720885, 0.001188057, 3.8067552e-05];
    let z = x.abs();
    let t = z * z;
    let y = z * horner(&ERF_P, t) / horner(&ERF_Q, t);
    // Not `min`/`clamp`: NaN must stay NaN.
    let y = if z < 3.92 || z.is_nan() { y } else { 1.0 };
    y.copysign(x)
}

#[cfg(test)]
mod tests {
    use super::{erf_f32, exp_f32};

    /// |a − b| in units of f32's ulp at b (the f64 reference).
    fn ulps(a: f32, b: f64) -> f64 {
        (f64::from(a) - b).abs() / (b.abs().max(f64::from(f32::MIN_POSITIVE)) * f64::from(f32::EPSILON))
    }

    #[test]
    fn exp_f32_is_within_an_ulp_of_f64_exp() {
        // Every 2⁻¹⁰ on [−87.33, 88], against libm's f64 exp; 0 below (e^x subnormal), NaN kept.
        let mut worst = 0.0f64;
        for k in (-87.33f64 * 1024.0) as i64..=88 * 1024 {
            let x = k as f32 / 1024.0;
            worst = worst.max(ulps(exp_f32(x), f64::from(x).exp()));
        }
        assert!(worst <= 1.0, "exp_f32: {worst:.2} ulp");
        assert_eq!(exp_f32(-87.34), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn erf_f32_is_within_its_bound_of_f64_erf() {
        // Every 2⁻¹⁴ on [−6, 6] (the rational piece, the switch to ±1 at 3.92): the bound
        // scripts/erf_table.py prints (3.09e-7) plus a little for the ulp of the last operations;
        // odd symmetry exact; ±1 at ±∞; NaN kept.
        let mut worst = 0.0f64;
        for k in -6 * 16384..=6 * 16384 {
            let x = k as f32 / 16384.0;
            let e = (f64::from(erf_f32(x)) - candle_core::cpu::erf::erf_f64(f64::from(x))).abs();
            worst = worst.max(e);
            assert_eq!(erf_f32(-x), -erf_f32(x));
        }
        assert!(worst < 3.2e-7, "erf_f32: worst |error| {worst:.3e}");
        assert_eq!(erf_f32(f32::INFINITY), 1.0);
        assert_eq!(erf_f32(f32::NEG_INFINITY), -1.0);
        assert!(erf_f32(f32::NAN).is_nan());
    }
}
