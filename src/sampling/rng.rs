//! torch's CUDA `randn` on the host: Philox 4x32-10 + Box-Muller.
//!
//! `Philox::new(seed).randn(n)` equals `torch.randn(n, device="cuda")` right
//! after `torch.manual_seed(seed)`; each later call is the next `randn` on the
//! same generator (torch advances the Philox offset once per call for these
//! sizes). This is A1111's default GPU noise for the first draw and its "NV"
//! source for all of them, so seeds reproduce across the two.
//!
//! The arithmetic follows the reference (`philox_randn` in the fixture script)
//! step by step: u32 Philox rounds, then Box-Muller in f32 with the f32
//! constants `2.3283064e-10` and `2.3283064e-10 * 6.2831855`, and numpy's own
//! float32 `log`/`sin` kernels, so the output is bit-exact.

/// Philox 4x32 multipliers and Weyl key increments.
const M0: u64 = 0xD251_1F53;
const M1: u64 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// A torch CUDA generator seeded with `manual_seed(seed)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Philox {
    seed: u64,
    /// Number of `randn` calls made so far.
    offset: u64,
}

impl Philox {
    pub fn new(seed: u64) -> Self {
        Self { seed, offset: 0 }
    }

    /// A generator positioned after `offset` earlier `randn` calls.
    pub fn with_offset(seed: u64, offset: u64) -> Self {
        Self { seed, offset }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Number of `randn` calls made so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// `n` standard normal samples (row-major, as `torch.randn(shape)` with
    /// `shape.product() == n`), then advances to the next call.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        let out = philox_randn(self.seed, self.offset, n);
        self.offset += 1;
        out
    }
}

/// Philox 4x32-10 on the counter `(offset, 0, index, 0)` with the key
/// `(seed_lo, seed_hi)`.
#[inline]
fn philox4x32_10(seed: u64, offset: u32, index: u32) -> [u32; 4] {
    let mut c = [offset, 0u32, index, 0u32];
    let mut k0 = seed as u32;
    let mut k1 = (seed >> 32) as u32;
    for r in 0..10 {
        let p0 = c[0] as u64 * M0;
        let p1 = c[2] as u64 * M1;
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0];
        if r < 9 {
            k0 = k0.wrapping_add(W0);
            k1 = k1.wrapping_add(W1);
        }
    }
    c
}

/// `torch.randn(n, device="cuda")` after `manual_seed(seed)` and `offset`
/// earlier calls: one Philox block per element, its first two words through
/// Box-Muller (first output only).
pub fn philox_randn(seed: u64, offset: u64, n: usize) -> Vec<f32> {
    // The reference writes these as numpy f32 constants made from Python floats.
    let inv = 2.3283064e-10_f64 as f32;
    let inv2pi = (2.3283064e-10_f64 * 6.2831855_f64) as f32;
    let half_inv = inv / 2.0;
    let half_inv2pi = inv2pi / 2.0;
    // The counter word is a uint32 in the reference.
    let off = offset as u32;
    (0..n)
        .map(|i| {
            let c = philox4x32_10(seed, off, i as u32);
            let u = c[0] as f32 * inv + half_inv;
            let v = c[1] as f32 * inv2pi + half_inv2pi;
            let r = (-2.0f32 * numpy_logf(u)).sqrt();
            r * numpy_sinf(v)
        })
        .collect()
}

// numpy's float32 `log` and `sin` on x86-64 with AVX2+FMA3 / AVX-512F (the
// reference ran there): rational and polynomial approximations with fused
// multiply-adds, within ~1-4 ulp of the true values. Reproducing them, not
// calling a correctly rounded libm, is what makes the noise bit-exact; `mul_add`
// is a true FMA on every platform.

/// numpy `simd_log_FLOAT` for a positive normal `x` (here `u` in (0, 1]):
/// `x = m 2^e` with `m` in (sqrt(1/2), sqrt(2)], `ln x = P(m-1)/Q(m-1) + e ln 2`.
#[inline]
#[allow(clippy::excessive_precision)] // numpy's literals, verbatim
fn numpy_logf(x: f32) -> f32 {
    const P: [f32; 6] = [
        0.0,
        9.999999999999998702752e-01,
        2.112677543073053063722e+00,
        1.480000633576506585156e+00,
        3.808837741388407920751e-01,
        2.589979117907922693523e-02,
    ];
    const Q: [f32; 6] = [
        1.0,
        2.612677543073109236779e+00,
        2.453006071784736363091e+00,
        9.864942958519418960339e-01,
        1.546476374983906719538e-01,
        5.875095403124574342950e-03,
    ];
    // NPY_LOGE2f and NPY_SQRT1_2f, i.e. the correctly rounded f32 constants.
    const LN2: f32 = std::f32::consts::LN_2;
    const SQRT1_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
    debug_assert!(x.is_normal() && x > 0.0);
    let bits = x.to_bits();
    // Exponent and mantissa with the mantissa in [0.5, 1).
    let mut e = ((bits >> 23) as i32 - 126) as f32;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | (126 << 23));
    if m <= SQRT1_2 {
        m = m + m;
        e -= 1.0;
    }
    let m = m - 1.0;
    let mut num = P[5].mul_add(m, P[4]);
    let mut den = Q[5].mul_add(m, Q[4]);
    for k in (0..4).rev() {
        num = num.mul_add(m, P[k]);
        den = den.mul_add(m, Q[k]);
    }
    e.mul_add(LN2, num / den)
}

/// numpy `simd_sincos_f32` (sine) for `|x| <= 117435.992` (here `v` in (0, 2 pi)):
/// Cody-Waite reduction by pi/2, then the sine or cosine polynomial by quadrant.
#[inline]
fn numpy_sinf(x: f32) -> f32 {
    const TWO_OVER_PI: u32 = 0x3F22_F983; // 0x1.45f306p-1
    const PIO2_HIGH: u32 = 0xBFC9_0FD8; // -0x1.921fb0p+0
    const PIO2_MED: u32 = 0xB4A8_885A; // -0x1.5110b4p-22
    const PIO2_LOW: u32 = 0xA7C2_34C4; // -0x1.846988p-48
    const RINT_MAGIC: f32 = 12582912.0; // 0x1.8p+23
    const COS: [u32; 3] = [0x37CC_730B, 0xBAB6_036E, 0x3D2A_AA9E]; // x^8, x^6, x^4
    const SIN: [u32; 4] = [0x363E_9DDE, 0xB950_35DD, 0x3C08_88CD, 0xBE2A_AAAB]; // x^9 .. x^3
    let f = f32::from_bits;
    debug_assert!(x.abs() <= 117_436.0);
    let q = x * f(TWO_OVER_PI) + RINT_MAGIC - RINT_MAGIC;
    let mut r = q.mul_add(f(PIO2_HIGH), x);
    r = q.mul_add(f(PIO2_MED), r);
    r = q.mul_add(f(PIO2_LOW), r);
    let r2 = r * r;
    let mut c = f(COS[0]).mul_add(r2, f(COS[1]));
    c = c.mul_add(r2, f(COS[2]));
    c = c.mul_add(r2, -0.5);
    c = c.mul_add(r2, 1.0);
    let mut s = f(SIN[0]).mul_add(r2, f(SIN[1]));
    s = s.mul_add(r2, f(SIN[2]));
    s = s.mul_add(r2, f(SIN[3]));
    s = s.mul_add(r2, 0.0);
    s = s.mul_add(r, r);
    let quadrant = q as i32;
    let out = if quadrant & 1 == 0 { s } else { c };
    if quadrant & 2 == 2 { 0.0 - out } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_math_is_within_a_few_ulp() {
        for i in 1..2000u32 {
            let u = i as f32 / 2000.0;
            let l = numpy_logf(u) as f64;
            assert!((l - (u as f64).ln()).abs() <= 4.0 * f32::EPSILON as f64 * l.abs().max(1e-30) + 1e-12, "log {u}");
            let v = u * 6.2831855;
            let s = numpy_sinf(v) as f64;
            assert!((s - (v as f64).sin()).abs() < 2e-7, "sin {v}: {s}");
        }
    }

    #[test]
    fn sin_constants_are_numpys_hex_floats() {
        let hf = |neg: bool, mant24: u32, e: i32| {
            let v = (1.0 + mant24 as f64 / 16777216.0) * 2f64.powi(e);
            (if neg { -v } else { v }) as f32
        };
        assert_eq!(hf(false, 0x45f306, -1).to_bits(), 0x3F22_F983);
        assert_eq!(hf(true, 0x921fb0, 0).to_bits(), 0xBFC9_0FD8);
        assert_eq!(hf(true, 0x5110b4, -22).to_bits(), 0xB4A8_885A);
        assert_eq!(hf(true, 0x846988, -48).to_bits(), 0xA7C2_34C4);
        assert_eq!(hf(false, 0x98e616, -16).to_bits(), 0x37CC_730B);
        assert_eq!(hf(true, 0x6c06dc, -10).to_bits(), 0xBAB6_036E);
        assert_eq!(hf(false, 0x55553c, -5).to_bits(), 0x3D2A_AA9E);
        assert_eq!(hf(false, 0x7d3bbc, -19).to_bits(), 0x363E_9DDE);
        assert_eq!(hf(true, 0xa06bba, -13).to_bits(), 0xB950_35DD);
        assert_eq!(hf(false, 0x11119a, -7).to_bits(), 0x3C08_88CD);
        assert_eq!(hf(true, 0x555556, -3).to_bits(), 0xBE2A_AAAB);
    }
}
