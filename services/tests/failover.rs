//! No request is lost when a pod dies: with two verifier replicas, killing the one serving a
//! request mid-way moves it to the other (re-prefilled with the committed tokens); killing the
//! drafter mid-way finishes the request as AR on the verifier and says so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use mulo_proto::v1 as pb;
use mulo_proto::v1::gateway_client::GatewayClient;
use mulo_proto::v1::verifier_client::VerifierClient;

fn gen(seed: u64) -> pb::GenerateRequest {
    pb::GenerateRequest {
        return_tokens: true,
        // Eight cycles with plenty of resampling: time to kill a process between two blocks.
        ..common::request("snowman", "mulo:block_rows=1,tau=0.3", seed)
    }
}

/// Reads a stream to its end; returns the blocks seen and the result.
async fn finish(stream: &mut tonic::Streaming<pb::GenerateEvent>) -> (usize, pb::GenerateResponse) {
    let mut blocks = 0;
    while let Some(ev) = stream.message().await.unwrap() {
        match ev.kind.unwrap() {
            pb::generate_event::Kind::Block(_) => blocks += 1,
            pb::generate_event::Kind::Done(d) => return (blocks, d),
        }
    }
    panic!("the stream ended without a result");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_verifier_or_drafter_does_not_lose_the_request() {
    let fam = common::family();
    let fam = fam.to_str().unwrap();
    let mut drafter = common::start("mulo-drafter", &["--family", fam, "--threads", "1"]);
    let mut v1 = common::start("mulo-verifier", &["--family", fam, "--threads", "1"]);
    let mut v2 = common::start("mulo-verifier", &["--family", fam, "--threads", "1"]);
    common::connect(&mut drafter).await;
    let c1 = common::connect(&mut v1).await;
    let c2 = common::connect(&mut v2).await;
    let verifiers = format!("{},{}", v1.addr, v2.addr);
    let metrics = format!("127.0.0.1:{}", common::free_port());
    let mut gateway = common::start(
        "mulo-gateway",
        &[
            "--family",
            fam,
            "--threads",
            "1",
            "--drafter",
            &drafter.addr,
            "--verifier",
            &verifiers,
            "--metrics-listen",
            &metrics,
        ],
    );
    let counted = |name: &str, labels: &[(&str, &str)]| {
        common::metric(&common::scrape(&metrics), name, labels)
    };
    let mut gw = GatewayClient::new(common::connect(&mut gateway).await);

    // Verifier lost: find the replica holding the session after the first block, kill it.
    let mut stream = gw.generate_stream(gen(1)).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(matches!(
        first.kind,
        Some(pb::generate_event::Kind::Block(_))
    ));
    let live = |c: tonic::transport::Channel| async move {
        VerifierClient::new(c)
            .status(pb::StatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .live_sessions
    };
    let (l1, l2) = (live(c1.clone()).await, live(c2.clone()).await);
    assert_eq!(l1 + l2, 1, "one replica serves the request");
    let (serving, other) = if l1 == 1 {
        (&mut v1, c2)
    } else {
        (&mut v2, c1)
    };
    serving.child.kill().unwrap();
    serving.child.wait().unwrap();
    let (blocks, done) = finish(&mut stream).await;
    let stats = done.stats.unwrap();
    assert_eq!(done.tokens.len(), 256);
    assert!(blocks >= 1, "blocks after the kill: {blocks}");
    assert_eq!(stats.migrations, 1, "{stats:?}");
    assert!(stats.fallback.is_empty(), "{stats:?}");
    // Counted by reason: the replica no longer answered.
    use mulo_core::metrics::{FALLBACKS, MIGRATIONS};
    assert_eq!(counted(MIGRATIONS, &[("reason", "unreachable")]), 1.0);
    assert_eq!(counted(MIGRATIONS, &[]), 1.0);
    assert!(done.png.starts_with(b"\x89PNG"));
    assert_eq!(live(other.clone()).await, 0, "released on the survivor");

    // Drafter lost: the request finishes as AR on the verifier, and says so; the gateway decodes
    // the image itself.
    let mut stream = gw.generate_stream(gen(2)).await.unwrap().into_inner();
    stream.message().await.unwrap().unwrap();
    drafter.child.kill().unwrap();
    drafter.child.wait().unwrap();
    let (_, done) = finish(&mut stream).await;
    let stats = done.stats.unwrap();
    assert_eq!(done.tokens.len(), 256);
    assert!(stats.fallback.contains("drafter"), "{stats:?}");
    assert!(done.png.starts_with(b"\x89PNG"));
    assert_eq!(counted(FALLBACKS, &[("reason", "drafter_failed")]), 1.0);

    // Still serving, as AR, with one verifier and no drafter.
    let r = gw
        .generate(pb::GenerateRequest {
            method: "ar".into(),
            ..gen(3)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.tokens.len(), 256);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_an_in_flight_request_to_completion() {
    let (_drafter, _verifier, gateway, ch) = common::cluster().await;
    let mut gw = GatewayClient::new(ch);
    let mut stream = gw.generate_stream(gen(4)).await.unwrap().into_inner();
    stream.message().await.unwrap().unwrap();
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &gateway.child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    // The request in flight completes...
    let (_, done) = finish(&mut stream).await;
    assert_eq!(done.tokens.len(), 256);
    // ...and then the gateway exits cleanly.
    let mut gateway = gateway;
    let t = std::time::Instant::now();
    loop {
        if let Some(code) = gateway.child.try_wait().unwrap() {
            assert!(code.success(), "exit after SIGTERM: {code:?}");
            break;
        }
        assert!(t.elapsed().as_secs() < 10, "no exit within 10 s of SIGTERM");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
