//! docs/deploy.md's commands work and its metric table is the code's: the blocks marked *tested*
//! run verbatim (the offline render and validation of the overlays; a scrape of a gateway's
//! metrics after a request), and the table lists exactly the metrics of `mulo_core::metrics`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use mulo_proto::v1::gateway_client::GatewayClient;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn page() -> String {
    std::fs::read_to_string(repo().join("docs/deploy.md")).unwrap()
}

#[tokio::test]
async fn the_deploy_page_commands_run() {
    let blocks = common::tested_blocks(&page());
    assert_eq!(blocks.len(), 2, "render and scrape blocks");

    let (out, _) = common::run_block(&blocks[0], &repo(), &[]);
    for want in [
        "3 kind: Deployment",
        "1 kind: HorizontalPodAutoscaler",
        "mulo.dev/pool: small-gpu",
        "mulo.dev/pool: large-gpu",
        "k8s/overlays/gpu/ renders",
        "Dockerfile passes hadolint",
    ] {
        assert!(out.contains(want), "no {want:?} in\n{out}");
    }

    let (_d, _v, _g, ch, metrics) = common::cluster_with_metrics().await;
    GatewayClient::new(ch)
        .generate(common::request("red apple", "mulo", 1))
        .await
        .unwrap();
    let (out, _) = common::run_block(&blocks[1], &repo(), &[("METRICS", metrics[2].as_str())]);
    for want in [
        "mulo_requests_total{service=\"mulo-gateway\",method=\"mulo\",outcome=\"ok\"} 1",
        "mulo_committed_tokens_total{service=\"mulo-gateway\",method=\"mulo\"} 256",
        "mulo_target_passes_total{",
        "mulo_stage_duration_seconds_count{service=\"mulo-gateway\",stage=\"verify\"}",
    ] {
        assert!(out.contains(want), "no {want:?} in\n{out}");
    }
}

#[test]
fn the_metric_table_lists_every_metric_and_no_other() {
    let page = page();
    let table: BTreeSet<&str> = page
        .lines()
        .filter_map(|l| l.strip_prefix("| `mulo_"))
        .map(|l| l.split('`').next().unwrap())
        .collect();
    let code: BTreeSet<&str> = mulo_core::metrics::ALL
        .iter()
        .map(|m| m.name.trim_start_matches("mulo_"))
        .collect();
    assert_eq!(table, code);
    // Each row's type and labels are the code's.
    for m in mulo_core::metrics::ALL {
        let row = page
            .lines()
            .find(|l| l.starts_with(&format!("| `{}` |", m.name)))
            .unwrap();
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let kind = format!("{:?}", m.kind).to_lowercase();
        assert_eq!(cells[2], kind, "{}", m.name);
        assert_eq!(cells[3], m.labels.join(", "), "{}", m.name);
    }
}
