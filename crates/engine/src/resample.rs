//! Island resampling on the verifier (DESIGN §2.2 step 5): the sequential schedule (one position
//! per island per target pass) and parallel Jacobi passes that keep every resampled token's
//! distribution (issue 19), over whole islands in raster order or over their rows as a wavefront.
//!
//! A *chain* is what one schedule walks in raster order: an island, or under a wavefront of lag
//! `w` each row of an island, whose position in column `c` may be queried once the island's
//! positions `d` rows above up to column `c + w·d` are settled (ZipAR's order inside an island:
//! a position sees its settled neighbours above; guesses further right in the row above are
//! visible as they are, as another island's are, and a settled position's K/V keeps what it saw
//! of them until the block's refresh). Chains run side by side. An island that wraps a row
//! (a `rejection=raster` suffix always does) starts its next row against the unsettled end of
//! the row before: ZipAR's approximation, not raster order (`wavefront = 0` keeps raster order).
//!
//! A Jacobi pass feeds every unsettled position of every chain with a guess and reads the target's
//! processed `p` at each of them, each conditioned on the guesses before it. Per chain, in raster
//! order, a guess `x` drawn from `q` is kept when `u < min(1, p(x) / q(x))` (speculative sampling:
//! the kept token is distributed as `p`); at the first rejection a token is drawn from
//! `norm(max(0, p − q))` and the chain's later positions get new guesses drawn from this pass's
//! `p` (their `q` for the next pass). The first guesses are the drafter's proposals, a point mass
//! (`q = δ_x`: kept with probability `p(x)`, else a draw from `p` without `x`). Every pass settles
//! at least one position per chain it queries, so passes never exceed the sequential schedule's.
//! A pass queries at most `window` positions per chain (their cost grows with the tokens fed); the
//! positions after the window keep their guesses until they enter it. A chain's last query is not
//! fed (nothing this pass reads past it; kept, it is fed next pass as its successor's
//! predecessor).
//!
//! The verify pass read the target's `p` at every proposal with every proposal fed: when the
//! block still holds them, that reading is the first pass (sequential: each chain's first draw;
//! Jacobi: a pass over every chain that may go, whose window is the whole chain), and the chains
//! that must wait take their first guesses from it.

use mulo_core::method::Resampler;
use mulo_core::spec::{sd_accept, sd_residual};
use mulo_core::{ParamError, SamplingParams};
use mulo_model::sampling::{sample_from_probs, TokenRng};
use serde::{Deserialize, Serialize};
use tch::Device;

use crate::error::EngineError;
use crate::session::{host_rows, query_feed, Stream};

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
    /// 0 resamples each island in raster order; `w >= 1` splits it into rows resampled side by
    /// side as a wavefront (ZipAR's order): a row's position in column `c` is queried once the
    /// island's positions `d` rows above it up to column `c + w·d` are settled, and each row
    /// queries up to `window` positions per Jacobi pass (one per sequential pass).
    #[serde(default)]
    pub wavefront: usize,
}

impl IslandPlan {
    /// Checks that the islands are non-empty, distinct pending positions in `lo..hi`, and puts
    /// each island in raster order.
    pub fn checked(mut self, lo: usize, hi: usize) -> Result<Self, EngineError> {
        mulo_core::limits::at_most("window", self.window, mulo_core::limits::MAX_JACOBI_WINDOW)?;
        mulo_core::limits::at_most(
            "wavefront",
            self.wavefront,
            mulo_core::limits::MAX_WAVEFRONT,
        )?;
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

/// The sequential schedule: each pass queries the next position of every chain (island, or row
/// of one under a wavefront) that may go (feeding the positions sampled in the pass before) and
/// draws each from processed `p`. Without a wavefront, pass `t` queries the `t`-th position of
/// every island that has one.
async fn sequential(
    target: &mut Stream,
    rng: &mut TokenRng,
    islands: &[Vec<usize>],
    sched: Schedule,
    pass: &Pass<'_>,
    mut first: Option<Rows<'_>>,
) -> Result<(), EngineError> {
    let sched = Schedule { window: 1, ..sched };
    let mut runs = chains(islands, sched);
    let mut previous: Vec<usize> = Vec::new();
    loop {
        set_windows(&mut runs, sched);
        let mut queries: Vec<usize> = runs
            .iter()
            .filter(|r| r.end > r.next)
            .map(|r| r.positions[r.next])
            .collect();
        if queries.is_empty() {
            return Ok(());
        }
        queries.sort_unstable();
        let uniforms: Vec<f64> = queries.iter().map(|_| rng.next_uniform()).collect();
        let drawn = match first.take() {
            Some(rows) => queries
                .iter()
                .zip(&uniforms)
                .map(|(&q, &u)| draw(rows.at(q), u))
                .collect(),
            None => {
                let (p, _) = target.query(pass.params, &previous, &queries, None).await?;
                Vec::<i64>::try_from(sample_from_probs(&p, &uniforms).to_device(Device::Cpu))?
            }
        };
        for (&q, &t) in queries.iter().zip(&drawn) {
            target.book.set(q, t);
        }
        for r in &mut runs {
            r.next = r.end;
        }
        previous = queries;
    }
}

/// One chain under Jacobi passes (an island, or one row of it under a wavefront): its positions
/// in raster order, the first unsettled one, and the draft distribution of each unsettled guess
/// (`None`: a point mass on the current value).
struct Chain {
    positions: Vec<usize>,
    next: usize,
    /// End of this pass's window (`next..end` are queried).
    end: usize,
    q: Vec<Option<Vec<f32>>>,
    /// The island it belongs to, and its grid row (wavefront only).
    group: usize,
    row: usize,
}

impl Chain {
    fn new(positions: Vec<usize>, group: usize, row: usize) -> Self {
        let q = vec![None; positions.len()];
        Self {
            positions,
            next: 0,
            end: 0,
            q,
            group,
            row,
        }
    }
}

/// How a resample runs: positions per chain and pass, the wavefront lag (0: none), the grid width.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Schedule {
    pub window: usize,
    pub wavefront: usize,
    pub cols: usize,
}

/// The chains of `islands`: each island whole, or under a wavefront each of its rows.
fn chains(islands: &[Vec<usize>], sched: Schedule) -> Vec<Chain> {
    let mut out = Vec::new();
    for (g, island) in islands.iter().enumerate() {
        if sched.wavefront == 0 {
            out.push(Chain::new(island.clone(), g, 0));
            continue;
        }
        for row in island.chunk_by(|a, b| a / sched.cols == b / sched.cols) {
            out.push(Chain::new(row.to_vec(), g, row[0] / sched.cols));
        }
    }
    out
}

/// Sets each chain's window for this pass: up to `window` unsettled positions, under a wavefront
/// only those whose rows above are settled far enough (as of the start of the pass). Queries
/// that wait on guesses of the rows above were tried: they settle in fewer passes but feed so
/// many more tokens that images took longer (docs/methods.md).
fn set_windows(runs: &mut [Chain], sched: Schedule) {
    for i in 0..runs.len() {
        let (upper, rest) = runs.split_at_mut(i);
        let r = &mut rest[0];
        let cap = match sched.window {
            0 => r.positions.len(),
            w => (r.next + w).min(r.positions.len()),
        };
        r.end = r.next;
        while r.end < cap && settled_above(upper, r, r.end, sched) {
            r.end += 1;
        }
    }
}

/// Whether every row of `run`'s island above it is settled past column `col + lag·d` (`d` rows
/// up) for `run`'s position `k` in column `col`. Always true without a wavefront. (`upper`: the
/// chains before `run`, its island's rows above it among them.)
fn settled_above(upper: &[Chain], run: &Chain, k: usize, sched: Schedule) -> bool {
    if sched.wavefront == 0 {
        return true;
    }
    let col = run.positions[k] % sched.cols;
    upper.iter().filter(|u| u.group == run.group).all(|u| {
        u.positions
            .get(u.next)
            .is_none_or(|p| p % sched.cols > col + sched.wavefront * (run.row - u.row))
    })
}

/// Parallel Jacobi passes until every island is settled (see the module docs).
async fn jacobi(
    target: &mut Stream,
    rng: &mut TokenRng,
    islands: &[Vec<usize>],
    sched: Schedule,
    pass: &Pass<'_>,
    first: Option<Rows<'_>>,
) -> Result<(), EngineError> {
    let fault = pass.fault;
    let mut runs = chains(islands, sched);
    // Settled positions whose new value has not been fed yet.
    let mut changed: Vec<usize> = Vec::new();
    if let Some(rows) = first {
        // The verify's reading is a pass over every guess at once (they are the proposals it
        // read): walk each chain that may go as far as it passes; the others take their guesses
        // from it.
        set_windows(&mut runs, Schedule { window: 0, ..sched });
        for run in &mut runs {
            let from = run.next;
            if run.end == from {
                run.end = run.positions.len();
                redraw(run, from, &rows, target, rng);
            } else {
                step(run, &rows, target, rng, &mut changed, fault);
            }
        }
    }
    loop {
        set_windows(&mut runs, sched);
        let mut queries: Vec<usize> = runs
            .iter()
            .flat_map(|r| r.positions[r.next..r.end].iter().copied())
            .collect();
        if queries.is_empty() {
            return Ok(());
        }
        queries.sort_unstable();
        // The guesses are fed too, so that each query sees the ones before it, but a chain's
        // last one: nothing this pass reads past it. (Kept, it is fed with the chain's next
        // query, whose predecessor it is.) Nothing at or after the last query is read this pass
        // (a changed value there waits for a later one).
        let last = queries[queries.len() - 1];
        let tails: Vec<usize> = runs
            .iter()
            .filter(|r| r.end > r.next)
            .map(|r| r.positions[r.end - 1])
            .collect();
        let feed: Vec<usize> = changed
            .iter()
            .chain(queries.iter().filter(|q| !tails.contains(q)))
            .copied()
            .filter(|&p| p < last)
            .collect();
        changed.retain(|&p| p >= last);
        let fed = query_feed(&feed, &queries);
        let (p, _) = target.query(pass.params, &feed, &queries, None).await?;
        let p = host_rows(&p)?;
        let rows = Rows {
            p: &p,
            queries: &queries,
            vocab: pass.vocab,
            fed: &fed,
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
    /// The positions this pass fed (ascending).
    fed: &'a [usize],
}

impl Rows<'_> {
    fn at(&self, pos: usize) -> &[f32] {
        let k = self.queries.binary_search(&pos).unwrap_or(0);
        &self.p[k * self.vocab..(k + 1) * self.vocab]
    }
}

/// One chain's walk over this pass: keep guesses while they pass, settle the first rejected
/// position from the residual and redraw the guesses after it.
fn step(
    run: &mut Chain,
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
            if rows.fed.binary_search(&pos).is_err() {
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
        redraw(run, run.next, rows, target, rng);
        return;
    }
}

/// New guesses for `run`'s positions `from..end`, drawn from `rows` (their `q` from then on).
fn redraw(run: &mut Chain, from: usize, rows: &Rows<'_>, target: &mut Stream, rng: &mut TokenRng) {
    for j in from..run.end {
        let pj = rows.at(run.positions[j]);
        target
            .book
            .set(run.positions[j], draw(pj, rng.next_uniform()));
        run.q[j] = Some(pj.to_vec());
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

/// What a resample reads besides its plan: the sampling, the vocabulary, the grid width, a test
/// fault, and the verify pass's processed `p` over the pending block when it still holds
/// (host, `[pending, V]` flat): it answers the first pass without a forward.
pub(crate) struct Pass<'a> {
    pub params: &'a SamplingParams,
    pub vocab: usize,
    pub cols: usize,
    pub fault: JacobiFault,
    pub verified: Option<&'a [f32]>,
}

/// Runs `plan` on `target`'s pending block.
pub(crate) async fn run(
    target: &mut Stream,
    rng: &mut TokenRng,
    plan: &IslandPlan,
    pass: Pass<'_>,
) -> Result<(), EngineError> {
    let sched = Schedule {
        window: plan.window,
        wavefront: plan.wavefront,
        cols: pass.cols,
    };
    let (lo, hi) = (target.book.committed, target.book.tokens.len());
    let pending: Vec<usize> = (lo..hi).collect();
    let first = pass.verified.map(|p| Rows {
        p,
        queries: &pending,
        vocab: pass.vocab,
        // The verify fed every proposal but the last.
        fed: &pending[..pending.len().saturating_sub(1)],
    });
    let islands = &plan.islands;
    match plan.resampler {
        Resampler::Sequential => sequential(target, rng, islands, sched, &pass, first).await,
        Resampler::Jacobi => jacobi(target, rng, islands, sched, &pass, first).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(window: usize, wavefront: usize) -> Schedule {
        Schedule {
            window,
            wavefront,
            cols: 4,
        }
    }

    fn windows(runs: &[Chain]) -> Vec<(usize, usize)> {
        runs.iter().map(|r| (r.next, r.end)).collect()
    }

    #[test]
    fn without_a_wavefront_an_island_is_one_chain() {
        let s = sched(3, 0);
        let mut runs = chains(&[vec![1, 2, 5, 6], vec![11]], s);
        assert_eq!(runs.len(), 2);
        set_windows(&mut runs, s);
        assert_eq!(windows(&runs), [(0, 3), (0, 1)]);
    }

    #[test]
    fn a_wavefront_starts_each_row_once_the_rows_above_are_settled_far_enough() {
        // One island over three full rows of a 4-wide grid, and a second island in row 3.
        let s = sched(6, 1);
        let island: Vec<usize> = (0..12).collect();
        let mut runs = chains(&[island, vec![12, 13]], s);
        let rows: Vec<(usize, usize)> = runs.iter().map(|r| (r.group, r.row)).collect();
        assert_eq!(rows, [(0, 0), (0, 1), (0, 2), (1, 3)]);
        // At the start only the top row of each island is queried.
        set_windows(&mut runs, s);
        assert_eq!(windows(&runs), [(0, 4), (0, 0), (0, 0), (0, 2)]);
        // Row 0 settled through column 1: row 1 may query column 0 (needs row 0 past 0 + 1).
        runs[0].next = 2;
        set_windows(&mut runs, s);
        assert_eq!(windows(&runs), [(2, 4), (0, 1), (0, 0), (0, 2)]);
        // Row 0 settled through column 2, row 1 through column 1: row 2's column 0 needs row 1
        // past column 1 and row 0 past column 2.
        runs[0].next = 3;
        runs[1].next = 2;
        set_windows(&mut runs, s);
        assert_eq!(windows(&runs), [(3, 4), (2, 2), (0, 1), (0, 2)]);
        // A settled row frees every column below it.
        runs[0].next = 4;
        set_windows(&mut runs, s);
        assert_eq!(windows(&runs), [(4, 4), (2, 4), (0, 1), (0, 2)]);
    }

    #[test]
    fn the_window_caps_each_row() {
        let s = sched(2, 2);
        let mut runs = chains(&[(0..8).collect()], s);
        runs[0].next = 4;
        set_windows(&mut runs, s);
        assert_eq!(windows(&runs), [(4, 4), (0, 2)]);
    }
}
