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
    assert_eq!(reason, "idle timeout");
}

#[tokio::test]
async fn ota_tells_the_firmware_where_the_server_is() {
    let mut config = config();
    config.device.public_url = Some("ws://speaker-server.local:8000/xiaozhi/v1/".into());
    config.device.firmware_version = "1.6.2".into();
    let addr = serve(config).await;
    // The firmware's OTA check: a POST with its Device-Id, answered in JSON.
    let ota = async |device: &str| -> Value {
        let answer = reqwest::Client::new()
            .post(format!("http://{addr}/xiaozhi/ota/"))
            .header("device-id", device)
            .body("{}")
            .send()
            .await
            .unwrap();
        serde_json::from_str(&answer.text().await.unwrap()).unwrap()
    };
    let answer = ota("aa:bb:cc:dd:ee:ff").await;
    assert_eq!(
        answer["websocket"],
        json!({"url": "ws://speaker-server.local:8000/xiaozhi/v1/", "token": "own-token"})
    );
    assert_eq!(answer["firmware"]["version"], "1.6.2");
    let now = chrono::Utc::now().timestamp_millis();
    assert!((answer["server_time"]["timestamp"].as_i64().unwrap() - now).abs() < 10_000);
    // A device without its own token is not given the shared one.
    let answer = ota("00:00:00:00:00:01").await;
    assert_eq!(answer["websocket"]["token"], "");
}
