//! The turn task (ARCHITECTURE §1, "One turn"): a conversation's turns run one at a time on a
//! task of their own, so that speech is still heard while the model thinks, a tool runs or a
//! reply plays. A new request supersedes the running turn (its cancellation token fires: the
//! model's stream, the tool calls and the pagers stop), and speech over the reply cancels it
//! (barge-in). `voxloop run` and every device session use this one piece; what each does around
//! a turn (print the report, tell a device `tts start` and `stop`) is its [`TurnObserver`].

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Conversation, TurnReport};

/// Jobs waiting behind the running one; a sender waits when they are this many.
const QUEUED_JOBS: usize = 4;

/// What the turn task does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Job {
    /// A turn on the user's words; `asr_ms` is whisper's time when they were spoken.
    Turn {
        /// The transcript or the typed text.
        text: String,
        /// Time ASR took, in ms, for the report.
        asr_ms: Option<u64>,
    },
    /// Speak this text (a device's activation message): no model, no tools.
    Say(String),
    /// Tell the speaker the assistant is busy ([`crate::compute::BUSY_SENTENCE`], from the
    /// TTS's rendered clip): a stage refused their words.
    Busy,
    /// Speech over the output held the music ([`crate::audio::queue::PlaybackQueue::interrupt`])
    /// but brought no words: the music goes on.
    Resume,
}

/// What a surface does around each job, on the turn task.
pub trait TurnObserver: Send + 'static {
    /// Once, on the task, before the first job: what must happen before turns (a device's
    /// tools listed and offered, whisper's vocabulary prompt, the model warmed up) without
    /// holding up the surface, which goes on reading its input meanwhile.
    fn prepare(&mut self, conversation: &mut Conversation) -> impl Future<Output = ()> + Send {
        let _ = conversation;
        async {}
    }

    /// Before `job` runs. `false` ends the task (the surface has gone: a closed socket).
    fn started(&mut self, job: &Job) -> impl Future<Output = bool> + Send;

    /// After `job` ran (`report` is `None` for [`Job::Say`], [`Job::Busy`] and [`Job::Resume`]); `cancel` is the job's token,
    /// fired if it was superseded or interrupted. `false` ends the task (the conversation
    /// asked to exit, the surface has gone).
    fn finished(
        &mut self,
        conversation: &Conversation,
        report: Option<TurnReport>,
        cancel: &CancellationToken,
    ) -> impl Future<Output = bool> + Send;
}

/// A conversation's turn task and the token of the job it runs. Dropping it aborts the task
/// (the surface has gone: a device that left stops its warm-up, its queued jobs and its
/// turn); [`Turns::finish`] lets the queued jobs run instead.
pub struct Turns {
    tx: mpsc::Sender<(Job, CancellationToken)>,
    current: CancellationToken,
    /// Jobs submitted and not yet finished.
    pending: Arc<AtomicUsize>,
    /// `None` once [`Turns::finish`] took it.
    task: Option<JoinHandle<Conversation>>,
}

impl Drop for Turns {
    fn drop(&mut self) {
        self.current.cancel();
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl Turns {
    /// Starts the task that runs `conversation`'s jobs in order, with `observer` around each.
    pub fn start(mut conversation: Conversation, mut observer: impl TurnObserver) -> Turns {
        let (tx, mut rx) = mpsc::channel::<(Job, CancellationToken)>(QUEUED_JOBS);
        let pending = Arc::new(AtomicUsize::new(0));
        let done = pending.clone();
        let task = tokio::spawn(async move {
            observer.prepare(&mut conversation).await;
            while let Some((job, cancel)) = rx.recv().await {
                if !observer.started(&job).await {
                    break;
                }
                let report = match job {
                    Job::Turn { text, asr_ms } => {
                        let mut report = conversation.turn(&text, &cancel).await;
                        report.asr_ms = asr_ms;
                        Some(report)
                    }
                    Job::Say(text) => {
                        conversation.say(&text).await;
                        None
                    }
                    Job::Busy => {
                        conversation.tell_busy().await;
                        None
                    }
                    Job::Resume => {
                        conversation.resume_media().await;
                        None
                    }
                };
                done.fetch_sub(1, Ordering::SeqCst);
                if !observer.finished(&conversation, report, &cancel).await {
                    break;
                }
            }
            conversation
        });
        Turns {
            tx,
            current: CancellationToken::new(),
            pending,
            task: Some(task),
        }
    }

    /// Runs `job` next, superseding the running one (its token fires). `false` when the task
    /// has ended.
    pub async fn submit(&mut self, job: Job) -> bool {
        self.cancel();
        self.current = CancellationToken::new();
        self.pending.fetch_add(1, Ordering::SeqCst);
        let sent = self.tx.send((job, self.current.clone())).await.is_ok();
        if !sent {
            self.pending.fetch_sub(1, Ordering::SeqCst);
        }
        sent
    }

    /// Cancels the running job (barge-in, `abort`, a stop command).
    pub fn cancel(&self) {
        self.current.cancel();
    }

    /// Whether a submitted job has not finished yet: the assistant is thinking, calling a tool
    /// or speaking, and speech over it is a barge-in.
    pub fn is_running(&self) -> bool {
        self.pending.load(Ordering::SeqCst) > 0
    }

    /// Lets the queued jobs run, then gives the conversation back (for its playback queue).
    ///
    /// # Errors
    /// The task's panic, as a [`tokio::task::JoinError`].
    pub async fn finish(mut self) -> Result<Conversation, tokio::task::JoinError> {
        let task = self.task.take().expect("taken only here");
        // The task ends after the queued jobs once no sender is left: swap in a sender of a
        // channel nobody reads, and drop the real one with `self`.
        self.tx = mpsc::channel(1).0;
        // And the running job goes on: the token dropped with `self` is a fresh one.
        self.current = CancellationToken::new();
        drop(self);
        task.await
    }
}
