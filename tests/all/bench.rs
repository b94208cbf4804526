//! `sdw bench` runs end to end and reports every part (no timing is asserted: numbers live
//! in BENCHMARKS.md).

use std::process::Command;

use crate::common::fixture;

#[test]
fn bench_reports_every_part_as_json() {
    let out = Command::new(env!("CARGO_BIN_EXE_sdw"))
        .args([
            "bench",
            "--device",
            "cpu",
            "--size",
            "64",
            "--steps",
            "2",
            "--repeats",
            "1",
            "--train",
            "--json",
            "--model",
        ])
        .arg(fixture("tiny-sd-fp16.safetensors"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("UNet step") && stderr.contains("cold"), "no progress on stderr: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let parts: Vec<&str> = report["timings"].as_array().unwrap().iter().map(|t| t["part"].as_str().unwrap()).collect();
    for part in ["CLIP", "UNet step", "VAE decode", "txt2img 2 steps", "LoRA training step"] {
        assert!(parts.iter().any(|p| p.starts_with(part)), "{part} missing from {parts:?}");
    }
    assert!(report["it_per_s"].as_f64().unwrap() > 0.0);
    assert!(report["peak_host_bytes"].as_u64().unwrap() > 0);
    assert!(report["launch_us"].is_null(), "a kernel launch time on the CPU backend");
    assert!(report["replayed_launch_us"].is_null(), "a replayed kernel launch time on the CPU backend");
}

/// On a GPU the report also says what one small kernel costs end to end, issued alone and
/// replayed as part of a recorded graph.
#[test]
fn bench_on_a_gpu_reports_the_kernel_launch_time() {
    if crate::common::wgpu().is_none() {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_sdw"))
        .args(["bench", "--device", "wgpu", "--size", "64", "--repeats", "0", "--parts", "clip", "--json", "--model"])
        .arg(fixture("tiny-sd-fp16.safetensors"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let us = report["launch_us"].as_f64().expect("launch_us on a GPU");
    assert!(us > 0.0 && us.is_finite(), "launch_us {us}");
    let replayed = report["replayed_launch_us"].as_f64().expect("replayed_launch_us on a GPU");
    assert!(replayed > 0.0 && replayed.is_finite(), "replayed_launch_us {replayed}");
}

/// `--parts` times only what it names; `--gradient-checkpointing` times the checkpointed
/// training step; `--repeats 0` reports no warm time (null) rather than zero.
#[test]
fn bench_times_only_the_parts_asked_for() {
    let out = Command::new(env!("CARGO_BIN_EXE_sdw"))
        .args(["bench", "--device", "cpu", "--size", "64", "--repeats", "0", "--parts", "unet"])
        .args(["--train", "--gradient-checkpointing", "--json", "--model"])
        .arg(fixture("tiny-sd-fp16.safetensors"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let timings = report["timings"].as_array().unwrap();
    let parts: Vec<&str> = timings.iter().map(|t| t["part"].as_str().unwrap()).collect();
    assert_eq!(parts.len(), 2, "{parts:?}");
    assert!(parts[0].starts_with("UNet step") && parts[1].starts_with("LoRA training step, checkpointed"), "{parts:?}");
    assert!(timings.iter().all(|t| t["warm_s"].is_null() && t["cold_s"].as_f64().unwrap() > 0.0), "{timings:?}");
}

#[test]
fn bench_rejects_bad_sizes() {
    let out =
        Command::new(env!("CARGO_BIN_EXE_sdw")).args(["bench", "--device", "cpu", "--size", "100"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("multiple of 8"));
}

/// The peak counts memory held only in the middle of a part: pools give pages back within a
/// part, so a reading before and after it can miss the most it held.
#[test]
fn the_device_peak_sees_memory_given_back_within_a_part() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    let reserve = Arc::new(AtomicU64::new(100));
    let peak = {
        let reserve = reserve.clone();
        sdw::device::PeakDeviceMemory::reading(move || Some(reserve.load(Ordering::Relaxed)))
    };
    let answer = peak.during(|| {
        reserve.store(300, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        reserve.store(100, Ordering::Relaxed);
        42
    });
    assert_eq!((answer, peak.peak()), (42, Some(300)));

    // No allocator (the CPU backend): no peak, and the part still runs.
    let none = sdw::device::PeakDeviceMemory::reading(|| None);
    assert_eq!((none.during(|| 7), none.peak()), (7, None));
}
