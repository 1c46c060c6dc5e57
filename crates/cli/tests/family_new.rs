//! `mulo family new` and `mulo info FAMILY` on tiny random members: a family whose pieces fit is
//! written with relative member paths and described; each kind of misfit (codebook, grids against
//! the scale, condition, caption width against the text encoder, missing tokenizer) is one line
//! naming it, and leaves no family.json behind. The text encoder comes from the T5 reference
//! script (test venv, scripts/setup-test-venv.sh).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fails_one_line, ok};

const T5_REF: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/t5_ref.py");

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn test_python() -> PathBuf {
    let p = std::env::var("MULO_TEST_PYTHON")
        .ok()
        .or(option_env!("MULO_TEST_PYTHON").map(str::to_string))
        .expect("MULO_TEST_PYTHON unset: run scripts/setup-test-venv.sh");
    PathBuf::from(p)
}

/// A caption GPT: `grid`, vocabulary `vocab`, caption rows [8, `cap`].
fn gpt(dir: &Path, grid: &str, vocab: &str, cap: &str) {
    ok(&[
        "init",
        "gpt",
        "--out",
        s(dir),
        "--condition",
        "caption",
        "--grid",
        grid,
        "--vocab",
        vocab,
        "--caption-dim",
        cap,
        "--caption-len",
        "8",
        "--dim",
        "32",
        "--n-layer",
        "1",
    ]);
}

/// A T5 text encoder of width 32 with 8 caption rows.
fn text_encoder(root: &Path, out: &Path) {
    std::fs::create_dir_all(root).unwrap();
    let p = root.join("prompts.json");
    std::fs::write(&p, r#"["a red apple"]"#).unwrap();
    let o = Command::new(test_python())
        .arg(T5_REF)
        .arg(root)
        .arg(&p)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    ok(&[
        "convert",
        "t5",
        "--checkpoint",
        s(&root.join("hf")),
        "--out",
        s(out),
        "--max-len",
        "8",
    ]);
}

#[test]
fn family_new_checks_that_the_members_fit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m = |n: &str| d.join("models").join(n);
    ok(&["init", "vq", "--out", s(&m("vq")), "--codebook-size", "64"]);
    ok(&[
        "init",
        "upsampler",
        "--out",
        s(&m("up")),
        "--vq",
        s(&m("vq")),
    ]);
    gpt(&m("target"), "8", "64", "32");
    gpt(&m("drafter"), "4", "64", "32");
    text_encoder(&d.join("t5src"), &m("t5"));
    let new = |fam: &Path, drafter: &Path, t5: &Path| -> Vec<String> {
        [
            "family",
            "new",
            "--out",
            s(fam),
            "--target",
            s(&m("target")),
            "--drafter",
            s(drafter),
            "--vq",
            s(&m("vq")),
            "--upsampler",
            s(&m("up")),
            "--text-encoder",
            s(t5),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };

    let fam = d.join("fam");
    let out = ok(&new(&fam, &m("drafter"), &m("t5")));
    assert!(
        out.contains("the members fit") && out.contains("T5 text encoder"),
        "{out}"
    );
    let file = std::fs::read_to_string(fam.join("family.json")).unwrap();
    assert!(
        file.contains("\"../models/t5\"") && !file.contains("evaluator"),
        "{file}"
    );
    let info = ok(&["info", s(&fam)]);
    assert!(
        info.contains("family 'fam' (x2") && info.contains("no evaluator"),
        "{info}"
    );

    let bad = d.join("bad");
    let check = |drafter: &Path, t5: &Path, want: &str| {
        let e = fails_one_line(&new(&bad, drafter, t5));
        assert!(e.contains(want), "expected '{want}' in: {e}");
        assert!(!bad.join("family.json").exists(), "{e}");
    };
    gpt(&m("drafter-v128"), "4", "128", "32");
    check(
        &m("drafter-v128"),
        &m("t5"),
        "codebook mismatch: the drafter has 128 token ids but the VQ has 64 codes",
    );
    gpt(&m("drafter-g3"), "3", "64", "32");
    check(&m("drafter-g3"), &m("t5"), "grids not related by the scale");
    gpt(&m("drafter-c16"), "4", "64", "16");
    check(&m("drafter-c16"), &m("t5"), "condition mismatch");
    gpt(&m("target16"), "8", "64", "16");
    let e = fails_one_line(&[
        "family",
        "new",
        "--out",
        s(&bad),
        "--target",
        s(&m("target16")),
        "--drafter",
        s(&m("drafter-c16")),
        "--vq",
        s(&m("vq")),
        "--upsampler",
        s(&m("up")),
        "--text-encoder",
        s(&m("t5")),
    ]);
    assert!(
        e.contains("caption shape mismatch: the text encoder gives [8, 32]"),
        "{e}"
    );
    std::fs::remove_file(m("t5").join("tokenizer.json")).unwrap();
    check(&m("drafter"), &m("t5"), "has no tokenizer.json");
    check(&m("drafter"), &m("nothing"), "holds no model");
}
