//! Quality measures on the emoji family (DESIGN §6): FID-emoji (Fréchet distance between
//! Gaussians fitted to the evaluator's penultimate features of generated and real images) and
//! adherence (how often the evaluator's predicted category / subcategory equals the prompt's).

use std::collections::BTreeMap;
use std::path::Path;

use mulo_model::evaluator::Evaluator;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::TrainError;

/// Header line of a prompt file.
pub const PROMPT_HEADER: &str = "prompt\tcategory\tsubcategory";

/// One line of a prompt file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptRow {
    /// Free-text prompt.
    pub prompt: String,
    /// Expected category (as in `emoji.json`).
    pub category: String,
    /// Expected subcategory (as in `emoji.json`).
    pub subcategory: String,
}

/// Reads a prompt file: TSV with the header `prompt<TAB>category<TAB>subcategory`, one prompt per
/// line; blank lines are skipped. Errors name the file and line.
pub fn read_prompts(path: &Path) -> Result<Vec<PromptRow>, TrainError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| TrainError::Eval(format!("{}: {e}", path.display())))?;
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, h)) if h.trim_end_matches('\r') == PROMPT_HEADER => {}
        _ => {
            return Err(TrainError::Eval(format!(
                "{}:1: the first line must be the header 'prompt<TAB>category<TAB>subcategory'",
                path.display()
            )))
        }
    }
    let mut rows = Vec::new();
    for (i, line) in lines {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 3 || f.iter().any(|s| s.trim().is_empty()) {
            return Err(TrainError::Eval(format!(
                "{}:{}: expected 3 non-empty tab-separated fields, got {}",
                path.display(),
                i + 1,
                f.len()
            )));
        }
        rows.push(PromptRow {
            prompt: f[0].trim().to_string(),
            category: f[1].trim().to_string(),
            subcategory: f[2].trim().to_string(),
        });
    }
    if rows.is_empty() {
        return Err(TrainError::Eval(format!(
            "{}: no prompts after the header",
            path.display()
        )));
    }
    Ok(rows)
}

/// Category and subcategory ids of each prompt row, in the evaluator's label order.
pub fn label_ids(ev: &Evaluator, rows: &[PromptRow]) -> Result<Vec<(i64, i64)>, TrainError> {
    let cfg = ev.config();
    let find = |names: &[String], want: &str, what: &str, prompt: &str| {
        names
            .iter()
            .position(|n| n == want)
            .map(|i| i as i64)
            .ok_or_else(|| {
                TrainError::Eval(format!(
                    "prompt '{prompt}': {what} '{want}' is not one the evaluator knows"
                ))
            })
    };
    rows.iter()
        .map(|r| {
            Ok((
                find(&cfg.category_names, &r.category, "category", &r.prompt)?,
                find(
                    &cfg.subcategory_names,
                    &r.subcategory,
                    "subcategory",
                    &r.prompt,
                )?,
            ))
        })
        .collect()
}

/// Evaluator outputs of a set of images.
#[derive(Debug)]
pub struct ImageScores {
    /// Penultimate features `[N, D]` (fp32, CPU).
    pub features: Tensor,
    /// Predicted category per image.
    pub category: Vec<i64>,
    /// Predicted subcategory per image.
    pub subcategory: Vec<i64>,
}

/// Runs the evaluator over images `[N, 3, H, W]` in [-1, 1] in batches of 128.
pub fn score_images(ev: &Evaluator, images: &Tensor) -> Result<ImageScores, TrainError> {
    let n = images.size()[0];
    let mut feats = Vec::new();
    let mut cat = Vec::new();
    let mut sub = Vec::new();
    tch::no_grad(|| -> Result<(), TrainError> {
        let mut start = 0;
        while start < n {
            let len = (n - start).min(128);
            let out = ev.forward(&images.narrow(0, start, len));
            feats.push(out.features.to_device(Device::Cpu));
            cat.extend(Vec::<i64>::try_from(out.category.argmax(1, false))?);
            sub.extend(Vec::<i64>::try_from(out.subcategory.argmax(1, false))?);
            start += len;
        }
        Ok(())
    })?;
    Ok(ImageScores {
        features: Tensor::cat(&feats, 0),
        category: cat,
        subcategory: sub,
    })
}

/// Fraction of `predicted` equal to `expected` (0 when empty).
pub fn agreement(predicted: &[i64], expected: &[i64]) -> f64 {
    if predicted.is_empty() {
        return 0.0;
    }
    let hits = predicted
        .iter()
        .zip(expected)
        .filter(|(a, b)| a == b)
        .count();
    hits as f64 / predicted.len() as f64
}

/// Images and adherence of the prompts that expect one label.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LabelAdherence {
    /// Images whose prompt expects the label.
    pub n: usize,
    /// Fraction of them the evaluator gives that label.
    pub adherence: f64,
}

/// [`agreement`] split by the expected label, keyed by its name (`names[id]`).
pub fn agreement_by_label(
    predicted: &[i64],
    expected: &[i64],
    names: &[String],
) -> BTreeMap<String, LabelAdherence> {
    let keys: Vec<String> = expected
        .iter()
        .map(|e| {
            usize::try_from(*e)
                .ok()
                .and_then(|i| names.get(i))
                .cloned()
                .unwrap_or_else(|| format!("#{e}"))
        })
        .collect();
    agreement_by_key(predicted, expected, &keys)
}

/// [`agreement`] split by a key per image (`keys[i]` is image `i`'s, e.g. its prompt).
pub fn agreement_by_key(
    predicted: &[i64],
    expected: &[i64],
    keys: &[String],
) -> BTreeMap<String, LabelAdherence> {
    let mut counts: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for ((p, e), key) in predicted.iter().zip(expected).zip(keys) {
        let c = counts.entry(key.clone()).or_insert((0, 0));
        c.0 += 1;
        c.1 += usize::from(p == e);
    }
    counts
        .into_iter()
        .map(|(k, (n, hits))| {
            let adherence = hits as f64 / n as f64;
            (k, LabelAdherence { n, adherence })
        })
        .collect()
}

/// The prompt of each of `n` images generated over `rows` in order, wrapping around.
pub fn prompts_of(rows: &[PromptRow], n: usize) -> Vec<String> {
    (0..n)
        .map(|i| rows[i % rows.len().max(1)].prompt.clone())
        .collect()
}

fn mean_cov(x: &Tensor) -> (Tensor, Tensor) {
    let x = x.to_kind(Kind::Double).to_device(Device::Cpu);
    let n = x.size()[0];
    let mu = x.mean_dim(0, false, Kind::Double);
    let xc = &x - &mu;
    let cov = xc.tr().matmul(&xc) / ((n - 1).max(1) as f64);
    (mu, cov)
}

/// Square root of a symmetric positive semi-definite matrix (negative eigenvalues from rounding
/// are clamped to 0).
fn sqrtm_psd(a: &Tensor) -> Tensor {
    let sym = (a + a.tr()) / 2.0;
    let (w, v) = sym.linalg_eigh("L");
    (&v * w.clamp_min(0.0).sqrt()).matmul(&v.tr())
}

/// Fréchet distance between Gaussians fitted to the rows of `a` `[N, D]` and `b` `[M, D]`:
/// `‖μa − μb‖² + tr(Σa) + tr(Σb) − 2·tr((Σa^½ Σb Σa^½)^½)`, in float64.
pub fn frechet_distance(a: &Tensor, b: &Tensor) -> Result<f64, TrainError> {
    let (sa, sb) = (a.size(), b.size());
    if sa.len() != 2 || sb.len() != 2 || sa[1] != sb[1] || sa[0] < 2 || sb[0] < 2 {
        return Err(TrainError::Eval(format!(
            "Fréchet distance needs two [N>=2, D] feature sets of equal D, got {sa:?} and {sb:?}"
        )));
    }
    let (ma, ca) = mean_cov(a);
    let (mb, cb) = mean_cov(b);
    let ra = sqrtm_psd(&ca);
    let m = ra.matmul(&cb).matmul(&ra);
    let cross = m
        .linalg_eigvalsh("L")
        .clamp_min(0.0)
        .sqrt()
        .sum(Kind::Double);
    let d = (ma - mb).pow_tensor_scalar(2).sum(Kind::Double);
    let fid = d + ca.trace() + cb.trace() - cross * 2.0;
    Ok(f64::try_from(fid)?.max(0.0))
}

/// One method's line of an evaluation or benchmark report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MethodResult {
    /// Method name (`ar`, `drafter-ar`, ...).
    pub method: String,
    /// Parameters of the method and of sampling.
    pub params: serde_json::Value,
    /// Images generated.
    pub n: usize,
    /// FID-emoji against the real images.
    pub fid_emoji: f64,
    /// Fraction of images whose predicted category is the prompt's.
    pub adherence_category: f64,
    /// Fraction of images whose predicted subcategory is the prompt's.
    pub adherence_subcategory: f64,
    /// Category adherence of the prompts of each expected category.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub adherence_by_category: BTreeMap<String, LabelAdherence>,
    /// Category adherence of each prompt's images (which prompts the model draws).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub adherence_by_prompt: BTreeMap<String, LabelAdherence>,
    /// Category adherence split by the prompt's emoji: `train` (the model saw its images),
    /// `heldout` (never trained on: the words must generalise) or `other` (not an emoji name).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub adherence_by_split: BTreeMap<String, LabelAdherence>,
    /// The evaluator on the prompts' own real images at this size: the adherence it allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub real_adherence: Option<RealAdherence>,
    /// Image side in pixels.
    pub image_size: usize,
    /// Real images FID-emoji compares against.
    pub real_images: usize,
    /// The target's mean NLL per token of the images (teacher-forced, the run's sampling); for
    /// methods that generate at the target's resolution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_nll: Option<f64>,
    /// The target's mean pooled NLL per token (pools of the
    /// [`QUALITY_POOL_K`](crate::bench::QUALITY_POOL_K) nearest codes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_pooled_nll: Option<f64>,
    /// Wall-clock seconds of generation (decoding to pixels included).
    pub seconds: f64,
    /// Median seconds per image.
    pub median_image_seconds: f64,
}

/// Category adherence of the real images the prompts name (the evaluator's ceiling: a method
/// cannot be expected to beat it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RealAdherence {
    /// Images scored (one per generated image whose prompt names an emoji).
    pub n: usize,
    /// Fraction the evaluator gives the prompt's category.
    pub adherence_category: f64,
    /// The same per expected category.
    pub adherence_by_category: BTreeMap<String, LabelAdherence>,
}

/// An evaluation report: `{"methods": [...]}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EvalReport {
    /// The command that produced the report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// One entry per method.
    pub methods: Vec<MethodResult>,
}

/// Median of `v` (0 when empty).
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len().is_multiple_of(2) {
        (s[m - 1] + s[m]) / 2.0
    } else {
        s[m]
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn frechet_distance_of_known_gaussians() {
        let a = mulo_model::seed::with_global_seed(1, || {
            Tensor::randn([4000, 3], (Kind::Double, Device::Cpu))
        });
        assert!(frechet_distance(&a, &a).unwrap() < 1e-6);
        // Shifting the mean by d adds |d|^2.
        let shift = Tensor::from_slice(&[1.0f64, 2.0, 0.0]);
        let b = &a + &shift;
        let f = frechet_distance(&a, &b).unwrap();
        assert!((f - 5.0).abs() < 1e-6, "{f}");
        // Scaling one coordinate by 3 (same mean): (3σ − σ)² = 4σ² for that coordinate.
        let c = &a * Tensor::from_slice(&[3.0f64, 1.0, 1.0]);
        let f = frechet_distance(&a, &c).unwrap();
        let var = f64::try_from(a.select(1, 0).var(true)).unwrap();
        assert!((f - 4.0 * var).abs() < 0.02, "{f} vs {}", 4.0 * var);
        assert!((f - frechet_distance(&c, &a).unwrap()).abs() < 1e-6);
        assert!(frechet_distance(&a, &a.narrow(1, 0, 2)).is_err());
    }

    #[test]
    fn prompt_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.tsv");
        std::fs::write(
            &p,
            "prompt\tcategory\tsubcategory\nred apple\tFood & Drink\tfood-fruit\n\n",
        )
        .unwrap();
        let rows = read_prompts(&p).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].subcategory, "food-fruit");
        std::fs::write(&p, "prompt,category\nx\n").unwrap();
        assert!(read_prompts(&p).unwrap_err().to_string().contains(":1:"));
        std::fs::write(&p, "prompt\tcategory\tsubcategory\na\tb\n").unwrap();
        let e = read_prompts(&p).unwrap_err().to_string();
        assert!(e.contains(":2:") && e.contains("3 non-empty"), "{e}");
        std::fs::write(&p, "prompt\tcategory\tsubcategory\n").unwrap();
        assert!(read_prompts(&p)
            .unwrap_err()
            .to_string()
            .contains("no prompts"));
    }

    #[test]
    fn medians_and_agreement() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(agreement(&[1, 2, 3, 4], &[1, 0, 3, 0]), 0.5);
        let names = vec!["a".to_string(), "b".to_string()];
        let by = agreement_by_label(&[0, 1, 1, 0, 7], &[0, 0, 1, 1, 7], &names);
        let want = |n, adherence| LabelAdherence { n, adherence };
        assert_eq!(by["a"], want(2, 0.5));
        assert_eq!(by["b"], want(2, 0.5));
        assert_eq!(by["#7"], want(1, 1.0));
        assert_eq!(by.len(), 3);
        let keys: Vec<String> = ["p", "q", "p", "q"].map(String::from).into();
        let by = agreement_by_key(&[0, 1, 1, 1], &[0, 0, 1, 1], &keys);
        assert_eq!(by["p"], want(2, 1.0));
        assert_eq!(by["q"], want(2, 0.5));
        let rows: Vec<PromptRow> = ["a", "b"]
            .map(|p| PromptRow {
                prompt: p.into(),
                category: "c".into(),
                subcategory: "s".into(),
            })
            .into();
        assert_eq!(prompts_of(&rows, 3), vec!["a", "b", "a"]);
    }
}
