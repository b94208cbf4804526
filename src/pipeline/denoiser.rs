//! The UNet as a k-diffusion denoiser with classifier-free guidance
//! (A1111's `CFGDenoiser` over a `CompVisDenoiser`).

use burn::tensor::Tensor;

use crate::model::layers::{to_device, to_host};
use crate::model::unet::Unet;
use crate::sampling::EpsModel;

/// The UNet contexts for both CFG halves, built once per generation.
enum Context {
    /// `[uncond; cond]`, each repeated per image: one UNet batch for both halves, as
    /// A1111 does when the prompt and negative prompt have the same length.
    Batched(Tensor<3>),
    /// Different lengths: two UNet calls.
    Separate { uncond: Tensor<3>, cond: Tensor<3> },
}

pub struct CfgDenoiser<'a> {
    unet: &'a Unet,
    context: Context,
    cfg_scale: f32,
    /// Latent shape `[B, 4, h, w]`.
    shape: [usize; 4],
    /// UNet evaluations so far (for progress and benchmarks).
    pub calls: usize,
}

impl<'a> CfgDenoiser<'a> {
    /// `cond` / `uncond` are `[1, S, D]` conditionings of the prompt and negative prompt.
    pub fn new(unet: &'a Unet, cond: Tensor<3>, uncond: Tensor<3>, cfg_scale: f32, shape: [usize; 4]) -> Self {
        let b = shape[0];
        let (cond, uncond) = (cond.repeat_dim(0, b), uncond.repeat_dim(0, b));
        let context = if cond.dims()[1] == uncond.dims()[1] {
            Context::Batched(Tensor::cat(vec![uncond, cond], 0))
        } else {
            Context::Separate { uncond, cond }
        };
        Self { unet, context, cfg_scale, shape, calls: 0 }
    }

    /// Guided noise prediction `eps_u + cfg * (eps_c - eps_u)` at float timestep `t`.
    pub fn eps(&mut self, x: &[f32], t: f32) -> Vec<f32> {
        self.calls += 1;
        let [b, c, h, w] = self.shape;
        let (e_u, e_c) = match &self.context {
            Context::Batched(ctx) => {
                let x = to_device(x.to_vec(), [b, c, h, w], &ctx.device());
                let e = self.unet.forward(Tensor::cat(vec![x.clone(), x], 0), &vec![t; 2 * b], ctx);
                let mut halves = e.split(b, 0);
                let e_c = halves.pop().unwrap();
                (halves.pop().unwrap(), e_c)
            }
            Context::Separate { uncond, cond } => {
                let x = to_device(x.to_vec(), [b, c, h, w], &cond.device());
                (self.unet.forward(x.clone(), &vec![t; b], uncond), self.unet.forward(x, &vec![t; b], cond))
            }
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
