//! Matrix products through the `gemm` crate (the one burn-flex uses), on strided views, so
//! the kernels can multiply a head's columns or a tile in place without copying them out.

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
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().add(dst_offset),
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
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
