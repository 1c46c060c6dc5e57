//! Overload: a gateway that admits two requests at a time, hit by bursts of 200 concurrent
//! requests, refuses the rest with RESOURCE_EXHAUSTED at once, completes the admitted ones, keeps
//! the roles' sessions at the limit, and its memory (and the roles') stays flat from burst to
//! burst.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use mulo_proto::v1 as pb;
use mulo_proto::v1::gateway_client::GatewayClient;
use tonic::Code;

fn request(seed: u64) -> pb::GenerateRequest {
    common::request("red apple", "mulo", seed)
}

/// One burst of `n` concurrent requests: (completed, refused, slowest refusal).
async fn burst(gw: &GatewayClient<tonic::transport::Channel>, n: u64) -> (usize, usize, Duration) {
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let mut c = gw.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                let r = c.generate(request(i)).await;
                (r.map(|_| ()).map_err(|s| s.code()), t.elapsed())
            })
        })
        .collect();
    let (mut ok, mut refused, mut slowest) = (0, 0, Duration::ZERO);
    for c in calls {
        match c.await.unwrap() {
            (Ok(()), _) => ok += 1,
            (Err(Code::ResourceExhausted), took) => {
                refused += 1;
                slowest = slowest.max(took);
            }
            (Err(code), _) => panic!("unexpected {code:?}"),
        }
    }
    (ok, refused, slowest)
}

#[tokio::test]
async fn bursts_past_the_admission_limit_are_refused_and_memory_stays_flat() {
    let (drafter, verifier, gateway, ch) =
        common::cluster_with(&["--max-in-flight", "2"], &[]).await;
    let gw = GatewayClient::new(ch);
    let dch = common::connect_to(&drafter.addr).await;
    let vch = common::connect_to(&verifier.addr).await;
    let pids = [gateway.child.id(), drafter.child.id(), verifier.child.id()];
    // Warm: the first burst allocates what the steady state needs.
    let (ok, refused, _) = burst(&gw, 200).await;
    assert!(ok >= 2 && ok + refused == 200, "{ok} + {refused}");
    let after_first: Vec<f64> = pids.iter().map(|&p| common::rss_mib(p)).collect();
    let mut slowest = Duration::ZERO;
    for _ in 0..3 {
        let (ok, refused, s) = burst(&gw, 200).await;
        assert!(ok >= 2, "the admitted requests complete: {ok}");
        assert!(refused >= 150, "most of the burst is refused: {refused}");
        slowest = slowest.max(s);
    }
    let after: Vec<f64> = pids.iter().map(|&p| common::rss_mib(p)).collect();
    eprintln!(
        "RSS MiB gateway/drafter/verifier after the first burst {after_first:?}, after three more {after:?}; slowest refusal {slowest:?}"
    );
    for (name, (a, b)) in ["gateway", "drafter", "verifier"]
        .iter()
        .zip(after_first.iter().zip(&after))
    {
        assert!(
            b - a < 32.0,
            "{name} grew from {a:.0} to {b:.0} MiB over three bursts"
        );
    }
    // Refusals do not wait for the admitted work (the bar: within 100 ms).
    assert!(
        slowest < Duration::from_millis(100),
        "slowest refusal {slowest:?}"
    );
    // Nothing is left behind on the roles.
    let mut ds = mulo_proto::v1::drafter_client::DrafterClient::new(dch);
    let mut vs = mulo_proto::v1::verifier_client::VerifierClient::new(vch);
    let st = ds.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.live_sessions, 0);
    let st = vs.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.live_sessions, 0);
}
