//! 2D convolution on the CPU, without dilation or groups: every convolution of SD's UNet and
//! VAE.
//!
//! flex's convolution builds its im2col buffer per tile of 512 pixels, but reorders the
//! weights and the input on one core on every call, and packs the whole weight matrix again
//! for each tile. Here the output pixels (of the whole batch) are split into tiles, in
//! parallel: each tile gathers its input patches into an im2col buffer of at most a few MB,
//! which stays in cache, and multiplies it by the weights as they are stored. Small images
//! (SD's 32x32 latents and below) are one tile, whose product spreads over the cores.

use rayon::prelude::*;

use super::product::{Parallelism, View, product};

/// A convolution's shape. `padding` is (top, left, bottom, right), as burn's
/// `PaddingConfig2d::Explicit`; `stride` is (vertical, horizontal).
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub batch: usize,
    pub channels_in: usize,
    pub channels_out: usize,
    pub height: usize,
    pub width: usize,
    pub kernel: [usize; 2],
    pub padding: [usize; 4],
    pub stride: [usize; 2],
}

impl Shape {
    /// Output height and width.
    pub fn output(&self) -> [usize; 2] {
        let [top, left, bottom, right] = self.padding;
        let padded = [top + self.height + bottom, left + self.width + right];
        std::array::from_fn(|d| padded[d].checked_sub(self.kernel[d]).map_or(0, |room| room / self.stride[d] + 1))
    }

    /// Rows of the im2col matrix: one per input channel and kernel tap.
    fn taps(&self) -> usize {
        self.channels_in * self.kernel[0] * self.kernel[1]
    }
}

/// `out = conv(x, weight) + bias`: `x` is `[batch, channels_in, height, width]`, `weight`
/// `[channels_out, channels_in, kh, kw]`, `out` `[batch, channels_out, ..output()]`.
pub fn conv2d(x: &[f32], weight: &[f32], bias: &[f32], out: &mut [f32], s: Shape) {
    if super::winograd::applies(&s) {
        return super::winograd::conv3x3(x, weight, bias, out, s);
    }
    by_im2col(x, weight, bias, out, s)
}

/// [`conv2d`] as products over im2col tiles.
fn by_im2col(x: &[f32], weight: &[f32], bias: &[f32], out: &mut [f32], s: Shape) {
    let [ho, wo] = s.output();
    let (k, cout, positions) = (s.taps(), s.channels_out, s.batch * ho * wo);
    assert_eq!(x.len(), s.batch * s.channels_in * s.height * s.width);
    assert_eq!(weight.len(), cout * k);
    assert_eq!(out.len(), cout * positions);
    assert_eq!(bias.len(), cout);
    if out.is_empty() {
        return;
    }
    let tile = tile_positions(k, positions);
    let tiles = positions.div_ceil(tile);
    let threads = rayon::current_num_threads();
    // Few tiles: let each product spread over the cores instead.
    let parallelism = if tiles >= 2 * threads { Parallelism::None } else { Parallelism::Rayon(threads) };
    // The products' results, tile after tile, each `[cout, tile]`.
    let mut grid = vec![0f32; tiles * cout * tile];
    grid.par_chunks_mut(cout * tile).enumerate().for_each(|(t, g)| {
        let (start, len) = (t * tile, tile.min(positions - t * tile));
        let cols = im2col(x, s, start..start + len);
        product(g, 0, tile, [View::dense(weight, cout, k), View::dense(&cols, k, len)], 1.0, parallelism);
    });
    scatter(&grid, bias, out, [cout, ho * wo], tile);
}

/// Largest im2col buffer (floats) for one image's worth of small latents: 16M floats, 64 MB
/// (1280 channels at 16x16, batch 2, is 5.9M).
const WHOLE_FLOATS: usize = 16 << 20;

/// im2col floats per tile otherwise (4 MB), which stay in the cache between gathering and
/// multiplying: the VAE's 128-channel convolution at 512x512 took 523 ms with 1M, 527 ms
/// with 256K and 601 ms with 4M, on 2 cores.
const TILE_FLOATS: usize = 1 << 20;

/// Output positions per tile: all of them when their im2col buffer is small, else as many as
/// fill [`TILE_FLOATS`] (at least 64).
fn tile_positions(taps: usize, positions: usize) -> usize {
    if taps * positions <= WHOLE_FLOATS {
        return positions;
    }
    (TILE_FLOATS / taps).clamp(64, positions)
}

/// The im2col matrix of output positions `range` (numbered over the batch): one row per
/// (input channel, kernel tap) in the weights' order, holding the input pixel under that tap
/// for each position (0 in the padding).
fn im2col(x: &[f32], s: Shape, range: std::ops::Range<usize>) -> Vec<f32> {
    let ([kh, kw], [top, left, ..], [sh, sw], [ho, wo]) = (s.kernel, s.padding, s.stride, s.output());
    let (image, len) = (s.height * s.width, range.len());
    let mut cols = vec![0f32; s.taps() * len];
    for (r, dst) in cols.chunks_exact_mut(len).enumerate() {
        let (ci, i, j) = (r / (kh * kw), r / kw % kh, r % kw);
        // Output columns whose tap j lands inside the image: 0 <= xo * sw + j - left < width.
        let x_lo = left.saturating_sub(j).div_ceil(sw);
        let x_hi = (s.width + left).saturating_sub(j).div_ceil(sw).min(wo);
        let mut p = range.start;
        while p < range.end {
            let (b, y, x0) = (p / (ho * wo), p % (ho * wo) / wo, p % wo);
            let seg = (wo - x0).min(range.end - p);
            if let Some(yi) = (y * sh + i).checked_sub(top).filter(|&yi| yi < s.height) {
                let (lo, hi) = (x_lo.max(x0), x_hi.min(x0 + seg));
                if lo < hi {
                    let src = &x[(b * s.channels_in + ci) * image + yi * s.width + lo * sw + j - left..];
                    let dst = &mut dst[p - range.start + lo - x0..][..hi - lo];
                    if sw == 1 {
                        dst.copy_from_slice(&src[..hi - lo]);
                    } else {
                        dst.iter_mut().zip(src.iter().step_by(sw)).for_each(|(d, v)| *d = *v);
                    }
                }
            }
            p += seg;
        }
    }
    cols
}

/// `out[b, co, pixel] = grid[position] + bias[co]` for `position = b * pixels + pixel`,
/// which lies in tile `position / tile` (`[cout, tile]`) at column `position % tile`.
fn scatter(grid: &[f32], bias: &[f32], out: &mut [f32], [cout, pixels]: [usize; 2], tile: usize) {
    out.par_chunks_mut(pixels).enumerate().for_each(|(plane, mut dst)| {
        let (b, co) = (plane / cout, plane % cout);
        let add = bias[co];
        let mut position = b * pixels;
        // A plane may cross from one tile into the next.
        while !dst.is_empty() {
            let (t, column) = (position / tile, position % tile);
            let len = dst.len().min(tile - column);
            let src = &grid[(t * cout + co) * tile + column..][..len];
            let (head, rest) = dst.split_at_mut(len);
            for (d, v) in head.iter_mut().zip(src) {
                *d = v + add;
            }
            (dst, position) = (rest, position + len);
        }
    });
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::cpu::{max_difference, noise};

    /// The definition, one output at a time, in f64.
    pub(in crate::cpu) fn reference(x: &[f32], w: &[f32], bias: &[f32], s: Shape) -> Vec<f32> {
        let ([kh, kw], [top, left, ..], [sh, sw], [ho, wo]) = (s.kernel, s.padding, s.stride, s.output());
        let mut out = Vec::new();
        for b in 0..s.batch {
            for co in 0..s.channels_out {
                for y in 0..ho {
                    for xo in 0..wo {
                        let mut acc = bias[co] as f64;
                        for ci in 0..s.channels_in {
                            for i in 0..kh {
                                for j in 0..kw {
                                    let (yi, xi) =
                                        ((y * sh + i) as isize - top as isize, (xo * sw + j) as isize - left as isize);
                                    if yi < 0 || xi < 0 || yi >= s.height as isize || xi >= s.width as isize {
                                        continue;
                                    }
                                    let xv =
                                        x[((b * s.channels_in + ci) * s.height + yi as usize) * s.width + xi as usize];
                                    acc += xv as f64 * w[((co * s.channels_in + ci) * kh + i) * kw + j] as f64;
                                }
                            }
                        }
                        out.push(acc as f32);
                    }
                }
            }
        }
        out
    }

    fn check(s: Shape) {
        check_with(s, 1.0);
    }

    /// A wide convolution, with weights at a trained network's scale (1/sqrt(fan-in)): its
    /// outputs stay near those of the narrow cases, so the bound means about as many f32
    /// roundoffs.
    fn check_wide(s: Shape) {
        check_with(s, (s.taps() as f32).sqrt().recip());
    }

    fn check_with(s: Shape, weight_amplitude: f32) {
        let [kh, kw] = s.kernel;
        let x = noise(s.batch * s.channels_in * s.height * s.width, 1, 1.0);
        let w = noise(s.channels_out * s.channels_in * kh * kw, 2, weight_amplitude);
        let bias = noise(s.channels_out, 3, 1.0);
        let [ho, wo] = s.output();
        let mut out = vec![f32::NAN; s.batch * s.channels_out * ho * wo];
        conv2d(&x, &w, &bias, &mut out, s);
        let want = reference(&x, &w, &bias, s);
        let err = max_difference(&out, &want);
        assert!(err <= 1e-5, "{s:?}: max error {err}");
    }

    #[test]
    fn matches_the_definition() {
        let s = |batch, channels_in, channels_out, [height, width]: [usize; 2], kernel, padding| Shape {
            batch,
            channels_in,
            channels_out,
            height,
            width,
            kernel,
            padding,
            stride: [1, 1],
        };
        let strided = |shape: Shape, stride| Shape { stride, ..shape };
        check(s(2, 5, 7, [9, 6], [3, 3], [1, 1, 1, 1])); // "same" 3x3, batch of 2
        check(s(1, 4, 3, [1, 1], [3, 3], [1, 1, 1, 1])); // a 1x1 image
        check(s(2, 6, 4, [5, 8], [1, 1], [0, 0, 0, 0])); // 1x1 conv (skip connections)
        check(s(3, 3, 2, [7, 5], [3, 2], [0, 1, 2, 0])); // uneven kernel and padding
        check(s(1, 2, 2, [4, 4], [3, 3], [0, 0, 0, 0])); // "valid"
        check(strided(s(2, 5, 7, [9, 6], [3, 3], [1, 1, 1, 1]), [2, 2])); // the UNet's downsamplers
        check(strided(s(1, 3, 4, [8, 7], [3, 3], [0, 0, 1, 1]), [2, 2])); // the VAE encoder's
        check(strided(s(1, 2, 3, [7, 9], [2, 3], [0, 1, 0, 1]), [3, 2])); // uneven strides
        check_wide(strided(s(2, 40, 36, [33, 33], [3, 3], [1, 1, 1, 1]), [2, 2])); // over the Winograd size
    }
}
