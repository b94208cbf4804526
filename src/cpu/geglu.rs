//! GEGLU's activation on the CPU, `value * gelu(gate)` of a `[rows, 2F]` projection holding
//! value then gate, and its gradient: the flex side of the op `shaders::geglu`. Rows are
//! split over the cores; each row's arithmetic is vectorized (`math`).

use rayon::prelude::*;

use super::{math, rows_per_task};

/// `out[r, j] = h[r, j] * gelu(h[r, F + j])` for `out` of `F = width` columns.
pub fn geglu(h: &[f32], out: &mut [f32], width: usize) {
    assert_eq!(h.len(), 2 * out.len());
    if out.is_empty() {
        return;
    }
    let rows = rows_per_task(width);
    out.par_chunks_mut(rows * width).zip(h.par_chunks(rows * 2 * width)).for_each(|(out, h)| {
        for (out, row) in out.chunks_exact_mut(width).zip(h.chunks_exact(2 * width)) {
            let (value, gate) = row.split_at(width);
            math::gated_gelu(value, gate, out);
        }
    });
}

/// The gradient of [`geglu`]'s input `h` from its output's gradient `grad` (`[rows, F]`), into
/// `dh` (`[rows, 2F]`, value's half then gate's).
pub fn geglu_grad(h: &[f32], grad: &[f32], dh: &mut [f32], width: usize) {
    assert_eq!((h.len(), dh.len()), (2 * grad.len(), 2 * grad.len()));
    if grad.is_empty() {
        return;
    }
    let rows = rows_per_task(width);
    let tasks = dh.par_chunks_mut(rows * 2 * width).zip(h.par_chunks(rows * 2 * width));
    tasks.zip(grad.par_chunks(rows * width)).for_each(|((dh, h), grad)| {
        let rows = dh.chunks_exact_mut(2 * width).zip(h.chunks_exact(2 * width));
        for ((dh, h), grad) in rows.zip(grad.chunks_exact(width)) {
            let ((value, gate), (d_value, d_gate)) = (h.split_at(width), dh.split_at_mut(width));
            math::gated_gelu_grad(value, gate, grad, d_value, d_gate);
        }
    });
}
