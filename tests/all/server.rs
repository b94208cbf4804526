//! `sdw serve` over real HTTP on the tiny model (CPU): the golden images through A1111's
//! routes, errors in A1111's shape, auth, path safety, progress and interrupt. Then, when
//! they are installed (CI installs them; `SDW_TEST_REQUIRE_CLIENTS=1` makes their absence
//! a failure), A1111's own Python client `webuiapi` and the web UI in Chromium.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use crate::common::{cases, fixture, max_level_diff, rgb_bytes, temp_dir};

/// A running `sdw serve` on a models folder holding the tiny checkpoint and LoRA.
struct Server {
    child: Child,
    url: String,
    dir: PathBuf,
}

impl Server {
    fn start(name: &str, extra: &[&str]) -> Server {
        let dir = temp_dir(&format!("serve-{name}"));
        let models = dir.join("models");
        for (sub, file) in [("Stable-diffusion", "tiny-sd-fp16.safetensors"), ("Lora", "tiny-lora-kohya.safetensors")] {
            std::fs::create_dir_all(models.join(sub)).unwrap();
            std::fs::copy(fixture(file), models.join(sub).join(file)).unwrap();
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_sdw"))
            .env("SDW_CACHE_DIR", &dir)
            .args(["serve", "--port", "0", "--device", "cpu", "--models-dir"])
            .arg(&models)
            .arg("--outdir")
            .arg(dir.join("outputs"))
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let url = line.trim().rsplit(' ').next().unwrap().to_owned();
        assert!(url.starts_with("http://127.0.0.1:"), "first line: {line:?}");
        Server { child, url, dir }
    }

    fn get(&self, path: &str) -> (u16, Value) {
        reply(ureq::get(format!("{}{path}", self.url)).call())
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        reply(ureq::post(format!("{}{path}", self.url)).send_json(body))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Status and JSON body of a reply, error statuses included.
fn reply(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, Value) {
    match r {
        Ok(mut resp) => (resp.status().as_u16(), resp.body_mut().read_json().unwrap_or(Value::Null)),
        Err(ureq::Error::StatusCode(code)) => (code, Value::Null),
        Err(e) => panic!("request failed: {e}"),
    }
}

/// Requests that keep the body of 4xx/5xx replies (A1111's error JSON).
fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().into()
}

fn post_raw(url: &str, body: &str) -> (u16, Value) {
    let mut resp = agent().post(url).header("content-type", "application/json").send(body).unwrap();
    (resp.status().as_u16(), resp.body_mut().read_json().unwrap_or(Value::Null))
}

fn decode_png(b64: &str) -> (Vec<u8>, Option<String>) {
    let bytes = STANDARD.decode(b64).unwrap();
    let img = image::load_from_memory(&bytes).unwrap().to_rgb8().into_raw();
    (img, sdw::output::parameters_of(std::io::Cursor::new(bytes)).unwrap())
}

fn case_body(name: &str, sampler_name: &str) -> Value {
    let c = &cases()["cases"][name];
    json!({
        "prompt": c["prompt"], "negative_prompt": c["negative_prompt"], "sampler_name": sampler_name,
        "steps": c["steps"], "cfg_scale": c["cfg_scale"], "seed": c["seed"],
        "width": c["width"].as_u64().unwrap_or(64), "height": c["height"].as_u64().unwrap_or(64),
    })
}

#[test]
fn a1111_api_draws_the_golden_images() {
    let s = Server::start("golden", &[]);
    for (case, sampler) in [("txt2img.euler_a", "Euler a"), ("txt2img.dpmpp_2m_karras", "DPM++ 2M Karras")] {
        let (status, r) = s.post("/sdapi/v1/txt2img", &case_body(case, sampler));
        assert_eq!(status, 200, "{case}: {r}");
        let (pixels, text) = decode_png(r["images"][0].as_str().unwrap());
        let worst = max_level_diff(&pixels, &rgb_bytes(&fixture(&format!("{}.png", case.replace('.', "-")))));
        assert!(worst <= 2, "{case}: {worst} levels from the golden image");
        let info: Value = serde_json::from_str(r["info"].as_str().expect("info is a JSON string")).unwrap();
        let seed = &cases()["cases"][case]["seed"];
        assert_eq!(&info["seed"], seed);
        assert!(info["infotexts"][0].as_str().unwrap().contains(&format!("Seed: {seed}")), "{info}");
        assert_eq!(text.as_deref(), info["infotexts"][0].as_str(), "the PNG carries the infotext");
        assert_eq!(r["parameters"]["sampler_name"], sampler);
    }
    // img2img from a data URL, with the LoRA tag the prompt names.
    let init = STANDARD.encode(std::fs::read(fixture("img2img-init.png")).unwrap());
    let mut body = case_body("img2img.euler_a", "Euler a");
    body["init_images"] = json!([format!("data:image/png;base64,{init}")]);
    body["denoising_strength"] = json!(0.6);
    let (status, r) = s.post("/sdapi/v1/img2img", &body);
    assert_eq!(status, 200, "{r}");
    let (pixels, _) = decode_png(r["images"][0].as_str().unwrap());
    let worst = max_level_diff(&pixels, &rgb_bytes(&fixture("img2img-euler_a.png")));
    assert!(worst <= 2, "img2img: {worst} levels from the golden image");
    assert_eq!(r["parameters"]["init_images"], Value::Null, "init images are not echoed back");

    let lora = case_body("txt2img_lora.euler_a", "Euler a");
    let mut lora_body = lora.clone();
    lora_body["prompt"] = json!(format!("{} <lora:tiny-lora-kohya:0.8>", lora["prompt"].as_str().unwrap()));
    // Twice (the second reuses the merged LoRA), then without it (un-merged exactly).
    for (body, golden) in [
        (&lora_body, "txt2img-lora-euler_a.png"),
        (&lora_body, "txt2img-lora-euler_a.png"),
        (&case_body("txt2img.euler_a", "Euler a"), "txt2img-euler_a.png"),
    ] {
        let (status, r) = s.post("/sdapi/v1/txt2img", body);
        assert_eq!(status, 200, "{r}");
        let (pixels, text) = decode_png(r["images"][0].as_str().unwrap());
        let worst = max_level_diff(&pixels, &rgb_bytes(&fixture(golden)));
        assert!(worst <= 2, "{golden}: {worst} levels from the golden image");
        assert_eq!(text.unwrap().contains("Lora hashes: "), golden.contains("lora"));
    }
}

#[test]
fn lists_options_png_info_and_the_gallery() {
    let s = Server::start("lists", &[]);
    let (_, models) = s.get("/sdapi/v1/sd-models");
    assert_eq!(models[0]["model_name"], "tiny-sd-fp16", "{models}");
    let (_, samplers) = s.get("/sdapi/v1/samplers");
    let names: Vec<&str> = samplers.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"Euler a") && names.contains(&"DPM++ 2M") && names.contains(&"DDIM"), "{names:?}");
    let (_, loras) = s.get("/sdapi/v1/loras");
    assert_eq!(loras[0]["name"], "tiny-lora-kohya");
    let (_, schedulers) = s.get("/sdapi/v1/schedulers");
    assert_eq!(schedulers.as_array().unwrap().len(), 4);
    for route in ["/sdapi/v1/embeddings", "/sdapi/v1/sd-vae", "/sdapi/v1/upscalers", "/sdapi/v1/cmd-flags"] {
        assert_eq!(s.get(route).0, 200, "{route}");
    }
    // Served in f32 (the default precision): A1111's flags say so.
    let (_, flags) = s.get("/sdapi/v1/cmd-flags");
    assert_eq!((&flags["no_half"], &flags["no_half_vae"]), (&json!(true), &json!(true)), "{flags}");
    // A client that posts the whole options dict back.
    let (_, options) = s.get("/sdapi/v1/options");
    assert_eq!(s.post("/sdapi/v1/options", &options).0, 200);
    assert_eq!(s.post("/sdapi/v1/options", &json!({"sd_model_checkpoint": "tiny-sd-fp16"})).0, 200);

    let mut body = case_body("txt2img.euler_a", "Euler a");
    body["steps"] = json!(2);
    body["save_images"] = json!(true);
    body["batch_size"] = json!(2);
    let (status, r) = s.post("/sdapi/v1/txt2img", &body);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["images"].as_array().unwrap().len(), 2);
    let info: Value = serde_json::from_str(r["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["all_seeds"], json!([4040056495u64, 4040056496u64]));

    let (_, png) = s.post("/sdapi/v1/png-info", &json!({"image": r["images"][1]}));
    assert_eq!(png["parameters"]["Seed"], "4040056496", "{png}");
    assert_eq!(png["parameters"]["Size-1"], "64");
    assert!(png["info"].as_str().unwrap().starts_with("a photo of sks person"));

    let (_, gallery) = s.get("/sdw/v1/gallery");
    let items = gallery.as_array().unwrap();
    assert_eq!(items.len(), 2, "{gallery}");
    let url = format!("{}{}", s.url, items[0]["url"].as_str().unwrap());
    let mut resp = ureq::get(&url).call().unwrap();
    assert_eq!(resp.headers()["content-type"], "image/png");
    assert!(resp.body_mut().read_to_vec().unwrap().starts_with(b"\x89PNG"));
    assert!(s.dir.join("outputs/txt2img").read_dir().unwrap().count() == 2);
}

#[test]
fn bad_requests_get_a1111_errors_not_dropped_connections() {
    let s = Server::start("errors", &[]);
    let api = |p: &str| format!("{}/sdapi/v1/{p}", s.url);
    let check = |(status, body): (u16, Value), want: u16, needle: &str| {
        assert_eq!(status, want, "{body}");
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(body["error"].is_string() && detail.contains(needle), "{body}");
    };
    check(post_raw(&api("txt2img"), "{not json"), 422, "request body");
    check(post_raw(&api("txt2img"), r#"{"steps": "many"}"#), 422, "request body");
    check(post_raw(&api("txt2img"), r#"{"sampler_name": "DPM++ SDE"}"#), 422, "DPM++ SDE");
    check(post_raw(&api("txt2img"), r#"{"width": 8192}"#), 413, "8192");
    check(post_raw(&api("txt2img"), r#"{"width": 100}"#), 422, "multiple of 8");
    check(post_raw(&api("txt2img"), r#"{"prompt": "<lora:missing:1>", "steps": 1}"#), 404, "missing");
    check(post_raw(&api("txt2img"), r#"{"prompt": "<lora:../../x:1>", "steps": 1}"#), 422, "..");
    check(post_raw(&api("img2img"), r#"{"prompt": "x"}"#), 404, "Init image not found");
    check(post_raw(&api("img2img"), r#"{"init_images": ["aGVsbG8="]}"#), 422, "not an image");
    check(post_raw(&api("img2img"), r#"{"init_images": ["%%%"]}"#), 422, "base64");
    check(post_raw(&api("options"), r#"{"sd_model_checkpoint": "../../etc/passwd"}"#), 422, "models folder");
    check(post_raw(&api("options"), r#"{"sd_model_checkpoint": "nope"}"#), 404, "nope");
    check(post_raw(&api("png-info"), r#"{"image": "aGVsbG8="}"#), 422, "not an image");
    // Over the body limit: a 413 (a client still sending when it comes may see the
    // connection close instead, as with any server that answers early).
    let huge = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(65 << 20));
    if let Ok(mut resp) = agent().post(api("txt2img")).header("content-type", "application/json").send(&huge) {
        assert_eq!(resp.status().as_u16(), 413);
        let body: Value = resp.body_mut().read_json().unwrap();
        assert!(body["detail"].as_str().unwrap().contains("MiB"), "{body}");
    }
    let mut resp = agent().get(format!("{}/outputs/../../secret.png", s.url)).call().unwrap();
    assert!((400..500).contains(&resp.status().as_u16()), "{}", resp.body_mut().read_to_string().unwrap());
    // The server still answers after all of that.
    assert_eq!(s.get("/sdapi/v1/progress").0, 200);
}

#[test]
fn api_auth_guards_every_route() {
    let origin = "http://page.example";
    let s = Server::start("auth", &["--api-auth", "alice:secret", "--cors-allow-origins", origin]);
    // A browser's CORS preflight carries no credentials: it is answered before auth.
    let resp = agent()
        .options(format!("{}/sdapi/v1/txt2img", s.url))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["access-control-allow-origin"], origin);
    for route in ["/", "/sdapi/v1/sd-models", "/sdapi/v1/progress", "/sdw/v1/gallery"] {
        let mut resp = agent().get(format!("{}{route}", s.url)).call().unwrap();
        assert_eq!(resp.status().as_u16(), 401, "{route}");
        assert!(resp.headers().contains_key("www-authenticate"));
        let body: Value = resp.body_mut().read_json().unwrap();
        assert_eq!(body["detail"], "Incorrect username or password");
    }
    let basic = |user: &str| format!("Basic {}", STANDARD.encode(user));
    let status = |auth: &str| {
        agent().get(format!("{}/sdapi/v1/sd-models", s.url)).header("authorization", auth).call().unwrap().status()
    };
    assert_eq!(status(&basic("alice:secret")).as_u16(), 200);
    let resp = agent()
        .get(format!("{}/sdapi/v1/sd-models", s.url))
        .header("authorization", &basic("alice:secret"))
        .header("origin", "http://other.example")
        .call()
        .unwrap();
    assert!(!resp.headers().contains_key("access-control-allow-origin"), "an unlisted origin gets no CORS grant");
    assert_eq!(status(&basic("alice:wrong")).as_u16(), 401);
    assert_eq!(status(&basic("bob:secret")).as_u16(), 401);
}

#[test]
fn progress_and_interrupt_answer_while_a_job_runs() {
    let s = Server::start("progress", &[]);
    let url = s.url.clone();
    let mut body = case_body("txt2img.euler_a", "Euler a");
    body["steps"] = json!(150);
    body["n_iter"] = json!(3);
    let job = std::thread::spawn(move || reply(ureq::post(format!("{url}/sdapi/v1/txt2img")).send_json(&body)));
    let t0 = Instant::now();
    let state = loop {
        let (_, p) = s.get("/sdapi/v1/progress");
        if p["state"]["sampling_step"].as_u64().unwrap_or(0) >= 2 {
            break p;
        }
        assert!(t0.elapsed() < Duration::from_secs(300), "no progress: {p}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(state["state"]["job_count"], 3);
    assert_eq!(state["state"]["sampling_steps"], 150);
    assert!(state["progress"].as_f64().unwrap() > 0.0 && state["eta_relative"].as_f64().unwrap() >= 0.0);
    assert!(state["current_image"].is_string(), "a live preview: {state}");
    assert_eq!(s.post("/sdapi/v1/interrupt", &json!({})).0, 200);
    let (status, r) = job.join().unwrap();
    assert_eq!(status, 200, "{r}");
    // Interrupted in the first batch: its image comes back, the other batches never start.
    assert_eq!(r["images"].as_array().unwrap().len(), 1);
    let (_, idle) = s.get("/sdapi/v1/progress");
    assert_eq!(idle["state"]["job_count"], 0, "{idle}");
}

/// Runs an external client against a server, or says why it cannot.
fn external_client(what: &str, program: Option<PathBuf>, args: &[&str], env: &[(&str, &str)]) {
    let require = std::env::var("SDW_TEST_REQUIRE_CLIENTS").as_deref() == Ok("1");
    let Some(program) = program else {
        assert!(!require, "{what}: not installed, and SDW_TEST_REQUIRE_CLIENTS=1 requires it (see .ci/run)");
        eprintln!("skipping the {what} test: not installed (.ci/run installs it)");
        return;
    };
    let s = Server::start(what, &[]);
    let status = Command::new(&program)
        .args(args.iter().map(|a| a.replace("{url}", &s.url)))
        .envs(env.iter().map(|(k, v)| (*k, v.replace("{url}", &s.url))))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap();
    assert!(status.success(), "{what} failed");
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A1111's own Python client, unchanged (`webuiapi` from PyPI, in `.venv`).
#[test]
fn webuiapi_python_client() {
    let python = [root().join(".venv/bin/python")]
        .into_iter()
        .find(|p| Command::new(p).args(["-c", "import webuiapi"]).output().is_ok_and(|o| o.status.success()));
    let fixtures = fixture("").display().to_string();
    external_client("webuiapi", python, &["tests/api/client.py", "{url}", &fixtures], &[]);
}

/// The web UI in Debian's Chromium through playwright-core (tests/browser).
#[test]
fn web_ui_in_chromium() {
    let ready =
        root().join("tests/browser/node_modules/playwright-core").is_dir() && Path::new("/usr/bin/chromium").exists();
    let node = ready.then(|| PathBuf::from("node"));
    external_client("browser", node, &["--test", "tests/browser/ui.test.mjs"], &[("SDW_URL", "{url}")]);
}

/// Two 64x64 "photos" of a red disc on blue, as PNG data URLs.
fn photos() -> Vec<String> {
    (0..2u32)
        .map(|i| {
            let img = image::RgbImage::from_fn(64, 64, |x, y| {
                let (dx, dy) = (x as f32 - 30.0 - 3.0 * i as f32, y as f32 - 32.0);
                if dx * dx + dy * dy < 15.0 * 15.0 { image::Rgb([230, 40, 30]) } else { image::Rgb([30, 60, 200]) }
            });
            let mut png = Vec::new();
            img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
            format!("data:image/png;base64,{}", STANDARD.encode(png))
        })
        .collect()
}

fn wait_for_training(s: &Server, done: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let (_, st) = s.get("/sdw/v1/train");
        if done(&st) {
            return st;
        }
        assert!(st["state"] != "failed", "training failed: {st}");
        assert!(t0.elapsed() < Duration::from_secs(600), "training stuck: {st}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn train_tab_api_trains_cancels_resumes_and_installs_the_lora() {
    let s = Server::start("train", &[]);
    let body = |name: &str, steps: usize, resume: bool| {
        json!({"name": name, "instance_prompt": "photo of sks disc", "images": if resume { vec![] } else { photos() },
               "steps": steps, "resolution": 64, "rank": 2, "learning_rate": 1e-3, "validation_every": 2,
               "num_validation_images": 1, "resume": resume})
    };
    let (status, st) = s.post("/sdw/v1/train", &body("disc", 4, false));
    assert_eq!(status, 202, "{st}");
    let st = wait_for_training(&s, |st| st["state"] == "done");
    assert_eq!(st["lora"], "disc.safetensors");
    assert_eq!(st["losses"].as_array().unwrap().len(), 4, "{st}");
    let grid = st["validation"][0].as_str().expect("a validation grid");
    assert_eq!(ureq::get(format!("{}{grid}", s.url)).call().unwrap().status().as_u16(), 200);
    assert!(s.dir.join("models/Lora/disc.safetensors").exists());
    let (_, loras) = s.get("/sdapi/v1/loras");
    assert!(loras.as_array().unwrap().iter().any(|l| l["name"] == "disc"), "{loras}");
    let mut gen_body = case_body("txt2img.euler_a", "Euler a");
    gen_body["prompt"] = json!("photo of sks disc <lora:disc:1>");
    gen_body["steps"] = json!(2);
    let (status, r) = s.post("/sdapi/v1/txt2img", &gen_body);
    assert_eq!(status, 200, "{r}");

    // The name is taken now; bad requests are refused before anything is written.
    let (status, _) = post_raw(&format!("{}/sdw/v1/train", s.url), &body("disc", 4, false).to_string());
    assert_eq!(status, 409);
    let mut bad = body("other", 4, false);
    bad["images"] = json!(["aGVsbG8="]);
    assert_eq!(post_raw(&format!("{}/sdw/v1/train", s.url), &bad.to_string()).0, 422);
    assert_eq!(post_raw(&format!("{}/sdw/v1/train", s.url), &body("../x", 4, false).to_string()).0, 422);
    assert_eq!(post_raw(&format!("{}/sdw/v1/train", s.url), &body("ghost", 4, true).to_string()).0, 404);

    // Cancel mid-run, resume from its checkpoint, cancel again.
    assert_eq!(s.post("/sdw/v1/train", &body("long", 400, false)).0, 202);
    wait_for_training(&s, |st| st["step"].as_u64().unwrap_or(0) >= 2);
    s.post("/sdw/v1/train/cancel", &json!({}));
    let st = wait_for_training(&s, |st| st["state"] == "cancelled");
    let stopped = st["step"].as_u64().unwrap();
    assert_eq!(s.post("/sdw/v1/train", &body("long", 400, true)).0, 202);
    wait_for_training(&s, |st| st["state"] == "running" && st["step"].as_u64().unwrap_or(0) > stopped);
    s.post("/sdw/v1/train/cancel", &json!({}));
    wait_for_training(&s, |st| st["state"] == "cancelled");
    assert!(!s.dir.join("models/Lora/long.safetensors").exists(), "a cancelled run installs nothing");
}

#[test]
fn a_client_that_leaves_does_not_wedge_the_queue() {
    let s = Server::start("leave", &[]);
    let impatient: ureq::Agent =
        ureq::Agent::config_builder().timeout_global(Some(Duration::from_millis(1500))).build().into();
    let mut long = case_body("txt2img.euler_a", "Euler a");
    long["steps"] = json!(150);
    let gone = impatient.post(format!("{}/sdapi/v1/txt2img", s.url)).send_json(&long);
    assert!(gone.is_err(), "the request was meant to time out");
    let mut short = case_body("txt2img.euler_a", "Euler a");
    short["steps"] = json!(2);
    let (status, r) = s.post("/sdapi/v1/txt2img", &short);
    assert_eq!(status, 200, "{r}");
}

#[test]
fn ctrl_c_stops_after_the_current_step_and_keeps_finished_images() {
    let mut s = Server::start("ctrl-c", &[]);
    let url = s.url.clone();
    let mut body = case_body("txt2img.euler_a", "Euler a");
    body["steps"] = json!(60);
    body["n_iter"] = json!(50);
    body["save_images"] = json!(true);
    let job = std::thread::spawn(move || ureq::post(format!("{url}/sdapi/v1/txt2img")).send_json(&body).is_ok());
    let t0 = Instant::now();
    while s.get("/sdapi/v1/progress").1["state"]["job_no"].as_u64().unwrap_or(0) < 1 {
        assert!(t0.elapsed() < Duration::from_secs(300), "the first batch never finished");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = s.child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let t1 = Instant::now();
    let status = loop {
        if let Some(status) = s.child.try_wait().unwrap() {
            break status;
        }
        assert!(t1.elapsed() < Duration::from_secs(60), "the server did not stop after Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    assert!(job.join().unwrap(), "the running request got its reply before the server stopped");
    let saved = s.dir.join("outputs/txt2img").read_dir().unwrap().count();
    assert!((2..50).contains(&saved), "{saved} images saved: the finished batches and the interrupted one");
}

#[test]
fn ctrl_c_during_training_keeps_its_checkpoint() {
    let mut s = Server::start("ctrl-c-train", &[]);
    let body = json!({"name": "long", "instance_prompt": "photo of sks disc", "images": photos(), "steps": 4000,
                      "resolution": 64, "rank": 2, "validation_every": 0});
    assert_eq!(s.post("/sdw/v1/train", &body).0, 202);
    wait_for_training(&s, |st| st["step"].as_u64().unwrap_or(0) >= 2);
    let pid = s.child.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let t0 = Instant::now();
    while s.child.try_wait().unwrap().is_none() {
        assert!(t0.elapsed() < Duration::from_secs(120), "the server did not stop after Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    }
    let checkpoints = s.dir.join("outputs/train/long-training/checkpoints");
    let saved = std::fs::read_dir(&checkpoints).map_or(0, |r| r.count());
    assert!(saved >= 1, "no checkpoint in {}", checkpoints.display());
}
