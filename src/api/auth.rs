//! Who is calling: API keys (stored as SHA-256), JWT bearer tokens (RFC 7519; HS256 and RS256,
//! `exp`, `iss` and `aud` required, `nbf` and `iat` checked when present, each with
//! `[auth.jwt] leeway_s`) and the devices' plain tokens, each giving a [`Principal`] with a
//! [`Role`] and an identity for the rate limits that a token cannot choose ([`Principal::id`]). A refusal is HTTP 401 with `WWW-Authenticate: Bearer` and the error codes
//! of RFC 6750 §3.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::api::config::AuthConfig;
pub use crate::api::config::Role;
use crate::models::hex;

/// The name of a caller admitted without a credential (`[auth] allow_anonymous`).
pub const ANONYMOUS: &str = "anonymous";
/// The name of a loopback caller of a surface with no credentials configured.
pub const LOCAL: &str = "local";

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The API key's name, the token's `sub`, `device:{id}`, `anonymous` or `local`.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// The credential's identity, which keys its rate-limit bucket: `key:{name}` for an API
    /// key, `jwt:{iss}:{sub}` for a JWT, `device:{id}` for a device token. `None` for callers
    /// without a credential (`anonymous`, `local`): the per-IP limit is theirs. Built by this
    /// module only, so a token's claims can never name another credential's bucket.
    pub id: Option<String>,
}

impl Principal {
    /// A caller without a credential (`anonymous` or `local`).
    pub fn unkeyed(name: &str, role: Role) -> Self {
        Self {
            name: name.into(),
            role,
            id: None,
        }
    }
}

/// Why a caller was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credential was presented.
    #[error("a credential is required: Authorization: Bearer <API key or JWT>")]
    Missing,
    /// A credential was presented and refused; the reason is safe to show.
    #[error("invalid credential: {0}")]
    Invalid(String),
}

impl IntoResponse for AuthError {
    /// 401 with `WWW-Authenticate: Bearer realm="voxloop"`, plus `error="invalid_token"` and an
    /// `error_description` for a refused credential (RFC 6750 §3), and the message as JSON.
    fn into_response(self) -> Response {
        let challenge = match &self {
            AuthError::Missing => r#"Bearer realm="voxloop""#.to_string(),
            AuthError::Invalid(why) => format!(
                r#"Bearer realm="voxloop", error="invalid_token", error_description="{}""#,
                why.replace(['"', '\\'], "'")
            ),
        };
        let mut response = (
            StatusCode::UNAUTHORIZED,
            axum::Json(serde_json::json!({"status": "error", "error": self.to_string()})),
        )
            .into_response();
        if let Ok(value) = HeaderValue::from_str(&challenge) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
        response
    }
}

/// Why an auth configuration cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    /// A non-loopback address with no credential configured and `allow_anonymous` off.
    #[error(
        "refusing to serve {bind} without credentials: configure [auth] api_keys, jwt or tokens, or allow_anonymous = true (with no credentials only loopback addresses are served)"
    )]
    Unprotected {
        /// The address it would have listened on.
        bind: String,
    },
    /// The HS256 secret's environment variable (named here) is not set.
    #[error("[auth.jwt] hs256_secret_env: environment variable {0} is not set")]
    MissingSecret(String),
    /// The HS256 secret in this environment variable is shorter than 32 bytes.
    #[error("[auth.jwt] hs256_secret_env: the secret in {0} is shorter than 32 bytes")]
    ShortSecret(String),
    /// The RS256 public key file cannot be read or parsed.
    #[error("[auth.jwt] rs256_public_key {path}: {reason}")]
    PublicKey {
        /// The PEM file.
        path: String,
        /// What went wrong, in the words of the library or program that failed.
        reason: String,
    },
}

/// The claims voxloop reads; `exp`, `nbf`, `iss` and `aud` are checked by the validation itself.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    iss: Option<String>,
    /// Issued at, seconds since the epoch (RFC 7519 §4.1.6).
    iat: Option<i64>,
    #[serde(default)]
    role: Option<String>,
}

struct Jwt {
    keys: Vec<(Algorithm, DecodingKey)>,
    issuer: String,
    audience: String,
    leeway_s: u64,
}

/// The credentials of one surface.
pub struct Auth {
    /// SHA-256 of each API key -> (name, role).
    keys: HashMap<[u8; 32], (String, Role)>,
    jwt: Option<Jwt>,
    tokens: Vec<String>,
    device_tokens: HashMap<String, String>,
    /// Who a caller without a credential is, if admitted.
    anonymous: Option<Principal>,
    admin_tools: Vec<String>,
    /// Activated devices' tokens (and pending ones), on the device surface.
    device_store: Option<Arc<dyn DeviceTokens>>,
}

/// Tokens issued to devices at run time rather than in the config (the device server's
/// activation store, `device::activation`), which the device surface accepts too.
pub trait DeviceTokens: Send + Sync {
    /// Whether `token` belongs to the device `device_id`: its own token, or one of an
    /// activation waiting for approval.
    ///
    /// # Errors
    /// The store cannot be read.
    fn accepts(
        &self,
        device_id: &str,
        token: &str,
    ) -> Result<bool, Box<dyn std::error::Error + Send + Sync>>;
}

/// SHA-256 of `key`, lowercase hex: what `[[auth.api_keys]] sha256` holds.
pub fn hash_key(key: &str) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

/// A new API key: `vxk_` and 64 hex digits from the OS's random source (256 bits).
///
/// # Errors
/// The OS random source failed.
pub fn new_key() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(format!("vxk_{}", hex(&bytes)))
}

/// The credential a request carries: `Authorization: Bearer X` (or a bare `Authorization: X`,
/// as some firmware sends), else `X-API-Key`, else the `access_token` query parameter (RFC 6750
/// §2.3, for browsers' WebSockets, which cannot set headers).
pub fn credential(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    let from_header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    if let Some(value) = from_header("authorization") {
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .unwrap_or(value);
        return Some(token.trim().to_string());
    }
    if let Some(key) = from_header("x-api-key") {
        return Some(key.to_string());
    }
    let query = query?;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "access_token" || k == "authorization")
        .map(|(_, v)| v.strip_prefix("Bearer ").unwrap_or(&v).trim().to_string())
        .filter(|v| !v.is_empty())
}

impl Auth {
    /// The credentials of `config` for a surface bound to `bind` (`host:port`). With none
    /// configured and `allow_anonymous` unset, only a loopback `bind` is served, and its
    /// callers are `local` admins.
    ///
    /// # Errors
    /// [`AuthSetupError`]: no credentials on a non-loopback address, a missing or short HS256
    /// secret, an unreadable RS256 key.
    pub fn new(config: &AuthConfig, bind: &str) -> Result<Self, AuthSetupError> {
        Self::with_device_store(config, bind, None)
    }

    /// As [`Auth::new`], and on the device surface the tokens of `store` are accepted too:
    /// an activated device's own, and pending ones (whose sessions only speak the activation
    /// code). With a store, devices can be given credentials, so a non-loopback `bind` is
    /// served without any configured.
    ///
    /// # Errors
    /// As [`Auth::new`].
    pub fn with_device_store(
        config: &AuthConfig,
        bind: &str,
        device_store: Option<Arc<dyn DeviceTokens>>,
    ) -> Result<Self, AuthSetupError> {
        let anonymous = if config.allow_anonymous {
            Some(Principal::unkeyed(ANONYMOUS, config.anonymous_role))
        } else if !config.has_credentials() {
            let loopback = bind
                .parse::<SocketAddr>()
                .map(|a| a.ip().is_loopback())
                .unwrap_or_else(|_| bind.starts_with("localhost:"));
            match (loopback, &device_store) {
                (true, _) => Some(Principal::unkeyed(LOCAL, Role::Admin)),
                // Devices get their tokens through activation; nobody else gets in.
                (false, Some(_)) => None,
                (false, None) => return Err(AuthSetupError::Unprotected { bind: bind.into() }),
            }
        } else {
            None
        };
        let keys = config
            .api_keys
            .iter()
            .filter_map(|k| {
                let mut digest = [0u8; 32];
                for (i, byte) in digest.iter_mut().enumerate() {
                    *byte = u8::from_str_radix(k.sha256.get(2 * i..2 * i + 2)?, 16).ok()?;
                }
                Some((digest, (k.name.clone(), k.role)))
            })
            .collect();
        let jwt = match &config.jwt {
            None => None,
            Some(j) => {
                let mut keys = Vec::new();
                if let Some(var) = &j.hs256_secret_env {
                    let secret = std::env::var(var)
                        .map_err(|_| AuthSetupError::MissingSecret(var.clone()))?;
                    if secret.len() < 32 {
                        return Err(AuthSetupError::ShortSecret(var.clone()));
                    }
                    keys.push((
                        Algorithm::HS256,
                        DecodingKey::from_secret(secret.as_bytes()),
                    ));
                }
                if let Some(path) = &j.rs256_public_key {
                    let bad = |reason: String| AuthSetupError::PublicKey {
                        path: path.display().to_string(),
                        reason,
                    };
                    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
                    let key = DecodingKey::from_rsa_pem(&pem).map_err(|e| bad(e.to_string()))?;
                    keys.push((Algorithm::RS256, key));
                }
                Some(Jwt {
                    keys,
                    issuer: j.issuer.clone(),
                    audience: j.audience.clone(),
                    leeway_s: j.leeway_s,
                })
            }
        };
        Ok(Self {
            keys,
            jwt,
            tokens: config.tokens.clone(),
            device_tokens: config
                .device_tokens
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            anonymous,
            admin_tools: config.admin_tools.clone(),
            device_store,
        })
    }

    /// Whether only `admin` may call `tool` (`[auth] admin_tools`).
    pub fn is_admin_tool(&self, tool: &str) -> bool {
        self.admin_tools.iter().any(|t| t == tool)
    }

    /// The caller presenting `credential` (an API key or a JWT), or the anonymous caller when
    /// there is none and that is allowed.
    ///
    /// # Errors
    /// [`AuthError::Missing`] without a credential, [`AuthError::Invalid`] with a refused one.
    pub fn authenticate(&self, credential: Option<&str>) -> Result<Principal, AuthError> {
        self.check(None, credential)
    }

    /// As [`Auth::authenticate`], and a device's token is accepted too: the device's own token
    /// when `device_id` has one in `device_tokens`, else any of `tokens`.
    ///
    /// # Errors
    /// As [`Auth::authenticate`].
    pub fn authenticate_device(
        &self,
        device_id: Option<&str>,
        credential: Option<&str>,
    ) -> Result<Principal, AuthError> {
        self.check(Some(device_id.unwrap_or_default()), credential)
    }

    fn check(
        &self,
        device: Option<&str>,
        credential: Option<&str>,
    ) -> Result<Principal, AuthError> {
        let Some(credential) = credential else {
            return self.anonymous.clone().ok_or(AuthError::Missing);
        };
        if let Some((name, role)) = self.keys.get(&<[u8; 32]>::from(Sha256::digest(credential))) {
            return Ok(Principal {
                name: name.clone(),
                role: *role,
                id: Some(format!("key:{name}")),
            });
        }
        if let Some(device) = device {
            if let Some(store) = &self.device_store
                && !device.is_empty()
            {
                match store.accepts(device, credential) {
                    Ok(true) => {
                        return Ok(Principal {
                            name: format!("device:{device}"),
                            role: Role::User,
                            id: Some(format!("device:{device}")),
                        });
                    }
                    Ok(false) => {}
                    Err(e) => tracing::error!(error = %e, "device store unreadable"),
                }
            }
            let own = self.device_tokens.get(device);
            let accepted = match own {
                Some(own) => own == credential,
                None => self.tokens.iter().any(|t| t == credential),
            };
            if accepted {
                return Ok(Principal {
                    name: format!("device:{device}"),
                    role: Role::User,
                    id: Some(format!("device:{device}")),
                });
            }
            if own.is_some() {
                return Err(AuthError::Invalid(format!(
                    "device {device} must present its own token"
                )));
            }
        }
        if credential.split('.').count() == 3
            && let Some(jwt) = &self.jwt
        {
            return jwt.verify(credential);
        }
        // An open surface (nothing configured) admits its loopback callers whatever they send.
        match &self.anonymous {
            Some(local) if local.name == LOCAL => Ok(local.clone()),
            _ => Err(AuthError::Invalid("unknown API key or token".into())),
        }
    }
}

impl Jwt {
    fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let invalid = |why: &str| AuthError::Invalid(why.to_string());
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid("malformed JWT"))?;
        let Some((algorithm, key)) = self.keys.iter().find(|(a, _)| *a == header.alg) else {
            return Err(AuthError::Invalid(format!(
                "JWT algorithm {:?} is not accepted",
                header.alg
            )));
        };
        let mut validation = Validation::new(*algorithm);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.leeway = self.leeway_s;
        validation.validate_nbf = true;
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| {
            invalid(match e.kind() {
                ErrorKind::ExpiredSignature => "JWT has expired",
                ErrorKind::InvalidAudience => "JWT audience is not accepted",
                ErrorKind::InvalidIssuer => "JWT issuer is not accepted",
                ErrorKind::InvalidSignature => "JWT signature does not verify",
                ErrorKind::ImmatureSignature => "JWT is not valid yet (nbf)",
                ErrorKind::MissingRequiredClaim(_) => "JWT lacks exp, iss or aud",
                _ => "malformed JWT",
            })
        })?;
        // jsonwebtoken does not check `iat`; a token issued in the future is refused too.
        if let Some(iat) = data.claims.iat
            && iat > chrono::Utc::now().timestamp() + self.leeway_s as i64
        {
            return Err(invalid("JWT is issued in the future (iat)"));
        }
        let role = match data.claims.role.as_deref() {
            None | Some("user") => Role::User,
            Some("admin") => Role::Admin,
            Some(other) => {
                return Err(AuthError::Invalid(format!(
                    "JWT role {other:?} is neither admin nor user"
                )));
            }
        };
        let subject = data.claims.sub.unwrap_or_else(|| "jwt".into());
        let issuer = data.claims.iss.unwrap_or_default();
        Ok(Principal {
            id: Some(format!("jwt:{issuer}:{subject}")),
            name: subject,
            role,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::config::ApiKeyConfig;
    use crate::device::activation::DeviceStore;

    fn keyed() -> AuthConfig {
        AuthConfig {
            api_keys: vec![ApiKeyConfig {
                name: "ops".into(),
                role: Role::Admin,
                sha256: hash_key("vxk_secret"),
            }],
            tokens: vec!["dev-token".into()],
            device_tokens: [("aa:bb".to_string(), "own".to_string())].into(),
            ..AuthConfig::default()
        }
    }

    #[test]
    fn keys_device_tokens_and_their_refusals() {
        let auth = Auth::new(&keyed(), "0.0.0.0:80").unwrap();
        assert_eq!(
            auth.authenticate(Some("vxk_secret")).unwrap().role,
            Role::Admin
        );
        assert_eq!(auth.authenticate(None), Err(AuthError::Missing));
        assert!(matches!(
            auth.authenticate(Some("nope")),
            Err(AuthError::Invalid(_))
        ));
        // Device tokens only on the device surface.
        assert!(auth.authenticate(Some("dev-token")).is_err());
        let device = auth
            .authenticate_device(Some("cc:dd"), Some("dev-token"))
            .unwrap();
        assert_eq!(device.name, "device:cc:dd");
        assert!(
            auth.authenticate_device(Some("aa:bb"), Some("dev-token"))
                .is_err()
        );
        assert!(auth.authenticate_device(Some("aa:bb"), Some("own")).is_ok());
    }

    #[test]
    fn nothing_configured_serves_loopback_only() {
        let open = Auth::new(&AuthConfig::default(), "127.0.0.1:0").unwrap();
        assert_eq!(open.authenticate(None).unwrap().role, Role::Admin);
        let err = Auth::new(&AuthConfig::default(), "0.0.0.0:8080")
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("refusing to serve 0.0.0.0:8080"),
            "{err}"
        );
        // The device surface with a store: devices get tokens through activation, so it serves
        // any address; only loopback callers get in without one.
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(DeviceStore::new(dir.path().join("d.json"), 600, 8));
        let wide =
            Auth::with_device_store(&AuthConfig::default(), "0.0.0.0:8000", Some(store.clone()))
                .unwrap();
        assert_eq!(wide.authenticate(None), Err(AuthError::Missing));
        let local =
            Auth::with_device_store(&AuthConfig::default(), "127.0.0.1:8000", Some(store)).unwrap();
        assert_eq!(local.authenticate(None).unwrap().role, Role::Admin);
    }

    #[test]
    fn credentials_come_from_header_api_key_or_query() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            credential(&headers, Some("access_token=abc&x=1")).as_deref(),
            Some("abc")
        );
        headers.insert("x-api-key", HeaderValue::from_static("k1"));
        assert_eq!(credential(&headers, None).as_deref(), Some("k1"));
        headers.insert("authorization", HeaderValue::from_static("Bearer t1"));
        assert_eq!(credential(&headers, None).as_deref(), Some("t1"));
    }
}
