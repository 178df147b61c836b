//! The music player MCP server, built beside `voxloop` (the tool hub starts it from there). Its
//! code is the `mcp-audio` crate (crates/mcp-audio), which does not depend on the runtime.

fn main() -> anyhow::Result<()> {
    mcp_audio::main()
}
