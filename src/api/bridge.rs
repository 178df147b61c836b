//! The REST bridge, for HTTP clients that do not speak MCP:
//!
//! - `GET /v1/mcp/tools`: `{tools: [{name, description, input_schema, admin_only}]}` (a `user`
//!   does not see admin-only tools).
//! - `POST /v1/mcp/tools/call` `{tool_name, parameters}`: the result in the structured form
//!   `{status: "success" | "error", ...}` ([`structured`]); 403 for a `user` calling an
//!   admin-only tool, 404 for an unknown tool, 502 when the call got no result.
//! - `POST /v1/mcp/tools/batch` `{requests: [{tool_name, parameters}], max_concurrent}`: the
//!   calls, at most `max_concurrent` (1..=10, default 4) at a time, as `{results: [{input,
//!   result}], summary: {total, successes, failures}}` in request order.
//! - `GET /v1/mcp/status`: servers, breakers, sessions, the duplex model.
//!
//! A body that is not the expected JSON gets 400 with the parser's message (line, column, the
//! field); errors are always `{status: "error", error}`.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt as _;
use rmcp::model::{CallToolResult, JsonObject};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::server::Runtime;
use super::{Principal, refuse};

/// Largest `max_concurrent` of a batch.
pub const MAX_CONCURRENT: usize = 10;
/// `max_concurrent` when a batch does not say.
pub const DEFAULT_CONCURRENT: usize = 4;

/// One tool call: `{tool_name, parameters}` (`parameters` a JSON object, may be absent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallRequest {
    /// The tool's name as `GET /v1/mcp/tools` lists it.
    pub tool_name: String,
    /// Its arguments.
    #[serde(default)]
    pub parameters: Option<JsonObject>,
}

/// A batch: `{requests, max_concurrent}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// The calls, answered in this order.
    pub requests: Vec<CallRequest>,
    /// Calls running at once, 1..=10.
    #[serde(default)]
    pub max_concurrent: Option<usize>,
}

/// What is wrong with a request body (HTTP 400; the message is the answer's `error`).
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Not JSON, a missing `tool_name`, `parameters` not an object, an unknown field: serde's
    /// message with line and column.
    #[error("invalid request body: {0}")]
    Json(#[from] serde_json::Error),
    /// `tool_name` is empty (in the batch's request `index`, if a batch).
    #[error("{}`tool_name` is empty", .index.map(|i| format!("requests[{i}]: ")).unwrap_or_else(|| "invalid request body: ".into()))]
    EmptyToolName {
        /// The request's index in a batch; `None` for a single call.
        index: Option<usize>,
    },
    /// `max_concurrent` outside 1..=10.
    #[error("`max_concurrent` must be 1 to {MAX_CONCURRENT}, got {0}")]
    MaxConcurrent(usize),
    /// More requests than `[server] max_batch_requests`.
    #[error("{count} requests; a batch holds at most {max} ([server] max_batch_requests)")]
    TooMany {
        /// Requests in the batch.
        count: usize,
        /// `[server] max_batch_requests`.
        max: usize,
    },
}

/// Parses a `tools/call` body.
///
/// # Errors
/// [`BodyError::Json`] or [`BodyError::EmptyToolName`].
pub fn parse_call(body: &[u8]) -> Result<CallRequest, BodyError> {
    let call: CallRequest = serde_json::from_slice(body)?;
    if call.tool_name.is_empty() {
        return Err(BodyError::EmptyToolName { index: None });
    }
    Ok(call)
}

/// Parses a batch body; at most `max_requests` calls.
///
/// # Errors
/// As [`parse_call`], and [`BodyError::MaxConcurrent`] or [`BodyError::TooMany`].
pub fn parse_batch(body: &[u8], max_requests: usize) -> Result<BatchRequest, BodyError> {
    let batch: BatchRequest = serde_json::from_slice(body)?;
    if let Some(n) = batch.max_concurrent
        && !(1..=MAX_CONCURRENT).contains(&n)
    {
        return Err(BodyError::MaxConcurrent(n));
    }
    if batch.requests.len() > max_requests {
        return Err(BodyError::TooMany {
            count: batch.requests.len(),
            max: max_requests,
        });
    }
    if let Some(i) = batch.requests.iter().position(|r| r.tool_name.is_empty()) {
        return Err(BodyError::EmptyToolName { index: Some(i) });
    }
    Ok(batch)
}

/// A tool result in the structured form: a `structuredContent` that already has `status` (the
/// duplex tools') as it is; otherwise `{status, content, structured?}` with `error` (the text
/// blocks joined) when the tool reported one.
pub fn structured(result: &CallToolResult) -> Value {
    if let Some(Value::Object(fields)) = &result.structured_content
        && fields.contains_key("status")
    {
        return Value::Object(fields.clone());
    }
    let failed = result.is_error == Some(true);
    let mut out = json!({
        "status": if failed { "error" } else { "success" },
        "content": result.content,
    });
    if let Some(fields) = &result.structured_content {
        out["structured"] = fields.clone();
    }
    if failed {
        let text: Vec<&str> = result
            .content
            .iter()
            .filter_map(|c| c.as_text().map(|t| t.text.as_str()))
            .collect();
        out["error"] = if text.is_empty() {
            json!("the tool reported an error")
        } else {
            json!(text.join("\n"))
        };
    }
    out
}

/// The routes, to be given the runtime as state.
pub fn routes() -> Router<Arc<Runtime>> {
    Router::new()
        .route("/v1/mcp/tools", get(tools))
        .route("/v1/mcp/tools/call", post(call))
        .route("/v1/mcp/tools/batch", post(batch))
        .route("/v1/mcp/status", get(status))
}

async fn tools(
    State(runtime): State<Arc<Runtime>>,
    Extension(caller): Extension<Principal>,
) -> Response {
    let tools: Vec<Value> = runtime
        .listed(caller.role)
        .map(|(tool, admin_only)| {
            json!({
                "name": tool.name,
                "description": tool.description,
                "input_schema": tool.input_schema,
                "admin_only": admin_only,
            })
        })
        .collect();
    axum::Json(json!({"status": "success", "tools": tools})).into_response()
}

/// Runs one call: the HTTP status and the structured result.
async fn run(runtime: &Runtime, caller: &Principal, request: &CallRequest) -> (StatusCode, Value) {
    let arguments = request.parameters.clone().unwrap_or_default();
    match runtime.call(caller, &request.tool_name, arguments).await {
        Ok(result) => (StatusCode::OK, structured(&result)),
        Err(e) => (
            e.status(),
            json!({"status": "error", "error": e.to_string()}),
        ),
    }
}

async fn call(
    State(runtime): State<Arc<Runtime>>,
    Extension(caller): Extension<Principal>,
    body: Bytes,
) -> Response {
    let request = match parse_call(&body) {
        Ok(r) => r,
        Err(e) => return refuse("api", StatusCode::BAD_REQUEST, e.to_string()),
    };
    let (status, result) = run(&runtime, &caller, &request).await;
    if status == StatusCode::FORBIDDEN {
        crate::metrics::get().refusal("api", 403);
    }
    (status, axum::Json(result)).into_response()
}

async fn batch(
    State(runtime): State<Arc<Runtime>>,
    Extension(caller): Extension<Principal>,
    Extension(meter): Extension<super::Meter>,
    body: Bytes,
) -> Response {
    let batch = match parse_batch(&body, runtime.config().max_batch_requests) {
        Ok(b) => b,
        Err(e) => return refuse("api", StatusCode::BAD_REQUEST, e.to_string()),
    };
    // Each call counts against the rate limits; the request itself counted for the first.
    if let Err(refusal) = meter.charge(&caller, batch.requests.len().saturating_sub(1)) {
        return *refusal;
    }
    let concurrent = batch.max_concurrent.unwrap_or(DEFAULT_CONCURRENT);
    let results: Vec<Value> = futures_util::stream::iter(batch.requests)
        .map(|request| {
            let (runtime, caller) = (runtime.clone(), caller.clone());
            async move {
                let (_, result) = run(&runtime, &caller, &request).await;
                json!({"input": request, "result": result})
            }
        })
        .buffered(concurrent)
        .collect()
        .await;
    let successes = results
        .iter()
        .filter(|r| r["result"]["status"] == "success")
        .count();
    axum::Json(json!({
        "results": results,
        "summary": {
            "total": results.len(),
            "successes": successes,
            "failures": results.len() - successes,
        },
    }))
    .into_response()
}

async fn status(State(runtime): State<Arc<Runtime>>) -> axum::Json<Value> {
    axum::Json(runtime.status())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bodies_and_their_errors() {
        let call = parse_call(br#"{"tool_name":"set_volume","parameters":{"level":30}}"#).unwrap();
        assert_eq!(call.tool_name, "set_volume");
        let err = parse_call(br#"{"tool_name":"x","parameters":[1]}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid type"), "{err}");
        let err = parse_call(br#"{"tool":"x"}"#).unwrap_err().to_string();
        assert!(err.contains("unknown field `tool`"), "{err}");
        let err = parse_call(b"{\"tool_name\": ").unwrap_err().to_string();
        assert!(err.contains("EOF"), "{err}");
        let err = parse_batch(br#"{"requests":[],"max_concurrent":11}"#, 10)
            .unwrap_err()
            .to_string();
        assert!(err.contains("1 to 10, got 11"), "{err}");
        let many = json!({"requests": vec![json!({"tool_name": "a"}); 3]}).to_string();
        assert!(
            parse_batch(many.as_bytes(), 2)
                .unwrap_err()
                .to_string()
                .contains("at most 2")
        );
        assert_eq!(parse_batch(many.as_bytes(), 3).unwrap().requests.len(), 3);
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            "[a-z_]{0,8}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("tool_name".to_string()),
                        Just("parameters".to_string()),
                        Just("requests".to_string()),
                        Just("max_concurrent".to_string()),
                        "[a-z]{1,6}",
                    ],
                    inner,
                    0..4
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Any bytes: an answer, never a panic; an error says what was wrong.
        #[test]
        fn any_bytes_parse_or_say_why(body in prop::collection::vec(any::<u8>(), 0..256)) {
            if let Err(e) = parse_call(&body) {
                prop_assert!(e.to_string().starts_with("invalid request body"));
            }
            let _ = parse_batch(&body, 100);
        }

        /// JSON of roughly the right shape: accepted exactly when it is a valid request, and
        /// an accepted request serializes back to what was parsed.
        #[test]
        fn json_shapes_round_trip(value in json_value()) {
            let body = value.to_string();
            if let Ok(call) = parse_call(body.as_bytes()) {
                prop_assert!(!call.tool_name.is_empty());
                let again = serde_json::to_vec(&call).unwrap();
                prop_assert_eq!(parse_call(&again).unwrap(), call);
            }
            if let Ok(batch) = parse_batch(body.as_bytes(), 100) {
                prop_assert!(batch.max_concurrent.is_none_or(|n| (1..=10).contains(&n)));
                let again = serde_json::to_vec(&batch).unwrap();
                prop_assert_eq!(parse_batch(&again, 100).unwrap(), batch);
            }
        }

        /// Valid requests built from parts are accepted with those parts.
        #[test]
        fn valid_calls_are_accepted(name in "[a-zA-Z_][a-zA-Z0-9_-]{0,20}", level in any::<i64>()) {
            let body = json!({"tool_name": name, "parameters": {"level": level}}).to_string();
            let call = parse_call(body.as_bytes()).unwrap();
            prop_assert_eq!(&call.tool_name, &name);
            prop_assert_eq!(call.parameters.unwrap()["level"].as_i64(), Some(level));
        }
    }
}
