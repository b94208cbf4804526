use std::process::ExitCode;

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        let msg = info.to_string();
        let lower = msg.to_lowercase();
        // burn/cubecl report device allocation failures by panicking; say what it means.
        if lower.contains("out of memory") || lower.contains("outofmemory") || lower.contains("allocation") {
            eprintln!("error: the GPU ran out of memory ({msg}).\n{}", sdw::cli::oom_remedy());
        } else {
            eprintln!("error: sdw crashed: {msg}\nThis is a bug; please report it with the command you ran.");
        }
    }));
    match sdw::cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
