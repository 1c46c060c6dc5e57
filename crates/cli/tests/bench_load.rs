//! `mulo bench --concurrency` on the bundled family: one JSON row per method and number of
//! clients, with the keys docs/services.md lists, every image generated; bad values are one line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;

use serde_json::Value;

use common::{fails_one_line, ok};

fn family() -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/emoji");
    p.to_str().unwrap().to_string()
}

#[test]
fn closed_loop_rows_per_method_and_concurrency() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("load.json");
    let plot = dir.path().join("load.png");
    let fam = family();
    let out = ok(&[
        "bench",
        "--family",
        &fam,
        "--concurrency",
        "1,3",
        "--n",
        "3",
        "--warmup",
        "0",
        "--method",
        "mulo",
        "--threads",
        "1",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        plot.to_str().unwrap(),
    ]);
    assert!(out.contains("images/s") && out.contains("x C=1"), "{out}");
    // Throughput against clients, as a PNG.
    let png = std::fs::read(&plot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = report["load"].as_array().unwrap();
    let got: Vec<(String, u64)> = rows
        .iter()
        .map(|r| {
            let m = r["method"].as_str().unwrap();
            (
                m.split(':').next().unwrap().to_string(),
                r["concurrency"].as_u64().unwrap(),
            )
        })
        .collect();
    let want = [("ar", 1), ("ar", 3), ("mulo", 1), ("mulo", 3)].map(|(m, c)| (m.to_string(), c));
    assert_eq!(got, want);
    for r in rows {
        assert_eq!(r["images"], 3, "{r}");
        assert_eq!(r["remote"], false, "{r}");
        // One client: every forward serves one session; three: they share forwards.
        let mean = r["mean_batch_sessions"].as_f64().unwrap();
        match r["concurrency"].as_u64().unwrap() {
            1 => assert!((mean - 1.0).abs() < 1e-9, "{r}"),
            _ => assert!(mean > 1.0, "{r}"),
        }
        let t = r["throughput_images_per_s"].as_f64().unwrap();
        let (p50, p90) = (
            r["latency_median_s"].as_f64().unwrap(),
            r["latency_p90_s"].as_f64().unwrap(),
        );
        assert!(t > 0.0 && p50 > 0.0 && p90 >= p50, "{r}");
    }
}

#[test]
fn one_session_per_batch_turns_batching_off() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("load.json");
    let fam = family();
    ok(&[
        "bench",
        "--family",
        &fam,
        "--concurrency",
        "3",
        "--n",
        "3",
        "--warmup",
        "0",
        "--threads",
        "1",
        "--max-batch-sessions",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for r in report["load"].as_array().unwrap() {
        let mean = r["mean_batch_sessions"].as_f64().unwrap();
        assert!((mean - 1.0).abs() < 1e-9, "{r}");
    }
}

#[test]
fn bad_concurrency_is_one_line() {
    let fam = family();
    let e = fails_one_line(&["bench", "--family", &fam, "--concurrency", "0"]);
    assert!(e.contains("concurrency"), "{e}");
}
