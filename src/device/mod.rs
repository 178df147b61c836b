//! The smart-speaker device server (ARCHITECTURE §5): the xiaozhi-esp32 WebSocket protocol.
//!
//! [`protocol`] holds the messages and the binary framing of protocol versions 1 to 3;
//! [`server`] the WebSocket and OTA endpoints, the hello, session limits and keep-alive;
//! [`session`] a device's conversation; [`mcp`] the MCP client that reaches the device's tools;
//! [`activation`] how devices get their own tokens; [`vision`] the camera's vision endpoint.

pub mod activation;
pub mod config;
pub mod mcp;
pub mod protocol;
pub mod server;
pub mod session;
pub mod vision;
