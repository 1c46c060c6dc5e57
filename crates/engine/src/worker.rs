//! The one thread of a process that runs torch.
//!
//! libtorch called from several OS threads gives each its own OpenMP pool and made decoding 4–6×
//! slower here, so every model of a process is created, loaded and run on one dedicated thread fed
//! by a channel. The state `S` (the loaded models) lives on that thread only.

use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::error::EngineError;

type Job<S> = Box<dyn FnOnce(&mut S) + Send>;

/// A dedicated torch thread owning state `S`.
pub struct TorchWorker<S> {
    tx: Option<mpsc::Sender<Job<S>>>,
    handle: Option<JoinHandle<()>>,
}

impl<S> std::fmt::Debug for TorchWorker<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchWorker").finish_non_exhaustive()
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
        let (tx, rx) = mpsc::channel::<Job<S>>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), E>>();
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
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
                while let Ok(job) = rx.recv() {
                    job(&mut state);
                }
            })
            .map_err(|_| E::from(EngineError::WorkerGone))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                tx: Some(tx),
                handle: Some(handle),
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
        let r: Result<(), _> = w.run(|_| panic!("boom"));
        assert!(matches!(r, Err(EngineError::WorkerGone)));
    }
}
