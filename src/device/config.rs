//! `[device]` and `[vision]`: the xiaozhi-esp32 server (ARCHITECTURE §5: endpoints, OTA and
//! activation, session limits, device-side MCP) and the vision model behind the camera tool.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use voxloop_settings::{InvalidSetting, in_range};

/// `[device]`: the xiaozhi-esp32 WebSocket server (ARCHITECTURE §5). Durations in ms, sizes in bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeviceConfig {
    /// Address and port to listen on.
    pub bind: String,
    /// The WebSocket endpoint's path.
    pub path: String,
    /// The OTA endpoint's path (`GET` or `POST`, with or without the trailing slash): where the
    /// firmware learns the WebSocket URL and its token; `{ota_path}activate` is the activation
    /// poll.
    pub ota_path: String,
    /// The WebSocket URL the OTA endpoint gives devices; default `ws://{Host}{path}` from the
    /// request's `Host` header (never a wildcard bind address).
    pub public_url: Option<String>,
    /// Give a device unknown to the store an activation code (the owner approves it with
    /// `voxloop devices approve CODE`); off: unknown devices get no token from OTA.
    pub activation: bool,
    /// The device store (activated devices and their tokens, pending activations); default
    /// `~/.local/share/voxloop/devices.json`.
    pub store: Option<PathBuf>,
    /// How long an activation code waits for approval, seconds.
    pub activation_ttl_s: u64,
    /// Most activations waiting at once (the oldest are dropped first).
    pub max_pending_activations: usize,
    /// Hand the first of `[auth] tokens` to every OTA caller that has no token of its own. This
    /// equals anonymous access to the device surface: anyone who can reach OTA gets a token.
    pub ota_shared_token: bool,
    /// Path of the vision endpoint the device's camera posts images to (`POST`, multipart
    /// `question` + `file`), announced in device-MCP `initialize` as `capabilities.vision`.
    pub vision_path: String,
    /// Path of the admin endpoints for device activations (`GET` list, `POST {path}/approve`
    /// `{code}`, `DELETE {path}/{device_id}`); admin role only.
    pub admin_path: String,
    /// Firmware version the OTA endpoint offers.
    pub firmware_version: String,
    /// Firmware download URL the OTA endpoint offers (empty: none).
    pub firmware_url: String,
    /// Time a device has to send its hello after connecting.
    pub hello_timeout_ms: u64,
    /// A session with no message from the device for this long is closed.
    pub idle_timeout_ms: u64,
    /// Interval of WebSocket pings to the device.
    pub ping_interval_ms: u64,
    /// Largest message (text or binary) a device may send.
    pub max_message_bytes: usize,
    /// Most sessions at once.
    pub max_sessions: u32,
    /// Most sessions at once from one IP address.
    pub max_sessions_per_ip: u32,
    /// Device-side MCP: how long the device has to answer one request (`initialize`,
    /// `tools/list`, `tools/call`) before it fails with a timeout error.
    pub mcp_request_timeout_ms: u64,
    /// Device-side MCP: most `tools/list` pages read (cursor after cursor) at session start.
    pub mcp_max_list_pages: u32,
    /// Device-side MCP: most tools offered from one device (1..=1000); past it the device gets
    /// an `alert` and the rest are left out.
    pub mcp_max_tools: u32,
    /// Device-side MCP: largest tool, in bytes of its JSON (name, description, input schema;
    /// 256..=1048576); a larger one is left out, with an `alert`.
    pub mcp_max_tool_bytes: usize,
    /// Device-side MCP: most bytes of MCP messages one session may send (1 KiB..=1 GiB); past
    /// it the device's tools are switched off for the session, with an `alert`.
    pub mcp_max_session_bytes: u64,
    /// Most text messages a device may send a second (1..=10000; `listen`, `abort`, `mcp`, ...);
    /// past it they are dropped, with an `alert` at most once a second.
    pub max_messages_per_s: u32,
    /// `listen detect` texts that are only the wake word (compared without case and
    /// punctuation): the device starts listening next, so no turn runs. Any other detect text is
    /// the user's request, as if heard.
    pub wake_words: Vec<String>,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:8000".into(),
            path: "/xiaozhi/v1/".into(),
            ota_path: "/xiaozhi/ota/".into(),
            public_url: None,
            activation: true,
            store: None,
            activation_ttl_s: 600,
            max_pending_activations: 256,
            ota_shared_token: false,
            vision_path: "/xiaozhi/vision/explain".into(),
            admin_path: "/xiaozhi/admin/devices".into(),
            firmware_version: "1.0.0".into(),
            firmware_url: String::new(),
            hello_timeout_ms: 10_000,
            idle_timeout_ms: 120_000,
            ping_interval_ms: 30_000,
            max_message_bytes: 65_536,
            max_sessions: 1024,
            max_sessions_per_ip: 16,
            mcp_request_timeout_ms: 5_000,
            mcp_max_list_pages: 16,
            mcp_max_tools: 128,
            mcp_max_tool_bytes: 16_384,
            mcp_max_session_bytes: 4 << 20,
            max_messages_per_s: 50,
            wake_words: vec!["你好小智".into(), "hi esp".into(), "hey voxloop".into()],
        }
    }
}

impl DeviceConfig {
    /// Checks every `[device]` value against its allowed range.
    ///
    /// # Errors
    /// The first [`InvalidSetting`] found, naming the `device.` key.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.bind.parse::<std::net::SocketAddr>().is_err() {
            return Err(InvalidSetting {
                key: "device.bind".into(),
                value: format!("{:?}", self.bind),
                allowed: "an address and port such as \"127.0.0.1:8000\"".into(),
            });
        }
        for (key, path) in [
            ("device.path", &self.path),
            ("device.ota_path", &self.ota_path),
            ("device.vision_path", &self.vision_path),
            ("device.admin_path", &self.admin_path),
        ] {
            if !path.starts_with('/') {
                return Err(InvalidSetting {
                    key: key.into(),
                    value: format!("{path:?}"),
                    allowed: "a path starting with /".into(),
                });
            }
        }
        in_range(
            "device.hello_timeout_ms",
            self.hello_timeout_ms,
            100..=600_000,
            "milliseconds",
        )?;
        in_range(
            "device.idle_timeout_ms",
            self.idle_timeout_ms,
            1_000..=86_400_000,
            "milliseconds",
        )?;
        in_range(
            "device.ping_interval_ms",
            self.ping_interval_ms,
            100..=3_600_000,
            "milliseconds",
        )?;
        in_range(
            "device.max_message_bytes",
            self.max_message_bytes,
            1_024..=16_777_216,
            "bytes",
        )?;
        in_range(
            "device.max_sessions",
            self.max_sessions,
            1..=100_000,
            "sessions",
        )?;
        in_range(
            "device.max_sessions_per_ip",
            self.max_sessions_per_ip,
            1..=100_000,
            "sessions",
        )?;
        in_range(
            "device.mcp_request_timeout_ms",
            self.mcp_request_timeout_ms,
            100..=600_000,
            "milliseconds",
        )?;
        in_range(
            "device.mcp_max_list_pages",
            self.mcp_max_list_pages,
            1..=1_000,
            "pages",
        )?;
        in_range(
            "device.mcp_max_tools",
            self.mcp_max_tools,
            1..=1_000,
            "tools",
        )?;
        in_range(
            "device.mcp_max_tool_bytes",
            self.mcp_max_tool_bytes,
            256..=1_048_576,
            "bytes",
        )?;
        in_range(
            "device.mcp_max_session_bytes",
            self.mcp_max_session_bytes,
            1_024..=(1 << 30),
            "bytes",
        )?;
        in_range(
            "device.max_messages_per_s",
            self.max_messages_per_s,
            1..=10_000,
            "messages",
        )?;
        in_range(
            "device.activation_ttl_s",
            self.activation_ttl_s,
            10..=86_400,
            "seconds",
        )?;
        in_range(
            "device.max_pending_activations",
            self.max_pending_activations,
            1..=100_000,
            "activations",
        )?;
        Ok(())
    }
}

/// `[vision]`: an OpenAI-compatible vision model (chat completions with an `image_url` part)
/// that answers the questions a device's camera tool posts to `[device] vision_path`. No `url`:
/// the endpoint answers that vision is not configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VisionConfig {
    /// Base URL of the API (`.../v1`); empty: no vision model.
    pub url: String,
    /// The model's name.
    pub model: String,
    /// Environment variable holding the API key, if the endpoint wants one.
    pub api_key_env: Option<String>,
    /// Time for the whole answer, ms.
    pub timeout_ms: u64,
    /// Largest image accepted, bytes (larger: HTTP 413).
    pub max_image_bytes: usize,
    /// Most tokens in the answer.
    pub max_tokens: u32,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            model: String::new(),
            api_key_env: None,
            timeout_ms: 30_000,
            max_image_bytes: 8 << 20,
            max_tokens: 300,
        }
    }
}

impl VisionConfig {
    /// Checks every `[vision]` value against its allowed range.
    ///
    /// # Errors
    /// The first [`InvalidSetting`] found, naming the `vision.` key.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        in_range(
            "vision.max_image_bytes",
            self.max_image_bytes,
            1_024..=67_108_864,
            "bytes",
        )?;
        in_range(
            "vision.timeout_ms",
            self.timeout_ms,
            100..=600_000,
            "milliseconds",
        )?;
        in_range("vision.max_tokens", self.max_tokens, 1..=32_768, "tokens")?;
        Ok(())
    }
}
