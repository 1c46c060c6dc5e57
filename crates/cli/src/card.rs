//! MODEL_CARD.md of a trained model, rendered from what the commands wrote: `train_report.json`
//! (the training command, its options and the measured report) and, for the GPTs, `eval.json`
//! (from `mulo eval`). Nothing in a card is typed by hand.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

/// File with a model's training command, options and report.
pub const TRAIN_REPORT: &str = "train_report.json";
/// The full VQ run's report, kept beside the report of a later decoder fine-tune.
pub const FIRST_VQ_REPORT: &str = "train_report.vq.json";
/// File with a model's evaluation report (GPTs).
pub const EVAL_REPORT: &str = "eval.json";
/// `mulo vq-probe`'s report in a VQ directory (the card shows it).
pub const VQ_PROBE_REPORT: &str = "vq_probe.json";

fn describe(role: &str) -> &'static str {
    match role {
        "vq" => "VQ tokenizer (LlamaGen architecture) with 4x down-sampling: 64 px images -> 16x16 tokens, 32 px -> 8x8; one codebook for both resolutions. Trained with L1 + MSE reconstruction, codebook and 0.25 x commitment losses, re-seeding unused codes; steps alternate between 64 px and 32 px batches (`low_res_share` of them at 32 px).",
        "evaluator" => "Evaluator CNN: four stages of two 3x3 convolutions with GroupNorm and SiLU, global average pooling to the penultimate features used by FID-emoji, linear heads for category and subcategory. Inputs of other sizes are resized to 64 px. Trained with label-smoothed cross-entropy on both heads, random mirroring and shifts, part of the steps at 32 px.",
        "target" => "Target GPT (LlamaGen t2i architecture, caption prefix + learned null caption for classifier-free guidance) at 64 px / 16x16 tokens, trained with teacher forcing on VQ tokens of the training images and their captions (condition dropout for CFG).",
        "drafter" => "Drafter GPT: the target's architecture at 32 px / 8x8 tokens (r = 2), trained the same way on the 32 px images.",
        "draft-small" => "Small high-resolution draft model (64 px / 16x16 tokens, few layers) for the SD and LANTERN baselines, trained like the target.",
        "upsampler" => "Up-sampler U_2: 8x8 low-res token ids -> 16x16 high-res token logits. Tokens enter as their (frozen) VQ code vectors, pass row-causal residual convolutions (2x3 kernels over rows a-1 and a), a pixel shuffle x2, more row-causal convolutions and a classification head over the codebook: high-res rows 2a, 2a+1 depend only on low-res rows <= a. Trained with token cross-entropy on (32 px tokens, 64 px tokens) pairs of the same training images.",
        _ => "",
    }
}

fn fmt_value(v: &Value) -> String {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => {
                if f.abs() >= 100.0 {
                    format!("{f:.1}")
                } else {
                    format!("{f:.4}")
                }
            }
            _ => n.to_string(),
        },
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The command, machine, options and measured report of one training run, under `title`.
fn render_run(md: &mut String, train: &Value, title: &str, file: &str) -> Result<()> {
    let _ = writeln!(md, "## {title}\n");
    let pieces = train["report"]["pieces"].as_u64().unwrap_or(1);
    if pieces > 1 {
        let _ = writeln!(
            md,
            "The run took {pieces} pieces (paused, or finished and extended, then continued with `--resume`); the last one's command:\n"
        );
    }
    if let Some(cmd) = train.get("command").and_then(Value::as_str) {
        let _ = writeln!(md, "```\n{cmd}\n```\n");
    }
    if let Some(machine) = train.get("machine").and_then(Value::as_str) {
        let _ = writeln!(md, "Machine: {machine}.\n");
    }
    let _ = writeln!(
        md,
        "Options as run (also in `{file}`):\n\n```json\n{}\n```\n",
        serde_json::to_string_pretty(train.get("options").unwrap_or(&Value::Null))?
    );
    let _ = writeln!(
        md,
        "### Measured (printed by the command; held-out numbers on the stored weights)\n"
    );
    let _ = writeln!(md, "| quantity | value |\n|---|---|");
    if let Some(Value::Object(r)) = train.get("report") {
        for (k, v) in r.iter().filter(|(k, _)| *k != "heldout_nll_curve") {
            let _ = writeln!(md, "| {k} | {} |", fmt_value(v));
        }
        if let Some(secs) = r.get("training_seconds_total").and_then(Value::as_f64) {
            let _ = writeln!(
                md,
                "\nBudget used: {:.0} minutes of training steps in {} piece(s) (data loading and the held-out measurement not counted).",
                secs / 60.0,
                r.get("pieces").and_then(Value::as_u64).unwrap_or(1)
            );
        }
        render_curve(md, r.get("heldout_nll_curve"));
    }
    Ok(())
}

/// The held-out NLL against steps, from the report's `heldout_nll_curve`.
fn render_curve(md: &mut String, curve: Option<&Value>) {
    let Some(points) = curve.and_then(Value::as_array).filter(|p| !p.is_empty()) else {
        return;
    };
    let _ = writeln!(
        md,
        "\n### Held-out NLL against steps (names alone, 256 held-out images, dropout off)\n\n| step | held-out NLL |\n|---|---|"
    );
    for p in points {
        if let (Some(step), Some(nll)) = (
            p.get(0).and_then(Value::as_u64),
            p.get(1).and_then(Value::as_f64),
        ) {
            let _ = writeln!(md, "| {step} | {nll:.4} |");
        }
    }
}

/// The section of `mulo vq-probe`'s report, when `dir` holds one.
fn render_vq_probe(md: &mut String, dir: &Path) -> Result<()> {
    let path = dir.join(VQ_PROBE_REPORT);
    if !path.is_file() {
        return Ok(());
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let p: Value = serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let db = |k: &str| {
        p.get(k)
            .and_then(Value::as_f64)
            .map_or("-".into(), |v| format!("{v:.2}"))
    };
    let _ = writeln!(
        md,
        "\n## Where it loses detail (`mulo vq-probe`, also in `{VQ_PROBE_REPORT}`)\n"
    );
    let _ = writeln!(
        md,
        "Held-out PSNR (dB, {} images) of the tokens, and of the encoder's own latents fed to the \
         decoder without quantisation (an unlimited codebook):\n",
        p.get("heldout_images").map(fmt_value).unwrap_or_default()
    );
    let _ = writeln!(md, "| size | tokens | unquantised |\n|---|---|---|");
    let _ = writeln!(
        md,
        "| 64 px (16x16) | {} | {} |",
        db("psnr64"),
        db("psnr64_unquantised")
    );
    let _ = writeln!(
        md,
        "| 32 px (8x8) | {} | {} |\n",
        db("psnr32"),
        db("psnr32_unquantised")
    );
    let _ = writeln!(
        md,
        "The 64 px tokens decoded and area-averaged to 32 px: {} dB.",
        db("psnr32_from_64px_tokens")
    );
    Ok(())
}

/// Renders `<dir>/MODEL_CARD.md` for a model of `role` from the reports in `dir`.
pub fn write_card(dir: &Path, role: &str) -> Result<()> {
    let path = dir.join(TRAIN_REPORT);
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let train: Value =
        serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let mut md = String::new();
    let _ = writeln!(md, "# emoji {role}\n");
    let _ = writeln!(md, "{}\n", describe(role));
    if let Some(note) = train.get("note").and_then(Value::as_str) {
        let _ = writeln!(md, "**Note:** {note}\n");
    }
    let _ = writeln!(
        md,
        "Data: `mulo data emoji` (emoji-datasource-google and -twitter 16.0.0, 64/32/16 px on white; split by emoji, held-out emoji never trained on; see docs/data.md).\n"
    );
    let first = dir.join(FIRST_VQ_REPORT);
    if first.is_file() {
        // A decoder fine-tune (`mulo train vq-decoder`) followed the full VQ run.
        let text =
            std::fs::read_to_string(&first).with_context(|| format!("{}", first.display()))?;
        let vq: Value =
            serde_json::from_str(&text).with_context(|| format!("{}", first.display()))?;
        render_run(
            &mut md,
            &vq,
            "Stage 1: the VQ (encoder, codebook, decoder)",
            FIRST_VQ_REPORT,
        )?;
        render_run(
            &mut md,
            &train,
            "Stage 2: the decoder fine-tuned (encoder and codebook frozen, tokens unchanged)",
            TRAIN_REPORT,
        )?;
    } else {
        render_run(&mut md, &train, "How it was made", TRAIN_REPORT)?;
    }
    let eval_path = dir.join(EVAL_REPORT);
    if eval_path.is_file() {
        let text = std::fs::read_to_string(&eval_path)
            .with_context(|| format!("{}", eval_path.display()))?;
        let eval: Value =
            serde_json::from_str(&text).with_context(|| format!("{}", eval_path.display()))?;
        let _ = writeln!(md, "\n## Samples (`mulo eval`, also in `{EVAL_REPORT}`)\n");
        if let Some(cmd) = eval.get("command").and_then(Value::as_str) {
            let _ = writeln!(md, "```\n{cmd}\n```\n");
        }
        let _ = writeln!(
            md,
            "| method | n | px | FID-emoji | adherence category | adherence subcategory | params |\n|---|---|---|---|---|---|---|"
        );
        for m in eval
            .get("methods")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let g = |k: &str| m.get(k).map(fmt_value).unwrap_or_default();
            let pct = |k: &str| {
                m.get(k)
                    .and_then(Value::as_f64)
                    .map(|f| format!("{:.1}%", f * 100.0))
                    .unwrap_or_default()
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | `{}` |",
                g("method"),
                g("n"),
                g("image_size"),
                g("fid_emoji"),
                pct("adherence_category"),
                pct("adherence_subcategory"),
                m.get("params").map(Value::to_string).unwrap_or_default()
            );
        }
        // Category adherence by the prompts' category, one column per method.
        let methods: Vec<&Value> = eval
            .get("methods")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|m| m.get("adherence_by_category").is_some())
            .collect();
        let mut cats: Vec<&String> = methods
            .iter()
            .filter_map(|m| m.get("adherence_by_category").and_then(Value::as_object))
            .flat_map(|o| o.keys())
            .collect();
        cats.sort();
        cats.dedup();
        if !cats.is_empty() {
            let mut names: Vec<String> = methods.iter().map(|m| fmt_value(&m["method"])).collect();
            // The evaluator on the prompts' own real images (of the first method's size).
            let real = methods
                .first()
                .and_then(|m| m.get("real_adherence"))
                .map(|r| &r["adherence_by_category"]);
            if real.is_some() {
                names.push("real images".into());
            }
            let _ = writeln!(
                md,
                "\nCategory adherence by the prompt's category (images, adherence):\n\n| category | {} |\n|---|{}",
                names.join(" | "),
                "---|".repeat(names.len())
            );
            for c in cats {
                let cells: Vec<String> = methods
                    .iter()
                    .map(|m| &m["adherence_by_category"])
                    .chain(real)
                    .map(|by| {
                        let e = &by[c.as_str()];
                        match (e["n"].as_u64(), e["adherence"].as_f64()) {
                            (Some(n), Some(a)) => format!("{n}, {:.1}%", a * 100.0),
                            _ => String::new(),
                        }
                    })
                    .collect();
                let _ = writeln!(md, "| {c} | {} |", cells.join(" | "));
            }
        }
    }
    render_vq_probe(&mut md, dir)?;
    let out = dir.join("MODEL_CARD.md");
    std::fs::write(&out, md).with_context(|| format!("{}", out.display()))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_run_of_several_pieces_says_so_and_sums_its_budget() {
        let train = serde_json::json!({
            "command": "mulo train target --resume",
            "report": {"pieces": 3, "training_seconds_total": 600.0, "heldout_nll_curve": [[250, 3.0]]},
        });
        let mut md = String::new();
        render_run(&mut md, &train, "How it was made", TRAIN_REPORT).unwrap();
        assert!(md.contains("The run took 3 pieces"), "{md}");
        assert!(
            md.contains("10 minutes of training steps in 3 piece(s)"),
            "{md}"
        );
        let one = serde_json::json!({"command": "mulo train target", "report": {"pieces": 1}});
        let mut md = String::new();
        render_run(&mut md, &one, "How it was made", TRAIN_REPORT).unwrap();
        assert!(!md.contains("pieces ("), "{md}");
    }
}
