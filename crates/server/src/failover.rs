//! Verifier failover (DESIGN §5.3): a `VerifierRole` over a set of replicas that, when the
//! replica serving a session is lost, re-opens the session on another one with the committed
//! tokens (a new epoch) and repeats the call. The coordinator does not notice, so the cycle code
//! stays the engine's one. Migrations are bounded per session.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};

use async_trait::async_trait;
use mulo_engine::resample::IslandPlan;
use mulo_engine::verifier::{
    DecodeReply, Relaxation, ResampleReply, SpeculateReply, VerifierInfo, VerifyReply,
};
use mulo_engine::{EngineError, SessionRef, SessionSpec, VerifierRole};

use crate::client::RemoteVerifier;

/// What the gateway knows of a session, enough to rebuild it elsewhere.
#[derive(Debug, Clone)]
struct Track {
    spec: SessionSpec,
    with_draft: bool,
    /// Replica serving it (kept when a re-resolution drops it from the list: the session stays
    /// there until it ends or the replica fails).
    replica: RemoteVerifier,
    /// Its epoch there.
    epoch: u64,
    /// Committed tokens.
    committed: Vec<i64>,
    /// Proposals of the last verify (the pending block), re-sent after a migration.
    pending: Vec<i64>,
    migrations: u32,
}

/// Replicas with failover; one instance serves every request of a gateway.
#[derive(Debug)]
pub struct Failover {
    replicas: RwLock<Vec<RemoteVerifier>>,
    max_migrations: u32,
    sessions: Mutex<HashMap<String, Track>>,
    /// Migrations per session id, kept past the release until the gateway takes them.
    moved: Mutex<HashMap<String, u32>>,
}

/// Whether an error means the replica (or its copy of the session) is gone.
fn lost(e: &EngineError) -> bool {
    matches!(e, EngineError::Peer { .. } | EngineError::UnknownSession(_))
}

/// The `reason` label of a migration caused by `e`: `unreachable` when the replica could not be
/// reached or its connection broke during the call (tonic reports the latter as UNKNOWN with a
/// transport error), `session_lost` when it answered without the session, else `peer_error`.
fn migration_reason(e: &EngineError) -> &'static str {
    match e {
        EngineError::UnknownSession(_) => "session_lost",
        EngineError::Peer { code, message, .. }
            if code == tonic::Code::Unavailable.description()
                || code == "unavailable"
                || (code == tonic::Code::Unknown.description()
                    && message.contains("transport error")) =>
        {
            "unreachable"
        }
        _ => "peer_error",
    }
}

impl Failover {
    /// Failover over `replicas` (at least one), at most `max_migrations` moves per session.
    pub fn new(replicas: Vec<RemoteVerifier>, max_migrations: u32) -> Self {
        Self {
            replicas: RwLock::new(replicas),
            max_migrations,
            sessions: Mutex::new(HashMap::new()),
            moved: Mutex::new(HashMap::new()),
        }
    }

    /// The replicas now.
    pub fn replicas(&self) -> Vec<RemoteVerifier> {
        self.replicas.read().map(|r| r.clone()).unwrap_or_default()
    }

    /// Replaces the replica list with `addrs` (a re-resolution of the endpoint names): replicas
    /// still listed keep their channel, new ones get one; sessions on a dropped replica stay
    /// there. Returns whether the list changed.
    pub fn set_replicas(&self, addrs: &[String]) -> Result<bool, EngineError> {
        let mut list = self
            .replicas
            .write()
            .map_err(|_| EngineError::Precondition("replica list poisoned".into()))?;
        match crate::client::relist(&list, addrs, RemoteVerifier::addr, RemoteVerifier::new)? {
            Some(next) => {
                *list = next;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Takes the count of migrations of a (finished) session: 0 when it never moved.
    pub fn take_migrations(&self, id: &str) -> u32 {
        self.moved
            .lock()
            .ok()
            .and_then(|mut m| m.remove(id))
            .unwrap_or(0)
    }

    fn track(&self, id: &str) -> Result<Track, EngineError> {
        self.sessions
            .lock()
            .map_err(|_| EngineError::Precondition("session table poisoned".into()))?
            .get(id)
            .cloned()
            .ok_or_else(|| EngineError::UnknownSession(id.to_string()))
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Track)) {
        if let Ok(mut s) = self.sessions.lock() {
            if let Some(t) = s.get_mut(id) {
                f(t);
            }
        }
    }

    /// The session's replica and its reference there.
    fn at(&self, r: &SessionRef) -> Result<(RemoteVerifier, SessionRef), EngineError> {
        let t = self.track(&r.id)?;
        Ok((
            t.replica,
            SessionRef {
                id: r.id.clone(),
                epoch: t.epoch,
                committed: r.committed,
            },
        ))
    }

    /// Re-opens the session on the next replica with `committed` tokens; returns it there.
    async fn migrate(
        &self,
        id: &str,
        committed: Vec<i64>,
        cause: &EngineError,
    ) -> Result<(RemoteVerifier, SessionRef), EngineError> {
        let mut t = self.track(id)?;
        let mut last = None;
        // The other replicas, in list order after the one that failed.
        let list = self.replicas();
        let at = list
            .iter()
            .position(|r| r.addr() == t.replica.addr())
            .map_or(0, |i| i + 1);
        let others: Vec<RemoteVerifier> = list
            .iter()
            .cycle()
            .skip(at)
            .take(list.len())
            .filter(|r| r.addr() != t.replica.addr())
            .cloned()
            .collect();
        for replica in others {
            if t.migrations >= self.max_migrations {
                break;
            }
            t.migrations += 1;
            metrics::counter!(
                mulo_core::metrics::MIGRATIONS,
                "reason" => migration_reason(cause)
            )
            .increment(1);
            if let Ok(mut m) = self.moved.lock() {
                m.insert(id.to_string(), t.migrations);
            }
            t.epoch += 1;
            let mut spec = t.spec.clone();
            spec.epoch = t.epoch;
            tracing::warn!(
                session = id,
                to = replica.addr(),
                committed = committed.len(),
                %cause,
                "verifier lost: migrating the session"
            );
            match replica.open(spec, t.with_draft, committed.clone()).await {
                Ok(_) => {
                    t.committed = committed.clone();
                    let r = SessionRef {
                        id: id.to_string(),
                        epoch: t.epoch,
                        committed: committed.len(),
                    };
                    let (replica_at, epoch, n) = (replica.clone(), t.epoch, t.migrations);
                    self.update(id, |s| {
                        s.replica = replica_at;
                        s.epoch = epoch;
                        s.migrations = n;
                        s.committed = committed.clone();
                    });
                    return Ok((replica, r));
                }
                Err(e) => last = Some(e),
            }
        }
        self.update(id, |s| s.migrations = t.migrations);
        Err(EngineError::Peer {
            peer: "verifier".into(),
            code: "unavailable".into(),
            message: format!(
                "no verifier replica left for session {id} after {} migration(s) ({}); first failure: {cause}",
                t.migrations,
                last.map_or_else(|| "no other replica".to_string(), |e| e.to_string())
            ),
        })
    }
}

#[async_trait]
impl VerifierRole for Failover {
    async fn open(
        &self,
        spec: SessionSpec,
        with_draft: bool,
        committed: Vec<i64>,
    ) -> Result<VerifierInfo, EngineError> {
        // New sessions spread over the replicas; a lost one is skipped.
        let start = self.sessions.lock().map(|s| s.len()).unwrap_or_default();
        let list = self.replicas();
        let mut last = None;
        for i in 0..list.len() {
            let k = (start + i) % list.len();
            match list[k]
                .open(spec.clone(), with_draft, committed.clone())
                .await
            {
                Ok(info) => {
                    // A migration re-opens with the features a text prompt became.
                    let mut kept = spec.clone();
                    if let Some(c) = &info.condition {
                        kept.condition = c.clone();
                    }
                    if let Ok(mut s) = self.sessions.lock() {
                        s.insert(
                            spec.id.clone(),
                            Track {
                                spec: kept,
                                with_draft,
                                replica: list[k].clone(),
                                epoch: spec.epoch,
                                committed: committed.clone(),
                                pending: Vec::new(),
                                migrations: 0,
                            },
                        );
                    }
                    return Ok(info);
                }
                Err(e) if lost(&e) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| EngineError::Peer {
            peer: "verifier".into(),
            code: "unavailable".into(),
            message: "no verifier replica configured".into(),
        }))
    }

    async fn verify(
        &self,
        session: SessionRef,
        commit: Vec<i64>,
        proposals: Vec<i64>,
        pool_k: usize,
    ) -> Result<VerifyReply, EngineError> {
        let (v, r) = self.at(&session)?;
        let reply = match v.verify(r, commit.clone(), proposals.clone(), pool_k).await {
            Err(e) if lost(&e) => {
                // The pending block's final values are known: commit them on the new replica.
                let mut all = self.track(&session.id)?.committed;
                all.extend_from_slice(&commit);
                let (v, r) = self.migrate(&session.id, all, &e).await?;
                v.verify(r, Vec::new(), proposals.clone(), pool_k).await?
            }
            other => other?,
        };
        self.update(&session.id, |t| {
            t.committed.extend_from_slice(&commit);
            t.pending = proposals;
        });
        Ok(reply)
    }

    async fn resample(
        &self,
        session: SessionRef,
        plan: IslandPlan,
    ) -> Result<ResampleReply, EngineError> {
        let (v, r) = self.at(&session)?;
        match v.resample(r, plan.clone()).await {
            Err(e) if lost(&e) => {
                // Rebuild the pending block on the new replica, then run the plan there.
                let t = self.track(&session.id)?;
                let (v, r) = self.migrate(&session.id, t.committed.clone(), &e).await?;
                let pool = 1;
                v.verify(r.clone(), Vec::new(), t.pending.clone(), pool)
                    .await?;
                v.resample(r, plan).await
            }
            other => other,
        }
    }

    async fn commit(&self, session: SessionRef, values: Vec<i64>) -> Result<usize, EngineError> {
        let (v, r) = self.at(&session)?;
        let n = match v.commit(r, values.clone()).await {
            Err(e) if lost(&e) => {
                let mut all = self.track(&session.id)?.committed;
                all.extend_from_slice(&values);
                let (v, r) = self.migrate(&session.id, all, &e).await?;
                v.commit(r, Vec::new()).await?
            }
            other => other?,
        };
        self.update(&session.id, |t| t.committed.extend_from_slice(&values));
        Ok(n)
    }

    async fn decode(&self, session: SessionRef, count: usize) -> Result<DecodeReply, EngineError> {
        let (v, r) = self.at(&session)?;
        let reply = match v.decode(r, count).await {
            Err(e) if lost(&e) => {
                let t = self.track(&session.id)?;
                let (v, r) = self.migrate(&session.id, t.committed, &e).await?;
                v.decode(r, count).await?
            }
            other => other?,
        };
        self.update(&session.id, |t| {
            t.committed.extend_from_slice(&reply.tokens)
        });
        Ok(reply)
    }

    async fn speculate(
        &self,
        session: SessionRef,
        gamma: usize,
        relax: Option<Relaxation>,
    ) -> Result<SpeculateReply, EngineError> {
        let (v, r) = self.at(&session)?;
        let reply = match v.speculate(r, gamma, relax).await {
            Err(e) if lost(&e) => {
                let t = self.track(&session.id)?;
                let (v, r) = self.migrate(&session.id, t.committed, &e).await?;
                v.speculate(r, gamma, relax).await?
            }
            other => other?,
        };
        self.update(&session.id, |t| {
            t.committed.extend_from_slice(&reply.tokens)
        });
        Ok(reply)
    }

    async fn release(&self, id: String) -> Result<(), EngineError> {
        let t = self.sessions.lock().ok().and_then(|mut s| s.remove(&id));
        match t {
            Some(t) => t.replica.release(id).await,
            // Unknown here: tell every replica (release is idempotent).
            None => {
                for v in &self.replicas() {
                    let _ = v.release(id.clone()).await;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_reasons_are_the_documented_labels() {
        let peer = |code: tonic::Code, message: &str| EngineError::Peer {
            peer: "v".into(),
            code: code.description().into(),
            message: message.into(),
        };
        let got = [
            migration_reason(&peer(tonic::Code::Unavailable, "tcp connect error")),
            // A connection that broke during the call (the replica was killed mid-way).
            migration_reason(&peer(tonic::Code::Unknown, "transport error")),
            migration_reason(&EngineError::UnknownSession("s".into())),
            migration_reason(&peer(tonic::Code::Internal, "boom")),
            migration_reason(&peer(tonic::Code::Unknown, "something else")),
        ];
        assert_eq!(
            got,
            [
                "unreachable",
                "unreachable",
                "session_lost",
                "peer_error",
                "peer_error"
            ]
        );
        for r in got {
            assert!(mulo_core::metrics::MIGRATION_REASONS.contains(&r));
        }
    }
}
