//! Streamable-HTTP MCP sessions with a bound, for every MCP server voxloop ships (the music
//! server's `--transport http`, `voxloop serve`'s `/mcp`, `voxloop duplex serve`'s `/mcp`).
//!
//! The MCP transports specification lets a client open a session (`initialize`, answered with
//! `Mcp-Session-Id`) and end it with `DELETE`; a client that never sends `DELETE` would keep its
//! session, and the server's memory, for ever. [`BoundedSessions`] wraps rmcp's
//! `LocalSessionManager`: a session idle for `idle` is closed (rmcp's `keep_alive`), and a new
//! session past `max_sessions` first closes the session idle the longest. A request to a closed
//! session gets rmcp's 404, after which a client starts a new session.

#![warn(missing_docs)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use rmcp::model::{ClientJsonRpcMessage, ServerJsonRpcMessage};
use rmcp::transport::common::server_side_http::{ServerSseMessage, SessionId};
use rmcp::transport::streamable_http_server::SessionManager;
use rmcp::transport::streamable_http_server::session::local::{
    LocalSessionManager, LocalSessionManagerError,
};
use rmcp::transport::streamable_http_server::session::{EventStore, RestoreOutcome};
use tokio::sync::Mutex;
use tokio::time::Instant;

/// rmcp's local session manager with idle expiry and a cap on sessions at once.
pub struct BoundedSessions {
    inner: LocalSessionManager,
    max_sessions: usize,
    idle: Duration,
    /// When each session was last used.
    used: Mutex<HashMap<SessionId, Instant>>,
}

impl BoundedSessions {
    /// At most `max_sessions` sessions at once (at least 1); a session unused for `idle` is
    /// closed.
    pub fn new(max_sessions: usize, idle: Duration) -> Self {
        let mut inner = LocalSessionManager::default();
        inner.session_config.keep_alive = Some(idle);
        Self {
            inner,
            max_sessions: max_sessions.max(1),
            idle,
            used: Mutex::new(HashMap::new()),
        }
    }

    /// Sessions held now (an idle one rmcp has stopped counts until the next new session
    /// sweeps it out).
    pub async fn len(&self) -> usize {
        self.inner.sessions.read().await.len()
    }

    /// Whether no session is held.
    pub async fn is_empty(&self) -> bool {
        self.len().await == 0
    }

    async fn touch(&self, id: &SessionId) {
        if let Some(used) = self.used.lock().await.get_mut(id) {
            *used = Instant::now();
        }
    }

    /// Closes the sessions idle past `idle` (rmcp stops their workers but keeps their entries),
    /// then the longest idle until there is room for one more.
    async fn make_room(&self) {
        let open: Vec<SessionId> = self.inner.sessions.read().await.keys().cloned().collect();
        let mut used = self.used.lock().await;
        used.retain(|id, _| open.contains(id));
        let now = Instant::now();
        let expired: Vec<SessionId> = used
            .iter()
            .filter(|(_, t)| now.duration_since(**t) >= self.idle)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            used.remove(&id);
            let _ = self.inner.close_session(&id).await;
        }
        while used.len() >= self.max_sessions {
            let Some(oldest) = used
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(id, _)| id.clone())
            else {
                break;
            };
            used.remove(&oldest);
            tracing::info!(session = %oldest, max = self.max_sessions, "MCP session cap reached; closing the longest idle");
            let _ = self.inner.close_session(&oldest).await;
        }
    }
}

impl SessionManager for BoundedSessions {
    type Error = LocalSessionManagerError;
    type Transport = <LocalSessionManager as SessionManager>::Transport;

    async fn create_session(&self) -> Result<(SessionId, Self::Transport), Self::Error> {
        self.make_room().await;
        let (id, transport) = self.inner.create_session().await?;
        self.used.lock().await.insert(id.clone(), Instant::now());
        Ok((id, transport))
    }

    async fn initialize_session(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<ServerJsonRpcMessage, Self::Error> {
        self.touch(id).await;
        self.inner.initialize_session(id, message).await
    }

    async fn has_session(&self, id: &SessionId) -> Result<bool, Self::Error> {
        self.inner.has_session(id).await
    }

    async fn close_session(&self, id: &SessionId) -> Result<(), Self::Error> {
        self.used.lock().await.remove(id);
        self.inner.close_session(id).await
    }

    async fn create_stream(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        self.touch(id).await;
        self.inner.create_stream(id, message).await
    }

    async fn accept_message(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<(), Self::Error> {
        self.touch(id).await;
        self.inner.accept_message(id, message).await
    }

    async fn create_standalone_stream(
        &self,
        id: &SessionId,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        self.touch(id).await;
        self.inner.create_standalone_stream(id).await
    }

    async fn resume(
        &self,
        id: &SessionId,
        last_event_id: String,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        self.touch(id).await;
        self.inner.resume(id, last_event_id).await
    }

    async fn restore_session(
        &self,
        id: SessionId,
    ) -> Result<RestoreOutcome<Self::Transport>, Self::Error> {
        self.inner.restore_session(id).await
    }

    fn event_store(&self) -> Option<Arc<dyn EventStore>> {
        self.inner.event_store()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn past_the_cap_the_longest_idle_session_is_closed_first() {
        let sessions = BoundedSessions::new(3, Duration::from_secs(600));
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(sessions.create_session().await.unwrap().0);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The first is used again: the second is now the longest idle.
        sessions.touch(&ids[0]).await;
        let fourth = sessions.create_session().await.unwrap().0;
        assert_eq!(sessions.len().await, 3);
        assert!(sessions.has_session(&ids[0]).await.unwrap());
        assert!(!sessions.has_session(&ids[1]).await.unwrap());
        assert!(sessions.has_session(&ids[2]).await.unwrap());
        assert!(sessions.has_session(&fourth).await.unwrap());
        // DELETE frees a place without closing anyone else.
        sessions.close_session(&fourth).await.unwrap();
        sessions.create_session().await.unwrap();
        assert!(sessions.has_session(&ids[2]).await.unwrap());
    }

    #[tokio::test]
    async fn sessions_idle_past_the_limit_are_swept_at_the_next_new_one() {
        let sessions = BoundedSessions::new(100, Duration::from_millis(50));
        for _ in 0..10 {
            sessions.create_session().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(80)).await;
        let fresh = sessions.create_session().await.unwrap().0;
        assert_eq!(sessions.len().await, 1);
        assert!(sessions.has_session(&fresh).await.unwrap());
    }
}
