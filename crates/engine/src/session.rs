//! What every stateful role call carries, and the per-session bookkeeping both roles share: which
//! token value each KV slot was computed from, so that a later call knows where the cache went
//! stale (DESIGN §2.2 step 6 and §5.2).

use mulo_core::{Condition, SamplingParams};
use mulo_model::gpt::Conditioning;
use std::cell::Cell;
use std::rc::Rc;

use mulo_model::Gpt;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::batching::{ForwardCall, Forwards, GroupInput, RowLease};
use crate::error::EngineError;

/// Opens a session on a role: the condition, the sampling parameters and the seed of its random
/// draws.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionSpec {
    /// Session id (unique per request).
    pub id: String,
    /// Epoch the caller starts at (a re-opened session gets a larger one).
    pub epoch: u64,
    /// Class or caption condition.
    pub condition: Condition,
    /// CFG, temperature, top-k, top-p.
    pub sampling: SamplingParams,
    /// Seed of the role's random draws for this session.
    pub seed: u64,
}

/// `(session_id, epoch, committed_len)` of a stateful call: a call whose epoch or committed length
/// does not match the role's own is refused (`FAILED_PRECONDITION` over gRPC) so a stale or
/// replayed call never corrupts a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRef {
    /// Session id.
    pub id: String,
    /// The caller's epoch.
    pub epoch: u64,
    /// Tokens the caller has committed (before this call applies anything).
    pub committed: usize,
}

/// Token values of a grid under generation and the value each KV slot was computed from.
#[derive(Debug, Clone)]
pub(crate) struct SlotBook {
    /// Current values of positions `0..tokens.len()` (committed, then pending).
    pub tokens: Vec<i64>,
    /// Committed positions.
    pub committed: usize,
    /// `fed[j]`: the value slot `j` was computed from, `None` when not (validly) written.
    pub fed: Vec<Option<i64>>,
    /// Smallest position whose value changed after slots behind it were computed: every slot at
    /// or after it is stale even where `fed` matches.
    pub changed_from: Option<usize>,
}

impl SlotBook {
    pub fn new(len: usize) -> Self {
        Self {
            tokens: Vec::with_capacity(len),
            committed: 0,
            fed: vec![None; len],
            changed_from: None,
        }
    }

    /// Pending (uncommitted) positions.
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.committed
    }

    /// First slot that must be re-fed before a query after the committed prefix: the first slot
    /// whose value differs from what it was computed from, or where an earlier change made it
    /// stale. At most `committed` (the last committed token is usually unfed).
    pub fn refresh_start(&self) -> usize {
        let mismatch = (0..self.committed)
            .find(|&j| self.fed[j] != Some(self.tokens[j]))
            .unwrap_or(self.committed);
        mismatch.min(self.changed_from.unwrap_or(usize::MAX))
    }

    /// Records that slots `positions` now hold the current values, and forgets every slot after
    /// the last of them (they were computed in a context that no longer holds).
    pub fn mark_fed(&mut self, positions: &[usize]) {
        for &p in positions {
            // A placeholder (negative: not drafted yet) leaves the slot unusable.
            self.fed[p] = self.tokens.get(p).copied().filter(|&t| t >= 0);
        }
    }

    /// Forgets slots at and after `from`.
    pub fn forget_from(&mut self, from: usize) {
        for f in self.fed.iter_mut().skip(from) {
            *f = None;
        }
    }

    /// Sets a value; a change of an earlier-fed context moves `changed_from`.
    pub fn set(&mut self, pos: usize, value: i64) {
        if self.tokens[pos] != value {
            self.tokens[pos] = value;
            self.changed_from = Some(self.changed_from.map_or(pos, |c| c.min(pos)));
        }
    }

    /// Makes the pending values final: `values` must cover exactly the pending positions. A value
    /// that differs from the role's own is taken (the caller owns the committed grid) and makes
    /// the slots from there on stale.
    pub fn commit(&mut self, values: &[i64]) -> Result<(), EngineError> {
        if values.len() != self.pending() {
            return Err(EngineError::Precondition(format!(
                "commit of {} tokens, but {} are pending",
                values.len(),
                self.pending()
            )));
        }
        self.commit_first(values)
    }

    /// Makes the first `values.len()` pending values final (a pipelined drafter keeps the block
    /// after them pending); a changed value makes every slot from there on stale.
    pub fn commit_first(&mut self, values: &[i64]) -> Result<(), EngineError> {
        if values.len() > self.pending() {
            return Err(EngineError::Precondition(format!(
                "commit of {} tokens, but {} are pending",
                values.len(),
                self.pending()
            )));
        }
        for (i, &v) in values.iter().enumerate() {
            self.set(self.committed + i, v);
        }
        self.committed += values.len();
        Ok(())
    }

    /// Pending positions whose slot does not hold their current value: never fed, or fed before
    /// an earlier value changed.
    pub fn stale_pending(&self) -> Vec<usize> {
        (self.committed..self.tokens.len())
            .filter(|&j| {
                self.fed[j] != Some(self.tokens[j]) || self.changed_from.is_some_and(|c| c <= j)
            })
            .collect()
    }

    /// After a refresh up to the committed prefix, nothing before it is stale.
    pub fn refreshed(&mut self) {
        if self.changed_from.is_some_and(|c| c < self.committed) {
            self.changed_from = None;
        }
    }
}

/// Where a stream's forwards go: its model, the model's index in the role's batching, and the
/// role's request queue.
#[derive(Clone)]
pub(crate) struct Fw {
    pub model: Rc<Gpt>,
    pub index: usize,
    pub queue: Rc<Forwards>,
}

/// One session on one model: its cache rows in the model's pool, its slot bookkeeping and its
/// first-token probabilities. The one place where both roles feed tokens and read processed `p`;
/// every forward is a request to the role's scheduler (batched with other sessions').
pub(crate) struct Stream {
    pub lease: RowLease,
    pub book: SlotBook,
    /// Processed `p` `[1, V]` of grid position 0 (from the prefill).
    pub first: Tensor,
    /// Forward passes run by [`Stream::feed`] (the prefill not included): what a call spent is
    /// the difference, so that a query answered from the prefill's logits costs none.
    pub passes: usize,
    fw: Fw,
    /// False once the session is released or replaced: its queued forwards are dropped.
    alive: Rc<Cell<bool>>,
}

impl Stream {
    /// Prefills the condition into the leased rows.
    pub async fn open(
        fw: Fw,
        lease: RowLease,
        alive: Rc<Cell<bool>>,
        cond: Conditioning,
        params: &SamplingParams,
    ) -> Result<Self, EngineError> {
        let n = fw.model.config().grid.len();
        let cls = fw.model.config().cls_token_num;
        let probs = fw
            .queue
            .submit(ForwardCall {
                model: fw.index,
                input: GroupInput::Condition(cond),
                rows: lease.rows.clone(),
                positions: (0..cls).collect(),
                mask: None,
                read: vec![cls - 1],
                params: *params,
                alive: alive.clone(),
            })
            .await?;
        Ok(Self {
            // A copy: the answer is a slice of every same-parameter request's probabilities of
            // that round, which the session would otherwise keep alive.
            first: probs.copy(),
            lease,
            book: SlotBook::new(n),
            passes: 0,
            fw,
            alive,
        })
    }

    /// Feeds the values at `positions` (ascending) in one forward and returns the processed `p`
    /// predicting position `q + 1` for each `q` in `read` (a subset of `positions`):
    /// `[read.len(), V]`. With `rows = Some(w)` (ZipAR drafting on rows of `w`), a position not
    /// drafted yet is fed the last token drafted before it in its row, and every input sees only
    /// the slots that hold current values (and its own).
    pub async fn feed(
        &mut self,
        params: &SamplingParams,
        positions: &[usize],
        read: &[usize],
        rows: Option<usize>,
    ) -> Result<Tensor, EngineError> {
        let model = &self.fw.model;
        let cls = model.config().cls_token_num;
        let tokens = &self.book.tokens;
        let values: Vec<i64> = positions
            .iter()
            .map(|&p| match rows {
                Some(w) => (p - p % w..=p)
                    .rev()
                    .map(|i| tokens[i])
                    .find(|&t| t >= 0)
                    .unwrap_or(0),
                None => tokens[p],
            })
            .collect();
        let abs: Vec<i64> = positions.iter().map(|&p| cls + p as i64).collect();
        let mask = rows.map(|_| {
            let mut ready: Vec<bool> = (0..self.book.fed.len())
                .map(|j| j < tokens.len() && self.book.fed[j] == Some(tokens[j]))
                .collect();
            for &f in positions {
                ready[f] = tokens[f] >= 0;
            }
            ready_mask(cls, positions, &ready, model.device())
        });
        let idx: Vec<i64> = read
            .iter()
            .map(|r| positions.iter().position(|p| p == r).unwrap_or(0) as i64)
            .collect();
        let probs = self
            .fw
            .queue
            .submit(ForwardCall {
                model: self.fw.index,
                input: GroupInput::Tokens(values),
                rows: self.lease.rows.clone(),
                positions: abs,
                mask,
                read: idx,
                params: *params,
                alive: self.alive.clone(),
            })
            .await?;
        self.passes += 1;
        self.book.mark_fed(positions);
        Ok(probs)
    }

    /// Processed `p` for each grid position in `queries` (ascending), feeding the stale committed
    /// slots first (the merged refresh), the `extra` positions and each query's predecessor in
    /// one forward. Returns `(p [queries, V], refreshed)`.
    pub async fn query(
        &mut self,
        params: &SamplingParams,
        extra: &[usize],
        queries: &[usize],
        rows: Option<usize>,
    ) -> Result<(Tensor, usize), EngineError> {
        let start = self.book.refresh_start();
        let refreshed = self.book.committed.saturating_sub(start);
        let mut feed: Vec<usize> = (start..self.book.committed).collect();
        feed.extend(query_feed(extra, queries));
        feed.sort_unstable();
        feed.dedup();
        let read: Vec<usize> = queries.iter().filter(|&&q| q > 0).map(|q| q - 1).collect();
        let mut out = Vec::new();
        if queries.first() == Some(&0) {
            out.push(self.first.shallow_clone());
        }
        if !feed.is_empty() {
            out.push(self.feed(params, &feed, &read, rows).await?);
        }
        if start < self.book.committed {
            self.book.refreshed();
        }
        Ok((Tensor::cat(&out, 0), refreshed))
    }
}

/// The pending positions a [`Stream::query`] feeds (ascending): `extra` and each query's
/// predecessor (the stale committed slots it refreshes come on top).
pub(crate) fn query_feed(extra: &[usize], queries: &[usize]) -> Vec<usize> {
    let mut feed: Vec<usize> = extra
        .iter()
        .copied()
        .chain(queries.iter().filter_map(|q| q.checked_sub(1)))
        .collect();
    feed.sort_unstable();
    feed.dedup();
    feed
}

/// Processed `p` rows on the host, flat (`[rows · V]` as f32).
pub(crate) fn host_rows(p: &Tensor) -> Result<Vec<f32>, EngineError> {
    Ok(Vec::<f32>::try_from(
        p.to_kind(tch::Kind::Float)
            .to_device(Device::Cpu)
            .reshape([-1]),
    )?)
}

/// Bool `[S, W]` mask: input `s` at grid position `positions[s]` sees the condition and every
/// grid slot `j ≤ positions[s]` that holds its current value (`ready[j]`), and its own slot.
fn ready_mask(cls: i64, positions: &[usize], ready: &[bool], device: Device) -> Tensor {
    let cls = cls as usize;
    let w = cls + positions.iter().max().map_or(0, |m| m + 1);
    let mut m = vec![false; positions.len() * w];
    for (s, &p) in positions.iter().enumerate() {
        for j in 0..w {
            m[s * w + j] = j < cls || {
                let g = j - cls;
                g <= p && (ready[g] || g == p)
            };
        }
    }
    Tensor::from_slice(&m)
        .view([positions.len() as i64, w as i64])
        .to_device(device)
}

/// The condition as `model`'s caption tokenizer sees it: a text prompt becomes that model's word
/// ids (each model of a family carries its own vocabulary).
pub(crate) fn condition_for(
    cond: &Condition,
    tokenizer: Option<&mulo_core::caption::CaptionTokenizer>,
) -> Condition {
    match (cond, tokenizer) {
        (Condition::Prompt(_), Some(tok)) => crate::prompt::tokenize_prompt(tok, cond.clone()).0,
        _ => cond.clone(),
    }
}

/// A live session as the table holds it: shared with the op that runs a call on it, and a flag
/// that drops its queued forwards once it leaves the table.
pub(crate) type Shared<S> = Rc<crate::batching::Home<S>>;

struct Entry<S> {
    session: Shared<S>,
    alive: Rc<Cell<bool>>,
    used: std::time::Instant,
    kv_bytes: i64,
}

impl<S> Drop for Entry<S> {
    fn drop(&mut self) {
        self.alive.set(false);
    }
}

/// A role's live sessions by id, with a capacity and an idle clock per session.
pub(crate) struct SessionTable<S> {
    role: &'static str,
    max: usize,
    map: std::collections::HashMap<String, Entry<S>>,
}

impl<S> SessionTable<S> {
    /// An empty table of room `max` (at least 1) for the named role.
    pub(crate) fn new(role: &'static str, max: usize) -> Self {
        let t = Self {
            role,
            max: max.max(1),
            map: std::collections::HashMap::new(),
        };
        metrics::gauge!(mulo_core::metrics::SESSION_LIMIT, "role" => role).set(t.max as f64);
        t.report();
        t
    }

    /// Sets the live-session and KV gauges of the role.
    fn report(&self) {
        use mulo_core::metrics::{KV_CACHE_BYTES, SESSIONS};
        metrics::gauge!(SESSIONS, "role" => self.role).set(self.map.len() as f64);
        let kv: i64 = self.map.values().map(|e| e.kv_bytes).sum();
        metrics::gauge!(KV_CACHE_BYTES, "role" => self.role).set(kv as f64);
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn limit(&self) -> usize {
        self.max
    }

    /// Refuses a new id when the table is full (re-opening a live id is always allowed).
    pub(crate) fn check_room(&self, id: &str) -> Result<(), EngineError> {
        if !self.map.contains_key(id) && self.map.len() >= self.max {
            return Err(EngineError::Capacity(format!(
                "the {} holds {} sessions, its limit",
                self.role, self.max
            )));
        }
        Ok(())
    }

    /// Adds (or replaces) a session holding `kv_bytes` of KV cache; `alive` is the flag its
    /// streams' forwards carry. Refused when the table filled up meanwhile.
    pub(crate) fn insert(
        &mut self,
        id: &str,
        s: S,
        alive: Rc<Cell<bool>>,
        kv_bytes: i64,
    ) -> Result<(), EngineError> {
        self.check_room(id)?;
        let entry = Entry {
            session: crate::batching::Home::new(s),
            alive,
            used: std::time::Instant::now(),
            kv_bytes,
        };
        self.map.insert(id.to_string(), entry);
        self.report();
        Ok(())
    }

    /// Frees a session (idempotent).
    pub(crate) fn release(&mut self, id: &str) -> bool {
        let freed = self.map.remove(id).is_some();
        self.report();
        freed
    }

    /// Frees sessions idle for longer than `ttl` (a session a call holds is not idle); returns
    /// how many.
    pub(crate) fn expire(&mut self, ttl: std::time::Duration) -> usize {
        let before = self.map.len();
        self.map.retain(|_, e| {
            let held = e.session.peek(|_| ()).is_none();
            held || e.used.elapsed() <= ttl
        });
        self.report();
        before - self.map.len()
    }

    /// The session, without touching its idle clock.
    pub(crate) fn peek(&self, id: &str) -> Result<Shared<S>, EngineError> {
        self.map
            .get(id)
            .map(|e| e.session.clone())
            .ok_or_else(|| EngineError::UnknownSession(id.to_string()))
    }

    /// The session, marked as used now.
    pub(crate) fn get(&mut self, id: &str) -> Result<Shared<S>, EngineError> {
        let e = self
            .map
            .get_mut(id)
            .ok_or_else(|| EngineError::UnknownSession(id.to_string()))?;
        e.used = std::time::Instant::now();
        Ok(e.session.clone())
    }
}

/// Checks a call's session reference against the role's session.
pub(crate) fn check_ref(r: &SessionRef, epoch: u64, committed: usize) -> Result<(), EngineError> {
    if r.epoch != epoch {
        return Err(EngineError::Precondition(format!(
            "session {} is at epoch {epoch}, the call carries epoch {}",
            r.id, r.epoch
        )));
    }
    if r.committed != committed {
        return Err(EngineError::Precondition(format!(
            "session {} has {committed} committed tokens, the call says {}",
            r.id, r.committed
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_starts_at_the_first_stale_slot() {
        let mut b = SlotBook::new(8);
        b.tokens = vec![1, 2, 3, 4];
        b.mark_fed(&[0, 1, 2]);
        assert_eq!(b.pending(), 4);
        b.commit(&[1, 2, 3, 4]).unwrap();
        // The last committed token was never fed.
        assert_eq!(b.refresh_start(), 3);
        b.mark_fed(&[3]);
        assert_eq!(b.refresh_start(), 4);
        // A pending value changes after slot 5 was computed with the old value of 4.
        b.tokens.extend([5, 6, 7]);
        b.mark_fed(&[4, 5]);
        b.set(4, 9);
        b.mark_fed(&[4]);
        assert_eq!(b.changed_from, Some(4));
        b.commit(&[9, 6, 7]).unwrap();
        // Slot 4 holds 9 again, but slot 5 was computed with 5 before it: refresh from 4.
        assert_eq!(b.refresh_start(), 4);
        b.mark_fed(&[4, 5, 6]);
        b.refreshed();
        assert_eq!(b.refresh_start(), 7);
        assert!(b.commit(&[1]).is_err(), "nothing pending");
    }
}
