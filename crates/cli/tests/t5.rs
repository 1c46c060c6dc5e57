//! T5 text encoder parity: a tiny random T5 built with `transformers` (from a config, nothing
//! downloaded) and saved in Hugging Face's layout is converted with `mulo convert t5`; `mulo
//! embed-text` must give the features of `transformers`' `T5EncoderModel` (with LlamaGen's left
//! padding) for prompts of different lengths, through the project's tokenizer path (a tokenizer.json
//! the reference script builds). Needs the test venv (scripts/setup-test-venv.sh).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fails_one_line, ok};

const REF_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/t5_ref.py");

fn test_python() -> PathBuf {
    let p = std::env::var("MULO_TEST_PYTHON")
        .ok()
        .or(option_env!("MULO_TEST_PYTHON").map(str::to_string))
        .expect(
            "MULO_TEST_PYTHON unset: run scripts/setup-torch.sh and scripts/setup-test-venv.sh",
        );
    assert!(
        Path::new(&p).exists(),
        "{p} missing: run scripts/setup-test-venv.sh"
    );
    PathBuf::from(p)
}

fn prompts() -> Vec<String> {
    vec![
        "a red apple".into(),
        "  A   Dog FACE ".into(),
        "an astronaut riding a horse in the forest near a river with water lilies".into(),
        // Longer than 120 tokens: truncated to 119 and the end-of-sequence token.
        "the flag of japan waving in the wind near a blue porsche parked in front of a yellow \
         brick wall "
            .repeat(4),
    ]
}

fn reference(dir: &Path, extra: &[&str]) {
    let p = dir.join("prompts.json");
    std::fs::write(&p, serde_json::to_string(&prompts()).unwrap()).unwrap();
    let o = Command::new(test_python())
        .arg(REF_SCRIPT)
        .arg(dir)
        .arg(&p)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "reference script failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn npy(p: &Path) -> (Vec<u64>, Vec<f32>) {
    let bytes = std::fs::read(p).unwrap();
    let f = npyz::NpyFile::new(&bytes[..]).unwrap();
    let shape = f.shape().to_vec();
    (shape, f.into_vec::<f32>().unwrap())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Converts the reference checkpoint and compares features and masks prompt by prompt.
fn check_parity(extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    reference(d, extra);
    let enc = d.join("enc");
    let out = ok(&[
        "convert",
        "t5",
        "--checkpoint",
        s(&d.join("hf")),
        "--out",
        s(&enc),
    ]);
    assert!(out.contains("converted a T5 encoder"), "{out}");
    let (f, m) = (d.join("f.npy"), d.join("m.npy"));
    let mut args = vec![
        "embed-text",
        "--encoder",
        s(&enc),
        "--out",
        s(&f),
        "--mask-out",
        s(&m),
    ];
    let ps = prompts();
    args.extend(ps.iter().map(String::as_str));
    ok(&args);
    let ((shape, ours), (rshape, theirs)) = (npy(&f), npy(&d.join("ref.npy")));
    assert_eq!(shape, rshape);
    assert_eq!(shape[..2], [4, 120]);
    assert_eq!(npy(&m), npy(&d.join("mask.npy")), "masks differ");
    let valid: Vec<usize> = npy(&m)
        .1
        .chunks(120)
        .map(|r| r.iter().filter(|&&v| v > 0.0).count())
        .collect();
    assert_eq!(valid[3], 120, "the long prompt fills every row: {valid:?}");
    assert!(valid[0] < valid[2] && valid[2] < 120, "{valid:?}");
    let per = ours.len() / 4;
    for i in 0..4 {
        let (a, r) = (
            &ours[i * per..(i + 1) * per],
            &theirs[i * per..(i + 1) * per],
        );
        let scale = r.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = a.iter().zip(r).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(scale > 0.1, "prompt {i}: reference is all zero");
        assert!(
            err / scale <= 1e-4,
            "prompt {i}: max |ours - transformers| = {err} against max |transformers| = {scale}"
        );
    }
}

#[test]
fn flan_t5_features_match_transformers_for_sharded_checkpoints() {
    check_parity(&["--shards", "3"]);
}

#[test]
fn original_t5_relu_features_match_transformers() {
    check_parity(&["--relu"]);
}

#[test]
fn bad_t5_checkpoints_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    reference(d, &[]);
    let hf = d.join("hf");
    let out = |n: &str| d.join(n).to_str().unwrap().to_string();
    let convert = |o: &str| fails_one_line(&["convert", "t5", "--checkpoint", s(&hf), "--out", o]);

    std::fs::rename(hf.join("model.safetensors"), d.join("w")).unwrap();
    std::fs::write(hf.join("pytorch_model.bin"), b"x").unwrap();
    let e = convert(&out("a"));
    assert!(
        e.contains("pytorch_model") && e.contains("save_pretrained"),
        "{e}"
    );
    std::fs::remove_file(hf.join("pytorch_model.bin")).unwrap();
    let e = convert(&out("b"));
    assert!(e.contains("no model.safetensors"), "{e}");
    std::fs::rename(d.join("w"), hf.join("model.safetensors")).unwrap();

    let cfg = std::fs::read_to_string(hf.join("config.json")).unwrap();
    std::fs::write(hf.join("config.json"), cfg.replace("\"t5\"", "\"bert\"")).unwrap();
    let e = convert(&out("c"));
    assert!(e.contains("model_type is 'bert'"), "{e}");
    std::fs::write(
        hf.join("config.json"),
        cfg.replace("\"d_model\": 32", "\"d_model\": 40"),
    )
    .unwrap();
    let e = convert(&out("d"));
    assert!(
        e.contains("do not fit config.json") && e.contains("has shape"),
        "{e}"
    );
    assert!(
        !d.join("d").exists(),
        "a failed conversion leaves nothing behind"
    );
    std::fs::write(hf.join("config.json"), &cfg).unwrap();

    std::fs::remove_file(hf.join("tokenizer.json")).unwrap();
    let e = convert(&out("e"));
    assert!(e.contains("no tokenizer.json"), "{e}");
}
