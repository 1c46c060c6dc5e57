//! The three services as separate processes on loopback ports, on the bundled family: generation
//! through the gateway (unary and streaming) gives the tokens of embedded mode for the same seed and
//! parameters, and sessions are released on both roles afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use mulo_core::{Condition, Method};
use mulo_engine::{generate, Engine, Family, GenerateRequest, Local, Member, RoleSet, TorchWorker};
use mulo_proto::v1 as pb;
use mulo_proto::v1::gateway_client::GatewayClient;

/// The tokens of embedded mode (every role in this process).
fn embedded(method: &str, prompt: &str, seed: u64) -> Vec<i64> {
    let fam = Family::load(&common::family()).unwrap();
    let target = mulo_model::ModelConfig::load_gpt(&fam.path(Member::Target).unwrap()).unwrap();
    let worker = Arc::new(
        TorchWorker::spawn_rounds("torch", move || {
            tch::set_num_threads(1);
            Engine::load(
                &fam,
                RoleSet::ALL,
                tch::Device::Cpu,
                Some(mulo_model::DType::Fp32),
                2,
            )
        })
        .unwrap(),
    );
    let local = Local::new(worker);
    let req = GenerateRequest {
        id: "embedded".into(),
        condition: Condition::Prompt(prompt.into()),
        sampling: target.default_sampling(),
        seed,
        method: Method::parse(method).unwrap(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(generate(Some(&local), &local, &req, &mut |_| {}))
        .unwrap()
        .tokens
}

fn request(method: &str, prompt: &str, seed: u64) -> pb::GenerateRequest {
    pb::GenerateRequest {
        return_tokens: true,
        ..common::request(prompt, method, seed)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_gives_the_tokens_of_embedded_mode() {
    let (drafter, verifier, _gateway, ch) = common::cluster().await;
    let mut gw = GatewayClient::new(ch);
    for (method, seed) in [("mulo", 3), ("ar", 4), ("sd:gamma=3", 5)] {
        let want = tokio::task::spawn_blocking(move || embedded(method, "red apple", seed))
            .await
            .unwrap();
        let got = gw
            .generate(request(method, "red apple", seed))
            .await
            .unwrap()
            .into_inner();
        let tokens: Vec<i64> = got.tokens.iter().map(|&t| i64::from(t)).collect();
        assert_eq!(tokens, want, "{method}");
        assert!(got.png.starts_with(b"\x89PNG"), "{method}");
        let stats = got.stats.unwrap();
        assert_eq!(stats.tokens as usize, want.len());
        assert!(stats.fallback.is_empty(), "{method}: {}", stats.fallback);
        // Bytes exchanged with the roles: at least every token once, the PNG's decode included.
        assert!(
            stats.wire_bytes > 256 && stats.wire_bytes < 200_000,
            "{method}: {} bytes",
            stats.wire_bytes
        );
        assert!(stats.method.starts_with(method.split(':').next().unwrap()));
    }

    // Streaming: an event per committed block, then the same result (blocks of two draft rows:
    // the defaults draft the bundled family's image in one).
    let method = "mulo:block_rows=2";
    let want = tokio::task::spawn_blocking(move || embedded(method, "snowman", 7))
        .await
        .unwrap();
    let mut stream = gw
        .generate_stream(request(method, "snowman", 7))
        .await
        .unwrap()
        .into_inner();
    let (mut blocks, mut streamed, mut done) = (0, Vec::new(), None);
    while let Some(ev) = stream.message().await.unwrap() {
        match ev.kind.unwrap() {
            pb::generate_event::Kind::Block(b) => {
                assert_eq!(b.start as usize, streamed.len(), "blocks arrive in order");
                streamed.extend(b.tokens.iter().map(|&t| i64::from(t)));
                assert_eq!(b.committed as usize, streamed.len());
                blocks += 1;
            }
            pb::generate_event::Kind::Done(d) => done = Some(d),
        }
    }
    let done = done.expect("a final event");
    assert!(blocks >= 2, "{blocks} blocks");
    assert_eq!(streamed, want);
    let tokens: Vec<i64> = done.tokens.iter().map(|&t| i64::from(t)).collect();
    assert_eq!(tokens, want);

    // `mulo generate --gateway` sends the same request: the tokens of embedded mode again.
    let dir = std::env::temp_dir().join(format!("mulo-gw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (png, json) = (dir.join("a.png"), dir.join("a.json"));
    let out = std::process::Command::new(common::mulo_cli())
        .args([
            "generate",
            "red apple",
            "--method",
            "mulo",
            "--seed",
            "3",
            "--no-progress",
        ])
        .args(["--gateway", &_gateway.addr, "--out", png.to_str().unwrap()])
        .args(["--tokens-out", json.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("target passes") && stdout.contains("gateway"),
        "{stdout}"
    );
    let via_cli: Vec<i64> = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let want = tokio::task::spawn_blocking(|| embedded("mulo", "red apple", 3))
        .await
        .unwrap();
    assert_eq!(via_cli, want);
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
    let _ = std::fs::remove_dir_all(&dir);

    // The capability handshake names the models each role holds.
    for (p, want) in [
        (&verifier, vec![("gpt", 16), ("gpt", 16), ("vq", 0)]),
        (&drafter, vec![("gpt", 8), ("vq", 0)]),
    ] {
        let info = mulo_proto::v1::capabilities_client::CapabilitiesClient::new(
            tonic::transport::Endpoint::from_shared(format!("http://{}", p.addr))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        )
        .info(pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
        let got: Vec<(&str, u32)> = info
            .models
            .iter()
            .map(|m| (m.model_type.as_str(), m.grid_rows))
            .collect();
        let want: Vec<(&str, u32)> = want.into_iter().collect();
        assert_eq!(got, want, "{}: {info:?}", info.role);
        assert!(info
            .models
            .iter()
            .all(|m| m.vocab_size == 2048 && m.device == "cpu"));
    }

    // Every session was released on both roles.
    for (p, is_drafter) in [(&drafter, true), (&verifier, false)] {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", p.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let live = if is_drafter {
            pb::drafter_client::DrafterClient::new(ch)
                .status(pb::StatusRequest {})
                .await
                .unwrap()
                .into_inner()
                .live_sessions
        } else {
            pb::verifier_client::VerifierClient::new(ch)
                .status(pb::StatusRequest {})
                .await
                .unwrap()
                .into_inner()
                .live_sessions
        };
        assert_eq!(live, 0, "sessions left on {}", p.addr);
    }
}

#[test]
fn bench_distributed_compares_the_services_with_embedded_mode() {
    let dir = std::env::temp_dir().join(format!("mulo-bench-dist-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("bench.json");
    let out = std::process::Command::new(common::mulo_cli())
        .args([
            "bench",
            "--distributed",
            "--no-quality",
            "--n",
            "2",
            "--warmup",
            "0",
        ])
        .args([
            "--method",
            "mulo",
            "--threads",
            "1",
            "--json",
            json.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("of embedded mode"), "{stdout}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = r["methods"].as_array().unwrap();
    let modes: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r["method"].as_str().unwrap(), r["mode"].as_str().unwrap()))
        .collect();
    assert_eq!(
        modes,
        [
            ("ar", "embedded"),
            ("mulo", "embedded"),
            ("ar", "distributed"),
            ("mulo", "distributed"),
            // The pipelined mulo's unpipelined twin, through the gateway only.
            ("mulo", "distributed")
        ]
    );
    assert_eq!(rows[3]["params"]["pipeline"], "1");
    assert_eq!(rows[4]["params"]["pipeline"], "0");
    assert!(rows[4]["latency_vs_embedded"].is_null());
    assert!(rows[3]["pipelining_gain"].as_f64().unwrap() > 0.0);
    assert!(stdout.contains("pipelining gain"), "{stdout}");
    for row in &rows[2..] {
        if row["params"]["pipeline"] != "0" {
            assert!(row["latency_vs_embedded"].as_f64().unwrap() > 0.0, "{row}");
        }
        assert!(
            row["wire_bytes_per_image"].as_f64().unwrap() > 256.0,
            "{row}"
        );
        assert!(row["spec"].as_str().unwrap().ends_with("@gateway"));
    }
    // The same requests give the same passes either way (same tokens, same engine).
    assert_eq!(
        rows[1]["target_passes_per_image"],
        rows[3]["target_passes_per_image"]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
