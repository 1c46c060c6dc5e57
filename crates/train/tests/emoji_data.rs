//! The emoji data set builder on small synthetic npm tarballs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mulo_train::data::emoji::{self, Meta};

use mulo_model::{DType, VqConfig, VqModel};
use mulo_train::data::synthetic::{png, tarball};

/// A data set of the google package only (one training emoji, one held-out with a variation).
fn google_data(d: &std::path::Path) -> std::path::PathBuf {
    let google = tarball(
        d,
        "google",
        &[
            ("1f600.png", png([200, 100, 0, 255], 64)),
            ("1f44b.png", png([10, 20, 30, 255], 64)),
            ("1f44b-1f3ff.png", png([90, 60, 30, 255], 64)),
        ],
    );
    let data = d.join("data");
    emoji::build(&[("google".into(), google)], &data).unwrap();
    data
}

/// A VQ of 16 codes x 4 at 4x down-sampling, as small as the architecture allows.
fn tiny_vq_config() -> VqConfig {
    VqConfig {
        name: None,
        codebook_size: 16,
        codebook_embed_dim: 4,
        codebook_l2_norm: true,
        ch: 32,
        encoder_ch_mult: vec![1, 1, 1],
        decoder_ch_mult: vec![1, 1, 1],
        z_channels: 32,
        num_res_blocks: 1,
        dtype: DType::Fp32,
    }
}

/// Writes a random [`tiny_vq_config`] VQ to `dir`.
fn save_random_vq(dir: &std::path::Path) {
    VqModel::random(tiny_vq_config(), tch::Device::Cpu, DType::Fp32, 0)
        .unwrap()
        .save(dir, DType::Fp32)
        .unwrap();
}

#[test]
fn builds_images_captions_labels_and_split() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let google = tarball(
        d,
        "google",
        &[
            ("1f600.png", png([200, 100, 0, 255], 64)),
            ("1f44b.png", png([10, 20, 30, 255], 64)),
            ("1f44b-1f3ff.png", png([90, 60, 30, 255], 64)),
            ("1f3fb.png", png([1, 1, 1, 255], 64)),
        ],
    );
    let twitter = tarball(d, "twitter", &[("1f600.png", png([0, 0, 255, 128], 64))]);
    let out = d.join("data");
    let s = emoji::build(
        &[("google".into(), google), ("twitter".into(), twitter)],
        &out,
    )
    .unwrap();
    assert_eq!(s.train + s.heldout, 4, "Component skipped, no twitter wave");
    let meta = Meta::load(&out).unwrap();
    assert_eq!(meta.categories, vec!["People & Body", "Smileys & Emotion"]);
    let captions: Vec<&str> = meta.items.iter().map(|i| i.caption.as_str()).collect();
    assert!(captions.contains(&"grinning face smiling"), "{captions:?}");
    assert!(
        captions.contains(&"waving hand sign wave fingers open dark skin tone"),
        "{captions:?}"
    );
    for it in &meta.items {
        assert_eq!(it.split, emoji::split_of(&it.base));
        assert_eq!(meta.subcategories[it.subcategory_id], it.subcategory);
    }

    let tensors = std::fs::read(out.join("emoji.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&tensors).unwrap();
    let t64 = st.tensor("images64").unwrap();
    assert_eq!(t64.shape(), &[4, 64, 64, 3]);
    assert_eq!(st.tensor("images32").unwrap().shape(), &[4, 32, 32, 3]);
    assert_eq!(st.tensor("images16").unwrap().shape(), &[4, 16, 16, 3]);
    let px =
        |img: usize, x: usize| &t64.data()[(img * 64 * 64 + x) * 3..(img * 64 * 64 + x) * 3 + 3];
    let g = meta
        .items
        .iter()
        .find(|i| i.vendor == "google" && i.unified == "1F600")
        .unwrap();
    assert_eq!(px(g.index, 0), &[200, 100, 0], "opaque pixels kept");
    assert_eq!(
        px(g.index, 63),
        &[255, 255, 255],
        "transparent pixels become white"
    );
    let t = meta.items.iter().find(|i| i.vendor == "twitter").unwrap();
    // alpha 128 over white: 255 * (128/255) + 255 * (127/255) for blue, 127.0 for the others.
    assert_eq!(px(t.index, 0), &[127, 127, 255]);
    // 16 px: the 4x4 block straddling nothing keeps the colour; area average otherwise.
    let t16 = st.tensor("images16").unwrap();
    assert_eq!(
        &t16.data()[g.index * 16 * 16 * 3..g.index * 16 * 16 * 3 + 3],
        &[200, 100, 0]
    );

    // Training rows grouped by base emoji: a skin tone joins its base, vendors share a group.
    let data = mulo_train::trainers::EmojiTensors::load(&out).unwrap();
    let mut bases: Vec<&str> = meta
        .items
        .iter()
        .filter(|i| i.split == emoji::Split::Train)
        .map(|i| i.base.as_str())
        .collect();
    bases.sort_unstable();
    bases.dedup();
    if bases.is_empty() {
        assert!(data.train_groups().is_err());
    } else {
        let groups = data.train_groups().unwrap();
        assert_eq!(groups.len(), bases.len());
        for g in &groups {
            let b = &meta.items[g[0] as usize].base;
            assert!(g.iter().all(|&r| &meta.items[r as usize].base == b));
        }
        assert_eq!(
            groups.iter().map(Vec::len).sum::<usize>(),
            data.train_rows().unwrap().len()
        );
    }
}

#[test]
fn corrupt_or_missing_inputs_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = tarball(d, "twitter", &[("1f600.png", png([0, 0, 0, 255], 64))]);
    let bad = tarball(
        d,
        "google",
        &[
            ("1f600.png", b"not a png".to_vec()),
            ("1f44b.png", png([0, 0, 0, 255], 64)),
            ("1f44b-1f3ff.png", png([0, 0, 0, 255], 64)),
        ],
    );
    let e = emoji::build(
        &[("google".into(), bad), ("twitter".into(), good.clone())],
        &d.join("o"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("img/google/64/1f600.png") && e.contains("PNG"),
        "{e}"
    );

    let missing = tarball(d, "google", &[("1f600.png", png([0, 0, 0, 255], 64))]);
    let e = emoji::build(
        &[("google".into(), missing), ("twitter".into(), good)],
        &d.join("o"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("1f44b.png") && e.contains("missing"), "{e}");

    let small = tarball(
        d,
        "google",
        &[
            ("1f600.png", png([0, 0, 0, 255], 32)),
            ("1f44b.png", png([0, 0, 0, 255], 64)),
            ("1f44b-1f3ff.png", png([0, 0, 0, 255], 64)),
        ],
    );
    let e = emoji::build(&[("google".into(), small)], &d.join("o"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("32x32, expected 64x64"), "{e}");

    let e = emoji::build(&[("google".into(), d.join("nope.tgz"))], &d.join("o"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.tgz"), "{e}");
}

#[test]
fn downsample_is_an_area_average() {
    // 2x2 image, one channel pattern repeated over RGB.
    let img: Vec<u8> = [0u8, 10, 20, 31].iter().flat_map(|&v| [v, v, v]).collect();
    assert_eq!(emoji::downsample(&img, 2, 2), vec![15, 15, 15]); // 61 / 4 = 15.25
    assert_eq!(emoji::downsample(&img, 2, 1), img);
}

#[test]
fn vq_training_runs_checkpoints_resumes_and_reports() {
    use mulo_train::trainers::vq::{train_vq, VqTrainOptions};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let google = tarball(
        d,
        "google",
        &[
            ("1f600.png", png([200, 100, 0, 255], 64)),
            ("1f44b.png", png([10, 20, 30, 255], 64)),
            ("1f44b-1f3ff.png", png([90, 60, 30, 255], 64)),
        ],
    );
    let twitter = tarball(d, "twitter", &[("1f600.png", png([0, 0, 255, 128], 64))]);
    let data = d.join("data");
    emoji::build(
        &[("google".into(), google), ("twitter".into(), twitter)],
        &data,
    )
    .unwrap();
    let mut opts = VqTrainOptions {
        data,
        out: d.join("vq"),
        work: d.join("work"),
        steps: 4,
        low_res_share: 0.5,
        batch: 2,
        lr: 1e-3,
        seed: 1,
        resume: false,
        config: tiny_vq_config(),
        dtype: DType::Fp16,
    };
    // 1F600 hashes to train and 1F44B to held-out: both splits are present.
    let meta = Meta::load(&opts.data).unwrap();
    assert!(meta.items.iter().any(|i| i.split == emoji::Split::Train));
    assert!(meta.items.iter().any(|i| i.split == emoji::Split::Heldout));
    let mut seen = Vec::new();
    let report = train_vq(&opts, tch::Device::Cpu, &mut |s, _, l| seen.push((s, l))).unwrap();
    assert_eq!(
        seen.iter().map(|x| x.0).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert!(report.final_loss.is_finite() && report.psnr64.is_finite());
    assert!(report.codebook_usage > 0.0 && report.codebook_usage <= 1.0);
    let (vq, _) = VqModel::load(&opts.out, tch::Device::Cpu, None).unwrap();
    assert_eq!(vq.config().dtype, DType::Fp16);
    let log = std::fs::read_to_string(opts.work.join("loss.jsonl")).unwrap();
    assert!(log.contains("\"event\":\"eval\""));

    opts.resume = true;
    opts.steps = 6;
    let mut steps = Vec::new();
    train_vq(&opts, tch::Device::Cpu, &mut |s, _, _| steps.push(s)).unwrap();
    assert_eq!(steps, vec![5, 6], "resumes after the checkpointed 4 steps");
    let log2 = std::fs::read_to_string(opts.work.join("loss.jsonl")).unwrap();
    assert!(log2.starts_with(&log), "the log is appended on resume");
}

/// Options of a tiny GPT run on `data` (32 px, one layer) writing `d/<name>` with work dir
/// `d/work-<name>`.
fn tiny_gpt_options(
    d: &std::path::Path,
    data: &std::path::Path,
    name: &str,
) -> mulo_train::trainers::gpt::GptTrainOptions {
    mulo_train::trainers::gpt::GptTrainOptions {
        data: data.to_path_buf(),
        vq: d.join("vq"),
        out: d.join(name),
        work: d.join(format!("work-{name}")),
        image_size: 32,
        dim: 32,
        n_layer: 1,
        n_head: 2,
        caption_len: 6,
        caption_dim: 8,
        steps: 3,
        extend_from: Vec::new(),
        batch: 2,
        lr: 1e-3,
        weight_decay: 0.0,
        cond_drop: 0.5,
        name_share: 0.5,
        unk_drop: 0.1,
        dropout: 0.1,
        balance: mulo_train::trainers::Balance::Category,
        label_smoothing: 0.1,
        ema: Some(0.9),
        accum: 2,
        mirror: 0.5,
        token_noise: 0.2,
        stop: mulo_train::trainers::Stop::default(),
        keep_condition_rope: true,
        seed: 0,
        resume: false,
        dtype: DType::Fp16,
        compute: DType::Bf16,
        vq_link: Some("../vq".into()),
    }
}

#[test]
fn gpt_training_writes_a_prompt_model_that_generates() {
    use mulo_engine::prompt::{load_tokenizer, tokenize_prompt};
    use mulo_model::Gpt;
    use mulo_train::trainers::gpt::train_gpt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = google_data(d);
    save_random_vq(&d.join("vq"));
    let opts = tiny_gpt_options(d, &data, "target");
    let mut steps = Vec::new();
    let report = train_gpt(&opts, tch::Device::Cpu, &mut |s, _, _| steps.push(s)).unwrap();
    assert_eq!(steps, vec![1, 2, 3]);
    assert!(report.final_loss.is_finite() && report.heldout_nll.is_finite());
    // Loss starts near ln(16) for a fresh model over 16 codes.
    assert!(report.final_loss < 4.0, "{report:?}");
    // The last step's log record carries the held-out probe.
    let log = std::fs::read_to_string(opts.work.join("loss.jsonl")).unwrap();
    let last: serde_json::Value = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .rfind(|r| r["step"] == 3)
        .unwrap();
    assert!(
        last["heldout_nll_name_probe"].as_f64().unwrap().is_finite(),
        "{last}"
    );
    let tok = load_tokenizer(&opts.out)
        .unwrap()
        .expect("tokenizer.json written");
    assert!(
        tok.vocab.contains(&"grinning".to_string()),
        "{:?}",
        tok.vocab
    );
    let (gpt, unused) = Gpt::load(&opts.out, tch::Device::Cpu, None).unwrap();
    assert!(unused.is_empty());
    assert_eq!(gpt.config().grid.len(), 64, "32 px with a 4x VQ is 8x8");
    let (cond, unknown, _) = tokenize_prompt(
        &tok,
        mulo_core::Condition::Prompt("grinning purple face".into()),
    );
    assert_eq!(unknown, vec!["purple"]);
    let params = mulo_core::SamplingParams::default();
    let g = mulo_engine::generate_ar(&gpt, &cond, &params, 1, &mut |_, _| {}).unwrap();
    assert_eq!(g.tokens.len(), 64);
    assert!(g.tokens.iter().all(|&t| (0..16).contains(&t)));
}

#[test]
fn evaluator_training_reports_accuracies_and_reloads() {
    use mulo_model::evaluator::Evaluator;
    use mulo_train::trainers::evaluator::{train_evaluator, EvaluatorTrainOptions};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = google_data(d);
    let opts = EvaluatorTrainOptions {
        data,
        out: d.join("ev"),
        work: d.join("work"),
        steps: 3,
        batch: 4,
        lr: 1e-3,
        low_res_share: 0.5,
        channels: vec![8, 16],
        max_shift: 2,
        label_smoothing: 0.1,
        seed: 0,
        resume: false,
        dtype: DType::Fp16,
    };
    let r = train_evaluator(&opts, tch::Device::Cpu, &mut |_, _, _| {}).unwrap();
    for acc in [
        r.category_accuracy,
        r.subcategory_accuracy,
        r.category_accuracy_32,
    ] {
        assert!((0.0..=1.0).contains(&acc), "{r:?}");
    }
    assert_eq!(r.heldout_images, 2, "the two waving hands are held out");
    let ev = Evaluator::load(&opts.out, tch::Device::Cpu).unwrap();
    assert_eq!(
        ev.config().category_names,
        vec!["People & Body", "Smileys & Emotion"]
    );
    let out = ev.forward(&tch::Tensor::zeros(
        [2, 3, 32, 32],
        (tch::Kind::Float, tch::Device::Cpu),
    ));
    assert_eq!(out.features.size(), vec![2, 16]);
    assert_eq!(out.category.size(), vec![2, 2]);
}

#[test]
fn upsampler_training_reports_and_reloads() {
    use mulo_model::Upsampler;
    use mulo_train::trainers::upsampler::{train_upsampler, UpsamplerTrainOptions};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = google_data(d);
    save_random_vq(&d.join("vq"));
    let opts = UpsamplerTrainOptions {
        data,
        low_grid: None,
        scale: 2,
        vq: d.join("vq"),
        out: d.join("up"),
        work: d.join("work"),
        channels: 16,
        low_blocks: 1,
        high_blocks: 1,
        steps: 3,
        batch: 2,
        lr: 1e-3,
        weight_decay: 0.0,
        seed: 0,
        resume: false,
        dtype: DType::Fp16,
        vq_link: Some("../vq".into()),
    };
    let mut steps = Vec::new();
    let r = train_upsampler(&opts, tch::Device::Cpu, &mut |s, _, _| steps.push(s)).unwrap();
    assert_eq!(steps, vec![1, 2, 3]);
    for f in [
        r.heldout_token_accuracy,
        r.repeat_token_accuracy,
        r.roundtrip_agreement,
        r.downsample_agreement,
    ] {
        assert!((0.0..=1.0).contains(&f), "{r:?}");
    }
    assert!(r.heldout_nll.is_finite() && r.heldout_nll > 0.0);
    let up = Upsampler::load(&opts.out, tch::Device::Cpu).unwrap();
    assert_eq!(up.config().vq.as_deref(), Some("../vq"));
    // The frozen codebook is the VQ's (normalised) codes, stored with the up-sampler.
    let (vq, _) = VqModel::load(&d.join("vq"), tch::Device::Cpu, Some(DType::Fp32)).unwrap();
    let low = tch::Tensor::from_slice(&[3i64, 1, 4, 1]).view([1, 2, 2]);
    assert_eq!(up.upsample(&low).unwrap().size(), vec![1, 4, 4]);
    let named = up.var_store().variables();
    let stored = &named["codebook"];
    assert!(f64::try_from((stored - vq.codes()).abs().max()).unwrap() < 1e-2);
    // The images were tokenised once: resuming reads the cached token pairs.
    let f = vq.config().downsample_factor();
    assert!(
        r.tokenised && r.scale == 2 && r.low_grid == 64 / f / 2,
        "{r:?}"
    );
    let more = UpsamplerTrainOptions {
        steps: 4,
        resume: true,
        ..opts.clone()
    };
    let r = train_upsampler(&more, tch::Device::Cpu, &mut |_, _, _| {}).unwrap();
    assert!(!r.tokenised, "{r:?}");
    // Scale 4 on a grid given explicitly: tokenised again, a x4 model.
    let x4 = UpsamplerTrainOptions {
        scale: 4,
        low_grid: Some(64 / f / 4),
        out: d.join("up4"),
        work: d.join("work4"),
        ..opts.clone()
    };
    let r = train_upsampler(&x4, tch::Device::Cpu, &mut |_, _, _| {}).unwrap();
    assert!(
        r.tokenised && r.scale == 4 && r.low_grid == 64 / f / 4,
        "{r:?}"
    );
    let up = Upsampler::load(&x4.out, tch::Device::Cpu).unwrap();
    assert_eq!(up.config().scale, 4);
    let low = tch::Tensor::from_slice(&[3i64, 1, 4, 1]).view([1, 2, 2]);
    assert_eq!(up.upsample(&low).unwrap().size(), vec![1, 8, 8]);
    // A grid whose images the data set cannot give is one clear error.
    let bad = UpsamplerTrainOptions {
        low_grid: Some(64 / f),
        work: d.join("work-bad"),
        ..opts.clone()
    };
    let e = train_upsampler(&bad, tch::Device::Cpu, &mut |_, _, _| {}).unwrap_err();
    assert!(e.to_string().contains("px images"), "{e}");
}

#[test]
fn eval_prompts_name_heldout_and_training_emoji() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = google_data(d);
    let meta = Meta::load(&data).unwrap();
    let rows = emoji::eval_prompts(&meta).unwrap();
    let mut prompts: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    prompts.sort_unstable();
    // One per base emoji, skin tones left out, by name.
    assert_eq!(prompts, vec!["grinning face", "waving hand sign"]);
    let wave = rows.iter().find(|r| r.0 == "waving hand sign").unwrap();
    assert_eq!(
        (wave.1.as_str(), wave.2.as_str()),
        ("People & Body", "hand-fingers-open")
    );
}

/// A GPT run paused by its budget and resumed ends with exactly the weights of the run straight
/// through: the checkpoint keeps Adam's moments and the weight average (EMA), and batches depend
/// only on the step. Resuming from a checkpoint without the optimizer state (the old format)
/// restarts Adam and ends elsewhere.
#[test]
fn gpt_training_paused_and_resumed_equals_straight_through() {
    use mulo_model::Gpt;
    use mulo_train::trainers::gpt::{train_gpt, GptTrainOptions};
    use mulo_train::trainers::{Balance, Stop};
    use mulo_train::TrainError;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = google_data(d);
    save_random_vq(&d.join("vq"));
    // Deterministic: no dropout, fp32 throughout; EMA on, six steps.
    let opts = |name: &str| GptTrainOptions {
        steps: 6,
        lr: 3e-3,
        weight_decay: 0.01,
        dropout: 0.0,
        balance: Balance::Base,
        label_smoothing: 0.0,
        ema: Some(0.5),
        accum: 1,
        mirror: 0.5,
        token_noise: 0.2,
        keep_condition_rope: false,
        seed: 4,
        dtype: DType::Fp32,
        compute: DType::Fp32,
        ..tiny_gpt_options(d, &data, name)
    };
    let weights = |name: &str| {
        let (g, _) = Gpt::load(&d.join(name), tch::Device::Cpu, None).unwrap();
        let mut v: Vec<(String, Vec<f32>)> = g
            .var_store()
            .variables()
            .into_iter()
            .map(|(n, t)| (n, Vec::<f32>::try_from(t.reshape([-1])).unwrap()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let none = &mut |_: usize, _: usize, _: f64| {};
    train_gpt(&opts("straight"), tch::Device::Cpu, none).unwrap();

    let mut paused = opts("paused");
    paused.stop.at_step = Some(3);
    match train_gpt(&paused, tch::Device::Cpu, none) {
        Err(TrainError::Paused { step: 3, total: 6 }) => {}
        other => panic!("expected a pause at step 3, got {other:?}"),
    }
    assert!(!paused.out.join("model.safetensors").exists());
    // One checkpoint on disk, named by its step; a budget at or before it is refused.
    assert!(paused.work.join("checkpoint-3.safetensors").exists());
    assert!(paused.work.join("optimizer-3.safetensors").exists());
    let mut again = paused.clone();
    again.resume = true;
    match train_gpt(&again, tch::Device::Cpu, none) {
        Err(TrainError::Train(m)) => assert!(m.contains("--stop-at 3"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    paused.stop = Stop::default();
    paused.resume = true;
    let mut steps = Vec::new();
    let report = train_gpt(&paused, tch::Device::Cpu, &mut |s, _, _| steps.push(s)).unwrap();
    assert_eq!(steps, vec![4, 5, 6]);
    // The report counts both pieces and carries the held-out curve (a probe at the last step).
    assert_eq!(report.pieces, 2);
    assert!(report.training_seconds_total > report.seconds);
    assert_eq!(report.heldout_nll_curve.last().map(|p| p.0), Some(6));
    assert_eq!(weights("straight"), weights("paused"));

    // A checkpoint of the earlier format (files without the step in their names) resumes alike.
    let mut legacy = opts("legacy");
    legacy.stop.at_step = Some(3);
    assert!(train_gpt(&legacy, tch::Device::Cpu, none).is_err());
    for (from, to) in [
        ("checkpoint-3.safetensors", "checkpoint.safetensors"),
        ("optimizer-3.safetensors", "optimizer.safetensors"),
    ] {
        std::fs::rename(legacy.work.join(from), legacy.work.join(to)).unwrap();
    }
    legacy.stop = Stop::default();
    legacy.resume = true;
    train_gpt(&legacy, tch::Device::Cpu, none).unwrap();
    assert_eq!(weights("straight"), weights("legacy"));

    // The same pause, then the optimizer state removed: Adam restarts, the weights differ.
    let mut old = opts("old");
    old.stop.at_step = Some(3);
    assert!(train_gpt(&old, tch::Device::Cpu, none).is_err());
    std::fs::remove_file(old.work.join("optimizer-3.safetensors")).unwrap();
    old.stop = Stop::default();
    old.resume = true;
    train_gpt(&old, tch::Device::Cpu, none).unwrap();
    assert_ne!(weights("straight"), weights("old"));

    // A finished 3-step run extended to 6 with `resume` (the learning rate jumps to the 6-step
    // schedule's at step 3) equals one run of 6 steps extended from 3, and differs from the
    // straight 6-step schedule.
    let mut short = opts("extended");
    short.steps = 3;
    train_gpt(&short, tch::Device::Cpu, none).unwrap();
    short.steps = 6;
    short.resume = true;
    let report = train_gpt(&short, tch::Device::Cpu, none).unwrap();
    assert_eq!(
        report.pieces, 2,
        "a finished run extended is a second piece"
    );
    let mut planned = opts("planned");
    planned.extend_from = vec![3];
    train_gpt(&planned, tch::Device::Cpu, none).unwrap();
    assert_eq!(weights("extended"), weights("planned"));
    assert_ne!(weights("straight"), weights("planned"));
    for bad in [vec![6], vec![0], vec![4, 2]] {
        let mut o = opts("bad");
        o.extend_from = bad;
        match train_gpt(&o, tch::Device::Cpu, none) {
            Err(TrainError::Train(m)) => assert!(m.contains("--extend-from"), "{m}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}
