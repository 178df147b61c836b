//! MCP tool plumbing (DESIGN §2 and §3).

pub mod paging;
