//! 3x3 convolutions at stride 1 by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2015): every 2x2 block of output
//! pixels comes from the 4x4 block of input under it through 16 multiplications per pair of
//! channels instead of 36, so the products, which are most of a UNet step and nearly all of
//! a VAE decode, do 2.25x less work than im2col's.
//!
//! For each block ("tile") and input channel the 4x4 input `d` becomes `V = Bᵀ d B`; for
//! each pair of channels the 3x3 weight `g` becomes `U = G g Gᵀ`; then for each of the 16
//! positions `ξ` of a 4x4 block, `M_ξ = U_ξ · V_ξ` is one matrix product over the input
//! channels (`[Cout, Cin] x [Cin, tiles]`), and the output block is `Aᵀ M A`. The transforms'
//! coefficients are 0, ±1 and ±1/2, so the sums stay within a few f32 roundoffs of direct
//! ones (the tests hold them to the same bound as `conv`'s).

use std::ops::Range;
use std::sync::Mutex;

use multiversion::multiversion;
use rayon::prelude::*;

use super::conv::Shape;
use super::product::{Parallelism, View, product};

/// Output pixels per tile side, input pixels per tile side, and positions per tile.
const OUT: usize = 2;
const IN: usize = 4;
const POSITIONS: usize = IN * IN;

/// Whether the convolution `s` goes this way: 3x3 kernels between enough channels that the
/// products outweigh the transforms (not SD's first and last convolutions, 4 or 3 channels
/// wide), over enough tiles that the weights' transform (16/9 of the weights, written on
/// every call) pays for itself.
pub fn applies(s: &Shape) -> bool {
    let [ho, wo] = s.output();
    s.kernel == [3, 3]
        && s.stride == [1, 1]
        && s.channels_in >= 32
        && s.channels_out >= 32
        && s.batch * ho * wo >= MIN_PIXELS
}

/// Output pixels (over the batch) from which this beats im2col. The weights' transform is
/// memory-bound: 18 ms for 1280 x 1280 channels on 2 cores, where the products save 31 ms at
/// 16x16 pixels, batch 2 (44 against 56 ms in all), but 8 ms at 8x8 (31 against 15 ms).
const MIN_PIXELS: usize = 512;

/// Input-transform floats per chunk of tiles, which the products then read from the cache.
const CHUNK_FLOATS: usize = 2 << 20;

/// `out = conv(x, weight) + bias` for a 3x3 kernel at stride 1; the layouts are `conv2d`'s.
pub fn conv3x3(x: &[f32], weight: &[f32], bias: &[f32], out: &mut [f32], s: Shape) {
    let chunk = CHUNK_FLOATS / (POSITIONS * s.channels_in.max(s.channels_out)).max(1);
    in_chunks(x, weight, bias, out, s, chunk.max(64));
}

/// The tiles of the output: rows and columns of one image's.
fn grid(s: &Shape) -> [usize; 2] {
    s.output().map(|side| side.div_ceil(OUT))
}

/// [`conv3x3`] over chunks of about `chunk` tiles (whole rows of tiles), one after the other.
fn in_chunks(x: &[f32], weight: &[f32], bias: &[f32], out: &mut [f32], s: Shape, chunk: usize) {
    assert!(s.kernel == [3, 3] && s.stride == [1, 1]);
    let grid @ [grid_rows, grid_cols] = grid(&s);
    let (cin, cout, rows) = (s.channels_in, s.channels_out, s.batch * grid_rows);
    if rows == 0 || grid_cols == 0 || cout == 0 {
        return;
    }
    let rows_per_chunk = (chunk / grid_cols).clamp(1, rows);
    let chunk = rows_per_chunk * grid_cols;
    let mut scratch = Scratch::take();
    let u = weight_transform(weight, cout, cin, &mut scratch.u);
    // Reused by every chunk: V as [cin][16][chunk], M as 16 matrices [cout][chunk].
    let v = sized(&mut scratch.v, cin * POSITIONS * chunk);
    scratch.m.resize_with(POSITIONS, Vec::new);
    let mut m: Vec<&mut [f32]> = scratch.m.iter_mut().map(|m| sized(m, cout * chunk)).collect();
    for first in (0..rows).step_by(rows_per_chunk) {
        let rows = first..rows.min(first + rows_per_chunk);
        let len = rows.len() * grid_cols;
        input_transform(x, s, grid, rows.clone(), chunk, v);
        m.par_iter_mut().enumerate().for_each(|(xi, m)| {
            let u = View::within(u, xi * cin, [cout, cin], POSITIONS * cin);
            let v = View::within(v, xi * chunk, [cin, len], POSITIONS * chunk);
            product(m, 0, chunk, [u, v], 1.0, Parallelism::None);
        });
        output_transform(&m, bias, out, s, grid, rows, chunk);
    }
    scratch.keep();
}

/// The buffers of the last call, kept for the next: a 1280-channel convolution's weight
/// transform is 105 MB, which glibc would map, zero and unmap again on every call (sdw keeps
/// only buffers up to 32 MiB in its heap: `device`).
static SCRATCH: Mutex<Option<Scratch>> = Mutex::new(None);

#[derive(Default)]
struct Scratch {
    u: Vec<f32>,
    v: Vec<f32>,
    m: Vec<Vec<f32>>,
}

impl Scratch {
    /// The kept buffers, or new ones while another convolution holds them.
    fn take() -> Self {
        SCRATCH.lock().ok().and_then(|mut kept| kept.take()).unwrap_or_default()
    }

    fn keep(self) {
        if let Ok(mut kept) = SCRATCH.lock() {
            *kept = Some(self);
        }
    }
}

/// The first `len` elements of `buffer`, grown if need be. The callers overwrite what they
/// read, so old contents do no harm.
fn sized(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    &mut buffer[..len]
}

/// `U = G g Gᵀ` for every pair of channels, as `[cout][16][cin]`: position `ξ`'s matrix is
/// then `[cout, cin]` with rows `16 * cin` apart.
fn weight_transform<'a>(weight: &[f32], cout: usize, cin: usize, buffer: &'a mut Vec<f32>) -> &'a [f32] {
    let u = sized(buffer, cout * POSITIONS * cin);
    u.par_chunks_mut(POSITIONS * cin).enumerate().for_each(|(o, u)| {
        // The 9 taps as rows over the input channels, then G g (4 x 3 rows), then (G g) Gᵀ.
        let mut g = vec![0f32; 9 * cin];
        for (c, taps) in weight[o * cin * 9..][..cin * 9].chunks_exact(9).enumerate() {
            for (tap, &value) in taps.iter().enumerate() {
                g[tap * cin + c] = value;
            }
        }
        let tap = |i: usize, j: usize| &g[(i * 3 + j) * cin..][..cin];
        // G g column by column: `gg` holds column j's 4 rows at rows 4j..4j+4.
        let mut gg = vec![0f32; 12 * cin];
        for (j, column) in gg.chunks_exact_mut(IN * cin).enumerate() {
            lanewise(rows_mut(column, cin), [0, 1, 2].map(|i| tap(i, j)), filter);
        }
        for (r, u) in u.chunks_exact_mut(IN * cin).enumerate() {
            lanewise(rows_mut(u, cin), [0, 1, 2].map(|j| &gg[(j * IN + r) * cin..][..cin]), filter);
        }
    });
    u
}

/// The first `N` rows of `len` floats of `buffer`.
fn rows_mut<const N: usize>(buffer: &mut [f32], len: usize) -> [&mut [f32]; N] {
    let mut rows = buffer.chunks_exact_mut(len);
    std::array::from_fn(|_| rows.next().expect("a buffer of N rows"))
}

/// `outs[..][i] = f(ins[..][i])` for every `i` (the shortest slice's length): one transform
/// applied lane by lane, compiled for the CPU's widest vectors.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn lanewise<const I: usize, const O: usize>(outs: [&mut [f32]; O], ins: [&[f32]; I], f: impl Fn([f32; I]) -> [f32; O]) {
    let n = outs.iter().map(|o| o.len()).chain(ins.iter().map(|i| i.len())).min().unwrap_or(0);
    let ins = ins.map(|i| &i[..n]);
    let mut outs = outs.map(|o| &mut o[..n]);
    for i in 0..n {
        for (out, value) in outs.iter_mut().zip(f(ins.map(|x| x[i]))) {
            out[i] = value;
        }
    }
}

/// `G g` for a 3-tap filter: `G = [[1, 0, 0], [½, ½, ½], [½, -½, ½], [0, 0, 1]]`.
#[inline(always)]
fn filter([g0, g1, g2]: [f32; 3]) -> [f32; 4] {
    [g0, (g0 + g1 + g2) * 0.5, (g0 - g1 + g2) * 0.5, g2]
}

/// `Bᵀ d` for 4 inputs: `Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`.
#[inline(always)]
fn data([d0, d1, d2, d3]: [f32; 4]) -> [f32; 4] {
    [d0 - d2, d1 + d2, d2 - d1, d1 - d3]
}

/// `Aᵀ m` for 4 sums: `Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]]`.
#[inline(always)]
fn inverse([m0, m1, m2, m3]: [f32; 4]) -> [f32; 2] {
    [m0 + m1 + m2, m1 - m2 - m3]
}

/// `V = Bᵀ d B` for the tile rows `rows` (numbered over the batch) and every input channel,
/// into `v` as `[cin][16][chunk]`, the tiles of each row in turn. `d` is the 4x4 input block
/// a tile's output reads, 0 in the padding.
fn input_transform(
    x: &[f32],
    s: Shape,
    [grid_rows, cols]: [usize; 2],
    rows: Range<usize>,
    chunk: usize,
    v: &mut [f32],
) {
    let [top, left, ..] = s.padding;
    let (h, w) = (s.height, s.width);
    // Input columns under a row of tiles: `2 * cols + 2` from `-left`.
    let span = OUT * cols + 2;
    v.par_chunks_mut(POSITIONS * chunk).enumerate().for_each(|(c, v)| {
        let mut d = vec![0f32; IN * span];
        let mut bd = vec![0f32; IN * span];
        let (mut even, mut odd) = (vec![0f32; cols + 1], vec![0f32; cols + 1]);
        for (i, row) in rows.clone().enumerate() {
            let (b, ty) = (row / grid_rows, row % grid_rows);
            let plane = &x[(b * s.channels_in + c) * h * w..][..h * w];
            for (r, d) in d.chunks_exact_mut(span).enumerate() {
                d.fill(0.0);
                // Column `k` of `d` is input column `k - left`.
                let (from, to) = (left.min(span), (left + w).min(span));
                if let Some(y) = (ty * OUT + r).checked_sub(top).filter(|&y| y < h && from < to) {
                    d[from..to].copy_from_slice(&plane[y * w + from - left..][..to - from]);
                }
            }
            // Bᵀ d over whole rows, then each tile's row times B: a tile's 4 columns are
            // `even[t], odd[t], even[t + 1], odd[t + 1]` of its row.
            lanewise(rows_mut(&mut bd, span), [0, 1, 2, 3].map(|r| &d[r * span..][..span]), data);
            for (bd, v) in bd.chunks_exact(span).zip(v.chunks_exact_mut(IN * chunk)) {
                for (t, pair) in bd.chunks_exact(2).enumerate() {
                    (even[t], odd[t]) = (pair[0], pair[1]);
                }
                let outs = rows_mut(v, chunk).map(|v| &mut v[i * cols..][..cols]);
                lanewise(outs, [&even[..cols], &odd[..cols], &even[1..], &odd[1..]], data);
            }
        }
    });
}

/// `Y = Aᵀ M A` plus the bias for the tile rows `rows`, into the output planes (`out` as
/// `[batch, cout, ho, wo]`); a tile's pixels beyond the output's edge are dropped.
fn output_transform(
    products: &[&mut [f32]],
    bias: &[f32],
    out: &mut [f32],
    s: Shape,
    [grid_rows, cols]: [usize; 2],
    rows: Range<usize>,
    chunk: usize,
) {
    let [ho, wo] = s.output();
    out.par_chunks_mut(ho * wo).enumerate().for_each(|(plane, out)| {
        let (b, o) = (plane / s.channels_out, plane % s.channels_out);
        let mine = rows.start.max(b * grid_rows)..rows.end.min((b + 1) * grid_rows);
        let mut am = vec![0f32; OUT * IN * cols];
        let mut y = vec![0f32; OUT * OUT * cols];
        for row in mine {
            let ty = row % grid_rows;
            let at = (row - rows.start) * cols;
            let m = |xi: usize| &products[xi][o * chunk + at..][..cols];
            // Aᵀ M column by column (`am` holds column k's 2 rows at rows 2k, 2k + 1), then
            // each row times A (`y` holds output row r's 2 columns at rows 2r, 2r + 1).
            for (k, am) in am.chunks_exact_mut(OUT * cols).enumerate() {
                lanewise(rows_mut(am, cols), [0, 1, 2, 3].map(|r| m(r * IN + k)), inverse);
            }
            for (r, y) in y.chunks_exact_mut(OUT * cols).enumerate() {
                lanewise(rows_mut(y, cols), [0, 1, 2, 3].map(|k| &am[(k * OUT + r) * cols..][..cols]), inverse);
            }
            for r in 0..OUT {
                let Some(dst) = out.chunks_exact_mut(wo).nth(ty * OUT + r) else { break };
                let (left, right) = (&y[2 * r * cols..][..cols], &y[(2 * r + 1) * cols..][..cols]);
                for (pair, (l, r)) in dst.chunks_mut(OUT).zip(left.iter().zip(right)) {
                    pair[0] = l + bias[o];
                    if let Some(second) = pair.get_mut(1) {
                        *second = r + bias[o];
                    }
                }
            }
        }
    });
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{max_difference, noise};

    use crate::cpu::conv::tests::reference;

    /// Against the definition in f64, with the tiles taken `chunk` at a time.
    fn check(batch: usize, [cin, cout]: [usize; 2], [height, width]: [usize; 2], padding: [usize; 4], chunk: usize) {
        let s = Shape {
            batch,
            channels_in: cin,
            channels_out: cout,
            height,
            width,
            kernel: [3, 3],
            padding,
            stride: [1, 1],
        };
        let x = noise(batch * cin * height * width, 1, 1.0);
        let w = noise(cout * cin * 9, 2, ((cin * 9) as f32).sqrt().recip()); // as `conv`'s wide cases
        let bias = noise(cout, 3, 1.0);
        let mut got = vec![f32::NAN; reference(&x, &w, &bias, s).len()];
        in_chunks(&x, &w, &bias, &mut got, s, chunk);
        let err = max_difference(&got, &reference(&x, &w, &bias, s));
        assert!(err <= 1e-5, "{s:?} in chunks of {chunk} tiles: max error {err}");
    }

    #[test]
    fn matches_the_definition() {
        check(2, [5, 7], [9, 6], [1, 1, 1, 1], 64); // "same", odd height: half tiles at the bottom
        check(1, [3, 4], [7, 7], [1, 1, 1, 1], 64); // odd both ways
        check(1, [4, 3], [1, 1], [1, 1, 1, 1], 64); // a 1x1 image
        check(3, [2, 2], [6, 5], [0, 0, 0, 0], 64); // "valid"
        check(1, [3, 2], [5, 8], [0, 1, 2, 0], 64); // uneven padding
        check(2, [6, 4], [9, 6], [1, 1, 1, 1], 7); // chunks that end inside an image
        check(1, [40, 36], [33, 33], [1, 1, 1, 1], 100); // the way `conv2d` sends SD's convolutions
    }
}
