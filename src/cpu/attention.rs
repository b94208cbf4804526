//! Multi-head attention on the CPU, softmax(Q K^T / sqrt(d)) V, for Stable Diffusion's
//! shapes: thousands of pixels as queries and keys, 40-160 wide heads, no mask.
//!
//! Work is split into blocks of query rows, each block on one core: for every head it takes
//! the block's scores against all keys with one matrix product, the softmax of each row, and
//! the block's output with a second product. The block's scores (`rows x keys`, 4 MiB) stay
//! in the cache between the two products, and the softmax is exact (each row's maximum is
//! known before any exponential), unlike flash attention's running maximum.

use multiversion::multiversion;
use rayon::prelude::*;

use super::math::exp_shifted;
use super::product::{Parallelism, View, product};
use super::rows_per_task;

/// The shape of one attention call: `q` is `[batch, queries, width]`, `k` and `v` are
/// `[batch, keys, width]`, and each of `heads` heads reads `width / heads` columns.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub batch: usize,
    pub queries: usize,
    pub keys: usize,
    pub width: usize,
    pub heads: usize,
}

/// Scores per block (4 MiB): they stay in the L3 cache between the two products. Bigger
/// blocks pack each head's keys fewer times: at SD 1.5's 4096 pixels, 1M scores per block
/// took 390 ms for the first self-attention where 128K took 510 ms (2 cores, BENCHMARKS.md).
const BLOCK_SCORES: usize = 1 << 20;

/// Query rows per block: as many as keep the block's scores within [`BLOCK_SCORES`], but
/// few enough to give each thread 4 blocks; at least 16 (the matrix product's efficiency
/// falls off below), at most 512 and all of them.
fn block_rows([batch, queries, keys]: [usize; 3], threads: usize) -> usize {
    let by_cache = BLOCK_SCORES / keys.max(1);
    let by_threads = (batch * queries).div_ceil(4 * threads.max(1));
    by_cache.min(by_threads).clamp(16, 512).min(queries.max(1))
}

/// `out = attention(q, k, v)`, all row-major f32 in the layouts [`Shape`] names.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], s: Shape) {
    assert_eq!(s.width % s.heads, 0, "width {} is not a multiple of {} heads", s.width, s.heads);
    assert_eq!(q.len(), s.batch * s.queries * s.width);
    assert_eq!(k.len(), s.batch * s.keys * s.width);
    assert_eq!(v.len(), k.len());
    assert_eq!(out.len(), q.len());
    if out.is_empty() || s.keys == 0 {
        out.fill(0.0);
        return;
    }
    let rows = block_rows([s.batch, s.queries, s.keys], rayon::current_num_threads());
    // One task per (batch item, block of rows); a block's output rows are contiguous.
    let tasks: Vec<(usize, usize, &mut [f32])> = out
        .chunks_mut(s.queries * s.width)
        .enumerate()
        .flat_map(|(b, item)| item.chunks_mut(rows * s.width).enumerate().map(move |(j, o)| (b, j * rows, o)))
        .collect();
    tasks.into_par_iter().for_each(|(b, first, out_block)| {
        let q_block = &q[(b * s.queries + first) * s.width..][..out_block.len()];
        let item = b * s.keys * s.width..(b + 1) * s.keys * s.width;
        block(q_block, &k[item.clone()], &v[item], out_block, s);
    });
}

/// Attention of `n` query rows (`q`, `out`: `[n, width]`) against one batch item's keys and
/// values (`[keys, width]`), head by head.
fn block(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], s: Shape) {
    let (w, d, keys) = (s.width, s.width / s.heads, s.keys);
    let n = q.len() / w;
    let mut scores = vec![0f32; n * keys];
    let mut sums = vec![0f32; n];
    let scale = 1.0 / (d as f32).sqrt();
    for h in 0..s.heads {
        let cols = h * d;
        // Head h's columns of the queries, keys and values.
        let head = |data, rows| View::within(data, cols, [rows, d], w);
        // scores[n, keys] = Q_h K_h^T / sqrt(d), then each row exponentiated.
        product(&mut scores, 0, keys, [head(q, n), head(k, keys).t()], scale, Parallelism::None);
        for (row, sum) in scores.chunks_exact_mut(keys).zip(sums.iter_mut()) {
            *sum = exp_shifted(row);
        }
        // out_h[n, d] = P V_h, then each row divided by its sum.
        let p = View::dense(&scores, n, keys);
        product(out, cols, w, [p, head(v, keys)], 1.0, Parallelism::None);
        for (row, sum) in out.chunks_exact_mut(w).zip(&sums) {
            let inv = 1.0 / sum;
            row[cols..cols + d].iter_mut().for_each(|x| *x *= inv);
        }
    }
}

/// Training's backward pass over a chunk of scores `[.., n]`, rows on every core: each row of
/// `s` replaced by its softmax.
pub fn softmax_rows(s: &mut [f32], n: usize) {
    s.par_chunks_mut(rows_per_task(n) * n).for_each(|rows| {
        for row in rows.chunks_exact_mut(n) {
            let inv = 1.0 / exp_shifted(row);
            row.iter_mut().for_each(|x| *x *= inv);
        }
    });
}

/// The scores' gradient from the softmax's `p` and its gradient `dp` (replaced by the
/// result): `ds = p ⊙ (dp − rowsum(p ⊙ dp)) · scale`, row by row.
pub fn softmax_grad_rows(p: &[f32], dp: &mut [f32], n: usize, scale: f32) {
    let task = rows_per_task(n) * n;
    p.par_chunks(task).zip(dp.par_chunks_mut(task)).for_each(|(p, dp)| {
        for (p, dp) in p.chunks_exact(n).zip(dp.chunks_exact_mut(n)) {
            scores_grad(p, dp, scale);
        }
    });
}

/// One row of [`softmax_grad_rows`].
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn scores_grad(p: &[f32], dp: &mut [f32], scale: f32) {
    let dot = p.iter().zip(dp.iter()).map(|(a, b)| (a * b) as f64).sum::<f64>() as f32;
    dp.iter_mut().zip(p).for_each(|(d, &p)| *d = p * (*d - dot) * scale);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{max_difference, noise};

    /// softmax(QK^T/sqrt(d))V in f64, one score at a time.
    fn reference(q: &[f32], k: &[f32], v: &[f32], s: Shape) -> Vec<f32> {
        let d = s.width / s.heads;
        let mut out = vec![0f32; q.len()];
        for b in 0..s.batch {
            for h in 0..s.heads {
                for i in 0..s.queries {
                    let qi = &q[(b * s.queries + i) * s.width + h * d..][..d];
                    let scores: Vec<f64> = (0..s.keys)
                        .map(|j| {
                            let kj = &k[(b * s.keys + j) * s.width + h * d..][..d];
                            qi.iter().zip(kj).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() / (d as f64).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                    let total: f64 = e.iter().sum();
                    for c in 0..d {
                        let acc: f64 =
                            (0..s.keys).map(|j| e[j] * v[(b * s.keys + j) * s.width + h * d + c] as f64).sum();
                        out[(b * s.queries + i) * s.width + h * d + c] = (acc / total) as f32;
                    }
                }
            }
        }
        out
    }

    fn check(s: Shape) {
        let q = noise(s.batch * s.queries * s.width, 1, 2.0);
        let k = noise(s.batch * s.keys * s.width, 2, 2.0);
        let v = noise(s.batch * s.keys * s.width, 3, 2.0);
        let mut out = vec![f32::NAN; q.len()];
        attention(&q, &k, &v, &mut out, s);
        let want = reference(&q, &k, &v, s);
        let err = max_difference(&out, &want);
        assert!(err <= 1e-5, "{s:?}: max error {err}");
    }

    #[test]
    fn matches_the_definition_across_blocks_heads_and_batch_items() {
        // 700 queries against 300 keys: several blocks of rows, the last one partial.
        check(Shape { batch: 2, queries: 700, keys: 300, width: 24, heads: 3 });
        // Cross-attention's shape: few keys, many queries.
        check(Shape { batch: 2, queries: 64, keys: 77, width: 32, heads: 8 });
        // One head (the VAE's), one query.
        check(Shape { batch: 1, queries: 1, keys: 5, width: 16, heads: 1 });
    }

    #[test]
    fn block_rows_fit_the_cache_budget() {
        assert_eq!(block_rows([2, 4096, 4096], 2), 256);
        assert_eq!(block_rows([2, 4096, 77], 2), 512);
        assert_eq!(block_rows([2, 1024, 1024], 2), 256);
        assert_eq!(block_rows([2, 4096, 4096], 16), 128);
        assert_eq!(block_rows([1, 10, 4096], 2), 10);
        assert_eq!(block_rows([2, 4096, 1 << 24], 2), 16);
    }
}
