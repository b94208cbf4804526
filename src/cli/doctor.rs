//! `sdw doctor`: the adapter's details, then each check on one line.

use crate::device::{self, DeviceChoice};
use crate::doctor;

#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    /// The device to check against the CPU backend (`auto`: the one txt2img would use).
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceChoice,
    /// Image size the op checks use, in pixels (SD 1.5: 512; smaller is quicker).
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(64..=2048))]
    size: u32,
    /// Run only the checks whose name contains this text (e.g. `attention`, `UNet`).
    #[arg(long)]
    only: Option<String>,
    /// Also compare the tiny UNet layer by layer, to find the first layer that differs.
    #[arg(long)]
    trace: bool,
}

pub fn run(a: DoctorArgs) -> anyhow::Result<()> {
    let compute = device::select(a.device)?;
    println!("device: {}", compute.description);
    if compute.max_binding.is_some() {
        for (key, value) in device::adapter_details()? {
            println!("  {key:<20} {value}");
        }
        let tensor_cores = match crate::shaders::matmul::cooperative_status(&compute.device) {
            Ok(how) => format!("runs ({0} x {0} fragments, subgroups of {1})", how.fragment, how.subgroup),
            Err(why) => format!("left out: {why}"),
        };
        println!("  {:<20} {tensor_cores}", "tensor-core shader");
    }
    println!(
        "checks against the CPU backend (relative error = ||device - cpu|| / ||cpu||; times include kernel compilation):"
    );
    // A crashing check prints its own line; keep the default panic message out of it.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let results = doctor::run(&compute, a.size as usize, a.only.as_deref(), |r| println!("{}", r.line()));
    std::panic::set_hook(hook);
    if a.trace {
        println!("the tiny UNet layer by layer (relative error against the CPU backend):");
        for (layer, error) in doctor::trace_unet(&compute) {
            let flag = if error < doctor::BOUND { "" } else { "  <- over the bound" };
            println!("  {layer:<24} {error:>9.2e}{flag}");
        }
    }
    let failed: Vec<&str> = results.iter().filter(|r| !r.passed()).map(|r| r.name.as_str()).collect();
    if results.is_empty() {
        anyhow::bail!("no check matches --only {:?}", a.only.unwrap_or_default());
    }
    if failed.is_empty() {
        println!("all {} checks passed", results.len());
        Ok(())
    } else {
        anyhow::bail!(
            "{} of {} checks failed on {}: {}\nPlease report this output at the sdw issue tracker; --device cpu computes correctly meanwhile.",
            failed.len(),
            results.len(),
            compute.description,
            failed.join("; ")
        )
    }
}
