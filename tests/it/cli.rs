//! The `voxloop` binary's configuration handling, run as a real process.

use std::process::Command;

fn voxloop(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_voxloop"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("VOXLOOP_CONFIG")
        .output()
        .expect("run voxloop")
}

/// Every `section.key` of a TOML document.
fn key_paths(value: &toml::Value, prefix: &str, out: &mut Vec<String>) {
    if let toml::Value::Table(table) = value {
        for (key, value) in table {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            key_paths(value, &path, out);
            out.push(path);
        }
    }
}

#[test]
fn example_config_is_valid_and_documents_every_key() {
    let out = voxloop(&["--config", "assets/config/voxloop.example.toml", "config"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let example = std::fs::read_to_string("assets/config/voxloop.example.toml").unwrap();
    let defaults = voxloop(&["config", "--defaults"]);
    let defaults: toml::Value =
        toml::from_str(&String::from_utf8(defaults.stdout).unwrap()).unwrap();
    let mut keys = Vec::new();
    key_paths(&defaults, "", &mut keys);
    assert!(keys.len() > 5, "{keys:?}");
    for key in keys {
        let name = key.rsplit('.').next().unwrap();
        let documented = example.lines().any(|l| {
            let l = l.trim_start_matches(['#', ' ']);
            l.starts_with(&format!("{name} ="))
                || l == format!("[{key}]")
                || l.starts_with(&format!("[{key}."))
        });
        assert!(
            documented,
            "`{key}` is not documented in voxloop.example.toml"
        );
    }
    // The example's values are the defaults (paths resolve against the file's directory).
    let printed: toml::Value = toml::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    let mut printed_music = printed["music"].as_table().unwrap().clone();
    let mut default_music = defaults["music"].as_table().unwrap().clone();
    printed_music.remove("library");
    default_music.remove("library");
    assert_eq!(printed_music, default_music);
    for section in ["tools", "audio", "tts", "vad", "llm"] {
        assert_eq!(printed[section], defaults[section], "[{section}]");
    }
}

#[test]
fn a_wrong_value_fails_at_start_naming_key_value_and_range() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[music]\nupstream_timeout_ms = 0\n").unwrap();
    let out = voxloop(&["--config", file.to_str().unwrap(), "config"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("music.upstream_timeout_ms` = 0"), "{err}");
    assert!(err.contains("from 1 to 600000 milliseconds"), "{err}");

    std::fs::write(&file, "[musik]\n").unwrap();
    let out = voxloop(&["--config", file.to_str().unwrap(), "config"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("musik"));
}

#[test]
fn music_server_flags_are_checked_like_config() {
    let out = Command::new(env!("CARGO_BIN_EXE_mcp_audio"))
        .args(["--max-page-bytes", "0"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("music.max_page_bytes` = 0"), "{err}");

    let out = Command::new(env!("CARGO_BIN_EXE_mcp_audio"))
        .args(["--library", "/nonexistent/music"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/music is not a directory"));
}

#[test]
fn devices_are_listed_approved_and_revoked_from_the_command_line() {
    use voxloop::device::activation::{DeviceStore, OtaGrant};
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("devices.json");
    let config = dir.path().join("voxloop.toml");
    std::fs::write(
        &config,
        format!("[device]\nstore = {:?}\n", store_path.display().to_string()),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    // A device checked OTA and shows its code.
    let store = DeviceStore::new(&store_path, 600, 16);
    let OtaGrant::Pending(pending) = store.ota("aa:bb:cc:00:11:22", "client-1").unwrap() else {
        panic!("a new device is pending");
    };
    let run = |args: &[&str]| {
        let mut all = vec!["--config", config, "devices"];
        all.extend_from_slice(args);
        voxloop(&all)
    };
    let out = run(&["list"]);
    assert!(out.status.success());
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains(&pending.code), "{listed}");
    let out = run(&["approve", "999999x"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no pending activation"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["approve", &pending.code]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        store.ota("aa:bb:cc:00:11:22", "client-1").unwrap(),
        OtaGrant::Activated {
            token: pending.token.clone()
        }
    );
    let out = run(&["list"]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains("activated  aa:bb:cc:00:11:22"), "{listed}");
    assert!(!listed.contains(&pending.token), "tokens are not printed");
    assert!(run(&["revoke", "aa:bb:cc:00:11:22"]).status.success());
    assert!(!run(&["revoke", "aa:bb:cc:00:11:22"]).status.success());
}
