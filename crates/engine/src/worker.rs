//! The one thread of a process that runs torch.
//!
//! libtorch called from several OS threads gives each its own OpenMP pool and made decoding 4–6×
//! slower here, so every model of a process is created, loaded and run on one dedicated thread fed
//! by a channel. The state `S` (the loaded models) lives on that thread only.
//!
//! Jobs are short (they admit a role call as an op, answer a status, free a session; an open
//! also encodes its prompt or down-samples migrated tokens there); while the state has ops running ([`Rounds::busy`]) the thread takes every job waiting and then runs one
//! scheduler round ([`Rounds::round`]), so that a job never waits behind a whole generation.

use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::error::EngineError;

type Job<S> = Box<dyn FnOnce(&mut S) + Send>;

/// State that runs batched work in rounds between jobs.
pub trait Rounds {
    /// True while work waits for a round.
    fn busy(&self) -> bool {
        false
    }

    /// Runs one round of the waiting work.
    fn round(&mut self) {}
}

/// Runs jobs as they come and, with `rounds`, rounds while the state is busy, until every sender
/// is gone.
fn serve<S>(state: &mut S, rx: &mpsc::Receiver<Job<S>>, rounds: Option<Hooks<S>>) {
    loop {
        let job = if let Some((busy, round)) = rounds.filter(|(busy, _)| busy(state)) {
            let _ = busy;
            match rx.try_recv() {
                Ok(job) => job,
                Err(mpsc::TryRecvError::Empty) => {
                    round(state);
                    continue;
                }
                Err(mpsc::TryRecvError::Disconnected) => return,
            }
        } else {
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        job(state);
    }
}

/// A dedicated torch thread owning state `S`.
pub struct TorchWorker<S> {
    tx: Option<mpsc::Sender<Job<S>>>,
    handle: Option<JoinHandle<()>>,
    rounds: bool,
    failed: tokio::sync::watch::Receiver<bool>,
}

/// Set when the torch thread dies of a panic (a bug, or libtorch throwing — CUDA out of memory in
/// a forward). Declared before the state, so it is dropped after it: by the time the flag is up,
/// every call the state held has failed with [`EngineError::WorkerGone`].
struct PanicFlag(tokio::sync::watch::Sender<bool>);

impl Drop for PanicFlag {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self.0.send(true);
        }
    }
}

impl<S> std::fmt::Debug for TorchWorker<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchWorker").finish_non_exhaustive()
    }
}

type Hooks<S> = (fn(&S) -> bool, fn(&mut S));

impl<S: Rounds + 'static> TorchWorker<S> {
    /// [`TorchWorker::spawn`] for a state that batches: between jobs, while it is busy, the
    /// thread runs its rounds.
    pub fn spawn_rounds<F, E>(name: &str, init: F) -> Result<Self, E>
    where
        F: FnOnce() -> Result<S, E> + Send + 'static,
        E: From<EngineError> + Send + 'static,
    {
        Self::start(name, init, Some((S::busy, S::round)))
    }
}

impl<S: 'static> TorchWorker<S> {
    /// Starts the thread and builds the state on it with `init` (model loading belongs there);
    /// an error of `init` is returned as is.
    pub fn spawn<F, E>(name: &str, init: F) -> Result<Self, E>
    where
        F: FnOnce() -> Result<S, E> + Send + 'static,
        E: From<EngineError> + Send + 'static,
    {
        Self::start(name, init, None)
    }

    fn start<F, E>(name: &str, init: F, rounds: Option<Hooks<S>>) -> Result<Self, E>
    where
        F: FnOnce() -> Result<S, E> + Send + 'static,
        E: From<EngineError> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<Job<S>>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), E>>();
        let (failed_tx, failed) = tokio::sync::watch::channel(false);
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let _flag = PanicFlag(failed_tx);
                let mut state = match init() {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                serve(&mut state, &rx, rounds);
            })
            .map_err(|_| E::from(EngineError::WorkerGone))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                tx: Some(tx),
                handle: Some(handle),
                rounds: rounds.is_some(),
                failed,
            }),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(e)
            }
            Err(_) => {
                let _ = handle.join();
                Err(E::from(EngineError::WorkerGone))
            }
        }
    }

    /// Whether the thread runs the state's rounds between jobs ([`TorchWorker::spawn_rounds`]).
    pub fn runs_rounds(&self) -> bool {
        self.rounds
    }

    /// Becomes `true` when the thread died of a panic; every call after that (and every call it
    /// held) fails with [`EngineError::WorkerGone`].
    pub fn failed(&self) -> tokio::sync::watch::Receiver<bool> {
        self.failed.clone()
    }

    fn send(&self, job: Job<S>) -> Result<(), EngineError> {
        self.tx
            .as_ref()
            .ok_or(EngineError::WorkerGone)?
            .send(job)
            .map_err(|_| EngineError::WorkerGone)
    }

    /// Runs `f` on the torch thread and waits for its result.
    pub fn run<R, F>(&self, f: F) -> Result<R, EngineError>
    where
        R: Send + 'static,
        F: FnOnce(&mut S) -> R + Send + 'static,
    {
        let (rtx, rrx) = mpsc::channel();
        let span = tracing::Span::current();
        self.send(Box::new(move |s| {
            let _in = span.enter();
            let _ = rtx.send(f(s));
        }))?;
        rrx.recv().map_err(|_| EngineError::WorkerGone)
    }

    /// Runs `f` on the torch thread; the returned future resolves with its result without
    /// blocking the caller's thread (for async callers: the roles, the services).
    pub async fn call<R, F>(&self, f: F) -> Result<R, EngineError>
    where
        R: Send + 'static,
        F: FnOnce(&mut S) -> R + Send + 'static,
    {
        let (rtx, rrx) = tokio::sync::oneshot::channel();
        // The job's spans (the roles' stages) are children of the caller's.
        let span = tracing::Span::current();
        self.send(Box::new(move |s| {
            let _in = span.enter();
            let _ = rtx.send(f(s));
        }))?;
        rrx.await.map_err(|_| EngineError::WorkerGone)
    }
}

impl<S> Drop for TorchWorker<S> {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_jobs_on_one_thread_in_order() {
        let w = TorchWorker::spawn("t", || {
            Ok::<_, EngineError>(Vec::<std::thread::ThreadId>::new())
        })
        .unwrap();
        for _ in 0..3 {
            w.run(|s| s.push(std::thread::current().id())).unwrap();
        }
        let ids = w.run(|s| s.clone()).unwrap();
        assert_eq!(ids.len(), 3);
        assert!(ids.iter().all(|i| *i == ids[0]));
        assert_ne!(ids[0], std::thread::current().id());
    }

    #[test]
    fn init_errors_surface_and_panics_do_not_hang() {
        let e = TorchWorker::<()>::spawn("t", || {
            Err(EngineError::Param(mulo_core::ParamError::new("x", "bad")))
        })
        .unwrap_err();
        assert!(e.to_string().contains("invalid x"));
        let w = TorchWorker::spawn("t", || Ok::<_, EngineError>(())).unwrap();
        assert!(!*w.failed().borrow());
        let r: Result<(), _> = w.run(|_| panic!("boom"));
        assert!(matches!(r, Err(EngineError::WorkerGone)));
        assert!(*w.failed().borrow(), "a panic raises the flag");
    }

    /// A call the state holds (an op waiting for a round) fails when the thread panics, before
    /// the flag goes up; a thread that just ends (every sender gone) raises no flag.
    #[test]
    fn held_calls_fail_before_the_flag_and_a_clean_end_raises_none() {
        type Held = Option<tokio::sync::oneshot::Sender<()>>;
        let w = TorchWorker::spawn("t", || Ok::<Held, EngineError>(None)).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        w.run(move |s: &mut Held| *s = Some(tx)).unwrap();
        let mut failed = w.failed();
        let _ = w.run(|_| panic!("boom"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            failed.wait_for(|f| *f).await.unwrap();
            assert!(rx.await.is_err(), "the held call saw the thread die");
        });
        let w = TorchWorker::spawn("t", || Ok::<_, EngineError>(())).unwrap();
        let failed = w.failed();
        drop(w);
        assert!(!*failed.borrow());
    }
}
