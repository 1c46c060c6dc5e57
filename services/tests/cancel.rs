//! A client that cancels, or whose deadline passes, frees the request's sessions on the drafter and
//! the verifier within a second (not at their idle TTL).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mulo_proto::v1 as pb;
use mulo_proto::v1::drafter_client::DrafterClient;
use mulo_proto::v1::gateway_client::GatewayClient;
use mulo_proto::v1::verifier_client::VerifierClient;
use tonic::transport::Channel;

fn gen() -> pb::GenerateRequest {
    pb::GenerateRequest {
        skip_png: true,
        ..common::request("red apple", "mulo:block_rows=1", 1)
    }
}

/// Live sessions on (drafter, verifier).
async fn live(d: &Channel, v: &Channel) -> (u32, u32) {
    let d = DrafterClient::new(d.clone())
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .live_sessions;
    let v = VerifierClient::new(v.clone())
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .live_sessions;
    (d, v)
}

/// Seconds until both roles hold no session (panics after 5 s).
async fn freed_after(d: &Channel, v: &Channel) -> Duration {
    let t = Instant::now();
    loop {
        if live(d, v).await == (0, 0) {
            return t.elapsed();
        }
        assert!(t.elapsed() < Duration::from_secs(5), "sessions still live");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_deadline_release_both_sessions_within_a_second() {
    let (drafter, verifier, _gateway, ch) = common::cluster().await;
    let d = common::connect_to(&drafter.addr).await;
    let v = common::connect_to(&verifier.addr).await;
    let mut gw = GatewayClient::new(ch);

    // Cancel: read one block of a streamed request (sessions open on both roles), then hang up.
    let mut stream = gw.generate_stream(gen()).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(matches!(
        first.kind,
        Some(pb::generate_event::Kind::Block(_))
    ));
    assert_eq!(
        live(&d, &v).await,
        (1, 1),
        "the request holds a session on each role"
    );
    drop(stream);
    let took = freed_after(&d, &v).await;
    assert!(
        took < Duration::from_secs(1),
        "cancel freed the sessions after {took:?}"
    );

    // Deadline: a unary request that cannot finish in time; a watcher sees its sessions open.
    let full = {
        let t = Instant::now();
        gw.generate(gen()).await.unwrap();
        t.elapsed()
    };
    let seen = Arc::new(AtomicU32::new(0));
    let watcher = {
        let (d, v, seen) = (d.clone(), v.clone(), seen.clone());
        tokio::spawn(async move {
            for _ in 0..400 {
                let (a, b) = live(&d, &v).await;
                seen.fetch_max(a.min(b), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut req = tonic::Request::new(gen());
    req.set_timeout(full / 2);
    let e = gw.generate(req).await.unwrap_err();
    assert!(
        matches!(
            e.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{e:?}"
    );
    let took = freed_after(&d, &v).await;
    watcher.abort();
    assert_eq!(
        seen.load(Ordering::Relaxed),
        1,
        "the request opened its sessions"
    );
    assert!(
        took < Duration::from_secs(1),
        "the deadline freed the sessions after {took:?}"
    );
}
