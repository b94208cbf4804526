//! `sdw doctor` on the CPU and on wgpu (lavapipe in CI): every check passes, one line each,
//! with the adapter's details on wgpu.

use std::process::Command;

use crate::common::wgpu_skipped;

fn doctor(device: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sdw"))
        .args(["doctor", "--device", device, "--size", "64", "--trace"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("{text}");
    (out.status.success(), text)
}

#[test]
fn doctor_passes_on_every_device() {
    let checks = sdw::doctor::checks(64).len();
    let devices: &[&str] = if wgpu_skipped() { &["cpu"] } else { &["cpu", "wgpu"] };
    for device in devices {
        let (ok, text) = doctor(device);
        assert!(ok, "sdw doctor --device {device} failed:\n{text}");
        assert_eq!(text.lines().filter(|l| l.starts_with("ok ")).count(), checks, "{text}");
        for family in [
            "matmul",
            "conv 3x3",
            "conv 1x1",
            "stride 2",
            "group norm",
            "layer norm",
            "softmax",
            "attention",
            "GEGLU",
            "upsample",
            "reductions",
            "tiny UNet",
            "tiny VAE",
            "tiny CLIP",
            "backward",
        ] {
            assert!(text.contains(family), "no {family} check:\n{text}");
        }
        // --trace: the tiny UNet layer by layer, every layer within the bound.
        for layer in
            ["time_embedding", "conv_in", "down.0.attentions.1", "mid.attentions.0", "up.3.resnets.2", "output"]
        {
            assert!(
                text.contains(&format!("  {layer} ")),
                "no trace of {layer}:
{text}"
            );
        }
        assert!(!text.contains("over the bound"), "{text}");
        if *device == "wgpu" {
            for detail in ["adapter", "subgroups", "shader f16", "max storage binding"] {
                assert!(text.contains(detail), "no {detail} line:\n{text}");
            }
        }
    }
}

#[test]
fn a_failed_check_is_named_and_fails() {
    let bad =
        sdw::doctor::CheckResult { name: "softmax".into(), error: f64::NAN, bound: 1e-4, millis: 1.0, note: None };
    assert!(!bad.passed() && bad.line().starts_with("FAIL") && bad.line().contains("softmax"));
    let good = sdw::doctor::CheckResult { error: 3e-7, ..bad };
    assert!(good.passed() && good.line().starts_with("ok"));
}

/// burn's fusion draws other images on NVIDIA (docs/upstream-bugs.md), so sdw turns it off
/// before the first op, on every device.
#[test]
fn burn_fusion_is_off() {
    let _ = sdw::device::cpu();
    assert_eq!(burn::runtime_config().fusion().beam_search.max_explorations, Some(0));
}
