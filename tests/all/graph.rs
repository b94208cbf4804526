//! Steps recorded as a graph of kernels and replayed (`model::graph`, `CfgDenoiser`).

use sdw::pipeline::StableDiffusion;
use sdw::pipeline::denoiser::CfgDenoiser;
use sdw::sampling::Philox;

use crate::common::{fixture, wgpu};

/// On a GPU the denoiser records its call once the UNet has run one of its shapes kernel by
/// kernel (the second call of the first image, the first of a later image of the same shapes),
/// and replays the graph after that, with new latents and timesteps written into its inputs.
/// Every call must give what the same denoiser computes kernel by kernel: also when the prompt
/// schedule moves on (prompt editing: recorded again, at once for a prompt as long) and when
/// the prompts differ in length (two UNet calls per step instead of a batch). The same kernels
/// on the same numbers, so the results are equal up to the order of floating-point sums, which
/// some GPU kernels do not fix.
#[test]
fn replayed_steps_match_the_steps_kernel_by_kernel() {
    let Some(c) = wgpu() else { return };
    let sd = StableDiffusion::load(&fixture("tiny-sd-fp16.safetensors"), c).unwrap();
    let uncond = vec![(0, sd.encode_prompt("", 1))];
    let long = sd.encode_prompt(&["a very long prompt"; 30].join(", "), 1);
    assert!(long.dims()[1] > uncond[0].1.dims()[1], "a prompt over 75 tokens takes two chunks");
    // The cat until call 2, then the dog; a prompt as long as two chunks.
    let edited = vec![(2, sd.encode_prompt("a photo of a cat", 1)), (usize::MAX, sd.encode_prompt("a dog", 1))];
    // Replays: the edited prompt's first image records at calls 1 and 2 (the dog's context is
    // as long as the cat's); the long prompt's shapes are new (call 0 kernel by kernel); a
    // second image of the edited prompt records at calls 0 and 2. At 32x32 latents the
    // UNet's outer convolutions take Winograd's kernels (`shaders::winograd`) into the graph.
    let cat = vec![(0, sd.encode_prompt("a photo of a cat", 1))];
    let cases = [(edited.clone(), 8, 6, 3), (vec![(0, long)], 8, 4, 2), (edited, 8, 4, 2), (cat, 32, 3, 1)];
    for (cond, side, calls, replays) in cases {
        let denoiser = || CfgDenoiser::scheduled(&sd.unet, cond.clone(), uncond.clone(), 7.5, [1, 4, side, side]);
        let (mut replayed, mut reference) = (denoiser(), denoiser().kernel_by_kernel());
        for call in 0..calls {
            let x = Philox::new(call as u64).randn(4 * side * side);
            let t = 950.0 - 150.0 * call as f32;
            let (got, want) = (replayed.eps(&x, t), reference.eps(&x, t));
            let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(err <= 1e-6, "call {call}: {err} from the call kernel by kernel");
        }
        assert_eq!(replayed.replays(), replays, "calls answered by a replayed graph");
        assert_eq!(reference.replays(), 0);
    }
}
