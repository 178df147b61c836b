//! voxloop's own tools, a [`ToolSource`] like any MCP server: `exit_conversation`,
//! `stop_playback`, `pause_playback` and `resume_playback`, `set_volume` (the runtime's
//! playback volume, 0..100) and `get_current_time`. Their results are actions the turn loop performs (ARCHITECTURE §2).

use std::sync::Arc;
use std::time::Instant;

use rmcp::model::{CallToolResult, ContentBlock, JsonObject};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::hub::ToolSpec;
use super::outcome::{Action, Flags, ToolOutcome};
use super::source::{BoxFuture, ToolCallError, ToolSource};

/// The server name built-in tools report.
pub const BUILTIN_SERVER: &str = "voxloop";

/// The built-in tools as a source.
#[derive(Debug, Clone, Copy, Default)]
pub struct Builtins;

impl ToolSource for Builtins {
    fn name(&self) -> &str {
        BUILTIN_SERVER
    }

    /// The outcome as built here: built-in tools answer with actions, not MCP content.
    fn call<'a>(
        &'a self,
        tool: &'a str,
        arguments: JsonObject,
        _cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, ToolOutcome> {
        Box::pin(async move { builtin_call(tool, &arguments) })
    }

    /// The outcome's text as one text block (an error result when the call failed); counted in
    /// the metrics like a server's calls.
    fn call_raw<'a>(
        &'a self,
        tool: &'a str,
        arguments: JsonObject,
        _cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<CallToolResult, ToolCallError>> {
        Box::pin(async move {
            let started = Instant::now();
            let outcome = builtin_call(tool, &arguments);
            let status = if outcome.is_error { "error" } else { "success" };
            crate::metrics::get().tool_call(BUILTIN_SERVER, tool, status, started.elapsed());
            let content = vec![ContentBlock::text(outcome.text.join("\n"))];
            Ok(if outcome.is_error {
                CallToolResult::error(content)
            } else {
                CallToolResult::success(content)
            })
        })
    }
}

fn object_schema(properties: Value, required: &[&str]) -> Arc<JsonObject> {
    let schema = json!({"type": "object", "properties": properties, "required": required});
    Arc::new(schema.as_object().cloned().unwrap_or_default())
}

/// voxloop's own tools (issue: tool hub): `exit_conversation`, `stop_playback`,
/// `pause_playback`, `resume_playback`, `set_volume` (runtime playback volume 0..100) and
/// `get_current_time`.
pub(crate) fn builtin_tools() -> Vec<ToolSpec> {
    let spec = |tool: &str, description: &str, schema: Arc<JsonObject>| ToolSpec {
        name: tool.to_string(),
        server: BUILTIN_SERVER.to_string(),
        tool: tool.to_string(),
        description: description.to_string(),
        input_schema: schema,
    };
    vec![
        spec(
            "exit_conversation",
            "End the conversation when the user says goodbye or asks to stop talking.",
            object_schema(json!({}), &[]),
        ),
        spec(
            "stop_playback",
            "Stop the music or audio that is playing.",
            object_schema(json!({}), &[]),
        ),
        spec(
            "pause_playback",
            "Pause the music that is playing; resume_playback continues it from there.",
            object_schema(json!({}), &[]),
        ),
        spec(
            "resume_playback",
            "Continue the music that was paused, from where it was paused.",
            object_schema(json!({}), &[]),
        ),
        spec(
            "set_volume",
            "Set the playback volume, in percent from 0 to 100.",
            object_schema(
                json!({"volume": {"type": "integer", "minimum": 0, "maximum": 100,
                "description": "Volume in percent"}}),
                &["volume"],
            ),
        ),
        spec(
            "get_current_time",
            "Get the current local date and time.",
            object_schema(json!({}), &[]),
        ),
    ]
}

fn builtin_call(tool: &str, arguments: &JsonObject) -> ToolOutcome {
    let stop = Flags {
        final_action: true,
        ..Flags::default()
    };
    match tool {
        "exit_conversation" => ToolOutcome::builtin(
            tool,
            "Goodbye.".into(),
            Some(Action::ExitConversation),
            stop,
        ),
        "stop_playback" => ToolOutcome::builtin(
            tool,
            "Playback stopped.".into(),
            Some(Action::StopPlayback),
            stop,
        ),
        "pause_playback" => ToolOutcome::builtin(
            tool,
            "Playback paused.".into(),
            Some(Action::PausePlayback),
            stop,
        ),
        "resume_playback" => ToolOutcome::builtin(
            tool,
            "Playback resumed.".into(),
            Some(Action::ResumePlayback),
            stop,
        ),
        "set_volume" => {
            let volume = arguments.get("volume");
            let parsed = volume.and_then(|v| {
                v.as_f64()
                    .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
            });
            match parsed {
                Some(v) if v.fract() == 0.0 && (0.0..=100.0).contains(&v) => {
                    let volume = v as u8;
                    ToolOutcome::builtin(
                        tool,
                        format!("Volume set to {volume}."),
                        Some(Action::SetVolume { volume }),
                        stop,
                    )
                }
                _ => ToolOutcome::failed(
                    tool,
                    BUILTIN_SERVER,
                    format!(
                        "`volume` must be an integer from 0 to 100, got {}",
                        volume.cloned().unwrap_or(Value::Null)
                    ),
                ),
            }
        }
        "get_current_time" => {
            let now = chrono::Local::now();
            ToolOutcome::builtin(
                tool,
                // Written to be spoken: "It is 7:05 PM on Sunday, 29 November 2026."
                now.format("It is %-I:%M %p on %A, %-d %B %Y.").to_string(),
                None,
                Flags::default(),
            )
        }
        other => ToolOutcome::failed(
            other,
            BUILTIN_SERVER,
            format!("there is no built-in tool {other:?}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_set_volume_bounds() {
        let args = |v: Value| v.as_object().cloned().unwrap();
        let ok = builtin_call("set_volume", &args(json!({"volume": 0})));
        assert_eq!(ok.action, Some(Action::SetVolume { volume: 0 }));
        assert!(ok.flags.final_action);
        for bad in [
            json!({"volume": 101}),
            json!({"volume": "x"}),
            json!({}),
            json!({"volume": 2.5}),
        ] {
            let outcome = builtin_call("set_volume", &args(bad.clone()));
            assert!(outcome.is_error && outcome.action.is_none(), "{bad}");
        }
        let time = builtin_call("get_current_time", &JsonObject::new());
        assert!(time.text[0].starts_with("It is "), "{:?}", time.text);
        assert!(
            builtin_call("exit_conversation", &JsonObject::new())
                .facts()
                .exit
        );
    }
}
