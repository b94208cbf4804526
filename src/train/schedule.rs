//! Learning-rate schedules as diffusers' `get_scheduler` defines them.

use std::f64::consts::PI;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LrSchedule {
    Constant,
    Cosine,
    Linear,
}

impl LrSchedule {
    /// Learning rate for optimiser step `step` (0-based): linear warm-up from 0 over
    /// `warmup` steps, then constant, half-cosine to 0, or linear to 0 at `total`.
    pub fn lr(self, base: f64, step: usize, warmup: usize, total: usize) -> f64 {
        if step < warmup {
            return base * step as f64 / warmup.max(1) as f64;
        }
        let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
        match self {
            LrSchedule::Constant => base,
            LrSchedule::Cosine => base * 0.5 * (1.0 + (PI * progress).cos()).max(0.0),
            LrSchedule::Linear => base * (1.0 - progress).max(0.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_diffusers_get_scheduler() {
        // warm-up: 0, 0.25, 0.5, 0.75 of the base over 4 steps
        assert_eq!(LrSchedule::Constant.lr(1.0, 1, 4, 100), 0.25);
        assert_eq!(LrSchedule::Constant.lr(1.0, 50, 4, 100), 1.0);
        assert!((LrSchedule::Cosine.lr(1.0, 52, 4, 100) - 0.5).abs() < 1e-12);
        assert!((LrSchedule::Linear.lr(1.0, 52, 4, 100) - 0.5).abs() < 1e-12);
        assert_eq!(LrSchedule::Linear.lr(1.0, 100, 4, 100), 0.0);
    }
}
