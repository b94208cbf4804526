//! The sampler registry: one table, [`SAMPLERS`], holds every sampler's names and
//! how it runs; [`Sampler`] is a sampler with its sigma schedule, as `--sampler`,
//! `--schedule` and A1111's infotext name it. Every name lookup (CLI and A1111
//! names, parsing, `sdw samplers`) reads the table, so a new sampler is its
//! [`SamplerKind`] variant, its function and one row.

use std::fmt;
use std::str::FromStr;

use super::k_diffusion::{KSamplerFn, dpm2, dpmpp_2m, dpmpp_2s_ancestral, euler, euler_ancestral, heun, lms};
use super::run::schedule_sigmas;
use super::schedule::Schedule;

/// The sampling algorithms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SamplerKind {
    Euler,
    EulerA,
    Heun,
    Dpm2,
    Lms,
    Dpmpp2m,
    Dpmpp2sA,
    Ddim,
}

/// Sigma schedules for the k-diffusion samplers; also the `--schedule` values
/// (`normal`, `karras`, `exponential`).
///
/// `help = None`: these docs are for rustdoc; `--help` lists the bare values
/// (the option's own help says what they are).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, clap::ValueEnum)]
pub enum ScheduleKind {
    /// The model's own discretisation, `CompVisDenoiser.get_sigmas`
    /// (A1111 "Uniform"; "Automatic" for most samplers).
    #[default]
    #[value(help = None)]
    Normal,
    /// Karras et al. (rho 7) between the model's sigma_min and sigma_max.
    #[value(help = None)]
    Karras,
    /// Log-linear between the model's sigma_min and sigma_max.
    #[value(help = None)]
    Exponential,
}

impl ScheduleKind {
    /// A1111's "Schedule type" name.
    pub fn a1111_name(self) -> &'static str {
        match self {
            ScheduleKind::Normal => "Uniform",
            ScheduleKind::Karras => "Karras",
            ScheduleKind::Exponential => "Exponential",
        }
    }

    /// An A1111 "Schedule type" label or scheduler name (any case) as the schedule it
    /// gives `kind`: "Automatic" is the sampler's own default.
    pub fn from_a1111(label: &str, kind: SamplerKind) -> Result<ScheduleKind, String> {
        Ok(match label.to_lowercase().as_str() {
            "automatic" => kind.automatic_schedule(),
            "uniform" | "normal" => ScheduleKind::Normal,
            "karras" => ScheduleKind::Karras,
            "exponential" => ScheduleKind::Exponential,
            _ => {
                return Err(format!(
                    "schedule type \"{label}\" is not one sdw has (Automatic, Uniform, Karras, Exponential)"
                ));
            }
        })
    }
}

/// How a sampler runs.
#[derive(Clone, Copy, Debug)]
pub enum SamplerFn {
    /// A k-diffusion sampler: on sigmas, over the model seen as a [`Denoiser`](super::Denoiser).
    K(KSamplerFn),
    /// diffusers' DDIM: on its own timesteps, over the eps model ([`super::ddim`]).
    Ddim,
}

/// One row of [`SAMPLERS`]: a sampler's names and how it runs.
#[derive(Clone, Copy, Debug)]
pub struct SamplerEntry {
    pub kind: SamplerKind,
    /// The CLI spelling without a schedule suffix (`euler_a`, `dpmpp_2m`, ...).
    pub cli: &'static str,
    /// A1111's sampler name (1.9+ style, without the schedule): "Euler a",
    /// "DPM++ 2M", ...
    pub a1111: &'static str,
    /// Other spellings [`parse_sampler`] accepts, lowercase: k-diffusion's
    /// function names, A1111's `k_*` aliases, ...
    pub aliases: &'static [&'static str],
    pub run: SamplerFn,
    /// Whether the sampler draws fresh noise at every step.
    pub ancestral: bool,
    /// The schedule A1111 1.9+ means by "Automatic" for this sampler.
    pub automatic: ScheduleKind,
    /// A1111 runs it on steps+1 sigmas and drops the next-to-last one.
    pub discards_next_to_last_sigma: bool,
}

/// Every sampler, once, in the order `sdw samplers` lists them.
pub const SAMPLERS: &[SamplerEntry] = {
    use SamplerFn::{Ddim, K};
    use ScheduleKind::{Karras, Normal};
    &[
        SamplerEntry {
            kind: SamplerKind::EulerA,
            cli: "euler_a",
            a1111: "Euler a",
            aliases: &["euler_ancestral", "k_euler_a", "k_euler_ancestral"],
            run: K(euler_ancestral),
            ancestral: true,
            automatic: Normal,
            discards_next_to_last_sigma: false,
        },
        SamplerEntry {
            kind: SamplerKind::Euler,
            cli: "euler",
            a1111: "Euler",
            aliases: &["k_euler"],
            run: K(euler),
            ancestral: false,
            automatic: Normal,
            discards_next_to_last_sigma: false,
        },
        SamplerEntry {
            kind: SamplerKind::Heun,
            cli: "heun",
            a1111: "Heun",
            aliases: &["k_heun"],
            run: K(heun),
            ancestral: false,
            automatic: Normal,
            discards_next_to_last_sigma: false,
        },
        SamplerEntry {
            kind: SamplerKind::Dpm2,
            cli: "dpm2",
            a1111: "DPM2",
            aliases: &["dpm_2", "k_dpm_2"],
            run: K(dpm2),
            ancestral: false,
            automatic: Normal,
            discards_next_to_last_sigma: true,
        },
        SamplerEntry {
            kind: SamplerKind::Lms,
            cli: "lms",
            a1111: "LMS",
            aliases: &["k_lms"],
            run: K(lms),
            ancestral: false,
            automatic: Normal,
            discards_next_to_last_sigma: false,
        },
        SamplerEntry {
            kind: SamplerKind::Dpmpp2m,
            cli: "dpmpp_2m",
            a1111: "DPM++ 2M",
            aliases: &["dpm++_2m", "k_dpmpp_2m"],
            run: K(dpmpp_2m),
            ancestral: false,
            automatic: Karras,
            discards_next_to_last_sigma: false,
        },
        SamplerEntry {
            kind: SamplerKind::Dpmpp2sA,
            cli: "dpmpp_2s_a",
            a1111: "DPM++ 2S a",
            aliases: &["dpm++_2s_a", "dpmpp_2s_ancestral", "k_dpmpp_2s_a"],
            run: K(dpmpp_2s_ancestral),
            ancestral: true,
            automatic: Karras,
            discards_next_to_last_sigma: false,
        },
        SamplerEntry {
            kind: SamplerKind::Ddim,
            cli: "ddim",
            a1111: "DDIM",
            aliases: &[],
            run: Ddim,
            ancestral: false,
            automatic: Normal,
            discards_next_to_last_sigma: false,
        },
    ]
};

/// What `sdw samplers` lists, in order: every sampler on its own, and the
/// schedule variants in common use, by their CLI and pre-1.9 A1111 names.
const LISTED: [Sampler; 10] = {
    use SamplerKind::*;
    use ScheduleKind::{Karras, Normal};
    [
        Sampler::new(EulerA, Normal),
        Sampler::new(Euler, Normal),
        Sampler::new(Heun, Normal),
        Sampler::new(Dpm2, Normal),
        Sampler::new(Lms, Normal),
        Sampler::new(Dpmpp2m, Normal),
        Sampler::new(Dpmpp2m, Karras),
        Sampler::new(Dpmpp2sA, Normal),
        Sampler::new(EulerA, Karras),
        Sampler::new(Ddim, Normal),
    ]
};

/// The CLI names and their A1111 names, as `sdw samplers` lists them
/// (`("dpmpp_2m_karras", "DPM++ 2M Karras")`, ...).
pub fn sampler_names() -> impl Iterator<Item = (String, String)> {
    LISTED.iter().map(|s| (s.cli_name(), s.a1111_full_name()))
}

impl SamplerKind {
    /// This sampler's row of [`SAMPLERS`].
    pub fn entry(self) -> &'static SamplerEntry {
        SAMPLERS.iter().find(|e| e.kind == self).expect("every SamplerKind has a row in SAMPLERS")
    }

    /// The CLI spelling without a schedule suffix (`euler_a`, `dpmpp_2m`, ...).
    pub fn cli_name(self) -> &'static str {
        self.entry().cli
    }

    /// A1111's sampler name (1.9+ style, without the schedule): "Euler a",
    /// "DPM++ 2M", ...
    pub fn a1111_name(self) -> &'static str {
        self.entry().a1111
    }

    /// The schedule A1111 1.9+ means by "Automatic" for this sampler.
    pub fn automatic_schedule(self) -> ScheduleKind {
        self.entry().automatic
    }

    /// A1111 runs these on steps+1 sigmas and drops the next-to-last one.
    pub fn discards_next_to_last_sigma(self) -> bool {
        self.entry().discards_next_to_last_sigma
    }

    /// Whether the sampler draws fresh noise at every step.
    pub fn is_ancestral(self) -> bool {
        self.entry().ancestral
    }

    /// The k-diffusion sampler function; `None` for DDIM (see [`super::ddim`]).
    pub fn k_sampler(self) -> Option<KSamplerFn> {
        match self.entry().run {
            SamplerFn::K(run) => Some(run),
            SamplerFn::Ddim => None,
        }
    }
}

/// Schedule suffixes a sampler name may carry (after whitespace is collapsed and
/// the name lowercased).
const SCHEDULE_SUFFIXES: [(&str, ScheduleKind); 6] = [
    ("_karras", ScheduleKind::Karras),
    (" karras", ScheduleKind::Karras),
    ("_ka", ScheduleKind::Karras),
    ("_exponential", ScheduleKind::Exponential),
    (" exponential", ScheduleKind::Exponential),
    ("_exp", ScheduleKind::Exponential),
];

/// A CLI name (`euler_a`, `dpmpp_2m_karras`, ...) or an A1111 name ("Euler a",
/// "DPM++ 2M Karras", ...; case-insensitive) -> the sampler and, when the name
/// carries one, its schedule. Any k-diffusion sampler takes a `_karras` /
/// `_exponential` (or " Karras" / " Exponential") suffix; A1111's `k_*`
/// aliases are accepted too.
pub fn parse_sampler(name: &str) -> Result<(SamplerKind, Option<ScheduleKind>), String> {
    let key = name.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
    let found = parse_base(&key).map(|k| (k, None)).or_else(|| {
        SCHEDULE_SUFFIXES
            .iter()
            .find_map(|(suf, sched)| key.strip_suffix(suf).and_then(parse_base).map(|k| (k, Some(*sched))))
    });
    match found {
        Some((SamplerKind::Ddim, Some(_))) => {
            Err(format!("{name:?}: DDIM has its own timesteps and takes no schedule"))
        }
        Some(found) => Ok(found),
        None => {
            let cli: Vec<String> = sampler_names().map(|(c, _)| c).collect();
            let a1111: Vec<String> = sampler_names().map(|(_, a)| format!("\"{a}\"")).collect();
            Err(format!(
                "unknown sampler {name:?}; valid names: {} (or the A1111 names {}, case-insensitive)",
                cli.join(", "),
                a1111.join(", ")
            ))
        }
    }
}

/// The sampler a lowercase name without a schedule suffix means: its CLI name,
/// its A1111 name or one of its aliases.
fn parse_base(base: &str) -> Option<SamplerKind> {
    SAMPLERS
        .iter()
        .find(|e| e.cli == base || e.a1111.eq_ignore_ascii_case(base) || e.aliases.contains(&base))
        .map(|e| e.kind)
}

/// A sampler with its schedule: what `--sampler` selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Sampler {
    pub kind: SamplerKind,
    pub schedule: ScheduleKind,
}

impl Sampler {
    pub const fn new(kind: SamplerKind, schedule: ScheduleKind) -> Self {
        Self { kind, schedule }
    }

    /// [`parse_sampler`], with the [`ScheduleKind::Normal`] schedule where the
    /// name gives none (`dpmpp_2m` and "DPM++ 2M" mean the uniform schedule,
    /// as before A1111 1.9).
    pub fn parse(name: &str) -> Result<Self, String> {
        let (kind, schedule) = parse_sampler(name)?;
        Ok(Self { kind, schedule: schedule.unwrap_or_default() })
    }

    /// The CLI spelling: `euler_a`, `dpmpp_2m_karras`, `lms_exponential`, ...
    pub fn cli_name(&self) -> String {
        match self.schedule {
            ScheduleKind::Normal => self.kind.cli_name().to_string(),
            ScheduleKind::Karras => format!("{}_karras", self.kind.cli_name()),
            ScheduleKind::Exponential => format!("{}_exponential", self.kind.cli_name()),
        }
    }

    /// Infotext "Sampler" value (A1111 1.9+: the schedule goes separately).
    pub fn a1111_name(&self) -> &'static str {
        self.kind.a1111_name()
    }

    /// A1111's name before 1.9, the schedule included: "Euler a",
    /// "DPM++ 2M Karras", ... ([`parse_sampler`] reads these too).
    pub fn a1111_full_name(&self) -> String {
        match self.schedule {
            ScheduleKind::Normal => self.kind.a1111_name().to_string(),
            s => format!("{} {}", self.kind.a1111_name(), s.a1111_name()),
        }
    }

    /// Infotext "Schedule type" value, `None` where A1111's "Automatic" gives
    /// our schedule (so the field can be left out): "Karras" and
    /// "Exponential" always, "Uniform" for samplers whose Automatic is Karras.
    pub fn schedule_label(&self) -> Option<&'static str> {
        if self.kind == SamplerKind::Ddim {
            return None;
        }
        match self.schedule {
            ScheduleKind::Normal if self.kind.automatic_schedule() == ScheduleKind::Normal => None,
            s => Some(s.a1111_name()),
        }
    }

    /// The sigmas this sampler runs on for `steps` steps (see [`sigmas_for`](super::sigmas_for)).
    pub fn sigmas(&self, schedule: &Schedule, steps: usize) -> Vec<f32> {
        schedule_sigmas(schedule, self.kind, self.schedule, steps)
    }
}

impl FromStr for Sampler {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Sampler::parse(s)
    }
}

impl fmt::Display for Sampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.cli_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each sampler has one row, and no name means two samplers.
    #[test]
    fn the_table_is_consistent() {
        let mut names: Vec<(String, SamplerKind)> = Vec::new();
        for (i, e) in SAMPLERS.iter().enumerate() {
            assert!(SAMPLERS[..i].iter().all(|o| o.kind != e.kind), "{:?} has two rows", e.kind);
            for alias in e.aliases {
                assert_eq!(*alias, alias.to_lowercase(), "aliases are lowercase");
            }
            let own = [e.cli.to_string(), e.a1111.to_lowercase()].into_iter();
            names.extend(own.chain(e.aliases.iter().map(|a| a.to_string())).map(|n| (n, e.kind)));
            assert_eq!(parse_sampler(e.a1111), Ok((e.kind, None)));
        }
        for (name, kind) in &names {
            assert!(names.iter().all(|(n, k)| n != name || k == kind), "{name:?} means two samplers");
        }
    }

    /// `sdw samplers` shows every sampler under its own name.
    #[test]
    fn every_sampler_is_listed() {
        for e in SAMPLERS {
            assert!(LISTED.contains(&Sampler::new(e.kind, ScheduleKind::Normal)), "{} is not listed", e.cli);
        }
    }

    #[test]
    fn a1111_full_names_carry_the_schedule() {
        let names: Vec<(String, String)> = sampler_names().collect();
        assert_eq!(names[0], ("euler_a".into(), "Euler a".into()));
        assert_eq!(names[6], ("dpmpp_2m_karras".into(), "DPM++ 2M Karras".into()));
        let exp = Sampler::new(SamplerKind::Lms, ScheduleKind::Exponential);
        assert_eq!(exp.a1111_full_name(), "LMS Exponential");
        assert_eq!(Sampler::parse(&exp.a1111_full_name()), Ok(exp));
    }
}
