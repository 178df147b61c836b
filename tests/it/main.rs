//! The integration tests, one binary (linking candle, whisper.cpp, ONNX Runtime's loader and
//! moshi once instead of once per file): each module drives real parts from outside, as a user
//! or a client would. `cargo test --test it MODULE::` runs one module.

#[path = "../common/mod.rs"]
mod common;

mod assistant;
mod browser;
mod cli;
mod conversation;
mod device;
mod device_conversation;
mod duplex;
mod duplex_server;
mod kokoro;
mod llm;
mod local_llm;
mod music_server;
mod pipeline;
mod real_clients;
mod serve;
mod speech;
mod tool_hub;
