//! A1111's `ImageRNG` with its "NV" source: every image of a batch has its own Philox
//! stream seeded with its own seed, so image i of a batch equals a single run with that
//! seed; a variation seed's noise is slerped into the first draw.

use crate::sampling::{NoiseSource, Philox};

/// A random seed in A1111's range (`random.randrange(4294967294)`), for seed -1.
pub fn random_seed() -> u64 {
    use rand::RngExt;
    rand::rng().random_range(0..4_294_967_294u64)
}

/// A variation ("subseed") mixed into the initial noise.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Variation {
    pub subseed: u64,
    /// 0 = the seed's noise, 1 = the subseed's.
    pub strength: f32,
}

/// One generator per image; draws are concatenated in batch order.
pub struct ImageRng {
    generators: Vec<Philox>,
}

impl ImageRng {
    pub fn new(seeds: &[u64]) -> Self {
        Self { generators: seeds.iter().map(|&s| Philox::new(s)).collect() }
    }

    /// The initial noise, `per_image` values for each image (A1111's `ImageRNG.first`):
    /// image i's subseed is `variation.subseed + i`'s noise when `subseeds` says so.
    pub fn first(&mut self, per_image: usize, shape_chw: [usize; 3], subseeds: Option<(&[u64], f32)>) -> Vec<f32> {
        let mut out = Vec::with_capacity(per_image * self.generators.len());
        for (i, g) in self.generators.iter_mut().enumerate() {
            let noise = g.randn(per_image);
            match subseeds {
                Some((subs, strength)) if strength != 0.0 => {
                    let sub = Philox::new(subs.get(i).copied().unwrap_or(0)).randn(per_image);
                    out.extend(slerp(strength, &noise, &sub, shape_chw));
                }
                _ => out.extend(noise),
            }
        }
        out
    }
}

impl NoiseSource for ImageRng {
    fn noise(&mut self, n: usize) -> Vec<f32> {
        let per = n / self.generators.len();
        self.generators.iter_mut().flat_map(|g| g.randn(per)).collect()
    }
}

/// A1111's `slerp(val, low, high)` on one image's `[C, H, W]` noise. Its norms and dot
/// products run over dim 1 (H), i.e. per (channel, column); kept as is so variation seeds
/// give A1111's images, including its linear fallback (`low * val + high * (1 - val)`)
/// when the directions nearly agree.
pub fn slerp(val: f32, low: &[f32], high: &[f32], [c, h, w]: [usize; 3]) -> Vec<f32> {
    let at = |ci: usize, y: usize, x: usize| (ci * h + y) * w + x;
    let column_norm = |v: &[f32], ci: usize, x: usize| (0..h).map(|y| v[at(ci, y, x)].powi(2)).sum::<f32>().sqrt();
    let mut dots = vec![0f32; c * w];
    for ci in 0..c {
        for x in 0..w {
            let (nl, nh) = (column_norm(low, ci, x), column_norm(high, ci, x));
            dots[ci * w + x] = (0..h).map(|y| (low[at(ci, y, x)] / nl) * (high[at(ci, y, x)] / nh)).sum();
        }
    }
    let mean = dots.iter().sum::<f32>() / dots.len() as f32;
    if mean > 0.9995 {
        return low.iter().zip(high).map(|(l, hi)| l * val + hi * (1.0 - val)).collect();
    }
    let mut out = vec![0f32; low.len()];
    for ci in 0..c {
        for x in 0..w {
            let omega = dots[ci * w + x].acos();
            let so = omega.sin();
            let (a, b) = (((1.0 - val) * omega).sin() / so, (val * omega).sin() / so);
            for y in 0..h {
                let i = at(ci, y, x);
                out[i] = a * low[i] + b * high[i];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slerp_ends_are_the_inputs() {
        let shape = [2, 3, 4];
        let a = Philox::new(1).randn(24);
        let b = Philox::new(2).randn(24);
        let at0 = slerp(0.0, &a, &b, shape);
        let at1 = slerp(1.0, &a, &b, shape);
        assert!(at0.iter().zip(&a).all(|(x, y)| (x - y).abs() < 1e-5));
        assert!(at1.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-5));
    }

    #[test]
    fn batch_draws_are_per_image_streams() {
        let mut rng = ImageRng::new(&[5, 6]);
        let first = rng.first(8, [2, 2, 2], None);
        assert_eq!(&first[..8], &Philox::new(5).randn(8)[..]);
        assert_eq!(&first[8..], &Philox::new(6).randn(8)[..]);
        let next = rng.noise(16);
        let mut six = Philox::new(6);
        six.randn(8);
        assert_eq!(&next[8..], &six.randn(8)[..]);
    }
}
