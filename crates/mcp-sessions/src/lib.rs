//! Streamable-HTTP MCP sessions with a bound, for every MCP server voxloop ships (the music
//! server's `--transport http`, `voxloop serve`'s `/mcp`, `voxloop duplex serve`'s `/mcp`).
//!
//! The MCP transports specification lets a client open a session (`initialize`, answered with
//! `Mcp-Session-Id`) and end it with `DELETE`; a client that never sends `DELETE` would keep its
//! session, and the server's memory, for ever. [`BoundedSessions`] wraps rmcp's
//! `LocalSessionManager`: a session idle for `idle` is closed (rmcp's `keep_alive`), and a new
//! session past `max_sessions` first closes the session idle the longest. With a cap per
//! credential ([`BoundedSessions::per_owner`]), a new session of a credential that holds that
//! many first closes that credential's longest idle, so one client cannot take every place.
//! The credential is the one a request runs under ([`as_owner`], set by the server's
//! authentication layer around rmcp's service). A request to a closed session gets rmcp's
//! 404, after which a client starts a new session.

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

tokio::task_local! {
    static OWNER: String;
}

/// Runs `request` (a call into rmcp's streamable-HTTP service) as `owner`: a credential's
/// identity (an API key's, a token's subject) or, for callers without one, their address. A
/// session the request creates counts against `owner`'s cap.
pub async fn as_owner<F: std::future::Future>(owner: String, request: F) -> F::Output {
    OWNER.scope(owner, request).await
}

/// A session's last use and the credential that opened it.
struct Use {
    at: Instant,
    owner: Option<String>,
}

/// rmcp's local session manager with idle expiry, a cap on sessions at once and a cap per
/// credential.
pub struct BoundedSessions {
    inner: LocalSessionManager,
    max_sessions: usize,
    /// Sessions one owner may hold at once; 0: no cap but the total.
    max_per_owner: usize,
    idle: Duration,
    /// When each session was last used, and by whom it was opened.
    used: Mutex<HashMap<SessionId, Use>>,
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
            max_per_owner: 0,
            idle,
            used: Mutex::new(HashMap::new()),
        }
    }

    /// The same, with at most `max` sessions per owner ([`as_owner`]; 0: no such cap). A
    /// request run without an owner counts against the total only.
    pub fn per_owner(mut self, max: usize) -> Self {
        self.max_per_owner = max;
        self
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
            used.at = Instant::now();
        }
    }

    /// Closes the sessions idle past `idle` (rmcp stops their workers but keeps their entries),
    /// then `owner`'s longest idle until it may open one more, then the longest idle of all
    /// until there is room for one more.
    async fn make_room(&self, owner: Option<&str>) {
        let open: Vec<SessionId> = self.inner.sessions.read().await.keys().cloned().collect();
        let mut used = self.used.lock().await;
        used.retain(|id, _| open.contains(id));
        let now = Instant::now();
        let expired: Vec<SessionId> = used
            .iter()
            .filter(|(_, u)| now.duration_since(u.at) >= self.idle)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            used.remove(&id);
            let _ = self.inner.close_session(&id).await;
        }
        let owns = |u: &Use| owner.is_some() && u.owner.as_deref() == owner;
        while self.max_per_owner > 0
            && used.values().filter(|u| owns(u)).count() >= self.max_per_owner
        {
            let Some(oldest) = longest_idle(&used, owns) else {
                break;
            };
            used.remove(&oldest);
            tracing::info!(session = %oldest, owner, max = self.max_per_owner, "MCP session cap per credential reached; closing its longest idle");
            let _ = self.inner.close_session(&oldest).await;
        }
        while used.len() >= self.max_sessions {
            let Some(oldest) = longest_idle(&used, |_| true) else {
                break;
            };
            used.remove(&oldest);
            tracing::info!(session = %oldest, max = self.max_sessions, "MCP session cap reached; closing the longest idle");
            let _ = self.inner.close_session(&oldest).await;
        }
    }
}

/// The session among `used` that `which` selects and that was used the longest ago.
fn longest_idle(used: &HashMap<SessionId, Use>, which: impl Fn(&Use) -> bool) -> Option<SessionId> {
    used.iter()
        .filter(|(_, u)| which(u))
        .min_by_key(|(_, u)| u.at)
        .map(|(id, _)| id.clone())
}

impl SessionManager for BoundedSessions {
    type Error = LocalSessionManagerError;
    type Transport = <LocalSessionManager as SessionManager>::Transport;

    async fn create_session(&self) -> Result<(SessionId, Self::Transport), Self::Error> {
        let owner = OWNER.try_with(Clone::clone).ok();
        self.make_room(owner.as_deref()).await;
        let (id, transport) = self.inner.create_session().await?;
        let at = Instant::now();
        self.used.lock().await.insert(id.clone(), Use { at, owner });
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
    async fn a_credential_past_its_cap_closes_its_own_longest_idle_and_no_one_elses() {
        let sessions = BoundedSessions::new(100, Duration::from_secs(600)).per_owner(2);
        let open = |owner: &'static str| {
            let sessions = &sessions;
            async move {
                let id = as_owner(owner.into(), sessions.create_session())
                    .await
                    .unwrap()
                    .0;
                tokio::time::sleep(Duration::from_millis(5)).await;
                id
            }
        };
        let other = open("key:other").await;
        let (a1, a2) = (open("key:a").await, open("key:a").await);
        // Without an owner: counted in the total only.
        let ownerless = sessions.create_session().await.unwrap().0;
        let a3 = open("key:a").await;
        assert!(
            !sessions.has_session(&a1).await.unwrap(),
            "a's longest idle closed"
        );
        for kept in [&a2, &a3, &other, &ownerless] {
            assert!(sessions.has_session(kept).await.unwrap());
        }
        // `other` was idle the longest of all, yet only `a`'s sessions give way to `a`.
        sessions.touch(&a2).await;
        open("key:a").await;
        assert!(!sessions.has_session(&a3).await.unwrap());
        assert!(sessions.has_session(&other).await.unwrap());
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
