//! The UNet as a k-diffusion denoiser with classifier-free guidance
//! (A1111's `CFGDenoiser` over a `CompVisDenoiser`).

use burn::tensor::Tensor;

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
    batched: Option<((usize, usize), Tensor<3>)>,
    /// UNet evaluations so far: A1111 advances the prompt schedule per call.
    pub calls: usize,
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
        let per_image = |s: CondSchedule| s.into_iter().map(|(end, c)| (end, c.repeat_dim(0, b))).collect();
        Self {
            unet,
            cond: per_image(cond),
            uncond: per_image(uncond),
            cfg_scale,
            shape,
            image_cond: None,
            batched: None,
            calls: 0,
        }
    }

    pub fn with_image_cond(mut self, image_cond: Tensor<4>) -> Self {
        self.image_cond = Some(image_cond);
        self
    }

    /// Guided noise prediction `eps_u + cfg * (eps_c - eps_u)` at float timestep `t`.
    pub fn eps(&mut self, x: &[f32], t: f32) -> Vec<f32> {
        let at = |s: &CondSchedule| entry_at(s.iter().map(|(end, _)| *end), self.calls);
        let (ci, ui) = (at(&self.cond), at(&self.uncond));
        let (cond, uncond) = (&self.cond[ci].1, &self.uncond[ui].1);
        self.calls += 1;
        let [b, c, h, w] = self.shape;
        let mut x = to_device(x.to_vec(), [b, c, h, w], &cond.device());
        if let Some(ic) = &self.image_cond {
            x = Tensor::cat(vec![x, ic.clone()], 1);
        }
        // One UNet batch for both halves when the prompts are as long, as A1111 does.
        let (e_u, e_c) = if cond.dims()[1] == uncond.dims()[1] {
            if self.batched.as_ref().is_none_or(|(key, _)| *key != (ci, ui)) {
                self.batched = Some(((ci, ui), Tensor::cat(vec![uncond.clone(), cond.clone()], 0)));
            }
            let ctx = &self.batched.as_ref().expect("just built").1;
            let e = self.unet.forward(Tensor::cat(vec![x.clone(), x], 0), &vec![t; 2 * b], ctx);
            let mut halves = e.split(b, 0);
            let e_c = halves.pop().unwrap();
            (halves.pop().unwrap(), e_c)
        } else {
            (self.unet.forward(x.clone(), &vec![t; b], uncond), self.unet.forward(x, &vec![t; b], cond))
        };
        let guided = e_u.clone() + (e_c - e_u).mul_scalar(self.cfg_scale);
        to_host(guided).data
    }
}

impl EpsModel for CfgDenoiser<'_> {
    fn eps(&mut self, x: &[f32], t: f32) -> Vec<f32> {
        CfgDenoiser::eps(self, x, t)
    }
}
