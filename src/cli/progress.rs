//! Sampling progress on stderr.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::sampling::Progress;

/// Sampling progress on stderr: step i/N, it/s, ETA. A bar on a terminal, plain
/// lines otherwise (logs, CI).
pub struct StepBar {
    bar: Option<ProgressBar>,
    start: Instant,
    last_done: usize,
    last_at: Instant,
}

impl StepBar {
    pub fn new() -> Self {
        Self { bar: None, start: Instant::now(), last_done: 0, last_at: Instant::now() }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

impl Progress for StepBar {
    fn step(&mut self, done: usize, total: usize) {
        // A new pass (hires fix) counts from where the last one ended.
        if done <= self.last_done {
            self.start = self.last_at;
            if let Some(b) = self.bar.take() {
                b.finish();
            }
        }
        (self.last_done, self.last_at) = (done, Instant::now());
        if !std::io::stderr().is_terminal() {
            let secs = self.start.elapsed().as_secs_f64();
            let rate = done as f64 / secs.max(1e-9);
            let eta = (total - done) as f64 / rate.max(1e-9);
            eprintln!("step {done}/{total}  {rate:.2} it/s  ETA {eta:.0}s");
            return;
        }
        let bar = self.bar.get_or_insert_with(|| {
            let b = ProgressBar::new(total as u64);
            b.set_style(
                ProgressStyle::with_template("sampling {bar:30} {pos}/{len} steps  {per_sec}  ETA {eta}")
                    .expect("valid template"),
            );
            b
        });
        bar.set_position(done as u64);
    }
}
