//! Continuous batching on the torch thread (issue 17).
//!
//! A role call is an *op*: a future that runs on the torch thread and awaits each forward pass it
//! needs. Ops do not run forwards themselves: they queue a request (their session's cache rows,
//! inputs, positions, mask and the inputs whose logits they read) and wait. A scheduler round
//! polls every op once, then runs the queued requests of each model as one batched forward over
//! that model's shared KV pool and hands every op its logits. An AR decode therefore advances one
//! token per round beside every other session's work, and a released session's request is dropped
//! before it runs.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use mulo_core::SamplingParams;
use mulo_model::gpt::Conditioning;
use mulo_model::sampling::process_probs;
use mulo_model::{BatchInput, Gpt, KvCache};
use tch::Tensor;

use crate::error::EngineError;

/// A role call running on the torch thread.
pub type LocalOp<R> = Pin<Box<dyn Future<Output = R>>>;

/// How much one batched forward may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Sessions (request groups) per forward; 1 turns batching off.
    pub max_sessions: usize,
    /// Input tokens per forward (rows × inputs summed over the groups); a single request larger
    /// than this still runs, alone.
    pub max_tokens: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            max_sessions: 16,
            max_tokens: 4096,
        }
    }
}

/// Batched forwards run and the sessions they served.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BatchStats {
    /// Forward passes run by the scheduler.
    pub forwards: u64,
    /// Sessions (request groups) those passes served, summed.
    pub sessions: u64,
}

impl BatchStats {
    /// Sessions per forward pass (0 before the first).
    pub fn mean_sessions(&self) -> f64 {
        if self.forwards == 0 {
            0.0
        } else {
            self.sessions as f64 / self.forwards as f64
        }
    }

    /// Both counts added.
    pub fn plus(self, other: BatchStats) -> BatchStats {
        BatchStats {
            forwards: self.forwards + other.forwards,
            sessions: self.sessions + other.sessions,
        }
    }
}

/// What a request feeds: image tokens, or a condition (a prefill).
pub(crate) enum GroupInput {
    Tokens(Vec<i64>),
    Condition(Conditioning),
}

/// Where a round puts a request's result.
pub(crate) type Reply = Rc<RefCell<Option<Result<Tensor, EngineError>>>>;

/// A reply slot and the future that resolves when a round fills it.
pub(crate) fn reply_slot() -> (Reply, ReplyFuture) {
    let reply: Reply = Rc::default();
    (reply.clone(), ReplyFuture(reply))
}

struct Request {
    model: usize,
    input: GroupInput,
    rows: Vec<i64>,
    positions: Vec<i64>,
    mask: Option<Tensor>,
    read: Vec<i64>,
    params: SamplingParams,
    alive: Rc<Cell<bool>>,
    reply: Reply,
    submitted: std::time::Instant,
}

impl Request {
    fn tokens(&self) -> usize {
        self.rows.len() * self.positions.len()
    }
}

/// The forward requests of one role's ops, in the order they were made.
#[derive(Default)]
pub(crate) struct Forwards {
    queue: RefCell<VecDeque<Request>>,
}

/// Resolves with a request's logits once a round has run it.
pub(crate) struct ReplyFuture(Reply);

impl Future for ReplyFuture {
    type Output = Result<Tensor, EngineError>;

    fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.0.borrow_mut().take() {
            Some(r) => Poll::Ready(r),
            None => Poll::Pending,
        }
    }
}

/// One forward an op asks for, on the model with index `model` of its role.
pub(crate) struct ForwardCall {
    pub model: usize,
    pub input: GroupInput,
    pub rows: Vec<i64>,
    pub positions: Vec<i64>,
    pub mask: Option<Tensor>,
    /// Indices of the inputs whose next-token probabilities the op reads.
    pub read: Vec<i64>,
    /// How the logits become probabilities (CFG over the rows, temperature, top-k, top-p).
    pub params: SamplingParams,
    /// False once the session is released: the request is dropped before it runs.
    pub alive: Rc<Cell<bool>>,
}

impl Forwards {
    /// Queues `call`; the future gives the processed probabilities `[read, V]` (fp32) of its
    /// `read` inputs (the rows combined by CFG).
    pub(crate) fn submit(&self, call: ForwardCall) -> ReplyFuture {
        let (reply, future) = reply_slot();
        self.queue.borrow_mut().push_back(Request {
            model: call.model,
            input: call.input,
            rows: call.rows,
            positions: call.positions,
            mask: call.mask,
            read: call.read,
            params: call.params,
            alive: call.alive,
            reply,
            submitted: std::time::Instant::now(),
        });
        future
    }

    /// Requests waiting.
    pub(crate) fn len(&self) -> usize {
        self.queue.borrow().len()
    }

    /// Answers the requests of released sessions, then takes the oldest requests of each model
    /// that fit `limits` (at least one per model), in queue order: what waits longest runs first.
    fn take_round(&self, models: usize, limits: BatchLimits) -> Vec<Vec<Request>> {
        let mut q = self.queue.borrow_mut();
        let mut out: Vec<Vec<Request>> = (0..models).map(|_| Vec::new()).collect();
        let mut tokens = vec![0usize; models];
        let mut rest = VecDeque::new();
        while let Some(r) = q.pop_front() {
            if !r.alive.get() {
                *r.reply.borrow_mut() = Some(Err(EngineError::UnknownSession(
                    "released while its call waited".into(),
                )));
                continue;
            }
            let m = r.model.min(models.saturating_sub(1));
            let fits = out[m].is_empty()
                || (out[m].len() < limits.max_sessions.max(1)
                    && tokens[m] + r.tokens() <= limits.max_tokens);
            if fits {
                tokens[m] += r.tokens();
                out[m].push(r);
            } else {
                rest.push_back(r);
            }
        }
        *q = rest;
        out
    }
}

/// A model's KV pool: one cache whose rows the sessions lease (one row, two with CFG), grown as
/// sessions arrive (to at most `max_rows`) and reused as they leave.
pub(crate) struct RowPool {
    pub cache: KvCache,
    free: Rc<RefCell<BTreeSet<i64>>>,
    max_rows: i64,
}

/// Cache rows a session holds; they go back to the pool when the session is dropped.
#[derive(Debug)]
pub(crate) struct RowLease {
    pub rows: Vec<i64>,
    free: Rc<RefCell<BTreeSet<i64>>>,
}

impl Drop for RowLease {
    fn drop(&mut self) {
        self.free.borrow_mut().extend(self.rows.drain(..));
    }
}

impl RowPool {
    /// A pool of `rows` rows (growing to at most `max_rows`) for sequences of up to `capacity`
    /// positions of `model`.
    pub(crate) fn new(
        model: &Gpt,
        rows: i64,
        max_rows: i64,
        capacity: i64,
    ) -> Result<Self, EngineError> {
        let max_rows = max_rows.max(1);
        let rows = rows.clamp(1, max_rows);
        Ok(Self {
            cache: model.new_cache(rows, capacity)?,
            free: Rc::new(RefCell::new((0..rows).collect())),
            max_rows,
        })
    }

    /// Grows the pool to at least `rows` rows (warm-up: the first sessions then allocate no KV).
    pub(crate) fn reserve(&mut self, rows: i64) -> Result<(), EngineError> {
        let rows = rows.min(self.max_rows);
        let old = self.cache.batch();
        if rows > old {
            self.cache.grow(rows)?;
            self.free.borrow_mut().extend(old..rows);
        }
        Ok(())
    }

    /// `n` rows, growing the pool (doubling it) when too few are free: the lowest `n` adjacent
    /// free rows when there are such, else the lowest `n`, in ascending order. Sessions then sit
    /// next to each other, and a batched forward reads their keys and values by view
    /// ([`mulo_model::BatchInput`]) instead of gathering them.
    pub(crate) fn lease(&mut self, n: usize) -> Result<RowLease, EngineError> {
        let missing = n.saturating_sub(self.free.borrow().len()) as i64;
        if missing > 0 {
            let old = self.cache.batch();
            if old + missing > self.max_rows {
                return Err(EngineError::Capacity(format!(
                    "the KV pool's {} rows are all held (opens in flight count too)",
                    self.max_rows
                )));
            }
            self.reserve((old * 2).max(old + missing))?;
        }
        let mut free = self.free.borrow_mut();
        let rows = lowest_run(&free, n).unwrap_or_else(|| free.iter().copied().take(n).collect());
        for r in &rows {
            free.remove(r);
        }
        Ok(RowLease {
            rows,
            free: self.free.clone(),
        })
    }

    /// Bytes of KV the pool holds.
    pub(crate) fn bytes(&self) -> i64 {
        self.cache.bytes()
    }
}

/// The lowest `n` consecutive numbers in `free`, if it holds such a run.
fn lowest_run(free: &BTreeSet<i64>, n: usize) -> Option<Vec<i64>> {
    let mut run: Vec<i64> = Vec::with_capacity(n);
    for &r in free {
        if run.last().is_some_and(|&l| l + 1 != r) {
            run.clear();
        }
        run.push(r);
        if run.len() == n {
            return Some(run);
        }
    }
    None
}

/// Runs one round of `forwards`: for each model (`models[i]` with its pool) one batched forward
/// of the requests that fit `limits`, each request answered with its logits. A batch the model
/// refuses is retried request by request, so that one bad request fails alone.
pub(crate) fn run_round(
    forwards: &Forwards,
    models: &mut [(&Gpt, &mut RowPool)],
    limits: BatchLimits,
) -> BatchStats {
    let rounds = forwards.take_round(models.len(), limits);
    let mut stats = BatchStats::default();
    for (requests, (model, pool)) in rounds.into_iter().zip(models.iter_mut()) {
        if requests.is_empty() {
            continue;
        }
        stats.forwards += 1;
        stats.sessions += requests.len() as u64;
        let label = model.metrics_label();
        for r in &requests {
            metrics::histogram!(mulo_core::metrics::QUEUE_WAIT, "model" => label)
                .record(r.submitted.elapsed().as_secs_f64());
        }
        metrics::histogram!(mulo_core::metrics::BATCH_SESSIONS, "model" => label)
            .record(requests.len() as f64);
        match forward(model, &mut pool.cache, &requests) {
            Ok(logits) => {
                for (r, l) in requests.iter().zip(logits) {
                    *r.reply.borrow_mut() = Some(Ok(l));
                }
            }
            Err(_) if requests.len() > 1 => {
                for r in &requests {
                    let one = forward(model, &mut pool.cache, std::slice::from_ref(r));
                    *r.reply.borrow_mut() = Some(one.map(|mut l| l.remove(0)));
                }
            }
            Err(e) => *requests[0].reply.borrow_mut() = Some(Err(e)),
        }
    }
    stats
}

/// One batched forward of `requests` and the logits `[rows, read, V]` each reads (one head for
/// all of them).
fn forward(
    model: &Gpt,
    cache: &mut KvCache,
    requests: &[Request],
) -> Result<Vec<Tensor>, EngineError> {
    let mut groups = Vec::with_capacity(requests.len());
    for r in requests {
        groups.push(match &r.input {
            GroupInput::Tokens(t) => BatchInput {
                x: model.embed_tokens(t, r.rows.len() as i64)?,
                rows: r.rows.clone(),
                positions: r.positions.clone(),
                mask: r.mask.as_ref().map(Tensor::shallow_clone),
            },
            GroupInput::Condition(c) => model.condition_input(c, r.rows.clone(), cache)?,
        });
    }
    let hs = model.forward_batch(&groups, cache)?;
    let device = model.device();
    let (dim, vocab) = (model.config().dim, model.config().vocab_size);
    let mut picked = Vec::with_capacity(hs.len());
    let mut shapes = Vec::with_capacity(hs.len());
    for (h, r) in hs.iter().zip(requests) {
        let idx = Tensor::from_slice(&r.read).to_device(device);
        let sel = h.index_select(1, &idx);
        let (n, k) = (sel.size()[0], sel.size()[1]);
        // Explicit sizes: a request may read nothing (k = 0).
        picked.push(sel.reshape([n * k, dim]));
        shapes.push((n, k));
    }
    let logits = model.head(&Tensor::cat(&picked, 0));
    let mut at = 0;
    let per_request: Vec<Tensor> = shapes
        .iter()
        .map(|&(n, k)| {
            at += n * k;
            logits.narrow(0, at - n * k, n * k).view([n, k, vocab])
        })
        .collect();
    Ok(probabilities(&per_request, requests))
}

/// Each request's processed probabilities `[k, V]` from its logits `[n, k, V]`: the requests
/// with the same sampling parameters and number of rows are processed in one go.
fn probabilities(logits: &[Tensor], requests: &[Request]) -> Vec<Tensor> {
    let mut kinds: Vec<(SamplingParams, usize, Vec<usize>)> = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        match kinds
            .iter_mut()
            .find(|(p, n, _)| *p == r.params && *n == r.rows.len())
        {
            Some((_, _, members)) => members.push(i),
            None => kinds.push((r.params, r.rows.len(), vec![i])),
        }
    }
    let mut out: Vec<Option<Tensor>> = (0..requests.len()).map(|_| None).collect();
    for (params, _, members) in kinds {
        let parts: Vec<&Tensor> = members.iter().map(|&i| &logits[i]).collect();
        let p = process_probs(&Tensor::cat(&parts, 1), &params);
        let mut at = 0;
        for &i in &members {
            let k = logits[i].size()[1];
            out[i] = Some(p.narrow(0, at, k));
            at += k;
        }
    }
    out.into_iter().flatten().collect()
}

/// The ops of a process, polled once per round.
#[derive(Default)]
pub struct Ops {
    ops: Vec<LocalOp<()>>,
}

impl std::fmt::Debug for Ops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ops")
            .field("running", &self.ops.len())
            .finish()
    }
}

impl Ops {
    /// Adds an op; it first runs at the next poll.
    pub fn spawn(&mut self, op: LocalOp<()>) {
        self.ops.push(op);
    }

    /// Ops running or waiting.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// True when no op runs.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Polls every op once and drops the finished ones.
    pub fn poll_all(&mut self) {
        let mut cx = Context::from_waker(Waker::noop());
        self.ops
            .retain_mut(|op| op.as_mut().poll(&mut cx).is_pending());
    }
}

/// Runs `fut` to completion on this thread, running `round` whenever it waits (the synchronous
/// form of an op, for callers that own the role outright: tests, tools).
pub(crate) fn block_on<R>(fut: impl Future<Output = R>, mut round: impl FnMut()) -> R {
    let mut fut = std::pin::pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
            return r;
        }
        round();
    }
}

/// Waits one round.
pub(crate) async fn next_round() {
    let mut yielded = false;
    std::future::poll_fn(move |_| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            Poll::Pending
        }
    })
    .await;
}

/// A session's home in its role's table: empty while an op holds the session.
pub(crate) struct Home<T>(RefCell<Option<T>>);

impl<T> Home<T> {
    pub(crate) fn new(value: T) -> Rc<Self> {
        Rc::new(Self(RefCell::new(Some(value))))
    }

    /// Reads the session now, unless an op holds it.
    pub(crate) fn peek<R>(&self, f: impl FnOnce(&T) -> R) -> Option<R> {
        self.0.try_borrow().ok()?.as_ref().map(f)
    }
}

/// A session taken from its home by an op; it goes back when the op ends (or is dropped).
pub(crate) struct Held<T> {
    home: Rc<Home<T>>,
    value: Option<T>,
}

impl<T> std::ops::Deref for Held<T> {
    type Target = T;
    fn deref(&self) -> &T {
        match &self.value {
            Some(v) => v,
            None => unreachable!("a held session is only emptied by its drop"),
        }
    }
}

impl<T> std::ops::DerefMut for Held<T> {
    fn deref_mut(&mut self) -> &mut T {
        match &mut self.value {
            Some(v) => v,
            None => unreachable!("a held session is only emptied by its drop"),
        }
    }
}

impl<T> Drop for Held<T> {
    fn drop(&mut self) {
        if let Ok(mut home) = self.home.0.try_borrow_mut() {
            *home = self.value.take();
        }
    }
}

/// The session, once no other op holds it (calls of one session run one after another).
pub(crate) async fn hold<T>(home: Rc<Home<T>>) -> Held<T> {
    loop {
        let taken = home.0.try_borrow_mut().ok().and_then(|mut h| h.take());
        if let Some(value) = taken {
            return Held {
                home,
                value: Some(value),
            };
        }
        next_round().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_run_prefers_adjacent_rows() {
        let free: BTreeSet<i64> = [0, 2, 3, 5, 6, 7].into_iter().collect();
        assert_eq!(lowest_run(&free, 1), Some(vec![0]));
        assert_eq!(lowest_run(&free, 2), Some(vec![2, 3]));
        assert_eq!(lowest_run(&free, 3), Some(vec![5, 6, 7]));
        assert_eq!(lowest_run(&free, 4), None);
    }
}
