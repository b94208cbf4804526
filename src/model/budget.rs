//! How large one op's temporary tensors may be on the device: attention's score tensor where
//! burn computes it naively, a GPU convolution's im2col columns, Winograd's transforms. A
//! single storage binding is capped (128 MiB on lavapipe and many iGPUs, where SD 1.5
//! self-attention at 64x64 latents would need 512 MiB of scores per image), and every
//! temporary adds to the GPU memory a step or a decode peaks at, so ops split what they
//! build (query chunks, bands of output rows) into parts of at most [`Budget::part`]. What an
//! op must build whole (Winograd's weights' transform) may take up to [`Budget::whole`].

use std::sync::atomic::{AtomicUsize, Ordering};

/// The CPU's, whose buffers are unbounded: a few bands keep its caches and cores busy.
const CPU: usize = 64 << 20;

/// The most one part may take on a GPU. An f16 VAE decode at 512x512 peaks in its last
/// block, where a 128 MiB input, its group norm and the convolution's output live beside
/// Winograd's transforms of a band: with parts of 64 MiB the allocator held four 128 MiB
/// pages for them, with 32 MiB three (lavapipe, `BENCHMARKS.md`; 16 MiB saved nothing more).
/// A part of 32 MiB is still millions of products for a large GPU. `SDW_BAND_MIB`
/// overrides it, to measure the difference.
const GPU_PART: usize = 32 << 20;

/// Bytes a part may take.
static PART: AtomicUsize = AtomicUsize::new(CPU);
/// Bytes a temporary built whole may take.
static WHOLE: AtomicUsize = AtomicUsize::new(CPU);

/// Fits the budget to a device whose largest binding is `max_binding` bytes: a whole
/// temporary half of it (leaving room for the op's other operands), at most 256 MiB; a part
/// at most [`GPU_PART`]. `None` (the CPU) keeps the defaults.
pub fn fit(max_binding: Option<usize>) {
    if let Some(binding) = max_binding {
        let band_mib = std::env::var("SDW_BAND_MIB").ok().and_then(|m| m.parse().ok());
        let budget = on_gpu(binding, band_mib);
        WHOLE.store(budget.whole, Ordering::Relaxed);
        PART.store(budget.part, Ordering::Relaxed);
    }
}

/// The budget of a GPU whose largest binding is `binding` bytes, with parts of `band_mib` MiB
/// where given.
fn on_gpu(binding: usize, band_mib: Option<usize>) -> Budget {
    let whole = (binding / 2).clamp(1 << 20, 256 << 20);
    let part = band_mib.map_or(GPU_PART, |m| m << 20).clamp(1 << 20, whole);
    Budget { part, whole }
}

/// The bytes one op's temporaries may take on the current device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// One part of a temporary built in parts (a chunk of scores, a band of columns).
    pub part: usize,
    /// A temporary built whole (Winograd's weights' transform).
    pub whole: usize,
}

/// The budget [`fit`] set (the CPU's where it never ran).
pub fn current() -> Budget {
    Budget { part: PART.load(Ordering::Relaxed), whole: WHOLE.load(Ordering::Relaxed) }
}

#[cfg(test)]
mod tests {
    use super::{Budget, on_gpu};

    const MIB: usize = 1 << 20;

    fn mib(part: usize, whole: usize) -> Budget {
        Budget { part: part * MIB, whole: whole * MIB }
    }

    #[test]
    fn parts_stay_within_a_binding_and_the_gpu_part() {
        // lavapipe binds 128 MiB: whole temporaries up to half of it.
        assert_eq!(on_gpu(128 * MIB, None), mib(32, 64));
        assert_eq!(on_gpu(32 * MIB, None), mib(16, 16));
        // A large GPU: whole temporaries up to 256 MiB, parts of 32 MiB unless asked otherwise.
        assert_eq!(on_gpu(4096 * MIB, None), mib(32, 256));
        assert_eq!(on_gpu(4096 * MIB, Some(256)), mib(256, 256));
        // A part never exceeds half a binding, nor falls under 1 MiB.
        assert_eq!(on_gpu(128 * MIB, Some(256)), mib(64, 64));
        assert_eq!(on_gpu(4096 * MIB, Some(0)), mib(1, 256));
    }
}
