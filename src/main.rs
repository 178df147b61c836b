//! The `voxloop` command: see [`cli`] for the commands.

mod cli;

fn main() -> anyhow::Result<std::process::ExitCode> {
    cli::main()
}
