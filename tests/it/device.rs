//! The device server's front door with a device simulator (tokio-tungstenite) on loopback:
//! tokens, protocol versions by header and by query, the hello and its timeout, bad input
//! (binary before hello, garbage JSON, wrong header sizes, oversized messages) and session
//! limits, with another session unharmed; and the OTA endpoint.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use voxloop::config::Config;
use voxloop::device::protocol::ProtocolVersion;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

const TOKEN: &str = "test-token";

fn config() -> Config {
    let mut config = Config::default();
    config.auth.tokens = vec![TOKEN.into()];
    config
        .auth
        .device_tokens
        .insert("aa:bb:cc:dd:ee:ff".into(), "own-token".into());
    config
}

/// The server on a loopback port; its base address.
async fn serve(config: Config) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serve = voxloop::device::server::serve(listener, &config, None, std::future::pending());
    tokio::spawn(async move { serve.await.unwrap() });
    addr
}

/// Connects as a device: `headers` as given (name, value).
async fn connect(
    addr: SocketAddr,
    query: &str,
    headers: &[(&str, &str)],
) -> Result<Socket, WsError> {
    let mut request = format!("ws://{addr}/xiaozhi/v1/{query}")
        .into_client_request()
        .unwrap();
    for (name, value) in headers {
        let name = axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap();
        request.headers_mut().insert(name, value.parse().unwrap());
    }
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(s, _)| s)
}

fn device_headers(version: &str) -> Vec<(&'static str, String)> {
    vec![
        ("authorization", format!("Bearer {TOKEN}")),
        ("protocol-version", version.to_string()),
        ("device-id", "11:22:33:44:55:66".into()),
        ("client-id", "0d6a2c2e-0000-4000-8000-000000000001".into()),
    ]
}

async fn connect_device(addr: SocketAddr, version: &str) -> Socket {
    let headers = device_headers(version);
    let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    connect(addr, "", &headers).await.unwrap()
}

fn hello() -> Message {
    Message::text(
        json!({"type": "hello", "version": 1, "features": {"mcp": true}, "transport": "websocket",
               "audio_params": {"format": "opus", "sample_rate": 16000, "channels": 1, "frame_duration": 60}})
        .to_string(),
    )
}

/// The next text message as JSON (pings skipped).
async fn next_json(socket: &mut Socket) -> Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .expect("a message within 5 s")
            .expect("the socket is open")
            .unwrap();
        match message {
            Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected text, got {other:?}"),
        }
    }
}

/// The close frame the server sends (code, reason).
async fn close_of(socket: &mut Socket) -> (CloseCode, String) {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .expect("a close within 5 s");
        match message {
            Some(Ok(Message::Close(Some(frame)))) => return (frame.code, frame.reason.to_string()),
            Some(Ok(Message::Close(None))) | None => panic!("closed without a code"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("socket error before a close: {e}"),
        }
    }
}

fn http_status(error: WsError) -> u16 {
    match error {
        WsError::Http(response) => response.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other}"),
    }
}

#[tokio::test]
async fn every_protocol_version_gets_a_hello_with_the_downlink_format() {
    let addr = serve(config()).await;
    for version in ["1", "2", "3"] {
        let mut device = connect_device(addr, version).await;
        device.send(hello()).await.unwrap();
        let reply = next_json(&mut device).await;
        assert_eq!(reply["type"], "hello");
        assert_eq!(reply["transport"], "websocket");
        assert!(!reply["session_id"].as_str().unwrap().is_empty());
        assert_eq!(
            reply["audio_params"],
            json!({"format": "opus", "sample_rate": 24000, "channels": 1, "frame_duration": 60})
        );
    }
    // A browser sends the same as query parameters.
    let mut browser = connect(
        addr,
        &format!("?authorization=Bearer%20{TOKEN}&protocol-version=3&device-id=web"),
        &[],
    )
    .await
    .unwrap();
    browser.send(hello()).await.unwrap();
    assert_eq!(next_json(&mut browser).await["type"], "hello");
}

#[tokio::test]
async fn tokens_are_checked_before_the_upgrade() {
    let addr = serve(config()).await;
    let refused = |headers: Vec<(&'static str, &'static str)>| async move {
        http_status(connect(addr, "", &headers).await.unwrap_err())
    };
    assert_eq!(refused(vec![]).await, 401);
    assert_eq!(refused(vec![("authorization", "Bearer wrong")]).await, 401);
    // A device with its own token must present that one, not a shared one.
    assert_eq!(
        refused(vec![
            ("authorization", "Bearer test-token"),
            ("device-id", "aa:bb:cc:dd:ee:ff")
        ])
        .await,
        401
    );
    assert!(
        connect(
            addr,
            "",
            &[
                ("authorization", "Bearer own-token"),
                ("device-id", "aa:bb:cc:dd:ee:ff")
            ]
        )
        .await
        .is_ok()
    );
    // An unknown protocol version.
    assert_eq!(
        refused(vec![
            ("authorization", "Bearer test-token"),
            ("protocol-version", "9")
        ])
        .await,
        400
    );
    // Anonymous devices only when configured.
    let mut open = config();
    open.auth.allow_anonymous = true;
    let addr = serve(open).await;
    assert!(connect(addr, "", &[]).await.is_ok());
}

#[tokio::test]
async fn no_hello_in_time_or_binary_first_closes_with_a_reason() {
    let mut config = config();
    config.device.hello_timeout_ms = 300;
    let addr = serve(config).await;
    let mut silent = connect_device(addr, "1").await;
    let (code, reason) = close_of(&mut silent).await;
    assert_eq!(u16::from(code), 1008);
    assert!(reason.contains("no hello within 300 ms"), "{reason}");

    let mut early = connect_device(addr, "1").await;
    early.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    let (code, reason) = close_of(&mut early).await;
    assert_eq!(u16::from(code), 1008);
    assert!(reason.contains("binary frame before the hello"), "{reason}");

    let mut chatty = connect_device(addr, "1").await;
    chatty
        .send(Message::text(r#"{"type":"listen","state":"start"}"#))
        .await
        .unwrap();
    let (code, reason) = close_of(&mut chatty).await;
    assert_eq!(u16::from(code), 1008);
    assert!(reason.contains("first message must be a hello"), "{reason}");
}

#[tokio::test]
async fn bad_input_gets_an_alert_or_a_close_and_other_sessions_go_on() {
    let mut config = config();
    config.device.max_message_bytes = 4096;
    let addr = serve(config).await;
    let mut good = connect_device(addr, "2").await;
    good.send(hello()).await.unwrap();
    let session = next_json(&mut good).await["session_id"].clone();

    // Garbage JSON: an alert naming the problem; the session stays open.
    let mut garbled = connect_device(addr, "2").await;
    garbled.send(hello()).await.unwrap();
    next_json(&mut garbled).await;
    garbled.send(Message::text("{not json")).await.unwrap();
    let alert = next_json(&mut garbled).await;
    assert_eq!(alert["type"], "alert");
    assert!(
        alert["message"]
            .as_str()
            .unwrap()
            .contains("not a valid message")
    );
    garbled
        .send(Message::text(r#"{"type":"dance"}"#))
        .await
        .unwrap();
    assert_eq!(next_json(&mut garbled).await["type"], "alert");

    // A v2 frame whose header size does not match: closed with 1007 naming the sizes.
    let mut frame = ProtocolVersion::V2.encode_opus(&[1, 2, 3, 4], 0);
    frame.truncate(frame.len() - 1);
    garbled.send(Message::binary(frame)).await.unwrap();
    let (code, reason) = close_of(&mut garbled).await;
    assert_eq!(u16::from(code), 1007);
    assert!(
        reason.contains("header says 4 payload bytes, the frame has 3"),
        "{reason}"
    );

    // A v3 frame too short for its header.
    let mut short = connect_device(addr, "3").await;
    short.send(hello()).await.unwrap();
    next_json(&mut short).await;
    short.send(Message::binary(vec![0, 0])).await.unwrap();
    let (code, reason) = close_of(&mut short).await;
    assert_eq!(u16::from(code), 1007);
    assert!(reason.contains("shorter than the v3 header"), "{reason}");

    // An oversized message.
    let mut big = connect_device(addr, "1").await;
    big.send(hello()).await.unwrap();
    next_json(&mut big).await;
    let _ = big.send(Message::binary(vec![0u8; 10_000])).await;
    let (code, reason) = close_of(&mut big).await;
    assert_eq!(u16::from(code), 1009);
    assert!(reason.contains("message over 4096 bytes"), "{reason}");

    // The good session still answers: a valid message after all that gets no alert, and the
    // socket is open (a ping is answered).
    good.send(Message::text(r#"{"type":"abort"}"#))
        .await
        .unwrap();
    good.send(Message::Ping(vec![7].into())).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), good.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Pong(p))) => {
                assert_eq!(&p[..], &[7]);
                break;
            }
            Some(Ok(Message::Ping(_))) => continue,
            other => panic!("the good session ({session}) got {other:?}"),
        }
    }
}

#[tokio::test]
async fn session_limits_refuse_with_503_and_free_on_close() {
    let mut config = config();
    config.device.max_sessions_per_ip = 1;
    let addr = serve(config).await;
    let mut first = connect_device(addr, "1").await;
    let headers = device_headers("1");
    let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    assert_eq!(
        http_status(connect(addr, "", &headers).await.unwrap_err()),
        503
    );
    first.close(None).await.unwrap();
    // The slot is freed once the server sees the close.
    let mut again = None;
    for _ in 0..50 {
        if let Ok(socket) = connect(addr, "", &headers).await {
            again = Some(socket);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "the slot was not freed");
}

#[tokio::test]
async fn idle_sessions_are_closed() {
    let mut config = config();
    config.device.idle_timeout_ms = 1_000;
    let addr = serve(config).await;
    let mut device = connect_device(addr, "1").await;
    device.send(hello()).await.unwrap();
    next_json(&mut device).await;
    let (code, reason) = close_of(&mut device).await;
    assert_eq!(u16::from(code), 1000);
    assert!(reason.starts_with("idle timeout"), "{reason}");
}

#[tokio::test]
async fn a_silent_device_is_closed_while_the_servers_pings_flow() {
    let mut config = config();
    config.device.idle_timeout_ms = 1_000;
    config.device.ping_interval_ms = 150;
    config.device.max_sessions_per_ip = 1;
    let addr = serve(config).await;
    let mut device = connect_device(addr, "1").await;
    // A ping before the hello is a control frame, not a message: the session goes on.
    device.send(Message::Ping(vec![1].into())).await.unwrap();
    device.send(hello()).await.unwrap();
    assert_eq!(next_json(&mut device).await["type"], "hello");
    // The device neither reads (so answers no ping) nor speaks; the server pings six times.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // The close frame arrives, or (the pongs the client then owes hitting a closed socket) the
    // connection is gone; either way within the timeout, and the slot is free again.
    loop {
        let message = tokio::time::timeout(Duration::from_secs(5), device.next())
            .await
            .expect("the session ends within 5 s");
        match message {
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(u16::from(frame.code), 1000);
                assert!(frame.reason.starts_with("idle timeout"), "{}", frame.reason);
                break;
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => break,
        }
    }
    drop(device);
    let mut again = None;
    for _ in 0..50 {
        if let Ok(socket) = connect(addr, "", &device_headers_ref("1")).await {
            again = Some(socket);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "the idle session's slot was not freed");
}

fn device_headers_ref(version: &str) -> Vec<(&'static str, &'static str)> {
    device_headers(version)
        .into_iter()
        .map(|(n, v)| (n, &*v.leak()))
        .collect()
}

const ADMIN_KEY: &str = "vxk_device_admin_for_tests";

/// `config()` with its own device store and an admin API key.
fn ota_config(dir: &tempfile::TempDir) -> Config {
    let mut config = config();
    config.device.store = Some(dir.path().join("devices.json"));
    config.auth.api_keys = vec![voxloop::api::config::ApiKeyConfig {
        name: "owner".into(),
        role: voxloop::api::config::Role::Admin,
        sha256: voxloop::api::auth::hash_key(ADMIN_KEY),
    }];
    config
}

/// The firmware's OTA check: `method` to `path`, with `Device-Id` and `Client-Id` when given.
async fn ota_request(
    addr: SocketAddr,
    method: reqwest::Method,
    path: &str,
    device: Option<&str>,
    client: &str,
    body: &str,
) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .request(method, format!("http://{addr}{path}"))
        .header("client-id", client)
        .body(body.to_string());
    if let Some(device) = device {
        request = request.header("device-id", device);
    }
    let answer = request.send().await.unwrap();
    let status = answer.status().as_u16();
    let text = answer.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn ota(addr: SocketAddr, device: &str, client: &str) -> Value {
    let (status, answer) = ota_request(
        addr,
        reqwest::Method::POST,
        "/xiaozhi/ota/",
        Some(device),
        client,
        "{}",
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    answer
}

/// Connects as `device` with `token`: the upgrade's HTTP status (101 when admitted).
async fn connect_with(addr: SocketAddr, device: &str, token: &str) -> Result<Socket, u16> {
    let auth = format!("Bearer {token}");
    let headers = [
        ("authorization", auth.as_str()),
        ("protocol-version", "1"),
        ("device-id", device),
        ("client-id", "c-1"),
    ];
    connect(addr, "", &headers).await.map_err(http_status)
}

#[tokio::test]
async fn ota_tells_the_firmware_where_the_server_is() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ota_config(&dir);
    config.device.firmware_version = "1.6.2".into();
    let addr = serve(config.clone()).await;
    let answer = ota(addr, "00:00:00:00:00:01", "c-1").await;
    // No public_url: the URL is built from the Host the device used, never the bind address.
    assert_eq!(
        answer["websocket"]["url"],
        format!("ws://{addr}/xiaozhi/v1/")
    );
    assert_eq!(answer["firmware"]["version"], "1.6.2");
    let now = chrono::Utc::now().timestamp_millis();
    assert!((answer["server_time"]["timestamp"].as_i64().unwrap() - now).abs() < 10_000);
    // GET, and the path without its trailing slash, answer the same way.
    for (method, path) in [
        (reqwest::Method::GET, "/xiaozhi/ota/"),
        (reqwest::Method::POST, "/xiaozhi/ota"),
        (reqwest::Method::GET, "/xiaozhi/ota"),
    ] {
        let (status, again) = ota_request(
            addr,
            method.clone(),
            path,
            Some("00:00:00:00:00:01"),
            "c-1",
            "",
        )
        .await;
        assert_eq!(status, 200, "{method} {path}: {again}");
        assert_eq!(again["activation"]["code"], answer["activation"]["code"]);
    }
    // With public_url, that URL.
    config.device.public_url = Some("ws://speaker-server.local:8000/xiaozhi/v1/".into());
    let addr = serve(config).await;
    let answer = ota(addr, "00:00:00:00:00:01", "c-1").await;
    assert_eq!(
        answer["websocket"]["url"],
        "ws://speaker-server.local:8000/xiaozhi/v1/"
    );
}

#[tokio::test]
async fn ota_reveals_no_token_to_a_caller_that_only_names_a_device() {
    let dir = tempfile::tempdir().unwrap();
    let addr = serve(ota_config(&dir)).await;
    // A device with a configured token of its own, and the shared token: neither is given out.
    let answer = ota(addr, "aa:bb:cc:dd:ee:ff", "made-up").await;
    let token = answer["websocket"]["token"].as_str().unwrap();
    assert_ne!(token, "own-token");
    assert_ne!(token, TOKEN);
    assert_eq!(answer["activation"]["code"].as_str().unwrap().len(), 6);
    // The token that came with the code opens only a session that speaks the code: the device
    // must be approved first, and the configured device token still works.
    assert!(
        connect_with(addr, "aa:bb:cc:dd:ee:ff", "own-token")
            .await
            .is_ok()
    );
    // Bad OTA requests: clear 400s, and the server goes on.
    for (device, body, needle) in [
        (None, "{}", "Device-Id"),
        (Some("aa:bb:cc:dd:ee:01"), "not json", "not JSON"),
    ] {
        let (status, answer) = ota_request(
            addr,
            reqwest::Method::POST,
            "/xiaozhi/ota/",
            device,
            "c",
            body,
        )
        .await;
        assert_eq!(status, 400, "{answer}");
        assert!(
            answer["error"].as_str().unwrap().contains(needle),
            "{answer}"
        );
    }
    ota(addr, "aa:bb:cc:dd:ee:01", "c").await;
}

#[tokio::test]
async fn activation_end_to_end_code_approve_token_connect_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let addr = serve(ota_config(&dir)).await;
    let device = "12:34:56:78:9a:bc";
    let first = ota(addr, device, "c-1").await;
    let code = first["activation"]["code"].as_str().unwrap().to_string();
    let challenge = first["activation"]["challenge"]
        .as_str()
        .unwrap()
        .to_string();
    let token = first["websocket"]["token"].as_str().unwrap().to_string();
    assert!(!token.is_empty());
    let http = reqwest::Client::new();
    let poll = async |client: &str| -> u16 {
        http.post(format!("http://{addr}/xiaozhi/ota/activate"))
            .header("device-id", device)
            .header("client-id", client)
            .json(&json!({"challenge": challenge, "serial_number": "", "hmac": ""}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(poll("c-1").await, 202, "waiting for the owner");
    assert_eq!(poll("someone-else").await, 404);
    // The pending token opens a session (which only speaks the code).
    let mut pending = connect_with(addr, device, &token).await.unwrap();
    pending.send(hello()).await.unwrap();
    assert_eq!(next_json(&mut pending).await["type"], "hello");
    // Approval needs the admin role.
    let approve = async |key: &str, code: &str| {
        http.post(format!("http://{addr}/xiaozhi/admin/devices/approve"))
            .bearer_auth(key)
            .json(&json!({"code": code}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(
        approve(TOKEN, &code).await,
        401,
        "a device token is no admin credential"
    );
    assert_eq!(approve(ADMIN_KEY, "000000x").await, 404);
    assert_eq!(approve(ADMIN_KEY, &code).await, 200);
    assert_eq!(poll("c-1").await, 200, "activated");
    let listed: Value = http
        .get(format!("http://{addr}/xiaozhi/admin/devices"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["devices"][0]["device_id"], device);
    assert!(
        !listed.to_string().contains(&token),
        "the list shows no token"
    );
    // The next OTA check of the same client gets the token and no activation.
    let again = ota(addr, device, "c-1").await;
    assert_eq!(again["websocket"]["token"], token.as_str());
    assert!(again.get("activation").is_none(), "{again}");
    // Another caller naming the device gets a code of its own, not the token.
    let spoofed = ota(addr, device, "c-2").await;
    assert_ne!(spoofed["websocket"]["token"], token.as_str());
    assert!(spoofed["activation"]["code"].is_string());
    let mut session = connect_with(addr, device, &token).await.unwrap();
    session.send(hello()).await.unwrap();
    assert_eq!(next_json(&mut session).await["type"], "hello");
    // The token belongs to this device only.
    assert_eq!(
        connect_with(addr, "12:34:56:78:9a:bd", &token).await.err(),
        Some(401)
    );
    // Revoked: refused from then on.
    let revoked = http
        .delete(format!("http://{addr}/xiaozhi/admin/devices/{device}"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status().as_u16(), 200);
    assert_eq!(connect_with(addr, device, &token).await.err(), Some(401));
}

#[tokio::test]
async fn ota_is_rate_limited_per_ip_and_the_shared_token_is_an_opt_in() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ota_config(&dir);
    config.server.rate_per_ip = 5;
    let addr = serve(config.clone()).await;
    let mut statuses = Vec::new();
    for i in 0..8 {
        let (status, _) = ota_request(
            addr,
            reqwest::Method::POST,
            "/xiaozhi/ota/",
            Some(&format!("00:00:00:00:01:{i:02}")),
            "c",
            "{}",
        )
        .await;
        statuses.push(status);
    }
    assert_eq!(&statuses[..5], &[200; 5]);
    assert!(statuses[5..].iter().all(|s| *s == 429), "{statuses:?}");

    config.server.rate_per_ip = 1200;
    config.device.ota_shared_token = true;
    let addr = serve(config).await;
    let answer = ota(addr, "00:00:00:00:02:01", "c").await;
    assert_eq!(answer["websocket"]["token"], TOKEN);
    assert!(answer.get("activation").is_none());
    // A device with a token of its own is never handed the shared one... nor its own.
    let answer = ota(addr, "aa:bb:cc:dd:ee:ff", "c").await;
    assert_ne!(answer["websocket"]["token"], "own-token");
}
