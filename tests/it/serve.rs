//! Serving safely (issue 9): every auth path on every surface (the HTTP API's REST bridge, MCP
//! endpoint and metrics; the device WebSocket; the duplex REST, WebSocket and MCP-over-HTTP
//! servers), roles, rate limits, circuit breakers, metrics, the batch bridge and malformed
//! bodies. Real servers on loopback: the music server as a child process over streamable HTTP,
//! the tool hub, axum, and `voxloop duplex mcp` as a process.

use crate::common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};
use voxloop::api::Guard;
use voxloop::api::auth::hash_key;
use voxloop::api::config::{ApiKeyConfig, AuthConfig, JwtConfig, Role};
use voxloop::config::Config;
use voxloop::tools::config::McpServerConfig;
use voxloop::tools::hub::ToolHub;

const ADMIN_KEY: &str = "vxk_admin_key_for_tests";
const USER_KEY: &str = "vxk_user_key_for_tests";
const SECRET_ENV: &str = "VOXLOOP_TEST_JWT_SECRET";
const SECRET: &str = "a shared secret of at least thirty-two bytes";
const ISSUER: &str = "https://login.test";

fn data(name: &str) -> std::path::PathBuf {
    common::repo_root().join("tests/data").join(name)
}

/// `[auth]` with an admin and a user API key, HS256 and RS256 JWTs, and a device token.
fn auth() -> AuthConfig {
    // SAFETY: every test of this binary sets the same value, before any server reads it.
    unsafe { std::env::set_var(SECRET_ENV, SECRET) };
    AuthConfig {
        api_keys: vec![
            ApiKeyConfig {
                name: "ops".into(),
                role: Role::Admin,
                sha256: hash_key(ADMIN_KEY),
            },
            ApiKeyConfig {
                name: "app".into(),
                role: Role::User,
                sha256: hash_key(USER_KEY),
            },
        ],
        jwt: Some(JwtConfig {
            hs256_secret_env: Some(SECRET_ENV.into()),
            rs256_public_key: Some(data("jwt_rs256_public.pem")),
            issuer: ISSUER.into(),
            audience: "voxloop".into(),
            leeway_s: 0,
        }),
        tokens: vec!["device-token".into()],
        ..AuthConfig::default()
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A JWT with `claims` over the standard ones (`sub`, `iss`, `aud`, `exp` in an hour).
fn jwt(algorithm: Algorithm, claims: Value) -> String {
    let mut all = json!({"sub": "alice", "iss": ISSUER, "aud": "voxloop", "exp": now() + 3600});
    for (k, v) in claims.as_object().unwrap() {
        all[k] = v.clone();
    }
    let key = match algorithm {
        Algorithm::HS256 => EncodingKey::from_secret(SECRET.as_bytes()),
        _ => EncodingKey::from_rsa_pem(&std::fs::read(data("jwt_rs256_private.pem")).unwrap())
            .unwrap(),
    };
    jsonwebtoken::encode(&Header::new(algorithm), &all, &key).unwrap()
}

/// The music server over streamable HTTP on `port`; killed on drop.
fn music_on(port: u16) -> tokio::process::Child {
    tokio::process::Command::new(common::music_server_bin())
        .args([
            "--transport",
            "http",
            "--bind",
            &format!("127.0.0.1:{port}"),
        ])
        .current_dir(common::repo_root())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn wait_listening(port: u16) {
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("nothing listens on {port}");
}

/// The runtime's config: the music server at `music_port` as `name` (metrics are per process:
/// a test that reads a server's breaker gauge gives it a name of its own), small breaker and
/// restart times.
fn config_named(name: &str, music_port: u16) -> Config {
    let mut config = Config::default();
    config.mcp_servers.insert(
        name.into(),
        McpServerConfig {
            url: Some(format!("http://127.0.0.1:{music_port}/mcp")),
            ..McpServerConfig::default()
        },
    );
    config.tools.restart_backoff_ms = 10;
    config.tools.start_timeout_ms = 5_000;
    config.tools.call_timeout_ms = 5_000;
    config.breaker.failures = 2;
    config.breaker.open_ms = 300;
    config.auth = auth();
    config
}

/// `voxloop serve`'s HTTP API over `config`, with the duplex tools over a tiny model when
/// `duplex` is given; returns its base URL.
async fn api(config: &Config, duplex: Option<&Path>) -> String {
    let hub = Arc::new(ToolHub::start(config.hub()).await);
    assert!(
        hub.startup_failures().is_empty(),
        "{:?}",
        hub.startup_failures()
    );
    let duplex = duplex.map(|dir| {
        let mut c = config.duplex.clone();
        c.model_dir = Some(dir.to_path_buf());
        c.device = "cpu".into();
        voxloop::duplex::mcp::DuplexMcp::new(voxloop::duplex::service::Duplex::start(&c).unwrap())
            .cohost()
    });
    common::serve_api(config, hub, duplex).await
}

/// The music server (as `name`) on a free port and the HTTP API over it, with the duplex tools
/// on a tiny model when `duplex`. Dropping it stops the music server.
struct Rig {
    base: String,
    music: tokio::process::Child,
    port: u16,
    config: Config,
    _model: Option<tempfile::TempDir>,
}

async fn rig(name: &str, duplex: bool, tweak: impl FnOnce(&mut Config)) -> Rig {
    let port = common::free_port();
    let music = music_on(port);
    wait_listening(port).await;
    let mut config = config_named(name, port);
    tweak(&mut config);
    let model = duplex.then(common::tiny_duplex_model);
    let base = api(&config, model.as_ref().map(|m| m.path())).await;
    Rig {
        base,
        music,
        port,
        config,
        _model: model,
    }
}

/// The credentials every surface is tried with, and the status each must get (`ok` for an
/// admitted one).
fn credential_cases(ok: u16) -> Vec<(&'static str, Option<String>, u16)> {
    vec![
        ("missing", None, 401),
        ("wrong key", Some("vxk_not_a_key".into()), 401),
        (
            "expired JWT",
            Some(jwt(Algorithm::HS256, json!({"exp": now() - 60}))),
            401,
        ),
        (
            "wrong audience",
            Some(jwt(Algorithm::HS256, json!({"aud": "someone-else"}))),
            401,
        ),
        (
            "wrong issuer",
            Some(jwt(Algorithm::RS256, json!({"iss": "https://evil.test"}))),
            401,
        ),
        ("user key", Some(USER_KEY.into()), ok),
        ("admin key", Some(ADMIN_KEY.into()), ok),
        ("HS256 JWT", Some(jwt(Algorithm::HS256, json!({}))), ok),
        (
            "RS256 JWT",
            Some(jwt(Algorithm::RS256, json!({"role": "admin"}))),
            ok,
        ),
    ]
}

/// Sends `request` with `credential` as a bearer token: status, `WWW-Authenticate`, body.
async fn send(
    request: reqwest::RequestBuilder,
    credential: Option<&str>,
) -> (u16, Option<String>, String) {
    let request = match credential {
        Some(c) => request.bearer_auth(c),
        None => request,
    };
    let response = request.send().await.unwrap();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    (
        response.status().as_u16(),
        challenge,
        response.text().await.unwrap(),
    )
}

/// Every credential case against one HTTP request.
async fn check_http(surface: &str, ok: u16, request: impl Fn() -> reqwest::RequestBuilder) {
    for (case, credential, want) in credential_cases(ok) {
        let (status, challenge, body) = send(request(), credential.as_deref()).await;
        assert_eq!(status, want, "{surface}, {case}: {body}");
        if want == 401 {
            let challenge = challenge.unwrap_or_else(|| panic!("{surface}, {case}: no challenge"));
            assert!(
                challenge.starts_with("Bearer realm=\"voxloop\""),
                "{challenge}"
            );
            if credential.is_some() {
                assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
            }
        }
    }
}

/// The HTTP status of a WebSocket upgrade to `url` with `credential` (101 when admitted).
async fn upgrade_status(url: &str, credential: Option<&str>) -> u16 {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let mut request = url.into_client_request().unwrap();
    if let Some(c) = credential {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {c}").parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((_, response)) => response.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("{url}: {e}"),
    }
}

async fn check_ws(surface: &str, url: &str) {
    for (case, credential, want) in credential_cases(101) {
        let status = upgrade_status(url, credential.as_deref()).await;
        assert_eq!(status, want, "{surface}, {case}");
    }
}

/// An MCP `initialize` request as a streamable HTTP client sends it.
fn mcp_post(url: &str, body: Value) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .post(url)
        .header("accept", "application/json, text/event-stream")
        .json(&body)
}

fn initialize() -> Value {
    json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "test", "version": "1"}}})
}

#[tokio::test]
async fn every_auth_path_on_the_api_surfaces_and_roles() {
    let rig = rig("music", true, |_| {}).await;
    let base = rig.base.clone();
    let client = reqwest::Client::new();
    check_http("REST tools", 200, || {
        client.get(format!("{base}/v1/mcp/tools"))
    })
    .await;
    check_http("metrics", 200, || client.get(format!("{base}/metrics"))).await;
    check_http("MCP", 200, || {
        mcp_post(&format!("{base}/mcp"), initialize())
    })
    .await;
    // The probes need nothing.
    let (status, _, _) = send(client.get(format!("{base}/health")), None).await;
    assert_eq!(status, 200);

    // Roles: a user neither sees nor calls the admin-only tools, anywhere.
    let tools = |key: &'static str| {
        let client = client.clone();
        let url = format!("{base}/v1/mcp/tools");
        async move {
            let (_, _, body) = send(client.get(url), Some(key)).await;
            let body: Value = serde_json::from_str(&body).unwrap();
            body["tools"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["name"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    let (user_tools, admin_tools) = (tools(USER_KEY).await, tools(ADMIN_KEY).await);
    for tool in [
        "musicPlayer",
        "music_set_volume",
        "get_current_time",
        "get_gpu_status",
    ] {
        assert!(
            user_tools.iter().any(|t| t == tool),
            "{tool} in {user_tools:?}"
        );
    }
    for tool in ["release_gpu", "offload_gpu", "update_gpu_timeout"] {
        assert!(
            !user_tools.iter().any(|t| t == tool),
            "{tool} shown to a user"
        );
        assert!(
            admin_tools.iter().any(|t| t == tool),
            "{tool} in {admin_tools:?}"
        );
    }
    let call = |tool: &str| {
        client
            .post(format!("{base}/v1/mcp/tools/call"))
            .json(&json!({"tool_name": tool, "parameters": {}}))
    };
    let (status, _, body) = send(call("release_gpu"), Some(USER_KEY)).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("needs the admin role"), "{body}");
    let user_jwt = jwt(Algorithm::HS256, json!({"role": "user"}));
    let (status, _, _) = send(call("offload_gpu"), Some(&user_jwt)).await;
    assert_eq!(status, 403);
    let (status, _, body) = send(call("release_gpu"), Some(ADMIN_KEY)).await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["status"], "success", "{body}");
    assert_eq!(body["released"], false, "nothing was loaded: {body}");
    // Over MCP: the same refusal, with HTTP 403, before the MCP server sees it.
    let release = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "release_gpu", "arguments": {}}});
    let (status, _, body) = send(mcp_post(&format!("{base}/mcp"), release), Some(USER_KEY)).await;
    assert_eq!(status, 403, "{body}");
    // The MCP server reads bodies itself: the bound holds there too, for every role.
    let huge = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
        "params": {"name": "get_current_time", "arguments": {"pad": "x".repeat(2 << 20)}}});
    let (status, _, body) = send(mcp_post(&format!("{base}/mcp"), huge), Some(ADMIN_KEY)).await;
    assert_eq!(status, 413, "{body}");
    // A user's MCP session lists no admin-only tool; an admin's calls one.
    let user = connect_mcp(&format!("{base}/mcp"), USER_KEY).await;
    let listed = user.list_all_tools().await.unwrap();
    assert!(listed.iter().all(|t| t.name != "release_gpu"));
    assert!(listed.iter().any(|t| t.name == "musicPlayer"));
    let admin = connect_mcp(&format!("{base}/mcp"), ADMIN_KEY).await;
    let result = admin
        .call_tool(
            rmcp::model::CallToolRequestParams::new("update_gpu_timeout")
                .with_arguments(json!({"timeout_seconds": 60}).as_object().unwrap().clone()),
        )
        .await
        .unwrap();
    assert_eq!(result.structured_content.unwrap()["idle_timeout"], 60);
    // A browser page from elsewhere is refused; one from this machine is not.
    let (status, _, _) = send(
        client
            .get(format!("{base}/v1/mcp/tools"))
            .header("origin", "https://evil.example"),
        Some(ADMIN_KEY),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _, _) = send(
        client
            .get(format!("{base}/v1/mcp/tools"))
            .header("origin", "http://localhost:5173"),
        Some(ADMIN_KEY),
    )
    .await;
    assert_eq!(status, 200);
}

/// An rmcp client over streamable HTTP with `key` as its bearer token.
async fn connect_mcp(url: &str, key: &str) -> common::Client {
    use rmcp::ServiceExt as _;
    use rmcp::transport::StreamableHttpClientTransport;
    use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
    let config = StreamableHttpClientTransportConfig::with_uri(url.to_string()).auth_header(key);
    let transport = StreamableHttpClientTransport::from_config(config);
    ().serve(transport).await.expect("MCP handshake with a key")
}

#[tokio::test]
async fn every_auth_path_on_the_device_and_duplex_surfaces() {
    // The device WebSocket: API keys and JWTs as on every surface, device tokens too.
    let config = Config {
        auth: auth(),
        ..Config::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(voxloop::device::server::serve(
        listener,
        &config,
        None,
        std::future::pending(),
    ));
    let device = format!("ws://{addr}{}", config.device.path);
    check_ws("device", &device).await;
    assert_eq!(upgrade_status(&device, Some("device-token")).await, 101);

    // The duplex server: REST (admin-only endpoints) and its chat WebSocket.
    let model = common::tiny_duplex_model();
    let mut duplex_config = config.duplex.clone();
    duplex_config.model_dir = Some(model.path().to_path_buf());
    duplex_config.device = "cpu".into();
    let duplex = voxloop::duplex::service::Duplex::start(&duplex_config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let guard = Guard::new(&config.auth, &config.server, &addr.to_string(), "duplex").unwrap();
    tokio::spawn(voxloop::duplex::server::serve(
        listener,
        duplex,
        1 << 20,
        guard,
        std::future::pending(),
    ));
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();
    check_http("duplex REST", 200, || {
        client.get(format!("{base}/api/gpu/status"))
    })
    .await;
    let offload = || client.post(format!("{base}/api/gpu/offload"));
    let (status, _, body) = send(offload(), Some(USER_KEY)).await;
    assert_eq!(status, 403, "{body}");
    let (status, _, body) = send(offload(), Some(ADMIN_KEY)).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, _) = send(client.get(format!("{base}/health")), None).await;
    assert_eq!(status, 200, "the duplex liveness probe needs nothing");
    // Only the upgrade's answer matters here: admitted sockets are dropped at once.
    for (case, credential, want) in credential_cases(101) {
        let status = upgrade_status(&format!("ws://{addr}/api/chat"), credential.as_deref()).await;
        assert_eq!(status, want, "duplex chat, {case}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_duplex_mcp_process_checks_credentials_and_roles() {
    let model = common::tiny_duplex_model();
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        auth: auth(),
        ..Config::default()
    };
    let file = common::duplex_config_file(dir.path(), model.path(), config);
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_voxloop"));
    command
        .arg("--config")
        .arg(&file)
        .args(["duplex", "mcp", "--bind", "127.0.0.1:0"])
        .env(SECRET_ENV, SECRET);
    let (_child, url) = common::mcp_endpoint_of(command).await;
    check_http("duplex MCP", 200, || mcp_post(&url, initialize())).await;
    let release = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "release_gpu", "arguments": {}}});
    let (status, _, _) = send(mcp_post(&url, release), Some(USER_KEY)).await;
    assert_eq!(status, 403);
    let admin = connect_mcp(&url, ADMIN_KEY).await;
    let result = admin
        .call_tool(rmcp::model::CallToolRequestParams::new("release_gpu"))
        .await
        .unwrap();
    assert_eq!(result.structured_content.unwrap()["status"], "success");
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after() {
    let rig = rig("music", false, |c| {
        c.server.rate_per_key = 3;
        c.server.rate_per_ip = 0;
        c.server.rate_window_s = 60;
    })
    .await;
    let base = rig.base.clone();
    let mut config = rig.config.clone();
    let client = reqwest::Client::new();
    let get = |key: &str| {
        client
            .get(format!("{base}/v1/mcp/status"))
            .bearer_auth(key)
            .send()
    };
    for _ in 0..3 {
        assert_eq!(get(USER_KEY).await.unwrap().status(), StatusCode::OK);
    }
    let refused = get(USER_KEY).await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&wait), "Retry-After {wait}");
    // Another key has its own budget.
    assert_eq!(get(ADMIN_KEY).await.unwrap().status(), StatusCode::OK);

    // Per IP: counted before the credential, so failed guesses use it up too.
    config.server.rate_per_key = 0;
    config.server.rate_per_ip = 2;
    let base = api(&config, None).await;
    let get = |key: &str| {
        client
            .get(format!("{base}/v1/mcp/status"))
            .bearer_auth(key)
            .send()
    };
    assert_eq!(
        get("wrong").await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(get(ADMIN_KEY).await.unwrap().status(), StatusCode::OK);
    let refused = get(ADMIN_KEY).await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.headers().contains_key("retry-after"));
}

#[tokio::test]
async fn jwt_times_rate_buckets_by_identity_and_batches_count_each_call() {
    let rig = rig("music", false, |c| {
        c.server.rate_per_key = 3;
        c.server.rate_per_ip = 0;
        c.server.rate_window_s = 60;
    })
    .await;
    let base = rig.base.clone();
    let client = reqwest::Client::new();
    let status = |token: String| {
        let request = client
            .get(format!("{base}/v1/mcp/status"))
            .bearer_auth(token)
            .send();
        async move { request.await.unwrap().status() }
    };
    // `nbf` and `iat` in the future are refused (leeway 0 in this config).
    let early = jwt(Algorithm::HS256, json!({"nbf": now() + 600}));
    assert_eq!(status(early).await, StatusCode::UNAUTHORIZED);
    let future = jwt(Algorithm::HS256, json!({"iat": now() + 600}));
    assert_eq!(status(future).await, StatusCode::UNAUTHORIZED);
    let fine = jwt(
        Algorithm::HS256,
        json!({"nbf": now() - 5, "iat": now() - 5}),
    );
    assert_eq!(status(fine).await, StatusCode::OK);

    // A token whose subject is `local` or `anonymous` has a bucket like any other.
    for subject in ["local", "anonymous"] {
        let token = jwt(Algorithm::HS256, json!({"sub": subject}));
        for _ in 0..3 {
            assert_eq!(status(token.clone()).await, StatusCode::OK, "{subject}");
        }
        assert_eq!(
            status(token).await,
            StatusCode::TOO_MANY_REQUESTS,
            "{subject}"
        );
    }
    // A token named like an API key ("app") neither shares nor exhausts that key's bucket.
    let named = jwt(Algorithm::RS256, json!({"sub": "app"}));
    for _ in 0..3 {
        assert_eq!(status(named.clone()).await, StatusCode::OK);
    }
    assert_eq!(status(named).await, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(status(USER_KEY.into()).await, StatusCode::OK);

    // A batch counts each call: 5 calls against a budget of 3.
    let batch = json!({"requests": (0..5).map(|_| json!({"tool_name": "get_current_time"})).collect::<Vec<_>>()});
    let response = client
        .post(format!("{base}/v1/mcp/tools/batch"))
        .bearer_auth(ADMIN_KEY)
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("each call of a batch counts")
    );
    // A batch within the budget runs (another key: the admin's is spent).
    let small =
        json!({"requests": [{"tool_name": "get_current_time"}, {"tool_name": "get_current_time"}]});
    let response = client
        .post(format!("{base}/v1/mcp/tools/batch"))
        .bearer_auth(jwt(Algorithm::HS256, json!({"sub": "batcher"})))
        .json(&small)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

/// The value of the metric line starting with `prefix` (0 when absent).
fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .map(|v| v.parse().unwrap())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_breaker_opens_on_failures_fails_fast_and_recovers_and_metrics_move() {
    let mut rig = rig("jukebox", false, |_| {}).await;
    let (base, port) = (rig.base.clone(), rig.port);
    let client = reqwest::Client::new();
    let metrics = || async {
        let (_, _, text) = send(client.get(format!("{base}/metrics")), Some(ADMIN_KEY)).await;
        text
    };
    let volume = |level: Value| {
        client
            .post(format!("{base}/v1/mcp/tools/call"))
            .json(&json!({"tool_name": "jukebox_set_volume", "parameters": {"volume": level}}))
    };
    let success =
        r#"voxloop_tool_calls_total{server="jukebox",tool="set_volume",status="success"}"#;
    let before = metric(&metrics().await, success);
    let (status, _, body) = send(volume(json!(30)), Some(USER_KEY)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["status"],
        "success"
    );
    assert_eq!(metric(&metrics().await, success), before + 1.0);
    // Refusals are counted too (other tests run beside this one: at least one more).
    let refusals = r#"voxloop_http_refusals_total{surface="api",status="401"}"#;
    let before = metric(&metrics().await, refusals);
    send(client.get(format!("{base}/v1/mcp/status")), Some("wrong")).await;
    assert!(metric(&metrics().await, refusals) >= before + 1.0);

    // The server dies: two failed calls open the breaker; the next fails fast.
    rig.music.kill().await.unwrap();
    rig.music.wait().await.unwrap();
    for _ in 0..2 {
        let (status, _, body) = send(volume(json!(30)), Some(USER_KEY)).await;
        assert_eq!(status, 502, "{body}");
    }
    let started = std::time::Instant::now();
    let (status, _, body) = send(volume(json!(30)), Some(USER_KEY)).await;
    assert_eq!(status, 502);
    assert!(
        body.contains("circuit breaker opened after 2 consecutive failures"),
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "not fast: {:?}",
        started.elapsed()
    );
    let text = metrics().await;
    assert_eq!(
        metric(&text, r#"voxloop_breaker_state{upstream="mcp:jukebox"}"#),
        2.0
    );
    let (_, _, status_body) =
        send(client.get(format!("{base}/v1/mcp/status")), Some(USER_KEY)).await;
    let status_json: Value = serde_json::from_str(&status_body).unwrap();
    assert_eq!(
        status_json["servers"][0]["breaker"], "open",
        "{status_json}"
    );

    // It comes back: after open_ms the next call goes through and closes the breaker.
    let _music = music_on(port);
    wait_listening(port).await;
    tokio::time::sleep(Duration::from_millis(350)).await;
    let mut recovered = false;
    for _ in 0..20 {
        let (status, _, _) = send(volume(json!(40)), Some(USER_KEY)).await;
        if status == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(350)).await;
    }
    assert!(
        recovered,
        "the breaker never let a call through to the restarted server"
    );
    let text = metrics().await;
    assert_eq!(
        metric(&text, r#"voxloop_breaker_state{upstream="mcp:jukebox"}"#),
        0.0
    );
    let failed = r#"voxloop_tool_calls_total{server="jukebox",tool="set_volume",status="failed"}"#;
    assert!(metric(&text, failed) >= 3.0, "{text}");
    assert!(
        text.contains("voxloop_tool_call_duration_seconds_bucket"),
        "{text}"
    );
}

#[tokio::test]
async fn batches_count_mixed_outcomes_and_bad_bodies_get_400() {
    let rig = rig("music", true, |_| {}).await;
    let base = rig.base.clone();
    let client = reqwest::Client::new();
    let post = |path: &str, body: &str| {
        client
            .post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .bearer_auth(USER_KEY)
            .body(body.to_string())
            .send()
    };
    let batch = json!({"max_concurrent": 3, "requests": [
        {"tool_name": "get_current_time"},
        {"tool_name": "music_set_volume", "parameters": {"volume": 30}},
        {"tool_name": "music_set_volume", "parameters": {"volume": "very loud"}},
        {"tool_name": "no_such_tool", "parameters": {}},
        {"tool_name": "release_gpu", "parameters": {}},
        {"tool_name": "list_voices"},
    ]});
    let response = post("/v1/mcp/tools/batch", &batch.to_string())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["summary"],
        json!({"total": 6, "successes": 3, "failures": 3}),
        "{body}"
    );
    let results = body["results"].as_array().unwrap();
    // In request order, each with its input.
    assert_eq!(results[3]["input"]["tool_name"], "no_such_tool");
    assert!(
        results[3]["result"]["error"]
            .as_str()
            .unwrap()
            .contains("no tool")
    );
    assert!(
        results[2]["result"]["error"]
            .as_str()
            .unwrap()
            .contains("volume"),
        "{body}"
    );
    assert!(
        results[4]["result"]["error"]
            .as_str()
            .unwrap()
            .contains("admin")
    );
    assert_eq!(results[5]["result"]["status"], "success");

    for (path, body, needle) in [
        ("/v1/mcp/tools/call", "{\"tool_name\": ", "EOF"),
        (
            "/v1/mcp/tools/call",
            "{\"tool\": \"x\"}",
            "unknown field `tool`",
        ),
        ("/v1/mcp/tools/call", "[1, 2]", "invalid type"),
        (
            "/v1/mcp/tools/batch",
            "{\"requests\": [], \"max_concurrent\": 0}",
            "1 to 10",
        ),
        (
            "/v1/mcp/tools/batch",
            "{\"requests\": [], \"max_concurrent\": 11}",
            "1 to 10",
        ),
        ("/v1/mcp/tools/batch", "not json", "expected"),
    ] {
        let response = post(path, body).await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path} {body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["status"], "error");
        let message = error["error"].as_str().unwrap();
        assert!(message.contains(needle), "{path} {body}: {message}");
    }
}

#[tokio::test]
async fn a_credential_past_its_mcp_session_cap_closes_its_own_longest_idle_session() {
    let rig = rig("session_caps", false, |c| {
        c.server.mcp_max_sessions_per_credential = 2
    })
    .await;
    let url = format!("{}/mcp", rig.base);
    let open = |key: &'static str| {
        let url = url.clone();
        async move {
            let id = common::mcp_open_session(&url, Some(key)).await;
            // Each session is opened after the one before.
            tokio::time::sleep(Duration::from_millis(5)).await;
            id
        }
    };
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}});
    let app_first = open(USER_KEY).await;
    let ops = open(ADMIN_KEY).await;
    let app_second = open(USER_KEY).await;
    let app_third = open(USER_KEY).await;
    let status = |key: &'static str, id: &String| {
        let (url, id, list) = (url.clone(), id.clone(), list.clone());
        async move { common::mcp_post(&url, Some(key), &id, &list).await.status() }
    };
    // The user key's third session closed its first; the admin key's, idle as long, stays.
    assert_eq!(status(USER_KEY, &app_first).await, StatusCode::NOT_FOUND);
    assert_eq!(status(USER_KEY, &app_second).await, StatusCode::OK);
    assert_eq!(status(USER_KEY, &app_third).await, StatusCode::OK);
    assert_eq!(status(ADMIN_KEY, &ops).await, StatusCode::OK);
}
