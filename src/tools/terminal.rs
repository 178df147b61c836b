//! Terminal rules (ARCHITECTURE §2): once every tool call of a round has returned, does the LLM speak
//! again, or does the turn stop here? A pure function of the round's outcomes.

use serde::Serialize;

/// What the rules need to know of one tool call's outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutcomeFacts {
    /// The call failed or the tool reported an error.
    pub failed: bool,
    /// It started media (audio, an audio resource link, an audio blob).
    pub media: bool,
    /// A structured response set `final_action`, `no_further_response` or `silence_llm`.
    pub stop_flag: bool,
    /// It asked to end the conversation (`exit_conversation`).
    pub exit: bool,
}

/// The decision after a round of tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "decision", content = "reason", rename_all = "snake_case")]
pub enum Decision {
    /// Call the LLM again with the tool messages.
    CallLlm(CallReason),
    /// The turn ends here.
    Stop(StopReason),
}

/// Why the LLM is called again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CallReason {
    /// Every call failed: the LLM hears the errors and can say what went wrong (rule 3).
    AllFailed,
    /// The tools returned text for it (rule 4), or media with `continue_after_media`.
    ToolResults,
}

/// Why the turn stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// A structured response set a stop flag (rule 1).
    Flagged,
    /// `exit_conversation`: the session ends once playback ends (rule 1).
    ExitConversation,
    /// Media started and is the answer (rule 2).
    Media,
    /// `max_tool_rounds` reached: the runtime speaks its fallback (rule 5).
    MaxRounds,
}

/// Applies the rules in order to the outcomes of round number `round` (1 for the first).
/// `max_rounds` is `max_tool_rounds`; `continue_after_media` is the config flag of rule 2.
/// An empty round (no calls) calls the LLM again, as a round of text would.
pub fn decide(
    round_outcomes: &[OutcomeFacts],
    round: u32,
    max_rounds: u32,
    continue_after_media: bool,
) -> Decision {
    if round_outcomes.iter().any(|o| o.exit) {
        return Decision::Stop(StopReason::ExitConversation);
    }
    if round_outcomes.iter().any(|o| o.stop_flag) {
        return Decision::Stop(StopReason::Flagged);
    }
    if round_outcomes.iter().any(|o| o.media) && !continue_after_media {
        return Decision::Stop(StopReason::Media);
    }
    if round >= max_rounds {
        return Decision::Stop(StopReason::MaxRounds);
    }
    let all_failed = !round_outcomes.is_empty() && round_outcomes.iter().all(|o| o.failed);
    Decision::CallLlm(if all_failed {
        CallReason::AllFailed
    } else {
        CallReason::ToolResults
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: OutcomeFacts = OutcomeFacts {
        failed: false,
        media: false,
        stop_flag: false,
        exit: false,
    };
    const FAILED: OutcomeFacts = OutcomeFacts {
        failed: true,
        ..TEXT
    };
    const MEDIA: OutcomeFacts = OutcomeFacts {
        media: true,
        ..TEXT
    };
    const FLAGGED: OutcomeFacts = OutcomeFacts {
        stop_flag: true,
        ..TEXT
    };
    const EXIT: OutcomeFacts = OutcomeFacts {
        exit: true,
        stop_flag: true,
        ..TEXT
    };

    fn d(outcomes: &[OutcomeFacts]) -> Decision {
        decide(outcomes, 1, 5, false)
    }

    #[test]
    fn rule_1_flags_and_exit_stop_the_llm() {
        assert_eq!(d(&[TEXT, FLAGGED]), Decision::Stop(StopReason::Flagged));
        assert_eq!(d(&[FLAGGED, MEDIA]), Decision::Stop(StopReason::Flagged));
        assert_eq!(
            d(&[MEDIA, EXIT]),
            Decision::Stop(StopReason::ExitConversation)
        );
        // Flags win over continue_after_media and over the round count.
        assert_eq!(
            decide(&[FLAGGED, MEDIA], 5, 5, true),
            Decision::Stop(StopReason::Flagged)
        );
    }

    #[test]
    fn rule_2_media_is_the_answer_unless_configured() {
        assert_eq!(d(&[MEDIA]), Decision::Stop(StopReason::Media));
        assert_eq!(d(&[TEXT, MEDIA, FAILED]), Decision::Stop(StopReason::Media));
        assert_eq!(
            decide(&[MEDIA], 1, 5, true),
            Decision::CallLlm(CallReason::ToolResults)
        );
    }

    #[test]
    fn rule_3_all_failed_calls_the_llm_with_the_errors() {
        assert_eq!(
            d(&[FAILED, FAILED]),
            Decision::CallLlm(CallReason::AllFailed)
        );
        assert_eq!(
            d(&[FAILED, TEXT]),
            Decision::CallLlm(CallReason::ToolResults)
        );
    }

    #[test]
    fn rule_4_text_results_go_back_to_the_llm() {
        assert_eq!(d(&[TEXT]), Decision::CallLlm(CallReason::ToolResults));
        assert_eq!(d(&[]), Decision::CallLlm(CallReason::ToolResults));
    }

    #[test]
    fn rule_5_max_rounds() {
        assert_eq!(
            decide(&[TEXT], 4, 5, false),
            Decision::CallLlm(CallReason::ToolResults)
        );
        assert_eq!(
            decide(&[TEXT], 5, 5, false),
            Decision::Stop(StopReason::MaxRounds)
        );
        assert_eq!(
            decide(&[FAILED], 5, 5, false),
            Decision::Stop(StopReason::MaxRounds)
        );
        // Media and flags keep their own reasons on the last round.
        assert_eq!(
            decide(&[MEDIA], 5, 5, false),
            Decision::Stop(StopReason::Media)
        );
    }
}
