//! voxloop's configuration: one TOML file, every limit named, defaults that work offline.
//!
//! The file is found by `--config PATH`, else `voxloop.toml` in the current directory if it
//! exists, else the built-in defaults apply. Unknown keys are refused (a typo must not silently
//! fall back to a default), and every value is checked once at start: a wrong one fails with a
//! [`ConfigError::Invalid`] that names the key, the value and what is allowed.
//!
//! `assets/config/voxloop.example.toml` documents every key with its default; a test keeps the
//! two in step.

use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::tools::paging::MAX_PAGE_BYTES;

/// The file name looked for in the current directory when `--config` is not given.
pub const DEFAULT_CONFIG_FILE: &str = "voxloop.toml";

/// Errors from reading or checking a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong type. The TOML
    /// parser's message points at the line, the key and the value.
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value has the right type but is outside what is allowed.
    #[error("config key `{key}` = {value} is not allowed: {allowed}")]
    Invalid {
        key: &'static str,
        value: String,
        allowed: String,
    },
}

/// The whole configuration. Each section has its own defaults; an absent section is all defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The bundled music player MCP server (`examples/mcp_audio`).
    pub music: MusicConfig,
}

/// `[music]`: the music player MCP server (DESIGN §4).
///
/// Relative paths in a config file are relative to that file's directory; built-in defaults are
/// relative to the current directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MusicConfig {
    /// Directory scanned (recursively) for mp3, ogg, opus, flac, wav and m4a files.
    pub library: PathBuf,
    /// Optional TOML file of remote tracks (`[[track]]` with `title`, `artist`, `url`,
    /// `mime_type`, optional `size` in bytes). Their hosts are allowed as upstreams.
    pub catalog: Option<PathBuf>,
    /// Upstream hosts allowed besides loopback (`127.0.0.0/8`, `::1`, `localhost`), as host names
    /// or IP addresses, without port.
    pub allow_hosts: Vec<String>,
    /// Time limit for one upstream range request, headers and body, in milliseconds.
    pub upstream_timeout_ms: u64,
    /// Largest page a client may ask for with `?start=S&end=E` (`E - S`), in bytes.
    pub max_page_bytes: u64,
    /// Resources per `resources/list` page.
    pub list_page_size: usize,
    /// Address for `--transport http` (streamable HTTP at `/mcp`).
    pub http_bind: SocketAddr,
    /// Browser origins accepted by the HTTP transport besides loopback ones
    /// (`http://localhost:*`, `http://127.0.0.1:*`, `http://[::1]:*`), e.g. `https://app.example`.
    pub allowed_origins: Vec<String>,
}

impl Default for MusicConfig {
    fn default() -> Self {
        Self {
            library: PathBuf::from("assets/music"),
            catalog: None,
            allow_hosts: Vec::new(),
            upstream_timeout_ms: 30_000,
            max_page_bytes: MAX_PAGE_BYTES,
            list_page_size: 50,
            http_bind: SocketAddr::from(([127, 0, 0, 1], 3001)),
            allowed_origins: Vec::new(),
        }
    }
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
        let base = path.parent().unwrap_or(Path::new(""));
        config.music.library = base.join(&config.music.library);
        config.music.catalog = config.music.catalog.map(|c| base.join(c));
        Ok(config)
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
        let m = &self.music;
        in_range(
            "music.upstream_timeout_ms",
            m.upstream_timeout_ms,
            1..=600_000,
            "milliseconds",
        )?;
        in_range(
            "music.max_page_bytes",
            m.max_page_bytes,
            1..=MAX_PAGE_BYTES,
            "bytes (512 KiB at most: MCP peers cap one message at 1 MiB, DESIGN §3)",
        )?;
        in_range("music.list_page_size", m.list_page_size, 1..=1000, "items")?;
        for host in &m.allow_hosts {
            if !is_host(host) {
                return Err(ConfigError::Invalid {
                    key: "music.allow_hosts",
                    value: format!("{host:?}"),
                    allowed: "a host name or IP address, without scheme, port or path".into(),
                });
            }
        }
        for origin in &m.allowed_origins {
            if !(origin.starts_with("http://") || origin.starts_with("https://")) {
                return Err(ConfigError::Invalid {
                    key: "music.allowed_origins",
                    value: format!("{origin:?}"),
                    allowed: "an origin with its scheme, e.g. \"https://app.example:443\"".into(),
                });
            }
        }
        Ok(())
    }

    /// The configuration as TOML, every key present (as `voxloop config` prints it).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config types always serialize to TOML")
    }
}

/// A host name (letters, digits, `.` and `-`) or an IP address: no scheme, port or path.
fn is_host(s: &str) -> bool {
    s.parse::<std::net::IpAddr>().is_ok()
        || (!s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'))
}

fn in_range<T: PartialOrd + fmt::Display>(
    key: &'static str,
    value: T,
    allowed: RangeInclusive<T>,
    unit: &str,
) -> Result<(), ConfigError> {
    if allowed.contains(&value) {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        key,
        value: value.to_string(),
        allowed: format!("from {} to {} {unit}", allowed.start(), allowed.end()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
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
    fn missing_named_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/voxloop.toml"))).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    }
}
