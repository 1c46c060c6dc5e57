//! Continuous batching over gRPC on the real verifier: with `--max-queue 1` a second call while
//! one runs is refused with RESOURCE_EXHAUSTED and the admitted one completes; releasing a session
//! stops its decode (answered NOT_FOUND) and no forward pass runs after it; `Status` counts the
//! batched passes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use mulo_proto::v1 as pb;
use mulo_proto::v1::verifier_client::VerifierClient;
use tonic::transport::Channel;
use tonic::Code;

fn open(id: &str) -> pb::VerifierOpenRequest {
    pb::VerifierOpenRequest {
        spec: Some(common::session_spec(id)),
        with_draft: false,
        committed: Vec::new(),
    }
}

fn decode(id: &str, committed: u32, count: u32) -> pb::DecodeRequest {
    pb::DecodeRequest {
        session: Some(pb::SessionRef {
            session_id: id.into(),
            epoch: 0,
            committed_len: committed,
        }),
        count,
    }
}

async fn status(v: &mut VerifierClient<Channel>) -> pb::StatusResponse {
    v.status(pb::StatusRequest {}).await.unwrap().into_inner()
}

/// Waits until `n` calls run on the verifier's torch thread.
async fn until_queued(v: &mut VerifierClient<Channel>, n: u32) {
    while status(v).await.queued_calls != n {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn a_full_queue_refuses_and_a_release_stops_a_decode() {
    let mut p = common::start("mulo-verifier", &["--max-queue", "1", "--threads", "1"]);
    let mut v = VerifierClient::new(common::connect(&mut p).await);
    let info = v.open(open("a")).await.unwrap().into_inner();
    let n = info
        .info
        .and_then(|i| i.grid)
        .map_or(0, |g| g.rows * g.cols);
    assert!(n > 16, "grid of {n} tokens");
    v.open(open("b")).await.unwrap();

    // A decodes the whole grid (one token per round); B's call meanwhile finds the queue full.
    let long = tokio::spawn({
        let mut v = v.clone();
        async move { v.decode(decode("a", 0, n)).await }
    });
    until_queued(&mut v, 1).await;
    let refused = v.decode(decode("b", 0, 16)).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("--max-queue"), "{refused:?}");
    let a = long.await.unwrap().unwrap().into_inner();
    assert_eq!(a.tokens.len(), n as usize, "the admitted call is not lost");
    let b = v.decode(decode("b", 0, 16)).await.unwrap().into_inner();
    assert_eq!(b.tokens.len(), 16);

    // B decodes the rest; releasing B answers that call NOT_FOUND and stops its passes.
    let rest = tokio::spawn({
        let mut v = v.clone();
        async move { v.decode(decode("b", 16, n - 16)).await }
    });
    until_queued(&mut v, 1).await;
    v.release(pb::ReleaseRequest {
        session_id: "b".into(),
    })
    .await
    .unwrap();
    let stopped = rest.await.unwrap().unwrap_err();
    assert_eq!(stopped.code(), Code::NotFound, "{stopped:?}");
    let after = status(&mut v).await;
    assert_eq!(after.queued_calls, 0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let later = status(&mut v).await;
    assert_eq!(
        later.batch_forwards, after.batch_forwards,
        "passes after the release"
    );
    // One session at a time here: every pass served one session.
    assert_eq!(later.batch_sessions, later.batch_forwards);
    assert!(later.batch_forwards as u32 >= n + 16);
}
