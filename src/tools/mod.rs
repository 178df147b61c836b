//! Tools (ARCHITECTURE §1-§3): every tool is called through a [`source::ToolSource`] (an MCP
//! server, the [`builtin`] tools, a device's MCP server, the duplex co-host); the
//! [`hub::ToolHub`] offers the shared ones under unique names. Results are routed by content
//! type ([`outcome`]), paged audio resources are read by the [`pager`] ([`paging`] is the
//! contract), and the [`terminal`] rules decide whether the model speaks again.

pub mod builtin;
pub mod config;
pub mod connection;
pub mod hub;
pub mod outcome;
pub mod pager;
pub mod source;
/// The paged-resource contract (the `voxloop-paging` crate, shared with the music server).
pub use voxloop_paging as paging;
pub mod terminal;
