//! `voxloop serve`: the REST bridge, the device server and the duplex co-host on one port set.

use std::path::PathBuf;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use super::announce;
use super::assistant::start_assistant;
use super::bind_tcp;
use voxloop::config::Config;

/// `voxloop serve`: the device server on `[device] bind` and the HTTP API (`/mcp`, the REST
/// bridge, `/metrics`, `/health`, `/ready`) on `[server] bind`, until Ctrl-C.
pub(crate) async fn run(config: Config) -> anyhow::Result<ExitCode> {
    use voxloop::api::Guard;
    use voxloop::conversation::assistant::Input;
    let assistant = start_assistant(&config, Input::Speech).await?;
    let duplex = if duplex_configured(&config) {
        let duplex = voxloop::duplex::service::Duplex::start(&config.duplex)?;
        Some(voxloop::duplex::mcp::DuplexMcp::new(duplex).cohost())
    } else {
        None
    };
    let device_listener = bind_tcp(&config.device.bind).await?;
    let api_listener = bind_tcp(&config.server.bind).await?;
    let api_addr = api_listener.local_addr()?.to_string();
    let guard = Guard::new(&config.auth, &config.server, &api_addr, "api")?;
    let mut breakers = vec![assistant.tts.breaker().clone()];
    breakers.extend(assistant.llm.breaker().cloned());
    let device_addr = device_listener.local_addr()?;
    let page = voxloop::api::web::WebPage {
        device_port: device_addr.port(),
        device_path: config.device.path.clone(),
    };
    let runtime = voxloop::api::server::Runtime::new(
        assistant.hub.clone(),
        duplex,
        guard,
        &config.server,
        voxloop::api::server::Checks {
            ready_timeout: std::time::Duration::from_millis(config.tools.start_timeout_ms),
            breakers,
            models: required_models(&config),
        },
        Some(page),
    );
    announce(&format!(
        "device server: ws://{device_addr}{}",
        config.device.path
    ));
    announce(&format!(
        "OTA: http://{device_addr}{}",
        config.device.ota_path
    ));
    announce(&format!(
        "HTTP API: http://{api_addr} (/mcp, /v1/mcp/tools, /metrics, /ready)"
    ));
    announce(&format!(
        "browser page: http://{api_addr}/ (press Talk; off loopback add ?access_token=KEY)"
    ));
    if config.device.activation {
        announce(&format!(
            "new devices show an activation code: approve it with `voxloop devices approve CODE` (store: {})",
            voxloop::device::server::device_store(&config.device)
                .path()
                .display()
        ));
    }
    let stop = CancellationToken::new();
    let shutdown = |token: CancellationToken| async move { token.cancelled().await };
    let device = voxloop::device::server::serve(
        device_listener,
        &config,
        Some(assistant),
        shutdown(stop.clone()),
    );
    let api = voxloop::api::server::serve(api_listener, runtime, shutdown(stop.clone()));
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    };
    let (device, api, ()) = tokio::join!(device, api, ctrl_c);
    device?;
    api?;
    Ok(ExitCode::SUCCESS)
}

/// Whether a PersonaPlex model directory is configured (`[duplex] model_dir` or
/// `PERSONAPLEX_MODEL_DIR`): then `voxloop serve` offers the duplex tools.
pub(crate) fn duplex_configured(config: &Config) -> bool {
    config.duplex.model_dir.is_some() || std::env::var_os("PERSONAPLEX_MODEL_DIR").is_some()
}

/// The model files `/ready` requires: the ASR model, and the local LLM when it is the one.
pub(crate) fn required_models(config: &Config) -> Vec<(String, PathBuf)> {
    let whisper = voxloop::models::spec("whisper-base").expect("known model");
    let mut models = vec![(
        "asr".to_string(),
        config
            .asr
            .model
            .clone()
            .unwrap_or_else(|| voxloop::models::model_path(whisper)),
    )];
    if config.llm.provider == voxloop::llm::config::LlmProvider::Local {
        models.push(("llm".into(), config.llm.local_model_path()));
    }
    models
}
