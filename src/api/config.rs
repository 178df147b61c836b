//! `[auth]` and `[server]`: who may use each network surface (API keys, JWTs, device tokens,
//! roles) and the HTTP API's address and request limits.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use voxloop_settings::{InvalidSetting, in_range};

/// A caller's role. `admin` may also use the admin-only tools and endpoints (moving or dropping
/// the GPU model, changing its idle timeout); `user` may use everything else.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// May manage the GPU model and everything a user may.
    Admin,
    /// May talk to the assistant and call tools.
    #[default]
    User,
}

impl Role {
    /// `admin` or `user`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
        }
    }
}

/// `[[auth.api_keys]]`: one API key. Only its SHA-256 is stored (`voxloop auth new-key` makes a
/// key and prints this entry).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Who holds it, for logs, metrics and the per-key rate limit.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// SHA-256 of the key, 64 lowercase hex digits.
    pub sha256: String,
}

/// `[auth.jwt]`: JWT bearer tokens (RFC 7519). Signed with HS256 (a shared secret) or RS256 (an
/// RSA key pair; the public key here). `exp`, `iss` and `aud` are required and checked; the
/// `role` claim (`admin` or `user`, default `user`) gives the role, `sub` the name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// Name of an environment variable holding the HS256 secret (at least 32 bytes).
    pub hs256_secret_env: Option<String>,
    /// PEM file of the RSA public key that verifies RS256 tokens.
    pub rs256_public_key: Option<PathBuf>,
    /// The only accepted `iss`.
    pub issuer: String,
    /// The only accepted `aud`.
    pub audience: String,
    /// Clock skew allowed on `exp` and `nbf`, seconds.
    pub leeway_s: u64,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            hs256_secret_env: None,
            rs256_public_key: None,
            issuer: String::new(),
            audience: "voxloop".into(),
            leeway_s: 30,
        }
    }
}

/// `[auth]`: who may use the network surfaces: the device WebSocket, `voxloop serve`'s HTTP API
/// (`/mcp`, `/v1/mcp/*`, `/metrics`) and the duplex server (REST, WebSocket, MCP over HTTP).
///
/// Credentials: an API key or a JWT as `Authorization: Bearer ...` (or `X-API-Key`, or the
/// `access_token` query parameter of RFC 6750 §2.3 for browsers' WebSockets). Devices may also
/// present a device token. With no credential configured at all, a surface serves only
/// loopback callers, as `admin`, and refuses to bind to another address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Device tokens any device may present (the firmware's plain bearer token).
    pub tokens: Vec<String>,
    /// Per-device tokens, by `Device-Id`: that device must present its own.
    pub device_tokens: BTreeMap<String, String>,
    /// Accept callers without a credential, as `anonymous_role` (only when set).
    pub allow_anonymous: bool,
    /// The role of callers without a credential when `allow_anonymous` is set.
    pub anonymous_role: Role,
    /// API keys (hashed).
    pub api_keys: Vec<ApiKeyConfig>,
    /// JWT bearer tokens; absent: none accepted.
    pub jwt: Option<JwtConfig>,
    /// Tools only `admin` may call, on every surface (MCP and the REST bridge).
    pub admin_tools: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            tokens: Vec::new(),
            device_tokens: BTreeMap::new(),
            allow_anonymous: false,
            anonymous_role: Role::User,
            api_keys: Vec::new(),
            jwt: None,
            admin_tools: ["release_gpu", "offload_gpu", "update_gpu_timeout"]
                .map(String::from)
                .to_vec(),
        }
    }
}

impl AuthConfig {
    /// Checks every `[auth]` value against its allowed range.
    ///
    /// # Errors
    /// The first [`InvalidSetting`] found, naming the `auth.` key.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let invalid = |key: &str, value: String, allowed: &str| InvalidSetting {
            key: key.into(),
            value,
            allowed: allowed.into(),
        };
        let mut names = std::collections::BTreeSet::new();
        for key in &self.api_keys {
            if key.name.trim().is_empty() || !names.insert(key.name.as_str()) {
                return Err(invalid(
                    "auth.api_keys.name",
                    format!("{:?}", key.name),
                    "a name, different for each key",
                ));
            }
            let hex = key.sha256.len() == 64
                && key
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !hex {
                return Err(invalid(
                    "auth.api_keys.sha256",
                    format!("{:?} (key {:?})", key.sha256, key.name),
                    "64 lowercase hex digits (`voxloop auth new-key` prints them)",
                ));
            }
        }
        if let Some(jwt) = &self.jwt {
            if jwt.hs256_secret_env.is_none() && jwt.rs256_public_key.is_none() {
                return Err(invalid(
                    "auth.jwt",
                    "no key".into(),
                    "hs256_secret_env, rs256_public_key, or both",
                ));
            }
            if jwt.issuer.is_empty() || jwt.audience.is_empty() {
                return Err(invalid(
                    "auth.jwt.issuer",
                    format!("{:?} / audience {:?}", jwt.issuer, jwt.audience),
                    "a non-empty issuer and audience (both are checked)",
                ));
            }
            in_range("auth.jwt.leeway_s", jwt.leeway_s, 0..=3_600, "seconds")?;
        }
        Ok(())
    }

    /// Whether any credential is configured (tokens, API keys or JWT).
    pub fn has_credentials(&self) -> bool {
        !self.tokens.is_empty()
            || !self.device_tokens.is_empty()
            || !self.api_keys.is_empty()
            || self.jwt.is_some()
    }
}

/// `[server]`: `voxloop serve`'s HTTP API (its MCP endpoint, the REST bridge, metrics and
/// probes) and the request limits every HTTP surface applies (the device server's and the
/// duplex server's too).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address and port of the HTTP API (loopback unless configured).
    pub bind: String,
    /// Browser origins accepted besides loopback ones (`http://localhost:*`,
    /// `http://127.0.0.1:*`, `http://[::1]:*`); a request with another `Origin` gets 403.
    pub allowed_origins: Vec<String>,
    /// Serve `/metrics` without a credential (for a scraper on a trusted network).
    pub public_metrics: bool,
    /// Largest request body (REST bridge, MCP), bytes.
    pub max_body_bytes: usize,
    /// Most requests in one `/v1/mcp/tools/batch` call.
    pub max_batch_requests: usize,
    /// The rate limits' window, seconds.
    pub rate_window_s: u64,
    /// Requests per window for one credential (API key, token subject); 0: no limit.
    pub rate_per_key: u32,
    /// Requests per window from one IP address, before any credential is checked; 0: no limit.
    pub rate_per_ip: u32,
    /// Streamable-HTTP MCP sessions (`/mcp` of `voxloop serve` and of `voxloop duplex serve`)
    /// open at once (1..=100000); a new one past it closes the longest idle first.
    pub mcp_max_sessions: usize,
    /// MCP sessions one credential (an API key, a token's subject; an address for callers
    /// without one) may hold at once (0..=100000, 0: only the total); its new session past it
    /// closes its own longest idle, so one client cannot take every place.
    pub mcp_max_sessions_per_credential: usize,
    /// Seconds an MCP session may sit unused before it is closed (1..=86400); a client that
    /// never sends `DELETE` holds nothing longer.
    pub mcp_session_idle_s: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:8080".into(),
            allowed_origins: Vec::new(),
            public_metrics: false,
            max_body_bytes: 1 << 20,
            max_batch_requests: 100,
            rate_window_s: 60,
            rate_per_key: 600,
            rate_per_ip: 1200,
            mcp_max_sessions: 256,
            mcp_max_sessions_per_credential: 32,
            mcp_session_idle_s: 300,
        }
    }
}

impl ServerConfig {
    /// The MCP endpoints' session manager, bounded as `mcp_max_sessions`,
    /// `mcp_max_sessions_per_credential` and `mcp_session_idle_s` say.
    pub fn mcp_sessions(&self) -> voxloop_mcp_sessions::BoundedSessions {
        voxloop_mcp_sessions::BoundedSessions::new(
            self.mcp_max_sessions,
            std::time::Duration::from_secs(self.mcp_session_idle_s),
        )
        .per_owner(self.mcp_max_sessions_per_credential)
    }

    /// Checks every `[server]` value against its allowed range.
    ///
    /// # Errors
    /// The first [`InvalidSetting`] found, naming the `server.` key.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        voxloop_settings::origins("server.allowed_origins", &self.allowed_origins)?;
        in_range(
            "server.max_body_bytes",
            self.max_body_bytes,
            1_024..=67_108_864,
            "bytes",
        )?;
        in_range(
            "server.max_batch_requests",
            self.max_batch_requests,
            1..=10_000,
            "requests",
        )?;
        in_range(
            "server.rate_window_s",
            self.rate_window_s,
            1..=86_400,
            "seconds",
        )?;
        in_range(
            "server.rate_per_key",
            self.rate_per_key,
            0..=1_000_000,
            "requests",
        )?;
        in_range(
            "server.rate_per_ip",
            self.rate_per_ip,
            0..=1_000_000,
            "requests",
        )?;
        in_range(
            "server.mcp_max_sessions",
            self.mcp_max_sessions,
            1..=100_000,
            "sessions",
        )?;
        in_range(
            "server.mcp_max_sessions_per_credential",
            self.mcp_max_sessions_per_credential,
            0..=100_000,
            "sessions",
        )?;
        in_range(
            "server.mcp_session_idle_s",
            self.mcp_session_idle_s,
            1..=86_400,
            "seconds",
        )?;
        Ok(())
    }
}
