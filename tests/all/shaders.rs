//! sdw's WGSL shaders against the burn ops they replace, on wgpu (lavapipe in CI); the
//! shader directory override; `sdw shaders dump`.

use std::process::Command;

use burn::module::Param;
use burn::nn::GroupNorm;
use burn::tensor::DType;
use sdw::model::layers::{to_device, to_host};
use sdw::shaders::{self, SHADERS, group_norm};

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
    if wgpu_skipped() {
        return;
    }
    let gpu = sdw::device::select(sdw::device::DeviceChoice::Wgpu).unwrap();
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

#[test]
fn builtin_shaders_compile() {
    for s in SHADERS {
        shaders::check(s, s.source).unwrap_or_else(|e| panic!("{}: {e}", s.name));
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
    assert_eq!(std::fs::read_to_string(&file).unwrap(), SHADERS[0].source);
    std::fs::write(&file, "// my edit\n").unwrap();
    let out = sdw(&["shaders", "dump", dir.to_str().unwrap()]);
    assert!(out.status.success());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "// my edit\n", "a user's file was overwritten");
    assert!(String::from_utf8_lossy(&out.stderr).contains("kept"));
}

/// A shader from --shader-dir is used when it compiles; a broken one is reported with its
/// name and line, and the built-in one runs (the image is still right).
#[test]
fn shader_dir_overrides_and_reports_broken_files() {
    let devices: &[&str] = if wgpu_skipped() { &[] } else { &["wgpu"] };
    let cases = cases();
    let case = &cases["cases"]["txt2img.euler"];
    let want = rgb_bytes(&fixture("txt2img-euler.png"));
    for device in devices {
        let dir = std::env::temp_dir().join(format!("sdw-shader-dir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text, expect) in [
            ("edited", format!("// an edited copy\n{}", SHADERS[0].source), "instead of the built-in group_norm.wgsl"),
            ("broken", SHADERS[0].source.replace("let mean =", "let mean = )"), "does not compile"),
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
