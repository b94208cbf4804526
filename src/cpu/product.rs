//! Matrix products through the `gemm` crate (the one burn-flex uses), on strided views, so
//! the kernels can multiply a head's columns or a tile in place without copying them out;
//! and burn's matmul on f32 tensors ([`matmul`]) into an output nothing writes before the
//! product.

use burn::tensor::DType;
use burn_flex::FlexTensor;
use rayon::prelude::*;

/// An f32 matrix inside a larger buffer: element `(r, c)` is at `data[offset + r * row_stride
/// + c * col_stride]`.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> View<'a> {
    /// The row-major matrix `[rows, cols]` at the start of `data`.
    pub fn dense(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self { data, offset: 0, rows, cols, row_stride: cols, col_stride: 1 }
    }

    /// Rows `offset / row_stride ..` of a row-major buffer `row_stride` wide, `cols` columns
    /// from column `offset % row_stride`.
    pub fn within(data: &'a [f32], offset: usize, [rows, cols]: [usize; 2], row_stride: usize) -> Self {
        Self { data, offset, rows, cols, row_stride, col_stride: 1 }
    }

    /// The transpose, without moving anything.
    pub fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }

    /// Whether every element lies inside `data`.
    fn fits(&self, len: usize) -> bool {
        self.rows == 0
            || self.cols == 0
            || self.offset + (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride < len
    }
}

/// Whether the product uses all cores itself or leaves them to the caller's tasks.
pub use gemm::Parallelism;

/// `dst = scale * lhs @ rhs`, where `dst` is a row-major `[lhs.rows, rhs.cols]` matrix
/// `dst_row_stride` wide, from `dst_offset`.
pub fn product(
    dst: &mut [f32],
    dst_offset: usize,
    dst_row_stride: usize,
    [lhs, rhs]: [View; 2],
    scale: f32,
    parallelism: Parallelism,
) {
    let (m, n, k) = (lhs.rows, rhs.cols, lhs.cols);
    assert_eq!(rhs.rows, k, "inner dimensions differ");
    let out = View::within(dst, dst_offset, [m, n], dst_row_stride);
    assert!(lhs.fits(lhs.data.len()) && rhs.fits(rhs.data.len()) && out.fits(dst.len()), "a view outside its buffer");
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the asserts above keep every element of the three views inside its slice, and
    // `dst` is borrowed mutably, so it overlaps neither operand.
    unsafe { write_product(dst.as_mut_ptr().add(dst_offset), dst_row_stride, [lhs, rhs], scale, parallelism) }
}

/// `dst = scale * lhs @ rhs` through `gemm`, `dst` row-major, its rows `dst_row_stride` apart.
///
/// # Safety
/// `lhs` and `rhs` lie inside their slices ([`View::fits`]), and `dst` points to `lhs.rows`
/// rows of `rhs.cols` writable floats that neither operand overlaps. `gemm` writes every one of
/// them and reads none (`read_dst` is false; with K = 0 it writes zeros), so they need not be
/// initialized.
unsafe fn write_product(
    dst: *mut f32,
    dst_row_stride: usize,
    [lhs, rhs]: [View; 2],
    scale: f32,
    parallelism: Parallelism,
) {
    unsafe {
        gemm::gemm(
            lhs.rows,
            rhs.cols,
            lhs.cols,
            dst,
            1,
            dst_row_stride as isize,
            false,
            lhs.data.as_ptr().add(lhs.offset),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr().add(rhs.offset),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            0.0,
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// `scale · lhs · rhs` for f32 tensors of one rank `[.., M, K]` and `[.., K, N]`, the batch
/// dims broadcast, read through their strides: burn's matmul, but writing into a buffer the
/// product is the first to write. burn-flex's zeroes its output, then copies it whole into
/// an aligned allocation (`FlexTensor::empty`): 7-8 % of a LoRA step at 512x512 on 2 cores,
/// on one core. `None` where it does not apply (another dtype, a reversed stride, batch
/// dims that do not broadcast).
pub fn matmul(lhs: &FlexTensor, rhs: &FlexTensor, scale: f32) -> Option<FlexTensor> {
    let (ls, rs) = (lhs.layout(), rhs.layout());
    let rank = ls.shape().num_dims();
    let strides = |s: &[isize]| s.iter().map(|&x| usize::try_from(x).ok()).collect::<Option<Vec<_>>>();
    let (Some(lst), Some(rst)) = (strides(ls.strides()), strides(rs.strides())) else { return None };
    if lhs.dtype() != DType::F32 || rhs.dtype() != DType::F32 || rank < 2 || rs.shape().num_dims() != rank {
        return None;
    }
    let (l, r) = (ls.shape(), rs.shape());
    let (m, k, n) = (l[rank - 2], l[rank - 1], r[rank - 1]);
    if r[rank - 2] != k {
        return None;
    }
    // Each batch dim: its size, and each operand's stride there (0 where it broadcasts).
    let mut batch = Vec::with_capacity(rank - 2);
    for i in 0..rank - 2 {
        let size = l[i].max(r[i]);
        if l[i] != size && l[i] != 1 || r[i] != size && r[i] != 1 {
            return None;
        }
        batch.push((size, if l[i] == 1 { 0 } else { lst[i] }, if r[i] == 1 { 0 } else { rst[i] }));
    }
    let items: usize = batch.iter().map(|b| b.0).product();
    let (ldata, rdata) = (lhs.storage::<f32>(), rhs.storage::<f32>());
    let view = |data, offset, rows, cols, st: &[usize]| View {
        data,
        offset,
        rows,
        cols,
        row_stride: st[rank - 2],
        col_stride: st[rank - 1],
    };
    // Item `z`'s operands, batch index in row-major order over `batch`.
    let operands = |mut z: usize| {
        let (mut lo, mut ro) = (ls.start_offset(), rs.start_offset());
        for &(size, lstride, rstride) in batch.iter().rev() {
            lo += z % size * lstride;
            ro += z % size * rstride;
            z /= size;
        }
        [view(ldata, lo, m, k, &lst), view(rdata, ro, k, n, &rst)]
    };
    // Every view lies inside its buffer (the last item reaches furthest: strides are not
    // negative), so the products below read nothing outside them.
    let [last_l, last_r] = operands(items.saturating_sub(1));
    assert!(last_l.fits(ldata.len()) && last_r.fits(rdata.len()), "a tensor's view outside its buffer");

    let size = m * n;
    let mut out = Vec::<f32>::with_capacity(items * size);
    let write = |z: usize, dst: *mut f32, parallelism: Parallelism| {
        // SAFETY: item `z`'s operands lie inside their buffers (checked above for the
        // furthest item), and `dst` is its `m x n` block of `out`'s capacity, which no other
        // item writes.
        unsafe { write_product(dst, n, operands(z), scale, parallelism) }
    };
    let base = out.as_mut_ptr() as usize;
    let at = |z: usize| (base as *mut f32).wrapping_add(z * size);
    // Big products use every core themselves; several small ones take a core each.
    if m * n * k >= PARALLEL_WORK {
        (0..items).for_each(|z| write(z, at(z), Parallelism::Rayon(0)));
    } else {
        (0..items).into_par_iter().for_each(|z| write(z, at(z), Parallelism::None));
    }
    // SAFETY: every item's block of the first `items * size` elements is written above.
    unsafe { out.set_len(items * size) };
    let mut shape: Vec<usize> = batch.iter().map(|b| b.0).collect();
    shape.extend([m, n]);
    Some(super::f32_tensor(out, shape))
}

/// Work (M·N·K) from which one product is worth all the cores: burn-flex's bound.
const PARALLEL_WORK: usize = 192 * 192 * 192;

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::backend::ops::FloatTensorOps;
    use burn::tensor::TensorData;

    use super::*;

    fn tensor(shape: &[usize], seed: u32) -> FlexTensor {
        let n = shape.iter().product();
        FlexTensor::from_data(TensorData::new(super::super::noise(n, seed, 1.0), shape.to_vec()))
    }

    #[test]
    fn matmul_matches_burns() {
        // (lhs, rhs, scale): one small product, one big enough for every core, batch dims
        // broadcast both ways, a transposed operand, a narrowed one (an offset into its
        // buffer), attention's heads read in place, a scale.
        let heads = tensor(&[2, 16, 4, 8], 7).transpose(1, 2);
        let cases = [
            (tensor(&[37, 50], 1), tensor(&[50, 29], 2), 1.0),
            (tensor(&[300, 256], 1), tensor(&[256, 200], 2), 1.0),
            (tensor(&[2, 3, 17, 40], 3), tensor(&[1, 3, 40, 23], 4), 1.0),
            (tensor(&[1, 17, 40], 3), tensor(&[4, 40, 23], 4), 1.0),
            (tensor(&[3, 17, 40], 5), tensor(&[3, 23, 40], 6).transpose(1, 2), 1.0),
            (tensor(&[3, 30, 40], 5).narrow(1, 5, 17), tensor(&[3, 40, 23], 6), 1.0),
            (heads.clone(), heads.transpose(2, 3), 0.125),
        ];
        for (i, (lhs, rhs, scale)) in cases.into_iter().enumerate() {
            let want = Flex::float_matmul(Flex::float_mul_scalar(lhs.clone(), scale.into()), rhs.clone());
            let got = matmul(&lhs, &rhs, scale).expect("f32 operands");
            assert_eq!(got.layout().shape(), want.layout().shape(), "case {i}");
            let want = want.to_contiguous();
            let err = super::super::max_difference(got.as_slice().unwrap(), want.as_slice().unwrap());
            assert!(err <= 1e-5, "case {i}: {err}");
        }
    }

    #[test]
    fn matmul_declines_what_it_does_not_take() {
        let (a, b) = (tensor(&[4, 5], 1), tensor(&[5, 3], 2));
        assert!(matmul(&Flex::float_cast(a.clone(), burn::tensor::FloatDType::F16), &b, 1.0).is_none());
        assert!(matmul(&a, &tensor(&[2, 5, 3], 2), 1.0).is_none(), "ranks differ");
        assert!(matmul(&tensor(&[2, 4, 5], 1), &tensor(&[3, 5, 3], 2), 1.0).is_none(), "batch 2 against 3");
    }

    #[test]
    fn multiplies_strided_views() {
        // Columns 1..3 of a 3-wide buffer times the transpose of the same, into column 1 of a
        // 3-wide output: [[1,2],[4,5]] @ [[1,4],[2,5]] = [[5,14],[14,41]].
        let a = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
        let view = View::within(&a, 1, [2, 2], 3);
        let mut out = [0.0; 6];
        product(&mut out, 1, 3, [view, view.t()], 1.0, Parallelism::None);
        assert_eq!(out, [0.0, 5.0, 14.0, 0.0, 14.0, 41.0]);
    }

    #[test]
    #[should_panic(expected = "outside its buffer")]
    fn refuses_a_view_outside_its_buffer() {
        let a = [1.0; 4];
        let mut out = [0.0; 4];
        product(&mut out, 0, 2, [View::dense(&a, 2, 2), View::within(&a, 1, [2, 2], 2)], 1.0, Parallelism::None);
    }
}
