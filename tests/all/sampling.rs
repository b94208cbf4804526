//! Noise, schedules and samplers against the reference goldens
//! (torch CUDA Philox, k-diffusion, diffusers DDIM; see tests/fixtures).

use crate::common::{golden, rel_err};
use sdw::sampling::schedule::{self, Schedule};
use sdw::sampling::{
    CompVisDenoiser, Denoiser, NoProgress, Philox, SampleCtx, Sampler, SamplerKind, ScheduleKind, Start,
    ddim_timesteps, linear_multistep_coeff, parse_sampler, sample, sigmas_for,
};

/// A golden tensor's shape and values.
fn golden_of(name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = golden(name);
    (t.shape, t.data)
}

fn golden_data(name: &str) -> Vec<f32> {
    golden(name).data
}

/// Largest elementwise relative difference (elements near 0 judged absolutely).
fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| ((*x as f64) - (*y as f64)).abs() / (*y as f64).abs().max(1e-6)).fold(0.0, f64::max)
}

fn check(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let e = rel_err(got, want);
    let exact = got.iter().zip(want).filter(|(a, b)| a.to_bits() == b.to_bits()).count();
    eprintln!(
        "{what}: rel. error {e:.2e} (max elementwise {:.2e}, {exact}/{} bit-exact)",
        max_rel(got, want),
        want.len()
    );
    assert!(e < tol, "{what}: rel. error {e:.3e} >= {tol:.0e}");
}

// ------------------------------------------------------------------- Philox

#[test]
#[allow(clippy::excessive_precision)] // the README's digits
fn philox_matches_torch_cuda_randn() {
    for seed in [0u64, 1, 42, 4040056495, 4294967295] {
        let mut rng = Philox::new(seed);
        for call in 0..2 {
            let name = format!("rng.philox.{seed}.call{call}");
            let (shape, want) = golden_of(&name);
            assert_eq!(shape, [1, 4, 8, 8]);
            let got = rng.randn(want.len());
            check(&name, &got, &want, 1e-6);
            assert!(max_rel(&got, &want) < 1e-5, "{name}: elementwise");
        }
        assert_eq!(rng.offset(), 2);
    }
    let (shape, want) = golden_of("rng.philox.0.small");
    assert_eq!(shape, [3, 4]);
    let got = Philox::new(0).randn(12);
    check("rng.philox.0.small", &got, &want, 1e-6);
    // The README's first row.
    for (g, w) in got.iter().zip([-0.92466259f32, -0.42534415, -2.6438457, 0.14518388]) {
        assert!((g - w).abs() < 1e-6, "{g} vs {w}");
    }
}

// ---------------------------------------------------------------- schedules

#[test]
fn schedules_match_reference() {
    check("sched.alphas_cumprod", &schedule::alphas_cumprod(), &golden_data("sched.alphas_cumprod"), 1e-6);

    let s = Schedule::new();
    assert!((s.sigma_min() - 0.0292).abs() < 1e-4, "sigma_min {}", s.sigma_min());
    assert!((s.sigma_max() - 14.6146).abs() < 1e-4, "sigma_max {}", s.sigma_max());

    let normal = s.get_sigmas(20);
    check("sched.normal_20", &normal, &golden_data("sched.normal_20"), 1e-6);
    assert_eq!(normal.len(), 21);
    assert_eq!(normal[20], 0.0);

    let karras = schedule::karras(20, s.sigma_min() as f64, s.sigma_max() as f64, 7.0);
    check("sched.karras_20", &karras, &golden_data("sched.karras_20"), 1e-6);
    assert_eq!(karras, s.karras(20));

    let want_t = golden_data("sched.sigma_to_t");
    let got_t: Vec<f32> = golden_data("sched.normal_20")[..20].iter().map(|&sg| s.sigma_to_t(sg)).collect();
    check("sched.sigma_to_t", &got_t, &want_t, 1e-6);

    // Round trips and clamping.
    for t in [0.0f32, 1.0, 250.5, 998.25, 999.0] {
        let back = s.sigma_to_t(s.t_to_sigma(t));
        assert!((back - t).abs() < 2e-3, "t {t} -> {back}");
    }
    assert_eq!(s.sigma_to_t(1e-4), 0.0);
    assert_eq!(s.sigma_to_t(100.0), 999.0);

    // Exponential: log-linear from sigma_max to sigma_min, then 0.
    let e = s.exponential(10);
    assert_eq!(e.len(), 11);
    assert!((e[0] / s.sigma_max() - 1.0).abs() < 1e-5 && (e[9] / s.sigma_min() - 1.0).abs() < 1e-5);
    let r: Vec<f64> = e[..10].windows(2).map(|w| (w[1] / w[0]) as f64).collect();
    assert!(r.iter().all(|q| (q - r[0]).abs() < 1e-5), "{r:?}");
    assert_eq!(e[10], 0.0);
}

#[test]
fn sigmas_for_follows_a1111() {
    let s = Schedule::new();
    assert_eq!(sigmas_for(SamplerKind::Euler, ScheduleKind::Normal, 12), s.get_sigmas(12));
    assert_eq!(sigmas_for(SamplerKind::Dpmpp2m, ScheduleKind::Karras, 12), s.karras(12));
    // DPM2: 13 sigmas, the next-to-last dropped.
    let mut want = s.get_sigmas(13);
    want.remove(12);
    let got = sigmas_for(SamplerKind::Dpm2, ScheduleKind::Normal, 12);
    assert_eq!(got.len(), 13);
    assert_eq!(got, want);
    assert_eq!(sigmas_for(SamplerKind::Euler, ScheduleKind::Normal, 1), vec![s.t_to_sigma(999.0), 0.0]);
}

// ----------------------------------------------------------------- samplers

/// The fixture's stand-in for a UNet: `tanh(0.7x)(0.5 + t/1000) + 0.1 sin(3x + t/1000)`.
fn analytic_eps(x: &[f32], t: f32) -> Vec<f32> {
    let tt = t / 1000.0;
    x.iter()
        .map(|&v| {
            let th = ((0.7f32 * v) as f64).tanh() as f32;
            let sn = ((3.0f32 * v + tt) as f64).sin() as f32;
            th * (0.5 + tt) + 0.1f32 * sn
        })
        .collect()
}

const STEPS: usize = 12;
const SEED: u64 = 777;
const N: usize = 4 * 8 * 8;

fn run_golden_case(name: &str) -> Vec<f32> {
    let sampler = Sampler::parse(name).unwrap();
    let schedule = Schedule::new();
    let mut rng = Philox::new(SEED);
    let noise = rng.randn(N);
    let mut model = analytic_eps;
    let mut seen = Vec::new();
    let mut progress = |done: usize, total: usize| seen.push((done, total));
    let out = sample(&sampler, STEPS, &schedule, &mut model, noise, Start::Noise, None, &mut rng, &mut progress);
    assert_eq!(seen, (1..=STEPS).map(|i| (i, STEPS)).collect::<Vec<_>>(), "{name}: progress");
    // One draw for the initial noise, plus one per step with a next sigma > 0.
    let draws = if sampler.kind.is_ancestral() { 1 + STEPS - 1 } else { 1 };
    assert_eq!(rng.offset() as usize, draws, "{name}: noise draws");
    out
}

#[test]
fn k_diffusion_samplers_match_reference() {
    for name in
        ["euler", "euler_a", "heun", "dpm2", "lms", "dpmpp_2m", "dpmpp_2m_karras", "euler_a_karras", "dpmpp_2s_a"]
    {
        let (shape, want) = golden_of(&format!("sampler.{name}"));
        assert_eq!(shape, [1, 4, 8, 8]);
        let got = run_golden_case(name);
        check(&format!("sampler.{name}"), &got, &want, 1e-4);
    }
}

#[test]
fn ddim_matches_diffusers() {
    let ts: Vec<f32> = ddim_timesteps(STEPS).iter().map(|&t| t as f32).collect();
    assert_eq!(ts, golden("sampler.ddim_timesteps").data);
    let got = run_golden_case("ddim");
    check("sampler.ddim", &got, &golden_data("sampler.ddim"), 1e-4);
}

/// The sampler functions take any closure as the denoiser; `sample` is the
/// same computation.
#[test]
fn sampler_functions_take_closures() {
    let schedule = Schedule::new();
    let sigmas = sigmas_for(SamplerKind::EulerA, ScheduleKind::Normal, 5);
    let noise = Philox::new(3).randn(16);
    let x: Vec<f32> = noise.iter().map(|v| v * sigmas[0]).collect();

    let mut eps_model = analytic_eps;
    let mut den = |x: &[f32], sigma: f32| CompVisDenoiser::new(&mut eps_model, &schedule).denoise(x, sigma);
    let mut rng = Philox::new(3);
    rng.randn(16);
    let mut progress = NoProgress;
    let mut ctx = SampleCtx::new(&mut rng, &mut progress);
    let run = SamplerKind::EulerA.k_sampler().unwrap();
    let direct = run(&mut den, x, &sigmas, &mut ctx);

    let mut rng = Philox::new(3);
    let noise = rng.randn(16);
    let via_sample = sample(
        &Sampler::parse("euler_a").unwrap(),
        5,
        &schedule,
        &mut eps_model,
        noise,
        Start::Noise,
        None,
        &mut rng,
        &mut NoProgress,
    );
    assert_eq!(direct, via_sample);
    assert!(SamplerKind::Ddim.k_sampler().is_none());
}

#[test]
fn lms_coefficients_are_exact_integrals() {
    // Order 1: the integral of 1 over [t_i, t_{i+1}].
    let t = [10.0, 7.0, 4.0, 2.0, 1.0, 0.0];
    assert!((linear_multistep_coeff(1, &t, 0, 0) - -3.0).abs() < 1e-12);
    // Coefficients of one step sum to its length (they reproduce constants).
    for i in 3..5 {
        let sum: f64 = (0..4).map(|j| linear_multistep_coeff(4, &t, i, j)).sum();
        assert!((sum - (t[i + 1] - t[i])).abs() < 1e-12, "{sum}");
    }
    // Order 2 on equal steps is Adams-Bashforth 2: (3/2, -1/2) * h.
    let t = [3.0, 2.0, 1.0, 0.0];
    assert!((linear_multistep_coeff(2, &t, 1, 0) - -1.5).abs() < 1e-12);
    assert!((linear_multistep_coeff(2, &t, 1, 1) - 0.5).abs() < 1e-12);
}

// ----------------------------------------------------------------- registry

#[test]
fn parse_sampler_accepts_cli_and_a1111_names() {
    use SamplerKind::*;
    use ScheduleKind::*;
    let cases: [(&str, SamplerKind, Option<ScheduleKind>); 24] = [
        ("euler", Euler, None),
        ("euler_a", EulerA, None),
        ("heun", Heun, None),
        ("dpm2", Dpm2, None),
        ("lms", Lms, None),
        ("dpmpp_2m", Dpmpp2m, None),
        ("dpmpp_2m_karras", Dpmpp2m, Some(Karras)),
        ("euler_a_karras", EulerA, Some(Karras)),
        ("dpmpp_2s_a", Dpmpp2sA, None),
        ("ddim", Ddim, None),
        ("Euler a", EulerA, None),
        ("Euler", Euler, None),
        ("Heun", Heun, None),
        ("LMS", Lms, None),
        ("DPM2", Dpm2, None),
        ("DPM++ 2M", Dpmpp2m, None),
        ("DPM++ 2M Karras", Dpmpp2m, Some(Karras)),
        ("DPM++ 2S a", Dpmpp2sA, None),
        ("DDIM", Ddim, None),
        ("dpm++ 2m karras", Dpmpp2m, Some(Karras)),
        ("  EULER   A ", EulerA, None),
        ("LMS Karras", Lms, Some(Karras)),
        ("k_dpmpp_2m_ka", Dpmpp2m, Some(Karras)),
        ("euler_exponential", Euler, Some(Exponential)),
    ];
    for (name, kind, sched) in cases {
        assert_eq!(parse_sampler(name), Ok((kind, sched)), "{name}");
    }
    // Every listed name parses, and back to the same CLI name.
    for (cli, a1111) in sdw::sampling::sampler_names() {
        let s = Sampler::parse(&cli).unwrap();
        assert_eq!(s.cli_name(), cli);
        assert_eq!(Sampler::parse(&a1111).unwrap(), s, "{a1111}");
        assert_eq!(cli.parse::<Sampler>().unwrap().to_string(), cli);
    }
}

#[test]
fn parse_sampler_rejects_unknown_names() {
    for bad in ["", "eulr", "euler_b", "DPM++ 3M SDE", "ddim_karras", "karras", "dpmpp_2m karras extra"] {
        let err = parse_sampler(bad).unwrap_err();
        assert!(!err.is_empty(), "{bad}");
        if bad != "ddim_karras" {
            for valid in ["euler_a", "dpmpp_2m_karras", "ddim", "\"DPM++ 2M Karras\""] {
                assert!(err.contains(valid), "{bad}: error {err:?} lacks {valid}");
            }
        }
    }
    assert!(Sampler::parse("nope").is_err());
}

#[test]
fn infotext_names_follow_a1111() {
    let p = |n: &str| Sampler::parse(n).unwrap();
    assert_eq!((p("euler_a").a1111_name(), p("euler_a").schedule_label()), ("Euler a", None));
    assert_eq!(
        (p("dpmpp_2m_karras").a1111_name(), p("dpmpp_2m_karras").schedule_label()),
        ("DPM++ 2M", Some("Karras"))
    );
    assert_eq!((p("euler_a_karras").a1111_name(), p("euler_a_karras").schedule_label()), ("Euler a", Some("Karras")));
    // A1111 1.9+'s "Automatic" is Karras for DPM++ 2M / 2S a: say Uniform.
    assert_eq!((p("dpmpp_2m").a1111_name(), p("dpmpp_2m").schedule_label()), ("DPM++ 2M", Some("Uniform")));
    assert_eq!(p("dpmpp_2s_a").schedule_label(), Some("Uniform"));
    assert_eq!((p("ddim").a1111_name(), p("ddim").schedule_label()), ("DDIM", None));
    assert_eq!((p("lms").a1111_name(), p("heun").a1111_name(), p("dpm2").a1111_name()), ("LMS", "Heun", "DPM2"));
}

/// How the pipeline plugs in: a model struct with its own `eps` method
/// implements `EpsModel`; `sample` takes it with a `&mut dyn Progress`.
#[test]
fn a_model_struct_plugs_into_sample() {
    struct Model {
        calls: usize,
    }
    impl Model {
        fn eps(&mut self, x: &[f32], t: f32) -> Vec<f32> {
            self.calls += 1;
            analytic_eps(x, t)
        }
    }
    impl sdw::sampling::EpsModel for Model {
        fn eps(&mut self, x: &[f32], t: f32) -> Vec<f32> {
            Model::eps(self, x, t)
        }
    }
    let schedule = Schedule::new();
    let mut steps_seen = 0;
    let mut bar = |done: usize, _total: usize| steps_seen = done;
    let progress: &mut dyn sdw::sampling::Progress = &mut bar;
    for (name, evals) in [("heun", 2 * 6 - 1), ("ddim", 6), ("dpmpp_2m_karras", 6), ("dpm2", 2 * 6 - 1)] {
        let mut model = Model { calls: 0 };
        let mut rng = Philox::new(1);
        let noise = rng.randn(N);
        let out = sample(
            &Sampler::parse(name).unwrap(),
            6,
            &schedule,
            &mut model,
            noise,
            Start::Noise,
            None,
            &mut rng,
            progress,
        );
        assert_eq!(out.len(), N);
        assert!(out.iter().all(|v| v.is_finite()), "{name}");
        assert_eq!(model.calls, evals, "{name}: model calls");
    }
    assert_eq!(steps_seen, 6);
}
