//! Continuous batching on tiny random models (CPU): concurrent requests share forward passes and
//! get the tokens they get one at a time; an AR decode advances one token per round and a release
//! stops it within one; a full queue refuses at once and loses nothing it admitted; a long AR
//! request does not hold back short MuLo ones.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::cell::Cell;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use common::{at, engine, engine_with, spec, V};
use mulo_core::method::Resampler;
use mulo_core::{Condition, GridSize, Method, SamplingParams};
use mulo_engine::resample::IslandPlan;
use mulo_engine::worker::Rounds;
use mulo_engine::{
    generate, BatchLimits, Batching, Engine, EngineError, GenerateRequest, Local, TorchWorker,
};
use tokio::sync::oneshot;

fn local_with(make: fn() -> Engine, batching: Batching) -> Local {
    let worker = TorchWorker::spawn_rounds("torch", move || {
        let mut e = make();
        e.set_batching(batching);
        Ok::<_, EngineError>(e)
    })
    .unwrap();
    Local::new(Arc::new(worker))
}

fn request(method: &str, seed: u64, cfg: f64) -> GenerateRequest {
    GenerateRequest {
        id: format!("{method}-{seed}-{cfg}"),
        condition: Condition::Class((seed % 3) as u32),
        sampling: SamplingParams {
            cfg_scale: cfg,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        },
        seed,
        method: Method::parse(method).unwrap(),
    }
}

/// Runs `requests` at once through `roles`; each request's tokens.
async fn all_at_once(roles: &Local, requests: &[GenerateRequest]) -> Vec<Vec<i64>> {
    let handles: Vec<_> = requests
        .iter()
        .map(|r| {
            let (roles, r) = (roles.clone(), r.clone());
            tokio::spawn(async move {
                generate(Some(&roles), &roles, &r, &mut |_| {})
                    .await
                    .unwrap()
                    .tokens
            })
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

fn limits(max_sessions: usize) -> Batching {
    Batching {
        limits: BatchLimits {
            max_sessions,
            max_tokens: 4096,
        },
        ..Batching::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_forwards_and_get_their_own_tokens() {
    let requests = [
        request("ar", 1, 2.0),
        request("ar", 2, 1.0),
        request("mulo:tau=0.3,block_rows=1", 3, 2.0),
        request("mulo:tau=0.3,radius=0,block_rows=1,zipar_window=1", 4, 1.0),
        request("sd:gamma=3", 5, 2.0),
        request("lantern:gamma=3", 6, 1.0),
    ];
    let batched = local_with(engine, limits(16));
    let one_at_a_time = local_with(engine, limits(1));
    let got = all_at_once(&batched, &requests).await;
    let want = all_at_once(&one_at_a_time, &requests).await;
    assert_eq!(got, want, "batching changed a request's tokens");
    let shared = batched.worker().run(|e| e.batch_stats()).unwrap();
    let alone = one_at_a_time.worker().run(|e| e.batch_stats()).unwrap();
    assert!(shared.mean_sessions() > 1.0, "{shared:?}");
    assert!((alone.mean_sessions() - 1.0).abs() < 1e-9, "{alone:?}");
    assert!(shared.forwards < alone.forwards, "{shared:?} vs {alone:?}");
}

/// Submits a decode of `count` tokens on a fresh session `id`; its reply and its progress.
fn submit_decode(
    e: &mut Engine,
    id: &str,
    count: usize,
) -> (
    oneshot::Receiver<Result<mulo_engine::verifier::DecodeReply, EngineError>>,
    Rc<Cell<usize>>,
) {
    let v = e.verifier.as_mut().unwrap();
    v.open(&spec(id, 7, 2.0), false, &[]).unwrap();
    let done = Rc::new(Cell::new(0));
    let seen = done.clone();
    let op = v
        .decode_op(at(id, 0), count, Box::new(move |n| seen.set(n)))
        .unwrap();
    let (tx, rx) = oneshot::channel();
    e.submit(op, tx).unwrap();
    (rx, done)
}

#[test]
fn a_decode_takes_one_token_per_round_and_a_release_stops_it_within_one() {
    let mut e = engine();
    let (mut rx, done) = submit_decode(&mut e, "a", 16);
    // Grid position 0 reads the prefill's logits; every later token is one forward per round.
    for _ in 0..5 {
        e.round();
    }
    let before = done.get();
    assert!((4..=6).contains(&before), "{before} tokens after 5 rounds");
    assert!(rx.try_recv().is_err(), "still running");
    let forwards = e.batch_stats().forwards;
    e.verifier.as_mut().unwrap().release("a");
    e.round();
    e.round();
    let reply = rx
        .try_recv()
        .expect("answered within a round of the release");
    assert!(
        matches!(reply, Err(EngineError::UnknownSession(_))),
        "{reply:?}"
    );
    // No forward runs after the release (the token computed just before it may still land).
    assert_eq!(
        e.batch_stats().forwards,
        forwards,
        "a forward ran after the release"
    );
    assert!(done.get() <= before + 1);
    assert!(!e.busy());
}

#[test]
fn drafts_of_several_sessions_share_drafter_and_up_sampler_passes() {
    // Three sessions drafting their first two rows at once, and each alone.
    let ids = ["a", "b", "c"];
    let mut e = engine();
    for (i, id) in ids.iter().enumerate() {
        let d = e.drafter.as_mut().unwrap();
        d.open(&spec(id, 11 + i as u64, 2.0), &[]).unwrap();
    }
    let opened = e.drafter.as_ref().unwrap().batch_stats();
    let mut replies = Vec::new();
    for id in ids {
        let d = e.drafter.as_mut().unwrap();
        let op = d.draft_op(at(id, 0), Vec::new(), 2, 0).unwrap();
        let (tx, rx) = oneshot::channel();
        e.submit(op, tx).unwrap();
        replies.push(rx);
    }
    while e.busy() {
        e.round();
    }
    let d = e.drafter.as_ref().unwrap();
    let up = d.upsample_stats();
    assert_eq!((up.forwards, up.sessions), (1, 3), "{up:?}");
    // Every drafting pass served all three sessions.
    let drafting = d.batch_stats();
    assert_eq!(
        drafting.sessions - opened.sessions,
        3 * (drafting.forwards - opened.forwards),
        "{drafting:?}"
    );
    for (i, (id, mut rx)) in ids.iter().zip(replies).enumerate() {
        let together = rx.try_recv().unwrap().unwrap();
        let mut alone = engine();
        let d = alone.drafter.as_mut().unwrap();
        d.open(&spec(id, 11 + i as u64, 2.0), &[]).unwrap();
        let want = d.draft(&at(id, 0), &[], 2, 0).unwrap();
        assert_eq!((together.low, together.high), (want.low, want.high), "{id}");
    }
}

#[test]
fn resampling_position_0_alone_reads_the_prefill() {
    for resampler in [Resampler::Sequential, Resampler::Jacobi] {
        let mut e = engine();
        let v = e.verifier.as_mut().unwrap();
        v.open(&spec("s", 3, 2.0), false, &[]).unwrap();
        v.verify(&at("s", 0), &[], &[3, 1, 4, 1], 2).unwrap();
        // Grid position 0 is drawn from the prefill's logits: no forward (an earlier plan
        // format could ask for one whose logits nobody read, which panicked the torch thread).
        let plan = IslandPlan {
            islands: vec![vec![0]],
            resampler,
            window: 0,
            wavefront: 0,
        };
        let r = v.resample(&at("s", 0), &plan).unwrap();
        assert_eq!((r.tokens.len(), r.passes), (4, 0), "{resampler}");
        assert_eq!(&r.tokens[1..], &[1, 4, 1], "{resampler}");
    }
}

#[test]
fn expiry_spares_a_session_a_call_holds() {
    let mut e = engine();
    let (mut rx, _) = submit_decode(&mut e, "a", 16);
    e.round();
    e.round();
    // Held by its decode: not idle, whatever the TTL.
    let v = e.verifier.as_mut().unwrap();
    assert_eq!(v.expire(std::time::Duration::ZERO), 0);
    while e.busy() {
        e.round();
    }
    assert_eq!(rx.try_recv().unwrap().unwrap().tokens.len(), 16);
    // Idle afterwards: it goes.
    std::thread::sleep(std::time::Duration::from_millis(2));
    let v = e.verifier.as_mut().unwrap();
    assert_eq!(v.expire(std::time::Duration::from_millis(1)), 1);
}

#[test]
fn a_full_queue_refuses_at_once_and_finishes_what_it_admitted() {
    let mut e = engine();
    e.set_batching(Batching {
        max_queue: 2,
        ..Batching::default()
    });
    let (mut a, _) = submit_decode(&mut e, "a", 16);
    let (mut b, _) = submit_decode(&mut e, "b", 16);
    let v = e.verifier.as_mut().unwrap();
    v.open(&spec("c", 7, 2.0), false, &[]).unwrap();
    let op = v.decode_op(at("c", 0), 16, Box::new(|_| {})).unwrap();
    let (tx, _rx) = oneshot::channel();
    let refused = e.submit(op, tx).unwrap_err();
    assert!(matches!(refused, EngineError::Capacity(_)), "{refused}");
    assert!(refused.to_string().contains("--max-queue"), "{refused}");
    while e.busy() {
        e.round();
    }
    for rx in [&mut a, &mut b] {
        let reply = rx.try_recv().unwrap().unwrap();
        assert_eq!(reply.tokens.len(), 16);
        assert!(reply.tokens.iter().all(|&t| (0..V).contains(&t)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_mulo_requests_finish_before_a_long_ar_one_started_first() {
    // Batched, and one session per forward (then the scheduler's order alone decides).
    for batching in [Batching::default(), limits(1)] {
        long_ar_beside_short_mulo(batching).await;
    }
}

async fn long_ar_beside_short_mulo(batching: Batching) {
    // Target 8×8 (64 AR steps), drafter 4×4 with a ×2 up-sampler.
    fn big() -> Engine {
        engine_with(GridSize::square(8), GridSize::square(4))
    }
    let roles = local_with(big, batching);
    let order = Arc::new(Mutex::new(Vec::new()));
    let run = |req: GenerateRequest, order: Arc<Mutex<Vec<String>>>, roles: Local| async move {
        let out = generate(Some(&roles), &roles, &req, &mut |_| {})
            .await
            .unwrap();
        assert_eq!(out.tokens.len(), 64);
        order.lock().unwrap().push(req.id.clone());
    };
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let long = {
        let (order, roles) = (order.clone(), roles.clone());
        tokio::spawn(async move {
            let req = GenerateRequest {
                id: "long-ar".into(),
                ..request("ar", 1, 2.0)
            };
            let mut started = Some(started_tx);
            let out = generate(Some(&roles), &roles, &req, &mut |ev| {
                if ev.committed > 0 {
                    if let Some(tx) = started.take() {
                        let _ = tx.send(());
                    }
                }
            })
            .await
            .unwrap();
            assert_eq!(out.tokens.len(), 64);
            order.lock().unwrap().push(req.id);
        })
    };
    let _ = started_rx.await;
    let shorts: Vec<_> = (0..3)
        .map(|i| {
            let req = GenerateRequest {
                id: format!("short-mulo-{i}"),
                ..request("mulo:tau=0.3,block_rows=2", 10 + i, 2.0)
            };
            tokio::spawn(run(req, order.clone(), roles.clone()))
        })
        .collect();
    for s in shorts {
        s.await.unwrap();
    }
    long.await.unwrap();
    let order = order.lock().unwrap().clone();
    assert_eq!(
        order.last().map(String::as_str),
        Some("long-ar"),
        "{order:?} with {batching:?}"
    );
}
