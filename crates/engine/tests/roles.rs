//! The roles and the coordinator on tiny random models (CPU): the verifier's KV cache after a
//! cycle with resampling equals a fresh prefill, SD reproduces AR's distribution (and a wrong
//! residual is caught), and every method runs end to end through the in-process roles.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;

use mulo_core::method::Resampler;
use mulo_core::{Condition, GridSize, Method};
use mulo_engine::drafter::DrafterCore;
use mulo_engine::resample::{IslandPlan, JacobiFault};
use mulo_engine::verifier::VerifierCore;
use mulo_engine::{generate, Engine, GenerateRequest, Local, TorchWorker};
use mulo_model::Gpt;
use statrs::distribution::{ChiSquared, ContinuousCDF};
use tch::{Device, Kind, Tensor};

mod common;

use common::{at, engine, gpt, sampling, spec, upsampler, vq, V};

/// A fresh cache of `target` holding the condition and `tokens`.
fn fresh_cache(target: &Gpt, cfg: f64, tokens: &[i64]) -> mulo_model::KvCache {
    tch::no_grad(|| {
        let cond = target
            .condition(&Condition::Class(1), sampling(cfg).uses_cfg())
            .unwrap();
        let cls = target.config().cls_token_num;
        let mut cache = target
            .new_cache(cond.batch(), cls + target.config().grid.len() as i64)
            .unwrap();
        let _ = target.prefill(&cond, &mut cache).unwrap();
        let positions: Vec<i64> = (0..tokens.len() as i64).map(|i| cls + i).collect();
        let x = target.embed_tokens(tokens, cond.batch()).unwrap();
        let _ = target.forward(&x, &positions, None, &mut cache).unwrap();
        cache
    })
}

#[test]
fn kv_cache_after_resampling_equals_a_fresh_prefill() {
    for resampler in [Resampler::Sequential, Resampler::Jacobi] {
        // With the verify's reading as the first pass, and with a limit that drops it.
        for keep in [true, false] {
            cache_after_resampling(resampler, keep);
        }
    }
}

fn plan(resampler: Resampler, islands: &[&[usize]]) -> IslandPlan {
    IslandPlan {
        islands: islands.iter().map(|i| i.to_vec()).collect(),
        resampler,
        window: 0,
        wavefront: 0,
    }
}

fn cache_after_resampling(resampler: Resampler, keep_verified: bool) {
    let mut e = engine();
    let v = e.verifier.as_mut().unwrap();
    if !keep_verified {
        v.set_verified_limit_for_tests(0);
    }
    v.open(&spec("s", 7, 3.0), false, &[]).unwrap();
    // Block 0: rows 0-1. Resample an island {1, 2, 5} and a single {7}.
    let p0: Vec<i64> = vec![3, 1, 4, 1, 5, 9, 2, 6];
    let r = v.verify(&at("s", 0), &[], &p0, 2).unwrap();
    assert_eq!(r.mass.len(), 8);
    assert!(
        r.mass.iter().all(|m| (0.0..=1.0 + 1e-5).contains(m)),
        "{r:?}"
    );
    let rs = v
        .resample(&at("s", 0), &plan(resampler, &[&[1, 2, 5], &[7]]))
        .unwrap();
    // Sequential: one pass per position of the largest island, the first answered by the
    // verify's reading when it is kept; Jacobi settles at least one position per island per pass.
    let passes = if keep_verified { 2 } else { 3 };
    match resampler {
        Resampler::Sequential => assert_eq!(rs.passes, passes),
        // Without the reading the first pass is a forward of its own: at least one.
        Resampler::Jacobi => assert!(
            (usize::from(!keep_verified)..=passes).contains(&rs.passes),
            "{}",
            rs.passes
        ),
    }
    assert_eq!(rs.tokens.len(), 8);
    // Untouched positions keep their proposals.
    for i in [0, 3, 4, 6] {
        assert_eq!(rs.tokens[i], p0[i]);
    }
    let block0 = rs.tokens.clone();
    // Block 1 verified with the commit of block 0 merged in; then resampled too.
    let p1: Vec<i64> = vec![5, 3, 5, 8, 9, 7, 9, 3];
    let r1 = v.verify(&at("s", 0), &block0, &p1, 2).unwrap();
    assert!(r1.refreshed >= 1, "the stale tail of block 0 is re-fed");
    let rs1 = v
        .resample(&at("s", 8), &plan(resampler, &[&[8, 9], &[13]]))
        .unwrap();
    let target_tokens: Vec<i64> = block0.iter().chain(&rs1.tokens).copied().collect();
    // Before the commit the cache still holds the proposals' K/V: it differs from a prefill.
    let fresh = fresh_cache(v.target(), 3.0, &target_tokens);
    let before = v.cache("s").unwrap().max_abs_diff(&fresh, 1 + 16);
    assert!(
        before > 1e-3,
        "stale cache should differ, max diff {before}"
    );
    v.commit(&at("s", 8), &rs1.tokens).unwrap();
    assert_eq!(v.committed("s").unwrap(), target_tokens.as_slice());
    let after = v.cache("s").unwrap().max_abs_diff(&fresh, 1 + 16);
    assert!(after <= 1e-4, "refreshed cache vs fresh prefill: {after}");
}

#[test]
fn stale_and_unknown_calls_are_refused() {
    let mut e = engine();
    let v = e.verifier.as_mut().unwrap();
    v.open(&spec("s", 1, 1.0), false, &[]).unwrap();
    let e1 = v
        .verify(&at("s", 3), &[], &[1, 2], 1)
        .unwrap_err()
        .to_string();
    assert!(e1.contains("committed"), "{e1}");
    let mut stale = at("s", 0);
    stale.epoch = 4;
    assert!(v
        .verify(&stale, &[], &[1], 1)
        .unwrap_err()
        .to_string()
        .contains("epoch"));
    assert!(v
        .verify(&at("x", 0), &[], &[1], 1)
        .unwrap_err()
        .to_string()
        .contains("unknown session"));
    let bad = v
        .verify(&at("s", 0), &[], &[1, 99], 1)
        .unwrap_err()
        .to_string();
    assert!(bad.contains("proposals"), "{bad}");
    v.verify(&at("s", 0), &[], &[1, 2], 1).unwrap();
    let bad = v
        .resample(&at("s", 0), &plan(Resampler::Jacobi, &[&[5]]))
        .unwrap_err()
        .to_string();
    assert!(bad.contains("pending"), "{bad}");
    let bad = v.speculate(&at("s", 0), 2, None).unwrap_err().to_string();
    assert!(bad.contains("draft model"), "{bad}");
    assert!(v.release("s"));
    assert!(!v.release("s"));
}

#[test]
fn a_refused_draft_leaves_the_drafter_session_unchanged() {
    let mut e = engine();
    let d = e.drafter.as_mut().unwrap();
    d.open(&spec("d", 2, 1.0), &[]).unwrap();
    let first = d.draft(&at("d", 0), &[], 1, 0).unwrap();
    assert_eq!((first.low.len(), first.high.len()), (2, 8));
    // Two more low-res rows do not fit the 2-row grid: refused, and nothing is realigned.
    let realign: Vec<i64> = vec![1, 2, 3, 4, 5, 6, 7, 8];
    let e1 = d
        .draft(&at("d", 0), &realign, 2, 0)
        .unwrap_err()
        .to_string();
    assert!(e1.contains("rows"), "{e1}");
    // The same realignment with one row still applies at committed length 0.
    let second = d.draft(&at("d", 0), &realign, 1, 0).unwrap();
    assert_eq!(second.high.len(), 8);
    assert!(
        d.draft(&at("d", 8), &second.high, 1, 0).is_err(),
        "grid full"
    );
}

#[test]
fn pipelined_drafting_refreshes_the_rows_drafted_over_a_changed_realignment() {
    // A 4×4 drafter (8×8 proposals), rows drafted one at a time.
    let up = upsampler(&vq().codes());
    let mut d = DrafterCore::new(gpt(GridSize::square(4), V, 2, 3), up, vq(), 4).unwrap();
    d.open(&spec("p", 5, 3.0), &[]).unwrap();
    let b0 = d.draft(&at("p", 0), &[], 1, 0).unwrap();
    // Pipelined: block 1 is drafted over block 0 before block 0 is final.
    let b1 = d.draft(&at("p", 0), &[], 1, 0).unwrap();
    assert_eq!((b0.low.len(), b1.low.len(), b1.high.len()), (4, 4, 16));
    assert_eq!(b1.realigned, 0);
    assert_eq!((b0.first_row, b1.first_row), (0, 1));
    // Block 0 comes back final with other tokens: realigning it changes low-res row 0, and the
    // slots of row 1 (computed over the old row 0) go stale.
    let final0: Vec<i64> = b0.high.iter().map(|&t| (t + 5) % V).collect();
    let b2 = d.draft(&at("p", 0), &final0, 1, 0).unwrap();
    assert!(
        b2.realigned > 0,
        "the test needs a realignment that changes row 0"
    );
    assert_eq!(b2.first_row, 2, "drafted after the pending row 1");
    let (tokens, committed) = d.low_tokens("p").unwrap();
    assert_eq!((tokens.len(), committed), (12, 4), "row 1 stays pending");
    assert_eq!(
        &tokens[4..8],
        b1.low.as_slice(),
        "row 1 keeps its drafted values"
    );
    // Every slot but the last drafted token's holds the current values: equal to a fresh prefill.
    let fresh = fresh_cache(d.gpt(), 3.0, &tokens[..11]);
    let diff = d.cache("p").unwrap().max_abs_diff(&fresh, 1 + 11);
    assert!(diff <= 1e-4, "drafter cache vs fresh prefill: {diff}");
    // A realignment that is not whole low-res rows, or longer than what is pending, is refused.
    assert!(d.draft(&at("p", 16), &final0[..8], 1, 0).is_err());
    let too_long: Vec<i64> = vec![0; 48];
    assert!(d.draft(&at("p", 16), &too_long, 1, 0).is_err());
}

/// Tiny target and draft model on a 1×2 grid with a 6-token vocabulary.
fn pair_verifier() -> VerifierCore {
    two_token_verifier(GridSize { rows: 1, cols: 2 })
}

/// A verifier over a two-token grid, `1×2` or `2×1`.
fn two_token_verifier(g: GridSize) -> VerifierCore {
    let codes =
        mulo_model::seed::with_global_seed(6, || Tensor::randn([6, 4], (Kind::Float, Device::Cpu)));
    VerifierCore::new(gpt(g, 6, 2, 11), Some(gpt(g, 6, 1, 12)), &codes, 4).unwrap()
}

/// Counts of the first two tokens over `n` seeds: with SD (`gamma` 2) or AR.
fn pair_counts(v: &mut VerifierCore, n: u64, sd: bool, offset: u64) -> HashMap<(i64, i64), u64> {
    let mut counts = HashMap::new();
    for seed in 0..n {
        v.open(&spec("p", seed + offset, 1.0), sd, &[]).unwrap();
        let mut toks = Vec::new();
        while toks.len() < 2 {
            if sd {
                toks.extend(v.speculate(&at("p", toks.len()), 2, None).unwrap().tokens);
            } else {
                toks.extend(
                    v.decode(&at("p", toks.len()), 2, Box::new(|_| {}))
                        .unwrap()
                        .tokens,
                );
            }
        }
        *counts.entry((toks[0], toks[1])).or_insert(0) += 1;
        v.release("p");
    }
    counts
}

/// p-value of the chi-square test of homogeneity of two count tables (cells with fewer than 5
/// expected draws are pooled).
fn homogeneity_p(a: &HashMap<(i64, i64), u64>, b: &HashMap<(i64, i64), u64>) -> f64 {
    let (na, nb) = (
        a.values().sum::<u64>() as f64,
        b.values().sum::<u64>() as f64,
    );
    let mut cells: Vec<(f64, f64)> = Vec::new();
    let mut rest = (0.0, 0.0);
    let mut keys: Vec<_> = a.keys().chain(b.keys()).copied().collect();
    keys.sort_unstable();
    keys.dedup();
    for k in keys {
        let (x, y) = (
            *a.get(&k).unwrap_or(&0) as f64,
            *b.get(&k).unwrap_or(&0) as f64,
        );
        if (x + y) * na.min(nb) / (na + nb) < 5.0 {
            rest.0 += x;
            rest.1 += y;
        } else {
            cells.push((x, y));
        }
    }
    if rest.0 + rest.1 > 0.0 {
        cells.push(rest);
    }
    let total = na + nb;
    let mut chi2 = 0.0;
    for (x, y) in &cells {
        let col = x + y;
        let (ea, eb) = (col * na / total, col * nb / total);
        chi2 += (x - ea).powi(2) / ea + (y - eb).powi(2) / eb;
    }
    let df = (cells.len() - 1) as f64;
    1.0 - ChiSquared::new(df).unwrap().cdf(chi2)
}

#[test]
fn sd_reproduces_ar_and_a_wrong_residual_is_caught() {
    const N: u64 = 20_000;
    tch::set_num_threads(1);
    let mut v = pair_verifier();
    let ar = pair_counts(&mut v, N, false, 0);
    let sd = pair_counts(&mut v, N, true, 1_000_000);
    let p = homogeneity_p(&ar, &sd);
    eprintln!("SD vs AR over {N} draws each: chi-square p = {p}");
    assert!(p > 0.001, "SD differs from AR: p = {p}");
    // Drawing the correction from p instead of norm(max(0, p - q)) over-weights the tokens the
    // draft model over-proposes: the same test must reject it.
    v.set_wrong_residual_for_tests(true);
    let wrong = pair_counts(&mut v, N / 4, true, 2_000_000);
    let pw = homogeneity_p(&ar, &wrong);
    eprintln!("wrong residual vs AR: p = {pw}");
    assert!(pw < 0.001, "a wrong residual went unnoticed: p = {pw}");
}

/// Counts of the two tokens of the 1×2 grid resampled as one island over `n` seeds, from
/// proposals that vary with the seed (drawn independently of the verifier's randomness).
fn island_counts(
    v: &mut VerifierCore,
    n: u64,
    plan: &IslandPlan,
    offset: u64,
) -> HashMap<(i64, i64), u64> {
    let mut counts = HashMap::new();
    for seed in 0..n {
        v.open(&spec("j", seed + offset, 1.0), false, &[]).unwrap();
        let proposals = [(seed % 6) as i64, (seed / 6 % 6) as i64];
        v.verify(&at("j", 0), &[], &proposals, 1).unwrap();
        let r = v.resample(&at("j", 0), plan).unwrap();
        *counts.entry((r.tokens[0], r.tokens[1])).or_insert(0) += 1;
        v.release("j");
    }
    counts
}

#[test]
fn island_resampling_keeps_the_targets_distribution_and_a_wrong_rule_is_caught() {
    const N: u64 = 10_000;
    tch::set_num_threads(1);
    let mut v = pair_verifier();
    // An island covering the whole grid is resampled exactly when its joint equals AR's.
    let ar = pair_counts(&mut v, N, false, 0);
    // Jacobi with the whole island in each pass, and with a window of 1 (the second position
    // keeps the proposal as its guess until the first is settled).
    let whole = plan(Resampler::Jacobi, &[&[0, 1]]);
    let cases = [
        (plan(Resampler::Sequential, &[&[0, 1]]), 1_000_000),
        (whole.clone(), 2_000_000),
        (
            IslandPlan {
                window: 1,
                ..whole.clone()
            },
            3_000_000,
        ),
    ];
    for (plan, offset) in &cases {
        let got = island_counts(&mut v, N, plan, *offset);
        let p = homogeneity_p(&ar, &got);
        eprintln!("{plan:?} vs AR over {N} draws each: chi-square p = {p}");
        assert!(p > 0.001, "{plan:?} differs from AR: p = {p}");
    }
    // Keeping a guess drawn from the previous pass's p with probability p(x) instead of
    // min(1, p(x)/q(x)) skews the second token: the same test must reject it.
    v.set_jacobi_fault_for_tests(JacobiFault::IgnoreDraft);
    let wrong = island_counts(&mut v, N / 4, &whole, 4_000_000);
    let pw = homogeneity_p(&ar, &wrong);
    eprintln!("Jacobi with a wrong acceptance rule vs AR: p = {pw}");
    assert!(
        pw < 0.001,
        "a wrong Jacobi acceptance went unnoticed: p = {pw}"
    );
}

#[test]
fn a_wavefront_keeps_the_targets_distribution_down_a_column() {
    // On a 2×1 grid the second row's only position waits for the first (any lag): resampled
    // as a wavefront, both tokens must follow AR's joint. A lower row that settled against a
    // guess of the row above, or sampled before it was settled, would follow the proposals.
    const N: u64 = 10_000;
    tch::set_num_threads(1);
    let mut v = two_token_verifier(GridSize { rows: 2, cols: 1 });
    let ar = pair_counts(&mut v, N, false, 0);
    let column = |resampler, window| IslandPlan {
        window,
        wavefront: 1,
        ..plan(resampler, &[&[0, 1]])
    };
    let cases = [
        (column(Resampler::Sequential, 1), 1_000_000),
        (column(Resampler::Jacobi, 0), 2_000_000),
        (column(Resampler::Jacobi, 1), 3_000_000),
    ];
    for (plan, offset) in &cases {
        let got = island_counts(&mut v, N, plan, *offset);
        let p = homogeneity_p(&ar, &got);
        eprintln!("{plan:?} vs AR over {N} draws each: chi-square p = {p}");
        assert!(p > 0.001, "{plan:?} differs from AR: p = {p}");
    }
}

fn local() -> Local {
    Local::new(Arc::new(
        TorchWorker::spawn_rounds("torch", || Ok::<_, mulo_engine::EngineError>(engine())).unwrap(),
    ))
}

async fn run(roles: &Local, method: &str, seed: u64) -> mulo_engine::Outcome {
    let req = GenerateRequest {
        id: format!("{method}-{seed}"),
        condition: Condition::Class(2),
        sampling: sampling(2.0),
        seed,
        method: Method::parse(method).unwrap(),
    };
    let mut events = Vec::new();
    let out = generate(Some(roles), roles, &req, &mut |e| events.push(e.clone()))
        .await
        .unwrap();
    assert_eq!(out.tokens.len(), 16, "{method}");
    assert!(out.tokens.iter().all(|&t| (0..V).contains(&t)));
    assert_eq!(events.last().unwrap().committed, 16, "{method}");
    out
}

#[tokio::test]
async fn every_method_runs_through_the_roles() {
    let roles = local();
    let ar = run(&roles, "ar", 3).await;
    assert_eq!(ar.stats.target_passes, 16);
    assert_eq!(ar.tokens, run(&roles, "ar", 3).await.tokens, "seeded");
    // τ = 0 accepts every proposal: one verify per block, nothing resampled.
    let all = run(&roles, "mulo:tau=0,block_rows=1", 3).await;
    assert_eq!((all.stats.accepted, all.stats.resampled), (16, 0));
    assert_eq!(all.stats.cycles, 2);
    assert_eq!(all.stats.target_passes, 1 + 2);
    // A pool larger than the codebook is the whole codebook: pooled mass 1 (to float error),
    // so even τ = 0.99 accepts everything.
    let whole = run(&roles, "mulo:tau=0.99,pool_k=1000,block_rows=1", 3).await;
    assert_eq!((whole.stats.accepted, whole.stats.resampled), (16, 0));
    // τ = 1 rejects (almost) everything; radius 3 covers each block: islands are whole blocks.
    let none = run(&roles, "mulo:tau=1,radius=3,block_rows=1", 3).await;
    assert!(none.stats.resampled >= 8, "{:?}", none.stats);
    assert!(none.stats.largest_island <= 8);
    for m in [
        "mulo:tau=0.3,radius=1,block_rows=1",
        "mulo:tau=0.3,radius=0,block_rows=2",
        "mulo:tau=0.3,rejection=raster,block_rows=1",
        "mulo:tau=0.3,zipar_window=1,block_rows=1",
        "mulo:tau=0.3,zipar_window=1,block_rows=1,pipeline=0",
        "mulo:tau=0.3,radius=0,block_rows=1,pipeline=0",
        "mulo:tau=0.6,radius=2,block_rows=1,resample=sequential",
        "mulo:tau=0.6,radius=2,block_rows=1,resample=jacobi",
        "mulo:tau=0.6,rejection=raster,block_rows=2,resample=jacobi",
        "sd:gamma=3",
        "lantern:gamma=3,k=4,delta=0.5",
    ] {
        let a = run(&roles, m, 9).await;
        assert_eq!(a.tokens, run(&roles, m, 9).await.tokens, "{m} is seeded");
        // MuLo: one prefill, one verify per cycle, and at most one pass per resampled token
        // (passes per cycle = largest island; raster rejection of a whole block makes it the
        // block). SD / LANTERN: never more than AR's 16 passes plus the prefill.
        let most = if m.starts_with("mulo") {
            1 + a.stats.cycles + a.stats.resampled
        } else {
            17
        };
        assert!(
            a.stats.target_passes >= 2 && a.stats.target_passes <= most,
            "{m}: {:?}",
            a.stats
        );
        assert!(a.stats.accepted <= a.stats.proposed, "{m}");
    }
    // Sessions are released after each request.
    let live = roles
        .worker()
        .run(|e: &mut Engine| {
            e.verifier.as_ref().unwrap().sessions() + e.drafter.as_ref().unwrap().sessions()
        })
        .unwrap();
    assert_eq!(live, 0);
}

#[tokio::test]
async fn mulo_falls_back_to_ar_without_a_drafter() {
    let roles = local();
    let req = GenerateRequest {
        id: "f".into(),
        condition: Condition::Class(0),
        sampling: sampling(1.0),
        seed: 1,
        method: Method::parse("mulo").unwrap(),
    };
    let out = generate(None, &roles, &req, &mut |_| {}).await.unwrap();
    assert_eq!(out.tokens.len(), 16);
    assert_eq!(out.stats.fallback.as_deref(), Some("no drafter"));
    assert_eq!(out.stats.target_passes, 16);
}

/// The target's NLL of a grid equals minus the mean of `mulo score`'s token log-probabilities;
/// the pooled NLL is never above it, equals it with pools of one code and is zero with pools of
/// the whole codebook.
#[test]
fn target_nll_and_its_pooled_form() {
    let mut e = engine();
    let v = e.verifier.as_mut().unwrap();
    let tokens: Vec<i64> = (0..16).map(|i| (i * 7 + 3) % V).collect();
    let cond = Condition::Class(2);
    for cfg in [1.0, 3.0] {
        let params = sampling(cfg);
        let grid =
            mulo_core::TokenGrid::new(GridSize::square(4), tokens.clone(), V as usize).unwrap();
        let scores = mulo_engine::score_tokens(v.target(), &cond, &grid, &params).unwrap();
        let want = -scores
            .token_logprobs
            .iter()
            .map(|&x| f64::from(x))
            .sum::<f64>()
            / 16.0;
        let one = v.score_target(&cond, &tokens, &params, 1).unwrap();
        assert!((one.nll - want).abs() < 1e-9, "{one:?} vs {want}");
        assert!((one.pooled_nll - one.nll).abs() < 1e-5, "{one:?}");
        let four = v.score_target(&cond, &tokens, &params, 4).unwrap();
        assert_eq!(four.nll, one.nll);
        assert!(four.pooled_nll < one.nll - 1e-3, "{four:?}");
        let all = v.score_target(&cond, &tokens, &params, V as usize).unwrap();
        assert!(all.pooled_nll.abs() < 1e-5, "{all:?}");
    }
    assert!(v
        .score_target(&cond, &tokens[..15], &sampling(1.0), 4)
        .is_err());
}

#[test]
fn warm_up_builds_the_default_nearest_code_tables_and_kv_rows() {
    let mut e = engine();
    assert_eq!(e.verifier.as_ref().unwrap().pool_tables(), 0);
    e.set_batching(mulo_engine::Batching {
        limits: mulo_engine::BatchLimits {
            max_sessions: 5,
            max_tokens: 4096,
        },
        ..mulo_engine::Batching::default()
    });
    e.warm_up().unwrap();
    // One table, every pool size a view of it.
    assert_eq!(e.verifier.as_ref().unwrap().pool_tables(), 1);
    // KV rows for a full batch of sessions with CFG, before any request.
    assert_eq!(e.verifier.as_ref().unwrap().kv_rows(), 10);
    assert_eq!(e.drafter.as_ref().unwrap().kv_rows(), 10);
}

#[test]
fn every_pool_size_uses_the_one_nearest_code_table() {
    let mut e = engine();
    e.warm_up().unwrap();
    let v = e.verifier.as_mut().unwrap();
    let pinned = v.pool_tables();
    let (cond, tokens, params) = (
        mulo_core::Condition::Class(1),
        vec![0i64; 16],
        sampling(1.0),
    );
    for k in 1..=10 {
        v.score_target(&cond, &tokens, &params, k).unwrap();
        assert_eq!(v.pool_tables(), pinned);
    }
    let max = mulo_core::limits::MAX_POOL_K;
    let e = v
        .score_target(&cond, &tokens, &params, max + 1)
        .unwrap_err();
    assert!(e.to_string().contains(&format!("at most {max}")), "{e}");
}
