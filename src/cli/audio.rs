//! `voxloop play`, `say` and `transcribe`: one part of the pipeline at a time, and the sinks.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use std::time::Duration;

use voxloop::audio::decode::decode_media;
use voxloop::audio::queue::{PlaybackQueue, QueueEvent, QueueSettings, SegmentKind, StopReason};
use voxloop::audio::sink::{Sink, SpeakerSink, WavSink};
use voxloop::config::Config;
use voxloop::speech::sentence::SentenceSplitter;
use voxloop::speech::tts::Tts;

pub(crate) fn transcribe(config: &Config, file: &Path, json: bool) -> anyhow::Result<ExitCode> {
    use voxloop::speech::SPEECH_RATE;
    use voxloop::speech::asr::Asr;
    // A file is any speech, not a request to the assistant: no default context prompt.
    let mut asr_config = config.asr.clone();
    asr_config.context_prompt.get_or_insert_with(String::new);
    let asr = Asr::load(&asr_config)?;
    let pcm = voxloop::audio::decode::decode_file(file, SPEECH_RATE)
        .with_context(|| format!("reading {}", file.display()))?;
    let started = std::time::Instant::now();
    let transcript = asr.transcribe(&pcm)?;
    tracing::info!(
        audio_s = pcm.len() as f64 / SPEECH_RATE as f64,
        asr_s = started.elapsed().as_secs_f64(),
        "transcribed"
    );
    if json {
        println!("{}", serde_json::to_string_pretty(&transcript)?);
    } else {
        println!("{}", transcript.text);
    }
    Ok(ExitCode::SUCCESS)
}

/// The WAV file at `output`, or the speaker.
pub(crate) fn open_sink(config: &Config, output: Option<&Path>) -> anyhow::Result<Sink> {
    let audio = &config.audio;
    Ok(match output {
        Some(path) => Sink::Wav(WavSink::create(
            path,
            audio.output_rate,
            audio.output_channels,
        )?),
        None => Sink::Speaker(SpeakerSink::open(Duration::from_millis(
            audio.speaker_buffer_ms.into(),
        ))?),
    })
}

pub(crate) fn queue_for(config: &Config, sink: Sink) -> PlaybackQueue {
    PlaybackQueue::new(sink, QueueSettings::from_config(&config.audio))
}

/// Prints the queue's events until it stops; returns whether any segment failed.
pub(crate) async fn report_events(
    mut events: tokio::sync::broadcast::Receiver<QueueEvent>,
) -> bool {
    let mut failed = false;
    while let Ok(event) = events.recv().await {
        match &event {
            QueueEvent::SegmentStart {
                segment: SegmentKind::Sentence { text },
                ..
            } => println!("speaking: {text}"),
            QueueEvent::SegmentStart {
                segment: SegmentKind::Media { title },
                ..
            } => {
                println!("playing: {}", title.as_deref().unwrap_or("audio"));
            }
            QueueEvent::SegmentEnd {
                played_ms, error, ..
            } => {
                println!("  played {:.2} s", *played_ms as f64 / 1000.0);
                if let Some(error) = error {
                    eprintln!("  error: {error}");
                    failed = true;
                }
            }
            QueueEvent::Held { played_ms, .. } => {
                println!("  held at {:.2} s", *played_ms as f64 / 1000.0);
            }
            QueueEvent::Resumed { .. } => println!("  resumed"),
            QueueEvent::Stopped { reason } => {
                if *reason != StopReason::Finished {
                    eprintln!("stopped: {reason:?}");
                    failed = true;
                }
                return failed;
            }
        }
    }
    failed
}

pub(crate) async fn play(
    config: &Config,
    source: &str,
    output: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let queue = queue_for(config, open_sink(config, output)?);
    let events = tokio::spawn(report_events(queue.events()));
    let pcm = voxloop::audio::source::open(source).await?;
    let title = source.rsplit('/').next().map(String::from);
    queue.enqueue(SegmentKind::Media { title }, pcm).await;
    finish_playback(queue, Some(events), output, false).await
}

/// Waits for the queue to play out, reports the output file, and gives the exit code.
pub(crate) async fn finish_playback(
    queue: PlaybackQueue,
    events: Option<tokio::task::JoinHandle<bool>>,
    output: Option<&Path>,
    failed: bool,
) -> anyhow::Result<ExitCode> {
    queue.close().await;
    let failed = match events {
        Some(events) => failed | events.await.unwrap_or(true),
        None => failed,
    };
    if let Some(path) = output {
        // A note for the person, on stderr: with --json, stdout is one JSON object a turn.
        eprintln!("wrote {}", path.display());
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

pub(crate) async fn say(
    config: &Config,
    text: &str,
    output: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let queue = queue_for(config, open_sink(config, output)?);
    let events = tokio::spawn(report_events(queue.events()));
    let tts = Tts::new(&config.tts);
    tts.check().await.context("[tts]")?;
    let mut splitter = SentenceSplitter::default();
    let mut sentences = splitter.push(text);
    sentences.extend(splitter.finish());
    let mut failed = false;
    for sentence in sentences {
        match tts.synthesize(&sentence).await {
            Ok(media) => {
                queue
                    .enqueue(
                        SegmentKind::Sentence { text: sentence },
                        decode_media(media),
                    )
                    .await;
            }
            Err(e) => {
                // A failing sentence is skipped; the rest is still spoken.
                eprintln!("TTS failed for {sentence:?}: {e}");
                failed = true;
            }
        }
    }
    finish_playback(queue, Some(events), output, failed).await
}
