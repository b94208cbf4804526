//! `sdw doctor`: does this device compute what the CPU computes?
//!
//! Each op family sdw uses runs at SD 1.5 widths on the device and on the CPU backend from
//! the same seeded inputs, then a whole tiny random-weight CLIP, UNet and VAE do the same.
//! No model file is needed, so anyone on a GPU we never tested can run it and send us the
//! lines. The bounds are the fixtures' fp32 bounds: `||device - cpu|| / ||cpu||` below 1e-4
//! for a single op or module.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, LayerNormConfig, PaddingConfig2d};
use burn::tensor::activation::silu;
use burn::tensor::module::conv2d as conv2d_fn;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Tensor, TensorData};
use rand::{SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, Normal};

use crate::device::{Compute, Dtypes};
use crate::model::attention::attention;
use crate::model::attention_tuned;
use crate::model::conv::{conv, normalized_conv_add, upsampled_conv};
use crate::model::layers::{geglu, gelu, layer_norm, to_host, upsample_nearest_2x, upsample_nearest_to};
use crate::model::unet::Trace;
use crate::pipeline::StableDiffusion;
use crate::pipeline::denoiser::CfgDenoiser;
use crate::shaders::matmul::Kernel;
use crate::shaders::softmax::of_last_dim;
use crate::shaders::winograd::{self, Tile};
use crate::shaders::{group_norm, matmul};
use crate::weights::HostTensor;
use crate::weights::synthetic::Architecture;

/// Relative error a correct fp32 op or module meets (the fixtures' README).
pub const BOUND: f64 = 1e-4;

/// Relative error of a product of f16 operands whose output is rounded to f16 (2^-11 of each
/// element at most; 2e-4 measured), against the same product rounded only at the end.
pub const F16_OUTPUT_BOUND: f64 = 1e-3;

/// One computation to compare, and the bound it must meet.
pub struct Check {
    pub name: String,
    pub op: Op,
    pub bound: f64,
}

/// One compared computation.
#[derive(Clone, Debug)]
pub struct CheckResult {
    pub name: String,
    /// `||device - cpu|| / ||cpu||`; NaN when the device produced NaN or the check crashed.
    pub error: f64,
    pub bound: f64,
    /// Wall time on the device, kernel compilation included (first use in the process).
    pub millis: f64,
    /// Why it failed beyond the numbers (a crash), if it did.
    pub note: Option<String>,
}

impl CheckResult {
    pub fn passed(&self) -> bool {
        self.note.is_none() && self.error < self.bound
    }

    /// One line of the report.
    pub fn line(&self) -> String {
        let status = if self.passed() { "ok  " } else { "FAIL" };
        let note = self.note.as_deref().map(|n| format!("  ({n})")).unwrap_or_default();
        format!(
            "{status} {:<44} rel. error {:>9.2e}  bound {:.0e}  {:>9.1} ms{note}",
            self.name, self.error, self.bound, self.millis
        )
    }
}

/// A GroupNorm(+SiLU) implementation: burn's ops or sdw's shader.
type GroupNormFn = fn(&GroupNorm, Tensor<4>, bool) -> Tensor<4>;

/// A matrix product of `[B, M, K]` and `[B, K, N]` tensors plus two addends: burn's or sdw's
/// shader. `x · w + bias + residual`.
type MatmulFn = fn(Tensor<3>, Tensor<3>, Tensor<3>, Tensor<3>) -> Tensor<3>;

/// What a check computes, on whichever device it is given.
pub type Op = Box<dyn Fn(&Device) -> HostTensor>;

/// The checks for images of `size` pixels (SD 1.5 runs 512: a 64x64 latent).
pub fn checks(size: usize) -> Vec<Check> {
    let s = (size / 8).max(8);
    let half = s / 2;
    let mut list: Vec<Check> = Vec::new();
    // f16 products on cooperative matrices (tensor cores), where the adapter offers them to
    // WGSL: the only check with f16 operands, so it has its own bound.
    if crate::device::f16_cooperative().is_some() {
        let name = format!("matmul f16 {}x320 @ 320x1280 (sdw tensor-core shader)", 2 * s * s);
        let op: Op = Box::new(move |d| f16_product([2, s * s, 320, 1280], d));
        list.push(Check { name, op, bound: F16_OUTPUT_BOUND });
    }
    let mut add = |name: String, op: Op| list.push(Check { name, op, bound: BOUND });

    // Linear layers with their residual sums: token projections and the feed-forward widths,
    // by burn's matmul and sums and by sdw's shader, which adds the bias and the residual as it
    // writes the product (autotune may choose it on a WGSL device).
    let products: [(&str, MatmulFn); 2] = [
        ("", |x, w, b, r| x.matmul(w) + b + r),
        (" (sdw shader, tile 128)", |x, w, b, r| matmul::matmul_add_with(x, w, b, Some(r), Kernel::Tiled(128))),
    ];
    for (label, product) in products {
        add(
            format!("matmul {}x320 @ 320x1280 + bias + res.{label}", 2 * s * s),
            Box::new(move |d| {
                let x = input([2, s * s, 320], 1, d);
                let w = input([320, 1280], 2, d).mul_scalar(320f32.powf(-0.5));
                let b = input([1280], 3, d);
                let r = input([2, s * s, 1280], 8, d);
                to_host(product(x, w.unsqueeze(), b.unsqueeze(), r))
            }),
        );
    }
    add(
        format!("matmul 16x{0}x40 @ (16x{0}x40)^T (sdw shader, tile 64)", half * half),
        Box::new(move |d| {
            let (q, k) = (input([16, half * half, 40], 6, d), input([16, half * half, 40], 7, d));
            to_host(matmul::matmul_with(q, k.swap_dims(1, 2), Kernel::Tiled(64)))
        }),
    );
    add(
        format!("batched matmul 16x{}x40 @ 16x40x77", s * s),
        Box::new(move |d| to_host(input([16, s * s, 40], 4, d).matmul(input([16, 40, 77], 5, d)))),
    );
    // Convolutions as the UNet and VAE use them.
    for (name, cin, cout, k, stride, side, seed) in [
        ("conv 3x3 320->320", 320, 320, 3, 1, s, 10),
        ("conv 3x3 640->320", 640, 320, 3, 1, half, 11),
        ("conv 3x3 4->320 (conv_in)", 4, 320, 3, 1, s, 12),
        ("conv 1x1 320->320 (proj_in)", 320, 320, 1, 1, s, 13),
        ("conv 3x3 stride 2 320->320", 320, 320, 3, 2, s, 14),
    ] {
        add(format!("{name} at {side}x{side}"), conv_check(cin, cout, k, stride, side, seed));
    }
    // Winograd's kernels at any size (`model::conv` sends them only convolutions of 512
    // pixels or more): the WGSL shaders, and their cube twins as SPIR-V devices run them.
    for tile in [Tile::F2, Tile::F4] {
        for (label, portable) in [("sdw shaders", false), ("sdw cube kernels", true)] {
            add(
                format!("conv 3x3 320->320 + res. at {s}x{s} by Winograd's {tile} ({label})"),
                winograd_check(s, tile, portable),
            );
        }
    }
    // The layers a GPU's Winograd input kernel does as it reads (`model::conv`), and the CPU
    // as layers of their own: a ResNet's GroupNorm and SiLU, an upsampler's 2x upsampling.
    // At 16x16 or more, so that Winograd's kernels take the convolution (512 output pixels).
    let t = s.max(16);
    add(
        format!("group norm + SiLU, conv 3x3 320->320 + res. at {t}x{t} (a ResNet's)"),
        Box::new(move |d| {
            let x = input([2, 320, t, t], 24, d).mul_scalar(3.0).add_scalar(1.0);
            let residual = input([2, 320, t, t], 119, d);
            to_host(normalized_conv_add(&conv2d(320, 320, 3, 1, 10, d), &norm(320, 25, d), x, Some(residual)))
        }),
    );
    add(
        format!("upsample 2x, conv 3x3 320->320 at {0}x{0} -> {t}x{t} (an upsampler's)", t / 2),
        Box::new(move |d| {
            to_host(upsampled_conv(&conv2d(320, 320, 3, 1, 10, d), input([2, 320, t / 2, t / 2], 26, d), [t, t]))
        }),
    );
    // burn's ops and sdw's kernels (the WGSL shader or, on a SPIR-V device, its cube twin;
    // the cube twin forced; the CPU kernel) on the same input: each must agree.
    let group_norms: [(&str, GroupNormFn); 3] = [
        ("burn ops", group_norm::reference),
        ("sdw kernel", group_norm::forward),
        ("sdw cube kernel", group_norm::forward_portable),
    ];
    for (label, f) in group_norms {
        add(
            format!("group norm 32 groups [2,320,{s},{s}] ({label})"),
            Box::new(move |d| {
                to_host(f(&norm(320, 20, d), input([2, 320, s, s], 21, d).mul_scalar(3.0).add_scalar(1.0), false))
            }),
        );
    }
    add(
        format!("group norm + SiLU [2,640,{half},{half}] (sdw kernel)"),
        Box::new(move |d| to_host(group_norm::forward(&norm(640, 22, d), input([2, 640, half, half], 23, d), true))),
    );
    add(
        format!("layer norm [2,{},320]", s * s),
        Box::new(move |d| {
            let mut ln = LayerNormConfig::new(320).with_epsilon(1e-5).init(d);
            ln.gamma = Param::from_tensor(input([320], 24, d).mul_scalar(0.1).add_scalar(1.0));
            to_host(layer_norm(&ln, input([2, s * s, 320], 25, d).mul_scalar(2.0)))
        }),
    );
    add(
        format!("softmax [16,{},77]", s * s),
        Box::new(move |d| to_host(of_last_dim(input([16, s * s, 77], 30, d).mul_scalar(4.0)))),
    );
    add(
        format!("softmax [16,{0},{0}]", half * half),
        Box::new(move |d| to_host(of_last_dim(input([16, half * half, half * half], 31, d).mul_scalar(4.0)))),
    );
    add(
        format!("GEGLU, SiLU [2,{},2560]", s * s),
        Box::new(move |d| {
            let x = input([2, s * s, 2560], 50, d).mul_scalar(3.0);
            to_host(geglu(x.clone()) * silu(x.narrow(2, 0, 1280)))
        }),
    );
    add(
        format!("nearest upsample 2x [2,1280,{0},{0}]", s / 4),
        Box::new(move |d| to_host(upsample_nearest_2x(input([2, 1280, s / 4, s / 4], 60, d)))),
    );
    add(
        format!("nearest resize [2,320,{0},{0}] -> {1}x{1}", s / 4 + 1, s / 2 + 1),
        Box::new(move |d| {
            to_host(upsample_nearest_to(input([2, 320, s / 4 + 1, s / 4 + 1], 61, d), s / 2 + 1, s / 2 + 1))
        }),
    );
    add(
        format!("reductions sum/mean/max/var [2,320,{}]", s * s),
        Box::new(move |d| {
            let x = input([2, 320, s * s], 70, d).add_scalar(0.5);
            let parts = [
                x.clone().sum_dim(2),
                x.clone().mean_dim(2),
                x.clone().max_dim(2),
                x.clone().var(2),
                x.sum_dim(1).swap_dims(1, 2),
            ];
            to_host(Tensor::cat(Vec::from(parts), 1))
        }),
    );

    // Attention at each head width SD 1.5 uses: the UNet levels (40, 80 and 160 wide; cross-
    // attention over 77 tokens), CLIP (causal, 64 wide) and the VAE's single 512-wide head.
    for (name, [batch, tokens, width, heads], keys, causal, seed) in [
        ("self-attention 8 heads", [2, s * s, 320, 8], s * s, false, 40),
        ("cross-attention 8 heads x 77", [2, s * s, 320, 8], 77, false, 43),
        ("self-attention 8 heads", [2, half * half, 640, 8], half * half, false, 46),
        ("self-attention 8 heads", [2, (s / 4) * (s / 4), 1280, 8], (s / 4) * (s / 4), false, 47),
        ("CLIP causal self-attention 12 heads", [2, 77, 768, 12], 77, true, 48),
        ("VAE self-attention 1 head", [1, half * half, 512, 1], half * half, false, 49),
    ] {
        add(
            format!("{name} [{batch},{tokens},{width}]"),
            attention_check([batch, tokens, width], keys, heads, causal, seed),
        );
    }

    add(
        format!("self-attention as products [2,{},320]", half * half),
        Box::new(move |d| {
            let t = half * half;
            let [q, k, v] = [80, 81, 82].map(|seed| input([2, 8, t, 40], seed, d));
            to_host(attention_tuned::products_only(q, k, v, t.div_ceil(3)))
        }),
    );

    // Training: gradients through each op (burn's autodiff), as DreamBooth-LoRA needs them.
    let t = half * half;
    add(
        format!("backward matmul [2,{t},320] @ [320,640]"),
        Box::new(move |d| {
            let (x, w) = (leaf(2 * t * 320, 90, d, 1.0), leaf(320 * 640, 91, d, 0.05));
            let y = x.clone().reshape([2, t, 320]).matmul(w.clone().reshape([1, 320, 640]));
            gradients(&[x, w], y)
        }),
    );
    add(
        format!("backward conv 3x3 320->320 at {half}x{half}"),
        Box::new(move |d| {
            let (x, w) = (leaf(2 * 320 * t, 92, d, 1.0), leaf(320 * 320 * 9, 93, d, 0.02));
            let y = conv2d_fn(
                x.clone().reshape([2, 320, half, half]),
                w.clone().reshape([320, 320, 3, 3]),
                None,
                ConvOptions::new([1, 1], [1, 1], [1, 1], 1),
            );
            gradients(&[x, w], y)
        }),
    );
    add(
        format!("backward group norm + SiLU [2,320,{half},{half}]"),
        Box::new(move |d| {
            let x = leaf(2 * 320 * t, 94, d, 2.0);
            let y = group_norm::forward(&norm(320, 95, &x.device()), x.clone().reshape([2, 320, half, half]), true);
            gradients(&[x], y)
        }),
    );
    add(
        format!("backward layer norm [2,{t},320]"),
        Box::new(move |d| {
            let x = leaf(2 * t * 320, 96, d, 2.0);
            let ln = LayerNormConfig::new(320).with_epsilon(1e-5).init(&x.device());
            let y = ln.forward(x.clone().reshape([2, t, 320]));
            gradients(&[x], y)
        }),
    );
    add(
        format!("backward attention 8 heads [2,{t},320]"),
        Box::new(move |d| {
            let (q, k, v) =
                (leaf(2 * t * 320, 97, d, 1.0), leaf(2 * t * 320, 98, d, 1.0), leaf(2 * t * 320, 99, d, 1.0));
            let r = |x: &Tensor<1>| x.clone().reshape([2, t, 320]);
            let y = attention(r(&q), r(&k), r(&v), 8, false);
            gradients(&[q, k, v], y)
        }),
    );
    add(
        format!("backward GELU [2,{t},1280]"),
        Box::new(move |d| {
            let x = leaf(2 * t * 1280, 100, d, 3.0);
            let y = gelu(x.clone().reshape([2, t, 1280]));
            gradients(&[x], y)
        }),
    );
    // 16x16: an 8x8 latent shrinks to 1x1 at the bottleneck, where GroupNorm's backward
    // cancels almost completely and fp32 cannot pin the gradients down.
    add(
        "backward tiny UNet at 16x16 (input and context gradients)".into(),
        Box::new(|d| {
            let sd = tiny_model(&d.clone().autodiff());
            let (x, ctx) = (leaf(2 * 4 * 16 * 16, 101, d, 1.0), leaf(2 * 77 * 128, 102, d, 1.0));
            let y =
                sd.unet.forward(x.clone().reshape([2, 4, 16, 16]), &[801.5, 301.0], &ctx.clone().reshape([2, 77, 128]));
            gradients(&[x, ctx], y)
        }),
    );

    for (name, op) in tiny_shape_checks() {
        add(name, op);
    }

    // Whole networks: the tiny SD 1.x layout with random weights, built in memory.
    add(
        "tiny CLIP text encoder (77 tokens)".into(),
        Box::new(|d| {
            let sd = tiny_model(d);
            let ids: Vec<u32> = (0..77).map(|i| if i < 9 { 320 + 37 * i } else { 49407 }).collect();
            to_host(sd.clip.forward(&[ids.clone(), ids.iter().rev().copied().collect()], 1, d))
        }),
    );
    add("tiny UNet, CFG batch of 2 at 8x8".into(), Box::new(|d| to_host(tiny_unet(d, &mut |_, _| {}))));
    add("tiny guided step, 3rd call (a replayed graph on a GPU)".into(), Box::new(tiny_replayed_step));
    add(
        "tiny VAE decode 8x8 -> 64x64".into(),
        Box::new(|d| to_host(tiny_model(d).vae.decode(input([1, 4, 8, 8], 82, d)))),
    );
    add(
        "tiny VAE encode 64x48".into(),
        Box::new(|d| to_host(tiny_model(d).vae.encode(input([1, 3, 48, 64], 83, d).tanh()).mean)),
    );
    list
}

/// The ops at the tiny model's own shapes (the fixtures' model): 32 and 64 channels, one
/// channel per GroupNorm group, 4- and 8-wide attention heads, a 1x1 bottleneck. Kernels pick
/// other tilings for such small sizes than for SD 1.5's, so a whole tiny network that differs
/// is traced to its op here.
fn tiny_shape_checks() -> Vec<(String, Op)> {
    let mut list: Vec<(String, Op)> = Vec::new();
    let mut add = |name: String, op: Op| list.push((name, op));
    for (name, [batch, tokens, width, heads], keys, causal, seed) in [
        ("self-attention 8 heads (4 wide)", [2, 64, 32, 8], 64, false, 200),
        ("self-attention 8 heads (8 wide)", [2, 16, 64, 8], 16, false, 201),
        ("cross-attention 8 heads (4 wide) x 77", [2, 64, 32, 8], 77, false, 202),
        ("self-attention 8 heads (8 wide) at 1x1", [2, 1, 64, 8], 1, false, 203),
        ("CLIP causal self-attention 2 heads", [2, 77, 128, 2], 77, true, 204),
        ("VAE self-attention 1 head", [1, 64, 64, 1], 64, false, 205),
    ] {
        add(
            format!("tiny {name} [{batch},{tokens},{width}]"),
            attention_check([batch, tokens, width], keys, heads, causal, seed),
        );
    }
    for (name, cin, cout, k, stride, side, seed) in [
        ("conv 3x3 4->32 (conv_in)", 4, 32, 3, 1, 8, 210),
        ("conv 3x3 32->32", 32, 32, 3, 1, 8, 211),
        ("conv 3x3 stride 2 32->32", 32, 32, 3, 2, 8, 212),
        ("conv 3x3 128->64", 128, 64, 3, 1, 2, 213),
        ("conv 3x3 64->64", 64, 64, 3, 1, 1, 214),
        ("conv 1x1 96->64 (skip)", 96, 64, 1, 1, 4, 215),
        ("conv 3x3 32->3 (VAE conv_out)", 32, 3, 3, 1, 64, 216),
    ] {
        add(format!("tiny {name} at {side}x{side}"), conv_check(cin, cout, k, stride, side, seed));
    }
    let group_norms: [(&str, GroupNormFn); 2] =
        [("burn ops", group_norm::reference), ("sdw kernel", group_norm::forward)];
    for (label, f) in group_norms {
        for (c, side, silu, seed) in [(32, 8, false, 220), (64, 1, true, 222), (32, 64, true, 224)] {
            add(
                format!("tiny group norm{} [2,{c},{side},{side}] ({label})", if silu { " + SiLU" } else { "" }),
                Box::new(move |d| to_host(f(&norm(c, seed, d), input([2, c, side, side], seed + 1, d), silu))),
            );
        }
    }
    add(
        "tiny layer norm [2,64,32]".into(),
        Box::new(|d| {
            let mut ln = LayerNormConfig::new(32).with_epsilon(1e-5).init(d);
            ln.gamma = Param::from_tensor(input([32], 230, d).mul_scalar(0.1).add_scalar(1.0));
            to_host(ln.forward(input([2, 64, 32], 231, d).mul_scalar(2.0)))
        }),
    );
    add(
        "tiny matmul [2,64,32] @ [32,256] + bias".into(),
        Box::new(|d| {
            let w = input([32, 256], 241, d).mul_scalar(32f32.powf(-0.5));
            to_host(input([2, 64, 32], 240, d).matmul(w.unsqueeze()) + input([256], 242, d).unsqueeze())
        }),
    );
    add(
        "tiny nearest upsample 2x [2,64,1,1] and [2,64,4,4]".into(),
        Box::new(|d| {
            let a = upsample_nearest_2x(input([2, 64, 1, 1], 250, d)).reshape([2, 64 * 4]);
            let b = upsample_nearest_2x(input([2, 64, 4, 4], 251, d)).reshape([2, 64 * 64]);
            to_host(Tensor::cat(vec![a, b], 1))
        }),
    );
    list
}

/// `[b, m, k] x [k, n]` with operands rounded to f16: on a WGSL device by the cooperative-
/// matrix shader (f16 output), elsewhere in f32 from the same f16 values.
fn f16_product([b, m, k, n]: [usize; 4], d: &Device) -> HostTensor {
    let x = input([b, m, k], 21, d).cast(burn::tensor::DType::F16);
    let w = input([k, n], 22, d).mul_scalar((k as f32).powf(-0.5)).cast(burn::tensor::DType::F16).unsqueeze();
    let y = if crate::shaders::matmul::applies(&x) {
        matmul::matmul_with(x, w, Kernel::Cooperative(128))
    } else {
        x.cast(burn::tensor::DType::F32).matmul(w.cast(burn::tensor::DType::F32))
    };
    to_host(y.cast(burn::tensor::DType::F32))
}

/// A `k x k` convolution `cin -> cout` with `stride` on a batch of 2 `side x side` inputs.
fn conv_check(cin: usize, cout: usize, k: usize, stride: usize, side: usize, seed: u64) -> Op {
    Box::new(move |d| to_host(conv(&conv2d(cin, cout, k, stride, seed, d), input([2, cin, side, side], seed + 100, d))))
}

/// [`conv_check`]'s 3x3 320 -> 320 convolution plus a residual (a ResNet's second
/// convolution) by Winograd's kernels where they run (a GPU), by the `#[cube]` ones when
/// `portable`; elsewhere the device's own convolution and sum.
fn winograd_check(side: usize, tile: Tile, portable: bool) -> Op {
    Box::new(move |d| {
        let c = conv2d(320, 320, 3, 1, 10, d);
        let x = input([2, 320, side, side], 110, d);
        let residual = input([2, 320, side, side], 119, d);
        if !crate::shaders::applies(&x) {
            return to_host(conv(&c, x) + residual);
        }
        let run = if portable { winograd::conv3x3_portable } else { winograd::conv3x3 };
        let bias = c.bias.as_ref().expect("a bias").val();
        let plan =
            winograd::Plan { tile, padding: [1; 4], budget: crate::model::budget::current().part, upsample: false };
        to_host(run(x, c.weight.val(), bias, Some(residual), plan))
    })
}

/// Multi-head attention of `[batch, tokens, width]` queries over `keys` keys and values.
fn attention_check([batch, tokens, width]: [usize; 3], keys: usize, heads: usize, causal: bool, seed: u64) -> Op {
    Box::new(move |d| {
        let q = input([batch, tokens, width], seed, d);
        let (k, v) = (input([batch, keys, width], seed + 1000, d), input([batch, keys, width], seed + 2000, d));
        to_host(attention(q, k, v, heads, causal))
    })
}

/// Runs every check (or those whose name contains `only`) on `compute` against the CPU
/// backend, calling `report` after each.
pub fn run(
    compute: &Compute,
    size: usize,
    only: Option<&str>,
    mut report: impl FnMut(&CheckResult),
) -> Vec<CheckResult> {
    crate::model::budget::fit(compute.max_binding);
    let cpu = crate::device::cpu().device;
    let mut results = Vec::new();
    for check in checks(size).into_iter().filter(|c| only.is_none_or(|o| c.name.contains(o))) {
        let result = compare(&check, &compute.device, &cpu);
        report(&result);
        results.push(result);
    }
    results
}

/// The tiny UNet of the "tiny UNet" check, layer by layer on `compute` against the CPU backend:
/// each layer's name and relative error. The first layer over [`BOUND`] is where the device
/// departs (later ones inherit its error).
pub fn trace_unet(compute: &Compute) -> Vec<(String, f64)> {
    let run = |d: &Device| {
        let mut layers = Vec::new();
        let out = tiny_unet(d, &mut |name, t| layers.push((name.to_owned(), to_host(t.clone()))));
        layers.push(("output".into(), to_host(out)));
        layers
    };
    let want = run(&crate::device::cpu().device);
    let got = run(&compute.device);
    want.into_iter().zip(got).map(|((name, w), (_, g))| (name, rel_err(&g.data, &w.data))).collect()
}

fn compare(Check { name, op, bound }: &Check, device: &Device, cpu: &Device) -> CheckResult {
    // A kernel that panics on some driver (or on the CPU) must fail its check, not end the report.
    let run = |d: &Device| catch_unwind(AssertUnwindSafe(|| op(d)));
    let want = run(cpu);
    let start = Instant::now();
    let got = run(device);
    let millis = start.elapsed().as_secs_f64() * 1e3;
    let (error, note) = match (got, want) {
        (Ok(got), Ok(want)) if got.shape == want.shape => (rel_err(&got.data, &want.data), None),
        (Ok(got), Ok(want)) => (f64::NAN, Some(format!("shape {:?}, expected {:?}", got.shape, want.shape))),
        (Err(panic), _) => (f64::NAN, Some(panic_text(&panic))),
        (_, Err(panic)) => (f64::NAN, Some(format!("on the CPU backend {}", panic_text(&panic)))),
    };
    CheckResult { name: name.to_owned(), error, bound: *bound, millis, note }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    let text = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
    format!("crashed: {}", text.unwrap_or_else(|| "unknown panic".into()))
}

/// `||a - b|| / ||b||`, in f64.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    if a.iter().any(|x| !x.is_finite()) {
        return f64::NAN;
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Standard-normal values from `seed`, the same on every device.
fn input<const D: usize>(shape: [usize; D], seed: u64, device: &Device) -> Tensor<D> {
    let n = shape.iter().product();
    let mut rng = StdRng::seed_from_u64(seed);
    let normal = Normal::new(0f32, 1.0).expect("unit normal");
    let data: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
    Tensor::from_data(TensorData::new(data, shape), device)
}

/// A flat trainable input on the autodiff version of `d`.
fn leaf(n: usize, seed: u64, d: &Device, scale: f32) -> Tensor<1> {
    input([n], seed, d).mul_scalar(scale).autodiff().require_grad()
}

/// The gradients of `sum(y * r)` (r fixed random weights) with respect to each of `leaves`,
/// concatenated.
fn gradients<const D: usize>(leaves: &[Tensor<1>], y: Tensor<D>) -> HostTensor {
    let r = input(y.dims(), 1000, &y.device());
    let grads = (y * r).sum().backward();
    let parts: Vec<Tensor<1>> = leaves.iter().map(|l| l.grad(&grads).expect("every leaf gets a gradient")).collect();
    to_host(Tensor::cat(parts, 0))
}

fn conv2d(cin: usize, cout: usize, k: usize, stride: usize, seed: u64, d: &Device) -> Conv2d {
    let p = k / 2;
    Conv2d {
        weight: Param::from_tensor(input([cout, cin, k, k], seed, d).mul_scalar(((cin * k * k) as f32).powf(-0.5))),
        bias: Some(Param::from_tensor(input([cout], seed + 1, d).mul_scalar(0.1))),
        stride: [stride, stride],
        kernel_size: [k, k],
        dilation: [1, 1],
        groups: 1,
        padding: PaddingConfig2d::Explicit(p, p, p, p),
    }
}

fn norm(c: usize, seed: u64, d: &Device) -> GroupNorm {
    GroupNorm {
        gamma: Some(Param::from_tensor(input([c], seed, d).mul_scalar(0.1).add_scalar(1.0))),
        beta: Some(Param::from_tensor(input([c], seed + 1, d).mul_scalar(0.1))),
        num_groups: crate::model::layers::GROUPS,
        num_channels: c,
        epsilon: 1e-5,
        affine: true,
    }
}

/// The "tiny UNet" check's computation: a CFG batch of 2 at 8x8, each layer shown to `trace`.
fn tiny_unet(d: &Device, trace: Trace) -> Tensor<4> {
    let (x, context) = (input([2, 4, 8, 8], 80, d), input([2, 77, 128], 81, d));
    tiny_model(d).unet.forward_traced(x, &[801.5, 801.5], &context, trace)
}

/// The third of three sampler calls of the tiny model at 8x8, each with other latents and
/// timestep: on a GPU the second records the call as a graph and the third replays it
/// (`model::graph`); the CPU runs all three kernel by kernel.
fn tiny_replayed_step(d: &Device) -> HostTensor {
    let sd = tiny_model(d);
    let (cond, uncond) = (input([1, 77, 128], 84, d), input([1, 77, 128], 85, d));
    let mut denoiser = CfgDenoiser::scheduled(&sd.unet, vec![(0, cond)], vec![(0, uncond)], 7.0, [1, 4, 8, 8]);
    let mut eps = Vec::new();
    for (seed, t) in [(86, 901.0), (87, 601.5), (88, 301.0)] {
        eps = denoiser.eps(&to_host(input([1, 4, 8, 8], seed, d)).data, t);
    }
    HostTensor::new(vec![1, 4, 8, 8], eps)
}

fn tiny_model(d: &Device) -> StableDiffusion {
    let compute = Compute { device: d.clone(), description: String::new(), max_binding: None, dtypes: Dtypes::F32 };
    StableDiffusion::random(&Architecture::tiny(), 7, compute).expect("the tiny layout is complete")
}
