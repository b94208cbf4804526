//! SD 1.x noise schedules: the DDPM `alphas_cumprod`, k-diffusion's
//! `CompVisDenoiser` sigma <-> timestep maps, and the sigma schedules
//! (A1111 "Automatic"/uniform, Karras, exponential).
//!
//! Precision follows torch: the betas and their cumulative product in f64 (as
//! the LDM config builds them), everything after in f32 (`torch.linspace`,
//! `log`, `exp`, interpolation). Transcendentals are evaluated in f64 and
//! rounded to f32, which gives the correctly rounded f32 result (torch's own
//! kernels are within an ulp of it).

/// Training timesteps of SD 1.x.
pub const NUM_TRAIN_TIMESTEPS: usize = 1000;
/// `scaled_linear` beta schedule of SD 1.x (`linear_start`, `linear_end`).
pub const BETA_START: f64 = 0.00085;
pub const BETA_END: f64 = 0.012;
/// Karras et al.'s default rho.
pub const KARRAS_RHO: f64 = 7.0;

/// `cumprod(1 - betas)` with `betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2`,
/// computed in f64 and stored as f32 (what SD 1.x checkpoints carry).
pub fn alphas_cumprod() -> Vec<f32> {
    let lin = linspace_f64(BETA_START.sqrt(), BETA_END.sqrt(), NUM_TRAIN_TIMESTEPS);
    let mut acc = 1.0f64;
    lin.iter()
        .map(|b| {
            acc *= 1.0 - b * b;
            acc as f32
        })
        .collect()
}

/// diffusers' `DDIMScheduler` betas: the same schedule but built in f32
/// (`torch.linspace(..., dtype=float32) ** 2`), with torch's CPU `cumprod`
/// (f64 accumulator, f32 results).
pub fn alphas_cumprod_f32() -> Vec<f32> {
    let lin = linspace_f32(BETA_START.sqrt() as f32, BETA_END.sqrt() as f32, NUM_TRAIN_TIMESTEPS);
    let mut acc = 1.0f64;
    lin.iter()
        .map(|b| {
            let alpha = 1.0f32 - b * b;
            acc *= alpha as f64;
            acc as f32
        })
        .collect()
}

/// k-diffusion's `CompVisDenoiser` discretisation of an eps-prediction model:
/// `sigmas[t] = sqrt((1 - acp[t]) / acp[t])`, increasing in `t`.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub alphas_cumprod: Vec<f32>,
    pub sigmas: Vec<f32>,
    pub log_sigmas: Vec<f32>,
}

impl Default for Schedule {
    fn default() -> Self {
        Self::new()
    }
}

impl Schedule {
    /// The SD 1.x schedule.
    pub fn new() -> Self {
        Self::from_alphas_cumprod(alphas_cumprod())
    }

    /// From a checkpoint's own `alphas_cumprod` (f32, increasing `t`).
    pub fn from_alphas_cumprod(alphas_cumprod: Vec<f32>) -> Self {
        assert!(alphas_cumprod.len() >= 2, "alphas_cumprod needs at least 2 entries");
        let sigmas: Vec<f32> = alphas_cumprod.iter().map(|&a| ((1.0f32 - a) / a).sqrt()).collect();
        let log_sigmas = sigmas.iter().map(|&s| ln_f32(s)).collect();
        Self { alphas_cumprod, sigmas, log_sigmas }
    }

    /// Number of training timesteps (1000).
    pub fn len(&self) -> usize {
        self.sigmas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sigmas.is_empty()
    }

    /// Smallest sigma (t = 0), 0.0292 for SD 1.x.
    pub fn sigma_min(&self) -> f32 {
        self.sigmas[0]
    }

    /// Largest sigma (t = 999), 14.6146 for SD 1.x.
    pub fn sigma_max(&self) -> f32 {
        self.sigmas[self.sigmas.len() - 1]
    }

    /// Continuous timestep of `sigma`: linear interpolation in log sigma
    /// between the two neighbouring training sigmas, clamped to `[0, len-1]`
    /// (k-diffusion `DiscreteSchedule.sigma_to_t`, f32 like torch).
    pub fn sigma_to_t(&self, sigma: f32) -> f32 {
        let ls = &self.log_sigmas;
        let log_sigma = ln_f32(sigma);
        // low_idx = argmax(cumsum(log_sigma - log_sigmas >= 0)): the first index
        // where the running count of non-negative distances peaks.
        let (mut count, mut best, mut low) = (0usize, 0usize, 0usize);
        for (i, &l) in ls.iter().enumerate() {
            if log_sigma - l >= 0.0 {
                count += 1;
                if count > best {
                    best = count;
                    low = i;
                }
            }
        }
        let low = low.min(ls.len() - 2);
        let high = low + 1;
        let (lo, hi) = (ls[low], ls[high]);
        let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
        (1.0 - w) * low as f32 + w * high as f32
    }

    /// Sigma at a (fractional) timestep: interpolation in log sigma.
    /// `t` is clamped to `[0, len-1]`.
    pub fn t_to_sigma(&self, t: f32) -> f32 {
        let ls = &self.log_sigmas;
        let t = t.clamp(0.0, (ls.len() - 1) as f32);
        let low = t.floor() as usize;
        let high = t.ceil() as usize;
        let w = t - t.trunc();
        exp_f32((1.0 - w) * ls[low] + w * ls[high])
    }

    /// `n` sigmas at timesteps `linspace(len-1, 0, n)` and a final 0: the
    /// `CompVisDenoiser.get_sigmas` schedule (A1111 "Automatic"/"Uniform").
    pub fn get_sigmas(&self, n: usize) -> Vec<f32> {
        let mut out: Vec<f32> =
            linspace_f32((self.len() - 1) as f32, 0.0, n).into_iter().map(|t| self.t_to_sigma(t)).collect();
        out.push(0.0);
        out
    }

    /// Karras schedule between this model's sigma_min and sigma_max (rho 7).
    pub fn karras(&self, n: usize) -> Vec<f32> {
        karras(n, self.sigma_min() as f64, self.sigma_max() as f64, KARRAS_RHO)
    }

    /// Exponential schedule between this model's sigma_min and sigma_max.
    pub fn exponential(&self, n: usize) -> Vec<f32> {
        exponential(n, self.sigma_min() as f64, self.sigma_max() as f64)
    }
}

/// k-diffusion `get_sigmas_karras`: `(max^(1/rho) + ramp (min^(1/rho) - max^(1/rho)))^rho`
/// over `ramp = linspace(0, 1, n)` (f32), then a final 0.
pub fn karras(n: usize, sigma_min: f64, sigma_max: f64, rho: f64) -> Vec<f32> {
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    // Python floats meet an f32 tensor: each scalar is rounded to f32 first.
    let span = (min_inv_rho - max_inv_rho) as f32;
    let base = max_inv_rho as f32;
    let mut out: Vec<f32> = linspace_f32(0.0, 1.0, n)
        .into_iter()
        .map(|r| {
            let v = base + r * span;
            (v as f64).powf(rho) as f32
        })
        .collect();
    out.push(0.0);
    out
}

/// k-diffusion `get_sigmas_exponential`: `exp(linspace(ln sigma_max, ln sigma_min, n))`
/// (f32), then a final 0.
pub fn exponential(n: usize, sigma_min: f64, sigma_max: f64) -> Vec<f32> {
    let mut out: Vec<f32> =
        linspace_f32(sigma_max.ln() as f32, sigma_min.ln() as f32, n).into_iter().map(exp_f32).collect();
    out.push(0.0);
    out
}

/// `torch.linspace(start, end, n)` in f32: the first half counts up from
/// `start`, the second half down from `end` (torch's CPU kernel).
pub fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    match n {
        0 => vec![],
        1 => vec![start],
        _ => {
            let step = (end - start) / (n - 1) as f32;
            let half = n / 2;
            (0..n).map(|i| if i < half { start + step * i as f32 } else { end - step * (n - 1 - i) as f32 }).collect()
        }
    }
}

/// `torch.linspace(start, end, n, dtype=float64)`.
pub fn linspace_f64(start: f64, end: f64, n: usize) -> Vec<f64> {
    match n {
        0 => vec![],
        1 => vec![start],
        _ => {
            let step = (end - start) / (n - 1) as f64;
            let half = n / 2;
            (0..n).map(|i| if i < half { start + step * i as f64 } else { end - step * (n - 1 - i) as f64 }).collect()
        }
    }
}

#[inline]
pub(crate) fn ln_f32(x: f32) -> f32 {
    (x as f64).ln() as f32
}

#[inline]
pub(crate) fn exp_f32(x: f32) -> f32 {
    (x as f64).exp() as f32
}

#[inline]
pub(crate) fn expm1_f32(x: f32) -> f32 {
    (x as f64).exp_m1() as f32
}
