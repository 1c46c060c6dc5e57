//! GPT tests on tiny random configs (CPU, fp32): cached decoding vs one full forward, masked
//! forwards at arbitrary positions, the RoPE table, capacity errors and checkpoint errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::config;
use mulo_core::{Condition, GridSize, SamplingParams};
use mulo_model::config::PositionEmbedding;
use mulo_model::rope::RopeTable;
use mulo_model::{DType, Gpt, ModelError};
use tch::{Device, Kind, Tensor};

fn condition(caption: bool) -> Condition {
    if caption {
        let mut features = Vec::new();
        for i in 0..6 * 24 {
            features.push(((i * 37 % 101) as f32 / 50.0) - 1.0);
        }
        Condition::CaptionFeatures {
            features,
            len: 6,
            dim: 24,
            // Left-padded: the first two caption rows are padding.
            mask: Some(vec![false, false, true, true, true, true]),
        }
    } else {
        Condition::Class(3)
    }
}

fn tokens(n: usize) -> Vec<i64> {
    (0..n).map(|i| ((i * 31 + 7) % 97) as i64).collect()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    f64::try_from((a - b).abs().max()).unwrap()
}

/// Logits `[B, N, V]` predicting every image token from one full forward without a cache.
fn full_logits(m: &Gpt, cond: &Condition, cfg: bool, toks: &[i64]) -> Tensor {
    tch::no_grad(|| {
        let c = m.condition(cond, cfg).unwrap();
        let b = c.batch();
        let x = Tensor::cat(
            &[
                c.embeddings.shallow_clone(),
                m.embed_tokens(&toks[..toks.len() - 1], b).unwrap(),
            ],
            1,
        );
        let h = m.forward_full(&x, c.mask.as_ref()).unwrap();
        let cls = m.config().cls_token_num;
        m.head(&h.narrow(1, cls - 1, toks.len() as i64))
    })
}

/// The same logits from a prefill and one-token cached decode steps.
fn cached_logits(m: &Gpt, cond: &Condition, cfg: bool, toks: &[i64]) -> Tensor {
    tch::no_grad(|| {
        let c = m.condition(cond, cfg).unwrap();
        let b = c.batch();
        let cls = m.config().cls_token_num;
        let mut cache = m.new_cache(b, cls + toks.len() as i64).unwrap();
        let buffers = cache.buffer_addresses();
        let bytes = cache.bytes();
        let mut out = vec![m.prefill(&c, &mut cache).unwrap()];
        for (i, &t) in toks[..toks.len() - 1].iter().enumerate() {
            let x = m.embed_tokens(&[t], b).unwrap();
            let h = m.forward(&x, &[cls + i as i64], None, &mut cache).unwrap();
            out.push(m.head(&h.select(1, 0)));
            // Decode steps write into the preallocated buffers: no KV memory per step.
            assert_eq!(cache.buffer_addresses(), buffers);
            assert_eq!(cache.bytes(), bytes);
        }
        assert_eq!(cache.filled(), cls + toks.len() as i64 - 1);
        Tensor::stack(&out, 1)
    })
}

#[test]
fn cached_decoding_equals_full_forward() {
    for caption in [false, true] {
        for (kv, pos) in [
            (None, PositionEmbedding::Rope2d),
            (Some(2), PositionEmbedding::Rope2d),
            (None, PositionEmbedding::Learned),
            (Some(2), PositionEmbedding::Rope2dKeepCondition),
        ] {
            let m =
                Gpt::random(config(caption, kv, pos), Device::Cpu, DType::Fp32, 1, 0.2).unwrap();
            for cfg in [false, true] {
                let toks = tokens(20);
                let cond = condition(caption);
                let a = full_logits(&m, &cond, cfg, &toks);
                let b = cached_logits(&m, &cond, cfg, &toks);
                assert_eq!(a.size(), b.size());
                let d = max_abs(&a, &b);
                assert!(
                    d <= 1e-4,
                    "caption={caption} kv={kv:?} {pos:?} cfg={cfg}: diff {d}"
                );
                // The test can fail: a different token sequence changes the logits.
                let mut other = toks.clone();
                other[3] = (other[3] + 1) % 97;
                assert!(max_abs(&a, &cached_logits(&m, &cond, cfg, &other)) > 1e-3);
            }
        }
    }
}

#[test]
fn masked_forward_at_arbitrary_positions_equals_recomputation() {
    let m = Gpt::random(
        config(true, None, PositionEmbedding::Rope2d),
        Device::Cpu,
        DType::Fp32,
        2,
        0.2,
    )
    .unwrap();
    let cond = condition(true);
    let cls = m.config().cls_token_num;
    let toks = tokens(20);
    tch::no_grad(|| {
        let c = m.condition(&cond, true).unwrap();
        let mut cache = m.new_cache(2, cls + 20).unwrap();
        let _ = m.prefill(&c, &mut cache).unwrap();
        // Prefix 0..8 in order, then the block 8..19 in a scrambled order in one pass with an
        // explicit causal mask over absolute positions.
        let pos: Vec<i64> = (cls..cls + 8).collect();
        let _ = m
            .forward(
                &m.embed_tokens(&toks[..8], 2).unwrap(),
                &pos,
                None,
                &mut cache,
            )
            .unwrap();
        let order = [15usize, 8, 18, 11, 9, 17, 10, 13, 16, 12, 14];
        let block_toks: Vec<i64> = order.iter().map(|&i| toks[i]).collect();
        let block_pos: Vec<i64> = order.iter().map(|&i| cls + i as i64).collect();
        let w = cls + 19;
        let slots = Tensor::arange(w, (Kind::Int64, Device::Cpu)).unsqueeze(0);
        let mask = slots.le_tensor(&Tensor::from_slice(&block_pos).unsqueeze(1));
        let h = m
            .forward(
                &m.embed_tokens(&block_toks, 2).unwrap(),
                &block_pos,
                Some(&mask),
                &mut cache,
            )
            .unwrap();
        let got = m.head(&h);
        let want = full_logits(&m, &cond, true, &toks);
        for (j, &i) in order.iter().enumerate() {
            // Input at raster i predicts token i + 1.
            let d = max_abs(
                &got.narrow(1, j as i64, 1),
                &want.narrow(1, i as i64 + 1, 1),
            );
            assert!(d <= 1e-4, "raster {i}: {d}");
        }

        // Refresh: change tokens 10 and 12, re-feed positions 10.. and compare with a fresh
        // recomputation of the modified sequence.
        let mut changed = toks.clone();
        changed[10] = (changed[10] + 5) % 97;
        changed[12] = (changed[12] + 9) % 97;
        let pos: Vec<i64> = (cls + 10..cls + 19).collect();
        let h = m
            .forward(
                &m.embed_tokens(&changed[10..19], 2).unwrap(),
                &pos,
                None,
                &mut cache,
            )
            .unwrap();
        let got = m.head(&h);
        let want = full_logits(&m, &cond, true, &changed);
        let d = max_abs(&got, &want.narrow(1, 11, 9));
        assert!(d <= 1e-4, "refresh: {d}");
    });
}

#[test]
fn rope_matches_an_independent_table() {
    let grid = GridSize { rows: 3, cols: 5 };
    let (hd, cls, base) = (16i64, 2i64, 10000.0f64);
    let t = RopeTable::new(grid, hd, base, cls, true, Device::Cpu);
    assert_eq!(t.len(), cls + 15);
    let cos = Vec::<f32>::try_from(t.cos.reshape([-1])).unwrap();
    let sin = Vec::<f32>::try_from(t.sin.reshape([-1])).unwrap();
    let half = (hd / 2) as usize;
    for p in 0..(cls as usize + 15) {
        for k in 0..half {
            let (c, s) = (cos[p * half + k] as f64, sin[p * half + k] as f64);
            if p < cls as usize {
                assert_eq!((c, s), (0.0, 0.0), "condition rows are zero");
                continue;
            }
            let (a, b) = ((p - cls as usize) / 5, (p - cls as usize) % 5);
            // First hd/4 angles use the row, the next hd/4 the column; freq m = base^(-2m/(hd/2)).
            let (coord, m) = if k < half / 2 {
                (a, k)
            } else {
                (b, k - half / 2)
            };
            let angle = coord as f64 * base.powf(-(2.0 * m as f64) / half as f64);
            assert!(
                (c - angle.cos()).abs() < 1e-5 && (s - angle.sin()).abs() < 1e-5,
                "p={p} k={k}"
            );
        }
    }
    // The project's variant leaves the condition rows unrotated and the grid rows as they are.
    let keep = RopeTable::new(grid, hd, base, cls, false, Device::Cpu);
    let n = cls * half as i64;
    let kc = keep.cos.reshape([-1]);
    let ks = keep.sin.reshape([-1]);
    assert_eq!(f64::try_from(kc.narrow(0, 0, n).min()).unwrap(), 1.0);
    assert_eq!(f64::try_from(ks.narrow(0, 0, n).abs().max()).unwrap(), 0.0);
    let rest = kc.size()[0] - n;
    assert!(kc
        .narrow(0, n, rest)
        .equal(&t.cos.reshape([-1]).narrow(0, n, rest)));
    assert!(ks
        .narrow(0, n, rest)
        .equal(&t.sin.reshape([-1]).narrow(0, n, rest)));
    let q = mulo_model::seed::with_global_seed(2, || {
        Tensor::randn([1, 2, 1, hd], (Kind::Float, Device::Cpu))
    });
    let cond_pos = Tensor::from_slice(&[0i64, 1]);
    assert!(
        keep.apply(&q, &cond_pos).equal(&q),
        "condition queries kept"
    );
    assert_eq!(
        f64::try_from(t.apply(&q, &cond_pos).abs().max()).unwrap(),
        0.0
    );
    // Interleaved pairs: (x0, x1) of pair m rotate together.
    let x = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0]).view([1, 1, 1, 4]);
    let t2 = RopeTable::new(GridSize { rows: 2, cols: 2 }, 4, base, 1, true, Device::Cpu);
    let y = Vec::<f32>::try_from(t2.apply(&x, &Tensor::from_slice(&[4i64])).reshape([-1])).unwrap();
    // position 4 = cell (1, 1): angle 1 for both pairs.
    let (c, s) = (1f32.cos(), 1f32.sin());
    let want = [c, s, -s, c];
    for (g, w) in y.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{y:?}");
    }
}

#[test]
fn capacity_and_input_errors_are_clear() {
    let m = Gpt::random(
        config(false, None, PositionEmbedding::Rope2d),
        Device::Cpu,
        DType::Fp32,
        3,
        0.2,
    )
    .unwrap();
    let mut cache = m.new_cache(1, 4).unwrap();
    let x = m.embed_tokens(&[1], 1).unwrap();
    match m.forward(&x, &[4], None, &mut cache) {
        Err(ModelError::KvCapacity {
            position: 4,
            capacity: 4,
        }) => {}
        other => panic!("expected a capacity error, got {other:?}"),
    }
    assert!(m
        .embed_tokens(&[97], 1)
        .unwrap_err()
        .to_string()
        .contains("vocabulary"));
    let e = m
        .condition(&Condition::Class(7), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("class 7"), "{e}");
    let e = m
        .condition(&condition(true), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("class-conditional"), "{e}");
}

#[test]
fn same_seed_same_tokens() {
    use mulo_model::sampling::{process_probs, sample_from_probs, TokenRng};
    let m = Gpt::random(
        config(false, None, PositionEmbedding::Rope2d),
        Device::Cpu,
        DType::Fp32,
        4,
        0.2,
    )
    .unwrap();
    let params = SamplingParams {
        cfg_scale: 2.0,
        temperature: 1.0,
        top_k: 50,
        top_p: 0.95,
    };
    let draw = |seed: u64| -> Vec<i64> {
        tch::no_grad(|| {
            let c = m.condition(&Condition::Class(2), true).unwrap();
            let mut cache = m.new_cache(2, 21).unwrap();
            let mut rng = TokenRng::new(seed);
            let mut logits = m.prefill(&c, &mut cache).unwrap();
            let mut out = Vec::new();
            for i in 0..20 {
                let p = process_probs(&logits.unsqueeze(1), &params);
                let t = i64::try_from(sample_from_probs(&p, &[rng.next_uniform()]).get(0)).unwrap();
                out.push(t);
                // Torch's global generator must not matter.
                mulo_model::seed::with_global_seed(i, || ());
                let h = m
                    .forward(
                        &m.embed_tokens(&[t], 2).unwrap(),
                        &[1 + i],
                        None,
                        &mut cache,
                    )
                    .unwrap();
                logits = m.head(&h.select(1, 0));
            }
            out
        })
    };
    assert_eq!(draw(11), draw(11));
    assert_ne!(draw(11), draw(12));
}

#[test]
fn checkpoint_errors_name_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let m = Gpt::random(
        config(false, None, PositionEmbedding::Rope2d),
        Device::Cpu,
        DType::Fp32,
        5,
        0.2,
    )
    .unwrap();
    m.save(dir.path(), DType::Fp16).unwrap();
    let (back, unused) = Gpt::load(dir.path(), Device::Cpu, Some(DType::Fp32)).unwrap();
    assert!(unused.is_empty());
    assert_eq!(back.config().dim, 64);

    // Rewrite the weights with one tensor of the wrong shape, then with one missing.
    let path = dir.path().join("model.safetensors");
    let mut tensors = Tensor::read_safetensors(&path).unwrap();
    let i = tensors
        .iter()
        .position(|(n, _)| n == "layers.1.attention.wo.weight")
        .unwrap();
    tensors[i].1 = Tensor::zeros([64, 63], (Kind::Half, Device::Cpu));
    Tensor::write_safetensors(&tensors, &path).unwrap();
    let e = Gpt::load(dir.path(), Device::Cpu, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("layers.1.attention.wo.weight")
            && e.contains("[64, 63]")
            && e.contains("[64, 64]"),
        "{e}"
    );
    let _ = tensors.remove(i);
    Tensor::write_safetensors(&tensors, &path).unwrap();
    let e = Gpt::load(dir.path(), Device::Cpu, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("missing tensor 'layers.1.attention.wo.weight'"),
        "{e}"
    );
}

#[test]
fn training_conditions_and_per_sequence_masks_match_inference() {
    let mut cfg = config(true, None, PositionEmbedding::Rope2d);
    cfg.caption_vocab = Some(20);
    let m = Gpt::random(cfg, Device::Cpu, DType::Fp32, 9, 0.2).unwrap();
    let ids = [[0i64, 0, 3, 4, 5, 6], [0, 7, 8, 9, 10, 11]];
    let masks = [
        [false, false, true, true, true, true],
        [false, true, true, true, true, true],
    ];
    tch::no_grad(|| {
        let ids_t = Tensor::from_slice2(&ids);
        let drop = Tensor::from_slice(&[false, true]);
        let train = m.condition_train(&ids_t, &drop).unwrap();
        let cond = Condition::CaptionTokens {
            ids: ids[0].iter().map(|&i| i as u32).collect(),
            mask: masks[0].to_vec(),
        };
        let inf = m.condition(&cond, true).unwrap();
        assert!(
            max_abs(&train.get(0), &inf.embeddings.get(0)) < 1e-6,
            "conditional row"
        );
        assert!(
            max_abs(&train.get(1), &inf.embeddings.get(1)) < 1e-6,
            "dropped row = null caption"
        );

        // A batch with per-sequence caption masks equals each sequence alone.
        let toks = tokens(20);
        let x_tok = m.embed_tokens(&toks[..19], 2).unwrap();
        let x = Tensor::cat(&[train.shallow_clone(), x_tok], 1);
        let mask_t = Tensor::from_slice2(&masks);
        let batch = m.forward_full(&x, Some(&mask_t)).unwrap();
        for i in 0..2 {
            let one = m
                .forward_full(&x.narrow(0, i, 1), Some(&mask_t.get(i)))
                .unwrap();
            assert!(max_abs(&batch.narrow(0, i, 1), &one) < 1e-5, "sequence {i}");
        }
        // The masks matter: the second sequence differs when its first caption row is hidden.
        let all_visible = m.forward_full(&x, None).unwrap();
        assert!(max_abs(&all_visible.get(1), &batch.get(1)) > 1e-4);
    });
    let e = m
        .condition(
            &Condition::CaptionTokens {
                ids: vec![25; 6],
                mask: vec![true; 6],
            },
            false,
        )
        .unwrap_err();
    assert!(e.to_string().contains("word vocabulary"), "{e}");
}

#[test]
fn training_dropout_is_off_unless_set() {
    let cfg = config(false, None, PositionEmbedding::Rope2d);
    let mut m = Gpt::random(cfg, Device::Cpu, DType::Fp32, 1, 0.2).unwrap();
    let cond = condition(false);
    let toks = tokens(20);
    let reference = full_logits(&m, &cond, false, &toks);
    assert!(max_abs(&reference, &full_logits(&m, &cond, false, &toks)) < 1e-6);
    m.set_train_dropout(0.5);
    let dropped = full_logits(&m, &cond, false, &toks);
    assert!(
        max_abs(&reference, &dropped) > 1e-3,
        "dropout changes the forward"
    );
    m.set_train_dropout(0.0);
    assert!(max_abs(&reference, &full_logits(&m, &cond, false, &toks)) < 1e-6);
}

#[test]
fn bf16_compute_keeps_fp32_weights_and_close_logits() {
    for caption in [false, true] {
        let cfg = config(caption, Some(2), PositionEmbedding::Rope2d);
        let mut m = Gpt::random(cfg, Device::Cpu, DType::Fp32, 4, 0.2).unwrap();
        let cond = condition(caption);
        let toks = tokens(20);
        let reference = full_logits(&m, &cond, true, &toks);
        m.set_compute_kind(Some(Kind::BFloat16));
        let mixed = full_logits(&m, &cond, true, &toks);
        let cached = cached_logits(&m, &cond, true, &toks);
        assert_eq!(mixed.kind(), Kind::Float, "logits stay fp32");
        assert_eq!(m.kind(), Kind::Float, "weights stay fp32");
        let scale = f64::try_from(reference.abs().max()).unwrap();
        let err = max_abs(&reference, &mixed);
        assert!(err > 0.0, "bf16 matmuls change the numbers");
        assert!(err < 0.05 * scale, "bf16 error {err} vs scale {scale}");
        // Cached decoding (fp32 cache) in the compute kind stays as close to the full forward.
        assert!(max_abs(&mixed, &cached) < 0.05 * scale);
        // Gradients reach the fp32 weights through the casts.
        let c = m.condition(&cond, false).unwrap();
        let x = Tensor::cat(&[c.embeddings, m.embed_tokens(&toks, 1).unwrap()], 1);
        let loss = m
            .head(&m.forward_full(&x, c.mask.as_ref()).unwrap())
            .square()
            .mean(Kind::Float);
        loss.backward();
        let vars = m.var_store().trainable_variables();
        let with_grad = vars.iter().filter(|v| v.grad().defined()).count();
        assert!(
            with_grad > vars.len() / 2,
            "{with_grad} of {} have gradients",
            vars.len()
        );
        for v in &vars {
            let g = v.grad();
            if g.defined() {
                assert_eq!(g.kind(), Kind::Float);
            }
        }
        m.set_compute_kind(None);
        assert!(max_abs(&reference, &full_logits(&m, &cond, true, &toks)) < 1e-6);
    }
}

#[test]
fn kv_cache_bytes_is_what_a_session_allocates() {
    for (kv, dtype, elem) in [(None, DType::Fp32, 4), (Some(2), DType::Bf16, 2)] {
        let cfg = config(true, kv, PositionEmbedding::Rope2d);
        let m = Gpt::random(cfg.clone(), Device::Cpu, dtype, 3, 0.02).unwrap();
        let positions = cfg.cls_token_num + cfg.grid.len() as i64;
        for batch in [1, 2] {
            let cache = m.new_cache(batch, positions).unwrap();
            assert_eq!(cfg.kv_cache_bytes(batch, elem), cache.bytes());
        }
    }
}

#[test]
fn input_major_weights_change_neither_logits_nor_checkpoints() {
    let mut m = Gpt::random(
        config(true, None, PositionEmbedding::Rope2d),
        Device::Cpu,
        DType::Fp32,
        9,
        0.2,
    )
    .unwrap();
    let toks = tokens(20);
    let cond = condition(true);
    let before = cached_logits(&m, &cond, true, &toks);
    let dir = tempfile::tempdir().unwrap();
    m.save(&dir.path().join("a"), DType::Fp32).unwrap();
    m.use_input_major_weights();
    // Laid out input-major: the same `[out, in]` shape, no longer contiguous.
    let w = &m.var_store().variables()["layers.0.attention.wqkv.weight"];
    assert_eq!(w.size(), [3 * 64, 64]);
    assert!(!w.is_contiguous());
    let after = cached_logits(&m, &cond, true, &toks);
    assert!(
        max_abs(&before, &after) < 1e-4,
        "{}",
        max_abs(&before, &after)
    );
    // Saved input-major, the checkpoint is the same tensors as before.
    m.save(&dir.path().join("b"), DType::Fp32).unwrap();
    let (a, _) = Gpt::load(&dir.path().join("a"), Device::Cpu, None).unwrap();
    let (b, _) = Gpt::load(&dir.path().join("b"), Device::Cpu, None).unwrap();
    for (name, t) in a.var_store().variables() {
        assert!(t.equal(&b.var_store().variables()[&name]), "{name}");
    }
}
