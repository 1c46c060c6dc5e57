//! What the drafter and verifier services share: [`RoleBase`] (the in-process role, its session
//! limit and codebook hash) and the `Release` / `Status` calls both roles answer the same way.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use mulo_engine::{Engine, Local};
use tonic::Status;

use crate::{convert, proto, DRAINING};

/// What the drafter and verifier services share: the in-process role, its session limit and the
/// codebook hash of the capability handshake.
#[derive(Debug, Clone)]
pub(crate) struct RoleBase {
    pub(crate) local: Local,
    pub(crate) max_sessions: usize,
    pub(crate) codebook_hash: String,
    /// Test-only fault hook: calls left before the torch thread is made to panic.
    panic_after: Option<Arc<AtomicU64>>,
}

impl RoleBase {
    pub(crate) async fn new(
        local: Local,
        max_sessions: usize,
    ) -> Result<Self, mulo_engine::EngineError> {
        let codebook_hash = local
            .worker()
            .call(|e: &mut Engine| e.codebook_hash())
            .await??;
        Ok(Self {
            local,
            max_sessions,
            codebook_hash,
            panic_after: None,
        })
    }

    /// Arms the test-only fault hook: the `n`th [`RoleBase::fault_hook`] call panics the torch
    /// thread.
    pub(crate) fn panic_after(&mut self, n: Option<u64>) {
        self.panic_after = n.map(|n| Arc::new(AtomicU64::new(n)));
    }

    /// Counts a draft/verify call for the fault hook; at the armed count it sends the torch thread
    /// a job that panics (the call itself then fails as every held call does).
    pub(crate) fn fault_hook(&self) {
        let Some(left) = &self.panic_after else {
            return;
        };
        if left.fetch_sub(1, Ordering::SeqCst) == 1 {
            tracing::warn!("test fault hook: panicking the torch thread");
            let worker = self.local.worker().clone();
            tokio::spawn(async move {
                let _ = worker
                    .call(|_: &mut Engine| {
                        panic!("test fault hook: forced panic on the torch thread")
                    })
                    .await;
            });
        }
    }
}

/// `Release` of a role: frees the session on the torch thread (idempotent).
pub(crate) async fn release_session(
    local: &Local,
    id: String,
    drafter: bool,
) -> Result<tonic::Response<proto::ReleaseResponse>, Status> {
    convert::session_id_in("session_id", &id)?;
    let released = local
        .worker()
        .call(move |e: &mut Engine| {
            if drafter {
                e.drafter.as_mut().is_some_and(|d| d.release(&id))
            } else {
                e.verifier.as_mut().is_some_and(|v| v.release(&id))
            }
        })
        .await
        .map_err(|e| convert::status(&e))?;
    Ok(tonic::Response::new(proto::ReleaseResponse { released }))
}

/// `Status` of a role: its live sessions and limit, and whether it drains.
pub(crate) async fn role_status(
    local: &Local,
    max_sessions: usize,
    drafter: bool,
) -> Result<tonic::Response<proto::StatusResponse>, Status> {
    let ((d, v), batch, queued) = local
        .worker()
        .call(|e: &mut Engine| (e.live_sessions(), e.batch_stats(), e.ops.len()))
        .await
        .map_err(|e| convert::status(&e))?;
    Ok(tonic::Response::new(proto::StatusResponse {
        live_sessions: if drafter { d } else { v } as u32,
        max_sessions: max_sessions as u32,
        in_flight: 0,
        draining: DRAINING.load(std::sync::atomic::Ordering::Relaxed),
        batch_forwards: batch.forwards,
        batch_sessions: batch.sessions,
        queued_calls: queued as u32,
    }))
}
