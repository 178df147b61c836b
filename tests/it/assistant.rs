//! The default assistant on the real Qwen2.5-0.5B model (issue 20): its tokenizer, a handful of
//! everyday requests through whole turns (tool and arguments, or words; not timed) with the
//! bundled music server, and bad input: a ten-minute ramble and a language the model lacks get
//! a short spoken answer.
//!
//! The model must be present (`voxloop models fetch`; scripts/test fetches it once).

use crate::common;

use std::sync::{Arc, OnceLock};

use common::*;
use tokio_util::sync::CancellationToken;
use voxloop::audio::queue::{PlaybackQueue, QueueSettings};
use voxloop::audio::sink::{NullSink, Sink};
use voxloop::config::Config;
use voxloop::conversation::{Conversation, ConversationSettings, Handler, TurnEnd, TurnReport};
use voxloop::llm::ChatModel;
use voxloop::llm::config::LlmConfig;
use voxloop::llm::local::{ChatFormat, LocalModel};
use voxloop::speech::tts::Tts;
use voxloop::tools::config::McpServerConfig;
use voxloop::tools::hub::ToolHub;

/// One loaded model for all tests (its warm-up state is shared too).
fn model() -> &'static LocalModel {
    static MODEL: OnceLock<LocalModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let config = LlmConfig {
            timeout_ms: TEST_LLM_TIMEOUT_MS,
            ..LlmConfig::default()
        };
        LocalModel::load(&model_file("qwen2.5-0.5b"), &config).unwrap()
    })
}

fn config() -> Config {
    let mut config = Config::default();
    let music = McpServerConfig {
        command: Some(music_server_bin().display().to_string()),
        cwd: Some(repo_root()),
        ..McpServerConfig::default()
    };
    config.mcp_servers.insert("music".into(), music);
    config
}

/// Runs each request in a fresh conversation on the default settings; the reports in order.
async fn turns(requests: &[&str]) -> Vec<TurnReport> {
    let config = config();
    let hub = Arc::new(ToolHub::start(config.hub()).await);
    let llm = ChatModel::Local(model().clone());
    let mut reports = Vec::new();
    for (i, request) in requests.iter().enumerate() {
        let queue = PlaybackQueue::new(
            Sink::Null(NullSink::new(24_000, 1, false)),
            QueueSettings::from_config(&config.audio),
        );
        let mut conversation = Conversation::new(
            llm.clone(),
            hub.clone(),
            Tts::new(&config.tts),
            queue,
            ConversationSettings::new(&config.llm, &config.tools),
        );
        if i == 0 {
            conversation.warm_up().await;
        }
        reports.push(conversation.turn(request, &CancellationToken::new()).await);
    }
    reports
}

/// With the intents on, the local model is offered no `exit_conversation` (the intents hear
/// goodbyes; the model's exits were mostly false); with them off it is.
#[tokio::test(flavor = "multi_thread")]
async fn the_local_model_may_end_the_session_only_without_the_intents() {
    let _slot = chat_model_slot().await;
    for intents in [true, false] {
        let mut config = config();
        config.llm.builtin_intents = intents;
        let conversation = Conversation::new(
            ChatModel::Local(model().clone()),
            Arc::new(ToolHub::start(config.hub()).await),
            Tts::new(&config.tts),
            PlaybackQueue::new(
                Sink::Null(NullSink::new(24_000, 1, false)),
                QueueSettings::from_config(&config.audio),
            ),
            ConversationSettings::new(&config.llm, &config.tools),
        );
        let names: Vec<String> = conversation
            .function_tools()
            .iter()
            .map(|t| t["function"]["name"].as_str().unwrap().to_string())
            .collect();
        assert!(names.contains(&"musicPlayer".to_string()), "{names:?}");
        assert!(names.contains(&"stop_playback".to_string()), "{names:?}");
        assert_eq!(
            names.contains(&"exit_conversation".to_string()),
            !intents,
            "{names:?}"
        );
    }
}

fn playing(report: &TurnReport) -> Option<String> {
    report.tools.iter().find_map(|t| {
        let start = t.result.find("Playing \"")? + "Playing \"".len();
        let end = t.result[start..].find('"')? + start;
        Some(t.result[start..end].to_string())
    })
}

#[test]
fn qwen_is_loaded_with_its_own_tokenizer_and_chat_format() {
    let _slot = chat_model_slot_blocking();
    let model = model();
    assert_eq!(model.format(), ChatFormat::Qwen);
    let text = "<|im_start|>user\n<tool_call>\nPlay track 42, héllo!<|im_end|>\n";
    let ids = model.tokenize(text).unwrap();
    assert_eq!(ids[0], model.token_id("<|im_start|>").unwrap());
    // Qwen's added tokens stay whole, digits are one token each, and the text comes back.
    let tag = model.token_id("<tool_call>").unwrap();
    assert!(ids.contains(&tag), "{ids:?}");
    assert_eq!(model.tokenize("42").unwrap().len(), 2);
    assert_eq!(model.detokenize(&ids).unwrap(), text);
}

#[tokio::test(flavor = "multi_thread")]
async fn everyday_requests_get_the_right_tool_or_words() {
    let _slot = chat_model_slot().await;
    let reports = turns(&[
        "Play the song just over the horizon.",
        "I would like to hear torus trooper.",
        "What is the capital of France?",
        "Hello, how are you?",
        "Set the volume to forty percent.",
        "播放音乐",
        "What is two plus two?",
    ])
    .await;
    let line = |r: &TurnReport| format!("{r:?}");
    assert_eq!(
        playing(&reports[0]).as_deref(),
        Some("Tumiki Just Over The Horizon"),
        "{}",
        line(&reports[0])
    );
    assert_eq!(reports[0].tools[0].name, "musicPlayer");
    assert_eq!(reports[0].handled_by, Handler::Model);
    assert_eq!(
        playing(&reports[1]).as_deref(),
        Some("Torus Trooper Tt1"),
        "{}",
        line(&reports[1])
    );
    assert!(reports[2].tools.is_empty(), "{}", line(&reports[2]));
    assert!(reports[2].said.contains("Paris"), "{}", line(&reports[2]));
    assert!(reports[3].tools.is_empty(), "{}", line(&reports[3]));
    assert!(!reports[3].said.is_empty(), "{}", line(&reports[3]));
    assert_eq!(reports[4].handled_by, Handler::Intent);
    assert_eq!(reports[4].tools[0].arguments["volume"], 40);
    // A Chinese request for music plays something.
    assert!(playing(&reports[5]).is_some(), "{}", line(&reports[5]));
    // Qwen2.5-0.5B called exit_conversation here, ending the session; the intents hear
    // goodbyes, so the local model is not offered it.
    assert!(
        !reports[6]
            .tools
            .iter()
            .any(|t| t.name == "exit_conversation"),
        "{}",
        line(&reports[6])
    );
    assert_ne!(
        reports[6].end,
        TurnEnd::Stopped(voxloop::tools::terminal::StopReason::ExitConversation),
        "{}",
        line(&reports[6])
    );
    for report in &reports {
        assert!(
            report.said.split_whitespace().count() <= 60,
            "{}",
            line(report)
        );
        assert!(
            !report.said.contains(['<', '{', '*', '`']),
            "{}",
            line(report)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ramble_and_an_unknown_language_get_a_short_answer() {
    let _slot = chat_model_slot().await;
    // About ten minutes of speech (1,500 words); the model sees its last 1,000 characters.
    let ramble =
        "so then I went to the market and I saw a dog and the dog was barking at a cat ".repeat(80);
    let reports = turns(&[
        ramble.as_str(),
        "Ninaomba unieleze hali ya hewa ya kesho huko Nairobi.",
    ])
    .await;
    for report in &reports {
        assert!(
            matches!(report.end, TurnEnd::Answered | TurnEnd::Stopped(_)),
            "{report:?}"
        );
        assert!(report.said.split_whitespace().count() <= 60, "{report:?}");
        assert!(
            !report.said.is_empty() || !report.tools.is_empty(),
            "{report:?}"
        );
    }
}
