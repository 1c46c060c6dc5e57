//! Decoding methods and their parameters (DESIGN §2.3, §2.4): what `--method` selects, with
//! validation that names the bad field, `key=value` parsing for flags and sweeps, and the plan of
//! one MuLo-SD verification outcome (which positions to resample, in which islands and passes).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::params::ParamError;
use crate::spec::{expand, islands, pass_schedule, raster_reject, Block};

/// How rejected proposals are turned into positions to resample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rejection {
    /// MuLo-SD: resample the neighbourhoods of the rejected positions, every island at once.
    Local,
    /// Classic: resample everything from the first rejected position on, in raster order (an
    /// ablation).
    Raster,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Local => "local",
            Self::Raster => "raster",
        })
    }
}

/// How the target resamples the islands of a plan (DESIGN §2.2 step 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resampler {
    /// One position per island per target pass, in raster order, each drawn from processed `p`
    /// (the paper's schedule: passes = the largest island).
    Sequential,
    /// Parallel (speculative Jacobi) resampling: every pass feeds all unsettled positions of
    /// every island with a guess (first the drafter's proposal, later a draw from the previous
    /// pass's `p`) and keeps, per island, the longest raster prefix that passes the lossless
    /// test `u < min(1, p(x) / q(x))`, plus a draw from `norm(max(0, p − q))` at the first
    /// rejection. Each kept token has the distribution the sequential schedule gives it; passes
    /// are at most the sequential count.
    Jacobi,
}

impl fmt::Display for Resampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Sequential => "sequential",
            Self::Jacobi => "jacobi",
        })
    }
}

/// Parameters of MuLo-SD (DESIGN §2.3).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MuloParams {
    /// Acceptance threshold on the pooled probability mass, in [0, 1]: the speed/quality knob.
    pub tau: f64,
    /// Pool size `k`: the draft token's `k` nearest codes (itself included), `k >= 1`.
    pub pool_k: usize,
    /// Expansion radius `l` (Chebyshev) around each rejected position; 0 resamples only the
    /// rejected ones.
    pub radius: usize,
    /// Low-resolution rows drafted per cycle (`R >= 1`).
    pub block_rows: usize,
    /// ZipAR-style parallel drafting: start low-res row `j+1` once row `j` has this many tokens;
    /// 0 drafts rows one after the other.
    pub zipar_window: usize,
    /// Local (MuLo-SD) or raster (classic) rejection.
    pub rejection: Rejection,
    /// Pipelined drafting: the drafter drafts block `b+1` while block `b` is verified, over its
    /// own (not yet realigned) rows of block `b`; the next draft realigns them. Changes the
    /// proposals (not the verification), so both settings are deterministic for a seed.
    #[serde(default = "pipeline_default")]
    pub pipeline: bool,
    /// How islands are resampled: sequentially or in parallel Jacobi passes.
    #[serde(default = "resample_default")]
    pub resample: Resampler,
    /// Jacobi resampling: the unsettled positions of each island one pass queries, from the
    /// first on (0 = the whole island).
    #[serde(default = "jacobi_window_default")]
    pub jacobi_window: usize,
    /// 0 resamples each island in raster order; `w >= 1` resamples its rows side by side as a
    /// wavefront, a row's column `c` once the row above is settled through column `c + w`
    /// (ZipAR's order within an island; Jacobi and sequential resampling alike).
    #[serde(default = "wavefront_default")]
    pub wavefront: usize,
}

fn jacobi_window_default() -> usize {
    MuloParams::default().jacobi_window
}

fn wavefront_default() -> usize {
    MuloParams::default().wavefront
}

fn resample_default() -> Resampler {
    MuloParams::default().resample
}

fn pipeline_default() -> bool {
    MuloParams::default().pipeline
}

impl Default for MuloParams {
    /// Picked from the issue-19 runs on the bundled emoji family (docs/methods.md, "Wavefront
    /// resampling"): the fastest setting whose adherence, `fd_to_ar` and `target_pooled_nll`
    /// stayed at the earlier defaults' (`tau=0.03,pool_k=256,block_rows=2,resample=sequential`).
    /// On the bundled family `block_rows=8` drafts the whole 8-row draft in one cycle.
    fn default() -> Self {
        Self {
            tau: 0.05,
            pool_k: 128,
            radius: 1,
            block_rows: 8,
            zipar_window: 2,
            rejection: Rejection::Local,
            pipeline: true,
            resample: Resampler::Jacobi,
            jacobi_window: 2,
            wavefront: 1,
        }
    }
}

/// Parameters of classic draft-model speculative sampling (lossless).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SdParams {
    /// Draft tokens proposed per target pass (`γ >= 1`).
    pub gamma: usize,
}

impl Default for SdParams {
    fn default() -> Self {
        Self { gamma: 4 }
    }
}

/// Parameters of LANTERN (relaxed speculative sampling with latent proximity sets).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LanternParams {
    /// Draft tokens proposed per target pass (`γ >= 1`).
    pub gamma: usize,
    /// Candidates of the proximity set: the draft token's `k` nearest codes (`k >= 1`).
    pub k: usize,
    /// Largest target mass of the neighbours added to the draft token's own (in [0, 1]).
    pub delta: f64,
}

impl Default for LanternParams {
    fn default() -> Self {
        Self {
            gamma: 4,
            k: 1000,
            delta: 0.1,
        }
    }
}

/// A decoding method with its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "lowercase")]
pub enum Method {
    /// Plain autoregressive decoding: one target pass per token (the exact reference).
    Ar,
    /// Classic speculative sampling with the small high-resolution draft model.
    Sd(SdParams),
    /// LANTERN with the small high-resolution draft model.
    Lantern(LanternParams),
    /// Multi-Scale Local Speculative Decoding.
    Mulo(MuloParams),
}

/// The method names `--method` accepts.
pub const METHOD_NAMES: [&str; 4] = ["ar", "sd", "lantern", "mulo"];

fn parse_value<T: std::str::FromStr>(field: &'static str, v: &str) -> Result<T, ParamError> {
    v.trim()
        .parse()
        .map_err(|_| ParamError::new(field, format!("cannot parse '{v}'")))
}

/// One of the named `choices` (`expected a or b, got 'c'` otherwise).
fn parse_choice<T: Copy>(
    field: &'static str,
    value: &str,
    choices: &[(&str, T)],
) -> Result<T, ParamError> {
    let v = value.trim();
    choices
        .iter()
        .find(|(name, _)| *name == v)
        .map(|&(_, c)| c)
        .ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
            ParamError::new(field, format!("expected {}, got '{v}'", names.join(" or ")))
        })
}

impl Method {
    /// The method's name (`ar`, `sd`, `lantern`, `mulo`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Ar => "ar",
            Self::Sd(_) => "sd",
            Self::Lantern(_) => "lantern",
            Self::Mulo(_) => "mulo",
        }
    }

    /// The method `name` at its default parameters.
    pub fn default_for(name: &str) -> Result<Self, ParamError> {
        match name.trim() {
            "ar" => Ok(Self::Ar),
            "sd" => Ok(Self::Sd(SdParams::default())),
            "lantern" => Ok(Self::Lantern(LanternParams::default())),
            "mulo" => Ok(Self::Mulo(MuloParams::default())),
            other => Err(ParamError::new(
                "method",
                format!(
                    "unknown method '{other}' (expected one of {})",
                    METHOD_NAMES.join(", ")
                ),
            )),
        }
    }

    /// The parameter names this method takes.
    pub fn keys(&self) -> &'static [&'static str] {
        match self {
            Self::Ar => &[],
            Self::Sd(_) => &["gamma"],
            Self::Lantern(_) => &["gamma", "k", "delta"],
            Self::Mulo(_) => &[
                "tau",
                "pool_k",
                "radius",
                "block_rows",
                "zipar_window",
                "rejection",
                "pipeline",
                "resample",
                "jacobi_window",
                "wavefront",
            ],
        }
    }

    /// Sets one parameter from its text form; an error names the key when the method has no such
    /// parameter or the value does not parse. Values are checked by [`Method::validate`].
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ParamError> {
        let unknown = |m: &Method| {
            ParamError::new(
                "parameter",
                format!(
                    "method '{}' has no parameter '{key}'{}",
                    m.name(),
                    if m.keys().is_empty() {
                        String::new()
                    } else {
                        format!(" (it takes {})", m.keys().join(", "))
                    }
                ),
            )
        };
        match self {
            Self::Ar => return Err(unknown(self)),
            Self::Sd(p) => match key {
                "gamma" => p.gamma = parse_value("gamma", value)?,
                _ => return Err(unknown(self)),
            },
            Self::Lantern(p) => match key {
                "gamma" => p.gamma = parse_value("gamma", value)?,
                "k" => p.k = parse_value("k", value)?,
                "delta" => p.delta = parse_value("delta", value)?,
                _ => return Err(unknown(self)),
            },
            Self::Mulo(p) => match key {
                "tau" => p.tau = parse_value("tau", value)?,
                "pool_k" => p.pool_k = parse_value("pool_k", value)?,
                "radius" => p.radius = parse_value("radius", value)?,
                "block_rows" => p.block_rows = parse_value("block_rows", value)?,
                "zipar_window" => p.zipar_window = parse_value("zipar_window", value)?,
                "jacobi_window" => p.jacobi_window = parse_value("jacobi_window", value)?,
                "wavefront" => p.wavefront = parse_value("wavefront", value)?,
                "pipeline" => {
                    p.pipeline = match value.trim() {
                        "1" | "true" | "on" => true,
                        "0" | "false" | "off" => false,
                        other => {
                            return Err(ParamError::new(
                                "pipeline",
                                format!("expected 1 or 0 (on or off), got '{other}'"),
                            ))
                        }
                    }
                }
                "rejection" => {
                    p.rejection = parse_choice(
                        "rejection",
                        value,
                        &[("local", Rejection::Local), ("raster", Rejection::Raster)],
                    )?
                }
                "resample" => {
                    p.resample = parse_choice(
                        "resample",
                        value,
                        &[
                            ("jacobi", Resampler::Jacobi),
                            ("sequential", Resampler::Sequential),
                        ],
                    )?
                }
                _ => return Err(unknown(self)),
            },
        }
        Ok(())
    }

    /// Parses `name[:key=value,key=value...]`, e.g. `mulo:tau=0.2,radius=2`, and validates it.
    pub fn parse(spec: &str) -> Result<Self, ParamError> {
        let (name, rest) = spec.split_once(':').unwrap_or((spec, ""));
        let mut m = Self::default_for(name)?;
        for kv in rest.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or_else(|| {
                ParamError::new(
                    "parameter",
                    format!("expected key=value, got '{kv}' in '{spec}'"),
                )
            })?;
            m.set(k.trim(), v)?;
        }
        m.validate()?;
        Ok(m)
    }

    /// The parameters as `key → value` text (what reports print beside the method name).
    pub fn params(&self) -> BTreeMap<&'static str, String> {
        let mut out = BTreeMap::new();
        match self {
            Self::Ar => {}
            Self::Sd(p) => {
                out.insert("gamma", p.gamma.to_string());
            }
            Self::Lantern(p) => {
                out.insert("gamma", p.gamma.to_string());
                out.insert("k", p.k.to_string());
                out.insert("delta", p.delta.to_string());
            }
            Self::Mulo(p) => {
                out.insert("tau", p.tau.to_string());
                out.insert("pool_k", p.pool_k.to_string());
                out.insert("radius", p.radius.to_string());
                out.insert("block_rows", p.block_rows.to_string());
                out.insert("zipar_window", p.zipar_window.to_string());
                out.insert("rejection", p.rejection.to_string());
                out.insert("pipeline", u8::from(p.pipeline).to_string());
                out.insert("resample", p.resample.to_string());
                out.insert("jacobi_window", p.jacobi_window.to_string());
                out.insert("wavefront", p.wavefront.to_string());
            }
        }
        out
    }

    /// Checks every parameter; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ParamError> {
        use crate::limits as l;
        match self {
            Self::Ar => Ok(()),
            Self::Sd(p) => l::in_range("gamma", p.gamma, l::MAX_GAMMA),
            Self::Lantern(p) => {
                l::in_range("gamma", p.gamma, l::MAX_GAMMA)?;
                l::in_range("k", p.k, l::MAX_LANTERN_K)?;
                if !(0.0..=1.0).contains(&p.delta) {
                    return Err(ParamError::new(
                        "delta",
                        format!(
                            "must be in [0, 1] (probability mass of the neighbours), got {}",
                            p.delta
                        ),
                    ));
                }
                Ok(())
            }
            Self::Mulo(p) => {
                if !(0.0..=1.0).contains(&p.tau) {
                    return Err(ParamError::new(
                        "tau",
                        format!("must be in [0, 1], got {}", p.tau),
                    ));
                }
                l::in_range("pool_k", p.pool_k, l::MAX_POOL_K)?;
                l::in_range("block_rows", p.block_rows, l::MAX_BLOCK_ROWS)?;
                l::at_most("radius", p.radius, l::MAX_RADIUS)?;
                l::at_most("zipar_window", p.zipar_window, l::MAX_ZIPAR_WINDOW)?;
                l::at_most("jacobi_window", p.jacobi_window, l::MAX_JACOBI_WINDOW)?;
                l::at_most("wavefront", p.wavefront, l::MAX_WAVEFRONT)
            }
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())?;
        let params = self.params();
        if !params.is_empty() {
            let kv: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
            write!(f, ":{}", kv.join(","))?;
        }
        Ok(())
    }
}

/// What to resample after verifying one block (DESIGN §2.2 steps 4–5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResamplePlan {
    /// Block mask of the positions to resample (`R_X`).
    pub mask: Vec<bool>,
    /// Its 8-connected islands, each in raster order.
    pub islands: Vec<Vec<usize>>,
    /// Pass `t` queries these block positions (one per unfinished island).
    pub passes: Vec<Vec<usize>>,
}

impl ResamplePlan {
    /// Positions to resample.
    pub fn len(&self) -> usize {
        self.mask.iter().filter(|&&m| m).count()
    }

    /// True when every proposal stands.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Size of the largest island (= target passes spent resampling).
    pub fn largest_island(&self) -> usize {
        self.islands.iter().map(Vec::len).max().unwrap_or(0)
    }
}

/// The plan for a block whose proposals were judged `accepted` (block mask): local rejection
/// expands every rejected position by `radius`; raster rejection takes everything from the first
/// rejected position on, which forms one island resampled position by position.
pub fn plan_resample(
    block: &Block,
    accepted: &[bool],
    radius: usize,
    rejection: Rejection,
) -> ResamplePlan {
    let rejected: Vec<bool> = accepted.iter().map(|a| !a).collect();
    let mask = match rejection {
        Rejection::Local => expand(block, &rejected, radius),
        Rejection::Raster => raster_reject(&rejected),
    };
    let islands = match rejection {
        Rejection::Local => islands(block, &mask),
        // A raster suffix is resampled in raster order, one position per pass.
        Rejection::Raster => {
            let tail: Vec<usize> = (0..mask.len()).filter(|&i| mask[i]).collect();
            if tail.is_empty() {
                Vec::new()
            } else {
                vec![tail]
            }
        }
    };
    let passes = pass_schedule(&islands);
    ResamplePlan {
        mask,
        islands,
        passes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipeline_parses_and_defaults_alike_in_code_and_json() {
        let on = Method::parse("mulo").unwrap();
        assert!(matches!(on, Method::Mulo(p) if p.pipeline));
        let off = Method::parse("mulo:pipeline=0").unwrap();
        assert!(matches!(off, Method::Mulo(p) if !p.pipeline));
        assert!(off.to_string().contains("pipeline=0"), "{off}");
        assert_eq!(Method::parse(&off.to_string()).unwrap(), off);
        let e = Method::parse("mulo:pipeline=maybe")
            .unwrap_err()
            .to_string();
        assert!(e.contains("pipeline"), "{e}");
        // A report written before the field existed reads as the default.
        let old = r#"{"tau":0.1,"pool_k":4,"radius":1,"block_rows":2,"zipar_window":0,"rejection":"local"}"#;
        let p: MuloParams = serde_json::from_str(old).unwrap();
        assert_eq!(p.pipeline, MuloParams::default().pipeline);
        assert_eq!(p.resample, MuloParams::default().resample);
        assert_eq!(p.jacobi_window, MuloParams::default().jacobi_window);
        assert_eq!(p.wavefront, MuloParams::default().wavefront);
    }

    #[test]
    fn parse_sets_parameters_and_round_trips_through_display() {
        let m = Method::parse("mulo:tau=0.3, radius=2,rejection=raster").unwrap();
        let Method::Mulo(p) = m else { panic!("{m:?}") };
        assert_eq!((p.tau, p.radius, p.rejection), (0.3, 2, Rejection::Raster));
        assert_eq!(p.pool_k, MuloParams::default().pool_k);
        assert_eq!(Method::parse(&m.to_string()).unwrap(), m);
        assert_eq!(Method::parse("ar").unwrap(), Method::Ar);
        assert_eq!(Method::parse("ar").unwrap().to_string(), "ar");
        for name in METHOD_NAMES {
            let m = Method::default_for(name).unwrap();
            m.validate().unwrap();
            assert_eq!(Method::parse(&m.to_string()).unwrap(), m);
            assert_eq!(m.params().len(), m.keys().len());
        }
    }

    #[test]
    fn bad_input_names_the_field() {
        let cases = [
            ("mulo:tau=1.5", "tau"),
            ("mulo:tau=-0.1", "tau"),
            ("mulo:tau=x", "tau"),
            ("mulo:pool_k=0", "pool_k"),
            ("mulo:block_rows=0", "block_rows"),
            ("mulo:rejection=global", "rejection"),
            ("mulo:gamma=3", "parameter"),
            ("mulo:tau", "parameter"),
            ("sd:gamma=0", "gamma"),
            ("lantern:delta=3", "delta"),
            ("lantern:k=0", "k"),
            ("lantern:k=1025", "k"),
            ("mulo:pool_k=1025", "pool_k"),
            ("mulo:radius=9", "radius"),
            ("mulo:block_rows=65", "block_rows"),
            ("mulo:zipar_window=257", "zipar_window"),
            ("mulo:resample=parallel", "resample"),
            ("mulo:jacobi_window=4097", "jacobi_window"),
            ("mulo:jacobi_window=-1", "jacobi_window"),
            ("mulo:wavefront=4097", "wavefront"),
            ("mulo:wavefront=x", "wavefront"),
            ("sd:gamma=17", "gamma"),
            ("ar:tau=0.1", "parameter"),
            ("greedy", "method"),
        ];
        for (spec, field) in cases {
            let e = Method::parse(spec).unwrap_err();
            assert_eq!(e.field, field, "{spec}: {e}");
        }
        // The bounds themselves are accepted, and an error past one names it.
        Method::parse("mulo:pool_k=1024,radius=8,block_rows=64,zipar_window=256").unwrap();
        Method::parse("mulo:resample=sequential,jacobi_window=4096").unwrap();
        Method::parse("mulo:wavefront=4096").unwrap();
        Method::parse("lantern:k=1024,gamma=16").unwrap();
        let e = Method::parse("mulo:pool_k=100000").unwrap_err().to_string();
        assert!(e.contains("at most 1024"), "{e}");
        let e = Method::parse("mulo:gamma=3").unwrap_err().to_string();
        assert!(e.contains("tau") && e.contains("gamma"), "{e}");
    }

    #[test]
    fn plans_for_local_and_raster_rejection() {
        let b = Block {
            first_row: 0,
            rows: 2,
            cols: 4,
        };
        let mut acc = vec![true; 8];
        acc[5] = false; // row 1, col 1
        let local = plan_resample(&b, &acc, 1, Rejection::Local);
        let set: Vec<usize> = (0..8).filter(|&i| local.mask[i]).collect();
        assert_eq!(set, vec![0, 1, 2, 4, 5, 6]);
        assert_eq!(local.islands.len(), 1);
        assert_eq!(local.largest_island(), 6);
        let raster = plan_resample(&b, &acc, 1, Rejection::Raster);
        assert_eq!(raster.islands, vec![vec![5, 6, 7]]);
        assert_eq!(raster.passes.len(), 3);
        assert!(plan_resample(&b, &[true; 8], 3, Rejection::Local).is_empty());
        let none = plan_resample(&b, &[true; 8], 3, Rejection::Raster);
        assert!(none.is_empty() && none.passes.is_empty());
    }
}
