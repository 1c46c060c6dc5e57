//! Island resampling on the verifier (DESIGN §2.2 step 5): the sequential schedule (one position
//! per island per target pass) and parallel Jacobi passes that keep every resampled token's
//! distribution (issue 19).
//!
//! A Jacobi pass feeds every unsettled position of every island with a guess and reads the target's
//! processed `p` at each of them, each conditioned on the guesses before it. Per island, in raster
//! order, a guess `x` drawn from `q` is kept when `u < min(1, p(x) / q(x))` (speculative sampling:
//! the kept token is distributed as `p`); at the first rejection a token is drawn from
//! `norm(max(0, p − q))` and the island's later positions get new guesses drawn from this pass's
//! `p` (their `q` for the next pass). The first guesses are the drafter's proposals, a point mass
//! (`q = δ_x`: kept with probability `p(x)`, else a draw from `p` without `x`). Every pass settles
//! at least one position per island, so passes never exceed the sequential schedule's. A pass
//! queries at most `window` positions per island (their cost grows with the tokens fed); the
//! positions after the window keep their guesses until they enter it.

use mulo_core::method::Resampler;
use mulo_core::spec::{pass_schedule, sd_accept, sd_residual};
use mulo_core::{ParamError, SamplingParams};
use mulo_model::sampling::{sample_from_probs, TokenRng};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

use crate::error::EngineError;
use crate::session::Stream;

/// A resample plan as the verifier runs it: the islands (grid positions) and how to resample them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IslandPlan {
    /// Islands of pending grid positions; each is resampled in raster order.
    pub islands: Vec<Vec<usize>>,
    /// Sequential or parallel (Jacobi) passes.
    pub resampler: Resampler,
    /// Jacobi: the unsettled positions of each island a pass queries, from the first one on
    /// (0 = all of them); positions after the window keep their guesses until they enter it.
    pub window: usize,
}

impl IslandPlan {
    /// Checks that the islands are non-empty, distinct pending positions in `lo..hi`, and puts
    /// each island in raster order.
    pub fn checked(mut self, lo: usize, hi: usize) -> Result<Self, EngineError> {
        mulo_core::limits::at_most("window", self.window, mulo_core::limits::MAX_JACOBI_WINDOW)?;
        let mut seen = std::collections::HashSet::new();
        for p in self.islands.iter().flatten() {
            if *p < lo || *p >= hi || !seen.insert(*p) {
                return Err(ParamError::new(
                    "plan",
                    format!("positions must be distinct and pending (in {lo}..{hi}), got {p}"),
                )
                .into());
            }
        }
        self.islands.retain(|i| !i.is_empty());
        for island in &mut self.islands {
            island.sort_unstable();
        }
        Ok(self)
    }
}

/// Test-only faults of the Jacobi acceptance (a statistical test must catch each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JacobiFault {
    /// The correct rule.
    #[default]
    None,
    /// Keeps a guess with probability `p(x)` whatever `q` it was drawn from.
    IgnoreDraft,
}

/// The sequential schedule: pass `t` queries the `t`-th position of every island that has one
/// (feeding the positions sampled in the pass before) and draws each from processed `p`.
pub(crate) async fn sequential(
    target: &mut Stream,
    params: &SamplingParams,
    rng: &mut TokenRng,
    islands: &[Vec<usize>],
) -> Result<(), EngineError> {
    let mut previous: Vec<usize> = Vec::new();
    for mut queries in pass_schedule(islands) {
        queries.sort_unstable();
        let (p, _) = target.query(params, &previous, &queries, None).await?;
        let uniforms: Vec<f64> = queries.iter().map(|_| rng.next_uniform()).collect();
        let drawn = Vec::<i64>::try_from(sample_from_probs(&p, &uniforms).to_device(Device::Cpu))?;
        for (&q, &t) in queries.iter().zip(&drawn) {
            target.book.set(q, t);
        }
        previous = queries;
    }
    Ok(())
}

/// One island under Jacobi passes: its positions, the first unsettled one, and the draft
/// distribution of each unsettled guess (`None`: a point mass on the current value).
struct Island {
    positions: Vec<usize>,
    next: usize,
    /// End of this pass's window (`next..end` are queried).
    end: usize,
    q: Vec<Option<Vec<f32>>>,
}

/// Parallel Jacobi passes until every island is settled (see the module docs).
pub(crate) async fn jacobi(
    target: &mut Stream,
    params: &SamplingParams,
    rng: &mut TokenRng,
    islands: &[Vec<usize>],
    window: usize,
    vocab: usize,
    fault: JacobiFault,
) -> Result<(), EngineError> {
    let mut runs: Vec<Island> = islands
        .iter()
        .map(|i| Island {
            positions: i.clone(),
            next: 0,
            end: 0,
            q: vec![None; i.len()],
        })
        .collect();
    // Settled positions whose new value has not been fed yet.
    let mut changed: Vec<usize> = Vec::new();
    loop {
        for r in &mut runs {
            r.end = match window {
                0 => r.positions.len(),
                w => (r.next + w).min(r.positions.len()),
            };
        }
        let mut queries: Vec<usize> = runs
            .iter()
            .flat_map(|r| r.positions[r.next..r.end].iter().copied())
            .collect();
        if queries.is_empty() {
            return Ok(());
        }
        queries.sort_unstable();
        // The guesses are fed too, so that each query sees the ones before it; nothing at or
        // after the last query is read this pass (a changed value there waits for a later one).
        let last = queries[queries.len() - 1];
        let feed: Vec<usize> = changed
            .iter()
            .chain(&queries)
            .copied()
            .filter(|&p| p < last)
            .collect();
        changed.retain(|&p| p >= last);
        let (p, _) = target.query(params, &feed, &queries, None).await?;
        let p = Vec::<f32>::try_from(p.to_kind(Kind::Float).to_device(Device::Cpu).reshape([-1]))?;
        let rows = Rows {
            p: &p,
            queries: &queries,
            vocab,
            last,
        };
        for run in &mut runs {
            step(run, &rows, target, rng, &mut changed, fault);
        }
    }
}

/// This pass's processed `p`, one row per query.
struct Rows<'a> {
    p: &'a [f32],
    queries: &'a [usize],
    vocab: usize,
    /// The last query: its value was not fed this pass.
    last: usize,
}

impl Rows<'_> {
    fn at(&self, pos: usize) -> &[f32] {
        let k = self.queries.binary_search(&pos).unwrap_or(0);
        &self.p[k * self.vocab..(k + 1) * self.vocab]
    }
}

/// One island's walk over this pass: keep guesses while they pass, settle the first rejected
/// position from the residual and redraw the guesses after it.
fn step(
    run: &mut Island,
    rows: &Rows<'_>,
    target: &mut Stream,
    rng: &mut TokenRng,
    changed: &mut Vec<usize>,
    fault: JacobiFault,
) {
    while run.next < run.end {
        let pos = run.positions[run.next];
        let p = rows.at(pos);
        let x = usize::try_from(target.book.tokens[pos]).unwrap_or(0);
        let q = run.q[run.next]
            .take()
            .unwrap_or_else(|| point_mass(p.len(), x));
        let u = rng.next_uniform().min(1.0 - f64::EPSILON);
        let keep = match fault {
            JacobiFault::None => sd_accept(p, &q, x, u),
            JacobiFault::IgnoreDraft => u < f64::from(p.get(x).copied().unwrap_or(0.0)),
        };
        run.next += 1;
        if keep {
            if pos >= rows.last {
                // Kept but not fed this pass: its slot still holds K/V computed before earlier
                // values changed, so a later pass re-feeds it before reading past it.
                changed.push(pos);
            }
            continue;
        }
        target
            .book
            .set(pos, draw(&sd_residual(p, &q), rng.next_uniform()));
        changed.push(pos);
        for j in run.next..run.end {
            let pj = rows.at(run.positions[j]);
            target
                .book
                .set(run.positions[j], draw(pj, rng.next_uniform()));
            run.q[j] = Some(pj.to_vec());
        }
        return;
    }
}

fn point_mass(v: usize, x: usize) -> Vec<f32> {
    let mut q = vec![0.0; v];
    if let Some(e) = q.get_mut(x) {
        *e = 1.0;
    }
    q
}

/// Draws from a host probability vector by inverting its CDF at `u` in (0, 1].
pub(crate) fn draw(probs: &[f32], u: f64) -> i64 {
    let total: f64 = probs.iter().map(|&x| f64::from(x)).sum();
    let target = u * total;
    let mut acc = 0.0;
    let mut last = 0;
    for (i, &x) in probs.iter().enumerate() {
        if x > 0.0 {
            last = i;
            acc += f64::from(x);
            if acc >= target {
                return i as i64;
            }
        }
    }
    last as i64
}

/// Runs `plan` on `target`'s pending block.
pub(crate) async fn run(
    target: &mut Stream,
    params: &SamplingParams,
    rng: &mut TokenRng,
    plan: &IslandPlan,
    vocab: usize,
    fault: JacobiFault,
) -> Result<(), EngineError> {
    match plan.resampler {
        Resampler::Sequential => sequential(target, params, rng, &plan.islands).await,
        Resampler::Jacobi => {
            jacobi(
                target,
                params,
                rng,
                &plan.islands,
                plan.window,
                vocab,
                fault,
            )
            .await
        }
    }
}
