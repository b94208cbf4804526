//! Training steps recorded as a graph of kernels and replayed, on a GPU (`model::graph`): a
//! LoRA step is thousands of kernels (forward, backward and one AdamW kernel per factor), each
//! of which otherwise costs its launch through autodiff, burn's op queue and cubecl.
//!
//! The first step runs kernel by kernel, which compiles and tunes its kernels; the second runs
//! kernel by kernel once more and is then recorded; every later step writes its draws and
//! AdamW's settings over the recorded inputs and replays. That works because a step reads and
//! writes the same buffers every time: the adapters and AdamW's moments are updated in place
//! (`shaders::adamw`), and the conditioning is one tensor for the whole run, or is encoded
//! inside the step from prompt tokens kept on the device (`pipeline::conditioning::PromptTokens`)
//! where the text encoder trains.

use burn::tensor::{Device, Tensor};

use crate::model::adapter::LowRank;
use crate::model::graph::{self, Graph};
use crate::model::layers::to_host;
use crate::shaders::adamw::{self, Settings, Update};

use super::step::{Batch, Draws};

/// What runs the optimiser steps of a run (or of a benchmark).
pub struct Steps {
    device: Device,
    recording: Recording,
    /// Steps answered by replaying the recording.
    pub replays: usize,
}

enum Recording {
    /// Every step runs kernel by kernel: on the CPU, with `SDW_GRAPHS=off`, where AdamW does
    /// not update in place (`SDW_SHADERS=off`), or after a recording failed.
    Off,
    /// No step has run yet: its kernels are neither compiled nor tuned.
    Cold,
    /// The next step runs kernel by kernel and is recorded.
    Warm,
    Ready(Box<Replay>),
}

/// A recorded step: the graph, the inputs it reads (overwritten per step) and its output.
struct Replay {
    graph: Graph,
    batches: Vec<Batch>,
    settings: Settings,
    losses: Tensor<2>,
}

impl Steps {
    /// Steps on `device` that train `adapters`: recorded where AdamW updates their factors in
    /// place (`shaders::adamw::in_kernel`), so that every step's inputs are its draws and
    /// AdamW's settings.
    pub fn for_adapters(device: &Device, adapters: &[(String, &LowRank)]) -> Self {
        let in_place = adapters.first().is_some_and(|(_, a)| adamw::in_kernel(&a.down.val().inner()));
        Self::new(device, in_place && graph::enabled(device))
    }

    /// Steps on `device`, each run kernel by kernel, never recorded (what replayed steps are
    /// checked against).
    pub fn kernel_by_kernel(device: &Device) -> Self {
        Self::new(device, false)
    }

    fn new(device: &Device, recorded: bool) -> Self {
        let recording = if recorded { Recording::Cold } else { Recording::Off };
        Self { device: device.clone(), recording, replays: 0 }
    }

    /// Whether steps are recorded and replayed.
    pub fn recording(&self) -> bool {
        !matches!(self.recording, Recording::Off)
    }

    /// Whether the next step replays the recording (its kernels, and its memory, are the
    /// recorded step's).
    pub fn replays_next(&self) -> bool {
        matches!(self.recording, Recording::Ready(_))
    }

    /// One optimiser step on the micro-batches `draws` (with `instances` instance images each):
    /// `step` computes it from their tensors and AdamW's settings for `update`
    /// ([`super::step::optimiser_step`]). Returns each micro-batch's instance and prior losses.
    pub fn run(
        &mut self,
        draws: &[Draws],
        instances: usize,
        update: Update,
        step: &mut dyn FnMut(&[Batch], &Settings) -> Tensor<2>,
    ) -> Vec<[f32; 2]> {
        if let Some(losses) = self.replay(draws, update) {
            return losses;
        }
        let device = self.device.clone();
        let batches: Vec<Batch> = draws.iter().map(|d| Batch::upload(d, instances, &device)).collect();
        let settings = Settings::new(update, &device);
        match self.recording {
            Recording::Warm => {
                let (losses, recorded) = graph::run_then_record(&device, || step(&batches, &settings), read);
                match recorded {
                    Ok((graph, losses)) => {
                        self.recording = Recording::Ready(Box::new(Replay { graph, batches, settings, losses }))
                    }
                    Err(e) => self.stop_recording(&e),
                }
                losses
            }
            Recording::Cold => {
                self.recording = Recording::Warm;
                read(step(&batches, &settings))
            }
            _ => read(step(&batches, &settings)),
        }
    }

    /// The recorded step on `draws`, where there is one.
    fn replay(&mut self, draws: &[Draws], update: Update) -> Option<Vec<[f32; 2]>> {
        let Recording::Ready(r) = &mut self.recording else { return None };
        let batches = std::mem::take(&mut r.batches);
        r.batches = batches.into_iter().zip(draws).map(|(b, d)| b.rewritten(d)).collect();
        r.settings = r.settings.clone().rewritten(update);
        // SAFETY: the recording read the model's weights and adapters, AdamW's moments (all
        // updated in place, so the same buffers), the conditioning or the prompt tokens it is
        // encoded from (the caller's for the run) and `r`'s inputs; all alive and on this thread.
        match unsafe { r.graph.replay() } {
            Ok(()) => {
                self.replays += 1;
                Some(read(r.losses.clone()))
            }
            Err(e) => {
                self.stop_recording(&e);
                None
            }
        }
    }

    /// Drops the recording (and the memory it keeps) until the next step, which records again:
    /// before the model runs anything else, such as validation images.
    pub fn pause(&mut self) {
        if let Recording::Ready(_) = self.recording {
            self.recording = Recording::Warm;
        }
    }

    fn stop_recording(&mut self, why: &str) {
        eprintln!("note: training steps run kernel by kernel: recording them as a graph failed ({why})");
        self.recording = Recording::Off;
    }
}

/// Each micro-batch's losses, from the device.
fn read(losses: Tensor<2>) -> Vec<[f32; 2]> {
    to_host(losses).data.chunks(2).map(|c| [c[0], c[1]]).collect()
}
