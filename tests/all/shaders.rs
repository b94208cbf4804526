//! sdw's WGSL shaders against the burn ops they replace, on wgpu (lavapipe in CI); the
//! shader directory override; `sdw shaders dump`.

use std::process::Command;

use burn::module::Param;
use burn::nn::GroupNorm;
use burn::tensor::{DType, Tensor};
use sdw::model::layers::{to_device, to_host};
use sdw::shaders::matmul::Kernel;
use sdw::shaders::{self, SHADERS, group_norm, matmul};
use sdw::weights::HostTensor;

use crate::common::*;

fn norm(c: usize, dev: &burn::tensor::Device) -> GroupNorm {
    let gamma: Vec<f32> = sdw::sampling::Philox::new(3).randn(c).iter().map(|v| 1.0 + 0.1 * v).collect();
    let beta: Vec<f32> = sdw::sampling::Philox::new(4).randn(c).iter().map(|v| 0.1 * v).collect();
    GroupNorm {
        gamma: Some(Param::from_tensor(to_device(gamma, [c], dev))),
        beta: Some(Param::from_tensor(to_device(beta, [c], dev))),
        num_groups: 32,
        num_channels: c,
        epsilon: 1e-5,
        affine: true,
    }
}

/// The shader and its `#[cube]` twin (what SPIR-V devices run) equal burn's GroupNorm
/// (+ SiLU) on the same device, for the shapes SD uses (channels per group 1..20, pixel
/// counts that are not multiples of the workgroup, a large mean).
#[test]
fn group_norm_kernels_match_burn_ops() {
    let Some(gpu) = wgpu() else { return };
    let d = &gpu.device;
    for (b, c, h, w) in [(2, 320, 8, 8), (1, 64, 5, 7), (2, 640, 3, 3), (1, 32, 17, 9)] {
        let x: Vec<f32> = sdw::sampling::Philox::new(9).randn(b * c * h * w).iter().map(|v| 3.0 * v + 5.0).collect();
        let gn = norm(c, d);
        for silu in [false, true] {
            let want = to_host(group_norm::reference(&gn, to_device(x.clone(), [b, c, h, w], d), silu));
            let kernels = [
                ("WGSL shader", group_norm::forward as fn(_, _, _) -> _),
                ("cube kernel", group_norm::forward_portable),
            ];
            for (kernel, run) in kernels {
                let got = to_host(run(&gn, to_device(x.clone(), [b, c, h, w], d), silu));
                assert_close(&format!("group norm {kernel} [{b},{c},{h},{w}] silu={silu}"), &got, &want, 1e-5);
                // In f16 (`--precision f16`), held to the f16 bound of one module (model_parity.rs).
                let half = to_device(x.clone(), [b, c, h, w], d).cast(DType::F16);
                let got = to_host(run(&gn, half, silu));
                assert_close(&format!("group norm {kernel} f16 [{b},{c},{h},{w}] silu={silu}"), &got, &want, 1e-2);
            }
        }
    }
}

/// A GroupNorm's per-channel affine maps (`group_norm::affine`, what Winograd's input kernel
/// normalizes by) give burn's GroupNorm as `a x + s`: the CPU kernel, the shader and its cube
/// twin, 1 to 20 channels per group, a large mean, f32 and f16 inputs (whose maps stay f32).
#[test]
fn group_norm_affine_maps_match_burns() {
    let maps = [
        ("WGSL shader", group_norm::affine as fn(&GroupNorm, &Tensor<4>) -> _),
        ("cube kernel", group_norm::affine_portable),
    ];
    for compute in devices() {
        let d = &compute.device;
        for (b, c, h, w) in [(2, 64, 5, 7), (1, 640, 3, 3), (2, 32, 17, 9)] {
            let gn = norm(c, d);
            let x = to_device(scaled_noise(b * c * h * w, 9, 3.0).iter().map(|v| v + 5.0).collect(), [b, c, h, w], d);
            let want = to_host(group_norm::reference(&gn, x.clone(), false));
            // The CPU backend has one kernel, for f32; each wgpu one is tried, in f32 and f16.
            let (kernels, dtypes) = if sdw::device::on_cube(d) { (2, 2) } else { (1, 1) };
            for (kernel, affine) in &maps[..kernels] {
                let kernel = if kernels == 1 { "CPU kernel" } else { kernel };
                let what = format!("group norm maps {kernel} [{b},{c},{h},{w}] on {}", compute.description);
                for dtype in [DType::F32, DType::F16].into_iter().take(dtypes) {
                    let x = x.clone().cast(dtype);
                    let maps = affine(&gn, &x).expect("our kernels take f32 and f16 tensors");
                    assert_eq!((maps.dims(), maps.dtype()), ([b, c, 2], DType::F32), "{what}");
                    let [a, s] = [0, 1].map(|i| maps.clone().narrow(2, i, 1).unsqueeze_dim::<4>(3));
                    let got = to_host(x.cast(DType::F32) * a + s);
                    let bound = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
                    assert_close(&format!("{what} {dtype:?}"), &got, &want, bound);
                }
            }
        }
    }
}

/// LayerNorm by the GroupNorm kernel (one group per row) equals burn's LayerNorm on the same
/// device, for CLIP's and the UNet's widths, with rows fewer and more than a workgroup's
/// threads and a large mean.
#[test]
fn layer_norm_kernel_matches_burn_ops() {
    use burn::nn::LayerNormConfig;
    let Some(gpu) = wgpu() else { return };
    let d = &gpu.device;
    for [b, t, c] in [[2, 77, 768], [2, 64, 320], [1, 5, 1280], [3, 2, 100]] {
        let mut ln = LayerNormConfig::new(c).with_epsilon(1e-5).init(d);
        let gamma: Vec<f32> = sdw::sampling::Philox::new(3).randn(c).iter().map(|v| 1.0 + 0.1 * v).collect();
        let beta: Vec<f32> = sdw::sampling::Philox::new(4).randn(c).iter().map(|v| 0.1 * v).collect();
        ln.gamma = Param::from_tensor(to_device(gamma, [c], d));
        ln.beta = Some(Param::from_tensor(to_device(beta, [c], d)));
        let x: Vec<f32> = sdw::sampling::Philox::new(9).randn(b * t * c).iter().map(|v| 3.0 * v + 5.0).collect();
        let want = to_host(ln.forward(to_device(x.clone(), [b, t, c], d)));
        let got = to_host(group_norm::layer_norm(&ln, 1e-5, to_device(x.clone(), [b, t, c], d)));
        assert_close(&format!("layer norm [{b},{t},{c}]"), &got, &want, 1e-5);
        let got = to_host(group_norm::layer_norm(&ln, 1e-5, to_device(x, [b, t, c], d).cast(DType::F16)));
        assert_close(&format!("layer norm f16 [{b},{t},{c}]"), &got, &want, 1e-2);
    }
}

/// In training (the input tracked, γ and β frozen) GroupNorm (+ SiLU) and LayerNorm by sdw's
/// op give the output and the input's gradient that burn's autodiff of its own ops gives, on
/// the CPU and on wgpu: 1, 2 and 10 channels per group, pixel counts that are not multiples
/// of the workgroup, a large mean; LayerNorm at CLIP's and the UNet's widths.
#[test]
fn norm_gradients_match_burns() {
    use burn::nn::LayerNormConfig;
    for compute in devices() {
        let plain = &compute.device;
        for (b, c, h, w) in [(2, 64, 5, 7), (1, 320, 8, 8), (2, 32, 17, 9)] {
            let gn = norm(c, plain);
            for silu in [false, true] {
                let ours = |x| group_norm::forward(&gn, x, silu);
                let burns = |x| group_norm::reference(&gn, x, silu);
                let what = format!("group norm, silu {silu}, {:?} on {}", [b, c, h, w], compute.description);
                assert_gradients_match(&what, tracked_noise(&compute, [b, c, h, w], 5.0), &ours, &burns);
            }
        }
        for [b, t, c] in [[2, 13, 320], [1, 5, 1280], [2, 77, 768]] {
            let mut ln = LayerNormConfig::new(c).with_epsilon(1e-5).init(plain);
            let gamma = scaled_noise(c, 3, 0.1).iter().map(|v| v + 1.0).collect();
            ln.gamma = Param::from_tensor(to_device(gamma, [c], plain));
            ln.beta = Some(Param::from_tensor(to_device(scaled_noise(c, 4, 0.1), [c], plain)));
            let ours = |x| group_norm::layer_norm(&ln, 1e-5, x);
            let burns = |x| ln.forward(x);
            let what = format!("layer norm {:?} on {}", [b, t, c], compute.description);
            assert_gradients_match(&what, tracked_noise(&compute, [b, t, c], 5.0), &ours, &burns);
        }
    }
}

/// In training GEGLU's activation by sdw's op gives the output and the projection's gradient
/// that burn's autodiff of the split, the erf-form GELU and the product gives, on the CPU and
/// on wgpu, with gates far out on both tails.
#[test]
fn geglu_gradients_match_burns() {
    use sdw::shaders::geglu;
    for compute in devices() {
        for [b, t, f] in [[2, 64, 320], [1, 7, 1280], [2, 3, 5]] {
            let (ours, burns) = (geglu::forward::<3>, geglu::reference::<3>);
            let what = format!("geglu {:?} on {}", [b, t, 2 * f], compute.description);
            assert_gradients_match(&what, tracked_noise(&compute, [b, t, 2 * f], 0.0), &ours, &burns);
        }
    }
}

/// In training the im2col op's input gradient (`col2im`, one gather kernel) equals burn's
/// autodiff of the padded, sliced and stacked views it replaces, on wgpu: "same", uneven and
/// no padding, strides 1 and 2, bands that start inside the image and end before it.
#[test]
fn im2col_gradients_match_burns() {
    use sdw::model::conv::stacked_columns;
    use sdw::shaders::im2col::{self, Band};
    let Some(gpu) = wgpu() else { return };
    for (shape, k, s, [top, left, bottom, right], y0, rows) in IM2COL_CASES {
        let w_out = (shape[3] + left + right - k) / s + 1;
        let band = Band { kernel: [k, k], stride: [s, s], top_left: [top, left], y0, rows, w_out };
        let ours = |x| im2col::columns(x, band);
        let burns = |x: Tensor<4>| {
            let padded = x.pad([(top, bottom), (left, right)], 0.0);
            stacked_columns(&padded, [k, k], [s, s], y0, rows, w_out)
        };
        assert_gradients_match(&format!("im2col {band:?} {shape:?}"), tracked_noise(&gpu, shape, 0.0), &ours, &burns);
    }
}

/// Training's attention (`model::attention_grad`: the scores recomputed in the backward pass,
/// sdw's products, softmax and scores' gradient) gives the output and the gradients of q, k and
/// v that burn's autodiff of its plain attention gives, on the CPU and on wgpu: in one chunk of
/// queries and in chunks that do not divide them, self- and cross-attention, problems that the
/// tiled shader takes and one big enough to tune. Within 1e-5 of each result's scale.
#[test]
fn attention_gradients_match_burns() {
    use burn::tensor::module::attention as sdpa;
    use burn::tensor::ops::AttentionModuleOptions;
    use sdw::model::attention::attention_with_budget;
    for compute in devices() {
        let tracked = compute.device.clone().autodiff();
        for (b, sq, sk, heads, d) in [(2, 13, 11, 2, 8), (1, 70, 70, 2, 40), (1, 1100, 1100, 1, 40)] {
            let random =
                |s: usize, seed| to_device(scaled_noise(b * s * heads * d, seed, 1.0), [b, s, heads * d], &tracked);
            let (q, k, v, w) = (random(sq, 1), random(sk, 2), random(sk, 3), random(sq, 4));
            let leaves = || [&q, &k, &v].map(|t| t.clone().detach().require_grad());
            let grads = |out: Tensor<3>, inputs: [Tensor<3>; 3]| {
                let g = (out.clone() * w.clone()).sum().backward();
                let [q, k, v] = inputs.map(|t| to_host(t.grad(&g).expect("a gradient")));
                [to_host(out.inner()), q, k, v]
            };
            let [q0, k0, v0] = leaves();
            let split = |t: Tensor<3>, s: usize| t.reshape([b, s, heads, d]).swap_dims(1, 2);
            let options = AttentionModuleOptions { scale: Some(1.0 / (d as f64).sqrt()), ..Default::default() };
            let plain = sdpa(split(q0.clone(), sq), split(k0.clone(), sk), split(v0.clone(), sk), None, None, options);
            let want = grads(plain.swap_dims(1, 2).reshape([b, sq, heads * d]), [q0, k0, v0]);
            // Budgets for all query rows at once, and for 5 rows per chunk.
            for rows in [sq, 5] {
                let [q1, k1, v1] = leaves();
                let budget = b * heads * sk * 4 * rows;
                let out = attention_with_budget(q1.clone(), k1.clone(), v1.clone(), heads, false, budget);
                let got = grads(out, [q1, k1, v1]);
                for (name, (got, want)) in ["output", "dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
                    let what =
                        format!("attention {sq}x{sk}, {rows} rows per chunk, on {}: {name}", compute.description);
                    assert_within_scale(&what, got, want, 1e-5);
                }
            }
        }
    }
}

/// Three AdamW steps by sdw's kernel (`shaders::adamw`) and by its fallback in burn's ops give
/// the parameters and moments that burn's `AdamW` (torch's update) gives, on the CPU and on
/// wgpu: adapter factors' shapes and an uneven one, gradients stored as they come back from the
/// backward pass (transposed) and contiguous, weight decay on. On wgpu the kernel writes over
/// the parameter's and the moments' own buffers (what a recorded training step relies on).
#[test]
fn adamw_matches_burns() {
    use burn::optim::{AdamWConfig, Optimizer};
    use sdw::shaders::adamw::{self, Settings, Update};
    let (lr, wd) = (1e-2, 0.5);
    let burns = AdamWConfig::new().with_beta_1(0.9).with_beta_2(0.999).with_epsilon(1e-8).with_weight_decay(wd).build();
    for compute in devices() {
        let d = &compute.device;
        for ([rows, cols], transposed) in [([4, 320], true), ([1280, 4], true), ([4, 768], false), ([3, 517], false)] {
            let grad = |step: u64| {
                let noise = scaled_noise(rows * cols, 20 + step, 0.1);
                if transposed {
                    to_device(noise, [cols, rows], d).transpose()
                } else {
                    to_device(noise, [rows, cols], d)
                }
            };
            // Each its own buffers: the kernel writes over its inputs'.
            let start = || to_device(scaled_noise(rows * cols, 10, 1.0), [rows, cols], d);
            let zeros = || Tensor::<3>::zeros([2, rows, cols], d);
            let (mut ours, mut fallback, mut want) = ((start(), zeros()), (start(), zeros()), start());
            let (first_param, first_moments) = (ours.0.clone(), ours.1.clone());
            let mut state = None;
            for time in 1..=3 {
                let g = grad(time as u64);
                let update = Update::new(lr, 0.9, 0.999, 1e-8, wd, time);
                ours = adamw::step(ours.0, g.clone(), ours.1, &Settings::new(update, d));
                fallback = adamw::reference(fallback.0, g.clone(), fallback.1, update);
                let s;
                (want, s) = burns.step(lr, want, g, state);
                state = s;
            }
            let m = state.expect("AdamW keeps its moments").momentum;
            let want_moments = to_host(Tensor::stack::<3>(vec![m.moment_1, m.moment_2], 0));
            if sdw::device::on_cube(d) {
                let what = format!("AdamW's kernel on {}: updates in place", compute.description);
                assert_eq!(to_host(first_param).data, to_host(ours.0.clone()).data, "{what}");
                assert_eq!(to_host(first_moments).data, to_host(ours.1.clone()).data, "{what}");
            }
            for (name, (param, moments)) in [("kernel", ours), ("fallback", fallback)] {
                let what = format!(
                    "AdamW's {name}, {:?}, transposed gradient {transposed}, on {}",
                    [rows, cols],
                    compute.description
                );
                assert_within_scale(&format!("{what}: parameter"), &to_host(param), &to_host(want.clone()), 1e-6);
                assert_within_scale(&format!("{what}: moments"), &to_host(moments), &want_moments, 1e-6);
            }
        }
    }
}

/// The output of `ours` and the gradient of its input `x` (on an autodiff device) against
/// `burns`, for a random output gradient: within 1e-5 of each result's scale.
fn assert_gradients_match<const D: usize, const E: usize>(
    what: &str,
    x: Tensor<D>,
    ours: &dyn Fn(Tensor<D>) -> Tensor<E>,
    burns: &dyn Fn(Tensor<D>) -> Tensor<E>,
) {
    let results = |f: &dyn Fn(Tensor<D>) -> Tensor<E>| {
        let x = x.clone().require_grad();
        let out = f(x.clone());
        let g = to_device(scaled_noise(out.shape().num_elements(), 8, 1.0), out.dims(), &x.device());
        let grads = (out.clone() * g).sum().backward();
        (to_host(out.inner()), to_host(x.grad(&grads).expect("the input's gradient")))
    };
    let ((out, dx), (want, want_dx)) = (results(ours), results(burns));
    for (name, got, want) in [("output", out, &want), ("input gradient", dx, &want_dx)] {
        assert_within_scale(&format!("{what}: {name}"), &got, want, 1e-5);
    }
}

/// A tensor of `shape` on `compute`'s autodiff device: normal noise times 3, plus `mean`.
fn tracked_noise<const D: usize>(compute: &sdw::device::Compute, shape: [usize; D], mean: f32) -> Tensor<D> {
    let noise = scaled_noise(shape.iter().product(), 9, 3.0).iter().map(|v| v + mean).collect();
    to_device(noise, shape, &compute.device.clone().autodiff())
}

/// GEGLU's activation by the shader and its `#[cube]` twin equals burn's ops (split, erf-form
/// gelu, product) on the same device, for the UNet's widths and a row count that is not a
/// multiple of the workgroup, with gates far out on both tails.
#[test]
fn geglu_kernels_match_burn_ops() {
    use sdw::shaders::geglu;
    let Some(gpu) = wgpu() else { return };
    let d = &gpu.device;
    for [b, t, f] in [[2, 64, 1280], [1, 7, 2560], [2, 3, 5]] {
        let h: Vec<f32> = sdw::sampling::Philox::new(11).randn(b * t * 2 * f).iter().map(|v| 2.5 * v).collect();
        let want = to_host(geglu::reference(to_device(h.clone(), [b, t, 2 * f], d)));
        let kernels =
            [("WGSL shader", geglu::forward::<3> as fn(_) -> _), ("cube kernel", geglu::forward_portable::<3>)];
        for (kernel, run) in kernels {
            let got = to_host(run(to_device(h.clone(), [b, t, 2 * f], d)));
            assert_close(&format!("geglu {kernel} [{b},{t},{f}]"), &got, &want, 1e-5);
            let got = to_host(run(to_device(h.clone(), [b, t, 2 * f], d).cast(DType::F16)));
            assert_close(&format!("geglu {kernel} f16 [{b},{t},{f}]"), &got, &want, 1e-2);
        }
    }
}

/// The softmax shader and its `#[cube]` twin equal burn's softmax ops on the same device, for
/// the attention widths SD has (CLIP's 77 keys, 64 to 4096 pixels) and rows shorter than a
/// team, in f32 and f16 (on f16 inputs, so that only the kernel's rounding counts), with
/// scores of an attention's size (a row max far from 0) and more workgroups than one dispatch
/// dimension holds (in f16 only: lavapipe binds at most 128 MiB, and the reference takes the
/// rows in two halves). The kernel works in place: a tensor the caller still holds, or a view,
/// must come through unchanged.
#[test]
fn softmax_kernels_match_burn_ops() {
    use sdw::shaders::softmax;
    let Some(gpu) = wgpu() else { return };
    let d = &gpu.device;
    let reference = |x: Vec<f32>, [b, r, n]: [usize; 3]| {
        let halves = if r > 60_000 { 2 } else { 1 };
        let rows = b * r / halves;
        let data = x
            .chunks(rows * n)
            .flat_map(|h| to_host(burn::tensor::activation::softmax(to_device(h.to_vec(), [1, rows, n], d), 2)).data);
        sdw::weights::HostTensor::new(vec![b, r, n], data.collect())
    };
    let kernels =
        [("WGSL shader", softmax::forward::<3> as fn(_) -> _), ("cube kernel", softmax::forward_portable::<3>)];
    for [b, r, n] in [[16, 64, 77], [2, 9, 4096], [3, 33, 64], [2, 5, 3], [1, 65_600, 520]] {
        let x: Vec<f32> = sdw::sampling::Philox::new(13).randn(b * r * n).iter().map(|v| 20.0 * v + 30.0).collect();
        let dtypes: &[DType] = if r > 60_000 { &[DType::F16] } else { &[DType::F32, DType::F16] };
        for &dtype in dtypes {
            let x = if dtype == DType::F16 { f16_exact(x.clone()) } else { x.clone() };
            let want = reference(x.clone(), [b, r, n]);
            let bound = if dtype == DType::F16 { 1e-3 } else { 1e-5 };
            for (kernel, run) in kernels {
                let what = format!("softmax {kernel} {dtype:?} [{b},{r},{n}]");
                // Made in its dtype: the f32 tensor of the largest case is past lavapipe's 128 MiB.
                let held = match dtype {
                    DType::F16 => {
                        let h: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v)).collect();
                        Tensor::<3>::from_data(burn::tensor::TensorData::new(h, [b, r, n]), (d, DType::F16))
                    }
                    _ => to_device(x.clone(), [b, r, n], d),
                };
                let got = to_host(run(held.clone()));
                assert_close(&what, &got, &want, bound);
                assert_eq!(to_host(held).data, x, "{what}: the input changed");
            }
        }
    }
    // A transposed view: the kernel reads it as the tensor it stands for.
    let x = sdw::sampling::Philox::new(14).randn(2 * 40 * 70);
    let view = || to_device(x.clone(), [2, 40, 70], d).swap_dims(1, 2);
    let want = to_host(burn::tensor::activation::softmax(view(), 2));
    for (kernel, run) in kernels {
        assert_close(&format!("softmax {kernel} of a view"), &to_host(run(view())), &want, 1e-5);
    }
}

/// An im2col test's case: (input shape, kernel, stride, padding top-left-bottom-right, first
/// output row, rows).
type Im2colCase = ([usize; 4], usize, usize, [usize; 4], usize, usize);

/// The im2col tests' cases: "same", uneven and no padding, strides 1 and 2, bands that start inside
/// the image, end before it, or hold its last row alone.
const IM2COL_CASES: [Im2colCase; 7] = [
    ([2, 5, 9, 7], 3, 1, [1, 1, 1, 1], 0, 9),
    ([2, 5, 9, 7], 3, 1, [1, 1, 1, 1], 3, 4),
    ([2, 5, 9, 7], 3, 1, [1, 1, 1, 1], 8, 1),
    ([1, 6, 8, 10], 1, 1, [0, 0, 0, 0], 2, 5),
    ([1, 4, 9, 8], 3, 2, [1, 1, 1, 1], 1, 3),
    ([1, 4, 9, 8], 3, 2, [0, 0, 1, 1], 0, 4),
    ([1, 3, 4, 4], 3, 1, [2, 0, 1, 2], 0, 5),
];

/// The im2col shader and its `#[cube]` twin make exactly the columns burn's pad, slice and
/// stack make (a copy: equal to the bit), for the convolutions SD has (3x3 same, 1x1, stride 2
/// with the VAE's bottom-right-only padding) and bands that start inside the image and at its
/// last row, in f32 and f16, with more workgroups than one dispatch dimension holds.
#[test]
fn im2col_kernels_match_burn_ops() {
    use sdw::model::conv::stacked_columns;
    use sdw::shaders::im2col::{self, Band};
    let Some(gpu) = wgpu() else { return };
    let d = &gpu.device;
    // And a large 1x1 case, as the UNet's skip connections send.
    let large = ([1, 17, 1000, 1000], 1, 1, [0, 0, 0, 0], 0, 1000);
    for (shape, k, s, [top, left, bottom, right], y0, rows) in IM2COL_CASES.into_iter().chain([large]) {
        let n: usize = shape.iter().product();
        let x = to_device(sdw::sampling::Philox::new(5).randn(n), shape, d);
        let w_out = (shape[3] + left + right - k) / s + 1;
        let padded = x.clone().pad([(top, bottom), (left, right)], 0.0);
        let band = Band { kernel: [k, k], stride: [s, s], top_left: [top, left], y0, rows, w_out };
        for dtype in [DType::F32, DType::F16] {
            let (x, padded) = (x.clone().cast(dtype), padded.clone().cast(dtype));
            let want = to_host(stacked_columns(&padded, [k, k], [s, s], y0, rows, w_out).cast(DType::F32));
            let kernels =
                [("WGSL shader", im2col::columns as fn(_, _) -> _), ("cube kernel", im2col::columns_portable)];
            for (kernel, run) in kernels {
                let got = to_host(run(x.clone(), band).cast(DType::F32));
                assert_eq!(got.shape, want.shape, "im2col {kernel} {dtype:?} {shape:?} {band:?}");
                assert!(got.data == want.data, "im2col {kernel} {dtype:?} {shape:?} {band:?}: columns differ");
            }
        }
    }
}

/// Winograd's three shaders and their `#[cube]` twins, with the product between them, by
/// F(2x2, 3x3) and by F(4x4, 3x3), equal burn's convolution on the same device: "same" padding at odd sizes (half tiles at the
/// bottom and right), "valid", uneven padding, a 1x1 image, a budget that splits the tiles into
/// bands (one ending inside an image, a last band of one row), and a wide case as SD sends it,
/// weights at 1/sqrt(fan-in) so that outputs stay near 1. f32 within 1e-5 of the output's
/// scale, as `model::conv`'s own test; f16 (F(2x2, 3x3) only, as `winograd::plan` sends it)
/// within the f16 bound of one module (model_parity.rs).
#[test]
fn winograd_kernels_match_burns_convolution() {
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::Conv2dConfig;
    use sdw::shaders::winograd;
    let Some(gpu) = wgpu() else { return };
    let d = &gpu.device;
    // (x's shape, output channels, padding top-left-bottom-right, budget in bytes)
    let cases = [
        ([2, 5, 9, 7], 6, [1, 1, 1, 1], 1 << 30),
        ([2, 5, 9, 7], 6, [1, 1, 1, 1], 4 << 10),
        ([3, 2, 6, 5], 2, [0, 0, 0, 0], 1 << 30),
        ([1, 3, 5, 8], 2, [0, 1, 2, 0], 1 << 30),
        ([1, 4, 1, 1], 3, [1, 1, 1, 1], 1 << 30),
        ([1, 40, 33, 33], 36, [1, 1, 1, 1], 1 << 30),
        ([2, 40, 33, 33], 36, [1, 1, 1, 1], 256 << 10),
    ];
    for (shape, cout, padding, budget) in cases {
        let [top, left, bottom, right] = padding;
        let [_, cin, ..] = shape;
        let amplitude = ((cin * 9) as f32).sqrt().recip();
        let x = to_device(scaled_noise(shape.iter().product(), 5, 1.0), shape, d);
        let weight = to_device(scaled_noise(cout * cin * 9, 6, amplitude), [cout, cin, 3, 3], d);
        let bias = to_device(scaled_noise(cout, 7, 1.0), [cout], d);
        let mut conv = Conv2dConfig::new([cin, cout], [3, 3])
            .with_padding(PaddingConfig2d::Explicit(top, left, bottom, right))
            .init(d);
        conv.weight = Param::from_tensor(weight.clone());
        conv.bias = Some(Param::from_tensor(bias.clone()));
        let plain = conv.forward(x.clone());
        let want = to_host(plain.clone());
        let [b, o, h, w] = plain.dims();
        // Addends the output kernel adds as it writes: a residual, and a term per channel.
        let residual = to_device(scaled_noise(b * o * h * w, 8, 1.0), [b, o, h, w], d);
        let per_channel = to_device(scaled_noise(b * o, 9, 1.0), [b, o, 1, 1], d);
        for (kernel, tile, run) in winograd_kernels() {
            let what = format!("winograd {tile} {kernel} {shape:?} -> {cout} {padding:?} budget {budget}");
            let plan = winograd::Plan { tile, padding, budget, upsample: false };
            let got = to_host(run(x.clone(), weight.clone(), bias.clone(), None, plan));
            assert_within_scale(&what, &got, &want, 1e-5);
            for (name, addend) in [("residual", &residual), ("per channel", &per_channel)] {
                let got = to_host(run(x.clone(), weight.clone(), bias.clone(), Some(addend.clone()), plan));
                let want = to_host(plain.clone() + addend.clone());
                assert_within_scale(&format!("{what} + {name}"), &got, &want, 1e-5);
            }
            // f16 convolutions take F(2x2, 3x3) only (`winograd::plan`).
            if tile == winograd::Tile::F2 {
                let (x, weight, bias) =
                    (x.clone().cast(DType::F16), weight.clone().cast(DType::F16), bias.clone().cast(DType::F16));
                let got = to_host(run(x, weight, bias, None, plan).cast(DType::F32));
                assert_close(&format!("{what} f16"), &got, &want, 1e-2);
            }
        }
    }
}

/// Winograd's input kernel doing the layer before the convolution as it reads, by the WGSL
/// shaders and by their cube twins, with each tile, equals burn's layer and convolution on the
/// same device: GroupNorm and SiLU (a ResNet's, from `group_norm::affine`'s maps; with and
/// without a residual, a large mean) and nearest-neighbour 2x upsampling (an upsampler's,
/// against burn's `interpolate`), odd sizes, a budget that splits the tiles into bands. f32
/// within 1e-5 of the output's scale and f16 (F(2x2, 3x3)) within one module's f16 bound, as
/// `winograd_kernels_match_burns_convolution`.
#[test]
fn winograd_folds_the_norm_and_the_upsampling() {
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::module::interpolate;
    use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
    use sdw::shaders::winograd::{self, Tile};
    type Normalized = fn(Tensor<4>, Tensor<3>, Tensor<4>, Tensor<1>, Option<Tensor<4>>, winograd::Plan) -> Tensor<4>;
    type Maps = fn(&GroupNorm, &Tensor<4>) -> Option<Tensor<3>>;
    let kernels: [(&str, Normalized, Maps, WinogradFn); 2] = [
        ("WGSL shaders", winograd::normalized_conv3x3, group_norm::affine, winograd::conv3x3),
        (
            "cube kernels",
            winograd::normalized_conv3x3_portable,
            group_norm::affine_portable,
            winograd::conv3x3_portable,
        ),
    ];
    let Some(gpu) = wgpu() else { return };
    let d = &gpu.device;
    // (x's shape, output channels, budget in bytes)
    for (shape, cout, budget) in [([2, 64, 9, 7], 36, 1 << 30), ([1, 32, 17, 16], 40, 64 << 10)] {
        let [b, cin, h, w] = shape;
        let amplitude = ((cin * 9) as f32).sqrt().recip();
        let x = to_device(scaled_noise(shape.iter().product(), 5, 2.0).iter().map(|v| v + 3.0).collect(), shape, d);
        let weight = to_device(scaled_noise(cout * cin * 9, 6, amplitude), [cout, cin, 3, 3], d);
        let bias = to_device(scaled_noise(cout, 7, 1.0), [cout], d);
        let mut conv =
            Conv2dConfig::new([cin, cout], [3, 3]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)).init(d);
        conv.weight = Param::from_tensor(weight.clone());
        conv.bias = Some(Param::from_tensor(bias.clone()));
        let gn = norm(cin, d);
        let residual = to_device(scaled_noise(b * cout * h * w, 8, 1.0), [b, cout, h, w], d);
        let normalized = conv.forward(group_norm::reference(&gn, x.clone(), true));
        let nearest = InterpolateOptions::new(InterpolateMode::Nearest);
        let wants = [
            ("normalized", to_host(normalized.clone())),
            ("normalized + residual", to_host(normalized + residual.clone())),
            ("upsampled", to_host(conv.forward(interpolate(x.clone(), nearest.with_output_size([2 * h, 2 * w]))))),
        ];
        for tile in [Tile::F2, Tile::F4] {
            // f16 convolutions take F(2x2, 3x3) only (`winograd::plan`).
            let dtypes: &[DType] = if tile == Tile::F2 { &[DType::F32, DType::F16] } else { &[DType::F32] };
            for ((kernel, normalized_conv, affine, conv), &dtype) in
                kernels.iter().flat_map(|k| dtypes.iter().map(move |t| (k, t)))
            {
                let plan = winograd::Plan { tile, padding: [1; 4], budget, upsample: false };
                let (x, weight, bias, residual) = (
                    x.clone().cast(dtype),
                    weight.clone().cast(dtype),
                    bias.clone().cast(dtype),
                    residual.clone().cast(dtype),
                );
                let maps = affine(&gn, &x).expect("our kernels take f32 and f16 tensors");
                let gots = [
                    normalized_conv(x.clone(), maps.clone(), weight.clone(), bias.clone(), None, plan),
                    normalized_conv(x.clone(), maps, weight.clone(), bias.clone(), Some(residual), plan),
                    conv(x, weight, bias, None, winograd::Plan { upsample: true, ..plan }),
                ];
                for ((layer, want), got) in wants.iter().zip(gots) {
                    let what =
                        format!("winograd {tile} {kernel} {dtype:?} {shape:?} -> {cout} budget {budget}: {layer}");
                    let got = to_host(got.cast(DType::F32));
                    if dtype == DType::F32 {
                        assert_within_scale(&what, &got, want, 1e-5);
                    } else {
                        assert_close(&what, &got, want, 1e-2);
                    }
                }
            }
        }
    }
}

/// In training (frozen weights, `x` tracked) Winograd's op gives the output and the input's
/// gradient burn's autodiff convolution gives on the same device: "same" and uneven padding,
/// a budget that splits the tiles into bands (the backward's too), frozen f16 weights under f32
/// activations (`sdw train --precision f16`), a ResNet's residual (the input added to the
/// output: its gradient flows both ways), by both tiles, by the shaders and by their cube
/// twins. Within 1e-5 of each result's scale, as the forward test.
#[test]
fn winograd_gradients_match_burns() {
    use burn::tensor::module::conv2d;
    use burn::tensor::ops::ConvOptions;
    use sdw::shaders::winograd;
    let Some(gpu) = wgpu() else { return };
    let tracked = gpu.device.clone().autodiff();
    // (x's shape, output channels, padding, budget, the weight's dtype, x added to the output)
    let cases = [
        ([2, 5, 9, 7], 6, [1, 1, 1, 1], 1 << 30, DType::F32, false),
        ([1, 3, 6, 8], 4, [0, 2, 1, 0], 1 << 30, DType::F32, false),
        ([2, 40, 17, 16], 36, [1, 1, 1, 1], 96 << 10, DType::F32, false),
        ([2, 5, 9, 7], 6, [1, 1, 1, 1], 1 << 30, DType::F16, false),
        ([2, 6, 9, 7], 6, [1, 1, 1, 1], 1 << 30, DType::F32, true),
        ([2, 36, 17, 16], 36, [1, 1, 1, 1], 96 << 10, DType::F32, true),
    ];
    for (shape, cout, padding, budget, dtype, residual) in cases {
        let cin = shape[1];
        let [top, left, bottom, right] = padding;
        // burn's convolution gets the f32 values an f16 weight holds.
        let weight = scaled_noise(cout * cin * 9, 6, ((cin * 9) as f32).sqrt().recip());
        let weight = if dtype == DType::F16 { f16_exact(weight) } else { weight };
        let weight = to_device(weight, [cout, cin, 3, 3], &tracked);
        let bias = to_device(scaled_noise(cout, 7, 1.0), [cout], &tracked);
        let x = to_device(scaled_noise(shape.iter().product(), 5, 1.0), shape, &tracked);
        let burns = |x: Tensor<4>| {
            let padded = x.clone().pad([(top, bottom), (left, right)], 0.0);
            let out = conv2d(padded, weight.clone(), Some(bias.clone()), ConvOptions::new([1, 1], [0, 0], [1, 1], 1));
            if residual { out + x } else { out }
        };
        for (kernel, tile, conv) in winograd_kernels() {
            let plan = winograd::Plan { tile, padding, budget, upsample: false };
            let ours =
                |x: Tensor<4>| conv(x.clone(), weight.clone().cast(dtype), bias.clone(), residual.then_some(x), plan);
            let what = format!(
                "winograd {tile} {kernel} {shape:?} -> {cout} {padding:?} budget {budget} {dtype:?} residual {residual}"
            );
            assert_gradients_match(&what, x.clone(), &ours, &burns);
        }
    }
}

/// SD 1.x transformers' 1x1 projections on a GPU (`model::conv::pointwise_to_tokens` and
/// `pointwise_from_tokens`: one product that reads the image as tokens, or the tokens as an
/// image, in place, the latter adding the residual as it writes) against burn's convolution and
/// sum on the same device, within 1e-5 of the result's scale.
#[test]
fn pointwise_projections_match_burns_convolution() {
    use burn::nn::conv::Conv2dConfig;
    use sdw::model::conv::{pointwise_from_tokens, pointwise_to_tokens};
    let Some(gpu) = wgpu() else { return };
    let d = &gpu.device;
    let [b, cin, cout, h, w] = [2, 40, 36, 9, 7];
    let mut c = Conv2dConfig::new([cin, cout], [1, 1]).init(d);
    c.weight = Param::from_tensor(to_device(scaled_noise(cout * cin, 6, 0.2), [cout, cin, 1, 1], d));
    c.bias = Some(Param::from_tensor(to_device(scaled_noise(cout, 7, 1.0), [cout], d)));
    let x = to_device(scaled_noise(b * cin * h * w, 5, 1.0), [b, cin, h, w], d);
    let want = c.forward(x.clone()).reshape([b, cout, h * w]).swap_dims(1, 2);
    let got = pointwise_to_tokens(&c, x.clone());
    assert_within_scale("1x1 convolution as tokens", &to_host(got), &to_host(want), 1e-5);
    let tokens = x.clone().reshape([b, cin, h * w]).swap_dims(1, 2).into_data();
    let tokens = Tensor::<3>::from_data(tokens, d);
    let residual = to_device(scaled_noise(b * cout * h * w, 8, 1.0), [b, cout, h, w], d);
    let want = c.forward(x) + residual.clone();
    let got = pointwise_from_tokens(&c, tokens, [h, w], residual);
    assert_within_scale("tokens through a 1x1 convolution + residual", &to_host(got), &to_host(want), 1e-5);
}

type WinogradFn = fn(Tensor<4>, Tensor<4>, Tensor<1>, Option<Tensor<4>>, sdw::shaders::winograd::Plan) -> Tensor<4>;

/// Winograd's convolution by each tile size, by the WGSL shaders and by their cube twins.
fn winograd_kernels() -> Vec<(&'static str, sdw::shaders::winograd::Tile, WinogradFn)> {
    use sdw::shaders::winograd::{self, Tile};
    let kernels: [(&str, WinogradFn); 2] =
        [("WGSL shaders", winograd::conv3x3), ("cube kernels", winograd::conv3x3_portable)];
    [Tile::F2, Tile::F4].into_iter().flat_map(|tile| kernels.map(|(name, run)| (name, tile, run))).collect()
}

/// Normal noise times `scale`.
fn scaled_noise(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    sdw::sampling::Philox::new(seed).randn(n).iter().map(|v| v * scale).collect()
}

/// The largest difference within `bound` times the largest magnitude of `want`.
fn assert_within_scale(what: &str, got: &HostTensor, want: &HostTensor, bound: f32) {
    assert_eq!(got.shape, want.shape, "{what}");
    let err = got.data.iter().zip(&want.data).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    let scale = want.data.iter().fold(0f32, |m, v| m.max(v.abs()));
    eprintln!("{what}: max error {err:.2e} of {scale:.2e}");
    assert!(err <= bound * scale, "{what}: max error {err} of {scale}");
}

/// `v` rounded to f16 values, so that an f16 operand holds exactly what the host multiplies.
fn f16_exact(v: Vec<f32>) -> Vec<f32> {
    v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
}

/// `a · b` in f64 on the host, for `[batch, m, k]` and `[batch or 1, k, n]` operands.
fn host_product(a: &[f32], b: &[f32], [batch, m, k, n]: [usize; 4], b_batched: bool) -> Vec<f32> {
    let mut out = vec![0f32; batch * m * n];
    for (i, row) in out.chunks_mut(n).enumerate() {
        let (item, r) = (i / m, i % m);
        let bb = if b_batched { item * k * n } else { 0 };
        for (j, o) in row.iter_mut().enumerate() {
            let a_row = &a[(item * m + r) * k..][..k];
            *o = a_row.iter().enumerate().map(|(p, &x)| x as f64 * b[bb + p * n + j] as f64).sum::<f64>() as f32;
        }
    }
    out
}

/// The matrix-product shaders, each with each tile and dtype it takes (`matmul.wgsl`: f32 and
/// f16; `matmul_coop.wgsl`: f16, where the adapter has cooperative matrices), against the f64
/// product on the host: sizes that are not multiples of the tiles, either operand broadcast
/// over the batch (a convolution's weight is the left one), transposed views (read through
/// their strides, no copy), views at an offset into their buffer, two batch dims read in place
/// through their own strides (attention's heads) and outer dims that need a copy. And
/// `matmul::matmul` (the fastest of the shaders and burn's kernels) on a product big enough
/// to be tuned.
#[test]
fn matmul_shaders_match_the_product() {
    let Some(gpu) = wgpu() else { return };
    let d = &gpu.device;
    let mut kernels: Vec<(Kernel, DType)> =
        matmul::TILES.iter().flat_map(|&t| [(Kernel::Tiled(t), DType::F32), (Kernel::Tiled(t), DType::F16)]).collect();
    if sdw::device::f16_cooperative().is_some() {
        // What the tuner asks before it may offer the shader.
        assert_eq!(matmul::cooperative_status(d).as_ref().map(|_| ()), Ok(()), "the tensor-core shader's own probe");
        kernels.extend(matmul::TILES.map(|t| (Kernel::Cooperative(t), DType::F16)));
    } else {
        // CI runs this test again on a lavapipe that has them (.ci/lavapipe-coop), and asks.
        let required = std::env::var_os("SDW_TEST_REQUIRE_COOPERATIVE").is_some();
        assert!(!required, "{} has no f16 cooperative matrices for WGSL", gpu.description);
        eprintln!("note: {} has no f16 cooperative matrices for WGSL: matmul_coop.wgsl not tested", gpu.description);
    }
    let direct = kernels.iter().any(|(k, _)| matches!(k, Kernel::Cooperative(_)));
    for (kernel, dtype) in kernels {
        check_product(kernel, dtype, d);
    }
    if direct {
        for tile in matmul::TILES {
            check_direct_product(Kernel::CooperativeDirect(tile), d);
        }
    }
    // Tuned: whichever kernel wins on this device, in f32 and in f16.
    let values = |n: usize, seed: u64| sdw::sampling::Philox::new(seed).randn(n);
    let (a, b) = (values(2 * 256 * 256, 5), values(256 * 256, 6));
    let want = HostTensor::new(vec![2, 256, 256], host_product(&a, &b, [2, 256, 256, 256], false));
    let got = matmul::matmul(to_device(a.clone(), [2, 256, 256], d), to_device(b.clone(), [1, 256, 256], d));
    assert_close("tuned matmul [2,256,256] x [1,256,256]", &to_host(got), &want, 1e-5);
    let (a, b) = (f16_exact(a), f16_exact(b));
    let want = HostTensor::new(vec![2, 256, 256], host_product(&a, &b, [2, 256, 256, 256], false));
    let on = |v: Vec<f32>, shape| to_device(v, shape, d).cast(DType::F16);
    let got = matmul::matmul(on(a, [2, 256, 256]), on(b, [1, 256, 256]));
    assert_close("tuned matmul f16 [2,256,256] x [1,256,256]", &to_host(got), &want, 1e-3);
}

/// The tensor-core shader's direct loads, on products that its fragments tile (multiples of 16):
/// row-major and column-major operands, either one broadcast over the batch, a query chunk at
/// an offset into its buffer times K^T, attention's heads read in place, tiles that reach past
/// M and N.
fn check_direct_product(kernel: Kernel, d: &burn::tensor::Device) {
    let values = |n: usize, seed: u64| f16_exact(sdw::sampling::Philox::new(seed).randn(n));
    let on = |v: Vec<f32>, shape: [usize; 3]| to_device(v, shape, d).cast(DType::F16);
    let check = |what: &str, got: Tensor<3>, want: HostTensor| {
        assert_close(&format!("{kernel:?} {what}"), &to_host(got), &want, 1e-3)
    };
    for (batch, m, k, n, b_batched) in [(2, 96, 64, 80, true), (3, 144, 32, 48, false)] {
        let bb = if b_batched { batch } else { 1 };
        let (a, b) = (values(batch * m * k, 1), values(bb * k * n, 2));
        let want = HostTensor::new(vec![batch, m, n], host_product(&a, &b, [batch, m, k, n], b_batched));
        let what = format!("[{batch},{m},{k}] x [{bb},{k},{n}]");
        let got = matmul::matmul_with(on(a.clone(), [batch, m, k]), on(b.clone(), [bb, k, n]), kernel);
        check(&what, got, want.clone());
        // Column-major operands: A from [B, K, M], B from [B, N, K].
        let at = on(a, [batch, m, k]).swap_dims(1, 2).into_data();
        let bt = on(b, [bb, k, n]).swap_dims(1, 2).into_data();
        let (at, bt) = (Tensor::<3>::from_data(at, d).cast(DType::F16), Tensor::<3>::from_data(bt, d).cast(DType::F16));
        let got = matmul::matmul_with(at.swap_dims(1, 2), bt.swap_dims(1, 2), kernel);
        check(&format!("column-major {what}"), got, want);
    }
    let (w, cols) = (values(48 * 32, 12), values(3 * 32 * 80, 13));
    let repeated: Vec<f32> = w.iter().copied().cycle().take(3 * 48 * 32).collect();
    let want = HostTensor::new(vec![3, 48, 80], host_product(&repeated, &cols, [3, 48, 32, 80], true));
    check("[1,48,32] x [3,32,80]", matmul::matmul_with(on(w, [1, 48, 32]), on(cols, [3, 32, 80]), kernel), want);
    let (q, k) = (values(16 * 160 * 48, 10), values(16 * 160 * 48, 11));
    let rows: Vec<f32> = (0..16).flat_map(|bh| &q[(bh * 160 + 64) * 48..][..64 * 48]).copied().collect();
    let kt: Vec<f32> = (0..16 * 48 * 160)
        .map(|i| (i / (48 * 160), i / 160 % 48, i % 160))
        .map(|(bh, p, j)| k[(bh * 160 + j) * 48 + p])
        .collect();
    let want = HostTensor::new(vec![16, 64, 160], host_product(&rows, &kt, [16, 64, 48, 160], true));
    let qd = to_device(q, [2, 8, 160, 48], d).cast(DType::F16).slice([0..2, 0..8, 64..128]);
    let kd = to_device(k, [2, 8, 160, 48], d).cast(DType::F16).swap_dims(2, 3);
    check("q[64..128] x k^T", matmul::matmul_with(qd, kd, kernel).reshape([16, 64, 160]), want);
    // Heads read in place: [2, 3, 48, 32] seen in a [2, 48, 3, 32] buffer.
    let (a, b) = (values(6 * 48 * 32, 14), values(6 * 32 * 64, 15));
    let want = HostTensor::new(vec![6, 48, 64], host_product(&a, &b, [6, 48, 32, 64], true));
    let heads = stored_swapped(on(a, [6, 48, 32]).reshape([2, 3, 48, 32]), (1, 2));
    let got = matmul::matmul_with(heads, on(b, [6, 32, 64]).reshape([2, 3, 32, 64]), kernel);
    check("heads [2,3,48,32] of [2,48,3,32] x [2,3,32,64]", got.reshape([6, 48, 64]), want);
}

/// `t`'s values in a buffer laid out with dims `i` and `j` swapped, seen in `t`'s order: a
/// view whose strides are not in decreasing order.
fn stored_swapped<const D: usize>(t: Tensor<D>, (i, j): (usize, usize)) -> Tensor<D> {
    let (dtype, d) = (t.dtype(), t.device());
    Tensor::<D>::from_data(t.swap_dims(i, j).into_data(), &d).cast(dtype).swap_dims(i, j)
}

/// One shader's cases (see above). In f16 the operands are rounded to f16 on the host too:
/// with f32 sums only the output's rounding (2^-11 at most) remains, hence 1e-3.
fn check_product(kernel: Kernel, dtype: DType, d: &burn::tensor::Device) {
    let f16 = dtype == DType::F16;
    let values = |n: usize, seed: u64| {
        let v = sdw::sampling::Philox::new(seed).randn(n);
        if f16 { f16_exact(v) } else { v }
    };
    let bound = if f16 { 1e-3 } else { 1e-5 };
    let on = |v: Vec<f32>, shape: [usize; 3]| to_device(v, shape, d).cast(dtype);
    let check = |what: String, got: Tensor<3>, want: HostTensor| {
        assert_close(&format!("{kernel:?} {dtype:?} {what}"), &to_host(got), &want, bound)
    };
    for (batch, m, k, n, b_batched) in
        [(2, 300, 200, 150, true), (3, 70, 36, 260, false), (1, 1, 5, 1, true), (2, 129, 1, 131, true)]
    {
        let bb = if b_batched { batch } else { 1 };
        let (a, b) = (values(batch * m * k, 1), values(bb * k * n, 2));
        let want = HostTensor::new(vec![batch, m, n], host_product(&a, &b, [batch, m, k, n], b_batched));
        let what = format!("[{batch},{m},{k}] x [{bb},{k},{n}]");
        let got = matmul::matmul_with(on(a.clone(), [batch, m, k]), on(b.clone(), [bb, k, n]), kernel);
        check(what.clone(), got, want.clone());
        // Transposed views: A from [B, K, M], B from [B, N, K].
        let at = on(a, [batch, m, k]).swap_dims(1, 2).into_data();
        let bt = on(b, [bb, k, n]).swap_dims(1, 2).into_data();
        let (at, bt) = (Tensor::<3>::from_data(at, d).cast(dtype), Tensor::<3>::from_data(bt, d).cast(dtype));
        let got = matmul::matmul_with(at.swap_dims(1, 2), bt.swap_dims(1, 2), kernel);
        check(format!("transposed {what}"), got, want);
    }
    // Batch dims read through two strides (outer, inner): attention's heads, seen as
    // [B, H, S, D] in [B, S, H, D] projections; dims stored in the other order ([3, 2, ..]
    // seen as [2, 3, ..]); and outer dims that do not merge into one stride, which the shader
    // gets as a contiguous copy ([3, 2, 2, ..] seen as [2, 3, 2, ..]).
    let (a, b) = (values(12 * 40 * 24, 3), values(12 * 24 * 50, 4));
    let want = HostTensor::new(vec![12, 40, 50], host_product(&a, &b, [12, 40, 24, 50], true));
    let (half_a, half_b, half_c) = (6 * 40 * 24, 6 * 24 * 50, 6 * 40 * 50);
    for (what, swap) in [("heads [2,3,40,24] of [2,40,3,24]", (1, 2)), ("[2,3,40,24] stored [3,2,40,24]", (0, 1))] {
        let a4 = stored_swapped(to_device(a[..half_a].to_vec(), [2, 3, 40, 24], d).cast(dtype), swap);
        let got = matmul::matmul_with(a4, to_device(b[..half_b].to_vec(), [2, 3, 24, 50], d).cast(dtype), kernel);
        let want = HostTensor::new(vec![6, 40, 50], want.data[..half_c].to_vec());
        check(format!("{what} x [2,3,24,50]"), got.reshape([6, 40, 50]), want);
    }
    let a5 = stored_swapped(to_device(a, [2, 3, 2, 40, 24], d).cast(dtype), (0, 1));
    let got = matmul::matmul_with(a5, to_device(b, [2, 3, 2, 24, 50], d).cast(dtype), kernel);
    check("[2,3,2,40,24] stored [3,2,2,40,24] x [2,3,2,24,50]".into(), got.reshape([12, 40, 50]), want);
    // As a convolution's product: its weight broadcast over the batch of im2col columns.
    let (w, cols) = (values(70 * 36, 12), values(3 * 36 * 260, 13));
    let repeated: Vec<f32> = w.iter().copied().cycle().take(3 * 70 * 36).collect();
    let want = HostTensor::new(vec![3, 70, 260], host_product(&repeated, &cols, [3, 70, 36, 260], true));
    let got = matmul::matmul_with(on(w, [1, 70, 36]), on(cols, [3, 36, 260]), kernel);
    check("[1,70,36] x [3,36,260]".into(), got, want);
    // As attention's products read their operands: a chunk of query rows (a view at an
    // offset into its buffer) times the keys transposed (a view through strides).
    let (q, k) = (values(16 * 300 * 40, 10), values(16 * 300 * 40, 11));
    let rows: Vec<f32> = (0..16).flat_map(|bh| &q[(bh * 300 + 64) * 40..][..64 * 40]).copied().collect();
    let kt: Vec<f32> = (0..16 * 40 * 300)
        .map(|i| (i / 12000, i / 300 % 40, i % 300))
        .map(|(bh, p, j)| k[(bh * 300 + j) * 40 + p])
        .collect();
    let want = HostTensor::new(vec![16, 64, 300], host_product(&rows, &kt, [16, 64, 40, 300], true));
    let qd = to_device(q, [2, 8, 300, 40], d).cast(dtype).slice([0..2, 0..8, 64..128]);
    let kd = to_device(k, [2, 8, 300, 40], d).cast(dtype).swap_dims(2, 3);
    let got = matmul::matmul_with(qd, kd, kernel).reshape([16, 64, 300]);
    check("q[64..128] x k^T".into(), got, want);
}

/// `matmul_add`: the product plus an addend, which the shaders add as they write the product,
/// against the host's product and sum, for every kernel that takes it (the shaders with each
/// tile and dtype, the small products' route, the tuned choice, burn's on the CPU): a linear
/// layer's bias (broadcast over the rows), a convolution's (over the columns, the weight
/// broadcast over the batch), a LoRA's base output (a full addend), one broadcast over the
/// batch, and one read through transposed strides; and each of them with a second, full
/// addend (a residual). And the product scaled as it is written (attention's scores).
#[test]
fn matmul_add_matches_the_product_and_sum() {
    let mut kernels: Vec<(Option<Kernel>, DType)> = vec![(None, DType::F32)];
    if let Some(gpu) = wgpu() {
        let d = &gpu.device;
        kernels
            .extend(matmul::TILES.iter().flat_map(|&t| [DType::F32, DType::F16].map(|f| (Some(Kernel::Tiled(t)), f))));
        kernels.extend([(Some(Kernel::Untuned), DType::F32), (Some(Kernel::Tuned), DType::F32), (None, DType::F16)]);
        if matmul::cooperative_status(d).is_ok() {
            kernels.extend(matmul::TILES.map(|t| (Some(Kernel::Cooperative(t)), DType::F16)));
        }
        for (kernel, dtype) in kernels.drain(..) {
            check_product_add(kernel, dtype, d);
        }
    }
    let cpu = burn::tensor::Device::flex();
    check_product_add(None, DType::F32, &cpu);
    check_product_add(Some(Kernel::Burn), DType::F32, &cpu);
}

/// One kernel's cases of [`matmul_add_matches_the_product_and_sum`] (`None`: `matmul_add`'s
/// own choice).
fn check_product_add(kernel: Option<Kernel>, dtype: DType, d: &burn::tensor::Device) {
    let f16 = dtype == DType::F16;
    let values = |n: usize, seed: u64| {
        let v = sdw::sampling::Philox::new(seed).randn(n);
        if f16 { f16_exact(v) } else { v }
    };
    let bound = if f16 { 1e-3 } else { 1e-5 };
    let on = |v: &[f32], shape: [usize; 3]| to_device(v.to_vec(), shape, d).cast(dtype);
    let run = |a: Tensor<3>, b: Tensor<3>, addend: Tensor<3>, second: Option<Tensor<3>>| match kernel {
        Some(kernel) => matmul::matmul_add_with(a, b, addend, second, kernel),
        None => matmul::matmul_add(a, b, addend, second),
    };
    // [batch, m, k, n], lhs broadcast over the batch, the addend's shape.
    let cases: [([usize; 4], bool, [usize; 3]); 5] = [
        ([1, 300, 200, 150], false, [1, 1, 150]),
        ([3, 70, 36, 260], true, [1, 70, 1]),
        ([2, 129, 4, 131], false, [2, 129, 131]),
        ([2, 65, 40, 70], false, [1, 65, 70]),
        ([1, 1, 5, 1], false, [1, 1, 1]),
    ];
    for ([batch, m, k, n], lhs_broadcast, addend_shape) in cases {
        let lb = if lhs_broadcast { 1 } else { batch };
        let (a, b) = (values(lb * m * k, 1), values(batch * k * n, 2));
        let addend = values(addend_shape.iter().product(), 3);
        let a_full: Vec<f32> =
            (0..batch).flat_map(|i| a[if lhs_broadcast { 0 } else { i * m * k }..][..m * k].to_vec()).collect();
        let mut want = host_product(&a_full, &b, [batch, m, k, n], true);
        let [ab, am, an] = addend_shape;
        for (i, w) in want.iter_mut().enumerate() {
            let (z, r, c) = (i / (m * n), i / n % m, i % n);
            *w += addend[(z % ab) * am * an + (r % am) * an + c % an];
        }
        let want = HostTensor::new(vec![batch, m, n], want);
        let what = format!("{kernel:?} {dtype:?} [{lb},{m},{k}] x [{batch},{k},{n}] + {addend_shape:?}");
        let got = run(on(&a, [lb, m, k]), on(&b, [batch, k, n]), on(&addend, addend_shape), None);
        assert_close(&what, &to_host(got), &want, bound);
        if addend_shape == [batch, m, n] {
            // The addend read through strides: stored [B, N, M], seen as [B, M, N].
            let transposed = stored_swapped(on(&addend, addend_shape), (1, 2));
            let got = run(on(&a, [lb, m, k]), on(&b, [batch, k, n]), transposed, None);
            assert_close(&format!("{what} (transposed)"), &to_host(got), &want, bound);
        }
        // A second addend, the output's shape: a residual after a bias.
        let second = values(batch * m * n, 4);
        let want2 = HostTensor::new(vec![batch, m, n], want.data.iter().zip(&second).map(|(w, e)| w + e).collect());
        let got =
            run(on(&a, [lb, m, k]), on(&b, [batch, k, n]), on(&addend, addend_shape), Some(on(&second, [batch, m, n])));
        assert_close(&format!("{what} + [{batch},{m},{n}]"), &to_host(got), &want2, bound);
        // Scaled by a power of two, so that the f16 product is the host's scaled exactly.
        let scaled = HostTensor::new(
            vec![batch, m, n],
            host_product(&a_full, &b, [batch, m, k, n], true).iter().map(|v| v * 0.125).collect(),
        );
        let got = match kernel {
            Some(kernel) => matmul::matmul_scaled_with(on(&a, [lb, m, k]), on(&b, [batch, k, n]), 0.125, kernel),
            None => on(&a, [lb, m, k]).mul_scalar(0.125).matmul(on(&b, [batch, k, n])),
        };
        assert_close(
            &format!("{kernel:?} {dtype:?} 0.125 · [{lb},{m},{k}] x [{batch},{k},{n}]"),
            &to_host(got),
            &scaled,
            bound,
        );
    }
}

/// `matmul_add`'s gradients under autodiff, on each device: `loss = sum((A·B + D (+ E)) ⊙ G)`,
/// so dA = G·Bᵀ, dB = Aᵀ·G, dD = G summed over the dims D is broadcast along (dE likewise): a
/// trainable full addend (a LoRA's base output), a trainable bias, a frozen f16 bias with f32
/// activations (widened by the product, as a frozen weight is), and a trainable bias with a
/// trainable full second addend (a residual).
#[test]
fn matmul_add_gradients_match() {
    for c in devices() {
        let d = &c.device;
        let values = |n: usize, seed: u64| sdw::sampling::Philox::new(seed).randn(n);
        let (m, k, n) = (130, 24, 70);
        let (a, b, g) = (values(m * k, 1), values(k * n, 2), values(m * n, 3));
        let cases =
            [([m, n], None, false), ([1, n], None, false), ([1, n], Some(DType::F16), false), ([1, n], None, true)];
        for (addend_shape, frozen, residual) in cases {
            let addend = f16_exact(values(addend_shape.iter().product(), 4));
            let second = values(m * n, 5);
            let what = format!(
                "[{m},{k}] x [{k},{n}] + {addend_shape:?} frozen {frozen:?} residual {residual} [{}]",
                c.description
            );
            let tensor = |v: &[f32], shape: [usize; 2]| to_device(v.to_vec(), shape, d);
            let (lhs, rhs) =
                (tensor(&a, [m, k]).autodiff().require_grad(), tensor(&b, [k, n]).autodiff().require_grad());
            let dt = tensor(&addend, addend_shape);
            let dt = match frozen {
                Some(dtype) => dt.cast(dtype).autodiff(),
                None => dt.autodiff().require_grad(),
            };
            let et = residual.then(|| tensor(&second, [m, n]).autodiff().require_grad());
            let out = matmul::matmul_add(lhs.clone(), rhs.clone(), dt.clone(), et.clone());
            let mut want = host_product(&a, &b, [1, m, k, n], true);
            for (i, w) in want.iter_mut().enumerate() {
                *w += addend[if addend_shape[0] == 1 { i % n } else { i }] + if residual { second[i] } else { 0.0 };
            }
            assert_close(
                &format!("{what}: sum"),
                &to_host(out.clone().inner()),
                &HostTensor::new(vec![m, n], want),
                1e-5,
            );
            let grads = (out * tensor(&g, [m, n]).autodiff()).sum().backward();
            let transpose = |v: &[f32], rows: usize, cols: usize| -> Vec<f32> {
                (0..rows * cols).map(|i| v[(i % rows) * cols + i / rows]).collect()
            };
            let da = host_product(&g, &transpose(&b, k, n), [1, m, n, k], true);
            let db = host_product(&transpose(&a, m, k), &g, [1, k, m, n], true);
            assert_close(
                &format!("{what}: dA"),
                &to_host(lhs.grad(&grads).unwrap()),
                &HostTensor::new(vec![m, k], da),
                1e-5,
            );
            assert_close(
                &format!("{what}: dB"),
                &to_host(rhs.grad(&grads).unwrap()),
                &HostTensor::new(vec![k, n], db),
                1e-5,
            );
            match frozen {
                Some(_) => assert!(dt.grad(&grads).is_none(), "{what}: a frozen addend has no gradient"),
                None => {
                    let dd: Vec<f32> = if addend_shape[0] == 1 {
                        (0..n).map(|j| (0..m).map(|i| g[i * n + j] as f64).sum::<f64>() as f32).collect()
                    } else {
                        g.clone()
                    };
                    let got = to_host(dt.grad(&grads).expect("D's gradient"));
                    assert_close(&format!("{what}: dD"), &got, &HostTensor::new(addend_shape.to_vec(), dd), 1e-5);
                }
            }
            if let Some(et) = et {
                let got = to_host(et.grad(&grads).expect("E's gradient"));
                assert_close(&format!("{what}: dE"), &got, &HostTensor::new(vec![m, n], g.clone()), 1e-5);
            }
        }
    }
}

/// Attention as two products around a softmax (what `model::attention_tuned` may choose on a
/// WGSL device), in one chunk and in chunks that do not divide the queries, in f16, and
/// attention as the model calls it (tuned), against burn's attention on the CPU:
/// self-attention with 40-wide heads and cross-attention over 77 tokens, both big enough to
/// be tuned.
#[test]
fn attention_products_match_burns_attention() {
    let Some(gpu) = wgpu() else { return };
    let (d, cpu) = (&gpu.device, burn::tensor::Device::flex());
    let values = |n: usize, seed: u64| sdw::sampling::Philox::new(seed).randn(n);
    for (queries, keys) in [(300, 300), (512, 77)] {
        let (b, heads, width) = (2, 8, 40);
        let (q, k, v) = (
            values(b * queries * heads * width, 7),
            values(b * keys * heads * width, 8),
            values(b * keys * heads * width, 9),
        );
        let on = |x: &[f32], s: usize, dev| to_device(x.to_vec(), [b, s, heads * width], dev);
        let heads4 = |t: Tensor<3>, s: usize| t.reshape([b, s, heads, width]).swap_dims(1, 2);
        let want = to_host(sdw::model::attention::attention_with_budget(
            on(&q, queries, &cpu),
            on(&k, keys, &cpu),
            on(&v, keys, &cpu),
            heads,
            false,
            1 << 30,
        ));
        for chunk in [queries, 70] {
            let got = sdw::model::attention_tuned::products_only(
                heads4(on(&q, queries, d), queries),
                heads4(on(&k, keys, d), keys),
                heads4(on(&v, keys, d), keys),
                chunk,
            );
            let got = to_host(got.swap_dims(1, 2).reshape([b, queries, heads * width]));
            assert_close(
                &format!("attention as products, {queries}x{keys}, {chunk} rows per chunk"),
                &got,
                &want,
                1e-5,
            );
        }
        // In f16 (`--precision f16`), held to the f16 bound of one module (model_parity.rs).
        let half = |x: &[f32], s: usize| heads4(on(x, s, d), s).cast(DType::F16);
        let got = sdw::model::attention_tuned::products_only(half(&q, queries), half(&k, keys), half(&v, keys), 70);
        let got = to_host(got.swap_dims(1, 2).reshape([b, queries, heads * width]));
        assert_close(&format!("attention as products in f16, {queries}x{keys}"), &got, &want, 1e-2);
        let got = sdw::model::attention::attention_with_budget(
            on(&q, queries, d),
            on(&k, keys, d),
            on(&v, keys, d),
            heads,
            false,
            1 << 20,
        );
        assert_close(&format!("attention tuned, {queries}x{keys}"), &to_host(got), &want, 1e-5);
    }
    // Attentions too small to tune (the products by burn's matmul) and the VAE's 512-wide
    // head (no flash kernel: the products, tuned), as the model routes them.
    for [b, heads, width, queries, keys] in [[2, 8, 40, 64, 64], [2, 8, 80, 16, 77], [1, 1, 512, 256, 256]] {
        let (q, k, v) = (
            values(b * queries * heads * width, 17),
            values(b * keys * heads * width, 18),
            values(b * keys * heads * width, 19),
        );
        let run = |dev| {
            let on = |x: &[f32], s: usize| to_device(x.to_vec(), [b, s, heads * width], dev);
            sdw::model::attention::attention_with_budget(
                on(&q, queries),
                on(&k, keys),
                on(&v, keys),
                heads,
                false,
                1 << 20,
            )
        };
        let what = format!("attention routed, {heads} heads of {width}, {queries}x{keys}");
        assert_close(&what, &to_host(run(d)), &to_host(run(&cpu)), 1e-5);
    }
}

/// Each built-in shader compiles and names its interface (`// interface: NAME N`).
#[test]
fn builtin_shaders_compile() {
    for s in SHADERS {
        shaders::check(s, s.source).unwrap_or_else(|e| panic!("{}: {e}", s.name));
        let named = shaders::interface(s.source).and_then(|i| i.split_whitespace().next());
        assert_eq!(named, s.name.strip_suffix(".wgsl"), "{}: its interface line", s.name);
    }
}

#[test]
fn dump_writes_builtins_and_keeps_user_files() {
    let dir = std::env::temp_dir().join(format!("sdw-shaders-dump-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let sdw = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_sdw")).args(args).output().unwrap();
    let out = sdw(&["shaders", "dump", dir.to_str().unwrap()]);
    assert!(out.status.success());
    let file = dir.join("group_norm.wgsl");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), shaders::builtin("group_norm.wgsl").source);
    std::fs::write(&file, "// my edit\n").unwrap();
    let out = sdw(&["shaders", "dump", dir.to_str().unwrap()]);
    assert!(out.status.success());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "// my edit\n", "a user's file was overwritten");
    assert!(String::from_utf8_lossy(&out.stderr).contains("kept"));
}

/// A shader from --shader-dir is used when it compiles; a broken one is reported with its
/// name and line, one for another interface (dumped by another version of sdw) with both
/// interfaces, and the built-in one runs (the image is still right).
#[test]
fn shader_dir_overrides_and_reports_broken_files() {
    let devices: &[&str] = if wgpu_skipped() { &[] } else { &["wgpu"] };
    let cases = cases();
    let case = &cases["cases"]["txt2img.euler"];
    let want = rgb_bytes(&fixture("txt2img-euler.png"));
    for device in devices {
        let dir = std::env::temp_dir().join(format!("sdw-shader-dir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let builtin = shaders::builtin("group_norm.wgsl").source;
        for (name, text, expect) in [
            ("edited", format!("// an edited copy\n{builtin}"), "instead of the built-in group_norm.wgsl"),
            ("broken", builtin.replace("let mean =", "let mean = )"), "cannot be used"),
            (
                "another sdw's",
                builtin.replace(
                    &format!("// interface: {} ", shaders::interface(builtin).unwrap()),
                    "// interface: group_norm 0 ",
                ),
                "another version",
            ),
        ] {
            std::fs::write(dir.join("group_norm.wgsl"), &text).unwrap();
            let out_png = dir.join(format!("{name}.png"));
            let out = Command::new(env!("CARGO_BIN_EXE_sdw"))
                .env("SDW_CACHE_DIR", &dir)
                .args(["txt2img", "--model"])
                .arg(fixture("tiny-sd-fp16.safetensors"))
                .args(case_cli_args(case))
                .args(["--device", device, "--shader-dir"])
                .arg(&dir)
                .arg("--output")
                .arg(&out_png)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{stderr}");
            assert!(stderr.contains(expect), "{name}: {stderr}");
            if name == "broken" {
                assert!(stderr.contains("group_norm.wgsl:"), "no file:line in {stderr}");
            }
            let diff = max_level_diff(&rgb_bytes(&out_png), &want);
            assert!(diff <= 2, "{name} shader: {diff} levels from the reference");
        }
    }
}

/// Products under autodiff (training), forward and gradients, against f64 products on the
/// host, on the CPU and on wgpu (there by the tuned choice and by the tiled shader):
/// a linear layer's activations times a frozen weight, a convolution's frozen weight
/// (broadcast over the batch) times its columns, both operands trainable with the left one
/// broadcast; frozen weights in f32 and in f16 (widened by the product, `sdw train
/// --precision f16`), and a product big enough to be tuned.
#[test]
fn matmul_gradients_match_the_product() {
    for c in devices() {
        let gpu = c.max_binding.is_some();
        let mut kernels = vec![None];
        if gpu {
            kernels.extend(matmul::TILES.map(|t| Some(Kernel::Tiled(t))));
        }
        let cases: &[([usize; 4], bool, bool)] = &[
            // [batch, m, k, n], lhs broadcast over the batch, both operands trainable
            ([1, 64, 96, 72], false, false),
            ([3, 24, 36, 50], true, false),
            ([3, 20, 30, 25], true, true),
            ([1, 256, 256, 320], false, false),
        ];
        for &(dims, lhs_broadcast, both) in cases {
            for frozen in [DType::F32, DType::F16] {
                if both && frozen == DType::F16 {
                    continue;
                }
                for &kernel in &kernels {
                    check_gradients(dims, lhs_broadcast, both, frozen, kernel, &c);
                }
            }
        }
    }
}

/// One case of [`matmul_gradients_match_the_product`]: `loss = sum(A·B ⊙ G)`, so the
/// gradients are `dA = G·Bᵀ` (summed over the batch where A is broadcast) and `dB = Aᵀ·G`.
fn check_gradients(
    [batch, m, k, n]: [usize; 4],
    lhs_broadcast: bool,
    both: bool,
    frozen: DType,
    kernel: Option<Kernel>,
    c: &sdw::device::Compute,
) {
    let d = &c.device;
    let values = |n: usize, seed: u64| sdw::sampling::Philox::new(seed).randn(n);
    let lb = if lhs_broadcast { 1 } else { batch };
    let (mut a, mut b, g) = (values(lb * m * k, 11), values(batch * k * n, 12), values(batch * m * n, 13));
    // The frozen operand: B for a linear layer, A (the weight) for a convolution.
    if frozen == DType::F16 {
        if lhs_broadcast { a = f16_exact(a) } else { b = f16_exact(b) }
    }
    let what =
        format!("[{lb},{m},{k}] x [{batch},{k},{n}] frozen {frozen:?} both {both} {kernel:?} [{}]", c.description);
    // `[items, rows, cols]` -> `[items, cols, rows]`.
    let transpose = |v: &[f32], rows: usize, cols: usize| -> Vec<f32> {
        let mut t = vec![0f32; v.len()];
        for (i, x) in v.iter().enumerate() {
            let (item, r, col) = (i / (rows * cols), i / cols % rows, i % cols);
            t[item * rows * cols + col * rows + r] = *x;
        }
        t
    };
    // Forward, with A repeated over the batch when it is broadcast.
    let a_full: Vec<f32> =
        (0..batch).flat_map(|i| a[if lhs_broadcast { 0 } else { i * m * k }..][..m * k].to_vec()).collect();
    let want = HostTensor::new(vec![batch, m, n], host_product(&a_full, &b, [batch, m, k, n], true));
    // dA = G · Bᵀ, summed over the batch when A is broadcast; dB = Aᵀ · G.
    let bt = transpose(&b, k, n);
    let mut da = host_product(&g, &bt, [batch, m, n, k], true);
    if lhs_broadcast {
        da = (0..m * k).map(|i| (0..batch).map(|j| da[j * m * k + i]).sum()).collect();
    }
    let at = transpose(&a_full, m, k);
    let db = host_product(&at, &g, [batch, k, m, n], true);

    let tensor = |v: &[f32], shape: [usize; 3]| to_device(v.to_vec(), shape, d);
    let trainable = |t: Tensor<3>| t.autodiff().require_grad();
    let (lhs, rhs) = (tensor(&a, [lb, m, k]), tensor(&b, [batch, k, n]));
    let (lhs, rhs) = match (lhs_broadcast, both) {
        (_, true) => (trainable(lhs), trainable(rhs)),
        (true, false) => (lhs.cast(frozen), trainable(rhs)),
        (false, false) => (trainable(lhs), rhs.cast(frozen)),
    };
    let out = match kernel {
        Some(kernel) => matmul::matmul_with(lhs.clone(), rhs.clone(), kernel),
        None => matmul::matmul(lhs.clone(), rhs.clone()),
    };
    assert_close(&format!("{what}: product"), &to_host(out.clone().inner()), &want, 1e-5);
    let grads = (out * tensor(&g, [batch, m, n]).autodiff()).sum().backward();
    if lhs_broadcast || both {
        let got = to_host(rhs.grad(&grads).expect("B's gradient"));
        assert_close(&format!("{what}: dB"), &got, &HostTensor::new(vec![batch, k, n], db), 1e-5);
    }
    if !lhs_broadcast || both {
        let got = to_host(lhs.grad(&grads).expect("A's gradient"));
        assert_close(&format!("{what}: dA"), &got, &HostTensor::new(vec![lb, m, k], da), 1e-5);
    }
}
