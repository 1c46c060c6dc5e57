//! Bring your own LlamaGen models, end to end (docs/byom.md): tiny random LlamaGen-shaped t2i
//! "stage 1" (grid 8) and "stage 2" (grid 16) GPTs and a VQ saved as LlamaGen checkpoints by real
//! torch, a tiny T5 v1.1 built by `transformers`, and 200 generated images are converted, an
//! up-sampler is trained on the images for a few steps, the family is assembled, and MuLo-SD
//! generates from a text prompt embedded and through the gateway, with equal tokens. Needs the
//! test venv (scripts/setup-test-venv.sh).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{connect, free_port, metric, mulo_cli, scrape, start, Proc};

const T5_REF: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../crates/cli/tests/reference/t5_ref.py"
);
const TO_PT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/support/to_llamagen_pt.py"
);
const PROMPT: &str = "a red apple on a white table";

fn test_python() -> PathBuf {
    let p = std::env::var("MULO_TEST_PYTHON")
        .ok()
        .or(option_env!("MULO_TEST_PYTHON").map(str::to_string))
        .expect(
            "MULO_TEST_PYTHON unset: run scripts/setup-torch.sh and scripts/setup-test-venv.sh",
        );
    PathBuf::from(p)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn run(cmd: &mut Command) -> Output {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn mulo(args: &[&str]) -> String {
    String::from_utf8(run(Command::new(mulo_cli()).args(args)).stdout).unwrap()
}

/// The one-line error of a `mulo` command that must fail.
fn mulo_fails(args: &[&str]) -> String {
    let o = Command::new(mulo_cli()).args(args).output().unwrap();
    assert!(!o.status.success(), "{args:?} succeeded");
    let err = String::from_utf8(o.stderr).unwrap();
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    err
}

fn python(args: &[&str]) {
    run(Command::new(test_python()).args(args));
}

/// A random mulo model saved as a LlamaGen .pt, converted back with `mulo convert llamagen`.
fn llamagen_piece(d: &Path, name: &str, init: &[&str], convert: &[&str]) -> PathBuf {
    let raw = d.join(format!("{name}-init"));
    let mut a = vec!["init"];
    a.extend_from_slice(init);
    a.extend(["--out", s(&raw)]);
    mulo(&a);
    let pt = d.join(format!("{name}.pt"));
    python(&[TO_PT, s(&raw), s(&pt)]);
    let out = d.join(name);
    let mut c = vec![
        "convert",
        "llamagen",
        "--checkpoint",
        s(&pt),
        "--out",
        s(&out),
    ];
    c.extend_from_slice(convert);
    let said = mulo(&c);
    assert!(said.contains("converted"), "{said}");
    out
}

fn t2i(d: &Path, name: &str, grid: &str, seed: &str) -> PathBuf {
    let init = [
        "gpt",
        "--condition",
        "caption",
        "--caption-dim",
        "32",
        "--caption-len",
        "120",
        "--dim",
        "32",
        "--n-layer",
        "2",
        "--n-head",
        "4",
        "--vocab",
        "256",
        "--grid",
        grid,
        "--seed",
        seed,
        "--init-std",
        "0.2",
    ];
    let convert = [
        "--kind", "t2i", "--n-head", "4", "--grid", grid, "--vq", "../vq",
    ];
    llamagen_piece(d, name, &init, &convert)
}

/// 200 small generated images: coloured discs and bars on varied backgrounds.
fn images(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..200u32 {
        let (w, h) = (48 + i % 17, 40 + i % 23);
        let bg = image::Rgb([
            (i * 37 % 256) as u8,
            (i * 91 % 256) as u8,
            (i * 53 % 256) as u8,
        ]);
        let fg = image::Rgb([255 - bg[0], bg[2], 255 - bg[1]]);
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            let (cx, cy) = ((i * 7 % w) as i64, (i * 11 % h) as i64);
            let r = 8 + (i % 12) as i64;
            let (dx, dy) = (x as i64 - cx, y as i64 - cy);
            if dx * dx + dy * dy < r * r || (i % 3 == 0 && x % 12 < 3) {
                fg
            } else {
                bg
            }
        });
        img.save(dir.join(format!("img{i:03}.png"))).unwrap();
    }
}

/// Builds and converts every piece and assembles the family.
fn family(d: &Path) -> PathBuf {
    let prompts = d.join("prompts.json");
    std::fs::write(&prompts, format!("[\"{PROMPT}\"]")).unwrap();
    python(&[T5_REF, s(&d.join("t5ref")), s(&prompts)]);
    let t5 = d.join("t5");
    mulo(&[
        "convert",
        "t5",
        "--checkpoint",
        s(&d.join("t5ref/hf")),
        "--out",
        s(&t5),
    ]);
    let vq = llamagen_piece(
        d,
        "vq",
        &["vq", "--codebook-size", "256"],
        &["--kind", "vq"],
    );
    let stage1 = t2i(d, "stage1", "8", "1");
    let stage2 = t2i(d, "stage2", "16", "2");
    images(&d.join("photos"));
    let set = d.join("set");
    let said = mulo(&[
        "data",
        "images",
        "--dir",
        s(&d.join("photos")),
        "--size",
        "64",
        "--out",
        s(&set),
    ]);
    assert!(said.contains("200"), "{said}");
    let ups = d.join("upsampler");
    let said = mulo(&[
        "train",
        "upsampler",
        "--vq",
        s(&vq),
        "--data",
        s(&set),
        "--low-grid",
        "8",
        "--scale",
        "2",
        "--steps",
        "3",
        "--batch",
        "8",
        "--channels",
        "16",
        "--low-blocks",
        "1",
        "--high-blocks",
        "1",
        "--out",
        s(&ups),
        "--work",
        s(&d.join("work")),
        "--threads",
        "2",
    ]);
    assert!(said.contains("8x8 -> 16x16"), "{said}");
    let fam = d.join("family");
    mulo(&[
        "family",
        "new",
        "--out",
        s(&fam),
        "--target",
        s(&stage2),
        "--drafter",
        s(&stage1),
        "--vq",
        s(&vq),
        "--upsampler",
        s(&ups),
        "--text-encoder",
        s(&t5),
    ]);
    fam
}

fn tokens(p: &Path) -> Vec<i64> {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// `--method mulo` for `condition` (the prompt, or caption feature flags): in this process with
/// `--family`, or through `--gateway`.
fn generate(condition: &[&str], place: [&str; 2], out: &Path) -> Vec<i64> {
    let mut a = vec!["generate"];
    a.extend_from_slice(condition);
    a.extend([
        place[0],
        place[1],
        "--method",
        "mulo",
        "--seed",
        "5",
        "--threads",
        "2",
    ]);
    a.extend(["--no-progress", "--tokens-out", s(out)]);
    let said = mulo(&a);
    // MuLo-SD ran: the drafter drafted (it could open its session with the prompt's features).
    assert!(
        !said.contains("fell back") && !said.contains(" 0 drafter passes"),
        "{said}"
    );
    assert!(said.contains("drafter passes"), "{said}");
    tokens(out)
}

#[tokio::test]
async fn llamagen_t5_family_from_checkpoints_generates_from_text_embedded_and_served() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let fam = family(d);
    let info = mulo(&["info", s(&fam)]);
    assert!(info.contains("text encoder"), "{info}");

    let embedded = generate(&[PROMPT], ["--family", s(&fam)], &d.join("embedded.json"));
    assert_eq!(embedded.len(), 256);
    assert!(embedded.iter().all(|&t| (0..256).contains(&t)));
    // The same prompt's features through --caption-features give the same image.
    let feats = d.join("feats.npy");
    let mask = d.join("mask.npy");
    mulo(&[
        "embed-text",
        "--encoder",
        s(&d.join("t5")),
        "--out",
        s(&feats),
        "--mask-out",
        s(&mask),
        PROMPT,
    ]);
    let from_features = d.join("features.json");
    let cond = ["--caption-features", s(&feats), "--caption-mask", s(&mask)];
    generate(&cond, ["--family", s(&fam)], &from_features);
    assert_eq!(tokens(&from_features), embedded);

    // Without an evaluator: eval says so, bench measures speed only.
    let e = mulo_fails(&["eval", "--family", s(&fam), "--n", "2"]);
    assert!(e.contains("no evaluator"), "{e}");
    let report = d.join("bench.json");
    let said = mulo(&[
        "bench",
        "--family",
        s(&fam),
        "--method",
        "mulo",
        "--n",
        "2",
        "--warmup",
        "0",
        "--threads",
        "2",
        "--json",
        s(&report),
    ]);
    assert!(said.contains("quality: no evaluator"), "{said}");
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(rows["methods"].as_array().unwrap().len(), 2, "{rows}");
    assert!(rows["methods"][1]["fid_emoji"].is_null(), "{rows}");

    let role = ["--family", s(&fam), "--threads", "1"];
    let mut drafter: Proc = start("mulo-drafter", &role);
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut verifier: Proc = start(
        "mulo-verifier",
        &[
            "--family",
            s(&fam),
            "--threads",
            "1",
            "--text-encoder-device",
            "cpu",
            "--text-cache",
            "2",
            "--metrics-listen",
            &metrics,
        ],
    );
    connect(&mut drafter).await;
    connect(&mut verifier).await;
    let mut gateway = start(
        "mulo-gateway",
        &[
            "--family",
            s(&fam),
            "--threads",
            "1",
            "--drafter",
            &drafter.addr,
            "--verifier",
            &verifier.addr,
        ],
    );
    connect(&mut gateway).await;
    let served = generate(
        &[PROMPT],
        ["--gateway", &gateway.addr],
        &d.join("served.json"),
    );
    assert_eq!(served, embedded);
    // The verifier encoded the prompt once; the second request found its features cached.
    let again = generate(
        &[PROMPT],
        ["--gateway", &gateway.addr],
        &d.join("again.json"),
    );
    assert_eq!(again, embedded);
    let text = scrape(&metrics);
    let count = |cache| metric(&text, "mulo_text_encodings_total", &[("cache", cache)]);
    assert_eq!((count("miss"), count("hit")), (1.0, 1.0), "{text}");
}
