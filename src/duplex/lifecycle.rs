//! The model's place on the machine (ARCHITECTURE §6, the GPU lifecycle contract): on the compute
//! device ([`Location::Gpu`]), parked in host memory ([`Location::Cpu`]) or not loaded.
//!
//! The first request loads it onto the compute device; a monitor parks it in host memory after
//! `idle_timeout` with no active session; the next request moves it back; `release` drops it.
//! Every transition happens under one lock, so concurrent requests never race one; a session
//! holds that lock for its whole length (one conversation per model instance). Moves rebuild the
//! model from the memory-mapped checkpoint on the target device (candle tensors cannot change
//! device in place), so a move costs a read of the files (page cache) plus the copy to the GPU.
//! The "compute device" is the `cuda` feature's GPU when configured, else the CPU (tests).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use candle_core::{DType, Device};
use serde::Serialize;
use tokio::sync::{Mutex, OwnedMutexGuard};
use tokio::time::Instant;

use super::DuplexError;
use super::engine::Engine;

/// Longest idle timeout accepted, in seconds (one day).
pub const MAX_IDLE_TIMEOUT_S: u64 = 86_400;

/// Where the model is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Location {
    /// On the compute device, ready to run.
    Gpu,
    /// Parked in host memory.
    Cpu,
    /// Not in memory.
    Unloaded,
}

impl Location {
    /// `gpu`, `cpu` or `unloaded`, as the status reports it.
    pub fn as_str(self) -> &'static str {
        match self {
            Location::Gpu => "gpu",
            Location::Cpu => "cpu",
            Location::Unloaded => "unloaded",
        }
    }
}

/// Transition counts since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Statistics {
    /// Loads from nothing.
    pub total_loads: u64,
    /// Moves to host memory (idle, or `offload`).
    pub gpu_to_cpu: u64,
    /// Moves back to the compute device.
    pub cpu_to_gpu: u64,
    /// `release` calls that dropped a loaded model.
    pub full_releases: u64,
}

/// What `get_gpu_status` and `GET /api/gpu/status` report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    /// Where the model is after the last finished transition (a move in progress shows where it
    /// comes from).
    pub location: Location,
    /// Seconds since the last request ended (or since start).
    pub idle_time: f64,
    /// Seconds of idleness before the monitor parks the model.
    pub idle_timeout: u64,
    /// Sessions and requests now using the model.
    pub active_connections: usize,
    /// The compute device, e.g. `cpu` or `cuda:0`.
    pub device: String,
    /// GPU memory held by the model, GB; `None` where the device does not say (CPU, and candle
    /// exposes no allocator figures).
    pub gpu_memory_allocated_gb: Option<f64>,
    /// GPU memory reserved, GB; `None` as above.
    pub gpu_memory_reserved_gb: Option<f64>,
    /// Transition counts.
    pub statistics: Statistics,
}

/// How to load the model and when to park it.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The model directory (the Hugging Face repo's files).
    pub model_dir: Option<PathBuf>,
    /// The compute device.
    pub device: Device,
    /// The LM weights' dtype.
    pub dtype: DType,
    /// Idle time before parking, in seconds.
    pub idle_timeout_s: u64,
}

/// What the transition lock guards: the model, if loaded.
struct State {
    engine: Option<Engine>,
}

/// Owns the model and moves it between [`Location`]s.
pub struct ModelManager {
    settings: Settings,
    state: Arc<Mutex<State>>,
    /// Where the model is after the last finished transition; written only under `state`'s lock,
    /// read without it (a status never waits on a move).
    location: std::sync::Mutex<Location>,
    statistics: std::sync::Mutex<Statistics>,
    active: AtomicUsize,
    idle_timeout_s: AtomicU64,
    last_used: std::sync::Mutex<Instant>,
    /// Wakes the idle monitor when the timeout changes or a request ends.
    wake: tokio::sync::Notify,
}

/// The model, held for one conversation or request; dropping it marks the model idle from now.
pub struct Lease {
    state: OwnedMutexGuard<State>,
    manager: Arc<ModelManager>,
}

impl Lease {
    /// The loaded engine, on the compute device.
    pub fn engine(&mut self) -> &mut Engine {
        self.state
            .engine
            .as_mut()
            .expect("a lease always holds a loaded engine")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.manager.active.fetch_sub(1, Ordering::SeqCst);
        *self.manager.last_used.lock().expect("last_used lock") = Instant::now();
        self.manager.wake.notify_one();
    }
}

impl ModelManager {
    /// A manager with nothing loaded. Call [`ModelManager::spawn_monitor`] to park it when idle.
    ///
    /// # Errors
    /// [`DuplexError::BadTimeout`] when the idle timeout is outside 1..=[`MAX_IDLE_TIMEOUT_S`].
    pub fn new(settings: Settings) -> Result<Arc<Self>, DuplexError> {
        check_timeout(settings.idle_timeout_s)?;
        Ok(Arc::new(Self {
            idle_timeout_s: AtomicU64::new(settings.idle_timeout_s),
            settings,
            state: Arc::new(Mutex::new(State { engine: None })),
            location: std::sync::Mutex::new(Location::Unloaded),
            statistics: std::sync::Mutex::new(Statistics::default()),
            active: AtomicUsize::new(0),
            last_used: std::sync::Mutex::new(Instant::now()),
            wake: tokio::sync::Notify::new(),
        }))
    }

    /// Starts the idle monitor. It holds the manager; abort the handle to stop it.
    pub fn spawn_monitor(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let manager = self.clone();
        tokio::spawn(async move {
            loop {
                let timeout = Duration::from_secs(manager.idle_timeout_s.load(Ordering::SeqCst));
                let due = *manager.last_used.lock().expect("last_used lock") + timeout;
                let wake = manager.wake.notified();
                if manager.active.load(Ordering::SeqCst) > 0 {
                    // A lease ending wakes the monitor.
                    wake.await;
                } else if Instant::now() >= due {
                    if let Ok(state) = manager.state.clone().try_lock_owned()
                        && manager.location() == Location::Gpu
                    {
                        tracing::info!(idle_s = timeout.as_secs(), "parking the duplex model");
                        if let Err(e) = manager.park(state).await {
                            tracing::error!(error = %e, "parking the duplex model");
                        }
                    }
                    // Nothing to do until a request ends or the timeout changes.
                    wake.await;
                } else {
                    tokio::select! {
                        _ = tokio::time::sleep_until(due) => {}
                        _ = wake => {}
                    }
                }
            }
        })
    }

    /// The model for one conversation, waiting while another holds it; loaded or moved to the
    /// compute device first.
    ///
    /// # Errors
    /// As [`Engine::load`]; a failed move back leaves the model parked.
    pub async fn lease(self: &Arc<Self>) -> Result<Lease, DuplexError> {
        let state = self.state.clone().lock_owned().await;
        self.ready(state).await
    }

    /// As [`ModelManager::lease`], but `None` at once when a conversation holds the model.
    ///
    /// # Errors
    /// As [`ModelManager::lease`].
    pub async fn try_lease(self: &Arc<Self>) -> Result<Option<Lease>, DuplexError> {
        match self.state.clone().try_lock_owned() {
            Ok(state) => self.ready(state).await.map(Some),
            Err(_) => Ok(None),
        }
    }

    async fn ready(
        self: &Arc<Self>,
        mut state: OwnedMutexGuard<State>,
    ) -> Result<Lease, DuplexError> {
        // Active from now: the monitor leaves a loading model alone.
        self.active.fetch_add(1, Ordering::SeqCst);
        let moved = match self.location() {
            Location::Gpu => Ok(()),
            // From nothing, or back from host memory; on failure (out of GPU memory) a parked
            // copy stays parked.
            from => self.load(self.settings.device.clone()).await.map(|engine| {
                state.engine = Some(engine);
                self.set_location(Location::Gpu);
                self.count(|s| match from {
                    Location::Cpu => s.cpu_to_gpu += 1,
                    _ => s.total_loads += 1,
                });
            }),
        };
        let lease = Lease {
            state,
            manager: self.clone(),
        };
        // On failure the lease drops here: inactive again, idle from now.
        moved.map(|()| lease)
    }

    async fn load(&self, device: Device) -> Result<Engine, DuplexError> {
        let dir = self
            .settings
            .model_dir
            .clone()
            .ok_or(DuplexError::NoModelDir)?;
        let dtype = self.settings.dtype;
        tokio::task::spawn_blocking(move || Engine::load(&dir, &device, dtype))
            .await
            .map_err(|e| DuplexError::Compute(format!("loading task failed: {e}")))?
    }

    async fn park(&self, mut state: OwnedMutexGuard<State>) -> Result<(), DuplexError> {
        // Drop the device copy first: parking exists to free the GPU.
        state.engine = None;
        match self.load(Device::Cpu).await {
            Ok(engine) => {
                state.engine = Some(engine);
                self.set_location(Location::Cpu);
                self.count(|s| s.gpu_to_cpu += 1);
                Ok(())
            }
            Err(e) => {
                self.set_location(Location::Unloaded);
                Err(e)
            }
        }
    }

    /// Parks the model in host memory now. Returns the location after.
    ///
    /// # Errors
    /// [`DuplexError::Busy`] while a conversation holds it; a failed reload on the CPU
    /// leaves it unloaded.
    pub async fn offload(&self) -> Result<Location, DuplexError> {
        let state = self
            .state
            .clone()
            .try_lock_owned()
            .map_err(|_| DuplexError::Busy)?;
        if self.location() == Location::Gpu {
            self.park(state).await?;
        }
        Ok(self.location())
    }

    /// Drops the model from memory. Returns whether one was loaded.
    ///
    /// # Errors
    /// [`DuplexError::Busy`] while a conversation holds it.
    pub async fn release(&self) -> Result<bool, DuplexError> {
        let mut state = self
            .state
            .clone()
            .try_lock_owned()
            .map_err(|_| DuplexError::Busy)?;
        let was_loaded = self.location() != Location::Unloaded;
        state.engine = None;
        self.set_location(Location::Unloaded);
        if was_loaded {
            self.count(|s| s.full_releases += 1);
        }
        Ok(was_loaded)
    }

    /// Sets the idle timeout, in seconds (1..=[`MAX_IDLE_TIMEOUT_S`]).
    ///
    /// # Errors
    /// [`DuplexError::BadTimeout`] outside that range.
    pub fn set_idle_timeout(&self, seconds: i64) -> Result<(), DuplexError> {
        let seconds = u64::try_from(seconds).map_err(|_| DuplexError::BadTimeout(seconds))?;
        check_timeout(seconds)?;
        self.idle_timeout_s.store(seconds, Ordering::SeqCst);
        self.wake.notify_one();
        Ok(())
    }

    /// Where the model is, how idle, and the transition counts. Never waits on a transition.
    pub fn status(&self) -> Status {
        let location = self.location();
        let active = self.active.load(Ordering::SeqCst);
        let idle_time = if active > 0 {
            0.0
        } else {
            self.last_used
                .lock()
                .expect("last_used lock")
                .elapsed()
                .as_secs_f64()
        };
        Status {
            location,
            idle_time,
            idle_timeout: self.idle_timeout_s.load(Ordering::SeqCst),
            active_connections: active,
            device: device_name(&self.settings.device),
            gpu_memory_allocated_gb: None,
            gpu_memory_reserved_gb: None,
            statistics: *self.statistics.lock().expect("statistics lock"),
        }
    }

    fn location(&self) -> Location {
        *self.location.lock().expect("location lock")
    }

    fn set_location(&self, location: Location) {
        *self.location.lock().expect("location lock") = location;
        crate::metrics::get().set_gpu_location(location.as_str());
    }

    fn count(&self, f: impl FnOnce(&mut Statistics)) {
        f(&mut self.statistics.lock().expect("statistics lock"));
    }
}

fn check_timeout(seconds: u64) -> Result<(), DuplexError> {
    if (1..=MAX_IDLE_TIMEOUT_S).contains(&seconds) {
        Ok(())
    } else {
        Err(DuplexError::BadTimeout(seconds as i64))
    }
}

/// `cpu`, `cuda:N` or `metal:N`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}
