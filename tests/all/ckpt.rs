//! PyTorch `.ckpt` / `.pt` files through sdw's restricted unpickler: the same weights and
//! the same images as the safetensors file, malicious pickles refused without side
//! effects, broken files explained. Fixtures under `tests/fixtures/pickle/` come from
//! `make_pickle_fixtures.py` there.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;
use sdw::device::{self, DeviceChoice};
use sdw::pipeline::StableDiffusion;
use sdw::sampling::NoProgress;
use sdw::weights::pickle::Value;
use sdw::weights::{Checkpoint, Component, HostTensor, SafetensorsFile, TorchFile, WeightsFile, load_torch_tensors};

const COMPONENTS: [Component; 3] = [Component::Unet, Component::Vae, Component::TextEncoder];

/// Each malicious fixture and the global its pickle would call.
const MALICIOUS: [(&str, &str); 5] = [
    ("malicious-os-system.ckpt", "os.system"),
    ("malicious-reduce.ckpt", "posix.system"),
    ("malicious-eval.ckpt", "__builtin__.eval"),
    ("malicious-stack-global.ckpt", "subprocess.call"),
    ("malicious-hidden.ckpt", "posix.system"),
];

/// What the malicious pickles would create if anything ran them.
const MARKER: &str = "/tmp/pwned-sdw";

fn pickle_fixture(name: &str) -> PathBuf {
    fixture("pickle").join(name)
}

fn bits(t: &HostTensor) -> Vec<u32> {
    t.data.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn ckpt_tensors_equal_safetensors_bit_exactly() {
    let ckpt = Checkpoint::open(&fixture("tiny-sd-fp16.ckpt")).unwrap();
    let st = Checkpoint::open(&fixture("tiny-sd-fp16.safetensors")).unwrap();
    let mut count = 0;
    for c in COMPONENTS {
        let mut want: Vec<&str> = st.names(c).collect();
        let mut got: Vec<&str> = ckpt.names(c).collect();
        want.sort();
        got.sort();
        assert_eq!(got, want, "{c:?}: tensor names");
        for name in want {
            let (a, b) = (ckpt.tensor(c, name).unwrap(), st.tensor(c, name).unwrap());
            assert_eq!(a.shape, b.shape, "{c:?} {name}: shape");
            assert_eq!(ckpt.shape(c, name), st.shape(c, name), "{c:?} {name}: shape");
            assert!(bits(&a) == bits(&b), "{c:?} {name}: values differ");
            count += 1;
        }
    }
    // Every key of the file too, unused ones included (int64 position_ids, f32 alphas_cumprod).
    let raw = WeightsFile::open(&fixture("tiny-sd-fp16.ckpt")).unwrap();
    let st_raw = SafetensorsFile::open(&fixture("tiny-sd-fp16.safetensors")).unwrap();
    let mut keys: Vec<&str> = raw.keys().collect();
    let mut want: Vec<&str> = st_raw.keys().collect();
    keys.sort();
    want.sort();
    assert_eq!(keys, want);
    for key in keys {
        assert!(bits(&raw.tensor(key).unwrap()) == bits(&st_raw.tensor(key).unwrap()), "{key}: values differ");
    }
    eprintln!("{count} model tensors and {} file keys bit-identical", want.len());
}

#[test]
fn txt2img_from_ckpt_gives_the_same_latents() {
    let cpu = device::select(DeviceChoice::Cpu).unwrap();
    let name = "txt2img.euler_a";
    let p = case_params(&cases()["cases"][name]);
    let run = |model: &str| {
        StableDiffusion::load(&fixture(model), cpu.clone()).unwrap().txt2img(&p, &mut NoProgress).unwrap()
    };
    let (from_ckpt, from_st) = (run("tiny-sd-fp16.ckpt"), run("tiny-sd-fp16.safetensors"));
    assert_eq!(from_ckpt.latents.shape, from_st.latents.shape);
    assert!(bits(&from_ckpt.latents) == bits(&from_st.latents), "latents differ");
    assert!(bits(&from_ckpt.image) == bits(&from_st.image), "images differ");
    assert_close("ckpt latent", &from_ckpt.latents, &golden(&format!("{name}.latent")), 1e-3);
}

#[test]
fn malicious_pickles_are_refused_without_side_effects() {
    let _ = std::fs::remove_file(MARKER);
    for (file, global) in MALICIOUS {
        let path = pickle_fixture(file);
        let errors = [
            Checkpoint::open(&path).err().expect("refused").to_string(),
            load_torch_tensors(&path).expect_err("refused").to_string(),
        ];
        for err in errors {
            eprintln!("{err}");
            assert!(err.starts_with(path.to_str().unwrap()), "{err}");
            assert!(err.contains(&format!("refusing to load: the pickle calls `{global}`")), "{err}");
            assert!(err.contains("convert the file to .safetensors"), "{err}");
        }
    }
    assert!(!Path::new(MARKER).exists(), "a malicious pickle ran");
}

#[test]
fn broken_files_give_clear_errors() {
    let dir = temp_dir("ckpt-broken");
    let bytes = std::fs::read(fixture("tiny-sd-fp16.ckpt")).unwrap();
    let write = |name: &str, data: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        p
    };
    let cases = [
        (write("half.ckpt", &bytes[..bytes.len() / 2]), "truncated"),
        (write("tail-cut.ckpt", &bytes[..bytes.len() - 10]), "truncated"),
        (write("text.ckpt", b"this is not a checkpoint"), "neither a zip archive nor a pickle"),
        (write("empty.pt", b""), "neither a zip archive nor a pickle"),
        (pickle_fixture("legacy.ckpt"), "legacy format of PyTorch before 1.6"),
        (pickle_fixture("no-data-pkl.ckpt"), "no data.pkl"),
    ];
    for (path, why) in cases {
        let err = Checkpoint::open(&path).err().expect("refused").to_string();
        eprintln!("{err}");
        assert!(err.starts_with(path.to_str().unwrap()) && err.contains(why), "{err}");
    }
    // A zip file named .safetensors is sniffed as a torch archive, not misread.
    let renamed = write("renamed.safetensors", &bytes);
    assert!(Checkpoint::open(&renamed).is_ok());
}

#[test]
fn torch_file_reads_nested_dicts_parameter_dicts_and_strided_views() {
    let path = pickle_fixture("embedding.pt");
    let t = load_torch_tensors(&path).unwrap();
    let keys: Vec<&str> = t.keys().map(String::as_str).collect();
    assert_eq!(keys, ["extra.bf16", "extra.list.0", "extra.strided", "string_to_param.*", "string_to_token.*"]);
    let param = &t["string_to_param.*"];
    assert_eq!(param.shape, [2, 4]);
    assert_eq!(param.data, (0..8).map(|i| i as f32 / 4.0).collect::<Vec<_>>());
    assert_eq!((t["string_to_token.*"].shape.len(), t["string_to_token.*"].data.as_slice()), (0, &[265.0][..]));
    // A transposed f16 view at storage offset 2: element [i][j] = 2 + i + 4j.
    let strided = &t["extra.strided"];
    assert_eq!(strided.shape, [4, 3]);
    let want: Vec<f32> = (0..4).flat_map(|i| (0..3).map(move |j| (2 + i + 4 * j) as f32)).collect();
    assert_eq!(strided.data, want);
    assert_eq!(t["extra.bf16"].data, [1.5, -2.0]);
    assert_eq!(t["extra.list.0"].data, [7.0]);
    let file = TorchFile::open(&path).unwrap();
    assert_eq!(file.root().get("name").and_then(Value::as_str), Some("tinyti"));
    assert_eq!(file.root().get("step"), Some(&Value::Int(3)));
}

#[test]
fn cli_runs_a_ckpt_and_refuses_a_malicious_one() {
    let dir = temp_dir("ckpt-cli");
    let case = &cases()["cases"]["txt2img.euler_a"];
    let out = dir.join("ckpt.png");
    let sdw = |model: &Path| {
        Command::new(env!("CARGO_BIN_EXE_sdw"))
            .env("SDW_CACHE_DIR", &dir)
            .args(["txt2img", "--model"])
            .arg(model)
            .args(case_cli_args(case))
            .args(["--device", "cpu", "--output"])
            .arg(&out)
            .output()
            .unwrap()
    };
    let o = sdw(&fixture("tiny-sd-fp16.ckpt"));
    assert!(o.status.success(), "sdw failed: {}", String::from_utf8_lossy(&o.stderr));
    let worst = max_level_diff(&rgb_bytes(&out), &rgb_bytes(&fixture("txt2img-euler_a.png")));
    assert!(worst <= 2, "pixels differ by {worst} levels");

    let _ = std::fs::remove_file(MARKER);
    let path = pickle_fixture("malicious-os-system.ckpt");
    let o = sdw(&path);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains(path.to_str().unwrap()) && err.contains("refusing to load: the pickle calls `os.system`"),
        "{err}"
    );
    assert!(!Path::new(MARKER).exists(), "a malicious pickle ran");
}
