//! `voxloop run`, `listen` and `chat`: the assistant, from a microphone, a file or typed text.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::audio::finish_playback;
use super::audio::open_sink;
use super::audio::queue_for;
use voxloop::config::Config;
use voxloop::conversation::{Conversation, ConversationSettings, TurnReport};
use voxloop::pipeline::tts::Tts;
use voxloop::tools::hub::ToolHub;

/// The assistant's parts: the tool hub (servers started), TTS, the playback queue into `output`
/// or the speaker, and the chat model.
pub(crate) async fn assistant(
    config: &Config,
    output: Option<&Path>,
) -> anyhow::Result<Conversation> {
    let queue = queue_for(config, open_sink(config, output)?);
    let (hub, llm) = tools_and_model(config).await?;
    let tts = Tts::new(&config.tts).with_breaker(&config.breaker);
    tts.check().await.context("[tts]")?;
    let conversation = Conversation::new(
        llm,
        hub,
        tts,
        queue,
        ConversationSettings::from_config(config),
    );
    conversation.warm_up().await;
    Ok(conversation)
}

/// The tool hub (servers started; those that failed are named on stderr) and the chat model.
pub(crate) async fn tools_and_model(
    config: &Config,
) -> anyhow::Result<(std::sync::Arc<ToolHub>, voxloop::llm::ChatModel)> {
    let hub = std::sync::Arc::new(ToolHub::start(config).await);
    for failure in hub.startup_failures() {
        eprintln!("MCP server {} skipped: {}", failure.server, failure.error);
    }
    let llm = voxloop::llm::ChatModel::from_config(&config.llm)?.with_breaker(&config.breaker);
    tracing::info!(model = %llm.describe(), "chat model ready");
    Ok((hub, llm))
}

/// Prints a turn as it happened: what was heard, the tool calls, what was said, and timings;
/// with `json`, as one JSON object on one line.
pub(crate) fn print_turn(report: &TurnReport, json: bool) {
    if json {
        match serde_json::to_string(report) {
            Ok(line) => println!("{line}"),
            Err(e) => eprintln!("turn report: {e}"),
        }
        return;
    }
    let asr_ms = report.asr_ms;
    println!("heard: {}", report.heard);
    for tool in &report.tools {
        let status = if tool.is_error { "error" } else { "ok" };
        println!(
            "  tool {}({}) [{}, {status}]: {}",
            tool.name,
            tool.arguments,
            tool.server,
            tool.result.replace('\n', " ")
        );
    }
    if !report.said.is_empty() {
        println!("said: {}", report.said);
    }
    let ms = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{v} ms"));
    println!(
        "  end: {:?}; timings: ASR {}, first LLM token {}, first audio {}, turn {} ms",
        report.end,
        ms(asr_ms),
        ms(report.first_token_ms),
        ms(report.first_audio_ms),
        report.total_ms
    );
}

pub(crate) async fn chat(
    config: &Config,
    text: Option<&str>,
    output: Option<&Path>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut conversation = assistant(config, output).await?;
    let lines: Vec<String> = match text {
        Some(text) => vec![text.to_string()],
        None => std::io::stdin().lines().collect::<Result<_, _>>()?,
    };
    for line in lines.iter().map(|l| l.trim()).filter(|l| !l.is_empty()) {
        let report = conversation.turn(line, &CancellationToken::new()).await;
        print_turn(&report, json);
        if conversation.exit_requested() {
            break;
        }
    }
    finish_playback(conversation.queue().clone(), None, output, false).await
}

/// Blocks of speech: from `input` (a file, decoded as fast as it reads) or from the microphone
/// (kept open while the returned handle lives).
pub(crate) async fn speech_source(
    input: Option<&Path>,
    seconds: Option<f64>,
) -> anyhow::Result<(
    tokio::sync::mpsc::Receiver<voxloop::pipeline::Pcm>,
    Option<voxloop::pipeline::input::Microphone>,
)> {
    match input {
        Some(path) => {
            let mut decoded = voxloop::pipeline::source::open(&path.to_string_lossy()).await?;
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            tokio::spawn(async move {
                while let Some(Ok(pcm)) = decoded.recv().await {
                    if tx.send(pcm).await.is_err() {
                        break;
                    }
                }
            });
            Ok((rx, None))
        }
        None => {
            let (microphone, rx) = voxloop::pipeline::input::Microphone::open()?;
            let limit = seconds
                .map(|s| format!(" for {s} s"))
                .unwrap_or_else(|| " (Ctrl-C ends)".into());
            eprintln!("listening on the microphone{limit}");
            Ok((rx, Some(microphone)))
        }
    }
}

pub(crate) async fn run(
    config: &Config,
    input: Option<&Path>,
    output: Option<&Path>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use voxloop::pipeline::asr::Asr;
    use voxloop::pipeline::input::SpeechInput;
    use voxloop::pipeline::queue::StopReason as QueueStop;
    use voxloop::pipeline::vad::{BargeIn, TurnDetector, TurnEvent};
    let asr = Arc::new(Asr::load(&config.asr)?);
    let mut conversation = assistant(config, output).await?;
    let prompt = conversation.asr_prompt(&config.asr).await;
    let (mut blocks, _microphone) = speech_source(input, None).await?;
    let mut speech = SpeechInput::default();
    let mut turns = TurnDetector::new(&config.vad);
    let mut barge = BargeIn::new(&config.vad);
    let queue = conversation.queue().clone();
    let from_microphone = input.is_none();

    // Turns run on their own task, so that the microphone is heard while the model thinks, a
    // tool runs or a reply plays: speech then cancels the turn (barge-in).
    let (turn_tx, mut turn_rx) = tokio::sync::mpsc::channel::<(String, u64, CancellationToken)>(4);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<bool>(4);
    let turn_running = Arc::new(AtomicBool::new(false));
    let running = turn_running.clone();
    let turn_task = tokio::spawn(async move {
        while let Some((text, asr_ms, cancel)) = turn_rx.recv().await {
            let mut report = conversation.turn(&text, &cancel).await;
            report.asr_ms = Some(asr_ms);
            running.store(false, Ordering::SeqCst);
            print_turn(&report, json);
            let exit = conversation.exit_requested();
            let _ = done_tx.send(exit).await;
            if exit {
                break;
            }
        }
        conversation
    });
    let mut current_turn = CancellationToken::new();
    'blocks: loop {
        let block = tokio::select! {
            block = blocks.recv() => block,
            Some(true) = done_rx.recv() => break 'blocks,
            _ = tokio::signal::ctrl_c() => None,
        };
        let ended = block.is_none();
        let (mut events, frames) = match block {
            Some(pcm) => turns.push(&speech.push(&pcm)?),
            None => turns.push(&speech.finish()),
        };
        if ended {
            events.extend(turns.finish());
        }
        // From a microphone, speech over the assistant (thinking, calling a tool, or playing)
        // interrupts it.
        if from_microphone {
            for frame in &frames {
                let busy = queue.is_busy() || turn_running.load(Ordering::SeqCst);
                if barge.on_frame(frame, busy, queue.output_level()) {
                    current_turn.cancel();
                    queue.stop(QueueStop::BargeIn).await;
                }
            }
        }
        for event in events {
            if let TurnEvent::Utterance { pcm, .. } = event {
                let started = std::time::Instant::now();
                let asr = asr.clone();
                let prompt = prompt.clone();
                let transcript = tokio::task::spawn_blocking(move || {
                    asr.transcribe_with_prompt(&pcm, prompt.as_deref())
                })
                .await??;
                let asr_ms = started.elapsed().as_millis() as u64;
                if transcript.text.is_empty() {
                    continue;
                }
                // A new request supersedes a turn still running.
                current_turn.cancel();
                current_turn = CancellationToken::new();
                turn_running.store(true, Ordering::SeqCst);
                if turn_tx
                    .send((transcript.text, asr_ms, current_turn.clone()))
                    .await
                    .is_err()
                {
                    break 'blocks;
                }
                // A file's utterances are turns one after another.
                if !from_microphone && done_rx.recv().await != Some(false) {
                    break 'blocks;
                }
            }
        }
        if ended {
            break;
        }
    }
    drop(turn_tx);
    let conversation = turn_task.await?;
    finish_playback(conversation.queue().clone(), None, output, false).await
}

pub(crate) async fn listen(
    config: &Config,
    input: Option<&Path>,
    seconds: Option<f64>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use voxloop::pipeline::SPEECH_RATE;
    use voxloop::pipeline::asr::Asr;
    use voxloop::pipeline::input::SpeechInput;
    use voxloop::pipeline::vad::{TurnDetector, TurnEvent};
    let asr = std::sync::Arc::new(Asr::load(&config.asr)?);
    // Blocks of PCM: from the file as fast as it decodes, or from the microphone.
    let (mut blocks, _microphone) = speech_source(input, seconds).await?;
    let limit = seconds.map(|s| (s * f64::from(SPEECH_RATE)) as usize);
    let mut speech = SpeechInput::default();
    let mut turns = TurnDetector::new(&config.vad);
    let mut heard = 0usize;
    let mut pending = Vec::new();
    loop {
        let block = tokio::select! {
            block = blocks.recv() => block,
            _ = tokio::signal::ctrl_c() => None,
        };
        let ended = block.is_none();
        let events = match block {
            Some(pcm) => {
                let samples = speech.push(&pcm)?;
                heard += samples.len();
                turns.push(&samples).0
            }
            None => {
                let rest = speech.finish();
                let mut events = turns.push(&rest).0;
                events.extend(turns.finish());
                events
            }
        };
        let done = ended || limit.is_some_and(|l| heard >= l);
        pending.extend(events);
        for event in pending.drain(..) {
            if let TurnEvent::Utterance {
                pcm,
                start_ms,
                end_ms,
            } = event
            {
                let asr = asr.clone();
                let transcript =
                    tokio::task::spawn_blocking(move || asr.transcribe(&pcm)).await??;
                if json {
                    let line = json!({"start_ms": start_ms, "end_ms": end_ms, "text": transcript.text, "language": transcript.language});
                    println!("{line}");
                } else {
                    println!(
                        "[{:.2}-{:.2} s] {}",
                        start_ms as f64 / 1000.0,
                        end_ms as f64 / 1000.0,
                        transcript.text
                    );
                }
            }
        }
        if done {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}
