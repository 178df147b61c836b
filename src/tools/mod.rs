//! MCP tool plumbing (ARCHITECTURE §2 and §3): the [`hub::ToolHub`] over MCP servers and built-in
//! tools, routing of tool results ([`outcome`]), paged audio resources ([`paging`], [`pager`])
//! and the terminal rules ([`terminal`]).

pub mod connection;
pub mod hub;
pub mod outcome;
pub mod pager;
/// The paged-resource contract (the `voxloop-paging` crate, shared with the music server).
pub use voxloop_paging as paging;
pub mod terminal;
