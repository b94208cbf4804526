//! The largest temporary tensor one op may build on the device: attention's score tensor
//! where burn computes it naively, and a GPU convolution's im2col columns. Both are split
//! (query chunks, bands of output rows) to stay within it, because a single storage binding
//! is capped: 128 MiB on lavapipe and many iGPUs, where SD 1.5 self-attention at 64x64
//! latents would need 512 MiB of scores per image.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes; the CPU, whose buffers are unbounded, keeps this default.
static BUDGET: AtomicUsize = AtomicUsize::new(64 << 20);

/// Fits the budget to a device whose largest binding is `max_binding` bytes: half of it
/// (leaving room for the op's other operands), at most 256 MiB. `None` (the CPU) keeps it.
pub fn fit(max_binding: Option<usize>) {
    if let Some(binding) = max_binding {
        BUDGET.store((binding / 2).clamp(1 << 20, 256 << 20), Ordering::Relaxed);
    }
}

/// The budget in bytes.
pub fn bytes() -> usize {
    BUDGET.load(Ordering::Relaxed)
}
