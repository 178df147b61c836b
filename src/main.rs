//! The `voxloop` command line. Subcommands arrive with the parts they drive.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use voxloop::config::Config;

/// voxloop: a voice-assistant runtime.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Configuration file (default: ./voxloop.toml if present, else built-in defaults).
    #[arg(long, global = true, env = "VOXLOOP_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check the configuration and print it in full (every key, defaults filled in).
    Config {
        /// Print the built-in defaults instead, ignoring any config file.
        #[arg(long)]
        defaults: bool,
    },
}

fn main() -> anyhow::Result<()> {
    voxloop::init_logging();
    let cli = Cli::parse();
    match cli.command {
        Command::Config { defaults } => {
            let config = if defaults {
                Config::default()
            } else {
                Config::load(cli.config.as_deref()).context("invalid configuration")?
            };
            print!("{}", config.to_toml());
        }
    }
    Ok(())
}
