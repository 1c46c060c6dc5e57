//! Malformed requests to the real services get the right status code and a message naming the
//! problem, the services keep serving afterwards, and past the gateway's admission limit extra
//! requests are refused with RESOURCE_EXHAUSTED at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use mulo_proto::v1 as pb;
use mulo_proto::v1::drafter_client::DrafterClient;
use mulo_proto::v1::gateway_client::GatewayClient;
use mulo_proto::v1::verifier_client::VerifierClient;
use tonic::Code;

fn prompt(p: &str) -> Option<pb::Condition> {
    Some(pb::Condition {
        kind: Some(pb::condition::Kind::Prompt(p.into())),
    })
}

fn gen(method: &str) -> pb::GenerateRequest {
    pb::GenerateRequest {
        request_id: String::new(),
        condition: prompt("red apple"),
        method: method.into(),
        sampling: None,
        seed: 1,
        return_tokens: true,
        skip_png: true,
    }
}

fn sampling() -> Option<pb::Sampling> {
    Some(pb::Sampling {
        cfg_scale: Some(5.0),
        temperature: Some(1.0),
        top_k: Some(0),
        top_p: Some(1.0),
    })
}

fn spec(id: &str) -> Option<pb::SessionSpec> {
    Some(pb::SessionSpec {
        session_id: id.into(),
        epoch: 0,
        condition: prompt("red apple"),
        sampling: sampling(),
        seed: 1,
    })
}

fn at(id: &str, epoch: u64, committed: u32) -> Option<pb::SessionRef> {
    Some(pb::SessionRef {
        session_id: id.into(),
        epoch,
        committed_len: committed,
    })
}

/// Checks one refusal: its code and that the message names `needle`.
fn refused<T: std::fmt::Debug>(
    what: &str,
    r: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    needle: &str,
    count: &mut usize,
) {
    let e = r.expect_err(what);
    assert_eq!(e.code(), code, "{what}: {e:?}");
    assert!(
        e.message().to_lowercase().contains(&needle.to_lowercase()),
        "{what}: the message does not name '{needle}': {}",
        e.message()
    );
    *count += 1;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_the_right_status_and_the_services_keep_serving() {
    let (drafter, verifier, gateway, ch) = common::cluster().await;
    let mut gw = GatewayClient::new(ch);
    let mut v = VerifierClient::new(common::connect_to(&verifier.addr).await);
    let mut d = DrafterClient::new(common::connect_to(&drafter.addr).await);
    let n = &mut 0;
    let bad = Code::InvalidArgument;

    // The gateway.
    let mut r = gen("mulo");
    r.condition = None;
    refused("no condition", gw.generate(r).await, bad, "condition", n);
    let mut r = gen("mulo");
    r.condition = Some(pb::Condition { kind: None });
    refused("empty condition", gw.generate(r).await, bad, "condition", n);
    let mut r = gen("mulo");
    r.condition = prompt("   ");
    refused("blank prompt", gw.generate(r).await, bad, "condition", n);
    for (method, field) in [
        ("bogus", "method"),
        ("mulo:tau=2", "tau"),
        ("mulo:pool_k=0", "pool_k"),
        ("mulo:block_rows=0", "block_rows"),
        ("mulo:rejection=sideways", "rejection"),
        ("mulo:nope=1", "nope"),
        ("sd:gamma=0", "gamma"),
        ("lantern:delta=-1", "delta"),
    ] {
        refused(method, gw.generate(gen(method)).await, bad, field, n);
    }
    let mut r = gen("ar");
    r.sampling = Some(pb::Sampling {
        top_p: Some(1.5),
        ..Default::default()
    });
    refused("top_p 1.5", gw.generate(r).await, bad, "top_p", n);
    let mut r = gen("ar");
    r.sampling = Some(pb::Sampling {
        temperature: Some(-1.0),
        ..Default::default()
    });
    refused(
        "temperature -1",
        gw.generate(r).await,
        bad,
        "temperature",
        n,
    );
    let mut r = gen("ar");
    r.request_id = "no spaces allowed".into();
    refused("request id", gw.generate(r).await, bad, "request_id", n);
    let mut r = gen("ar");
    r.condition = Some(pb::Condition {
        kind: Some(pb::condition::Kind::CaptionFeatures(pb::CaptionFeatures {
            features: vec![0.0; 5],
            len: 2,
            dim: 3,
            mask: Vec::new(),
        })),
    });
    refused("feature size", gw.generate(r).await, bad, "condition", n);
    let mut r = gen("ar");
    r.condition = Some(pb::Condition {
        kind: Some(pb::condition::Kind::ClassId(3)),
    });
    refused(
        "class id on a caption model",
        gw.generate(r).await,
        bad,
        "class",
        n,
    );

    // The verifier.
    let open = |s: Option<pb::SessionSpec>| pb::VerifierOpenRequest {
        spec: s,
        with_draft: false,
        committed: Vec::new(),
    };
    refused(
        "open without spec",
        v.open(open(None)).await,
        bad,
        "spec",
        n,
    );
    let mut s = spec("v1");
    s.as_mut().unwrap().sampling = None;
    refused(
        "open without sampling",
        v.open(open(s)).await,
        bad,
        "spec.sampling",
        n,
    );
    let mut s = spec("v1");
    s.as_mut().unwrap().session_id = String::new();
    refused(
        "open without id",
        v.open(open(s)).await,
        bad,
        "session_id",
        n,
    );
    let mut o = open(spec("v1"));
    o.committed = vec![999_999];
    refused("committed id", v.open(o).await, bad, "committed", n);
    let verify = |r: Option<pb::SessionRef>, proposals: Vec<u32>, pool_k: u32| pb::VerifyRequest {
        session: r,
        commit: Vec::new(),
        proposals,
        pool_k,
    };
    refused(
        "verify without session",
        v.verify(verify(None, vec![1], 8)).await,
        bad,
        "session",
        n,
    );
    refused(
        "unknown session",
        v.verify(verify(at("nobody", 0, 0), vec![1], 8)).await,
        Code::NotFound,
        "nobody",
        n,
    );
    v.open(open(spec("v1"))).await.unwrap();
    refused(
        "no proposals",
        v.verify(verify(at("v1", 0, 0), vec![], 8)).await,
        bad,
        "proposals",
        n,
    );
    refused(
        "stale epoch",
        v.verify(verify(at("v1", 5, 0), vec![1], 8)).await,
        Code::FailedPrecondition,
        "epoch",
        n,
    );
    refused(
        "wrong committed length",
        v.verify(verify(at("v1", 0, 7), vec![1], 8)).await,
        Code::FailedPrecondition,
        "committed",
        n,
    );
    refused(
        "pool_k 0",
        v.verify(verify(at("v1", 0, 0), vec![1], 0)).await,
        bad,
        "pool_k",
        n,
    );
    refused(
        "decode 0",
        v.decode(pb::DecodeRequest {
            session: at("v1", 0, 0),
            count: 0,
        })
        .await,
        bad,
        "count",
        n,
    );
    refused(
        "resample outside the block",
        v.resample(pb::ResampleRequest {
            session: at("v1", 0, 0),
            islands: vec![pb::ResampleIsland {
                positions: vec![200],
            }],
            resampler: pb::Resampler::Jacobi as i32,
            window: 0,
            wavefront: 0,
        })
        .await,
        bad,
        "plan",
        n,
    );
    refused(
        "resample plan without islands (an older gateway's per-pass plan)",
        v.resample(pb::ResampleRequest {
            session: at("v1", 0, 0),
            islands: Vec::new(),
            resampler: 0,
            window: 0,
            wavefront: 0,
        })
        .await,
        bad,
        "islands",
        n,
    );
    refused(
        "unknown resampler",
        v.resample(pb::ResampleRequest {
            session: at("v1", 0, 0),
            islands: vec![pb::ResampleIsland { positions: vec![1] }],
            resampler: 7,
            window: 0,
            wavefront: 0,
        })
        .await,
        bad,
        "resampler",
        n,
    );
    refused(
        "gamma 0",
        v.speculate(pb::SpeculateRequest {
            session: at("v1", 0, 0),
            gamma: 0,
            relaxation: None,
        })
        .await,
        bad,
        "gamma",
        n,
    );
    v.release(pb::ReleaseRequest {
        session_id: "v1".into(),
    })
    .await
    .unwrap();

    // The drafter.
    let dopen = |s: Option<pb::SessionSpec>, committed: Vec<u32>| pb::DrafterOpenRequest {
        spec: s,
        committed,
    };
    refused(
        "committed not whole blocks",
        d.open(dopen(spec("d1"), vec![1; 5])).await,
        bad,
        "committed",
        n,
    );
    d.open(dopen(spec("d1"), Vec::new())).await.unwrap();
    refused(
        "draft 0 rows",
        d.draft(pb::DraftRequest {
            session: at("d1", 0, 0),
            realign: Vec::new(),
            rows: 0,
            zipar_window: 0,
        })
        .await,
        bad,
        "rows",
        n,
    );
    refused(
        "draft past the grid",
        d.draft(pb::DraftRequest {
            session: at("d1", 0, 0),
            realign: Vec::new(),
            rows: 99,
            zipar_window: 0,
        })
        .await,
        bad,
        "rows",
        n,
    );
    refused(
        "decode a short grid",
        d.decode_image(pb::DecodeImageRequest { tokens: vec![1; 7] })
            .await,
        bad,
        "tokens",
        n,
    );
    refused(
        "decode an unknown code",
        d.decode_image(pb::DecodeImageRequest {
            tokens: vec![99_999; 256],
        })
        .await,
        bad,
        "tokens",
        n,
    );
    d.release(pb::ReleaseRequest {
        session_id: "d1".into(),
    })
    .await
    .unwrap();
    assert!(*n >= 20, "{n} kinds");

    // Still serving: a real request, and no session left behind.
    let ok = gw.generate(gen("mulo")).await.unwrap().into_inner();
    assert_eq!(ok.tokens.len(), 256);
    let live = v.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(live.live_sessions, 0);
    let live = d.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(live.live_sessions, 0);

    // Admission: a gateway that runs one request at a time refuses a second at once.
    let fam = common::family();
    let mut one = common::start(
        "mulo-gateway",
        &[
            "--family",
            fam.to_str().unwrap(),
            "--threads",
            "1",
            "--max-in-flight",
            "1",
            "--drafter",
            &drafter.addr,
            "--verifier",
            &verifier.addr,
        ],
    );
    let mut gw1 = GatewayClient::new(common::connect(&mut one).await);
    let mut first = gw1.generate_stream(gen("mulo")).await.unwrap().into_inner();
    // The first request holds the slot from its first block (of four) to its end.
    first.message().await.unwrap().unwrap();
    let t = Instant::now();
    let second = gw1.generate(gen("ar")).await;
    let waited = t.elapsed();
    refused(
        "past the limit",
        second,
        Code::ResourceExhausted,
        "limit",
        n,
    );
    assert!(
        waited < Duration::from_millis(100),
        "refused after {waited:?}"
    );
    while first.message().await.unwrap().is_some() {}
    drop(gateway);
}
