//! 3x3 convolutions at stride 1 by Winograd's minimal filtering F(m x m, 3x3) (Lavin & Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2015): every m x m block of output
//! pixels comes from the n x n block of input under it (n = m + 2) through n² multiplications
//! per pair of channels instead of 9m², so the products, which are most of a UNet step and
//! nearly all of a VAE decode, do less work than im2col's: 4/9 of it for F(2x2, 3x3), 1/4 for
//! F(4x4, 3x3), which runs over 2048 output pixels or more unless `SDW_WINOGRAD=2x2`.
//!
//! For each block ("tile") and input channel the n x n input `d` becomes `V = Bᵀ d B`; for
//! each pair of channels the 3x3 weight `g` becomes `U = G g Gᵀ`; then for each of the n²
//! positions `ξ` of a block, `M_ξ = U_ξ · V_ξ` is one matrix product over the input channels
//! (`[Cout, Cin] x [Cin, tiles]`), and the output block is `Aᵀ M A`. F(2x2, 3x3)'s
//! coefficients are 0, ±1 and ±½, so its sums stay within a few f32 roundoffs of direct ones.
//! F(4x4, 3x3) is Toom-Cook at the points 0, -1, 1, ½, -2 and ∞, 2-4x more accurate in f32
//! than Lavin & Gray's 0, ±1, ±2 (Barabasz et al., "Error analysis and improving the accuracy
//! of Winograd convolution for deep neural networks", 2020); its error is still several
//! times F(2x2, 3x3)'s (the tests hold both to `conv`'s bound), which is why f16 on a GPU
//! (`shaders::winograd`) keeps F(2x2, 3x3).

use std::ops::Range;
use std::sync::{LazyLock, Mutex};

use multiversion::multiversion;
use rayon::prelude::*;

use super::conv::Shape;
use super::product::{Parallelism, View, product};

/// Whether the convolution `s` goes this way (on the CPU, and on a GPU: `shaders::winograd`):
/// 3x3 kernels between enough channels that the products outweigh the transforms (not SD's
/// first and last convolutions, 4 or 3 channels wide), over enough tiles that the weights'
/// transform (written on every call) pays for itself; unless `SDW_WINOGRAD=off`.
pub fn applies(s: &Shape) -> bool {
    let [ho, wo] = s.output();
    *SETTING != Setting::Off
        && s.kernel == [3, 3]
        && s.stride == [1, 1]
        && s.channels_in >= 32
        && s.channels_out >= 32
        && s.batch * ho * wo >= MIN_PIXELS
}

/// Which of Winograd's algorithms: the output tile's side `m` of F(m x m, 3x3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tile {
    /// F(2x2, 3x3): a 2x2 output block from the 4x4 input block under it by 16 products.
    F2,
    /// F(4x4, 3x3): a 4x4 output block from the 6x6 input block under it by 36 products.
    F4,
}

impl Tile {
    /// Output pixels per tile side (`m`).
    pub fn out(self) -> usize {
        match self {
            Tile::F2 => 2,
            Tile::F4 => 4,
        }
    }

    /// Positions of an input block (`n²`, n = m + 2): the batch of the products.
    pub fn positions(self) -> usize {
        (self.out() + 2).pow(2)
    }
}

impl std::fmt::Display for Tile {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let m = self.out();
        write!(f, "F({m}x{m}, 3x3)")
    }
}

/// The algorithm for f32 convolutions: F(4x4, 3x3), unless `SDW_WINOGRAD=2x2`.
pub fn f32_tile() -> Tile {
    if *SETTING == Setting::Only2x2 { Tile::F2 } else { Tile::F4 }
}

/// `SDW_WINOGRAD`, read once: `off` sends every convolution to im2col's products, `2x2` keeps
/// F(2x2, 3x3) where F(4x4, 3x3) would run, to compare them (on the CPU and on a GPU).
#[derive(PartialEq)]
enum Setting {
    Off,
    Only2x2,
    Best,
}

static SETTING: LazyLock<Setting> = LazyLock::new(|| match std::env::var("SDW_WINOGRAD").as_deref() {
    Ok("off") => Setting::Off,
    Ok("2x2") => Setting::Only2x2,
    _ => Setting::Best,
});

/// Output pixels (over the batch) from which this beats im2col. The weights' transform is
/// memory-bound: 18 ms for 1280 x 1280 channels on 2 cores by F(2x2, 3x3), where the products
/// save 31 ms at 16x16 pixels, batch 2 (44 against 56 ms in all), but 8 ms at 8x8 (31 against
/// 15 ms).
const MIN_PIXELS: usize = 512;

/// Output pixels (over the batch) from which F(4x4, 3x3) beats F(2x2, 3x3) on the CPU: its
/// weights' transform is 36/16 of F(2x2, 3x3)'s, which the products' savings pay for only
/// over enough pixels. On 2 cores (release build) with 1280 channels at 16x16, batch 2
/// (512 pixels), F(4x4, 3x3) took 53 ms against 44; with 640 at 32x32 (2048 pixels) 28 ms
/// both; with 320 at 64x64 20 against 30 ms.
const F4_MIN_PIXELS: usize = 2048;

/// Input-transform floats per chunk of tiles, which the products then read from the cache.
const CHUNK_FLOATS: usize = 2 << 20;

/// One of Winograd's algorithms, F(OUT x OUT, 3x3) over IN x IN input blocks
/// (IN = OUT + 2): its three one-dimensional transforms, which the two-dimensional ones apply
/// to every column and then to every row of a block.
trait Algorithm<const IN: usize, const OUT: usize> {
    /// `G g` for a 3-tap filter.
    fn filter(g: [f32; 3]) -> [f32; IN];
    /// `Bᵀ d` for IN inputs.
    fn data(d: [f32; IN]) -> [f32; IN];
    /// `Aᵀ m` for IN sums.
    fn inverse(m: [f32; IN]) -> [f32; OUT];
}

/// F(2x2, 3x3).
struct F2;

impl Algorithm<4, 2> for F2 {
    /// `G = [[1, 0, 0], [½, ½, ½], [½, -½, ½], [0, 0, 1]]`.
    #[inline(always)]
    fn filter([g0, g1, g2]: [f32; 3]) -> [f32; 4] {
        [g0, (g0 + g1 + g2) * 0.5, (g0 - g1 + g2) * 0.5, g2]
    }

    /// `Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`.
    #[inline(always)]
    fn data([d0, d1, d2, d3]: [f32; 4]) -> [f32; 4] {
        [d0 - d2, d1 + d2, d2 - d1, d1 - d3]
    }

    /// `Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]]`.
    #[inline(always)]
    fn inverse([m0, m1, m2, m3]: [f32; 4]) -> [f32; 2] {
        [m0 + m1 + m2, m1 - m2 - m3]
    }
}

/// F(4x4, 3x3) at the points 0, -1, 1, ½, -2 and ∞.
struct F4;

impl Algorithm<6, 4> for F4 {
    /// `G = [[1, 0, 0], [-⅓, ⅓, -⅓], [⅓, ⅓, ⅓], [-16/15, -8/15, -4/15], [1/15, -2/15, 4/15],
    /// [0, 0, 1]]`.
    #[inline(always)]
    fn filter([g0, g1, g2]: [f32; 3]) -> [f32; 6] {
        [
            g0,
            (g1 - g0 - g2) * (1.0 / 3.0),
            (g0 + g1 + g2) * (1.0 / 3.0),
            -(16.0 * g0 + 8.0 * g1 + 4.0 * g2) * (1.0 / 15.0),
            (g0 - 2.0 * g1 + 4.0 * g2) * (1.0 / 15.0),
            g2,
        ]
    }

    /// `Bᵀ = [[1, -3/2, -2, 3/2, 1, 0], [0, 1, -5/2, ½, 1, 0], [0, -1, ½, 5/2, 1, 0],
    /// [0, -2, -1, 2, 1, 0], [0, ½, -1, -½, 1, 0], [0, 1, -3/2, -2, 3/2, 1]]`.
    #[inline(always)]
    fn data([d0, d1, d2, d3, d4, d5]: [f32; 6]) -> [f32; 6] {
        [
            d0 - 1.5 * d1 - 2.0 * d2 + 1.5 * d3 + d4,
            d1 - 2.5 * d2 + 0.5 * d3 + d4,
            0.5 * d2 - d1 + 2.5 * d3 + d4,
            2.0 * (d3 - d1) - d2 + d4,
            0.5 * (d1 - d3) - d2 + d4,
            d1 - 1.5 * d2 - 2.0 * d3 + 1.5 * d4 + d5,
        ]
    }

    /// `Aᵀ = [[1, 1, 1, 1, 1, 0], [0, -1, 1, ½, -2, 0], [0, 1, 1, ¼, 4, 0], [0, -1, 1, ⅛, -8, 1]]`.
    #[inline(always)]
    fn inverse([m0, m1, m2, m3, m4, m5]: [f32; 6]) -> [f32; 4] {
        let (near, near_odd) = (m2 + m1, m2 - m1);
        [
            near + m0 + m3 + m4,
            near_odd + 0.5 * m3 - 2.0 * m4,
            near + 0.25 * m3 + 4.0 * m4,
            near_odd + 0.125 * m3 - 8.0 * m4 + m5,
        ]
    }
}

/// `out = conv(x, weight) + bias` for a 3x3 kernel at stride 1; the layouts are `conv2d`'s.
pub fn conv3x3(x: &[f32], weight: &[f32], bias: &[f32], out: &mut [f32], s: Shape) {
    let [ho, wo] = s.output();
    let tile = if s.batch * ho * wo >= F4_MIN_PIXELS { f32_tile() } else { Tile::F2 };
    let chunk = (CHUNK_FLOATS / (tile.positions() * s.channels_in.max(s.channels_out)).max(1)).max(64);
    by(tile, x, weight, bias, out, s, chunk);
}

/// [`conv3x3`] by `tile`'s algorithm, over chunks of about `chunk` tiles.
fn by(tile: Tile, x: &[f32], weight: &[f32], bias: &[f32], out: &mut [f32], s: Shape, chunk: usize) {
    match tile {
        Tile::F2 => in_chunks::<F2, 4, 2>(x, weight, bias, out, s, chunk),
        Tile::F4 => in_chunks::<F4, 6, 4>(x, weight, bias, out, s, chunk),
    }
}

/// [`conv3x3`] by the algorithm `A` over chunks of about `chunk` tiles (whole rows of tiles),
/// one after the other.
fn in_chunks<A: Algorithm<IN, OUT>, const IN: usize, const OUT: usize>(
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    out: &mut [f32],
    s: Shape,
    chunk: usize,
) {
    assert!(s.kernel == [3, 3] && s.stride == [1, 1] && IN == OUT + 2);
    let grid @ [grid_rows, grid_cols] = s.output().map(|side| side.div_ceil(OUT));
    let (cin, cout, rows, positions) = (s.channels_in, s.channels_out, s.batch * grid_rows, IN * IN);
    if rows == 0 || grid_cols == 0 || cout == 0 {
        return;
    }
    let rows_per_chunk = (chunk / grid_cols).clamp(1, rows);
    let chunk = rows_per_chunk * grid_cols;
    let mut scratch = Scratch::take();
    let u = weight_transform::<A, IN, OUT>(weight, cout, cin, &mut scratch.u);
    // Reused by every chunk: V as [cin][n²][chunk], M as n² matrices [cout][chunk].
    let v = sized(&mut scratch.v, cin * positions * chunk);
    if scratch.m.len() < positions {
        scratch.m.resize_with(positions, Vec::new);
    }
    let mut m: Vec<&mut [f32]> = scratch.m[..positions].iter_mut().map(|m| sized(m, cout * chunk)).collect();
    for first in (0..rows).step_by(rows_per_chunk) {
        let rows = first..rows.min(first + rows_per_chunk);
        let len = rows.len() * grid_cols;
        input_transform::<A, IN, OUT>(x, s, grid, rows.clone(), chunk, v);
        m.par_iter_mut().enumerate().for_each(|(xi, m)| {
            let u = View::within(u, xi * cin, [cout, cin], positions * cin);
            let v = View::within(v, xi * chunk, [cin, len], positions * chunk);
            product(m, 0, chunk, [u, v], 1.0, Parallelism::None);
        });
        output_transform::<A, IN, OUT>(&m, bias, out, s, grid, rows, chunk);
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

/// `U = G g Gᵀ` for every pair of channels, as `[cout][n²][cin]`: position `ξ`'s matrix is
/// then `[cout, cin]` with rows `n² * cin` apart.
fn weight_transform<'a, A: Algorithm<IN, OUT>, const IN: usize, const OUT: usize>(
    weight: &[f32],
    cout: usize,
    cin: usize,
    buffer: &'a mut Vec<f32>,
) -> &'a [f32] {
    let u = sized(buffer, cout * IN * IN * cin);
    u.par_chunks_mut(IN * IN * cin).enumerate().for_each(|(o, u)| {
        // The 9 taps as rows over the input channels, then G g (n x 3 rows), then (G g) Gᵀ.
        let mut g = vec![0f32; 9 * cin];
        for (c, taps) in weight[o * cin * 9..][..cin * 9].chunks_exact(9).enumerate() {
            for (tap, &value) in taps.iter().enumerate() {
                g[tap * cin + c] = value;
            }
        }
        let tap = |i: usize, j: usize| &g[(i * 3 + j) * cin..][..cin];
        // G g column by column: `gg` holds column j's n rows at rows nj..nj+n.
        let mut gg = vec![0f32; 3 * IN * cin];
        for (j, column) in gg.chunks_exact_mut(IN * cin).enumerate() {
            lanewise(rows_mut(column, cin), [0, 1, 2].map(|i| tap(i, j)), A::filter);
        }
        for (r, u) in u.chunks_exact_mut(IN * cin).enumerate() {
            lanewise(rows_mut(u, cin), [0, 1, 2].map(|j| &gg[(j * IN + r) * cin..][..cin]), A::filter);
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
    let outs = outs.map(|o| &mut o[..n]);
    // Index loops, not `array::map`: whether LLVM inlines `map` here varies from build to
    // build, and a call per lane (`try_map`) made a VAE decode 1.3x slower.
    let mut lane = [0f32; I];
    for i in 0..n {
        for j in 0..I {
            lane[j] = ins[j][i];
        }
        let values = f(lane);
        for j in 0..O {
            outs[j][i] = values[j];
        }
    }
}

/// `V = Bᵀ d B` for the tile rows `rows` (numbered over the batch) and every input channel,
/// into `v` as `[cin][n²][chunk]`, the tiles of each row in turn. `d` is the n x n input block
/// a tile's output reads, 0 in the padding.
fn input_transform<A: Algorithm<IN, OUT>, const IN: usize, const OUT: usize>(
    x: &[f32],
    s: Shape,
    [grid_rows, cols]: [usize; 2],
    rows: Range<usize>,
    chunk: usize,
    v: &mut [f32],
) {
    let [top, left, ..] = s.padding;
    let (h, w) = (s.height, s.width);
    // Input columns under a row of tiles: `m * cols + 2` from `-left`.
    let span = OUT * cols + 2;
    v.par_chunks_mut(IN * IN * chunk).enumerate().for_each(|(c, v)| {
        let mut d = vec![0f32; IN * span];
        let mut bd = vec![0f32; IN * span];
        // A row of `Bᵀ d` by phase: `phases[p * (cols + 1) + t]` is its column `m t + p`.
        let mut phases = vec![0f32; OUT * (cols + 1)];
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
            // Bᵀ d over whole rows, then each tile's row times B: column j of tile t is the
            // row's column m t + j, i.e. phase j mod m at t + j div m.
            lanewise(rows_mut(&mut bd, span), std::array::from_fn(|r| &d[r * span..][..span]), A::data);
            for (bd, v) in bd.chunks_exact(span).zip(v.chunks_exact_mut(IN * chunk)) {
                for (k, &value) in bd.iter().enumerate() {
                    phases[(k % OUT) * (cols + 1) + k / OUT] = value;
                }
                let ins = std::array::from_fn(|j| &phases[(j % OUT) * (cols + 1) + j / OUT..][..cols]);
                let outs = rows_mut(v, chunk).map(|v| &mut v[i * cols..][..cols]);
                lanewise(outs, ins, A::data);
            }
        }
    });
}

/// `Y = Aᵀ M A` plus the bias for the tile rows `rows`, into the output planes (`out` as
/// `[batch, cout, ho, wo]`); a tile's pixels beyond the output's edge are dropped.
fn output_transform<A: Algorithm<IN, OUT>, const IN: usize, const OUT: usize>(
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
            // Aᵀ M column by column (`am` holds column k's m rows at rows mk..mk+m), then each
            // row times A (`y` holds output row r's m columns at rows mr..mr+m).
            for (k, am) in am.chunks_exact_mut(OUT * cols).enumerate() {
                lanewise(rows_mut(am, cols), std::array::from_fn(|r| m(r * IN + k)), A::inverse);
            }
            for (r, y) in y.chunks_exact_mut(OUT * cols).enumerate() {
                let ins = std::array::from_fn(|k| &am[(k * OUT + r) * cols..][..cols]);
                lanewise(rows_mut(y, cols), ins, A::inverse);
            }
            for r in 0..OUT {
                let Some(dst) = out.chunks_exact_mut(wo).nth(ty * OUT + r) else { break };
                for (t, pixels) in dst.chunks_mut(OUT).enumerate() {
                    for (e, pixel) in pixels.iter_mut().enumerate() {
                        *pixel = y[(r * OUT + e) * cols + t] + bias[o];
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

    /// Against the definition in f64, with the tiles taken `chunk` at a time, by both
    /// algorithms.
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
        let want = reference(&x, &w, &bias, s);
        for tile in [Tile::F2, Tile::F4] {
            let mut got = vec![f32::NAN; want.len()];
            by(tile, &x, &w, &bias, &mut got, s, chunk);
            let err = max_difference(&got, &want);
            eprintln!("{tile} {s:?}: max error {err:.2e}");
            assert!(err <= 1e-5, "{tile} {s:?} in chunks of {chunk} tiles: max error {err}");
        }
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
