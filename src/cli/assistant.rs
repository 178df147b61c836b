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
use voxloop::conversation::assistant::{Assistant, Input};
use voxloop::conversation::turns::{Job, TurnObserver, Turns};
use voxloop::conversation::{Conversation, TurnReport};

/// Starts the assistant ([`Assistant::start`]); the MCP servers that failed to start are named
/// on stderr.
pub(crate) async fn start_assistant(config: &Config, input: Input) -> anyhow::Result<Assistant> {
    let assistant = Assistant::start(config, input).await?;
    for failure in assistant.hub.startup_failures() {
        eprintln!("MCP server {} skipped: {}", failure.server, failure.error);
    }
    Ok(assistant)
}

/// A conversation of `assistant` playing into `output` or the speaker, its model warmed up.
async fn open_conversation(
    assistant: &Assistant,
    output: Option<&Path>,
) -> anyhow::Result<Conversation> {
    let config = &assistant.config;
    let conversation = assistant.conversation(queue_for(config, open_sink(config, output)?));
    conversation.warm_up().await;
    Ok(conversation)
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
    let assistant = start_assistant(config, Input::Text).await?;
    let mut conversation = open_conversation(&assistant, output).await?;
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
    tokio::sync::mpsc::Receiver<voxloop::audio::Pcm>,
    Option<voxloop::audio::input::Microphone>,
)> {
    match input {
        Some(path) => {
            let mut decoded = voxloop::audio::source::open(&path.to_string_lossy()).await?;
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
            let (microphone, rx) = voxloop::audio::input::Microphone::open()?;
            let limit = seconds
                .map(|s| format!(" for {s} s"))
                .unwrap_or_else(|| " (Ctrl-C ends)".into());
            eprintln!("listening on the microphone{limit}");
            Ok((rx, Some(microphone)))
        }
    }
}

/// `voxloop run`'s side of each turn: the report printed; a turn that asks to exit (a goodbye)
/// ends the run.
struct Printer {
    json: bool,
    /// After each turn: whether it asked to exit.
    done: tokio::sync::mpsc::Sender<bool>,
}

impl TurnObserver for Printer {
    async fn started(&mut self, _job: &Job) -> bool {
        true
    }

    async fn finished(
        &mut self,
        conversation: &Conversation,
        report: Option<TurnReport>,
        _cancel: &CancellationToken,
    ) -> bool {
        if let Some(report) = report {
            print_turn(&report, self.json);
        }
        let exit = conversation.exit_requested();
        let _ = self.done.send(exit).await;
        !exit
    }
}

pub(crate) async fn run(
    config: &Config,
    input: Option<&Path>,
    output: Option<&Path>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use voxloop::audio::queue::StopReason as QueueStop;
    use voxloop::conversation::voice::{Output, VoiceInput, transcribe};
    let assistant = start_assistant(config, Input::Speech).await?;
    let asr = assistant
        .asr
        .clone()
        .context("the assistant was started without ASR")?;
    let conversation = open_conversation(&assistant, output).await?;
    let prompt = conversation.asr_prompt(&config.asr).await;
    let (mut blocks, _microphone) = speech_source(input, None).await?;
    let mut voice = VoiceInput::new(&config.vad);
    let queue = conversation.queue().clone();
    let from_microphone = input.is_none();

    // Turns run on their own task, so that the microphone is heard while the model thinks, a
    // tool runs or a reply plays: speech then cancels the turn (barge-in).
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<bool>(4);
    let mut turns = Turns::start(
        conversation,
        Printer {
            json,
            done: done_tx,
        },
    );
    'blocks: loop {
        let block = tokio::select! {
            block = blocks.recv() => block,
            Some(true) = done_rx.recv() => break 'blocks,
            _ = tokio::signal::ctrl_c() => None,
        };
        let ended = block.is_none();
        // From a microphone, speech over the assistant (thinking, calling a tool, or playing)
        // interrupts it.
        let output = from_microphone.then(|| Output {
            busy: queue.is_busy() || turns.is_running(),
            level: queue.output_level(),
        });
        let utterances = match block {
            Some(pcm) => {
                let heard = voice.push(&pcm, output)?;
                if heard.barge_in {
                    // The reply stops; music is held until the request is known.
                    turns.cancel();
                    queue.interrupt(QueueStop::BargeIn).await;
                }
                heard.utterances
            }
            None => voice.finish(),
        };
        for utterance in utterances {
            let (transcript, asr_ms) =
                transcribe(asr.clone(), utterance.pcm, prompt.clone()).await?;
            if transcript.text.is_empty() {
                // Not words: music that speech over it held goes on.
                if queue.has_held() && !turns.submit(Job::Resume).await {
                    break 'blocks;
                }
                continue;
            }
            // A new request supersedes a turn still running.
            let job = Job::Turn {
                text: transcript.text,
                asr_ms: Some(asr_ms),
            };
            if !turns.submit(job).await {
                break 'blocks;
            }
            // A file's utterances are turns one after another.
            if !from_microphone && done_rx.recv().await != Some(false) {
                break 'blocks;
            }
        }
        if ended {
            break;
        }
    }
    let conversation = turns.finish().await?;
    finish_playback(conversation.queue().clone(), None, output, false).await
}

pub(crate) async fn listen(
    config: &Config,
    input: Option<&Path>,
    seconds: Option<f64>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use voxloop::conversation::voice::{VoiceInput, transcribe};
    use voxloop::speech::asr::Asr;
    let asr = std::sync::Arc::new(Asr::load(&config.asr)?);
    // Blocks of PCM: from the file as fast as it decodes, or from the microphone.
    let (mut blocks, _microphone) = speech_source(input, seconds).await?;
    let mut voice = VoiceInput::new(&config.vad);
    // Seconds of audio heard, for `--seconds`.
    let mut heard_s = 0.0;
    loop {
        let block = tokio::select! {
            block = blocks.recv() => block,
            _ = tokio::signal::ctrl_c() => None,
        };
        let ended = block.is_none();
        let utterances = match &block {
            Some(pcm) => {
                heard_s += pcm.frames() as f64 / f64::from(pcm.rate.max(1));
                voice.push(pcm, None)?.utterances
            }
            None => voice.finish(),
        };
        let done = ended || seconds.is_some_and(|limit| heard_s >= limit);
        for utterance in utterances {
            let (start_ms, end_ms) = (utterance.start_ms, utterance.end_ms);
            let (transcript, _) = transcribe(asr.clone(), utterance.pcm, None).await?;
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
        if done {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}
