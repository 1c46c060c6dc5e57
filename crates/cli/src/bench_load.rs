//! `mulo bench --concurrency`: closed-loop load per method and number of clients, in this process
//! and with `--distributed` through the gateway (the library side is `mulo_train::load`).

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use async_trait::async_trait;
use indicatif::{ProgressBar, ProgressStyle};
use mulo_core::Method;
use mulo_engine::BatchStats;
use mulo_engine::{Family, GenerateRequest, Local, Outcome, RoleSet};
use mulo_server::proto::drafter_client::DrafterClient;
use mulo_server::proto::gateway_client::GatewayClient;
use mulo_server::proto::verifier_client::VerifierClient;
use mulo_server::proto::StatusRequest;
use mulo_train::bench::BenchSettings;
use mulo_train::load::{closed_loop, scaling, Generator, InProcess, LoadRow};
use serde::Serialize;
use tonic::transport::Channel;

use crate::bench::BenchArgs;

/// The JSON report of a load run.
#[derive(Debug, Serialize)]
struct LoadReport {
    command: String,
    sampling: mulo_core::SamplingParams,
    machine: String,
    load: Vec<LoadRow>,
}

/// Generations through a running gateway, one cloned channel per request; the roles' batch
/// counts from their `Status`.
struct ThroughGateway {
    client: GatewayClient<Channel>,
    drafter: DrafterClient<Channel>,
    verifier: VerifierClient<Channel>,
}

#[async_trait]
impl Generator for ThroughGateway {
    async fn generate(&self, req: GenerateRequest) -> Result<Outcome, String> {
        let mut client = self.client.clone();
        crate::bench::remote_generate(&mut client, &req)
            .await
            .map(|(o, _)| o)
            .map_err(|e| format!("{e:#}"))
    }

    async fn batch_stats(&self) -> Option<BatchStats> {
        let d = self.drafter.clone().status(StatusRequest {}).await.ok()?;
        let v = self.verifier.clone().status(StatusRequest {}).await.ok()?;
        let (d, v) = (d.into_inner(), v.into_inner());
        Some(BatchStats {
            forwards: d.batch_forwards + v.batch_forwards,
            sessions: d.batch_sessions + v.batch_sessions,
        })
    }
}

/// Runs every method at every concurrency and writes the report.
pub fn run(
    a: &BenchArgs,
    methods: &[Method],
    settings: &BenchSettings,
    family: &Family,
    family_dir: &Path,
    roles: RoleSet,
) -> Result<()> {
    let most = a.concurrency.iter().copied().max().unwrap_or(1);
    // Every client holds a session on each role at once.
    let worker = mulo_server::load_engine(family, roles, &a.runtime, most.max(4))?;
    mulo_server::set_batching(&worker, a.batch.batching())?;
    let machine = crate::bench::machine(&worker, a.runtime.threads)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut places: Vec<(Arc<dyn Generator>, bool)> = vec![(
        Arc::new(InProcess {
            local: Local::new(worker.clone()),
            with_drafter: roles.drafter,
        }),
        false,
    )];
    let cluster = if a.distributed {
        let threads = a.runtime.threads.unwrap_or(1);
        let c = rt.block_on(crate::cluster::Cluster::start(
            family_dir,
            threads,
            !a.no_pin,
            &a.batch.to_flags(),
        ))?;
        let _in_rt = rt.enter();
        let client = mulo_server::client::gateway_client(&c.gateway)?;
        let drafter = mulo_server::client::RemoteDrafter::new(&c.drafter)?.client();
        let verifier = mulo_server::client::RemoteVerifier::new(&c.verifier)?.client();
        places.push((
            Arc::new(ThroughGateway {
                client,
                drafter,
                verifier,
            }),
            true,
        ));
        Some(c)
    } else {
        None
    };
    let machine = match &cluster {
        Some(c) => format!("{machine}; services: {}", c.placement),
        None => machine,
    };
    let per_run = a.n + a.warmup;
    let total = per_run * methods.len() * a.concurrency.len() * places.len();
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("load {bar:40} {pos}/{len} images  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let tick = {
        let bar = bar.clone();
        Arc::new(move || bar.inc(1)) as Arc<dyn Fn() + Send + Sync>
    };
    let mut rows = Vec::new();
    for (generator, remote) in &places {
        for &method in methods {
            for &c in &a.concurrency {
                let row = rt.block_on(closed_loop(
                    generator.clone(),
                    settings,
                    method,
                    c,
                    *remote,
                    tick.clone(),
                ))?;
                bar.inc(a.warmup as u64);
                rows.push(row);
            }
        }
    }
    bar.finish_and_clear();
    drop(cluster);
    print_table(&rows);
    let report = LoadReport {
        command: crate::common::command_line(),
        sampling: settings.sampling,
        machine,
        load: rows,
    };
    let text = serde_json::to_string_pretty(&report)?;
    std::fs::write(&a.json, text + "\n").with_context(|| format!("{}", a.json.display()))?;
    println!("wrote {}", a.json.display());
    if let Some(plot) = &a.plot {
        crate::plot_load::throughput(plot, &report.load)?;
        println!("wrote {}", plot.display());
    }
    Ok(())
}

fn print_table(rows: &[LoadRow]) {
    println!(
        "{:<52} {:>5} {:>9} {:>8} {:>8} {:>8}",
        "method", "C", "images/s", "x C=1", "med s", "p90 s"
    );
    for r in rows {
        let place = if r.remote { "@gateway" } else { "" };
        let x = scaling(rows, r).map_or_else(|| "-".into(), |x| format!("{x:.2}x"));
        println!(
            "{:<52} {:>5} {:>9.3} {:>8} {:>8.3} {:>8.3}",
            format!("{}{place}", r.method),
            r.concurrency,
            r.throughput_images_per_s,
            x,
            r.latency_median_s,
            r.latency_p90_s
        );
    }
}
