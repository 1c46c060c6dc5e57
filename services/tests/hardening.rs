//! Hardening of the services against bad input and their own failures (docs/security.md): every
//! parameter past its bound is refused with INVALID_ARGUMENT naming the bound, at the gateway and
//! at the roles; every `pool_k` is a view of the one nearest-code table, whatever requests ask for; a panic
//! on a verifier's torch thread turns its health NOT_SERVING, makes it exit non-zero, and the
//! gateway finishes the request on the other replica.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use mulo_proto::v1 as pb;
use mulo_proto::v1::drafter_client::DrafterClient;
use mulo_proto::v1::gateway_client::GatewayClient;
use mulo_proto::v1::verifier_client::VerifierClient;
use tonic::Code;

fn session(id: &str) -> Option<pb::SessionRef> {
    Some(pb::SessionRef {
        session_id: id.into(),
        epoch: 0,
        committed_len: 0,
    })
}

/// Asserts an INVALID_ARGUMENT whose message names `field` and `bound`.
fn refused<T: std::fmt::Debug>(r: Result<T, tonic::Status>, field: &str, bound: &str) {
    let e = r.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains(field) && e.message().contains(bound),
        "{field}/{bound}: {}",
        e.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_bound_parameters_are_refused_and_tables_stay_bounded() {
    let (drafter, verifier, _gateway, ch, m) = common::cluster_with_metrics().await;
    let mut gw = GatewayClient::new(ch);
    let req = |method: &str| common::request("red apple", method, 1);
    // At the gateway, through the method string, the sampling, the condition and the deadline.
    for (method, field, bound) in [
        ("mulo:pool_k=100000", "pool_k", "at most 1024"),
        ("lantern:k=5000", "k", "at most 1024"),
        ("sd:gamma=100", "gamma", "at most 16"),
        ("mulo:radius=50", "radius", "at most 8"),
        ("mulo:block_rows=1000", "block_rows", "at most 64"),
        ("mulo:zipar_window=100000", "zipar_window", "at most 256"),
        ("mulo:wavefront=5000", "wavefront", "at most 4096"),
    ] {
        refused(gw.generate(req(method)).await, field, bound);
    }
    let mut r = req("mulo");
    r.sampling = Some(pb::Sampling {
        temperature: Some(1e6),
        ..Default::default()
    });
    refused(gw.generate(r).await, "temperature", "100");
    let long = common::request(&"apple ".repeat(1000), "mulo", 1);
    refused(gw.generate(long).await, "prompt", "at most 4096 bytes");
    let mut wide = req("mulo");
    wide.condition = Some(pb::Condition {
        kind: Some(pb::condition::Kind::CaptionFeatures(pb::CaptionFeatures {
            features: vec![0.0; 2 * 10_000],
            len: 2,
            dim: 10_000,
            mask: Vec::new(),
        })),
    });
    refused(
        gw.generate(wide).await,
        "caption_features.dim",
        "at most 8192",
    );
    let mut late = tonic::Request::new(req("mulo"));
    late.set_timeout(Duration::from_secs(7200));
    refused(gw.generate(late).await, "deadline", "at most 3600");

    // At the roles, straight to them (no gateway in between).
    let mut v = VerifierClient::new(common::connect_to(&verifier.addr).await);
    let verify = pb::VerifyRequest {
        session: session("x"),
        commit: Vec::new(),
        proposals: vec![1],
        pool_k: 1_000_000,
    };
    refused(v.verify(verify).await, "pool_k", "at most 1024");
    let speculate = pb::SpeculateRequest {
        session: session("x"),
        gamma: 4,
        relaxation: Some(pb::Relaxation {
            k: 1_000_000,
            delta: 0.1,
        }),
    };
    refused(v.speculate(speculate).await, "k", "at most 1024");
    let speculate = pb::SpeculateRequest {
        session: session("x"),
        gamma: 1000,
        relaxation: None,
    };
    refused(v.speculate(speculate).await, "gamma", "at most 16");
    let resample = pb::ResampleRequest {
        session: session("x"),
        islands: vec![pb::ResampleIsland { positions: vec![0] }],
        resampler: pb::Resampler::Jacobi as i32,
        window: 0,
        wavefront: 5000,
    };
    refused(v.resample(resample).await, "wavefront", "at most 4096");
    let mut d = DrafterClient::new(common::connect_to(&drafter.addr).await);
    let draft = pb::DraftRequest {
        session: session("x"),
        realign: Vec::new(),
        rows: 1000,
        zipar_window: 0,
    };
    refused(d.draft(draft).await, "rows", "at most 64");
    let mut late = tonic::Request::new(pb::StatusRequest {});
    late.set_timeout(Duration::from_secs(7200));
    refused(v.status(late).await, "deadline", "at most 3600");

    // Many distinct pool sizes within the bound: all views of the one table built at warm-up, so
    // neither the table count nor the verifier's memory grows (a new [2048, k] table would hold
    // 12 bytes per entry, int64 on the device and u32 on the host: 23 MiB at k = 1000).
    let scraped = || common::scrape(&m[1]);
    let tables = |t: &str| common::metric(t, "mulo_nearest_code_tables", &[]);
    let bytes = |t: &str| common::metric(t, "mulo_nearest_code_table_bytes", &[]);
    let text = scraped();
    assert_eq!(tables(&text), 1.0);
    assert_eq!(bytes(&text), 2048.0 * 1024.0 * 12.0);
    let mut before = 0.0;
    for (i, k) in (0..10).map(|i| 1024 - 8 * i).enumerate() {
        if i == 2 {
            before = common::rss_mib(verifier.child.id());
        }
        let mut r = req(&format!("mulo:pool_k={k}"));
        r.skip_png = true;
        gw.generate(r).await.unwrap();
    }
    assert_eq!(tables(&scraped()), 1.0);
    let grown = common::rss_mib(verifier.child.id()) - before;
    let table = 2048.0 * 1000.0 * 12.0 / f64::from(1 << 20);
    eprintln!("verifier RSS grew {grown:.1} MiB");
    assert!(
        grown < 2.0 * table,
        "RSS grew {grown:.1} MiB over 8 more distinct pool sizes"
    );
}

/// Reads the health stream until it reports `want`.
async fn wait_health(
    stream: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
    want: tonic_health::pb::health_check_response::ServingStatus,
) {
    let read = async {
        while let Some(m) = stream.message().await.unwrap() {
            if m.status == want as i32 {
                return;
            }
        }
        panic!("the health stream ended before {want:?}");
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torch_thread_panic_fails_over_and_the_replica_exits_non_zero() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let fam = common::family();
    let fam = fam.to_str().unwrap();
    let role = ["--family", fam, "--threads", "1"];
    let mut drafter = common::start("mulo-drafter", &role);
    // The first replica's torch thread panics at its third verify call.
    let faulty: Vec<&str> = role
        .iter()
        .copied()
        .chain(["--test-panic-after-calls", "3"])
        .collect();
    let mut v1 = common::start("mulo-verifier", &faulty);
    let mut v2 = common::start("mulo-verifier", &role);
    common::connect(&mut drafter).await;
    let c1 = common::connect(&mut v1).await;
    common::connect(&mut v2).await;
    let verifiers = format!("{},{}", v1.addr, v2.addr);
    let mut args = role.to_vec();
    args.extend(["--drafter", &drafter.addr, "--verifier", &verifiers]);
    let mut gateway = common::start("mulo-gateway", &args);
    let mut gw = GatewayClient::new(common::connect(&mut gateway).await);

    let mut health = tonic_health::pb::health_client::HealthClient::new(c1)
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    wait_health(&mut health, ServingStatus::Serving).await;

    // The first session goes to the first replica, which dies during the request.
    let mut r = common::request("snowman", "mulo:block_rows=1,tau=0.3", 1);
    r.return_tokens = true;
    let done = gw.generate(r).await.unwrap().into_inner();
    assert_eq!(done.tokens.len(), 256);
    let stats = done.stats.unwrap();
    assert_eq!(stats.migrations, 1, "{stats:?}");
    assert!(stats.fallback.is_empty(), "{stats:?}");

    wait_health(&mut health, ServingStatus::NotServing).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = v1.child.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "still running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success(), "{status}");
    assert!(
        v2.child.try_wait().unwrap().is_none(),
        "the other replica serves on"
    );
}
