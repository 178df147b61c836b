//! Queues in front of the shared compute: ASR (whisper.cpp), the local chat model and local TTS
//! (Kokoro) each run at most `workers` jobs at once, however many sessions ask. Whisper and
//! Kokoro each use every core, so they share one worker ([`ComputeQueue::sharing`]): an
//! utterance and a sentence never run at once. The local model runs in llama.cpp's server, a
//! process of its own at a lower CPU priority (`[llm] engine_nice`), on its own workers. The others wait
//! in arrival order (tokio's semaphore is FIFO, so no session overtakes another) for at most
//! `max_wait`; past it the job is refused with [`Busy`], and the speaker hears that the
//! assistant is busy instead of waiting in silence. A waiting job holds no thread: only the
//! running ones do.
//!
//! Each queue reports its depth, its waits and its refusals in `/metrics`
//! (`voxloop_queue_waiting`, `voxloop_queue_wait_seconds`, `voxloop_queue_busy`, labelled by
//! `stage`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What the speaker hears when a stage stayed busy: said in place of the turn's reply, once
/// per turn. The TTS keeps it rendered ([`crate::speech::tts::Tts::busy_clip`]), so that it
/// can be said while the voice itself is busy.
pub const BUSY_SENTENCE: &str =
    "Sorry, I'm busy with other requests. Please say that again in a moment.";

/// A job waited `max_wait` and no worker came free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the {stage} queue is busy: no worker of {workers} came free within {waited_ms} ms")]
pub struct Busy {
    /// The queue's stage: `asr`, `llm` or `tts`.
    pub stage: &'static str,
    /// How many jobs the stage runs at once.
    pub workers: usize,
    /// How long the job waited, in ms.
    pub waited_ms: u64,
}

/// A bounded, ordered queue for one stage's workers; cheap to clone (clones share the workers).
#[derive(Debug, Clone)]
pub struct ComputeQueue {
    stage: &'static str,
    workers: usize,
    permits: Arc<Semaphore>,
    max_wait: Duration,
}

impl ComputeQueue {
    /// A queue for `stage` (a metric label: `asr`, `llm`, `tts`) running `workers` jobs at once
    /// (at least 1), where a job waits at most `max_wait_ms` ms (0: only a free worker will do).
    pub fn new(stage: &'static str, workers: usize, max_wait_ms: u64) -> Self {
        let workers = workers.max(1);
        Self {
            stage,
            workers,
            permits: Arc::new(Semaphore::new(workers)),
            max_wait: Duration::from_millis(max_wait_ms),
        }
    }

    /// Waits for a worker in arrival order, at most the queue's `max_wait`. The job runs while
    /// the returned permit is held; dropping it frees the worker. Dropping the future leaves
    /// the queue.
    ///
    /// # Errors
    /// [`Busy`] when no worker came free in time.
    pub async fn enter(&self) -> Result<OwnedSemaphorePermit, Busy> {
        let metrics = crate::metrics::get();
        let _waiting = metrics.queue_entered(self.stage);
        let started = Instant::now();
        let permit = tokio::time::timeout(self.max_wait, self.permits.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok);
        let waited = started.elapsed();
        metrics.queue_waited(self.stage, waited, permit.is_none());
        permit.ok_or(Busy {
            stage: self.stage,
            workers: self.workers,
            waited_ms: waited.as_millis() as u64,
        })
    }

    /// A queue for `stage` on the same workers as this one, with its own wait (`max_wait_ms`)
    /// and metric label: a job of either stage waits for a job of the other. For stages that
    /// each use every core (whisper and Kokoro), so that they never run at once and thrash.
    pub fn sharing(&self, stage: &'static str, max_wait_ms: u64) -> Self {
        Self {
            stage,
            workers: self.workers,
            permits: self.permits.clone(),
            max_wait: Duration::from_millis(max_wait_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_in_arrival_order_and_a_late_one_is_refused() {
        let queue = ComputeQueue::new("test_order", 1, 5_000);
        let first = queue.enter().await.expect("a free worker");
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut waiting = Vec::new();
        for i in 0..4 {
            let (queue, order) = (queue.clone(), order.clone());
            waiting.push(tokio::spawn(async move {
                let _permit = queue.enter().await.expect("in time");
                order.lock().unwrap().push(i);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }));
            // Each job enters before the next one is spawned.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(first);
        for job in waiting {
            job.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);

        let impatient = ComputeQueue::new("test_busy", 2, 50);
        let _a = impatient.enter().await.unwrap();
        let _b = impatient.enter().await.unwrap();
        let busy = impatient.enter().await.expect_err("both workers are taken");
        assert_eq!((busy.stage, busy.workers), ("test_busy", 2));
        assert!(busy.waited_ms >= 50, "{busy}");
        let metrics = crate::metrics::get().render();
        assert!(
            metrics.contains("voxloop_queue_busy_total{stage=\"test_busy\"} 1"),
            "{metrics}"
        );
        assert!(metrics.contains("voxloop_queue_waiting{stage=\"test_busy\"} 0"));

        // Two stages on one worker: a job of one waits for the other's.
        let asr = ComputeQueue::new("test_asr", 1, 0);
        let tts = asr.sharing("test_tts", 0);
        let held = asr.enter().await.unwrap();
        assert_eq!(tts.enter().await.unwrap_err().stage, "test_tts");
        drop(held);
        assert!(tts.enter().await.is_ok());
    }
}
