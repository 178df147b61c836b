//! `voxloop auth ...` and `voxloop devices ...`: API keys and smart-speaker activation.

use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::Subcommand;

use voxloop::config::Config;

#[derive(Debug, Subcommand)]
pub(crate) enum AuthCommand {
    /// Make a new API key: prints the key (give it to the caller; it is not stored) and the
    /// `[[auth.api_keys]]` entry with its SHA-256 for the config file.
    NewKey {
        /// Who holds it (logs, metrics, the per-key rate limit).
        #[arg(long)]
        name: String,
        /// admin or user.
        #[arg(long, default_value = "user")]
        role: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum DevicesCommand {
    /// Activated devices and the activations waiting for approval.
    List,
    /// Approve the activation whose code a device shows or speaks: the device gets its own
    /// token at its next OTA check.
    Approve {
        /// The six-digit code.
        code: String,
    },
    /// Revoke a device's activation: its token stops working (it must be activated again).
    Revoke {
        /// The device's id (its MAC address, the `Device-Id` header).
        device_id: String,
    },
}

/// `voxloop devices ...`: the device store of `[device] store`.
pub(crate) fn devices(config: &Config, command: &DevicesCommand) -> anyhow::Result<ExitCode> {
    let store = voxloop::device::server::device_store(&config.device);
    match command {
        DevicesCommand::List => {
            let data = store.snapshot()?;
            println!("store: {}", store.path().display());
            if data.devices.is_empty() && data.pending.is_empty() {
                println!("no devices activated, none waiting");
            }
            for (id, device) in &data.devices {
                println!(
                    "activated  {id}  client {}  since {}",
                    device.client_id, device.approved_at
                );
            }
            for pending in &data.pending {
                println!(
                    "waiting    {}  client {}  code {}",
                    pending.device_id, pending.client_id, pending.code
                );
            }
        }
        DevicesCommand::Approve { code } => {
            let device = store.approve(code)?;
            println!("activated {device}: it gets its token at its next OTA check");
        }
        DevicesCommand::Revoke { device_id } => {
            if !store.revoke(device_id)? {
                bail!(
                    "device {device_id} is not activated ({})",
                    store.path().display()
                );
            }
            println!("revoked {device_id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `voxloop auth new-key`: a new API key, printed once with the `[[auth.api_keys]]` entry that
/// stores its SHA-256 (the key itself is never stored).
pub(crate) fn new_key(name: &str, role: &str) -> anyhow::Result<ExitCode> {
    let role = match role {
        "admin" | "user" => role,
        other => bail!("role {other:?}: use admin or user"),
    };
    let key = voxloop::api::auth::new_key().context("the OS random source")?;
    println!("API key (shown once): {key}\n");
    println!("[[auth.api_keys]]");
    println!("name = {}", toml_string(name));
    println!("role = \"{role}\"");
    println!("sha256 = \"{}\"", voxloop::api::auth::hash_key(&key));
    Ok(ExitCode::SUCCESS)
}

/// `s` as a TOML basic string (JSON's escapes are TOML's).
fn toml_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}
