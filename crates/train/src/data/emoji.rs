//! The emoji data set (DESIGN §4): Noto (google) and Twemoji (twitter) 64×64 PNGs from the npm
//! packages `emoji-datasource-<vendor>@16.0.0`, composited on white, with area down-sampled copies at
//! 32 and 16 px, captions, category / subcategory labels and a deterministic held-out split.
//!
//! Output directory: `emoji.safetensors` (`images64` `[N, 64, 64, 3]`, `images32`, `images16`, u8 RGB)
//! and `meta.json` ([`Meta`]). Images are never committed to the repository.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// Version of the npm packages the data set is built from.
pub const EMOJI_VERSION: &str = "16.0.0";
/// Vendors whose images are used, in item order.
pub const VENDORS: [&str; 2] = ["google", "twitter"];
/// One in this many base emojis (by a hash of its code point sequence) is held out.
pub const HELDOUT_EVERY: u64 = 10;
/// Side lengths of the stored images.
pub const SIZES: [usize; 3] = [64, 32, 16];

/// Errors of the data set builder; each names the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// An input is not what the builder expects.
    #[error("{file}: {message}")]
    Corrupt {
        /// The file (a tarball, or `tarball:entry`).
        file: String,
        /// What is wrong.
        message: String,
    },
    /// Fetching a package with npm failed.
    #[error("npm pack {package}: {message}")]
    Npm {
        /// The package.
        package: String,
        /// What went wrong.
        message: String,
    },
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Which part of the data an item belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Used for training.
    Train,
    /// Never trained on: evaluation only.
    Heldout,
}

/// One image of the data set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Item {
    /// Row in the image tensors.
    pub index: usize,
    /// `google` or `twitter`.
    pub vendor: String,
    /// Code points of this image (a skin-tone variation has its own).
    pub unified: String,
    /// Code points of the base emoji (shared by its variations; decides the split).
    pub base: String,
    /// The emoji's name as in `emoji.json` (absent in data sets built before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Caption: lower-case words of the name, short names, subcategory and skin tone.
    pub caption: String,
    /// Category label as in `emoji.json`.
    pub category: String,
    /// Subcategory label as in `emoji.json`.
    pub subcategory: String,
    /// Index into [`Meta::categories`].
    pub category_id: usize,
    /// Index into [`Meta::subcategories`].
    pub subcategory_id: usize,
    /// Skin tone words of a variation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skin_tone: Option<String>,
    /// Train or held-out.
    pub split: Split,
}

/// `meta.json` of a built data set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    /// npm package version.
    pub version: String,
    /// Vendors used.
    pub vendors: Vec<String>,
    /// Sorted category labels.
    pub categories: Vec<String>,
    /// Sorted subcategory labels.
    pub subcategories: Vec<String>,
    /// Every image, in tensor row order.
    pub items: Vec<Item>,
}

impl Meta {
    /// The image whose emoji name is `prompt` (case-insensitive; skin-tone variations left out).
    pub fn named(&self, prompt: &str) -> Option<&Item> {
        let prompt = prompt.trim();
        self.items.iter().find(|it| {
            it.skin_tone.is_none()
                && it
                    .name
                    .as_deref()
                    .is_some_and(|n| lower(n).eq(lower(prompt)))
        })
    }

    /// Reads `<dir>/meta.json`.
    pub fn load(dir: &Path) -> Result<Self, DataError> {
        let path = dir.join("meta.json");
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        serde_json::from_str(&text).map_err(|e| DataError::Corrupt {
            file: path.display().to_string(),
            message: e.to_string(),
        })
    }
}

/// The characters of `s` lower-cased, without allocating.
fn lower(s: &str) -> impl Iterator<Item = char> + '_ {
    s.chars().flat_map(char::to_lowercase)
}

#[derive(Debug, Deserialize)]
struct RawVariation {
    unified: String,
    image: String,
    #[serde(flatten)]
    rest: HashMap<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct RawEmoji {
    #[serde(default)]
    name: Option<String>,
    unified: String,
    image: String,
    #[serde(default)]
    short_names: Vec<String>,
    category: String,
    subcategory: String,
    #[serde(default)]
    skin_variations: Option<BTreeMap<String, RawVariation>>,
    #[serde(flatten)]
    rest: HashMap<String, serde_json::Value>,
}

fn has_image(rest: &HashMap<String, serde_json::Value>, vendor: &str) -> bool {
    rest.get(&format!("has_img_{vendor}"))
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false)
}

/// Words of a skin-tone key such as `1F3FB` or `1F3FB-1F3FF`.
fn tone_words(key: &str) -> String {
    let names: Vec<&str> = key
        .split('-')
        .map(|c| match c.to_ascii_uppercase().as_str() {
            "1F3FB" => "light",
            "1F3FC" => "medium-light",
            "1F3FD" => "medium",
            "1F3FE" => "medium-dark",
            "1F3FF" => "dark",
            _ => "other",
        })
        .collect();
    let mut uniq: Vec<&str> = Vec::new();
    for n in names {
        if !uniq.contains(&n) {
            uniq.push(n);
        }
    }
    format!("{} skin tone", uniq.join(" and "))
}

fn words(s: &str) -> impl Iterator<Item = String> + '_ {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
}

/// Caption of an emoji: distinct lower-case words of its name, short names, subcategory and tone.
pub fn caption(
    name: &str,
    short_names: &[String],
    subcategory: &str,
    tone: Option<&str>,
) -> String {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let parts = std::iter::once(name)
        .chain(short_names.iter().map(String::as_str))
        .chain(std::iter::once(subcategory))
        .chain(tone);
    for part in parts {
        for w in words(part) {
            if seen.insert(w.clone()) {
                out.push(w);
            }
        }
    }
    out.join(" ")
}

/// Evaluation prompts: one `(prompt, category, subcategory)` per held-out base emoji plus as many
/// training base emoji (every k-th in data set order), the prompt being the emoji's lower-case
/// name; skin-tone variations are left out. The list is ordered by a stable hash of the prompt so
/// that any prefix mixes categories and splits.
pub fn eval_prompts(meta: &Meta) -> Result<Vec<(String, String, String)>, DataError> {
    let mut seen = BTreeSet::new();
    let mut held = Vec::new();
    let mut train = Vec::new();
    for it in meta.items.iter().filter(|i| i.skin_tone.is_none()) {
        if !seen.insert(it.base.clone()) {
            continue;
        }
        let name = it.name.as_deref().ok_or_else(|| DataError::Corrupt {
            file: "meta.json".into(),
            message: "items carry no names: rebuild the data set with `mulo data emoji`".into(),
        })?;
        let row = (
            name.to_lowercase(),
            it.category.clone(),
            it.subcategory.clone(),
        );
        match it.split {
            Split::Heldout => held.push(row),
            Split::Train => train.push(row),
        }
    }
    let every = (train.len() / held.len().max(1)).max(1);
    let mut out: Vec<_> = held
        .into_iter()
        .chain(train.into_iter().step_by(every))
        .collect();
    out.sort_by_key(|r| (fnv1a(&r.0), r.0.clone()));
    out.dedup_by(|a, b| a.0 == b.0);
    Ok(out)
}

/// 64-bit FNV-1a: a stable hash for the split.
pub(crate) fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The split of a base emoji.
pub fn split_of(base: &str) -> Split {
    if fnv1a(&base.to_ascii_lowercase()).is_multiple_of(HELDOUT_EVERY) {
        Split::Heldout
    } else {
        Split::Train
    }
}

/// The cached tarball of `vendor`, fetched with `npm pack` into `cache` when absent.
pub fn fetch_tarball(vendor: &str, cache: &Path) -> Result<PathBuf, DataError> {
    let package = format!("emoji-datasource-{vendor}@{EMOJI_VERSION}");
    let path = cache.join(format!("emoji-datasource-{vendor}-{EMOJI_VERSION}.tgz"));
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(cache).map_err(io(cache))?;
    let out = Command::new("npm")
        .args(["pack", &package, "--pack-destination"])
        .arg(cache)
        .output()
        .map_err(|e| DataError::Npm {
            package: package.clone(),
            message: format!("cannot run npm: {e}"),
        })?;
    if !out.status.success() || !path.is_file() {
        return Err(DataError::Npm {
            package,
            message: String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("failed")
                .to_string(),
        });
    }
    Ok(path)
}

/// The files of one tarball the builder needs: `emoji.json` and the 64 px PNGs by file name.
struct Package {
    emoji_json: Vec<u8>,
    images: HashMap<String, Vec<u8>>,
}

fn read_package(tarball: &Path, vendor: &str) -> Result<Package, DataError> {
    let file = std::fs::File::open(tarball).map_err(io(tarball))?;
    let corrupt = |message: String| DataError::Corrupt {
        file: tarball.display().to_string(),
        message,
    };
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let prefix = format!("package/img/{vendor}/64/");
    let mut emoji_json = None;
    let mut images = HashMap::new();
    let entries = archive
        .entries()
        .map_err(|e| corrupt(format!("not a gzipped tarball: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| corrupt(format!("unreadable entry: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| corrupt(format!("bad entry name: {e}")))?
            .to_string_lossy()
            .into_owned();
        let wanted = path == "package/emoji.json" || path.starts_with(&prefix);
        if !wanted {
            continue;
        }
        let mut bytes = Vec::new();
        entry
            .read_to_end(&mut bytes)
            .map_err(|e| corrupt(format!("{path}: {e}")))?;
        if path == "package/emoji.json" {
            emoji_json = Some(bytes);
        } else if let Some(name) = path.strip_prefix(&prefix) {
            images.insert(name.to_string(), bytes);
        }
    }
    let emoji_json = emoji_json.ok_or_else(|| corrupt("has no package/emoji.json".into()))?;
    if images.is_empty() {
        return Err(corrupt(format!("has no images under {prefix}")));
    }
    Ok(Package { emoji_json, images })
}

/// Decodes a 64×64 PNG and composites it on white: `[64, 64, 3]` u8.
fn composite(bytes: &[u8], what: &str) -> Result<Vec<u8>, DataError> {
    let img = image::load_from_memory_with_format(bytes, image::ImageFormat::Png).map_err(|e| {
        DataError::Corrupt {
            file: what.to_string(),
            message: format!("not a readable PNG: {e}"),
        }
    })?;
    if img.width() != 64 || img.height() != 64 {
        return Err(DataError::Corrupt {
            file: what.to_string(),
            message: format!("is {}x{}, expected 64x64", img.width(), img.height()),
        });
    }
    let rgba = img.to_rgba8();
    let mut out = Vec::with_capacity(64 * 64 * 3);
    for p in rgba.pixels() {
        let a = f32::from(p[3]) / 255.0;
        for c in 0..3 {
            let v = f32::from(p[c]) * a + 255.0 * (1.0 - a);
            out.push(v.round().clamp(0.0, 255.0) as u8);
        }
    }
    Ok(out)
}

/// Area down-sampling of a square RGB image of side `n` by `factor`.
pub fn downsample(img: &[u8], n: usize, factor: usize) -> Vec<u8> {
    let m = n / factor;
    let mut out = Vec::with_capacity(m * m * 3);
    let area = (factor * factor) as f32;
    for y in 0..m {
        for x in 0..m {
            for c in 0..3 {
                let mut sum = 0.0f32;
                for dy in 0..factor {
                    for dx in 0..factor {
                        sum += f32::from(img[((y * factor + dy) * n + x * factor + dx) * 3 + c]);
                    }
                }
                out.push((sum / area).round() as u8);
            }
        }
    }
    out
}

/// What a build produced.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Images per vendor.
    pub per_vendor: BTreeMap<String, usize>,
    /// Training images.
    pub train: usize,
    /// Held-out images.
    pub heldout: usize,
    /// Category count.
    pub categories: usize,
    /// Subcategory count.
    pub subcategories: usize,
}

/// Builds the data set from `(vendor, tarball)` pairs into `out`. The category `Component` (skin
/// tone swatches and hair parts, not pictures) is left out.
pub fn build(sources: &[(String, PathBuf)], out: &Path) -> Result<Summary, DataError> {
    struct Pending {
        vendor: String,
        unified: String,
        base: String,
        name: String,
        caption: String,
        category: String,
        subcategory: String,
        skin_tone: Option<String>,
        pixels: Vec<u8>,
    }
    let mut pending = Vec::new();
    for (vendor, tarball) in sources {
        let pkg = read_package(tarball, vendor)?;
        let emojis: Vec<RawEmoji> =
            serde_json::from_slice(&pkg.emoji_json).map_err(|e| DataError::Corrupt {
                file: format!("{}:package/emoji.json", tarball.display()),
                message: e.to_string(),
            })?;
        let mut emojis = emojis;
        emojis.sort_by(|a, b| a.unified.cmp(&b.unified));
        for e in &emojis {
            if e.category == "Component" {
                continue;
            }
            let name = e.name.clone().unwrap_or_else(|| e.short_names.join(" "));
            let mut images = vec![(
                e.unified.clone(),
                e.image.clone(),
                None,
                has_image(&e.rest, vendor),
            )];
            for (key, v) in e.skin_variations.iter().flatten() {
                images.push((
                    v.unified.clone(),
                    v.image.clone(),
                    Some(tone_words(key)),
                    has_image(&v.rest, vendor),
                ));
            }
            for (unified, file, tone, has) in images {
                if !has {
                    continue;
                }
                let what = format!("{}:package/img/{vendor}/64/{file}", tarball.display());
                let bytes = pkg.images.get(&file).ok_or_else(|| DataError::Corrupt {
                    file: what.clone(),
                    message: "listed in emoji.json but missing from the package".into(),
                })?;
                pending.push(Pending {
                    vendor: vendor.clone(),
                    unified,
                    base: e.unified.clone(),
                    name: name.clone(),
                    caption: caption(&name, &e.short_names, &e.subcategory, tone.as_deref()),
                    category: e.category.clone(),
                    subcategory: e.subcategory.clone(),
                    skin_tone: tone,
                    pixels: composite(bytes, &what)?,
                });
            }
        }
    }
    let categories: Vec<String> = pending
        .iter()
        .map(|p| p.category.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let subcategories: Vec<String> = pending
        .iter()
        .map(|p| p.subcategory.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut planes: Vec<Vec<u8>> = SIZES.iter().map(|_| Vec::new()).collect();
    let mut items = Vec::with_capacity(pending.len());
    for (index, p) in pending.into_iter().enumerate() {
        for (plane, &size) in planes.iter_mut().zip(&SIZES) {
            plane.extend(downsample(&p.pixels, 64, 64 / size));
        }
        items.push(Item {
            index,
            category_id: categories.binary_search(&p.category).unwrap_or(0),
            subcategory_id: subcategories.binary_search(&p.subcategory).unwrap_or(0),
            split: split_of(&p.base),
            vendor: p.vendor,
            unified: p.unified,
            base: p.base,
            name: Some(p.name),
            caption: p.caption,
            category: p.category,
            subcategory: p.subcategory,
            skin_tone: p.skin_tone,
        });
    }
    std::fs::create_dir_all(out).map_err(io(out))?;
    let n = items.len();
    let names: Vec<String> = SIZES.iter().map(|s| format!("images{s}")).collect();
    let mut views = Vec::new();
    for ((plane, &size), name) in planes.iter().zip(&SIZES).zip(&names) {
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::U8,
            vec![n, size, size, 3],
            plane,
        )
        .map_err(|e| DataError::Corrupt {
            file: name.clone(),
            message: format!("{e:?}"),
        })?;
        views.push((name.clone(), view));
    }
    let tensors_path = out.join("emoji.safetensors");
    safetensors::serialize_to_file(views, &None, &tensors_path).map_err(|e| {
        DataError::Corrupt {
            file: tensors_path.display().to_string(),
            message: format!("cannot write: {e:?}"),
        }
    })?;
    let mut per_vendor = BTreeMap::new();
    for it in &items {
        *per_vendor.entry(it.vendor.clone()).or_insert(0) += 1;
    }
    let heldout = items.iter().filter(|i| i.split == Split::Heldout).count();
    let meta = Meta {
        version: EMOJI_VERSION.to_string(),
        vendors: sources.iter().map(|(v, _)| v.clone()).collect(),
        categories,
        subcategories,
        items,
    };
    let meta_path = out.join("meta.json");
    let text = serde_json::to_string_pretty(&meta).map_err(|e| DataError::Corrupt {
        file: meta_path.display().to_string(),
        message: e.to_string(),
    })?;
    std::fs::write(&meta_path, text).map_err(io(&meta_path))?;
    Ok(Summary {
        per_vendor,
        train: n - heldout,
        heldout,
        categories: meta.categories.len(),
        subcategories: meta.subcategories.len(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn item(index: usize, name: &str, skin_tone: Option<&str>) -> Item {
        Item {
            index,
            vendor: "google".into(),
            unified: format!("{index:04X}"),
            base: "0001".into(),
            name: Some(name.into()),
            caption: name.to_lowercase(),
            category: "Flags".into(),
            subcategory: "country-flag".into(),
            category_id: 0,
            subcategory_id: 0,
            skin_tone: skin_tone.map(Into::into),
            split: Split::Train,
        }
    }

    #[test]
    fn named_ignores_case_and_skin_tone_variations() {
        let meta = Meta {
            version: "0".into(),
            vendors: vec!["google".into()],
            categories: vec!["Flags".into()],
            subcategories: vec!["country-flag".into()],
            items: vec![
                item(0, "waving hand", Some("medium skin tone")),
                item(1, "waving hand", None),
                item(2, "flag: Côte d’Ivoire", None),
            ],
        };
        assert_eq!(meta.named(" Waving Hand ").unwrap().index, 1);
        assert_eq!(meta.named("FLAG: CÔTE D’IVOIRE").unwrap().index, 2);
        assert!(meta.named("waving").is_none());
        assert!(meta.named("waving hands").is_none());
    }
}
