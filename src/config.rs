//! voxloop's configuration: one TOML file, every limit named, defaults that work offline.
//!
//! The file is found by `--config PATH`, else `voxloop.toml` in the current directory if it
//! exists, else the built-in defaults apply. Unknown keys are refused (a typo must not silently
//! fall back to a default), and every value is checked once at start: a wrong one fails with a
//! [`ConfigError::Invalid`] that names the key, the value and what is allowed.
//!
//! Each section is defined beside the code it configures and checks its own values (returning
//! a [`voxloop_settings::InvalidSetting`]); [`Config`] composes them, and [`Config::validate`]
//! adds the checks that span sections. `assets/config/voxloop.example.toml` documents every key
//! with its default; a test keeps the two in step.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
pub use voxloop_settings::InvalidSetting;

pub use mcp_audio::config::MusicConfig;

use crate::api::config::{AuthConfig, ServerConfig};
use crate::audio::AudioConfig;
use crate::breaker::BreakerConfig;
use crate::device::config::{DeviceConfig, VisionConfig};
use crate::duplex::config::DuplexConfig;
use crate::llm::config::LlmConfig;
use crate::speech::asr::AsrConfig;
use crate::speech::tts::TtsConfig;
use crate::speech::vad::VadConfig;
use crate::tools::config::{HubSettings, McpServerConfig, ToolsConfig};

/// The file name looked for in the current directory when `--config` is not given.
pub const DEFAULT_CONFIG_FILE: &str = "voxloop.toml";

/// Errors from reading or checking a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file named.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong type. The TOML
    /// parser's message points at the line, the key and the value.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file named.
        path: PathBuf,
        /// The TOML parser's message: the line, the key and the value.
        message: String,
    },
    /// A value has the right type but is outside what is allowed: the dotted key, the value as
    /// written and what is allowed, with its unit (the section's own check found it).
    #[error(transparent)]
    Invalid(#[from] InvalidSetting),
}

/// The whole configuration. Each section has its own defaults; an absent section is all defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[music]`: the bundled music player MCP server (crates/mcp-audio), which reads this section.
    pub music: MusicConfig,
    /// `[mcp_servers.NAME]`: the MCP servers the tool hub connects to. None configured: the
    /// bundled music server, as `music`.
    pub mcp_servers: BTreeMap<String, McpServerConfig>,
    /// `[tools]`: calls, paged media and terminal rules.
    pub tools: ToolsConfig,
    /// `[audio]`: playback and output formats.
    pub audio: AudioConfig,
    /// `[tts]`: text to speech.
    pub tts: TtsConfig,
    /// `[asr]`: speech to text.
    pub asr: AsrConfig,
    /// `[llm]`: the chat model's OpenAI-compatible endpoint.
    pub llm: LlmConfig,
    /// `[vad]`: voice activity, turns and barge-in.
    pub vad: VadConfig,
    /// `[device]`: the smart-speaker server (`voxloop serve`).
    pub device: DeviceConfig,
    /// `[vision]`: the model that answers the device camera's questions.
    pub vision: VisionConfig,
    /// `[auth]`: who may use each network surface (devices, the HTTP API, the duplex server).
    pub auth: AuthConfig,
    /// `[server]`: `voxloop serve`'s HTTP API and the request limits of every HTTP surface.
    pub server: ServerConfig,
    /// `[breaker]`: circuit breakers in front of every upstream (MCP servers, LLM, TTS).
    pub breaker: BreakerConfig,
    /// `[duplex]`: the PersonaPlex co-host.
    pub duplex: DuplexConfig,
    /// The file this configuration was read from, if any (not a key).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

impl Config {
    /// Loads the configuration: `path` if given (it must exist), else [`DEFAULT_CONFIG_FILE`] in
    /// the current directory if present, else the defaults. The result has been checked with
    /// [`Config::validate`] and its relative paths resolved against the file's directory.
    ///
    /// # Errors
    /// [`ConfigError::Read`] when a named file cannot be read, [`ConfigError::Parse`] for bad TOML,
    /// unknown keys or wrong types, [`ConfigError::Invalid`] for values out of range.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let path = match path {
            Some(path) => path.to_path_buf(),
            None if Path::new(DEFAULT_CONFIG_FILE).is_file() => PathBuf::from(DEFAULT_CONFIG_FILE),
            None => return Ok(Config::default()),
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let mut config = Config::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.clone(),
                message,
            },
            other => other,
        })?;
        // Paths written in the file are relative to it; defaults stay relative to the current
        // directory.
        let base = path.parent().unwrap_or(Path::new(""));
        let table: toml::Table = toml::from_str(&text).unwrap_or_default();
        let written =
            |section: &str, key: &str| table.get(section).and_then(|s| s.get(key)).is_some();
        config
            .music
            .resolve_paths(base, written("music", "library"));
        config.asr.model = config.asr.model.map(|m| base.join(m));
        config.llm.local_model = config.llm.local_model.map(|m| base.join(m));
        if let Some(jwt) = config.auth.jwt.as_mut() {
            jwt.rs256_public_key = jwt.rs256_public_key.take().map(|k| base.join(k));
        }
        for server in config.mcp_servers.values_mut() {
            server.cwd = server.cwd.take().map(|c| base.join(c));
        }
        config.source = Some(path);
        Ok(config)
    }

    /// Adds the servers of a Claude-Desktop-style JSON file (`{"mcpServers": {NAME: {"command",
    /// "args", "env", "cwd"} | {"url", "headers"}}}`, with an optional `"type"` of `stdio`,
    /// `http` or `streamable-http`) to [`Config::mcp_servers`].
    ///
    /// # Errors
    /// [`ConfigError::Read`], [`ConfigError::Parse`] for bad JSON or the legacy `sse` type, and
    /// [`ConfigError::Invalid`] for a bad server or a name the TOML file already uses.
    pub fn add_mcp_json(&mut self, path: &Path) -> Result<(), ConfigError> {
        #[derive(Deserialize)]
        struct File {
            #[serde(rename = "mcpServers")]
            mcp_servers: BTreeMap<String, Server>,
        }
        #[derive(Deserialize)]
        struct Server {
            #[serde(rename = "type")]
            kind: Option<String>,
            command: Option<String>,
            #[serde(default)]
            args: Vec<String>,
            #[serde(default)]
            env: BTreeMap<String, String>,
            cwd: Option<PathBuf>,
            url: Option<String>,
            #[serde(default)]
            headers: BTreeMap<String, String>,
        }
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let parse_error = |message: String| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        };
        let file: File = serde_json::from_str(&text).map_err(|e| parse_error(e.to_string()))?;
        for (name, server) in file.mcp_servers {
            if let Some(kind) = server.kind.as_deref()
                && !matches!(
                    kind,
                    "stdio" | "http" | "streamable-http" | "streamableHttp"
                )
            {
                return Err(parse_error(format!(
                    "server {name:?}: transport type {kind:?} is not supported (stdio or streamable HTTP)"
                )));
            }
            let config = McpServerConfig {
                command: server.command,
                args: server.args,
                env: server.env,
                cwd: server.cwd,
                url: server.url,
                headers: server.headers,
                bearer_token_env: None,
            };
            config.validate(&name)?;
            if self.mcp_servers.contains_key(&name) {
                return Err(InvalidSetting::new(
                    format!("mcp_servers.{name}"),
                    path.display().to_string(),
                    "a server name not already in the TOML configuration",
                )
                .into());
            }
            self.mcp_servers.insert(name, config);
        }
        Ok(())
    }

    /// Parses and checks TOML text; relative paths are left as written.
    ///
    /// # Errors
    /// As [`Config::load`]; a parse error's `path` is empty.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value against its allowed range.
    ///
    /// # Errors
    /// The first [`ConfigError::Invalid`] found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.music.validate()?;
        self.tools.validate()?;
        for (name, server) in &self.mcp_servers {
            server.validate(name)?;
        }
        self.audio.validate()?;
        self.asr.validate()?;
        self.llm.validate()?;
        self.duplex.validate()?;
        self.device.validate()?;
        if self.device.ota_shared_token && self.auth.tokens.is_empty() {
            return Err(InvalidSetting::new(
                "device.ota_shared_token",
                "true",
                "false, or true with a token in [auth] tokens to hand out",
            )
            .into());
        }
        self.vision.validate()?;
        self.vad.validate()?;
        self.tts.validate()?;
        self.server.validate()?;
        self.breaker.validate()?;
        self.auth.validate()?;
        Ok(())
    }

    /// The sections the tool hub starts from (`ToolHub::start`).
    pub fn hub(&self) -> HubSettings<'_> {
        HubSettings {
            servers: &self.mcp_servers,
            tools: &self.tools,
            breaker: &self.breaker,
            config_file: self.source.as_deref(),
        }
    }

    /// The configuration as TOML, every key present (as `voxloop config` prints it).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config types always serialize to TOML")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn each_section_checks_its_own_keys_through_the_whole_file() {
        for (toml, key, allowed) in [
            (
                "[llm]\nmax_request_chars = 5\n",
                "llm.max_request_chars",
                "from 100 to 100000 characters",
            ),
            (
                "[duplex]\nbind = \"nowhere\"\n",
                "duplex.bind",
                "an address and port",
            ),
            (
                "[duplex]\ndtype = \"f16\"\n",
                "duplex.dtype",
                "auto, bf16, f32",
            ),
            ("[vad]\nthreshold = 1.5\n", "vad.threshold", "from 0 to 1"),
            (
                "[breaker]\nfailures = 0\n",
                "breaker.failures",
                "from 1 to 1000 failures",
            ),
        ] {
            match Config::from_toml(toml) {
                Err(ConfigError::Invalid(e)) => {
                    assert_eq!(e.key, key, "{toml}");
                    assert!(e.allowed.contains(allowed), "{toml}: {}", e.allowed);
                }
                other => panic!("{toml}: {other:?}"),
            }
        }
    }

    #[test]
    fn out_of_range_value_names_key_value_and_range() {
        let err = Config::from_toml("[music]\nmax_page_bytes = 600000\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("music.max_page_bytes"), "{text}");
        assert!(text.contains("600000"), "{text}");
        assert!(text.contains("from 1 to 524288 bytes"), "{text}");
    }

    #[test]
    fn a_long_context_prompt_is_refused() {
        let long = "word ".repeat(50);
        let err = Config::from_toml(&format!("[asr]\ncontext_prompt = \"{long}\"\n")).unwrap_err();
        assert!(err.to_string().contains("asr.context_prompt"), "{err}");
        let ok = Config::from_toml("[asr]\ncontext_prompt = \"\"\n").unwrap();
        assert_eq!(ok.asr.context_prompt.as_deref(), Some(""));
    }

    #[test]
    fn unknown_key_is_refused_by_name() {
        let err = Config::from_toml("[music]\nlibary = \"x\"\n").unwrap_err();
        assert!(err.to_string().contains("libary"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_value() {
        let err = Config::from_toml("[music]\nupstream_timeout_ms = \"soon\"\n").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("upstream_timeout_ms") && text.contains("soon"),
            "{text}"
        );
    }

    #[test]
    fn bad_allow_host_and_origin_are_refused() {
        let err = Config::from_toml("[music]\nallow_hosts = [\"http://x/\"]\n").unwrap_err();
        assert!(err.to_string().contains("music.allow_hosts"), "{err}");
        let err = Config::from_toml("[music]\nallowed_origins = [\"example.com\"]\n").unwrap_err();
        assert!(err.to_string().contains("music.allowed_origins"), "{err}");
        Config::from_toml("[music]\nallow_hosts = [\"cdn.example.com\", \"::1\"]\n").unwrap();
    }

    #[test]
    fn relative_paths_resolve_against_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("v.toml");
        std::fs::write(
            &file,
            "[music]\nlibrary = \"songs\"\ncatalog = \"c.toml\"\n",
        )
        .unwrap();
        let config = Config::load(Some(&file)).unwrap();
        assert_eq!(config.music.library, dir.path().join("songs"));
        assert_eq!(config.music.catalog, Some(dir.path().join("c.toml")));
    }

    #[test]
    fn mcp_servers_need_exactly_one_transport() {
        let ok =
            "[mcp_servers.a]\ncommand = \"x\"\n[mcp_servers.b]\nurl = \"http://127.0.0.1:1/mcp\"\n";
        assert_eq!(Config::from_toml(ok).unwrap().mcp_servers.len(), 2);
        for (bad, needle) in [
            ("[mcp_servers.a]\n", "exactly one of"),
            (
                "[mcp_servers.a]\ncommand = \"x\"\nurl = \"http://h/mcp\"\n",
                "exactly one of",
            ),
            ("[mcp_servers.a]\nurl = \"ftp://h\"\n", "mcp_servers.a.url"),
            (
                "[mcp_servers.a]\ncommand = \"x\"\nbearer_token_env = \"T\"\n",
                "only with `url`",
            ),
            ("[mcp_servers.\"a b\"]\ncommand = \"x\"\n", "server name"),
            ("[tools]\nprefetch = 9\n", "tools.prefetch"),
        ] {
            let err = Config::from_toml(bad).unwrap_err().to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn default_paths_stay_relative_to_the_current_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("v.toml");
        std::fs::write(&file, "[llm]\nmodel = \"m\"\n").unwrap();
        assert_eq!(
            Config::load(Some(&file)).unwrap().music.library,
            PathBuf::from("assets/music")
        );
    }

    #[test]
    fn missing_named_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/voxloop.toml"))).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    }
}
