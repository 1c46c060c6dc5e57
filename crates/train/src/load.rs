//! Closed-loop load for `mulo bench --concurrency`: `C` clients each send their next request as
//! soon as their previous one is answered, until the run's images are done; per method and `C`,
//! the throughput and the latency quantiles.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use mulo_core::{Condition, Method};
use mulo_engine::{generate, BatchStats, DrafterRole, GenerateRequest, Local, Outcome};
use serde::{Deserialize, Serialize};

use crate::bench::{prompt_index, quantile, BenchSettings};
use crate::TrainError;

/// One (method, concurrency) measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadRow {
    /// Method name with its parameters.
    pub method: String,
    /// Clients sending at once.
    pub concurrency: usize,
    /// Through the gateway (`true`) or in this process.
    pub remote: bool,
    /// Images generated.
    pub images: usize,
    /// Wall-clock seconds of the run.
    pub seconds: f64,
    /// Images per second over the run.
    pub throughput_images_per_s: f64,
    /// Median latency of one image (s), from sending to the answer.
    pub latency_median_s: f64,
    /// 90th percentile latency (s).
    pub latency_p90_s: f64,
    /// Sessions per batched forward pass of the roles (drafter and verifier together) over the
    /// timed run; null when their counts cannot be read.
    pub mean_batch_sessions: Option<f64>,
}

/// Something that generates one image per call: the in-process roles or a gateway client.
#[async_trait]
pub trait Generator: Send + Sync {
    /// One generation; errors as text (they may come from another process).
    async fn generate(&self, req: GenerateRequest) -> Result<Outcome, String>;

    /// Batched forwards the roles have run so far and the sessions they served (None when it
    /// cannot be read).
    async fn batch_stats(&self) -> Option<BatchStats> {
        None
    }
}

/// The roles of this process (one torch thread): concurrent requests interleave their jobs there.
#[derive(Debug, Clone)]
pub struct InProcess {
    /// The roles.
    pub local: Local,
    /// Whether MuLo-SD has a drafter.
    pub with_drafter: bool,
}

#[async_trait]
impl Generator for InProcess {
    async fn generate(&self, req: GenerateRequest) -> Result<Outcome, String> {
        let drafter: Option<&dyn DrafterRole> = self.with_drafter.then_some(&self.local);
        generate(drafter, &self.local, &req, &mut |_| {})
            .await
            .map_err(|e| e.to_string())
    }

    async fn batch_stats(&self) -> Option<BatchStats> {
        self.local.worker().call(|e| e.batch_stats()).await.ok()
    }
}

/// The request of image `i` of a run (prompt row and seed as in the interleaved bench).
fn request(settings: &BenchSettings, method: Method, tag: &str, i: usize) -> GenerateRequest {
    let rows = &settings.prompts;
    let row = prompt_index(i, 0, rows.len());
    GenerateRequest {
        id: format!("load-{tag}-{i}"),
        condition: Condition::Prompt(rows[row].prompt.clone()),
        sampling: settings.sampling,
        seed: settings.seed + i as u64,
        method,
    }
}

/// Runs `settings.n` images of `method` with `clients` closed-loop clients (after
/// `settings.warmup` untimed images one at a time); `progress` after each image.
pub async fn closed_loop(
    gen: Arc<dyn Generator>,
    settings: &BenchSettings,
    method: Method,
    clients: usize,
    remote: bool,
    progress: Arc<dyn Fn() + Send + Sync>,
) -> Result<LoadRow, TrainError> {
    if clients == 0 {
        return Err(TrainError::Eval("concurrency must be at least 1".into()));
    }
    let tag = format!(
        "{}-{clients}-{}",
        if remote { "r" } else { "l" },
        method.name()
    );
    for i in 0..settings.warmup {
        let req = request(settings, method, &format!("{tag}-warm"), i);
        gen.generate(req)
            .await
            .map_err(|e| TrainError::Eval(format!("{method} warm-up: {e}")))?;
    }
    let stats_before = gen.batch_stats().await;
    let next = Arc::new(AtomicUsize::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(settings.n)));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients.min(settings.n.max(1)) {
        let (gen, next, latencies) = (gen.clone(), next.clone(), latencies.clone());
        let (settings, tag, progress) = (settings.clone(), tag.clone(), progress.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= settings.n {
                    return Ok::<(), String>(());
                }
                let t = Instant::now();
                gen.generate(request(&settings, method, &tag, i)).await?;
                if let Ok(mut l) = latencies.lock() {
                    l.push(t.elapsed().as_secs_f64());
                }
                progress();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| TrainError::Eval(format!("a load client failed: {e}")))?
            .map_err(|e| TrainError::Eval(format!("{method} at concurrency {clients}: {e}")))?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let mean_batch_sessions = match (stats_before, gen.batch_stats().await) {
        (Some(a), Some(b)) if b.forwards > a.forwards => {
            Some((b.sessions - a.sessions) as f64 / (b.forwards - a.forwards) as f64)
        }
        _ => None,
    };
    let l = latencies
        .lock()
        .map_err(|_| TrainError::Eval("latency list poisoned".into()))?
        .clone();
    Ok(LoadRow {
        method: method.to_string(),
        concurrency: clients,
        remote,
        images: l.len(),
        seconds,
        throughput_images_per_s: l.len() as f64 / seconds.max(1e-9),
        latency_median_s: quantile(&l, 0.5),
        latency_p90_s: quantile(&l, 0.9),
        mean_batch_sessions,
    })
}

/// Throughput at each row's concurrency over that at concurrency 1 of the same method and place
/// (None without a concurrency-1 row).
pub fn scaling(rows: &[LoadRow], row: &LoadRow) -> Option<f64> {
    rows.iter()
        .find(|r| r.method == row.method && r.remote == row.remote && r.concurrency == 1)
        .map(|base| row.throughput_images_per_s / base.throughput_images_per_s.max(1e-12))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::eval::PromptRow;
    use mulo_engine::MethodStats;

    /// Answers after a fixed delay, counting the requests in flight at once.
    struct Sleepy {
        in_flight: AtomicUsize,
        most: AtomicUsize,
        seen: Mutex<Vec<(String, u64)>>,
    }

    #[async_trait]
    impl Generator for Sleepy {
        async fn generate(&self, req: GenerateRequest) -> Result<Outcome, String> {
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            if let Condition::Prompt(p) = &req.condition {
                self.seen.lock().unwrap().push((p.clone(), req.seed));
            }
            Ok(Outcome {
                tokens: Vec::new(),
                stats: MethodStats::default(),
            })
        }
    }

    fn settings(n: usize) -> BenchSettings {
        let row = |p: &str| PromptRow {
            prompt: p.into(),
            category: "c".into(),
            subcategory: "s".into(),
        };
        BenchSettings {
            prompts: vec![row("a"), row("b"), row("c")],
            n,
            warmup: 0,
            seed: 10,
            sampling: mulo_core::SamplingParams::default(),
        }
    }

    #[tokio::test]
    async fn clients_keep_that_many_requests_in_flight_and_every_image_is_done_once() {
        let gen = Arc::new(Sleepy {
            in_flight: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
        });
        let s = settings(12);
        let row = closed_loop(gen.clone(), &s, Method::Ar, 4, false, Arc::new(|| {}))
            .await
            .unwrap();
        assert_eq!(row.images, 12);
        assert_eq!(gen.most.load(Ordering::SeqCst), 4);
        let mut seen = gen.seen.lock().unwrap().clone();
        seen.sort_by_key(|x| x.1);
        let want: Vec<(String, u64)> = (0..12)
            .map(|i| (["a", "b", "c"][i % 3].to_string(), 10 + i as u64))
            .collect();
        assert_eq!(seen, want);
        assert!(row.latency_median_s >= 0.02 && row.latency_p90_s >= row.latency_median_s);
        assert!(row.mean_batch_sessions.is_none());
        let one = LoadRow {
            concurrency: 1,
            throughput_images_per_s: row.throughput_images_per_s / 2.0,
            ..row.clone()
        };
        assert_eq!(scaling(&[one, row.clone()], &row), Some(2.0));
    }
}
