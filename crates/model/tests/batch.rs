//! Batched forwards across sessions: several sessions' prefills, prefixes and steps (AR steps,
//! verify blocks, island passes with explicit masks, refreshes; CFG on and off; caption masks
//! per row) in one forward over a shared cache equal each session's own forward.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::config;
use mulo_core::Condition;
use mulo_model::config::PositionEmbedding;
use mulo_model::gpt::Conditioning;
use mulo_model::{BatchInput, DType, Gpt, KvCache};
use proptest::prelude::*;
use tch::{Device, Kind, Tensor};

const GRID: usize = 20;

/// A small deterministic generator for the per-session choices (proptest draws the seeds).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

/// What a session runs after its prefix.
#[derive(Debug, Clone)]
enum Step {
    Ar,
    Block(usize),
    Island {
        positions: Vec<usize>,
        mask: Vec<bool>,
    },
    Refresh(usize),
}

#[derive(Debug, Clone)]
struct Session {
    cfg: bool,
    condition: Condition,
    tokens: Vec<i64>,
    prefix: usize,
    step: Step,
}

fn session(caption: bool, seed: u64) -> Session {
    let mut r = Lcg(seed);
    let condition = if caption {
        let hidden = r.next(3);
        Condition::CaptionFeatures {
            features: (0..6 * 24)
                .map(|_| r.next(200) as f32 / 100.0 - 1.0)
                .collect(),
            len: 6,
            dim: 24,
            mask: Some((0..6).map(|i| i >= hidden).collect()),
        }
    } else {
        Condition::Class(r.next(7) as u32)
    };
    let tokens = (0..GRID).map(|_| r.next(97) as i64).collect();
    let prefix = 1 + r.next(GRID - 5);
    let step = match r.next(4) {
        0 => Step::Ar,
        1 => Step::Block(1 + r.next(4)),
        2 => {
            let lo = prefix / 2;
            let mut positions: Vec<usize> = (0..1 + r.next(3))
                .map(|_| lo + r.next(prefix + 3 - lo))
                .collect();
            positions.sort_unstable();
            positions.dedup();
            let n = positions.len() * (prefix + 4 + 6);
            Step::Island {
                positions,
                mask: (0..n).map(|_| r.next(3) > 0).collect(),
            }
        }
        _ => Step::Refresh(r.next(prefix)),
    };
    Session {
        cfg: r.next(2) == 0,
        condition,
        tokens,
        prefix,
        step,
    }
}

impl Session {
    /// Absolute positions and explicit mask of the step.
    fn step_inputs(&self, cls: i64) -> (Vec<i64>, Option<Tensor>) {
        let abs = |g: &[usize]| g.iter().map(|&p| cls + p as i64).collect::<Vec<_>>();
        match &self.step {
            Step::Ar => (abs(&[self.prefix]), None),
            Step::Block(m) => (
                abs(&(self.prefix..self.prefix + m).collect::<Vec<_>>()),
                None,
            ),
            Step::Refresh(f) => (abs(&(*f..=self.prefix).collect::<Vec<_>>()), None),
            Step::Island { positions, mask } => {
                let p = abs(positions);
                let w = *p.iter().max().unwrap() + 1;
                let m: Vec<bool> = mask[..p.len() * w as usize].to_vec();
                (
                    p.clone(),
                    Some(Tensor::from_slice(&m).view([p.len() as i64, w])),
                )
            }
        }
    }

    fn input(
        &self,
        m: &Gpt,
        positions: &[i64],
        rows: Vec<i64>,
        mask: Option<Tensor>,
    ) -> BatchInput {
        let cls = m.config().cls_token_num;
        let toks: Vec<i64> = positions
            .iter()
            .map(|&p| self.tokens[(p - cls) as usize])
            .collect();
        BatchInput {
            x: m.embed_tokens(&toks, rows.len() as i64).unwrap(),
            rows,
            positions: positions.to_vec(),
            mask,
        }
    }

    fn prefix_positions(&self, cls: i64) -> Vec<i64> {
        (0..self.prefix as i64).map(|p| cls + p).collect()
    }
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    f64::try_from((a - b).abs().max()).unwrap()
}

/// `[prefill logits, step logits]` of one session run alone in its own cache.
fn alone(m: &Gpt, s: &Session) -> (Tensor, Tensor) {
    let cls = m.config().cls_token_num;
    let c = m.condition(&s.condition, s.cfg).unwrap();
    let mut cache = m.new_cache(c.batch(), cls + GRID as i64).unwrap();
    let first = m.prefill(&c, &mut cache).unwrap();
    let rows: Vec<i64> = (0..c.batch()).collect();
    let pre = s.input(m, &s.prefix_positions(cls), rows.clone(), None);
    let _ = m.forward(&pre.x, &pre.positions, None, &mut cache).unwrap();
    let (pos, mask) = s.step_inputs(cls);
    let step = s.input(m, &pos, rows, mask);
    let h = m
        .forward(&step.x, &step.positions, step.mask.as_ref(), &mut cache)
        .unwrap();
    (first, m.head(&h))
}

/// The same for every session at once in one shared cache: one batched prefill, one batched
/// prefix feed, one batched step. Sessions get the cache rows `rows` (a permutation).
fn together(
    m: &Gpt,
    sessions: &[Session],
    rows: &[i64],
    cache: &mut KvCache,
) -> Vec<(Tensor, Tensor)> {
    let cls = m.config().cls_token_num;
    let conds: Vec<Conditioning> = sessions
        .iter()
        .map(|s| m.condition(&s.condition, s.cfg).unwrap())
        .collect();
    let mut own = Vec::new();
    let mut next = 0;
    for c in &conds {
        own.push(rows[next..next + c.batch() as usize].to_vec());
        next += c.batch() as usize;
    }
    let prefill: Vec<BatchInput> = conds
        .iter()
        .zip(&own)
        .map(|(c, r)| m.condition_input(c, r.clone(), cache).unwrap())
        .collect();
    let firsts = m.forward_batch(&prefill, cache).unwrap();
    let pre: Vec<BatchInput> = sessions
        .iter()
        .zip(&own)
        .map(|(s, r)| s.input(m, &s.prefix_positions(cls), r.clone(), None))
        .collect();
    m.forward_batch(&pre, cache).unwrap();
    let steps: Vec<BatchInput> = sessions
        .iter()
        .zip(&own)
        .map(|(s, r)| {
            let (pos, mask) = s.step_inputs(cls);
            s.input(m, &pos, r.clone(), mask)
        })
        .collect();
    let hs = m.forward_batch(&steps, cache).unwrap();
    firsts
        .iter()
        .zip(hs)
        .map(|(f, h)| (m.head(&f.select(1, cls - 1)), m.head(&h)))
        .collect()
}

fn model(caption: bool, kind: usize) -> Gpt {
    let (kv, pos) = [
        (None, PositionEmbedding::Rope2d),
        (Some(2), PositionEmbedding::Rope2d),
        (None, PositionEmbedding::Learned),
    ][kind];
    Gpt::random(config(caption, kv, pos), Device::Cpu, DType::Fp32, 5, 0.2).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn a_mixed_batch_equals_each_session_alone(
        caption in any::<bool>(),
        kind in 0usize..3,
        seeds in prop::collection::vec(any::<u64>(), 1..5),
        order in any::<u64>(),
        shuffle in any::<bool>(),
    ) {
        let m = model(caption, kind);
        let sessions: Vec<Session> = seeds.iter().map(|&s| session(caption, s)).collect();
        let need: usize = sessions.iter().map(|s| 1 + usize::from(s.cfg)).sum();
        // A pool with two spare rows, handed out in order (sessions of equal input length on
        // adjacent rows attend together) or shuffled (rows gathered).
        let total = need as i64 + 2;
        let mut rows: Vec<i64> = (0..total).collect();
        let mut r = Lcg(order);
        for i in (1..rows.len()).rev().filter(|_| shuffle) {
            rows.swap(i, r.next(i + 1));
        }
        let cls = m.config().cls_token_num;
        let mut cache = m.new_cache(total, cls + GRID as i64).unwrap();
        tch::no_grad(|| {
            let got = together(&m, &sessions, &rows, &mut cache);
            for (s, (first, step)) in sessions.iter().zip(got) {
                let (want_first, want_step) = alone(&m, s);
                prop_assert!(max_abs(&first, &want_first) < 1e-4, "prefill of {s:?}");
                prop_assert!(max_abs(&step, &want_step) < 1e-4, "step of {s:?}: {}", max_abs(&step, &want_step));
                // Greedy tokens are identical.
                prop_assert!(step.argmax(-1, false).equal(&want_step.argmax(-1, false)));
            }
            Ok(())
        })?;
    }
}

#[test]
fn forwards_of_other_rows_leave_a_session_as_it_was() {
    let m = model(true, 0);
    let cls = m.config().cls_token_num;
    let mut cache = m.new_cache(4, cls + GRID as i64).unwrap();
    let a = Session {
        cfg: true,
        step: Step::Block(3),
        ..session(true, 9)
    };
    let b = Session {
        cfg: true,
        ..session(true, 10)
    };
    tch::no_grad(|| {
        // A fills rows 3 and 1 up to its step; B then runs everything in rows 0 and 2.
        let ca = m.condition(&a.condition, true).unwrap();
        let first = m.condition_input(&ca, vec![3, 1], &mut cache).unwrap();
        m.forward_batch(&[first], &mut cache).unwrap();
        let pre = a.input(&m, &a.prefix_positions(cls), vec![3, 1], None);
        m.forward_batch(&[pre], &mut cache).unwrap();
        together(&m, std::slice::from_ref(&b), &[0, 2], &mut cache);
        let (pos, mask) = a.step_inputs(cls);
        let h = m
            .forward_batch(&[a.input(&m, &pos, vec![3, 1], mask)], &mut cache)
            .unwrap();
        let (_, want) = alone(&m, &a);
        assert!(max_abs(&m.head(&h[0]), &want) < 1e-4);
    });
}

#[test]
fn bad_batches_are_errors() {
    let m = model(false, 0);
    let cls = m.config().cls_token_num;
    let mut cache = m.new_cache(3, cls + GRID as i64).unwrap();
    let x = |n: i64, s: i64| Tensor::zeros([n, s, 64], (Kind::Float, Device::Cpu));
    let g = |rows: Vec<i64>, positions: Vec<i64>| BatchInput {
        x: x(rows.len() as i64, positions.len() as i64),
        rows,
        positions,
        mask: None,
    };
    let err = |groups: Vec<BatchInput>, cache: &mut KvCache| {
        m.forward_batch(&groups, cache).unwrap_err().to_string()
    };
    assert!(err(vec![g(vec![0], vec![1]), g(vec![0], vec![2])], &mut cache).contains("two groups"));
    assert!(err(vec![g(vec![1], vec![2, 2])], &mut cache).contains("twice"));
    assert!(err(vec![g(vec![3], vec![1])], &mut cache).contains("outside the cache's 3 rows"));
    assert!(err(vec![], &mut cache).contains("no input"));
    let wrong = BatchInput {
        x: x(2, 1),
        rows: vec![0],
        positions: vec![1],
        mask: None,
    };
    assert!(err(vec![wrong], &mut cache).contains("expected [1, 1, 64]"));
}
