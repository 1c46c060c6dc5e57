//! The family pipeline of the `mulo` binary at toy size: data from synthetic npm packages, every
//! training command, `mulo eval` (report, grid), model cards, and generation from a family.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use common::{fails, ok, MULO};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn toy_family_trains_evaluates_and_generates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pk = mulo_train::data::synthetic::packages(d);
    let data = d.join("data");
    let (fam, work) = (d.join("fam"), d.join("work"));
    ok(&[
        "data",
        "emoji",
        "--google",
        s(&pk[0].1),
        "--twitter",
        s(&pk[1].1),
        "--out",
        s(&data),
    ]);
    let prompts = d.join("p.tsv");
    let out = ok(&["data", "prompts", "--data", s(&data), "--out", s(&prompts)]);
    assert!(out.contains("wrote 2 prompts"), "{out}");

    let j = |a: &Path, b: &str| a.join(b).to_str().unwrap().to_string();
    let common = |role: &str| -> Vec<String> {
        vec![
            "train".into(),
            role.into(),
            "--data".into(),
            s(&data).into(),
            "--out".into(),
            j(&fam, role),
            "--work".into(),
            j(&work, role),
            "--steps".into(),
            "2".into(),
            "--batch".into(),
            "2".into(),
        ]
    };
    let run = |mut args: Vec<String>, extra: &[&str]| {
        args.extend(extra.iter().map(|x| x.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(&refs)
    };
    let vq_out = run(
        common("vq"),
        &[
            "--ch",
            "32",
            "--ch-mult",
            "1,1,1",
            "--z-channels",
            "32",
            "--codebook-size",
            "16",
            "--embed-dim",
            "4",
        ],
    );
    assert!(vq_out.contains("held-out PSNR"), "{vq_out}");
    // Retraining the decoder (continued, or wider from scratch) keeps every token.
    for extra in [&[][..], &["--decoder-ch-mult", "2,1,1"][..]] {
        let mut args = vec![
            "train",
            "vq-decoder",
            "--data",
            s(&data),
            "--steps",
            "2",
            "--batch",
            "2",
        ];
        let (vq_in, out, w) = (j(&fam, "vq"), j(d, "vq2"), j(&work, "vq2"));
        args.extend(["--vq", &vq_in, "--out", &out, "--work", &w]);
        args.extend(extra);
        let o = ok(&args);
        assert!(o.contains("tokens unchanged 100.00%"), "{o}");
    }
    // Fine-tuned in place (twice): the full run's report stays aside and both reach the card.
    let vq3 = d.join("vq3");
    std::fs::create_dir_all(&vq3).unwrap();
    for f in ["config.json", "model.safetensors", "train_report.json"] {
        std::fs::copy(fam.join("vq").join(f), vq3.join(f)).unwrap();
    }
    for _ in 0..2 {
        let (v, w) = (s(&vq3), j(&work, "vq3"));
        ok(&[
            "train",
            "vq-decoder",
            "--data",
            s(&data),
            "--steps",
            "1",
            "--batch",
            "2",
            "--vq",
            v,
            "--out",
            v,
            "--work",
            &w,
        ]);
    }
    let first: Value =
        serde_json::from_str(&std::fs::read_to_string(vq3.join("train_report.vq.json")).unwrap())
            .unwrap();
    assert!(first["command"]
        .as_str()
        .unwrap()
        .starts_with("mulo train vq --data"));
    let card = std::fs::read_to_string(vq3.join("MODEL_CARD.md")).unwrap();
    assert!(
        card.contains("Stage 1")
            && card.contains("mulo train vq --data")
            && card.contains("mulo train vq-decoder --data")
            && card.contains("psnr32_before"),
        "{card}"
    );
    run(common("evaluator"), &["--channels", "8,16"]);
    let vq = j(&fam, "vq");
    let gpt = [
        "--vq",
        &vq,
        "--dim",
        "32",
        "--n-layer",
        "1",
        "--n-head",
        "2",
        "--caption-len",
        "6",
        "--caption-dim",
        "8",
    ];
    run(common("target"), &gpt);
    run(common("drafter"), &gpt);
    run(common("draft-small"), &gpt);
    let up = run(
        common("upsampler"),
        &[
            "--vq",
            &vq,
            "--channels",
            "16",
            "--low-blocks",
            "1",
            "--high-blocks",
            "1",
        ],
    );
    assert!(up.contains("D_2(U_2(y)) = y"), "{up}");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/emoji/family.json"),
        fam.join("family.json"),
    )
    .unwrap();

    // Cards are rendered from the reports, with the command line that made the model.
    let card = std::fs::read_to_string(fam.join("vq/MODEL_CARD.md")).unwrap();
    assert!(
        card.contains("mulo train vq --data") && card.contains("psnr64"),
        "{card}"
    );
    // `mulo vq-probe`: held-out PSNR with and without quantisation; the card shows it once the
    // report sits in the VQ's directory (`mulo train all --only cards` re-renders).
    let probe = fam.join("vq/vq_probe.json");
    let out = ok(&[
        "vq-probe",
        "--vq",
        &j(&fam, "vq"),
        "--data",
        s(&data),
        "--json",
        s(&probe),
    ]);
    assert!(out.contains("held-out images: PSNR 64 px"), "{out}");
    let p: Value = serde_json::from_str(&std::fs::read_to_string(&probe).unwrap()).unwrap();
    assert_eq!(p["heldout_images"], 2, "{p}");
    for k in [
        "psnr64",
        "psnr32",
        "psnr64_unquantised",
        "psnr32_unquantised",
        "psnr32_from_64px_tokens",
    ] {
        assert!(p[k].as_f64().unwrap() > 0.0, "{p}");
    }
    ok(&[
        "train",
        "all",
        "--family",
        s(&fam),
        "--data",
        s(&data),
        "--only",
        "cards",
    ]);
    let card = std::fs::read_to_string(fam.join("vq/MODEL_CARD.md")).unwrap();
    assert!(
        card.contains("## Where it loses detail (`mulo vq-probe`"),
        "{card}"
    );
    // A GPT's card states the budget it used and its held-out NLL against steps.
    let card = std::fs::read_to_string(fam.join("target/MODEL_CARD.md")).unwrap();
    assert!(
        card.contains("Budget used:") && card.contains("Held-out NLL against steps"),
        "{card}"
    );
    assert!(!card.contains("| heldout_nll_curve |"), "{card}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(fam.join("vq/train_report.json")).unwrap())
            .unwrap();
    assert!(report["command"]
        .as_str()
        .unwrap()
        .starts_with("mulo train vq"));

    let json = d.join("eval.json");
    let grid = d.join("grid.png");
    // `mulo eval` of the family over a prompt file, plus more flags.
    let eval = |prompts: &Path, more: &[&str]| -> Vec<String> {
        let base = ["eval", "--family", s(&fam), "--data", s(&data), "--prompts"];
        let base = base.into_iter().chain([s(prompts), "--json", s(&json)]);
        base.chain(more.iter().copied()).map(String::from).collect()
    };
    let out = ok(&eval(
        &prompts,
        &[
            "--method",
            "ar,drafter-ar",
            "--n",
            "3",
            "--grid",
            s(&grid),
            "--grid-columns",
            "2",
        ],
    ));
    assert!(out.contains("FID-emoji"), "{out}");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let methods = r["methods"].as_array().unwrap();
    assert_eq!(methods.len(), 2);
    for (m, name, px) in [(&methods[0], "ar", 64), (&methods[1], "drafter-ar", 32)] {
        assert_eq!(m["method"], name);
        assert_eq!(m["n"], 3);
        assert_eq!(m["image_size"], px);
        assert_eq!(m["real_images"], 4);
        assert!(m["fid_emoji"].as_f64().unwrap() >= 0.0);
        for k in ["adherence_category", "adherence_subcategory"] {
            assert!((0.0..=1.0).contains(&m[k].as_f64().unwrap()), "{m}");
        }
        assert!(m["params"]["cfg"].is_number());
        // Both prompts name an emoji: one trained on, one held out, and each its real image.
        let split = &m["adherence_by_split"];
        let count = |k: &str| split[k]["n"].as_u64().unwrap();
        assert_eq!(count("train") + count("heldout"), 3, "{m}");
        assert!(split.get("other").is_none(), "{m}");
        assert_eq!(m["real_adherence"]["n"], 3, "{m}");
        let real = m["real_adherence"]["adherence_category"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&real), "{m}");
    }
    assert!(out.contains("the prompts' own real images"), "{out}");
    // The target's NLL of its own AR images; none for the drafter (another model and grid).
    assert!(methods[0]["target_nll"].as_f64().unwrap() > 0.0);
    assert!(methods[1].get("target_nll").is_none(), "{}", methods[1]);
    let eval_ar = methods[0].clone();
    // The benchmark scores image j against prompt j, like `mulo eval`, whatever the warm-up:
    // its AR row has eval's FID-emoji and adherence (a shifted prompt list would not).
    let bench_ar = d.join("bench-ar.json");
    ok(&[
        "bench",
        "--family",
        s(&fam),
        "--data",
        s(&data),
        "--prompts",
        s(&prompts),
        "--n",
        "3",
        "--warmup",
        "1",
        "--method",
        "ar",
        "--json",
        s(&bench_ar),
    ]);
    let b: Value = serde_json::from_str(&std::fs::read_to_string(&bench_ar).unwrap()).unwrap();
    let ar = &b["methods"][0];
    let close = |k: &str, l: &str| (ar[k].as_f64().unwrap() - eval_ar[l].as_f64().unwrap()).abs();
    assert!(close("fid_emoji", "fid_emoji") < 1e-3, "{ar} vs {eval_ar}");
    assert!(
        close("adherence_category", "adherence_category") < 1e-9,
        "{ar} vs {eval_ar}"
    );
    assert!(close("adherence_subcategory", "adherence_subcategory") < 1e-9);
    // ... and the target's NLL of the same images, scored by eval on the model and by the bench
    // through the verifier role.
    assert!(
        close("target_nll", "target_nll") < 1e-6,
        "{ar} vs {eval_ar}"
    );
    assert!(close("target_pooled_nll", "target_pooled_nll") < 1e-6);
    assert!(ar["target_pooled_nll"].as_f64().unwrap() <= ar["target_nll"].as_f64().unwrap());
    // 2 columns, 3 images: two generated rows, each above a real row.
    let g = image::open(&grid).unwrap();
    assert_eq!((g.width(), g.height()), (128, 256));

    // Generation from the family (its target) with a prompt; unknown words are warned about.
    let png = d.join("a.png");
    let o = Command::new(MULO)
        .args([
            "generate",
            "purple grinning face",
            "--family",
            s(&fam),
            "--out",
            s(&png),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("purple"));
    let img = image::open(&png).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64));

    // Every method through the roles and the coordinator, with the per-image stats line.
    for method in [
        "mulo",
        "mulo:tau=0.5,radius=0,zipar_window=2",
        "sd:gamma=3",
        "lantern",
    ] {
        let line = ok(&[
            "generate",
            "grinning face",
            "--family",
            s(&fam),
            "--method",
            method,
            "--out",
            s(&png),
            "--no-progress",
        ]);
        assert!(
            line.contains("target passes") && line.contains("cycles") && line.contains("accepted"),
            "{method}: {line}"
        );
    }
    // The demo's command: MuLo with an acceptance map and the speed-up against AR.
    let map = d.join("map.png");
    let line = ok(&[
        "generate",
        "grinning face",
        "--family",
        s(&fam),
        "--method",
        "mulo",
        "--out",
        s(&png),
        "--map",
        s(&map),
        "--vs-ar",
        "--no-progress",
    ]);
    assert!(
        line.contains("speed-up vs AR on the same prompt and seed"),
        "{line}"
    );
    let m = image::open(&map).unwrap();
    assert_eq!(
        (m.width(), m.height()),
        (256, 296),
        "64 px x4 and the legend"
    );
    let e = fails(&[
        "generate",
        "x",
        "--model",
        &j(&fam, "target"),
        "--map",
        s(&map),
    ]);
    assert!(e.contains("--map"), "{e}");
    let e = fails(&[
        "generate",
        "x",
        "--family",
        s(&fam),
        "--method",
        "mulo:tau=2",
    ]);
    assert!(e.contains("tau"), "{e}");
    let e = fails(&[
        "generate",
        "x",
        "--model",
        &j(&fam, "target"),
        "--method",
        "mulo",
    ]);
    assert!(e.contains("--family"), "{e}");
    // The benchmark: AR first, the methods, the sweep; JSON rows with the documented keys, a plot.
    let bench = d.join("bench.json");
    let plot = d.join("bench.png");
    let out = ok(&[
        "bench",
        "--family",
        s(&fam),
        "--data",
        s(&data),
        "--prompts",
        s(&prompts),
        "--n",
        "2",
        "--warmup",
        "0",
        "--method",
        "sd:gamma=2",
        "--method",
        "mulo:tau=0.2",
        "--sweep",
        "tau=0,1",
        "--json",
        s(&bench),
        "--plot",
        s(&plot),
    ]);
    assert!(out.contains("speedup") && out.contains("mulo:"), "{out}");
    let b: Value = serde_json::from_str(&std::fs::read_to_string(&bench).unwrap()).unwrap();
    let rows = b["methods"].as_array().unwrap();
    let specs: Vec<&str> = rows.iter().map(|r| r["spec"].as_str().unwrap()).collect();
    assert_eq!(specs.len(), 5, "{specs:?}");
    assert_eq!(specs[0], "ar");
    for r in rows {
        for key in [
            "method",
            "params",
            "latency_median_s",
            "speedup_vs_ar",
            "target_passes_per_image",
            "fid_emoji",
            "adherence",
        ] {
            assert!(!r[key].is_null(), "{key} missing in {r}");
        }
    }
    assert_eq!(rows[0]["tokens_per_target_pass"].as_f64(), Some(1.0));
    // Target-relative quality: every row has the target's NLL of its images and its pooled form
    // (never above it), the distance to AR's images (zero for AR itself) and one noise floor.
    let floor = rows[0]["fd_ar_floor"].as_f64().unwrap();
    assert!(floor > 0.0, "two AR sets with other seeds differ");
    for r in rows {
        let nll = r["target_nll"].as_f64().unwrap();
        let pooled = r["target_pooled_nll"].as_f64().unwrap();
        assert!(nll > 0.0 && (0.0..=nll + 1e-9).contains(&pooled), "{r}");
        assert!(r["target_nll_se"].as_f64().unwrap() >= 0.0, "{r}");
        assert!(r["fd_to_ar"].as_f64().unwrap() >= 0.0, "{r}");
        assert_eq!(r["fd_ar_floor"].as_f64(), Some(floor));
    }
    assert!(rows[0]["fd_to_ar"].as_f64().unwrap() < 1e-3, "{}", rows[0]);
    // τ = 0 accepts everything: one verify pass per block plus the prefill.
    let all = rows.iter().find(|r| r["params"]["tau"] == "0").unwrap();
    assert_eq!(all["acceptance_rate"].as_f64(), Some(1.0), "{all}");
    assert!(image::open(&plot).unwrap().width() > 100);
    // The plot again from the report alone.
    let replot = d.join("replot.png");
    ok(&["bench", "--replot", s(&bench), "--plot", s(&replot)]);
    assert_eq!(
        image::open(&replot).unwrap().to_rgb8(),
        image::open(&plot).unwrap().to_rgb8()
    );

    let info = ok(&["info", s(&fam.join("upsampler"))]);
    assert!(info.contains("up-sampler") && info.contains("x2"), "{info}");
    let info = ok(&["info", s(&fam.join("evaluator"))]);
    assert!(info.contains("evaluator CNN"), "{info}");

    // Bad input: a prompt label the evaluator does not know, a family without the member.
    let bad = d.join("bad.tsv");
    std::fs::write(
        &bad,
        "prompt\tcategory\tsubcategory\nred apple\tFood & Drink\tfood-fruit\n",
    )
    .unwrap();
    let e = fails(&eval(&bad, &["--n", "2"]));
    assert!(e.contains("Food & Drink") && e.contains("red apple"), "{e}");
    std::fs::remove_dir_all(fam.join("drafter")).unwrap();
    let e = fails(&eval(&prompts, &["--method", "drafter-ar", "--n", "2"]));
    assert!(e.contains("Drafter") && e.contains("mulo train"), "{e}");
}
