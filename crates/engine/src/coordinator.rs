//! The coordinator (DESIGN §2.2, §5.1): owns one request's committed grid and policy and drives
//! the cycle through the role traits. This is the only implementation of the cycle: embedded mode
//! passes in-process roles, the gateway passes gRPC clients.

use std::collections::BTreeMap;
use std::time::Instant;

use mulo_core::method::plan_resample;
use mulo_core::metrics as metrics_names;
use mulo_core::spec::{blocks, Block};
use mulo_core::{Condition, Method, MuloParams, SamplingParams};
use serde::Serialize;

use tracing::{info_span, Instrument};

use crate::drafter::DraftReply;
use crate::error::EngineError;
use crate::resample::IslandPlan;
use crate::roles::{DrafterRole, VerifierRole};
use crate::session::{SessionRef, SessionSpec};
use crate::verifier::Relaxation;

/// One generation to run.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Session id (unique while the request lives).
    pub id: String,
    /// Condition.
    pub condition: Condition,
    /// Sampling parameters (processed `p`).
    pub sampling: SamplingParams,
    /// Seed of every random draw of the request.
    pub seed: u64,
    /// Method and its parameters.
    pub method: Method,
}

/// What a generation cost and how the speculation went.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MethodStats {
    /// Method with its parameters (`mulo:tau=…`).
    pub method: String,
    /// Tokens in the image.
    pub tokens: usize,
    /// Target forward passes (prefill included).
    pub target_passes: usize,
    /// Drafter (or small draft model) forward passes (prefill included).
    pub drafter_passes: usize,
    /// Draft tokens proposed to the target.
    pub proposed: usize,
    /// Proposals accepted.
    pub accepted: usize,
    /// Positions resampled by the target.
    pub resampled: usize,
    /// Cycles (blocks for `mulo`, speculation rounds for `sd` / `lantern`).
    pub cycles: usize,
    /// Largest island resampled in one block.
    pub largest_island: usize,
    /// Why the request fell back to AR on the verifier, if it did.
    pub fallback: Option<String>,
    /// Wall-clock seconds of the whole generation.
    pub seconds: f64,
    /// Compute seconds per stage (prefill, draft, upsample, realign, verify, resample, decode).
    pub stages: BTreeMap<String, f64>,
}

impl MethodStats {
    /// Adds one call of a stage (also observed in the stage histogram).
    fn add(&mut self, stage: &'static str, seconds: f64) {
        *self.stages.entry(stage.to_string()).or_default() += seconds;
        metrics::histogram!(metrics_names::STAGE_DURATION, "stage" => stage).record(seconds);
    }

    /// Adds the part of a role call's round trip `elapsed` that was not the `compute` the role
    /// reported: the wire, serialisation and queueing at the role (`network`).
    fn add_network(&mut self, elapsed: std::time::Duration, compute: f64) {
        self.add("network", (elapsed.as_secs_f64() - compute).max(0.0));
    }

    /// Records that the request fell back to AR.
    fn fall_back(&mut self, reason: &'static str, why: String) {
        metrics::counter!(metrics_names::FALLBACKS, "reason" => reason).increment(1);
        self.fallback = Some(why);
    }

    /// Adds a finished request to the fleet counters (by method).
    fn record(&self, method: &'static str) {
        use metrics_names as n;
        let c = |name: &'static str, v: usize| {
            metrics::counter!(name, "method" => method).increment(v as u64);
        };
        c(n::CYCLES, self.cycles);
        c(n::PROPOSED_TOKENS, self.proposed);
        c(n::ACCEPTED_TOKENS, self.accepted);
        c(n::RESAMPLED_TOKENS, self.resampled);
        c(n::COMMITTED_TOKENS, self.tokens);
        c(n::TARGET_PASSES, self.target_passes);
        c(n::DRAFTER_PASSES, self.drafter_passes);
    }

    /// Accepted share of the proposals.
    pub fn acceptance(&self) -> f64 {
        if self.proposed == 0 {
            0.0
        } else {
            self.accepted as f64 / self.proposed as f64
        }
    }

    /// Tokens committed per target forward pass.
    pub fn tokens_per_target_pass(&self) -> f64 {
        self.tokens as f64 / self.target_passes.max(1) as f64
    }

    /// The one-line summary `mulo generate` prints.
    pub fn line(&self) -> String {
        let mut s = format!(
            "{} tokens in {:.2} s ({:.1} tokens/s, {}): {} target passes, {} drafter passes, {} proposed, {} accepted ({:.1}%), {} resampled, {} cycles, largest island {}",
            self.tokens,
            self.seconds,
            self.tokens as f64 / self.seconds.max(1e-9),
            self.method,
            self.target_passes,
            self.drafter_passes,
            self.proposed,
            self.accepted,
            100.0 * self.acceptance(),
            self.resampled,
            self.cycles,
            self.largest_island
        );
        if let Some(f) = &self.fallback {
            s.push_str(&format!("; fell back to AR: {f}"));
        }
        s
    }
}

/// Progress of a generation: a block (or speculation round) has been committed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BlockEvent {
    /// Tokens committed so far.
    pub committed: usize,
    /// Tokens in the grid.
    pub total: usize,
    /// First grid position of the block.
    pub start: usize,
    /// The block's committed tokens (positions `start..committed`).
    pub tokens: Vec<i64>,
    /// The block's accept map (true = proposal accepted), empty for AR.
    pub accepted: Vec<bool>,
    /// The block's resample map (true = resampled by the target).
    pub resampled: Vec<bool>,
    /// Target forward passes so far (prefill included): `committed / target_passes` is the
    /// running number of tokens per target pass.
    pub target_passes: usize,
}

/// A finished generation.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Token ids in raster order.
    pub tokens: Vec<i64>,
    /// Its statistics.
    pub stats: MethodStats,
}

/// Runs one generation with `method` through the roles. `drafter` may be `None` (AR, SD and
/// LANTERN need none; `mulo` then runs as AR with a `fallback` note). `on_event` sees every
/// committed block.
pub async fn generate(
    drafter: Option<&dyn DrafterRole>,
    verifier: &dyn VerifierRole,
    req: &GenerateRequest,
    on_event: &mut (dyn FnMut(&BlockEvent) + Send),
) -> Result<Outcome, EngineError> {
    let span = info_span!("generate", id = %req.id, method = %req.method);
    generate_in_span(drafter, verifier, req, on_event)
        .instrument(span)
        .await
}

async fn generate_in_span(
    drafter: Option<&dyn DrafterRole>,
    verifier: &dyn VerifierRole,
    req: &GenerateRequest,
    on_event: &mut (dyn FnMut(&BlockEvent) + Send),
) -> Result<Outcome, EngineError> {
    req.method.validate()?;
    req.sampling.validate()?;
    req.condition.validate()?;
    let start = Instant::now();
    let mut spec = SessionSpec {
        id: req.id.clone(),
        epoch: 0,
        condition: req.condition.clone(),
        sampling: req.sampling,
        seed: req.seed,
    };
    let with_draft = matches!(req.method, Method::Sd(_) | Method::Lantern(_));
    let t = Instant::now();
    let info = verifier
        .open(spec.clone(), with_draft, Vec::new())
        .instrument(info_span!("prefill"))
        .await?;
    // A text prompt the verifier encoded reaches the drafter as the same features.
    if let Some(c) = info.condition.clone() {
        spec.condition = c;
    }
    let mut stats = MethodStats {
        method: req.method.to_string(),
        tokens: info.rows * info.cols,
        target_passes: 1,
        ..MethodStats::default()
    };
    stats.add("prefill", t.elapsed().as_secs_f64());
    let mut run = Run {
        verifier,
        id: req.id.clone(),
        committed: Vec::new(),
        total: info.rows * info.cols,
        cols: info.cols.max(1),
        stats,
    };
    let result = match &req.method {
        Method::Ar => run.ar(on_event).await,
        Method::Sd(p) => run.speculate(p.gamma, None, on_event).await,
        Method::Lantern(p) => {
            let relax = Relaxation {
                k: p.k,
                delta: p.delta,
            };
            run.speculate(p.gamma, Some(relax), on_event).await
        }
        Method::Mulo(p) => match drafter {
            Some(d) => run.mulo(d, &spec, p, info.rows, info.cols, on_event).await,
            None => {
                run.stats.fall_back("no_drafter", "no drafter".into());
                run.ar(on_event).await
            }
        },
    };
    let _ = verifier.release(req.id.clone()).await;
    if let (Some(d), Method::Mulo(_)) = (drafter, &req.method) {
        let _ = d.release(req.id.clone()).await;
    }
    result?;
    let mut stats = run.stats;
    stats.seconds = start.elapsed().as_secs_f64();
    stats.record(req.method.name());
    Ok(Outcome {
        tokens: run.committed,
        stats,
    })
}

struct Run<'a> {
    verifier: &'a dyn VerifierRole,
    id: String,
    committed: Vec<i64>,
    total: usize,
    /// Grid columns: AR decodes and reports one row per call.
    cols: usize,
    stats: MethodStats,
}

impl Run<'_> {
    fn at(&self, committed: usize) -> SessionRef {
        SessionRef {
            id: self.id.clone(),
            epoch: 0,
            committed,
        }
    }

    /// AR for the rest of the grid (the AR method, and the fallback), one row (the rest of the
    /// current one first) per decode call, each reported as it lands.
    async fn ar(
        &mut self,
        on_event: &mut (dyn FnMut(&BlockEvent) + Send),
    ) -> Result<(), EngineError> {
        while self.committed.len() < self.total {
            let done = self.committed.len();
            let count = (self.cols - done % self.cols).min(self.total - done);
            let t = Instant::now();
            let reply = self
                .verifier
                .decode(self.at(done), count)
                .instrument(info_span!("decode"))
                .await?;
            if reply.tokens.len() != count {
                return Err(EngineError::Precondition(format!(
                    "the verifier decoded {} tokens, {count} were asked for",
                    reply.tokens.len()
                )));
            }
            self.stats.target_passes += reply.passes;
            self.stats.add("decode", reply.seconds);
            self.stats.add_network(t.elapsed(), reply.seconds);
            self.committed.extend_from_slice(&reply.tokens);
            on_event(&BlockEvent {
                committed: self.committed.len(),
                total: self.total,
                start: done,
                tokens: reply.tokens,
                accepted: Vec::new(),
                resampled: Vec::new(),
                target_passes: self.stats.target_passes,
            });
        }
        Ok(())
    }

    async fn speculate(
        &mut self,
        gamma: usize,
        relax: Option<Relaxation>,
        on_event: &mut (dyn FnMut(&BlockEvent) + Send),
    ) -> Result<(), EngineError> {
        self.stats.drafter_passes += 1;
        while self.committed.len() < self.total {
            let done = self.committed.len();
            let t = Instant::now();
            let r = self
                .verifier
                .speculate(self.at(done), gamma, relax)
                .instrument(info_span!("speculate"))
                .await?;
            self.stats
                .add_network(t.elapsed(), r.draft_seconds + r.verify_seconds);
            self.stats.target_passes += r.target_passes;
            self.stats.drafter_passes += r.draft_passes;
            self.stats.proposed += r.proposed;
            self.stats.accepted += r.accepted;
            self.stats.resampled += r.tokens.len() - r.accepted;
            self.stats.cycles += 1;
            self.stats.add("draft", r.draft_seconds);
            self.stats.add("verify", r.verify_seconds);
            let n = r.tokens.len();
            self.committed.extend_from_slice(&r.tokens);
            let mut accepted = vec![true; r.accepted];
            accepted.resize(n, false);
            on_event(&BlockEvent {
                committed: self.committed.len(),
                total: self.total,
                start: done,
                tokens: r.tokens,
                resampled: accepted.iter().map(|a| !a).collect(),
                accepted,
                target_passes: self.stats.target_passes,
            });
        }
        Ok(())
    }

    async fn mulo(
        &mut self,
        drafter: &dyn DrafterRole,
        spec: &SessionSpec,
        p: &MuloParams,
        rows: usize,
        cols: usize,
        on_event: &mut (dyn FnMut(&BlockEvent) + Send),
    ) -> Result<(), EngineError> {
        let t = Instant::now();
        let dinfo = match drafter
            .open(spec.clone(), Vec::new())
            .instrument(info_span!("drafter_prefill"))
            .await
        {
            Ok(i) => i,
            Err(e) => {
                self.stats
                    .fall_back("drafter_open_failed", format!("drafter open failed: {e}"));
                return self.ar(on_event).await;
            }
        };
        self.stats.drafter_passes += 1;
        self.stats.add("drafter_prefill", t.elapsed().as_secs_f64());
        if dinfo.high.rows != rows || dinfo.high.cols != cols {
            self.stats.fall_back(
                "grid_mismatch",
                format!(
                    "the drafter proposes a {} grid, the target has {rows}x{cols}",
                    dinfo.high
                ),
            );
            return self.ar(on_event).await;
        }
        let blocks = blocks(rows, cols, dinfo.scale, p.block_rows);
        let low_rows = |b: &Block| b.rows.div_ceil(dinfo.scale);
        // `pending`: the final tokens of the last block, committed on the verifier by the next
        // verify (and realigned on the drafter by the next draft).
        let mut pending: Vec<i64> = Vec::new();
        // With pipelining, the next block's draft, made while this block was verified.
        let mut next_draft: Option<(Result<DraftReply, EngineError>, std::time::Duration)> = None;
        for (b, block) in blocks.iter().enumerate() {
            let done = self.committed.len();
            let (draft, draft_rtt) = match next_draft.take() {
                Some(d) => d,
                None => {
                    timed(
                        drafter
                            .draft(
                                self.at(done),
                                pending.clone(),
                                low_rows(block),
                                p.zipar_window,
                            )
                            .instrument(info_span!("draft", block = b)),
                    )
                    .await
                }
            };
            let draft = match draft {
                Ok(d) => d,
                Err(e) => {
                    self.stats
                        .fall_back("drafter_failed", format!("drafter failed: {e}"));
                    if !pending.is_empty() {
                        self.stats.target_passes += usize::from(
                            self.verifier
                                .commit(self.at(done), pending.clone())
                                .instrument(info_span!("commit"))
                                .await?
                                > 0,
                        );
                        self.committed.append(&mut pending);
                    }
                    return self.ar(on_event).await;
                }
            };
            self.stats.drafter_passes += draft.passes;
            self.stats.add("draft", draft.draft_seconds);
            self.stats.add("upsample", draft.upsample_seconds);
            self.stats.add("realign", draft.realign_seconds);
            self.stats.add_network(
                draft_rtt,
                draft.draft_seconds + draft.upsample_seconds + draft.realign_seconds,
            );
            let proposals = draft.high;
            if proposals.len() != block.len() {
                return Err(EngineError::Precondition(format!(
                    "the drafter proposed {} tokens for a block of {}",
                    proposals.len(),
                    block.len()
                )));
            }
            // Verify (and resample) this block; with pipelining, draft the next one meanwhile
            // over the drafter's own rows of this block (the call after realigns them).
            let checked = check_block(
                self.verifier,
                self.at(done),
                pending.clone(),
                proposals.clone(),
                block,
                p,
            );
            let checked = match blocks.get(b + 1).filter(|_| p.pipeline) {
                Some(next) => {
                    let ahead = timed(
                        drafter
                            .draft(
                                self.at(done),
                                pending.clone(),
                                low_rows(next),
                                p.zipar_window,
                            )
                            .instrument(info_span!("draft", block = b + 1, ahead = true)),
                    );
                    let (checked, ahead) = tokio::join!(checked, ahead);
                    next_draft = Some(ahead);
                    checked?
                }
                None => checked.await?,
            };
            self.committed.append(&mut pending);
            self.stats.target_passes += 1 + checked.resample_passes;
            self.stats.add("verify", checked.verify_seconds);
            self.stats
                .add_network(checked.verify_rtt, checked.verify_seconds);
            self.stats.add("expand", checked.expand_seconds);
            self.stats.cycles += 1;
            self.stats.proposed += proposals.len();
            self.stats.accepted += checked.accepted.iter().filter(|&&a| a).count();
            if checked.resample_passes > 0 {
                self.stats.resampled += checked.resampled.iter().filter(|&&r| r).count();
                self.stats.largest_island = self.stats.largest_island.max(checked.largest_island);
                self.stats.add("resample", checked.resample_seconds);
                self.stats
                    .add_network(checked.resample_rtt, checked.resample_seconds);
            }
            pending = checked.tokens;
            on_event(&BlockEvent {
                committed: self.committed.len() + pending.len(),
                total: self.total,
                start: block.grid_index(0),
                tokens: pending.clone(),
                accepted: checked.accepted,
                resampled: checked.resampled,
                target_passes: self.stats.target_passes,
            });
        }
        // The last block needs no commit pass: its values are final.
        self.committed.append(&mut pending);
        Ok(())
    }
}

/// One block's verification: its final tokens and what it took.
struct Checked {
    tokens: Vec<i64>,
    accepted: Vec<bool>,
    resampled: Vec<bool>,
    resample_passes: usize,
    largest_island: usize,
    verify_seconds: f64,
    resample_seconds: f64,
    expand_seconds: f64,
    /// Round trips of the verify and resample calls.
    verify_rtt: std::time::Duration,
    resample_rtt: std::time::Duration,
}

/// A future's output and how long it took.
async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, std::time::Duration) {
    let t = Instant::now();
    let out = f.await;
    (out, t.elapsed())
}

/// Commits `pending` and scores `proposals` on the verifier in one pass, then resamples the
/// rejected neighbourhoods.
async fn check_block(
    verifier: &dyn VerifierRole,
    at: SessionRef,
    pending: Vec<i64>,
    proposals: Vec<i64>,
    block: &Block,
    p: &MuloParams,
) -> Result<Checked, EngineError> {
    let committed = at.committed + pending.len();
    let (v, verify_rtt) = timed(
        verifier
            .verify(at.clone(), pending, proposals.clone(), p.pool_k)
            .instrument(info_span!("verify")),
    )
    .await;
    let v = v?;
    let accepted: Vec<bool> = v.mass.iter().map(|&m| f64::from(m) >= p.tau).collect();
    let t = Instant::now();
    let plan = plan_resample(block, &accepted, p.radius, p.rejection);
    let expand_seconds = t.elapsed().as_secs_f64();
    let mut out = Checked {
        tokens: proposals,
        resampled: plan.mask.clone(),
        accepted,
        resample_passes: 0,
        largest_island: 0,
        verify_seconds: v.seconds,
        resample_seconds: 0.0,
        expand_seconds,
        verify_rtt,
        resample_rtt: std::time::Duration::ZERO,
    };
    if !plan.is_empty() {
        let islands = grid_positions(block, &plan.islands);
        let order = IslandPlan {
            islands,
            resampler: p.resample,
            window: p.jacobi_window,
            wavefront: p.wavefront,
        };
        let (r, rtt) = timed(
            verifier
                .resample(SessionRef { committed, ..at }, order)
                .instrument(info_span!("resample", positions = plan.len())),
        )
        .await;
        let r = r?;
        out.resample_rtt = rtt;
        out.tokens = r.tokens;
        out.resample_passes = r.passes;
        out.largest_island = plan.largest_island();
        out.resample_seconds = r.seconds;
    }
    Ok(out)
}

/// Block-local islands → grid positions.
fn grid_positions(block: &Block, islands: &[Vec<usize>]) -> Vec<Vec<usize>> {
    islands
        .iter()
        .map(|p| p.iter().map(|&i| block.grid_index(i)).collect())
        .collect()
}
