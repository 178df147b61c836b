//! The music player MCP server (crates/mcp-audio) as a real child process, driven by an rmcp
//! client over stdio and streamable HTTP, reading from real loopback HTTP upstreams.

use crate::common;

use std::time::Duration;

use axum::extract::Path;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use common::*;
use rmcp::model::{CallToolRequestParams, ErrorCode, ReadResourceRequestParams, ResourceContents};
use rmcp::service::ServiceError;
use serde_json::{Value, json};
use voxloop::tools::paging::{PageError, PagingLimits, read_paged};

const HORIZON: &str = "tumiki_just_over_the_horizon.mp3";

fn limits(page_bytes: u64) -> PagingLimits {
    PagingLimits {
        page_bytes,
        ..PagingLimits::default()
    }
}

async fn call(client: &Client, tool: &str, args: Value) -> rmcp::model::CallToolResult {
    let mut params = CallToolRequestParams::new(tool.to_string());
    if let Value::Object(map) = args {
        params = params.with_arguments(map);
    }
    client.call_tool(params).await.expect("tools/call")
}

/// Reads `uri` to its end and returns the bytes.
async fn read_all(client: &Client, uri: &str, page_bytes: u64) -> Result<Vec<u8>, PageError> {
    let mut bytes = Vec::new();
    read_paged(client.peer(), uri, limits(page_bytes), |b| {
        bytes.extend_from_slice(b)
    })
    .await?;
    Ok(bytes)
}

/// The JSON-RPC error of a failed `resources/read`.
async fn read_error(client: &Client, uri: &str) -> rmcp::ErrorData {
    match client
        .read_resource(ReadResourceRequestParams::new(uri))
        .await
    {
        Err(ServiceError::McpError(e)) => e,
        other => panic!("{uri}: expected a JSON-RPC error, got {other:?}"),
    }
}

fn text_of(result: &rmcp::model::CallToolResult) -> String {
    result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Lists tools and templates, asks musicPlayer for "horizon", and reads the linked track at
/// three page sizes: the bytes must be the file's.
async fn play_horizon(client: &Client) {
    let tools = client.list_tools(None).await.unwrap().tools;
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    assert_eq!(names, ["musicPlayer", "set_volume"]);

    let templates = client
        .list_resource_templates(None)
        .await
        .unwrap()
        .resource_templates;
    assert_eq!(templates.len(), 1);
    assert_eq!(
        templates[0].uri_template,
        "audio://music/{musicUrl}{?start,end}"
    );

    let result = call(client, "musicPlayer", json!({"query": "Horizon"})).await;
    assert_eq!(result.is_error, Some(false));
    assert_eq!(result.content.len(), 1);
    let Some(link) = result.content[0].as_resource_link() else {
        panic!("expected a resource_link, got {:?}", result.content[0]);
    };
    let file = std::fs::read(music_file(HORIZON)).unwrap();
    assert_eq!(link.name, "Tumiki Just Over The Horizon");
    assert_eq!(
        link.description.as_deref(),
        Some("Tumiki Just Over The Horizon")
    );
    assert_eq!(link.mime_type.as_deref(), Some("audio/mpeg"));
    assert_eq!(link.size, Some(file.len() as u64));
    assert!(link.uri.starts_with("audio://music/"), "{}", link.uri);

    for page_kib in [16, 100, 512] {
        let page = page_kib * 1024;
        let mut pages = 0;
        let mut bytes = Vec::new();
        let summary = read_paged(client.peer(), &link.uri, limits(page), |b| {
            pages += 1;
            bytes.extend_from_slice(b);
        })
        .await
        .unwrap();
        assert_eq!(sha256(&bytes), sha256(&file), "page size {page_kib} KiB");
        assert_eq!(summary.pages, (file.len() as u64).div_ceil(page));
        assert_eq!(summary.mime_type.as_deref(), Some("audio/mpeg"));
    }
}

#[tokio::test]
async fn stdio_plays_a_track_page_by_page() {
    let client = spawn_stdio(&[]).await;
    play_horizon(&client).await;
}

#[tokio::test]
async fn streamable_http_plays_a_track_page_by_page() {
    let (_server, url) = spawn_http_server(&[]).await;
    let client = connect_http(&url).await;
    play_horizon(&client).await;
}

#[tokio::test]
async fn http_transport_checks_origin() {
    let (_server, url) = spawn_http_server(&[]).await;
    let initialize = json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "t", "version": "1"}}
    });
    let post = |origin: &'static str| {
        reqwest::Client::new()
            .post(&url)
            .header("Origin", origin)
            .header("Accept", "application/json, text/event-stream")
            .json(&initialize)
            .send()
    };
    assert_eq!(post("http://evil.example").await.unwrap().status(), 403);
    assert_eq!(post("http://localhost:5173").await.unwrap().status(), 200);
}

#[tokio::test]
async fn no_match_empty_query_and_wrong_query_type() {
    let client = spawn_stdio(&[]).await;
    let result = call(&client, "musicPlayer", json!({"query": "zzz nothing"})).await;
    assert_eq!(result.is_error, Some(false));
    let text = text_of(&result);
    assert!(
        text.contains("No match: nothing in the music library is called \"zzz nothing\""),
        "{text}"
    );
    assert!(
        text.contains("Torus Trooper Tt1"),
        "lists some titles: {text}"
    );

    // No query: the first track in stable (file name) order.
    let result = call(&client, "musicPlayer", json!({})).await;
    let link = result.content[0]
        .as_resource_link()
        .expect("a resource_link");
    assert_eq!(link.name, "Torus Trooper Tt1");
    assert_eq!(link.mime_type.as_deref(), Some("audio/mpeg"));

    let result = call(&client, "musicPlayer", json!({"query": 7})).await;
    assert_eq!(result.is_error, Some(true));
    assert!(text_of(&result).contains("`query` must be a string"));
}

#[tokio::test]
async fn set_volume_is_an_action_within_bounds() {
    let client = spawn_stdio(&[]).await;
    let result = call(&client, "set_volume", json!({"volume": 30})).await;
    assert_eq!(result.is_error, Some(false));
    assert_eq!(
        result.structured_content,
        Some(json!({"type": "action", "action": "set_volume", "volume": 30, "final_action": true}))
    );
    let result = call(&client, "set_volume", json!({"volume": "45"})).await;
    assert_eq!(result.structured_content.unwrap()["volume"], 45);
    for args in [
        json!({"volume": 0}),
        json!({"volume": 101}),
        json!({"volume": -5}),
        json!({"volume": 12.5}),
        json!({"volume": "loud"}),
        json!({"volume": null}),
        json!({}),
    ] {
        let result = call(&client, "set_volume", args.clone()).await;
        assert_eq!(result.is_error, Some(true), "{args}");
        assert!(
            text_of(&result).contains("integer from 1 to 100"),
            "{args}: {}",
            text_of(&result)
        );
    }
    let err = client
        .call_tool(CallToolRequestParams::new("no_such_tool"))
        .await
        .unwrap_err();
    assert!(format!("{err}").contains("unknown tool"), "{err}");
}

#[tokio::test]
async fn bad_read_parameters_are_invalid_params() {
    let client = spawn_stdio(&[]).await;
    let good = track_uri("http://127.0.0.1:1/x.mp3");
    let cases = [
        (format!("{good}?start=-1&end=10"), "`start`"),
        (format!("{good}?start=0&end=x"), "`end`"),
        (format!("{good}?start=10&end=10"), "greater than `start`"),
        (format!("{good}?start=0&end=524289"), "at most 524288 bytes"),
        ("audio://music/%%%?start=0&end=1".to_string(), "base64url"),
        (
            format!("{}?start=0&end=1", track_uri("file:///etc/passwd")),
            "http(s)",
        ),
        (
            format!("{}?start=0&end=1", track_uri("not a url")),
            "not a URL",
        ),
        (
            format!("{}?start=0&end=1", track_uri("http://example.com/a.mp3")),
            "not allowed",
        ),
    ];
    for (uri, needle) in cases {
        let err = read_error(&client, &uri).await;
        assert_eq!(err.code, ErrorCode::INVALID_PARAMS, "{uri}: {err:?}");
        assert!(err.message.contains(needle), "{uri}: {}", err.message);
    }
    let err = read_error(&client, "audio://elsewhere/x").await;
    assert_eq!(err.code, ErrorCode::RESOURCE_NOT_FOUND);
}

#[tokio::test]
async fn resources_list_pages_the_catalog_by_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("voxloop.toml");
    let library = common::repo_root().join("assets/music");
    std::fs::write(
        &config,
        format!(
            "[music]\nlibrary = {:?}\nlist_page_size = 4\n",
            library.display().to_string()
        ),
    )
    .unwrap();
    let client = spawn_stdio(&["--config", config.to_str().unwrap()]).await;
    let first = client.list_resources(None).await.unwrap();
    assert_eq!(first.resources.len(), 4);
    let cursor = first.next_cursor.clone().expect("a second page");
    let params = rmcp::model::PaginatedRequestParams::default().with_cursor(Some(cursor));
    let second = client.list_resources(Some(params)).await.unwrap();
    assert_eq!(second.resources.len(), 2);
    assert_eq!(second.next_cursor, None);
    let names: Vec<String> = first
        .resources
        .iter()
        .chain(&second.resources)
        .map(|r| r.name.clone())
        .collect();
    assert_eq!(names.len(), 6);
    assert_eq!(names[0], "Torus Trooper Tt1");
    assert_eq!(names[5], "Tumiki Return To Home");

    let params = rmcp::model::PaginatedRequestParams::default().with_cursor(Some("99".into()));
    match client.list_resources(Some(params)).await {
        Err(ServiceError::McpError(e)) => assert_eq!(e.code, ErrorCode::INVALID_PARAMS),
        other => panic!("expected invalid params, got {other:?}"),
    }
}

#[tokio::test]
async fn empty_library() {
    let dir = tempfile::tempdir().unwrap();
    let client = spawn_stdio(&["--library", dir.path().to_str().unwrap()]).await;
    let result = call(&client, "musicPlayer", json!({"query": "anything"})).await;
    assert_eq!(result.is_error, Some(false));
    assert!(
        text_of(&result).contains("library is empty"),
        "{}",
        text_of(&result)
    );
    assert!(
        client
            .list_resources(None)
            .await
            .unwrap()
            .resources
            .is_empty()
    );
}

#[tokio::test]
async fn tags_give_title_and_artist() {
    // An MP3 with an ID3v2.3 tag in front (TIT2 title, TPE1 artist), as taggers write it.
    fn frame(id: &[u8; 4], text: &str) -> Vec<u8> {
        let mut f = id.to_vec();
        f.extend_from_slice(&(text.len() as u32 + 1).to_be_bytes());
        f.extend_from_slice(&[0, 0, 0]); // flags, then encoding 0 (ISO-8859-1)
        f.extend_from_slice(text.as_bytes());
        f
    }
    let mut frames = frame(b"TIT2", "Just Over the Horizon");
    frames.extend(frame(b"TPE1", "Kenta Cho"));
    let n = frames.len() as u32;
    let syncsafe = [
        (n >> 21) & 0x7f,
        (n >> 14) & 0x7f,
        (n >> 7) & 0x7f,
        n & 0x7f,
    ]
    .map(|b| b as u8);
    let mut file = b"ID3\x03\x00\x00".to_vec();
    file.extend_from_slice(&syncsafe);
    file.extend(frames);
    file.extend(std::fs::read(music_file(HORIZON)).unwrap());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("track01.mp3"), &file).unwrap();

    let client = spawn_stdio(&["--library", dir.path().to_str().unwrap()]).await;
    let result = call(&client, "musicPlayer", json!({"query": "kenta"})).await;
    let link = result.content[0]
        .as_resource_link()
        .expect("a resource_link");
    assert_eq!(link.name, "Just Over the Horizon");
    assert_eq!(
        link.description.as_deref(),
        Some("Kenta Cho - Just Over the Horizon")
    );
    let bytes = read_all(&client, &link.uri, 100 * 1024).await.unwrap();
    assert_eq!(sha256(&bytes), sha256(&file));
}

#[tokio::test]
async fn remote_catalog_tracks_are_found_and_their_host_allowed() {
    let (upstream, hits) = upstream_server().await;
    // `0.0.0.0` reaches the loopback server but is not a loopback address, so only the catalog
    // entry makes it an allowed upstream.
    let url = format!(
        "{}/range/song.mp3",
        upstream.replace("127.0.0.1", "0.0.0.0")
    );
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog.toml");
    std::fs::write(
        &catalog,
        format!("[[track]]\ntitle = \"Far Away Song\"\nartist = \"Remote Band\"\nurl = {url:?}\nsize = 709762\n"),
    )
    .unwrap();
    let client = spawn_stdio(&["--catalog", catalog.to_str().unwrap()]).await;
    let result = call(&client, "musicPlayer", json!({"query": "far away"})).await;
    let link = result.content[0]
        .as_resource_link()
        .expect("a resource_link");
    assert_eq!(link.uri, track_uri(&url));
    assert_eq!(
        link.description.as_deref(),
        Some("Remote Band - Far Away Song")
    );
    assert_eq!(link.mime_type.as_deref(), Some("audio/mpeg"));
    let bytes = read_all(&client, &link.uri, 100 * 1024).await.unwrap();
    assert_eq!(
        sha256(&bytes),
        sha256(&std::fs::read(music_file(HORIZON)).unwrap())
    );
    assert!(hits.get() > 0);
}

// ---- upstream edge cases, against real loopback HTTP servers ----

/// The track's bytes, the `Range` header's start (and inclusive end), if any.
fn requested_range(headers: &HeaderMap) -> Option<(u64, Option<u64>)> {
    let spec = headers
        .get(header::RANGE)?
        .to_str()
        .ok()?
        .strip_prefix("bytes=")?;
    let (start, end) = spec.split_once('-')?;
    Some((start.parse().ok()?, end.parse().ok()))
}

/// One loopback server with an upstream behaviour per first path segment, all serving the
/// horizon MP3: `/range` (206; past the end 416 with `Content-Range: */N`), `/ignore-range`
/// (always 200, whole body), `/416-head` (as `/range`, but its 416 has no `Content-Range`, so
/// the size must come from HEAD), `/slow` (answers after 5 s), `/broken` (500), `/truncated`
/// (promises the whole file, sends 64 KiB, then breaks the connection). Counts every GET.
async fn upstream_server() -> (String, Hits) {
    let hits = Hits::default();
    let body: &'static [u8] = std::fs::read(music_file(HORIZON)).unwrap().leak();
    let len = body.len() as u64;
    let ranged = move |headers: &HeaderMap, with_content_range: bool| -> Response {
        let Some((start, end)) = requested_range(headers) else {
            return body.into_response();
        };
        if start >= len {
            let mut response = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            if with_content_range {
                let value = format!("bytes */{len}").parse().unwrap();
                response.headers_mut().insert(header::CONTENT_RANGE, value);
            }
            return response;
        }
        let end = end.map_or(len - 1, |e| e.min(len - 1));
        let slice = &body[start as usize..=end as usize];
        let content_range = format!("bytes {start}-{end}/{len}");
        (
            StatusCode::PARTIAL_CONTENT,
            [(header::CONTENT_RANGE, content_range)],
            slice,
        )
            .into_response()
    };
    let counter = hits.clone();
    let handler = move |Path((mode, _file)): Path<(String, String)>, headers: HeaderMap| async move {
        counter.add();
        match mode.as_str() {
            "range" => ranged(&headers, true),
            "416-head" => ranged(&headers, false),
            "ignore-range" => body.into_response(),
            "slow" => {
                tokio::time::sleep(Duration::from_secs(5)).await;
                body.into_response()
            }
            "truncated" => {
                use futures_util::StreamExt as _;
                let first: Result<&'static [u8], std::io::Error> = Ok(&body[..65536]);
                let rest = futures_util::stream::once(async {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Err(std::io::Error::other("upstream died"))
                });
                let stream = futures_util::stream::iter([first]).chain(rest);
                let length = [(header::CONTENT_LENGTH, len.to_string())];
                (length, axum::body::Body::from_stream(stream)).into_response()
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        }
    };
    (
        serve_loopback(axum::Router::new().route("/{mode}/{file}", get(handler))).await,
        hits,
    )
}

#[tokio::test]
async fn upstream_range_variants_all_give_the_whole_file() {
    let (upstream, hits) = upstream_server().await;
    let file = std::fs::read(music_file(HORIZON)).unwrap();
    let client = spawn_stdio(&["--allow-host", host_port(&upstream)]).await;
    for path in ["range", "ignore-range", "416-head"] {
        let uri = track_uri(&format!("{upstream}/{path}/song.mp3"));
        for page in [16 * 1024, 100 * 1024] {
            let before = hits.get();
            let bytes = read_all(&client, &uri, page).await.unwrap();
            assert_eq!(sha256(&bytes), sha256(&file), "{path}, page {page}");
            // A sequential read continues on one open upstream response.
            assert_eq!(
                hits.get() - before,
                1,
                "{path}, page {page}: upstream requests"
            );
        }
    }
    // Fresh requests at and past the end (no open response to continue): each way of saying
    // "past the end" (416 with Content-Range, 416 then HEAD, 200 with nothing left) is [DONE].
    let len = file.len();
    for path in ["range", "ignore-range", "416-head"] {
        let uri = track_uri(&format!("{upstream}/{path}/other.mp3"));
        for (start, end, expected) in [
            (len - 10, len + 100, &file[len - 10..]),
            (len, len + 100, &b"[DONE]"[..]),
            (len + 5000, len + 6000, &b"[DONE]"[..]),
        ] {
            let page = client
                .read_resource(ReadResourceRequestParams::new(format!(
                    "{uri}?start={start}&end={end}"
                )))
                .await
                .unwrap();
            let ResourceContents::BlobResourceContents { blob, .. } = &page.contents[0] else {
                panic!("a blob")
            };
            let expected =
                base64::Engine::encode(&base64::engine::general_purpose::STANDARD, expected);
            assert_eq!(blob, &expected, "{path} {start}..{end}");
        }
    }

    // A read that does not continue where the last ended opens a new request, and is right.
    let uri = track_uri(&format!("{upstream}/ignore-range/song.mp3"));
    let page = client
        .read_resource(ReadResourceRequestParams::new(format!(
            "{uri}?start=1000&end=1010"
        )))
        .await
        .unwrap();
    let ResourceContents::BlobResourceContents { blob, .. } = &page.contents[0] else {
        panic!("a blob")
    };
    let expected = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        &file[1000..1010],
    );
    assert_eq!(blob, &expected);
}

#[tokio::test]
async fn slow_and_failing_upstreams_are_errors_naming_the_cause() {
    let (upstream, _) = upstream_server().await;
    let client = spawn_stdio(&[
        "--upstream-timeout-ms",
        "300",
        "--allow-host",
        host_port(&upstream),
    ])
    .await;
    let slow = format!(
        "{}?start=0&end=100",
        track_uri(&format!("{upstream}/slow/a.mp3"))
    );
    let err = read_error(&client, &slow).await;
    assert_eq!(err.code, ErrorCode::INTERNAL_ERROR);
    assert!(
        err.message.contains("timed out after 300 ms"),
        "{}",
        err.message
    );

    let broken = format!(
        "{}?start=0&end=100",
        track_uri(&format!("{upstream}/broken/a.mp3"))
    );
    let err = read_error(&client, &broken).await;
    assert!(err.message.contains("HTTP 500"), "{}", err.message);

    // An upstream that dies mid-body: the pages before it arrive intact, then a clear error.
    let truncated = track_uri(&format!("{upstream}/truncated/a.mp3"));
    let mut got = Vec::new();
    let err = read_paged(client.peer(), &truncated, limits(16 * 1024), |b| {
        got.extend_from_slice(b)
    })
    .await
    .unwrap_err();
    assert!(
        !got.is_empty() && got.len() <= 65536,
        "{} bytes before the error",
        got.len()
    );
    let file = std::fs::read(music_file(HORIZON)).unwrap();
    assert_eq!(got, file[..got.len()]);
    assert!(err.to_string().contains("upstream"), "{err}");

    // The server is still fine after all of them.
    let ok = track_uri(&format!("{upstream}/range/a.mp3"));
    assert!(!read_all(&client, &ok, 512 * 1024).await.unwrap().is_empty());
}

#[tokio::test]
async fn hosts_off_the_allow_list_get_no_request() {
    let (upstream, hits) = upstream_server().await;
    let off_list = track_uri(&format!(
        "{}/range/a.mp3",
        upstream.replace("127.0.0.1", "0.0.0.0")
    ));
    let client = spawn_stdio(&[]).await;
    let err = read_error(&client, &format!("{off_list}?start=0&end=10")).await;
    assert_eq!(err.code, ErrorCode::INVALID_PARAMS);
    assert!(
        err.message.contains("\"0.0.0.0\" is not allowed"),
        "{}",
        err.message
    );
    assert_eq!(
        hits.get(),
        0,
        "no request may reach a host off the allow-list"
    );

    // The same URL once the host is allowed: the request goes through.
    let client = spawn_stdio(&["--allow-host", "0.0.0.0"]).await;
    assert!(
        !read_all(&client, &off_list, 512 * 1024)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(hits.get() > 0);
}

/// `127.0.0.1:PORT` of a loopback base URL.
fn host_port(base: &str) -> &str {
    base.strip_prefix("http://").unwrap()
}

#[tokio::test]
async fn loopback_in_every_spelling_and_userinfo_get_no_request() {
    let (upstream, hits) = upstream_server().await;
    let port = upstream.rsplit_once(':').unwrap().1;
    // Only another loopback port is listed: the upstream's own port is not reachable.
    let client = spawn_stdio(&["--allow-host", "127.0.0.1:1", "--allow-host", "localhost"]).await;
    for (url, needle) in [
        (
            format!("http://127.0.0.1:{port}/range/a.mp3"),
            "not allowed",
        ),
        (
            format!("http://2130706433:{port}/range/a.mp3"),
            "not allowed",
        ),
        (format!("http://0x7f.1:{port}/range/a.mp3"), "not allowed"),
        (format!("http://127.1:{port}/range/a.mp3"), "not allowed"),
        (
            format!("http://[::ffff:127.0.0.1]:{port}/range/a.mp3"),
            "not allowed",
        ),
        (
            "http://user:secret@127.0.0.1:1/range/a.mp3".to_string(),
            "user information",
        ),
        // A listed name that resolves to loopback is refused when connecting.
        (
            format!("http://localhost:{port}/range/a.mp3"),
            "internal addresses",
        ),
    ] {
        let err = read_error(&client, &format!("{}?start=0&end=10", track_uri(&url))).await;
        assert!(err.message.contains(needle), "{url}: {}", err.message);
        assert!(!err.message.contains("secret"), "{url}: {}", err.message);
    }
    assert_eq!(hits.get(), 0, "a refused upstream got a request");
}

#[cfg(unix)]
#[tokio::test]
async fn symlinks_out_of_the_library_are_refused_and_odd_names_play() {
    use std::os::unix::ffi::OsStrExt as _;
    let outside = tempfile::tempdir().unwrap();
    std::fs::copy(music_file(HORIZON), outside.path().join("secret.mp3")).unwrap();
    std::fs::write(outside.path().join("passwd"), "root:x:0:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path();
    std::fs::copy(music_file(HORIZON), lib.join("horizon.mp3")).unwrap();
    std::fs::copy(music_file(HORIZON), lib.join("new\nline.mp3")).unwrap();
    let odd = std::ffi::OsStr::from_bytes(b"caf\xe9 song.mp3");
    std::fs::copy(music_file(HORIZON), lib.join(odd)).unwrap();
    std::os::unix::fs::symlink(outside.path().join("passwd"), lib.join("pw.mp3")).unwrap();
    std::os::unix::fs::symlink(outside.path(), lib.join("elsewhere")).unwrap();
    std::os::unix::fs::symlink(lib.join("horizon.mp3"), lib.join("alias.mp3")).unwrap();
    let client = spawn_stdio(&["--library", lib.to_str().unwrap()]).await;
    let listed = client.list_resources(None).await.unwrap().resources;
    let names: Vec<String> = listed.iter().map(|r| r.name.clone()).collect();
    assert_eq!(listed.len(), 4, "{names:?}");
    for r in &listed {
        let encoded = r.uri.strip_prefix("audio://music/").unwrap();
        let url =
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, encoded)
                .unwrap();
        let url = String::from_utf8(url).unwrap();
        assert!(
            !url.contains("pw.mp3") && !url.contains("elsewhere"),
            "{url}"
        );
    }
    // Every listed track plays, the newline and non-UTF-8 names too.
    let file = std::fs::read(music_file(HORIZON)).unwrap();
    for r in &listed {
        let bytes = read_all(&client, &r.uri, 256 * 1024).await.unwrap();
        assert_eq!(sha256(&bytes), sha256(&file), "{}", r.name);
    }
    // Forged library URLs (the link out, a path above the library) name no track.
    for forged in [
        "library://local/pw.mp3",
        "library://local/elsewhere/secret.mp3",
        "library://local/%2E%2E/secret.mp3",
    ] {
        let err = read_error(&client, &format!("{}?start=0&end=10", track_uri(forged))).await;
        assert!(
            err.message.contains("no track"),
            "{forged}: {}",
            err.message
        );
    }
}

#[tokio::test]
async fn http_sessions_are_capped_and_the_longest_idle_is_closed_first() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("voxloop.toml");
    std::fs::write(&config, "[music]\nmax_sessions = 2\n").unwrap();
    let (_server, url) = spawn_http_server(&["--config", config.to_str().unwrap()]).await;
    let first = mcp_open_session(&url, None).await;
    let second = mcp_open_session(&url, None).await;
    // The first is used again, so the second is the longest idle when a third opens.
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {}});
    assert_eq!(mcp_post(&url, None, &first, &list).await.status(), 200);
    let third = mcp_open_session(&url, None).await;
    assert_eq!(mcp_post(&url, None, &first, &list).await.status(), 200);
    assert_eq!(mcp_post(&url, None, &third, &list).await.status(), 200);
    // The closed session is told so (404: start a new one, as the transport spec says).
    assert_eq!(mcp_post(&url, None, &second, &list).await.status(), 404);
}
