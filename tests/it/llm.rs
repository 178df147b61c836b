//! The OpenAI-compatible client against scripted endpoints on loopback: real HTTP and
//! server-sent events, text and tool calls streamed in pieces, and every failure.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use common::serve_loopback;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use voxloop::llm::config::LlmConfig;
use voxloop::llm::openai::OpenAiClient;
use voxloop::llm::{ChatMessage, LlmError, LlmEvent, Role};

/// An SSE body of these chunks (each `data: {json}`), then `data: [DONE]`, sent piece by piece.
fn sse(chunks: Vec<Value>) -> Response {
    let mut events: Vec<Result<String, std::io::Error>> = chunks
        .into_iter()
        .map(|c| Ok(format!("data: {c}\n\n")))
        .collect();
    events.push(Ok("data: [DONE]\n\n".into()));
    let body = axum::body::Body::from_stream(futures_util::stream::iter(events));
    ([(header::CONTENT_TYPE, "text/event-stream")], body).into_response()
}

fn text_chunk(text: &str) -> Value {
    json!({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]})
}

fn tool_chunk(index: u64, id: Option<&str>, name: Option<&str>, arguments: &str) -> Value {
    let mut function = json!({"arguments": arguments});
    if let Some(name) = name {
        function["name"] = json!(name);
    }
    let mut call = json!({"index": index, "type": "function", "function": function});
    if let Some(id) = id {
        call["id"] = json!(id);
    }
    json!({"choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": null}]})
}

fn finish_chunk(reason: &str) -> Value {
    json!({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
}

fn config(url: &str) -> LlmConfig {
    LlmConfig {
        url: format!("{url}/v1"),
        model: "scripted-1".into(),
        timeout_ms: 2000,
        retry_backoff_ms: 1,
        ..LlmConfig::default()
    }
}

/// All events of one completion.
async fn collect(client: &OpenAiClient, tools: &[Value]) -> Result<Vec<LlmEvent>, LlmError> {
    let messages = [
        ChatMessage::new(Role::System, "Be brief."),
        ChatMessage::new(Role::User, "Play horizon"),
    ];
    let mut stream = client
        .stream(&messages, tools, &CancellationToken::new())
        .await?;
    let mut events = Vec::new();
    while let Some(event) = stream.recv().await {
        events.push(event?);
    }
    Ok(events)
}

#[tokio::test]
async fn text_streams_in_pieces_and_the_request_is_well_formed() {
    let seen = Arc::new(Mutex::new(Value::Null));
    let seen_by_server = seen.clone();
    let router = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |body: axum::Json<Value>| async move {
            *seen_by_server.lock().await = body.0;
            let mut chunks = vec![
                text_chunk("Hel"),
                text_chunk("lo"),
                text_chunk(" there."),
                finish_chunk("stop"),
            ];
            chunks.push(
                json!({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3}}),
            );
            sse(chunks)
        }),
    );
    let url = serve_loopback(router).await;
    let tools = vec![
        json!({"type": "function", "function": {"name": "musicPlayer", "parameters": {"type": "object"}}}),
    ];
    let events = collect(&OpenAiClient::new(&config(&url)), &tools)
        .await
        .unwrap();
    let text: String = events
        .iter()
        .filter_map(|e| {
            if let LlmEvent::Text(t) = e {
                Some(t.as_str())
            } else {
                None
            }
        })
        .collect();
    assert_eq!(text, "Hello there.");
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, LlmEvent::Text(_)))
            .count(),
        3,
        "one event per delta"
    );
    let Some(LlmEvent::Done {
        finish_reason,
        usage,
    }) = events.last()
    else {
        panic!("{events:?}")
    };
    assert_eq!(finish_reason, "stop");
    assert_eq!(usage.unwrap().completion_tokens, 3);
    let request = seen.lock().await.clone();
    assert_eq!(request["model"], "scripted-1");
    assert_eq!(request["stream"], true);
    assert_eq!(
        request["messages"][1],
        json!({"role": "user", "content": "Play horizon"})
    );
    assert_eq!(request["tools"][0]["function"]["name"], "musicPlayer");
}

#[tokio::test]
async fn tool_calls_arrive_in_pieces_and_come_out_whole() {
    let router = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(|| async {
            sse(vec![
                tool_chunk(0, Some("call_a"), Some("musicPlayer"), ""),
                tool_chunk(1, Some("call_b"), Some("set_volume"), "{\"vol"),
                tool_chunk(0, None, None, "{\"qu"),
                tool_chunk(0, None, None, "ery\": \"hor"),
                tool_chunk(1, None, None, "ume\": 30}"),
                tool_chunk(0, None, None, "izon\"}"),
                finish_chunk("tool_calls"),
            ])
        }),
    );
    let url = serve_loopback(router).await;
    let events = collect(&OpenAiClient::new(&config(&url)), &[])
        .await
        .unwrap();
    let calls: Vec<_> = events
        .iter()
        .filter_map(|e| {
            if let LlmEvent::ToolCall(c) = e {
                Some(c.clone())
            } else {
                None
            }
        })
        .collect();
    assert_eq!(calls.len(), 2);
    assert_eq!(
        (calls[0].id.as_str(), calls[0].name.as_str()),
        ("call_a", "musicPlayer")
    );
    assert_eq!(
        serde_json::from_str::<Value>(&calls[0].arguments).unwrap(),
        json!({"query": "horizon"})
    );
    assert_eq!(
        serde_json::from_str::<Value>(&calls[1].arguments).unwrap(),
        json!({"volume": 30})
    );
    assert!(
        matches!(events.last(), Some(LlmEvent::Done { finish_reason, .. }) if finish_reason == "tool_calls")
    );
}

#[tokio::test]
async fn busy_and_failing_endpoints_are_retried_then_reported() {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let router = axum::Router::new()
        .route(
            "/busy/v1/chat/completions",
            axum::routing::post(move || {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n == 0 {
                        (
                            StatusCode::TOO_MANY_REQUESTS,
                            [(header::RETRY_AFTER, "0")],
                            "slow down",
                        )
                            .into_response()
                    } else {
                        sse(vec![text_chunk("ok"), finish_chunk("stop")])
                    }
                }
            }),
        )
        .route(
            "/broken/v1/chat/completions",
            axum::routing::post(|| async { (StatusCode::BAD_GATEWAY, "upstream down") }),
        )
        .route(
            "/locked/v1/chat/completions",
            axum::routing::post(|| async { StatusCode::UNAUTHORIZED }),
        )
        .route(
            "/nomodel/v1/chat/completions",
            axum::routing::post(|| async { (StatusCode::NOT_FOUND, "model not found") }),
        );
    let base = serve_loopback(router).await;

    let events = collect(&OpenAiClient::new(&config(&format!("{base}/busy"))), &[])
        .await
        .unwrap();
    assert_eq!(events[0], LlmEvent::Text("ok".into()));
    assert_eq!(hits.load(Ordering::SeqCst), 2, "one 429, then success");

    let err = collect(&OpenAiClient::new(&config(&format!("{base}/broken"))), &[])
        .await
        .unwrap_err();
    assert!(matches!(err, LlmError::Status { status: 502, .. }), "{err}");
    assert!(
        err.to_string().contains("scripted-1")
            && err.to_string().contains("/broken/v1/chat/completions"),
        "{err}"
    );

    let err = collect(&OpenAiClient::new(&config(&format!("{base}/locked"))), &[])
        .await
        .unwrap_err();
    assert!(
        matches!(err, LlmError::Unauthorized { status: 401, .. }),
        "{err}"
    );
    let err = collect(&OpenAiClient::new(&config(&format!("{base}/nomodel"))), &[])
        .await
        .unwrap_err();
    assert!(matches!(err, LlmError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("scripted-1"));

    let err = collect(&OpenAiClient::new(&config("http://127.0.0.1:9")), &[])
        .await
        .unwrap_err();
    assert!(matches!(err, LlmError::Unreachable { .. }), "{err}");
}

#[tokio::test]
async fn a_stalled_or_garbled_stream_is_an_error_after_what_arrived() {
    let router = axum::Router::new()
        .route(
            "/stall/v1/chat/completions",
            axum::routing::post(|| async {
                let first = futures_util::stream::iter([Ok::<_, std::io::Error>(format!(
                    "data: {}\n\n",
                    text_chunk("Hi")
                ))]);
                let stall = futures_util::stream::pending();
                let body =
                    axum::body::Body::from_stream(futures_util::StreamExt::chain(first, stall));
                ([(header::CONTENT_TYPE, "text/event-stream")], body)
            }),
        )
        .route(
            "/garbled/v1/chat/completions",
            axum::routing::post(|| async {
                (
                    [(header::CONTENT_TYPE, "text/event-stream")],
                    "data: {not json\n\n",
                )
            }),
        )
        .route(
            "/cut/v1/chat/completions",
            axum::routing::post(|| async {
                (
                    [(header::CONTENT_TYPE, "text/event-stream")],
                    format!("data: {}\n\n", text_chunk("Half")),
                )
            }),
        );
    let base = serve_loopback(router).await;
    let client = OpenAiClient::new(&LlmConfig {
        timeout_ms: 300,
        ..config(&format!("{base}/stall"))
    });
    let mut stream = client
        .stream(
            &[ChatMessage::new(Role::User, "hi")],
            &[],
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(
        stream.recv().await.unwrap().unwrap(),
        LlmEvent::Text("Hi".into())
    );
    let err = stream.recv().await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            LlmError::Timeout {
                timeout_ms: 300,
                ..
            }
        ),
        "{err}"
    );

    let err = collect(&OpenAiClient::new(&config(&format!("{base}/garbled"))), &[])
        .await
        .unwrap_err();
    assert!(matches!(err, LlmError::Malformed { .. }), "{err}");
    let err = collect(&OpenAiClient::new(&config(&format!("{base}/cut"))), &[])
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("ended before the model finished"),
        "{err}"
    );
}

#[tokio::test]
async fn the_api_key_comes_from_the_named_variable() {
    let router = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(|headers: HeaderMap| async move {
            let auth = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_string();
            sse(vec![text_chunk(&auth), finish_chunk("stop")])
        }),
    );
    let url = serve_loopback(router).await;
    let missing = LlmConfig {
        api_key_env: Some("VOXLOOP_TEST_UNSET_LLM_KEY".into()),
        ..config(&url)
    };
    let err = collect(&OpenAiClient::new(&missing), &[])
        .await
        .unwrap_err();
    assert!(matches!(err, LlmError::MissingKey(_)), "{err}");
    // SAFETY: only this test reads this variable, set before the client reads it.
    unsafe { std::env::set_var("VOXLOOP_TEST_LLM_KEY", "sk-test") };
    let keyed = LlmConfig {
        api_key_env: Some("VOXLOOP_TEST_LLM_KEY".into()),
        ..config(&url)
    };
    let events = collect(&OpenAiClient::new(&keyed), &[]).await.unwrap();
    assert_eq!(events[0], LlmEvent::Text("Bearer sk-test".into()));
}
