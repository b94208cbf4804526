//! The UNet as a k-diffusion denoiser with classifier-free guidance
//! (A1111's `CFGDenoiser` over a `CompVisDenoiser`).

use burn::tensor::Tensor;

use crate::model::layers::{to_device, to_host};
use crate::model::unet::Unet;
use crate::sampling::EpsModel;

pub struct CfgDenoiser<'a> {
    pub unet: &'a Unet,
    /// `[1, S, D]` conditioning for the prompt and the negative prompt.
    pub cond: Tensor<3>,
    pub uncond: Tensor<3>,
    pub cfg_scale: f32,
    /// Latent shape `[B, 4, h, w]`.
    pub shape: [usize; 4],
    /// UNet evaluations so far (for progress and benchmarks).
    pub calls: usize,
}

impl CfgDenoiser<'_> {
    /// Guided noise prediction `eps_u + cfg * (eps_c - eps_u)` at float timestep `t`.
    pub fn eps(&mut self, x: &[f32], t: f32) -> Vec<f32> {
        self.calls += 1;
        let [b, c, h, w] = self.shape;
        let device = self.cond.device();
        let x = to_device(x.to_vec(), [b, c, h, w], &device);
        let batch = |ctx: &Tensor<3>, n: usize| ctx.clone().repeat_dim(0, n);
        let (e_u, e_c) = if self.cond.dims()[1] == self.uncond.dims()[1] {
            // One UNet batch for both halves, as A1111 does when the lengths agree.
            let ctx = Tensor::cat(vec![batch(&self.uncond, b), batch(&self.cond, b)], 0);
            let e = self.unet.forward(Tensor::cat(vec![x.clone(), x], 0), &vec![t; 2 * b], &ctx);
            let mut halves = e.split(b, 0);
            let e_c = halves.pop().unwrap();
            (halves.pop().unwrap(), e_c)
        } else {
            let e_u = self.unet.forward(x.clone(), &vec![t; b], &batch(&self.uncond, b));
            let e_c = self.unet.forward(x, &vec![t; b], &batch(&self.cond, b));
            (e_u, e_c)
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
