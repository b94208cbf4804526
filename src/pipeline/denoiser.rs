//! The UNet as a k-diffusion denoiser with classifier-free guidance
//! (A1111's `CFGDenoiser` over a `CompVisDenoiser`).

use burn::module::Module;
use burn::tensor::Tensor;

use crate::model::graph::{self, Graph};
use crate::model::layers::{to_device, to_host};
use crate::model::unet::Unet;
use crate::sampling::EpsModel;
use crate::text::schedule::entry_at;

/// Conditionings in force until a UNet call (A1111's prompt-editing schedule): entry i
/// holds until call `end_at_step`; the last one to the end.
pub type CondSchedule = Vec<(usize, Tensor<3>)>;

pub struct CfgDenoiser<'a> {
    unet: &'a Unet,
    /// `[B, S, D]` per schedule entry (each `[1, S, D]` repeated per image).
    cond: CondSchedule,
    uncond: CondSchedule,
    cfg_scale: f32,
    /// Latent shape `[B, 4, h, w]`.
    shape: [usize; 4],
    /// Extra UNet input channels of an inpainting model (`[B, 5, h, w]`: mask and
    /// masked-image latent), concatenated after the latent.
    image_cond: Option<Tensor<4>>,
    /// `[uncond; cond]` for the schedule entries last used, built when they change.
    batched: Option<(Entries, Tensor<3>)>,
    /// The call as a recorded graph of kernels, on a GPU.
    recording: Recording,
    /// What of the UNet decides a call's kernels besides the inputs' shapes: its dtype and
    /// parameter count (training's adapters add products).
    unet_shapes: String,
    /// UNet evaluations so far: A1111 advances the prompt schedule per call.
    pub calls: usize,
    /// Calls answered by replaying the recorded graph.
    replays: usize,
}

/// The prompt's and the negative prompt's schedule entries in force for a call.
type Entries = (usize, usize);

/// On a GPU the guided call is recorded as a graph of kernels (`model::graph`) as soon as the
/// UNet has run a call of its shapes kernel by kernel (which compiles and tunes the kernels, as
/// a recording cannot): at the second call of a process's first image, at the first of a
/// later image of the same size and prompt lengths. It is replayed until the schedule entries
/// change (prompt editing), and recorded again for the new ones.
enum Recording {
    /// Every call runs kernel by kernel: on the CPU, with `SDW_GRAPHS=off`, or after a
    /// recording failed.
    Off,
    /// Nothing recorded for the entries of the call to come.
    Pending,
    Ready(Box<Replay>),
}

/// A recorded call: the graph, the inputs it reads (overwritten per call) and its output. The
/// context it read is `batched` (or the schedules), kept while the entries stay.
struct Replay {
    entries: Entries,
    x: Tensor<4>,
    t: Tensor<2>,
    out: Tensor<4>,
    graph: Graph,
}

impl<'a> CfgDenoiser<'a> {
    /// `cond` / `uncond` are the prompt's and negative prompt's schedules of `[1, S, D]`
    /// conditionings.
    pub fn scheduled(
        unet: &'a Unet,
        cond: CondSchedule,
        uncond: CondSchedule,
        cfg_scale: f32,
        shape: [usize; 4],
    ) -> Self {
        let b = shape[0];
        let recording = if graph::enabled(&cond[0].1.device()) { Recording::Pending } else { Recording::Off };
        let unet_shapes = format!("{:?} {}", unet.activations(), unet.num_params());
        let per_image = |s: CondSchedule| s.into_iter().map(|(end, c)| (end, c.repeat_dim(0, b))).collect();
        Self {
            unet,
            cond: per_image(cond),
            uncond: per_image(uncond),
            cfg_scale,
            shape,
            image_cond: None,
            batched: None,
            recording,
            unet_shapes,
            calls: 0,
            replays: 0,
        }
    }

    pub fn with_image_cond(mut self, image_cond: Tensor<4>) -> Self {
        self.image_cond = Some(image_cond);
        self
    }

    /// Every call run kernel by kernel, never recorded (what replays are checked against).
    pub fn kernel_by_kernel(mut self) -> Self {
        self.recording = Recording::Off;
        self
    }

    /// Guided noise prediction `eps_u + cfg * (eps_c - eps_u)` at float timestep `t`.
    pub fn eps(&mut self, x: &[f32], t: f32) -> Vec<f32> {
        let at = |s: &CondSchedule| entry_at(s.iter().map(|(end, _)| *end), self.calls);
        let entries = (at(&self.cond), at(&self.uncond));
        self.calls += 1;
        let t = self.unet.timestep_values(&vec![t; 2 * self.shape[0]]);
        if let Some(eps) = self.replay(entries, x, &t) {
            return eps;
        }
        let shapes = self.pending(entries);
        self.context(entries);
        let inputs = self.inputs(x.to_vec(), t);
        let Some(shapes) = shapes else { return to_host(self.guided(inputs, entries)).data };
        if self.unet.warmed().contains(&shapes) {
            return self.record(entries, inputs);
        }
        let eps = to_host(self.guided(inputs, entries)).data;
        self.unet.warmed().insert(shapes);
        eps
    }

    /// The recorded call's result for latents `x` and timestep embedding `t`, where the call
    /// was recorded with these entries.
    fn replay(&mut self, entries: Entries, x: &[f32], t: &[f32]) -> Option<Vec<f32>> {
        let Recording::Ready(r) = &mut self.recording else { return None };
        if r.entries != entries {
            return None;
        }
        r.x = graph::overwrite(r.x.clone(), x);
        r.t = graph::overwrite(r.t.clone(), t);
        // SAFETY: the recording read the weights (`unet`, borrowed for the denoiser's life),
        // `image_cond`, the context of these entries (kept until they change, which drops the
        // recording first: `pending`) and `r`'s inputs; all on this thread.
        match unsafe { r.graph.replay() } {
            Ok(()) => {
                self.replays += 1;
                Some(to_host(r.out.clone()).data)
            }
            Err(e) => {
                self.stop_recording(&e);
                None
            }
        }
    }

    /// For a call with `entries` that is not replayed, where calls are recorded: the shapes
    /// that decide its kernels, which the UNet has run kernel by kernel before if it is to be
    /// recorded now ([`graph::Warmed`]). A recording for other entries goes here, before their
    /// context does (`context`).
    fn pending(&mut self, (ci, ui): Entries) -> Option<String> {
        if matches!(self.recording, Recording::Off) {
            return None;
        }
        self.recording = Recording::Pending;
        let image_cond = self.image_cond.as_ref().map(|t| t.dims());
        let (cond, uncond) = (self.cond[ci].1.dims(), self.uncond[ui].1.dims());
        Some(format!("{:?} {image_cond:?} {cond:?} {uncond:?} {}", self.shape, self.unet_shapes))
    }

    /// How many calls replayed the recorded graph.
    pub fn replays(&self) -> usize {
        self.replays
    }

    /// Runs the call once more kernel by kernel (its result is this call's), then records it.
    fn record(&mut self, entries: Entries, (x, t): (Tensor<4>, Tensor<2>)) -> Vec<f32> {
        let device = x.device();
        let call = || self.guided((x.clone(), t.clone()), entries);
        let (eps, recorded) = graph::run_then_record(&device, call, |out| to_host(out).data);
        match recorded {
            Ok((graph, out)) => self.recording = Recording::Ready(Box::new(Replay { entries, x, t, out, graph })),
            Err(e) => self.stop_recording(&e),
        }
        eps
    }

    fn stop_recording(&mut self, why: &str) {
        eprintln!("note: steps run kernel by kernel: recording them as a graph failed ({why})");
        self.recording = Recording::Off;
    }

    /// The latents and the timesteps' embedding on the device.
    fn inputs(&self, x: Vec<f32>, t: Vec<f32>) -> (Tensor<4>, Tensor<2>) {
        let device = self.cond[0].1.device();
        let dim = self.unet.config().block_out_channels[0];
        let rows = t.len() / dim;
        (to_device(x, self.shape, &device), to_device(t, [rows, dim], &device))
    }

    /// Builds `batched` for `entries` where both prompts are as long.
    fn context(&mut self, (ci, ui): Entries) {
        let (cond, uncond) = (&self.cond[ci].1, &self.uncond[ui].1);
        if cond.dims()[1] == uncond.dims()[1] && self.batched.as_ref().is_none_or(|(key, _)| *key != (ci, ui)) {
            self.batched = Some(((ci, ui), Tensor::cat(vec![uncond.clone(), cond.clone()], 0)));
        }
    }

    /// The guided prediction for latents `x` at timestep embedding `t` (`2B` rows); uploads
    /// nothing, so that it can be recorded. [`Self::context`] has run for `entries`.
    fn guided(&self, (x, t): (Tensor<4>, Tensor<2>), (ci, ui): Entries) -> Tensor<4> {
        let (cond, uncond) = (&self.cond[ci].1, &self.uncond[ui].1);
        let b = self.shape[0];
        let x = match &self.image_cond {
            Some(ic) => Tensor::cat(vec![x, ic.clone()], 1),
            None => x,
        };
        let unet =
            |x: Tensor<4>, t: Tensor<2>, context: &Tensor<3>| self.unet.forward_embedded(x, t, context, &mut |_, _| {});
        // One UNet batch for both halves when the prompts are as long, as A1111 does.
        let (e_u, e_c) = match &self.batched {
            Some((key, ctx)) if *key == (ci, ui) => {
                let mut halves = unet(Tensor::cat(vec![x.clone(), x], 0), t, ctx).split(b, 0);
                let e_c = halves.pop().unwrap();
                (halves.pop().unwrap(), e_c)
            }
            _ => (unet(x.clone(), t.clone().narrow(0, 0, b), uncond), unet(x, t.narrow(0, b, b), cond)),
        };
        e_u.clone() + (e_c - e_u).mul_scalar(self.cfg_scale)
    }
}

impl EpsModel for CfgDenoiser<'_> {
    fn eps(&mut self, x: &[f32], t: f32) -> Vec<f32> {
        CfgDenoiser::eps(self, x, t)
    }
}
