//! The xiaozhi-esp32 WebSocket protocol's messages and binary frames (ARCHITECTURE §5; the firmware's
//! `docs/websocket.md`).
//!
//! Text frames are JSON objects tagged by `type`. Binary frames carry Opus packets, framed by
//! protocol version (from the `Protocol-Version` header):
//! - v1: the frame is one raw Opus packet;
//! - v2: a 16-byte big-endian header `u16 version, u16 type (0 Opus, 1 JSON), u32 reserved,
//!   u32 timestamp_ms, u32 payload_size`, then the payload;
//! - v3: a 4-byte big-endian header `u8 type (0 Opus, 1 JSON), u8 reserved, u16 payload_size`,
//!   then the payload.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Binary framing, from the `Protocol-Version` header or query parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ProtocolVersion {
    /// Version 1: binary frames are raw Opus.
    V1,
    /// Version 2: a 16-byte header (version, type, reserved, timestamp in ms, payload size).
    V2,
    /// Version 3: a 4-byte header (type, reserved, payload size).
    V3,
}

/// A binary frame that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A `Protocol-Version` other than 1, 2 or 3 (as sent).
    #[error("unsupported protocol version {0:?} (1, 2 or 3)")]
    Version(String),
    /// A frame shorter than its header.
    #[error("binary frame of {len} bytes is shorter than the v{version} header ({header} bytes)")]
    Short {
        /// The session's protocol version.
        version: u8,
        /// The frame's length in bytes.
        len: usize,
        /// That version's header length in bytes.
        header: usize,
    },
    /// The header's payload size and the frame disagree.
    #[error("binary frame header says {declared} payload bytes, the frame has {actual}")]
    Size {
        /// Payload bytes the header declares.
        declared: usize,
        /// Payload bytes the frame has.
        actual: usize,
    },
    /// A v2 header with another version number (the number).
    #[error("binary frame header says protocol version {0}, the session uses 2")]
    HeaderVersion(u16),
    /// A frame type other than 0 (Opus) or 1 (JSON) (the type).
    #[error("binary frame type {0} is neither 0 (Opus) nor 1 (JSON)")]
    Type(u16),
    /// A frame with no bytes.
    #[error("empty binary frame")]
    Empty,
    /// A JSON frame that is not UTF-8.
    #[error("JSON in a binary frame is not UTF-8")]
    Utf8,
}

/// What a binary frame carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BinaryFrame {
    /// One Opus packet (one frame of audio, 20 or 60 ms).
    Opus(Vec<u8>),
    /// A JSON message (v2 and v3 only).
    Json(String),
}

/// v2's header length in bytes.
pub const V2_HEADER: usize = 16;
/// v3's header length in bytes.
pub const V3_HEADER: usize = 4;

impl ProtocolVersion {
    /// From a header or query value; missing means 1.
    ///
    /// # Errors
    /// [`FrameError::Version`] for anything but 1, 2 or 3.
    pub fn parse(value: Option<&str>) -> Result<Self, FrameError> {
        match value.map(str::trim) {
            None | Some("") | Some("1") => Ok(Self::V1),
            Some("2") => Ok(Self::V2),
            Some("3") => Ok(Self::V3),
            Some(other) => Err(FrameError::Version(other.to_string())),
        }
    }

    /// The version number.
    pub fn number(self) -> u8 {
        match self {
            Self::V1 => 1,
            Self::V2 => 2,
            Self::V3 => 3,
        }
    }

    /// Frames an Opus packet; `timestamp_ms` is used by v2 only.
    pub fn encode_opus(self, packet: &[u8], timestamp_ms: u32) -> Vec<u8> {
        self.encode(0, packet, timestamp_ms)
    }

    fn encode(self, kind: u8, payload: &[u8], timestamp_ms: u32) -> Vec<u8> {
        match self {
            Self::V1 => payload.to_vec(),
            Self::V2 => {
                let mut out = Vec::with_capacity(V2_HEADER + payload.len());
                out.extend_from_slice(&2u16.to_be_bytes());
                out.extend_from_slice(&u16::from(kind).to_be_bytes());
                out.extend_from_slice(&0u32.to_be_bytes());
                out.extend_from_slice(&timestamp_ms.to_be_bytes());
                out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
                out.extend_from_slice(payload);
                out
            }
            Self::V3 => {
                let mut out = Vec::with_capacity(V3_HEADER + payload.len());
                out.push(kind);
                out.push(0);
                // A v3 payload is at most 65535 bytes; an Opus packet is at most 1275.
                out.extend_from_slice(&(payload.len().min(u16::MAX as usize) as u16).to_be_bytes());
                out.extend_from_slice(&payload[..payload.len().min(u16::MAX as usize)]);
                out
            }
        }
    }

    /// Frames a JSON message in a binary frame (v2 and v3; v1 has no such frame).
    pub fn encode_json(self, json: &str, timestamp_ms: u32) -> Option<Vec<u8>> {
        (self != Self::V1).then(|| self.encode(1, json.as_bytes(), timestamp_ms))
    }

    /// Reads a binary frame.
    ///
    /// # Errors
    /// [`FrameError`] naming what is wrong: too short for the header, a payload size that
    /// does not match, an unknown type, a v2 header with another version, or an empty frame.
    pub fn decode(self, frame: &[u8]) -> Result<BinaryFrame, FrameError> {
        let (kind, payload) = match self {
            Self::V1 => {
                if frame.is_empty() {
                    return Err(FrameError::Empty);
                }
                return Ok(BinaryFrame::Opus(frame.to_vec()));
            }
            Self::V2 => {
                if frame.len() < V2_HEADER {
                    return Err(FrameError::Short {
                        version: 2,
                        len: frame.len(),
                        header: V2_HEADER,
                    });
                }
                let version = u16::from_be_bytes([frame[0], frame[1]]);
                if version != 2 {
                    return Err(FrameError::HeaderVersion(version));
                }
                let kind = u16::from_be_bytes([frame[2], frame[3]]);
                let size =
                    u32::from_be_bytes([frame[12], frame[13], frame[14], frame[15]]) as usize;
                (kind, check_size(size, &frame[V2_HEADER..])?)
            }
            Self::V3 => {
                if frame.len() < V3_HEADER {
                    return Err(FrameError::Short {
                        version: 3,
                        len: frame.len(),
                        header: V3_HEADER,
                    });
                }
                let size = u16::from_be_bytes([frame[2], frame[3]]) as usize;
                (u16::from(frame[0]), check_size(size, &frame[V3_HEADER..])?)
            }
        };
        match kind {
            0 if payload.is_empty() => Err(FrameError::Empty),
            0 => Ok(BinaryFrame::Opus(payload.to_vec())),
            1 => String::from_utf8(payload.to_vec())
                .map(BinaryFrame::Json)
                .map_err(|_| FrameError::Utf8),
            other => Err(FrameError::Type(other)),
        }
    }
}

fn check_size(declared: usize, payload: &[u8]) -> Result<&[u8], FrameError> {
    if declared != payload.len() {
        return Err(FrameError::Size {
            declared,
            actual: payload.len(),
        });
    }
    Ok(payload)
}

/// Audio format of one direction (`audio_params`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AudioParams {
    /// Always `opus`.
    #[serde(default = "opus")]
    pub format: String,
    /// Sample rate in Hz (uplink 16000; downlink often 24000).
    pub sample_rate: u32,
    /// Channels (1).
    #[serde(default = "one")]
    pub channels: u16,
    /// Frame duration in ms (20 or 60).
    #[serde(default = "sixty")]
    pub frame_duration: u32,
}

fn opus() -> String {
    "opus".into()
}
fn one() -> u16 {
    1
}
fn sixty() -> u32 {
    60
}

/// The device's announced features.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Features {
    /// The device runs an MCP server over this socket.
    #[serde(default)]
    pub mcp: bool,
    /// The device cancels its own echo (realtime listening is safe).
    #[serde(default)]
    pub aec: bool,
    /// voxloop's own extension, for browser clients: send a [`ServerMessage::Tool`] for each
    /// tool call of a turn. Devices never ask for it and never see it.
    #[serde(default)]
    pub tool_events: bool,
}

/// `listen.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenState {
    /// The user starts speaking (audio frames follow).
    Start,
    /// The device stopped listening (manual mode: the turn ends).
    Stop,
    /// A wake word was detected; `text` holds it.
    Detect,
}

/// `listen.mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenMode {
    /// The server's VAD ends the turn.
    #[default]
    Auto,
    /// The device ends the turn with `listen stop`.
    Manual,
    /// Continuous listening; speech over playback interrupts it.
    Realtime,
}

/// The `abort` reason the firmware sends when its wake word interrupts the speaker; a button
/// press sends `abort` with no reason (xiaozhi-esp32 `main/protocols/protocol.cc`,
/// `SendAbortSpeaking`).
pub const WAKE_WORD_ABORT: &str = "wake_word_detected";

/// A text message from the device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum DeviceMessage {
    /// The first message: protocol version, features, uplink audio format.
    Hello {
        /// The protocol version the device speaks (1, 2 or 3), if it says.
        #[serde(default)]
        version: Option<u32>,
        /// What the device supports (`mcp`, `aec`).
        #[serde(default)]
        features: Features,
        /// `websocket`.
        #[serde(default)]
        transport: Option<String>,
        /// The audio format: Opus, sample rate in Hz, channels, frame duration in ms.
        audio_params: Option<AudioParams>,
    },
    /// The device starts or stops sending audio, or heard its wake word (`text`).
    Listen {
        /// What the device is doing.
        state: ListenState,
        /// Who ends the turn: the server's VAD (`auto`, `realtime`) or the device (`manual`).
        #[serde(default)]
        mode: Option<ListenMode>,
        /// The wake word heard, with `state: detect`.
        #[serde(default)]
        text: Option<String>,
    },
    /// Stop speaking (a button, a wake word): barge-in.
    Abort {
        /// Why: [`WAKE_WORD_ABORT`] or none.
        #[serde(default)]
        reason: Option<String>,
    },
    /// A JSON-RPC 2.0 message of the device's MCP server.
    Mcp {
        /// The JSON-RPC 2.0 message.
        payload: Value,
    },
}

/// `tts.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TtsState {
    /// Speech begins (before the first frame).
    Start,
    /// A sentence begins; `text` has it.
    SentenceStart,
    /// Speech ended (after the last frame).
    Stop,
}

/// A text message to the device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerMessage {
    /// The answer to the device's hello: the session and the downlink audio format.
    Hello {
        /// `websocket`.
        transport: String,
        /// The session's id, sent in the server's hello.
        session_id: String,
        /// The audio format: Opus, sample rate in Hz, channels, frame duration in ms.
        audio_params: AudioParams,
    },
    /// What was heard.
    Stt {
        /// The session's id, sent in the server's hello.
        session_id: String,
        /// The transcript.
        text: String,
    },
    /// The assistant's mood (an emotion name such as `happy` or `thinking` that the
    /// display shows), with optional text.
    Llm {
        /// The session's id, sent in the server's hello.
        session_id: String,
        /// An emotion name the display shows (`happy`, `thinking`, `neutral`, ...).
        emotion: String,
        /// Text to show with the emotion, often an emoji.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        text: Option<String>,
    },
    /// Speech around the Opus frames: `start`, each sentence as it begins, `stop`.
    Tts {
        /// The session's id, sent in the server's hello.
        session_id: String,
        /// Where the speech is.
        state: TtsState,
        /// The sentence, with `sentence_start`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        text: Option<String>,
    },
    /// A JSON-RPC 2.0 message to the device's MCP server.
    Mcp {
        /// The session's id, sent in the server's hello.
        session_id: String,
        /// The JSON-RPC 2.0 message.
        payload: Value,
    },
    /// A device command (`reboot`, ...).
    System {
        /// The session's id, sent in the server's hello.
        session_id: String,
        /// The command, e.g. `reboot`.
        command: String,
    },
    /// One tool call of the last turn and its outcome, sent only to a client whose hello
    /// asked for `features.tool_events` (voxloop's extension; not in the xiaozhi protocol).
    Tool {
        /// The session's id, sent in the server's hello.
        session_id: String,
        /// The tool's name as offered to the model.
        name: String,
        /// Where it ran: an MCP server's name, `voxloop` (built-in) or `device`.
        server: String,
        /// The arguments, as JSON.
        arguments: Value,
        /// Whether the call failed.
        is_error: bool,
        /// What the model was told of the result.
        result: String,
    },
    /// A message to show: here, what was wrong with the device's last message.
    Alert {
        /// The session's id, sent in the server's hello.
        session_id: String,
        /// A short status title.
        status: String,
        /// What was wrong.
        message: String,
        /// An emotion name the display shows (`happy`, `thinking`, `neutral`, ...).
        emotion: String,
    },
}

impl ServerMessage {
    /// An `alert` about the device's own doing (a bad message, a cap reached): status `error`,
    /// emotion `confused`.
    pub fn alert(session_id: &str, message: String) -> ServerMessage {
        ServerMessage::Alert {
            session_id: session_id.to_string(),
            status: "error".into(),
            message,
            emotion: "confused".into(),
        }
    }

    /// The JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server messages serialise")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any text a device sends parses or is refused with serde's message; never a panic.
        #[test]
        fn any_text_parses_or_is_refused(text in "\\PC{0,200}") {
            let _ = serde_json::from_str::<DeviceMessage>(&text);
        }

        /// JSON messages of the protocol's shape with arbitrary field values: a parsed one
        /// has the type it was sent as.
        #[test]
        fn typed_messages_keep_their_type(
            kind in prop_oneof![Just("hello"), Just("listen"), Just("abort"), Just("mcp"), Just("x")],
            state in prop_oneof![Just("start"), Just("stop"), Just("detect"), Just("other")],
            mode in prop_oneof![Just("auto"), Just("manual"), Just("realtime"), Just("1")],
            text in "\\PC{0,20}",
        ) {
            let message = serde_json::json!({
                "type": kind, "state": state, "mode": mode, "text": text,
                "version": 1, "payload": {"jsonrpc": "2.0"},
            });
            if let Ok(parsed) = serde_json::from_value::<DeviceMessage>(message) {
                let parsed_kind = match parsed {
                    DeviceMessage::Hello { .. } => "hello",
                    DeviceMessage::Listen { .. } => "listen",
                    DeviceMessage::Abort { .. } => "abort",
                    DeviceMessage::Mcp { .. } => "mcp",
                };
                prop_assert_eq!(parsed_kind, kind);
            } else {
                prop_assert!(kind == "x" || state == "other" || mode == "1");
            }
        }

        /// Any bytes as a binary frame of any version: a frame or a [`FrameError`].
        #[test]
        fn any_binary_frame_decodes_or_is_refused(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            for v in [ProtocolVersion::V1, ProtocolVersion::V2, ProtocolVersion::V3] {
                let _ = v.decode(&bytes);
            }
        }
    }

    #[test]
    fn frames_round_trip_in_every_version() {
        let packet = vec![0xF8, 1, 2, 3, 4];
        for v in [
            ProtocolVersion::V1,
            ProtocolVersion::V2,
            ProtocolVersion::V3,
        ] {
            let frame = v.encode_opus(&packet, 1234);
            assert_eq!(v.decode(&frame).unwrap(), BinaryFrame::Opus(packet.clone()));
        }
        let v2 = ProtocolVersion::V2.encode_opus(&packet, 0x01020304);
        assert_eq!(&v2[..4], &[0, 2, 0, 0]);
        assert_eq!(&v2[8..16], &[1, 2, 3, 4, 0, 0, 0, 5]);
        let v3 = ProtocolVersion::V3.encode_opus(&packet, 0);
        assert_eq!(&v3[..4], &[0, 0, 0, 5]);
        let json = ProtocolVersion::V3
            .encode_json("{\"type\":\"abort\"}", 0)
            .unwrap();
        assert_eq!(
            ProtocolVersion::V3.decode(&json).unwrap(),
            BinaryFrame::Json("{\"type\":\"abort\"}".into())
        );
        assert!(ProtocolVersion::V1.encode_json("{}", 0).is_none());
    }

    #[test]
    fn bad_frames_are_named() {
        let v2 = ProtocolVersion::V2;
        assert!(matches!(
            v2.decode(&[0, 2, 0]),
            Err(FrameError::Short { .. })
        ));
        let mut frame = v2.encode_opus(&[1, 2, 3], 0);
        frame.push(9);
        assert_eq!(
            v2.decode(&frame),
            Err(FrameError::Size {
                declared: 3,
                actual: 4
            })
        );
        let mut frame = v2.encode_opus(&[1, 2, 3], 0);
        frame[1] = 3;
        assert_eq!(v2.decode(&frame), Err(FrameError::HeaderVersion(3)));
        let mut frame = ProtocolVersion::V3.encode_opus(&[1], 0);
        frame[0] = 7;
        assert_eq!(ProtocolVersion::V3.decode(&frame), Err(FrameError::Type(7)));
        assert_eq!(ProtocolVersion::V1.decode(&[]), Err(FrameError::Empty));
        assert_eq!(
            ProtocolVersion::parse(Some("4")),
            Err(FrameError::Version("4".into()))
        );
        assert_eq!(ProtocolVersion::parse(None), Ok(ProtocolVersion::V1));
    }

    #[test]
    fn messages_parse_as_the_firmware_writes_them() {
        let hello: DeviceMessage = serde_json::from_str(
            r#"{"type":"hello","version":1,"features":{"mcp":true},"transport":"websocket","audio_params":{"format":"opus","sample_rate":16000,"channels":1,"frame_duration":60}}"#,
        )
        .unwrap();
        let DeviceMessage::Hello {
            features,
            audio_params,
            ..
        } = hello
        else {
            panic!("not a hello");
        };
        assert!(features.mcp && !features.aec);
        assert_eq!(audio_params.unwrap().sample_rate, 16_000);
        let listen: DeviceMessage = serde_json::from_str(
            r#"{"session_id":"x","type":"listen","state":"start","mode":"manual"}"#,
        )
        .unwrap();
        assert_eq!(
            listen,
            DeviceMessage::Listen {
                state: ListenState::Start,
                mode: Some(ListenMode::Manual),
                text: None
            }
        );
        let tts = ServerMessage::Tts {
            session_id: "s".into(),
            state: TtsState::SentenceStart,
            text: Some("Hi.".into()),
        };
        assert_eq!(
            tts.to_json(),
            r#"{"type":"tts","session_id":"s","state":"sentence_start","text":"Hi."}"#
        );
        assert!(serde_json::from_str::<DeviceMessage>(r#"{"type":"dance"}"#).is_err());
    }
}
