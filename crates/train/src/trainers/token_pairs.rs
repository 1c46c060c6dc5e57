//! Training data of the up-sampler: the same images tokenised at two resolutions by one VQ, read
//! from a `mulo data emoji` directory or a `mulo data images` set, and cached on disk so that a
//! resumed or repeated run does not tokenise again.
//!
//! The low-resolution image is the high-resolution one area-down-sampled by the scale (8-bit,
//! rounded), which is how the emoji set's 32 px copies are made from its 64 px images.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use mulo_model::VqModel;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::EmojiTensors;
use crate::data::emoji::{downsample, fnv1a, Split};
use crate::data::images::{ImageSetMeta, IndexEntry, IMAGES_META};
use crate::error::TrainError;

/// Cache of the tokens inside the work directory.
pub const PAIRS_FILE: &str = "token-pairs.safetensors";
/// What the cached tokens were made from.
const PAIRS_KEY_FILE: &str = "token-pairs.json";
/// Images tokenised per VQ call at 64 px and below; fewer for larger images (same pixel budget).
const CHUNK: usize = 128;

/// Images per VQ call for images of `side` pixels: 128 at 64 px, 2 at 512 px.
fn chunk_for(side: i64) -> usize {
    let budget = CHUNK as i64 * 64 * 64;
    (budget / (side * side).max(1)).clamp(1, CHUNK as i64) as usize
}

/// Tokens of every image at both resolutions, with the split.
#[derive(Debug)]
pub struct TokenPairs {
    /// `[N, g, g]` int32 codes at the low resolution.
    pub low: Tensor,
    /// `[N, g·s, g·s]` int32 codes at the high resolution.
    pub high: Tensor,
    /// Rows of training images.
    pub train: Vec<i64>,
    /// Rows of held-out images.
    pub heldout: Vec<i64>,
    /// "emoji" or "images": the kind of data set they came from.
    pub source: &'static str,
    /// Whether this call tokenised (false: read from the cache).
    pub tokenised: bool,
}

/// What to tokenise.
#[derive(Debug, Clone)]
pub struct PairSpec<'a> {
    /// A `mulo data emoji` or `mulo data images` directory.
    pub data: &'a Path,
    /// The VQ model directory (part of the cache key).
    pub vq_dir: &'a Path,
    /// Low-resolution token grid; `None`: the data's image size over the VQ's factor and the scale.
    pub low_grid: Option<i64>,
    /// 2 or 4.
    pub scale: i64,
    /// Directory of the cache.
    pub cache: &'a Path,
}

/// Everything the cached tokens depend on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PairsKey {
    data: PathBuf,
    /// Hash of the data set's metadata file.
    data_meta: u64,
    /// Name, size and modification time of every file of the data set (a rebuilt set differs).
    data_files: Vec<(String, u64, u128)>,
    vq: PathBuf,
    vq_files: Vec<(String, u64, u128)>,
    low_grid: i64,
    scale: i64,
}

/// The image source behind a data directory.
enum Source {
    Emoji(Box<EmojiTensors>),
    Set { dir: PathBuf, meta: ImageSetMeta },
}

fn bad(msg: impl Into<String>) -> TrainError {
    TrainError::Train(msg.into())
}

impl Source {
    fn open(dir: &Path) -> Result<(Self, String), TrainError> {
        if dir.join("emoji.safetensors").exists() {
            let meta = std::fs::read_to_string(dir.join("meta.json")).unwrap_or_default();
            return Ok((Self::Emoji(Box::new(EmojiTensors::load(dir)?)), meta));
        }
        let path = dir.join(IMAGES_META);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            bad(format!(
                "{}: neither a `mulo data emoji` nor a `mulo data images` directory ({e})",
                dir.display()
            ))
        })?;
        let meta: ImageSetMeta =
            serde_json::from_str(&text).map_err(|e| bad(format!("{}: {e}", path.display())))?;
        let dir = dir.to_path_buf();
        Ok((Self::Set { dir, meta }, text))
    }

    /// Side of the stored images in pixels.
    fn size(&self) -> i64 {
        match self {
            Self::Emoji(_) => 64,
            Self::Set { meta, .. } => i64::from(meta.size),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Emoji(_) => "emoji",
            Self::Set { .. } => "images",
        }
    }

    /// (train rows, held-out rows).
    fn splits(&self) -> Result<(Vec<i64>, Vec<i64>), TrainError> {
        let split_rows = |splits: Vec<Split>| {
            let rows = |s: Split| {
                let it = splits.iter().enumerate().filter(move |(_, &x)| x == s);
                it.map(|(i, _)| i as i64).collect::<Vec<_>>()
            };
            (rows(Split::Train), rows(Split::Heldout))
        };
        match self {
            Self::Emoji(e) => Ok((e.train_rows()?, e.indices(Split::Heldout))),
            Self::Set { dir, .. } => Ok(split_rows(read_splits(dir)?)),
        }
    }

    /// Calls `each(high, low)` with u8 NHWC images of `hi` and `hi / scale` px, in row order.
    fn for_each_chunk(
        &self,
        hi: i64,
        scale: i64,
        each: &mut dyn FnMut(Tensor, Tensor) -> Result<(), TrainError>,
    ) -> Result<(), TrainError> {
        match self {
            Self::Emoji(e) => {
                let n = e.images64.size()[0];
                let chunk = chunk_for(hi);
                for start in (0..n).step_by(chunk) {
                    let len = chunk.min((n - start) as usize) as i64;
                    let pick = |size: i64| -> Result<Tensor, TrainError> {
                        let t = match size {
                            64 => &e.images64,
                            32 => &e.images32,
                            16 => &e.images16,
                            _ => return Err(bad(format!("the emoji set has no {size} px images"))),
                        };
                        Ok(t.narrow(0, start, len))
                    };
                    each(pick(hi)?, pick(hi / scale)?)?;
                }
                Ok(())
            }
            Self::Set { dir, meta } => {
                for shard in &meta.shards {
                    let images = read_shard(&dir.join(&shard.file))?;
                    let n = images.size()[0];
                    let step = chunk_for(i64::from(meta.size));
                    for start in (0..n).step_by(step) {
                        let len = step.min((n - start) as usize) as i64;
                        let chunk = images.narrow(0, start, len);
                        let high = area_downsample(&chunk, i64::from(meta.size) / hi)?;
                        let low = area_downsample(&high, scale)?;
                        each(high, low)?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// The `split` of every line of an image set's `index.jsonl`, in order.
fn read_splits(dir: &Path) -> Result<Vec<Split>, TrainError> {
    let path = dir.join("index.jsonl");
    let file = std::fs::File::open(&path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| bad(format!("{}: {e}", path.display())))?;
        let entry: IndexEntry = serde_json::from_str(&line)
            .map_err(|e| bad(format!("{} line {}: {e}", path.display(), i + 1)))?;
        out.push(entry.split);
    }
    Ok(out)
}

fn read_shard(path: &Path) -> Result<Tensor, TrainError> {
    let tensors =
        Tensor::read_safetensors(path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
    let images = tensors.into_iter().find(|(n, _)| n == "images");
    images
        .map(|(_, t)| t)
        .ok_or_else(|| bad(format!("{}: no tensor 'images'", path.display())))
}

/// u8 NHWC images area-down-sampled by `factor` (rounded like the emoji set's copies).
fn area_downsample(images: &Tensor, factor: i64) -> Result<Tensor, TrainError> {
    if factor == 1 {
        return Ok(images.shallow_clone());
    }
    let s = images.size();
    let (n, side) = (s[0], s[1] as usize);
    let px = Vec::<u8>::try_from(images.contiguous().reshape([-1]))?;
    let per = side * side * 3;
    let out: Vec<u8> = px
        .chunks(per)
        .flat_map(|img| downsample(img, side, factor as usize))
        .collect();
    let o = side as i64 / factor;
    Ok(Tensor::from_slice(&out).reshape([n, o, o, 3]))
}

/// u8 NHWC in [0, 255] to float NCHW in [-1, 1] on `device`.
fn to_model_input(images: &Tensor, device: Device) -> Tensor {
    images
        .to_device(device)
        .permute([0, 3, 1, 2])
        .to_kind(Kind::Float)
        .g_div_scalar(127.5)
        .g_sub_scalar(1.0)
}

/// The grid and pixel sides: (low grid, high pixels), checked against the data and the VQ.
fn geometry(spec: &PairSpec, size: i64, factor: i64) -> Result<(i64, i64), TrainError> {
    if !matches!(spec.scale, 2 | 4) {
        return Err(bad(format!("scale must be 2 or 4, got {}", spec.scale)));
    }
    let low_grid = spec.low_grid.unwrap_or(size / factor / spec.scale);
    let hi = low_grid * spec.scale * factor;
    if low_grid < 1 || hi > size || size % hi != 0 {
        return Err(bad(format!(
            "a low grid of {low_grid} at scale {} needs {hi} px images (VQ factor {factor}); the data set's are {size} px: rebuild it with `mulo data images --size {hi}` or pick a grid whose image side divides {size}",
            spec.scale
        )));
    }
    Ok((low_grid, hi))
}

/// Name, size and modification time (ns) of each file in `dir`.
fn file_list(dir: &Path) -> Result<Vec<(String, u64, u128)>, TrainError> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| bad(format!("{}: {e}", dir.display())))?;
    for entry in entries.flatten() {
        let Ok(md) = entry.metadata() else { continue };
        let mtime = md
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        out.push((
            entry.file_name().to_string_lossy().into_owned(),
            md.len(),
            mtime,
        ));
    }
    out.sort();
    Ok(out)
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Tokens of the data set at both resolutions: from the cache when it was made from the same
/// data, VQ, grid and scale, else tokenised with `vq` on `device` and cached.
pub fn token_pairs(
    spec: &PairSpec,
    vq: &VqModel,
    device: Device,
) -> Result<TokenPairs, TrainError> {
    let (source, data_meta) = Source::open(spec.data)?;
    let factor = vq.config().downsample_factor();
    let (low_grid, hi) = geometry(spec, source.size(), factor)?;
    let (train, heldout) = source.splits()?;
    let key = PairsKey {
        data: canonical(spec.data),
        data_meta: fnv1a(&data_meta),
        data_files: file_list(spec.data)?,
        vq: canonical(spec.vq_dir),
        vq_files: file_list(spec.vq_dir)?,
        low_grid,
        scale: spec.scale,
    };
    let source_kind = source.kind();
    if let Some((low, high)) = read_cache(spec.cache, &key) {
        let tokenised = false;
        return Ok(TokenPairs {
            low,
            high,
            train,
            heldout,
            source: source_kind,
            tokenised,
        });
    }
    let (mut lows, mut highs) = (Vec::new(), Vec::new());
    tch::no_grad(|| {
        source.for_each_chunk(hi, spec.scale, &mut |high, low| {
            let t = |img: &Tensor| -> Result<Tensor, TrainError> {
                let side = img.size()[1] / factor;
                let codes = vq.encode(&to_model_input(img, device))?;
                Ok(codes
                    .to_device(Device::Cpu)
                    .to_kind(Kind::Int)
                    .reshape([-1, side, side]))
            };
            highs.push(t(&high)?);
            lows.push(t(&low)?);
            Ok(())
        })
    })?;
    let (low, high) = (Tensor::cat(&lows, 0), Tensor::cat(&highs, 0));
    let n = low.size()[0] as usize;
    if n != train.len() + heldout.len() {
        return Err(bad(format!(
            "{}: {n} images but {} index entries",
            spec.data.display(),
            train.len() + heldout.len()
        )));
    }
    write_cache(spec.cache, &key, &low, &high)?;
    Ok(TokenPairs {
        low,
        high,
        train,
        heldout,
        source: source_kind,
        tokenised: true,
    })
}

fn read_cache(dir: &Path, key: &PairsKey) -> Option<(Tensor, Tensor)> {
    let text = std::fs::read_to_string(dir.join(PAIRS_KEY_FILE)).ok()?;
    let cached: PairsKey = serde_json::from_str(&text).ok()?;
    if &cached != key {
        return None;
    }
    let tensors = Tensor::read_safetensors(dir.join(PAIRS_FILE)).ok()?;
    let get = |name: &str| {
        tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.shallow_clone())
    };
    Some((get("low")?, get("high")?))
}

/// Writes the tokens, then the key (a cache without its key is never read).
fn write_cache(dir: &Path, key: &PairsKey, low: &Tensor, high: &Tensor) -> Result<(), TrainError> {
    let io = |e: std::io::Error| bad(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let _ = std::fs::remove_file(dir.join(PAIRS_KEY_FILE));
    let tmp = dir.join(format!("{PAIRS_FILE}.tmp"));
    Tensor::write_safetensors(&[("low", low), ("high", high)], &tmp)?;
    std::fs::rename(&tmp, dir.join(PAIRS_FILE)).map_err(io)?;
    let text = serde_json::to_string_pretty(key).map_err(|e| bad(e.to_string()))?;
    std::fs::write(dir.join(PAIRS_KEY_FILE), text).map_err(io)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn area_downsample_matches_the_emoji_rule() {
        let px: Vec<u8> = (0..2 * 4 * 4 * 3).map(|i| (i * 37 % 256) as u8).collect();
        let t = Tensor::from_slice(&px).reshape([2, 4, 4, 3]);
        let got = Vec::<u8>::try_from(area_downsample(&t, 2).unwrap().reshape([-1])).unwrap();
        let want: Vec<u8> = px
            .chunks(48)
            .flat_map(|img| downsample(img, 4, 2))
            .collect();
        assert_eq!(got, want);
        assert_eq!(area_downsample(&t, 4).unwrap().size(), vec![2, 1, 1, 3]);
    }

    #[test]
    fn chunks_shrink_with_the_image_side() {
        assert_eq!(chunk_for(32), 128);
        assert_eq!(chunk_for(64), 128);
        assert_eq!(chunk_for(256), 8);
        assert_eq!(chunk_for(512), 2);
        assert_eq!(chunk_for(4096), 1);
    }

    #[test]
    fn geometry_defaults_and_refusals() {
        let spec = |low_grid, scale| PairSpec {
            data: Path::new("d"),
            vq_dir: Path::new("v"),
            low_grid,
            scale,
            cache: Path::new("c"),
        };
        assert_eq!(geometry(&spec(None, 2), 64, 4).unwrap(), (8, 64));
        assert_eq!(geometry(&spec(None, 4), 64, 4).unwrap(), (4, 64));
        assert_eq!(geometry(&spec(Some(4), 2), 64, 4).unwrap(), (4, 32));
        let e = geometry(&spec(Some(3), 2), 64, 4).unwrap_err().to_string();
        assert!(
            e.contains("needs 24 px images") && e.contains("--size 24"),
            "{e}"
        );
        assert!(geometry(&spec(Some(16), 2), 64, 4).is_err());
        assert!(geometry(&spec(None, 3), 64, 4)
            .unwrap_err()
            .to_string()
            .contains("2 or 4"));
    }
}
