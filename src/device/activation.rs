//! Device activation: how a xiaozhi device gets a token of its own without the OTA endpoint
//! handing tokens to whoever names a device.
//!
//! The flow is the anchors' (xiaozhi-esp32 `main/ota.cc`, the xiaozhi-esp32-server manager):
//! 1. A device unknown to the store checks OTA. The answer carries an `activation` block (a
//!    six-digit `code` the device shows or speaks, a `challenge`) and a token minted for this
//!    request. The token is *pending*: it opens a session that only speaks the code.
//! 2. The owner, who sees the code on the device, approves it (`voxloop devices approve CODE`,
//!    or `POST /xiaozhi/admin/devices/approve` as an admin). The pending token becomes the
//!    device's own.
//! 3. The device polls `POST {ota_path}activate` (202 while pending, 200 once approved) and
//!    checks OTA again: the answer now carries its token and no activation.
//!
//! A caller that only names a device learns nothing: an activated device's token is answered
//! only to the `Client-Id` it was activated with (a UUID the firmware generates and keeps), and
//! any other caller gets a new pending activation that the owner never approves. The
//! firmware's HMAC over the challenge is not checked: voxloop holds no device keys, and the
//! owner's approval of the shown code is the proof.
//!
//! The store is one JSON file (`[device] store`, mode 0600), read and rewritten under an
//! exclusive file lock for every change, so that `voxloop devices` in another process and
//! the server see one state. Pending activations expire after `[device] activation_ttl_s`;
//! at most `[device] max_pending_activations` are kept (the oldest dropped first).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::models::hex;

/// A device the owner approved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivatedDevice {
    /// The `Client-Id` it was activated with; OTA answers its token only to that client.
    pub client_id: String,
    /// Its token (`vxd_` and 32 hex digits).
    pub token: String,
    /// When it was approved, RFC 3339.
    pub approved_at: String,
}

/// An activation waiting for the owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingActivation {
    /// Six digits, shown or spoken by the device.
    pub code: String,
    /// The device's `Device-Id` (MAC address).
    pub device_id: String,
    /// The `Client-Id` of the OTA request.
    pub client_id: String,
    /// The challenge given to the device (a random hex string).
    pub challenge: String,
    /// The token given with the code, valid once approved.
    pub token: String,
    /// Created, seconds since the Unix epoch.
    pub created_s: i64,
}

/// What the store file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreData {
    /// Activated devices by `Device-Id`.
    #[serde(default)]
    pub devices: BTreeMap<String, ActivatedDevice>,
    /// Activations waiting for approval, oldest first.
    #[serde(default)]
    pub pending: Vec<PendingActivation>,
}

/// What OTA tells a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OtaGrant {
    /// The device is activated for this client: its token.
    Activated {
        /// The device's own token, for its `Authorization` header.
        token: String,
    },
    /// The device must be activated: show `code`; `token` works once the owner approves.
    Pending(PendingActivation),
}

/// What a token presented by a device is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenState {
    /// The device's own token.
    Activated,
    /// A token of an activation not yet approved; the session only speaks the code.
    Pending {
        /// The activation code the device speaks and shows.
        code: String,
    },
    /// Not a token of this device.
    Unknown,
}

/// The device surface accepts a device's own token and a pending activation's.
impl crate::api::auth::DeviceTokens for DeviceStore {
    fn accepts(
        &self,
        device_id: &str,
        token: &str,
    ) -> Result<bool, Box<dyn std::error::Error + Send + Sync>> {
        Ok(match self.token_state(device_id, token)? {
            TokenState::Activated | TokenState::Pending { .. } => true,
            TokenState::Unknown => false,
        })
    }
}

/// The answer to `POST {ota_path}activate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivateState {
    /// Approved (HTTP 200).
    Approved,
    /// Still waiting for the owner (HTTP 202).
    Waiting,
    /// No activation of this device and client (HTTP 404).
    Unknown,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The device store cannot be read or written.
    #[error("device store {path}: {source}")]
    Io {
        /// The device store file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The device store is not valid JSON.
    #[error("device store {path} is not valid JSON: {source}")]
    Corrupt {
        /// The device store file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// No pending activation has this code.
    #[error("no pending activation has code {0:?} (codes expire; the device shows a new one)")]
    UnknownCode(String),
    /// The OS random source failed (its message).
    #[error("the OS random source failed: {0}")]
    Random(String),
}

/// The device store.
pub struct DeviceStore {
    path: PathBuf,
    ttl_s: i64,
    max_pending: usize,
    /// One change at a time in this process (the file lock covers other processes).
    local: Mutex<()>,
}

fn random_hex(bytes: usize) -> Result<String, StoreError> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| StoreError::Random(e.to_string()))?;
    Ok(hex(&buf))
}

fn random_code() -> Result<String, StoreError> {
    let mut buf = [0u8; 4];
    getrandom::fill(&mut buf).map_err(|e| StoreError::Random(e.to_string()))?;
    Ok(format!("{:06}", u32::from_le_bytes(buf) % 1_000_000))
}

/// The default store file: `devices.json` beside the model directory's parent
/// (`~/.local/share/voxloop/devices.json` on Linux).
pub fn default_store_path() -> PathBuf {
    dirs::data_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join("voxloop")
        .join("devices.json")
}

impl DeviceStore {
    /// The store in `path` (created on first change). Pending activations live `ttl_s`
    /// seconds; at most `max_pending` are kept.
    pub fn new(path: impl Into<PathBuf>, ttl_s: u64, max_pending: usize) -> Self {
        Self {
            path: path.into(),
            ttl_s: ttl_s as i64,
            max_pending: max_pending.max(1),
            local: Mutex::new(()),
        }
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Runs `change` on the store's data under the locks, writing it back when `change` says
    /// so (atomically: a temporary file renamed over the old one).
    fn with<T>(
        &self,
        mut change: impl FnMut(&mut StoreData) -> Result<(T, bool), StoreError>,
    ) -> Result<T, StoreError> {
        let _local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        // No file yet: a look needs no lock (and creates nothing).
        if !self.path.exists() {
            let (result, changed) = change(&mut StoreData::default())?;
            if !changed {
                return Ok(result);
            }
        }
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| self.io(e))?;
        }
        let lock_path = self.path.with_extension("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| self.io(e))?;
        lock.lock().map_err(|e| self.io(e))?;
        let mut data = match std::fs::read(&self.path) {
            Ok(bytes) if bytes.is_empty() => StoreData::default(),
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                path: self.path.clone(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StoreData::default(),
            Err(e) => return Err(self.io(e)),
        };
        let now = chrono::Utc::now().timestamp();
        let before = data.pending.len();
        data.pending.retain(|p| now - p.created_s < self.ttl_s);
        let expired = data.pending.len() != before;
        let (result, changed) = change(&mut data)?;
        if changed || expired {
            self.write(&data)?;
        }
        drop(lock);
        Ok(result)
    }

    fn write(&self, data: &StoreData) -> Result<(), StoreError> {
        let tmp = self.path.with_extension("json.tmp");
        let mut options = OpenOptions::new();
        options.create(true).write(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(0o600);
        }
        let mut file: File = options.open(&tmp).map_err(|e| self.io(e))?;
        let json = serde_json::to_vec_pretty(data).expect("the store serialises");
        file.write_all(&json).map_err(|e| self.io(e))?;
        file.sync_all().map_err(|e| self.io(e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| self.io(e))
    }

    /// What OTA answers the device `device_id` asking as `client_id`: its token when it was
    /// activated with this client, else a pending activation (the same one while it lasts for
    /// this device and client, a new one otherwise).
    ///
    /// # Errors
    /// [`StoreError`]: the file cannot be read or written, the random source failed.
    pub fn ota(&self, device_id: &str, client_id: &str) -> Result<OtaGrant, StoreError> {
        self.with(|data| {
            if let Some(device) = data.devices.get(device_id)
                && device.client_id == client_id
            {
                return Ok((
                    OtaGrant::Activated {
                        token: device.token.clone(),
                    },
                    false,
                ));
            }
            if let Some(p) = data
                .pending
                .iter()
                .find(|p| p.device_id == device_id && p.client_id == client_id)
            {
                return Ok((OtaGrant::Pending(p.clone()), false));
            }
            let code = loop {
                let code = random_code()?;
                if !data.pending.iter().any(|p| p.code == code) {
                    break code;
                }
            };
            let pending = PendingActivation {
                code,
                device_id: device_id.to_string(),
                client_id: client_id.to_string(),
                challenge: random_hex(16)?,
                token: format!("vxd_{}", random_hex(16)?),
                created_s: chrono::Utc::now().timestamp(),
            };
            if data.pending.len() >= self.max_pending {
                let excess = data.pending.len() + 1 - self.max_pending;
                data.pending.drain(..excess);
            }
            data.pending.push(pending.clone());
            Ok((OtaGrant::Pending(pending), true))
        })
    }

    /// What `token` is for the device `device_id`. Compared in constant time.
    ///
    /// # Errors
    /// [`StoreError`]: the file cannot be read.
    pub fn token_state(&self, device_id: &str, token: &str) -> Result<TokenState, StoreError> {
        self.with(|data| {
            if let Some(device) = data.devices.get(device_id)
                && same(&device.token, token)
            {
                return Ok((TokenState::Activated, false));
            }
            let pending = data
                .pending
                .iter()
                .find(|p| p.device_id == device_id && same(&p.token, token));
            Ok((
                match pending {
                    Some(p) => TokenState::Pending {
                        code: p.code.clone(),
                    },
                    None => TokenState::Unknown,
                },
                false,
            ))
        })
    }

    /// The state of `device_id`'s activation by `client_id` (and `challenge`, when the
    /// device sent one), for `POST {ota_path}activate`.
    ///
    /// # Errors
    /// [`StoreError`]: the file cannot be read.
    pub fn activate_state(
        &self,
        device_id: &str,
        client_id: &str,
        challenge: Option<&str>,
    ) -> Result<ActivateState, StoreError> {
        self.with(|data| {
            if data
                .devices
                .get(device_id)
                .is_some_and(|d| d.client_id == client_id)
            {
                return Ok((ActivateState::Approved, false));
            }
            let waiting = data.pending.iter().any(|p| {
                p.device_id == device_id
                    && p.client_id == client_id
                    && challenge.is_none_or(|c| c == p.challenge)
            });
            Ok((
                if waiting {
                    ActivateState::Waiting
                } else {
                    ActivateState::Unknown
                },
                false,
            ))
        })
    }

    /// Approves the pending activation with `code`: its device is activated with the token
    /// given with the code (replacing any earlier activation of that device). Returns the
    /// device's id.
    ///
    /// # Errors
    /// [`StoreError::UnknownCode`] when no pending activation has this code (or it expired),
    /// else the file's errors.
    pub fn approve(&self, code: &str) -> Result<String, StoreError> {
        let code = code.trim();
        self.with(|data| {
            let Some(index) = data.pending.iter().position(|p| p.code == code) else {
                return Err(StoreError::UnknownCode(code.to_string()));
            };
            let pending = data.pending.remove(index);
            // Other pending activations naming the same device are someone else's requests.
            data.pending.retain(|p| p.device_id != pending.device_id);
            data.devices.insert(
                pending.device_id.clone(),
                ActivatedDevice {
                    client_id: pending.client_id,
                    token: pending.token,
                    approved_at: chrono::Utc::now().to_rfc3339(),
                },
            );
            Ok((pending.device_id, true))
        })
    }

    /// Revokes `device_id`'s activation (its token stops working at once; open sessions are
    /// not cut). Returns whether it was activated.
    ///
    /// # Errors
    /// The file's errors.
    pub fn revoke(&self, device_id: &str) -> Result<bool, StoreError> {
        self.with(|data| {
            let removed = data.devices.remove(device_id).is_some();
            Ok((removed, removed))
        })
    }

    /// Everything the store holds (tokens included: for the owner only).
    ///
    /// # Errors
    /// The file's errors.
    pub fn snapshot(&self) -> Result<StoreData, StoreError> {
        self.with(|data| Ok((data.clone(), false)))
    }
}

/// What a device that must be activated shows and says.
pub fn activation_message(code: &str) -> String {
    let spaced: Vec<String> = code.chars().map(String::from).collect();
    format!(
        "This speaker is not activated yet. Its code is {}. Approve it with voxloop devices approve {code}.",
        spaced.join(" ")
    )
}

/// Equal strings, compared without an early exit.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, DeviceStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = DeviceStore::new(dir.path().join("devices.json"), 600, 4);
        (dir, store)
    }

    #[test]
    fn pending_then_approved_then_revoked() {
        let (_dir, store) = store();
        let OtaGrant::Pending(p) = store.ota("aa", "c1").unwrap() else {
            panic!("a new device is pending");
        };
        assert_eq!(p.code.len(), 6);
        // The same device and client get the same activation while it lasts.
        assert_eq!(store.ota("aa", "c1").unwrap(), OtaGrant::Pending(p.clone()));
        // Another client naming the device gets its own.
        let OtaGrant::Pending(other) = store.ota("aa", "c2").unwrap() else {
            panic!()
        };
        assert_ne!(other.token, p.token);
        assert_eq!(
            store.token_state("aa", &p.token).unwrap(),
            TokenState::Pending {
                code: p.code.clone()
            }
        );
        assert_eq!(
            store
                .activate_state("aa", "c1", Some(&p.challenge))
                .unwrap(),
            ActivateState::Waiting
        );
        assert_eq!(store.approve(&p.code).unwrap(), "aa");
        assert_eq!(
            store.token_state("aa", &p.token).unwrap(),
            TokenState::Activated
        );
        assert_eq!(
            store.token_state("aa", &other.token).unwrap(),
            TokenState::Unknown
        );
        assert_eq!(
            store.activate_state("aa", "c1", None).unwrap(),
            ActivateState::Approved
        );
        assert_eq!(
            store.ota("aa", "c1").unwrap(),
            OtaGrant::Activated {
                token: p.token.clone()
            }
        );
        // A caller that only names the device gets a new activation, not the token.
        assert!(matches!(
            store.ota("aa", "c9").unwrap(),
            OtaGrant::Pending(_)
        ));
        assert!(store.revoke("aa").unwrap());
        assert_eq!(
            store.token_state("aa", &p.token).unwrap(),
            TokenState::Unknown
        );
        assert!(matches!(
            store.approve("000000"),
            Err(StoreError::UnknownCode(_))
        ));
    }

    #[test]
    fn pending_activations_are_bounded_and_expire() {
        let (dir, store) = store();
        for i in 0..10 {
            store.ota(&format!("d{i}"), "c").unwrap();
        }
        assert_eq!(store.snapshot().unwrap().pending.len(), 4);
        let expiring = DeviceStore::new(dir.path().join("devices.json"), 0, 4);
        assert!(expiring.snapshot().unwrap().pending.is_empty());
    }

    #[test]
    fn a_corrupt_store_is_a_clear_error() {
        let (dir, store) = store();
        std::fs::write(dir.path().join("devices.json"), "{not json").unwrap();
        let err = store.ota("aa", "c").unwrap_err();
        assert!(err.to_string().contains("is not valid JSON"), "{err}");
    }
}
