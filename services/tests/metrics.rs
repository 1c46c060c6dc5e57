//! Prometheus metrics of the three services: scraped before and after requests, the counters move
//! by what the requests report (and what the roles count on their own side of the wire).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{has, metric, scrape};
use mulo_core::metrics as m;
use mulo_proto::v1 as pb;
use mulo_proto::v1::gateway_client::GatewayClient;
use mulo_proto::v1::verifier_client::VerifierClient;

/// Scrapes of the drafter, verifier and gateway.
struct Scrape([String; 3]);

impl Scrape {
    fn take(addrs: &[String; 3]) -> Self {
        Self(std::array::from_fn(|i| scrape(&addrs[i])))
    }
}

/// Change of `name{labels}` on service `i` (0 drafter, 1 verifier, 2 gateway).
fn delta(a: &Scrape, b: &Scrape, i: usize, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(&b.0[i], name, labels) - metric(&a.0[i], name, labels)
}

const D: usize = 0;
const V: usize = 1;
const G: usize = 2;

#[tokio::test]
async fn counters_move_by_what_each_request_reports() {
    let (mut drafter, verifier, gateway, ch, addrs) = common::cluster_with_metrics().await;
    let mut gw = GatewayClient::new(ch);

    // Every service describes what it exports, with the service label on each sample.
    let first = Scrape::take(&addrs);
    assert!(
        first.0[G].contains(&format!("# HELP {} ", m::REQUESTS_IN_FLIGHT_LIMIT)),
        "{}",
        first.0[G]
    );
    assert!(first.0[G].contains("service=\"mulo-gateway\""));
    // The series alerts divide by exist from the start, at 0.
    for reason in m::FALLBACK_REASONS {
        assert!(
            has(&first.0[G], m::FALLBACKS, &[("reason", reason)]),
            "{reason}"
        );
    }
    assert!(has(
        &first.0[G],
        m::MIGRATIONS,
        &[("reason", "unreachable")]
    ));
    assert!(has(&first.0[G], m::REQUESTS_IN_FLIGHT, &[]));
    assert_eq!(
        metric(&first.0[V], m::SESSIONS, &[("role", "verifier")]),
        0.0
    );
    assert_eq!(
        metric(&first.0[V], m::SESSION_LIMIT, &[("role", "verifier")]),
        64.0
    );
    assert_eq!(
        metric(&first.0[D], m::SESSION_LIMIT, &[("role", "drafter")]),
        64.0
    );

    // MuLo-SD with radius 0: every position is proposed once and either accepted or resampled.
    let before = Scrape::take(&addrs);
    let mut req = common::request("red apple", "mulo:radius=0", 7);
    req.return_tokens = true;
    let r = gw.generate(req).await.unwrap().into_inner();
    let s = r.stats.unwrap();
    assert!(s.fallback.is_empty(), "{}", s.fallback);
    let after = Scrape::take(&addrs);
    let mulo = [("method", "mulo")];
    let d = |i, name, labels: &[(&str, &str)]| delta(&before, &after, i, name, labels);
    assert_eq!(
        d(G, m::REQUESTS, &[("method", "mulo"), ("outcome", "ok")]),
        1.0
    );
    assert_eq!(d(G, m::COMMITTED_TOKENS, &mulo), f64::from(s.tokens));
    assert_eq!(s.tokens as usize, r.tokens.len());
    assert_eq!(d(G, m::PROPOSED_TOKENS, &mulo), f64::from(s.tokens));
    assert_eq!(
        d(G, m::ACCEPTED_TOKENS, &mulo) + d(G, m::RESAMPLED_TOKENS, &mulo),
        d(G, m::COMMITTED_TOKENS, &mulo)
    );
    assert_eq!(d(G, m::ACCEPTED_TOKENS, &mulo), f64::from(s.accepted));
    assert_eq!(d(G, m::CYCLES, &mulo), f64::from(s.cycles));
    // Forward passes: what the coordinator accounted equals what the roles ran.
    assert_eq!(d(G, m::TARGET_PASSES, &mulo), f64::from(s.target_passes));
    assert_eq!(
        d(V, m::FORWARD_PASSES, &[("model", "target")]),
        f64::from(s.target_passes)
    );
    assert_eq!(d(G, m::DRAFTER_PASSES, &mulo), f64::from(s.drafter_passes));
    assert_eq!(
        d(D, m::FORWARD_PASSES, &[("model", "drafter")]),
        f64::from(s.drafter_passes)
    );
    // One verify per cycle, on both sides of the wire; a network share for every role call.
    let cycles = f64::from(s.cycles);
    let count = format!("{}_count", m::STAGE_DURATION);
    assert_eq!(d(G, &count, &[("stage", "verify")]), cycles);
    assert_eq!(d(G, &count, &[("stage", "draft")]), cycles);
    assert!(d(G, &count, &[("stage", "network")]) >= 2.0 * cycles);
    let verify_rpc = [("rpc", "mulo.v1.Verifier/Verify"), ("outcome", "ok")];
    assert_eq!(d(V, m::RPCS, &verify_rpc), cycles);
    let duration = format!("{}_count", m::REQUEST_DURATION);
    assert_eq!(d(G, &duration, &mulo), 1.0);
    // Bytes per peer add up to what the request reports, and both peers were talked to.
    let wire = d(G, m::SENT_BYTES, &[]) + d(G, m::RECEIVED_BYTES, &[]);
    assert_eq!(wire, s.wire_bytes as f64);
    for peer in [&drafter.addr, &verifier.addr] {
        assert!(d(G, m::SENT_BYTES, &[("peer", peer)]) > 0.0, "{peer}");
        assert!(d(G, m::RECEIVED_BYTES, &[("peer", peer)]) > 0.0, "{peer}");
    }
    // Nothing is left held (and the gauges are there, not merely absent).
    assert_eq!(metric(&after.0[G], m::REQUESTS_IN_FLIGHT, &[]), 0.0);
    for (i, role) in [(D, "drafter"), (V, "verifier")] {
        assert!(has(&after.0[i], m::SESSIONS, &[("role", role)]), "{role}");
        assert!(
            has(&after.0[i], m::KV_CACHE_BYTES, &[("role", role)]),
            "{role}"
        );
        assert_eq!(metric(&after.0[i], m::SESSIONS, &[("role", role)]), 0.0);
        assert_eq!(
            metric(&after.0[i], m::KV_CACHE_BYTES, &[("role", role)]),
            0.0
        );
    }

    // SD: each round's proposals are accepted up to the first rejection, then one target token.
    let before = Scrape::take(&addrs);
    let r = gw
        .generate(common::request("red apple", "sd:gamma=4", 3))
        .await
        .unwrap()
        .into_inner();
    let s = r.stats.unwrap();
    let after = Scrape::take(&addrs);
    let sd = [("method", "sd")];
    let d = |i, name, labels: &[(&str, &str)]| delta(&before, &after, i, name, labels);
    assert_eq!(d(G, m::COMMITTED_TOKENS, &sd), f64::from(s.tokens));
    assert_eq!(
        d(G, m::ACCEPTED_TOKENS, &sd) + d(G, m::RESAMPLED_TOKENS, &sd),
        f64::from(s.tokens)
    );
    assert_eq!(d(G, m::PROPOSED_TOKENS, &sd), f64::from(s.proposed));
    assert_eq!(
        d(V, m::FORWARD_PASSES, &[("model", "target")]),
        f64::from(s.target_passes)
    );
    assert_eq!(
        d(V, m::FORWARD_PASSES, &[("model", "draft_small")]),
        f64::from(s.drafter_passes)
    );

    // A session held on the verifier shows in its gauges until released.
    let mut v = VerifierClient::new(common::connect_to(&verifier.addr).await);
    v.open(pb::VerifierOpenRequest {
        spec: Some(common::session_spec("held")),
        with_draft: false,
        committed: Vec::new(),
    })
    .await
    .unwrap();
    let held = scrape(&addrs[V]);
    assert_eq!(metric(&held, m::SESSIONS, &[("role", "verifier")]), 1.0);
    assert!(metric(&held, m::KV_CACHE_BYTES, &[("role", "verifier")]) > 0.0);
    v.release(pb::ReleaseRequest {
        session_id: "held".into(),
    })
    .await
    .unwrap();
    let freed = scrape(&addrs[V]);
    assert_eq!(metric(&freed, m::SESSIONS, &[("role", "verifier")]), 0.0);
    assert_eq!(
        metric(&freed, m::KV_CACHE_BYTES, &[("role", "verifier")]),
        0.0
    );

    // A bad request is counted with its code, on the gateway's request and RPC counters.
    let before = Scrape::take(&addrs);
    let e = gw
        .generate(common::request("red apple", "no-such-method", 1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let after = Scrape::take(&addrs);
    let d = |i, name, labels: &[(&str, &str)]| delta(&before, &after, i, name, labels);
    assert_eq!(
        d(
            G,
            m::REQUESTS,
            &[("method", "unknown"), ("outcome", "invalid_argument")]
        ),
        1.0
    );
    assert_eq!(
        d(
            G,
            m::RPCS,
            &[
                ("rpc", "mulo.v1.Gateway/Generate"),
                ("outcome", "invalid_argument")
            ]
        ),
        1.0
    );
    assert_eq!(d(G, m::REQUESTS, &[("outcome", "ok")]), 0.0);

    // A caller that goes away mid-request: the call and the request count as cancelled.
    let before = Scrape::take(&addrs);
    let mut c = gw.clone();
    let call = tokio::spawn(async move { c.generate(common::request("red apple", "ar", 9)).await });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    call.abort();
    let _ = call.await;
    let mut after = Scrape::take(&addrs);
    // The verifier finishes the AR decode it was running (one call, not interruptible) before
    // it frees the session: wait for that, so that its passes stay out of the next check.
    for _ in 0..200 {
        if metric(&after.0[G], m::REQUESTS_IN_FLIGHT, &[]) == 0.0
            && metric(&after.0[V], m::SESSIONS, &[("role", "verifier")]) == 0.0
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        after = Scrape::take(&addrs);
    }
    let d = |i, name, labels: &[(&str, &str)]| delta(&before, &after, i, name, labels);
    assert_eq!(
        d(
            G,
            m::REQUESTS,
            &[("method", "ar"), ("outcome", "cancelled")]
        ),
        1.0
    );
    assert_eq!(
        d(
            G,
            m::RPCS,
            &[
                ("rpc", "mulo.v1.Gateway/Generate"),
                ("outcome", "cancelled")
            ]
        ),
        1.0
    );
    assert_eq!(metric(&after.0[G], m::REQUESTS_IN_FLIGHT, &[]), 0.0);

    // A path no service has: counted once, as `other`.
    let before = scrape(&addrs[G]);
    let mut raw = tonic::client::Grpc::new(common::connect_to(&gateway.addr).await);
    raw.ready().await.unwrap();
    let e = raw
        .unary::<pb::StatusRequest, pb::StatusResponse, _>(
            tonic::Request::new(pb::StatusRequest {}),
            "/mulo.v1.Gateway/NoSuchMethod1234".parse().unwrap(),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented);
    let after = scrape(&addrs[G]);
    let other = [("rpc", "other"), ("outcome", "unimplemented")];
    assert_eq!(
        metric(&after, m::RPCS, &other) - metric(&before, m::RPCS, &other),
        1.0
    );
    assert!(!after.contains("NoSuchMethod1234"));

    // The drafter gone: MuLo-SD falls back to AR on the verifier, counted by reason.
    let _ = drafter.child.kill();
    let _ = drafter.child.wait();
    let before = Scrape::take_without_drafter(&addrs);
    let r = gw
        .generate(common::request("red apple", "mulo", 5))
        .await
        .unwrap()
        .into_inner();
    let s = r.stats.unwrap();
    assert!(s.fallback.contains("drafter"), "{}", s.fallback);
    let after = Scrape::take_without_drafter(&addrs);
    let d = |i, name, labels: &[(&str, &str)]| delta(&before, &after, i, name, labels);
    assert_eq!(
        d(G, m::FALLBACKS, &[("reason", "drafter_open_failed")]),
        1.0
    );
    assert_eq!(
        d(G, m::REQUESTS, &[("method", "mulo"), ("outcome", "ok")]),
        1.0
    );
    assert_eq!(d(G, m::COMMITTED_TOKENS, &mulo), f64::from(s.tokens));
    assert_eq!(
        d(V, m::FORWARD_PASSES, &[("model", "target")]),
        f64::from(s.target_passes)
    );
}

impl Scrape {
    /// [`Scrape::take`] with the drafter gone (its text left empty).
    fn take_without_drafter(addrs: &[String; 3]) -> Self {
        Self([String::new(), scrape(&addrs[V]), scrape(&addrs[G])])
    }
}

#[test]
fn a_taken_metrics_port_is_a_clear_error() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let fam = common::family();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mulo-verifier"))
        .args(["--family", fam.to_str().unwrap(), "--metrics-listen", &addr])
        .args(["--listen", &format!("127.0.0.1:{}", common::free_port())])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("serving metrics on {addr}")), "{err}");
}
