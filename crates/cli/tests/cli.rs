//! End-to-end tests of the `mulo` binary: LlamaGen checkpoint conversion, numerics against an
//! independent float64 reference, greedy CFG tokens, determinism and error messages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use common::ok;

const REF_SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/reference/llamagen_ref.py"
);

fn python() -> PathBuf {
    match option_env!("MULO_TORCH_PYTHON") {
        Some(p) if Path::new(p).exists() => PathBuf::from(p),
        _ => PathBuf::from("python3"),
    }
}

/// Fails with exit code != 0 and exactly one line on stderr; returns that line.
fn fails(args: &[&str]) -> String {
    common::fails_one_line(args)
}

fn make_reference(dir: &Path, kind: &str, extra: &[&str]) {
    let o = Command::new(python())
        .arg(REF_SCRIPT)
        .arg(dir)
        .arg(kind)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "reference script failed (needs numpy; run scripts/setup-torch.sh): {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Converts the reference checkpoint and checks processed probabilities (relative error) and greedy
/// CFG tokens against the float64 reference.
fn check_llamagen(kind: &str) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_reference(d, kind, &[]);
    let model = d.join("model");
    let out = ok(&[
        "convert",
        "llamagen",
        "--kind",
        kind,
        "--checkpoint",
        s(&d.join("ck.pt")),
        "--out",
        s(&model),
        "--n-head",
        "4",
        "--grid",
        "4",
    ]);
    assert!(out.contains(&format!("converted a {kind} GPT")), "{out}");
    let reference = read_json(&d.join("ref.json"));
    let cond: Vec<String> = if kind == "c2i" {
        vec!["--class".into(), "2".into()]
    } else {
        vec![
            "--caption-features".into(),
            s(&d.join("features.npy")).into(),
            "--caption-mask".into(),
            s(&d.join("mask.npy")).into(),
        ]
    };
    let cond: Vec<&str> = cond.iter().map(String::as_str).collect();
    let scores = d.join("scores.json");
    let tokens_in = d.join("tokens.json");
    let mut args = vec![
        "score",
        "--model",
        s(&model),
        "--tokens",
        s(&tokens_in),
        "--out",
        s(&scores),
        "--cfg",
        "3",
        "--top-k",
        "0",
        "--top-p",
        "1",
        "--temperature",
        "1",
    ];
    args.extend(&cond);
    ok(&args);
    let got = read_json(&scores);
    let lp = got["logprobs"].as_array().unwrap();
    let want = reference["probs"].as_array().unwrap();
    assert_eq!(lp.len(), 16);
    assert_eq!(lp[0].as_array().unwrap().len(), 64);
    let mut worst = 0.0f64;
    for (row_got, row_want) in lp.iter().zip(want) {
        for (g, w) in row_got
            .as_array()
            .unwrap()
            .iter()
            .zip(row_want.as_array().unwrap())
        {
            let (g, w) = (g.as_f64().unwrap().exp(), w.as_f64().unwrap());
            worst = worst.max((g - w).abs() / w);
        }
    }
    assert!(
        worst <= 1e-4,
        "{kind}: max relative error of processed probabilities {worst}"
    );

    let tokens = d.join("greedy.json");
    let mut args = vec![
        "generate",
        "--model",
        s(&model),
        "--cfg",
        "3",
        "--top-k",
        "1",
        "--tokens-out",
        s(&tokens),
        "--no-progress",
    ];
    args.extend(&cond);
    let line = ok(&args);
    assert!(line.contains("tokens/s"), "{line}");
    assert_eq!(
        read_json(&tokens),
        reference["greedy_tokens"],
        "{kind}: greedy CFG tokens"
    );
}

#[test]
fn llamagen_c2i_converts_and_matches_the_reference() {
    check_llamagen("c2i");
}

#[test]
fn llamagen_t2i_converts_and_matches_the_reference() {
    check_llamagen("t2i");
}

#[test]
fn mis_shaped_checkpoint_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_reference(d, "c2i", &["--corrupt", "layers.1.feed_forward.w2.weight"]);
    let out = d.join("model");
    let line = fails(&[
        "convert",
        "llamagen",
        "--kind",
        "c2i",
        "--checkpoint",
        s(&d.join("ck.pt")),
        "--out",
        s(&out),
        "--n-head",
        "4",
        "--grid",
        "4",
    ]);
    assert!(
        line.contains("layers.1.feed_forward.w2.weight")
            && line.contains("[32, 255]")
            && line.contains("[32, 256]"),
        "{line}"
    );
    assert!(
        !out.join("config.json").exists(),
        "a failed conversion leaves nothing behind"
    );
    let line = fails(&[
        "convert",
        "llamagen",
        "--kind",
        "c2i",
        "--checkpoint",
        s(&d.join("ck.pt")),
        "--out",
        s(&out),
        "--grid",
        "4",
    ]);
    assert!(line.contains("--preset or --n-head"), "{line}");
}

#[test]
fn generate_decode_info_and_determinism() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&["init", "vq", "--out", s(&d.join("vq"))]);
    ok(&[
        "init",
        "gpt",
        "--out",
        s(&d.join("gpt")),
        "--vq",
        "../vq",
        "--init-std",
        "0.2",
    ]);
    let info = ok(&["info", s(&d.join("gpt"))]);
    assert!(info.contains("grid        8x8"), "{info}");
    let gen = |seed: &str, name: &str| {
        ok(&[
            "generate",
            "--model",
            s(&d.join("gpt")),
            "--class",
            "1",
            "--seed",
            seed,
            "--out",
            s(&d.join(format!("{name}.png"))),
            "--tokens-out",
            s(&d.join(format!("{name}.json"))),
            "--no-progress",
        ])
    };
    gen("5", "a");
    gen("5", "b");
    gen("6", "c");
    let a = read_json(&d.join("a.json"));
    assert_eq!(a.as_array().unwrap().len(), 64);
    assert_eq!(a, read_json(&d.join("b.json")), "same seed, same tokens");
    assert_ne!(
        a,
        read_json(&d.join("c.json")),
        "another seed, other tokens"
    );
    ok(&[
        "decode",
        "--vq",
        s(&d.join("vq")),
        "--tokens",
        s(&d.join("a.json")),
        "--out",
        s(&d.join("d.png")),
    ]);
    assert_eq!(
        std::fs::read(d.join("a.png")).unwrap(),
        std::fs::read(d.join("d.png")).unwrap(),
        "decode gives the PNG generate wrote"
    );
    let png = std::fs::read(d.join("a.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let line = ok(&[
        "encode",
        "--vq",
        s(&d.join("vq")),
        "--image",
        s(&d.join("a.png")),
        "--tokens-out",
        s(&d.join("e.json")),
    ]);
    assert!(line.contains("8x8 grid"), "{line}");
    assert_eq!(read_json(&d.join("e.json")).as_array().unwrap().len(), 64);
}

#[test]
fn bad_input_gets_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&["init", "gpt", "--out", s(&d.join("gpt"))]);
    let g = s(&d.join("gpt")).to_string();
    assert!(fails(&[
        "generate",
        "--model",
        &g,
        "--class",
        "99",
        "--tokens-out",
        "x.json"
    ])
    .contains("class 99"));
    assert!(fails(&["generate", "--model", &g, "--class", "1", "--top-p", "0"]).contains("top_p"));
    assert!(fails(&[
        "generate",
        "--model",
        &g,
        "--class",
        "1",
        "--temperature",
        "-1"
    ])
    .contains("temperature"));
    assert!(fails(&["generate", "--model", &g]).contains("no condition"));
    assert!(fails(&["generate", "--model", &g, "--class", "1"]).contains("--vq"));
    assert!(
        fails(&["generate", "--model", &g, "--class", "1", "--device", "tpu"])
            .contains("cpu, cuda or cuda:N")
    );
    assert!(
        fails(&["generate", "--model", s(&d.join("nope")), "--class", "1"]).contains("config.json")
    );
    assert!(fails(&["generate", "--bogus"]).contains("--bogus"));
    assert!(fails(&["train", "drafter", "--image-size", "24"]).contains("16, 32 or 64"));
    assert!(fails(&[
        "generate",
        "--model",
        &g,
        "--class",
        "1",
        "--method",
        "mulo:resample=fast"
    ])
    .contains("jacobi or sequential"));
    assert!(fails(&[
        "generate",
        "--model",
        &g,
        "red apple",
        "--tokens-out",
        "x.json"
    ])
    .contains("class-conditional"));
    let bad = d.join("bad.json");
    std::fs::write(&bad, "[1, 2, 3]").unwrap();
    let line = fails(&[
        "score",
        "--model",
        &g,
        "--class",
        "1",
        "--tokens",
        s(&bad),
        "--out",
        "s.json",
    ]);
    assert!(line.contains("expected 64 tokens"), "{line}");
    std::fs::write(&bad, "not json").unwrap();
    assert!(fails(&[
        "score",
        "--model",
        &g,
        "--class",
        "1",
        "--tokens",
        s(&bad),
        "--out",
        "s.json"
    ])
    .contains("JSON array"));
    assert!(fails(&["decode", "--vq", &g, "--tokens", s(&bad), "--out", "x.png"]).contains("JSON"));
    assert!(fails(&["info", s(&d.join("nope"))]).contains("nope"));
}

/// `mulo score` tokenizes a text prompt with the model's `tokenizer.json`, as `generate` does
/// (it used to fail with "this model has no caption tokenizer"), and the prompt is what it
/// conditions on: another prompt scores the same tokens differently.
#[test]
fn score_tokenizes_a_text_prompt_like_generate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let target = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/emoji/target");
    let tokens = d.join("apple.json");
    ok(&[
        "generate",
        "--model",
        target,
        "red apple",
        "--seed",
        "3",
        "--out",
        s(&d.join("apple.png")),
        "--tokens-out",
        s(&tokens),
        "--no-progress",
    ]);
    let score = |prompt: &str, name: &str| {
        let out = d.join(name);
        ok(&[
            "score",
            "--model",
            target,
            prompt,
            "--tokens",
            s(&tokens),
            "--out",
            s(&out),
        ]);
        read_json(&out)["token_logprobs"].clone()
    };
    let same = score("red apple", "same.json");
    let lp: Vec<Option<f64>> = same.as_array().unwrap().iter().map(Value::as_f64).collect();
    assert_eq!(lp.len(), 256);
    assert!(
        lp.iter()
            .all(|v| v.is_some_and(|x| x.is_finite() && x <= 0.0)),
        "tokens sampled under this prompt have finite log-probabilities under it: {lp:?}"
    );
    let other = score("rocket", "other.json");
    assert_ne!(same, other, "the prompt must change the scores");
}
