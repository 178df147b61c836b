//! `[music]`: the music server's settings, a section of the voxloop config file.
//!
//! The server reads only this section of the file (the runtime checks the rest); the runtime's
//! own `Config` embeds [`MusicConfig`] so that one file configures both and `voxloop` refuses a
//! bad `[music]` value before it starts the server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use voxloop_paging::MAX_PAGE_BYTES;
use voxloop_settings::{in_range, origins};

/// The file name looked for in the current directory when `--config` is not given (the same
/// file the runtime reads).
pub const DEFAULT_CONFIG_FILE: &str = "voxloop.toml";

/// `[music]`: the music player MCP server.
///
/// Relative paths in a config file are relative to that file's directory (see
/// [`MusicConfig::resolve_paths`]); built-in defaults are relative to the current directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MusicConfig {
    /// Directory scanned (recursively) for mp3, ogg, opus, flac, wav and m4a files.
    pub library: PathBuf,
    /// Optional TOML file of remote tracks (`[[track]]` with `title`, `artist`, `url`,
    /// `mime_type`, optional `size` in bytes). Their hosts are allowed as upstreams.
    pub catalog: Option<PathBuf>,
    /// The only upstream hosts read (loopback included only when listed): host names or IP
    /// addresses, each optionally with `:port`. A listed name that resolves to a loopback or
    /// private address is refused unless that address is listed too.
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
    /// `--transport http`: MCP sessions open at once (1..=100000); a new one past it closes the
    /// longest idle first.
    pub max_sessions: usize,
    /// `--transport http`: seconds a session may sit unused before it is closed (1..=86400).
    pub session_idle_s: u64,
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
            max_sessions: 256,
            session_idle_s: 300,
        }
    }
}

/// A `[music]` value of the right type but outside what is allowed (the settings vocabulary
/// every voxloop config section shares).
pub use voxloop_settings::InvalidSetting;

/// Errors from [`MusicConfig::load`].
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file named.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or `[music]` has an unknown key or a value of the wrong type.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file named.
        path: PathBuf,
        /// The TOML parser's message (line, key and value).
        message: String,
    },
    /// A `[music]` value is out of range.
    #[error(transparent)]
    Invalid(#[from] InvalidSetting),
}

impl MusicConfig {
    /// The `[music]` section of `path` if given (it must exist), else of [`DEFAULT_CONFIG_FILE`]
    /// in the current directory if present, else the defaults; relative paths resolved and the
    /// values checked. Other sections of the file are not read.
    ///
    /// # Errors
    /// [`LoadError::Read`], [`LoadError::Parse`] (bad TOML anywhere in the file, or an unknown
    /// key or wrong type in `[music]`), [`LoadError::Invalid`].
    pub fn load(path: Option<&Path>) -> Result<MusicConfig, LoadError> {
        let path = match path {
            Some(path) => path.to_path_buf(),
            None if Path::new(DEFAULT_CONFIG_FILE).is_file() => PathBuf::from(DEFAULT_CONFIG_FILE),
            None => return Ok(MusicConfig::default()),
        };
        let text = std::fs::read_to_string(&path).map_err(|source| LoadError::Read {
            path: path.clone(),
            source,
        })?;
        let parse = |message: String| LoadError::Parse {
            path: path.clone(),
            message,
        };
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| parse(e.to_string()))?;
        let section = table.remove("music");
        let library_written = section.as_ref().is_some_and(|s| s.get("library").is_some());
        let mut config = match section {
            Some(section) => {
                MusicConfig::deserialize(section).map_err(|e| parse(format!("[music]: {e}")))?
            }
            None => MusicConfig::default(),
        };
        config.resolve_paths(path.parent().unwrap_or(Path::new("")), library_written);
        config.validate()?;
        Ok(config)
    }

    /// Makes the paths written in a config file relative to its directory `base`: the catalog
    /// always, the library only when the file set it (`library_written`; the default stays
    /// relative to the current directory).
    pub fn resolve_paths(&mut self, base: &Path, library_written: bool) {
        if library_written {
            self.library = base.join(&self.library);
        }
        self.catalog = self.catalog.take().map(|c| base.join(c));
    }

    /// Checks every value against its allowed range.
    ///
    /// # Errors
    /// The first [`InvalidSetting`] found.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        in_range(
            "music.upstream_timeout_ms",
            self.upstream_timeout_ms,
            1..=600_000,
            "milliseconds",
        )?;
        in_range(
            "music.max_page_bytes",
            self.max_page_bytes,
            1..=MAX_PAGE_BYTES,
            "bytes (512 KiB at most: MCP peers cap one message at 1 MiB, docs/ARCHITECTURE.md)",
        )?;
        in_range(
            "music.list_page_size",
            self.list_page_size,
            1..=1000,
            "items",
        )?;
        for host in &self.allow_hosts {
            if !is_host(host) {
                return Err(InvalidSetting {
                    key: "music.allow_hosts".into(),
                    value: format!("{host:?}"),
                    allowed:
                        "a host name or IP address, optionally with :port, without scheme or path"
                            .into(),
                });
            }
        }
        in_range(
            "music.max_sessions",
            self.max_sessions,
            1..=100_000,
            "sessions",
        )?;
        in_range(
            "music.session_idle_s",
            self.session_idle_s,
            1..=86_400,
            "seconds",
        )?;
        origins("music.allowed_origins", &self.allowed_origins)
    }
}

/// A host name or IP address, optionally with `:port` (IPv6 with a port in brackets).
fn is_host(s: &str) -> bool {
    if s.parse::<SocketAddr>().is_ok() {
        return true;
    }
    let s = match s.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() && !host.contains(':') => host,
        _ => s,
    };
    s.parse::<std::net::IpAddr>().is_ok()
        || (!s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_only_its_section_and_resolves_paths_against_the_file() {
        let dir = std::env::temp_dir().join(format!("mcp-audio-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("v.toml");
        std::fs::write(
            &file,
            "[llm]\nanything = 1\n[music]\nlibrary = \"songs\"\ncatalog = \"c.toml\"\n",
        )
        .unwrap();
        let config = MusicConfig::load(Some(&file)).unwrap();
        assert_eq!(config.library, dir.join("songs"));
        assert_eq!(config.catalog, Some(dir.join("c.toml")));

        std::fs::write(&file, "[music]\nmax_page_bytes = 0\n").unwrap();
        let err = MusicConfig::load(Some(&file)).unwrap_err();
        assert!(err.to_string().contains("music.max_page_bytes"), "{err}");
        std::fs::write(&file, "[music]\nlibary = \"x\"\n").unwrap();
        let err = MusicConfig::load(Some(&file)).unwrap_err();
        assert!(matches!(err, LoadError::Parse { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hosts_are_names_or_addresses_with_optional_ports() {
        for ok in [
            "example.com",
            "example.com:8080",
            "10.0.0.1",
            "[::1]:80",
            "::1",
        ] {
            assert!(is_host(ok), "{ok}");
        }
        for bad in ["http://example.com", "example.com/x", "", "a b"] {
            assert!(!is_host(bad), "{bad}");
        }
    }
}
