//! `mulo data images`: any folder of PNG / JPEG images (searched recursively) as a square RGB data
//! set for the up-sampler and other trainers, streamed to disk in shards.
//!
//! Output directory:
//! - `images-00000.safetensors`, ...: `images` `[n, S, S, 3]` u8 RGB, at most `shard_size` each;
//! - `index.jsonl`: one line per image in shard order, `{"file", "caption", "split"}` (`file`
//!   relative to the input folder, `caption` null without a captions file);
//! - `meta.json`: `{"kind": "images", "size", "count", "shards": [{"file", "count"}], "train",
//!   "heldout", "skipped": [{"file", "error"}]}`.
//!
//! Each image is composited on white (transparency), centre-cropped to a square (`Fit::Crop`) or
//! padded with white (`Fit::Pad`), and resized with a Lanczos filter. An unreadable image is skipped
//! and listed, never fatal. About one image in twenty is held out, chosen by a hash of its path.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};

use super::emoji::{fnv1a, io, DataError, Split};

/// Name of the metadata file of an image set.
pub const IMAGES_META: &str = "meta.json";
/// Held out: paths whose hash is a multiple of this.
const HELDOUT_EVERY: u64 = 20;

/// How a non-square image becomes square.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fit {
    /// Keep the central square.
    Crop,
    /// Pad the short side with white.
    Pad,
}

/// Options of [`build_image_set`].
#[derive(Debug, Clone)]
pub struct ImageSetOptions {
    /// Input folder (searched recursively for .png, .jpg, .jpeg).
    pub dir: PathBuf,
    /// Optional JSONL of `{"file": ..., "caption": ...}`, `file` relative to `dir`.
    pub captions: Option<PathBuf>,
    /// Side of the output images in pixels.
    pub size: u32,
    /// Output directory.
    pub out: PathBuf,
    /// Squaring.
    pub fit: Fit,
    /// Images per shard.
    pub shard_size: usize,
}

/// One shard of the set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Shard {
    /// File name inside the set directory.
    pub file: String,
    /// Images in it.
    pub count: usize,
}

/// An image that could not be used.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Skipped {
    /// Path relative to the input folder.
    pub file: String,
    /// Why.
    pub error: String,
}

/// `meta.json` of an image set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageSetMeta {
    /// Always "images".
    pub kind: String,
    /// Side in pixels.
    pub size: u32,
    /// Images written.
    pub count: usize,
    /// Shards in order.
    pub shards: Vec<Shard>,
    /// Training images.
    pub train: usize,
    /// Held-out images.
    pub heldout: usize,
    /// Images skipped.
    pub skipped: Vec<Skipped>,
}

/// One line of `index.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexEntry {
    /// Path relative to the input folder.
    pub file: String,
    /// Caption, if a captions file gave one.
    pub caption: Option<String>,
    /// Train or held out.
    pub split: Split,
}

fn corrupt(file: impl Into<String>, message: impl Into<String>) -> DataError {
    DataError::Corrupt {
        file: file.into(),
        message: message.into(),
    }
}

/// Every image file under `dir`, relative paths sorted.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(io(&d))? {
            let path = entry.map_err(io(&d))?.path();
            if path.is_dir() {
                stack.push(path);
            } else if is_image(&path) {
                out.push(path.strip_prefix(dir).unwrap_or(&path).to_path_buf());
            }
        }
    }
    out.sort();
    Ok(out)
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
}

/// Reads a captions JSONL into `file → caption`; a malformed line is an error naming it.
pub fn read_captions(path: &Path) -> Result<HashMap<String, String>, DataError> {
    #[derive(Deserialize)]
    struct Line {
        file: String,
        caption: String,
    }
    let f = std::fs::File::open(path).map_err(io(path))?;
    let mut out = HashMap::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(io(path))?;
        if line.trim().is_empty() {
            continue;
        }
        let l: Line = serde_json::from_str(&line).map_err(|e| {
            corrupt(
                format!("{}:{}", path.display(), i + 1),
                format!("expected {{\"file\": ..., \"caption\": ...}}: {e}"),
            )
        })?;
        out.insert(l.file, l.caption);
    }
    Ok(out)
}

/// Decodes an image, composites it on white, squares and resizes it: `size² × 3` u8.
pub fn load_square(path: &Path, size: u32, fit: Fit) -> Result<Vec<u8>, String> {
    let img = image::open(path).map_err(|e| e.to_string())?;
    let rgba = img.to_rgba8();
    let (w, h) = rgba.dimensions();
    if w == 0 || h == 0 {
        return Err("empty image".into());
    }
    let rgb = RgbImage::from_fn(w, h, |x, y| {
        let p = rgba.get_pixel(x, y);
        let a = f32::from(p[3]) / 255.0;
        let c = |v: u8| {
            (f32::from(v) * a + 255.0 * (1.0 - a))
                .round()
                .clamp(0.0, 255.0) as u8
        };
        Rgb([c(p[0]), c(p[1]), c(p[2])])
    });
    let side = match fit {
        Fit::Crop => w.min(h),
        Fit::Pad => w.max(h),
    };
    let mut square = RgbImage::from_pixel(side, side, Rgb([255, 255, 255]));
    let (dx, dy) = (
        (i64::from(side) - i64::from(w)) / 2,
        (i64::from(side) - i64::from(h)) / 2,
    );
    image::imageops::replace(&mut square, &rgb, dx, dy);
    let out = image::imageops::resize(&square, size, size, FilterType::Lanczos3);
    Ok(out.into_raw())
}

fn write_shard(
    out: &Path,
    index: usize,
    pixels: &[u8],
    count: usize,
    size: u32,
) -> Result<Shard, DataError> {
    let file = format!("images-{index:05}.safetensors");
    let s = size as usize;
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![count, s, s, 3], pixels)
            .map_err(|e| corrupt(&file, format!("{e:?}")))?;
    let path = out.join(&file);
    safetensors::serialize_to_file(vec![("images", view)], &None, &path)
        .map_err(|e| corrupt(path.display().to_string(), format!("cannot write: {e:?}")))?;
    Ok(Shard { file, count })
}

/// Builds the image set; `progress(done, total)` after each file. Returns its metadata.
pub fn build_image_set(
    o: &ImageSetOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ImageSetMeta, DataError> {
    if o.size < 8 || o.shard_size == 0 {
        return Err(corrupt(
            "options",
            "size must be at least 8 and shard size at least 1",
        ));
    }
    let files = list_images(&o.dir)?;
    if files.is_empty() {
        return Err(corrupt(
            o.dir.display().to_string(),
            "no .png, .jpg or .jpeg files",
        ));
    }
    let captions = o.captions.as_deref().map(read_captions).transpose()?;
    std::fs::create_dir_all(&o.out).map_err(io(&o.out))?;
    // A set is whole only once its meta.json is written: an earlier one goes first, so a build
    // that fails part-way never leaves new shards described by an old meta.json.
    let meta_path = o.out.join(IMAGES_META);
    if meta_path.exists() {
        std::fs::remove_file(&meta_path).map_err(io(&meta_path))?;
    }
    let index_path = o.out.join("index.jsonl");
    let mut index =
        std::io::BufWriter::new(std::fs::File::create(&index_path).map_err(io(&index_path))?);
    let mut meta = ImageSetMeta {
        kind: "images".into(),
        size: o.size,
        count: 0,
        shards: Vec::new(),
        train: 0,
        heldout: 0,
        skipped: Vec::new(),
    };
    let (mut pixels, mut in_shard) = (Vec::new(), 0usize);
    for (i, rel) in files.iter().enumerate() {
        let name = rel.to_string_lossy().replace('\\', "/");
        match load_square(&o.dir.join(rel), o.size, o.fit) {
            Ok(px) => {
                pixels.extend_from_slice(&px);
                in_shard += 1;
                let split = if fnv1a(&name).is_multiple_of(HELDOUT_EVERY) {
                    Split::Heldout
                } else {
                    Split::Train
                };
                match split {
                    Split::Heldout => meta.heldout += 1,
                    Split::Train => meta.train += 1,
                }
                let entry = IndexEntry {
                    caption: captions.as_ref().and_then(|c| c.get(&name).cloned()),
                    file: name,
                    split,
                };
                let line = serde_json::to_string(&entry)
                    .map_err(|e| corrupt("index.jsonl", e.to_string()))?;
                writeln!(index, "{line}").map_err(io(&index_path))?;
                meta.count += 1;
            }
            Err(error) => meta.skipped.push(Skipped { file: name, error }),
        }
        if in_shard == o.shard_size {
            meta.shards.push(write_shard(
                &o.out,
                meta.shards.len(),
                &pixels,
                in_shard,
                o.size,
            )?);
            pixels.clear();
            in_shard = 0;
        }
        progress(i + 1, files.len());
    }
    if in_shard > 0 {
        meta.shards.push(write_shard(
            &o.out,
            meta.shards.len(),
            &pixels,
            in_shard,
            o.size,
        )?);
    }
    index.flush().map_err(io(&index_path))?;
    if meta.count == 0 {
        let _ = std::fs::remove_file(&index_path);
        return Err(corrupt(
            o.dir.display().to_string(),
            format!("none of the {} image files could be read", files.len()),
        ));
    }
    let text =
        serde_json::to_string_pretty(&meta).map_err(|e| corrupt("meta.json", e.to_string()))?;
    std::fs::write(&meta_path, text + "\n").map_err(io(&meta_path))?;
    Ok(meta)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn png(path: &Path, w: u32, h: u32, color: [u8; 4]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::RgbaImage::from_pixel(w, h, image::Rgba(color))
            .save(path)
            .unwrap();
    }

    #[test]
    fn folders_become_shards_with_an_index_and_bad_files_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        for i in 0..5 {
            png(
                &src.join(format!("a/{i}.png")),
                20 + i,
                10,
                [200, 10, 10, 255],
            );
        }
        png(&src.join("b/clear.PNG"), 8, 8, [0, 0, 0, 0]);
        std::fs::write(src.join("b/broken.jpg"), b"not a jpeg").unwrap();
        std::fs::write(src.join("notes.txt"), b"ignored").unwrap();
        let caps = dir.path().join("c.jsonl");
        std::fs::write(
            &caps,
            "{\"file\": \"a/1.png\", \"caption\": \"a red thing\"}\n",
        )
        .unwrap();
        let out = dir.path().join("out");
        let o = ImageSetOptions {
            dir: src,
            captions: Some(caps),
            size: 8,
            out: out.clone(),
            fit: Fit::Pad,
            shard_size: 4,
        };
        let mut calls = 0;
        let meta = build_image_set(&o, &mut |_, _| calls += 1).unwrap();
        assert_eq!((meta.count, calls, meta.shards.len()), (6, 7, 2));
        assert_eq!(meta.skipped.len(), 1);
        assert!(
            meta.skipped[0].file.ends_with("broken.jpg"),
            "{:?}",
            meta.skipped
        );
        assert_eq!(meta.train + meta.heldout, 6);
        let index = std::fs::read_to_string(out.join("index.jsonl")).unwrap();
        assert_eq!(index.lines().count(), 6);
        assert!(index.contains("\"caption\":\"a red thing\""), "{index}");
        let t = safetensors::SafeTensors::deserialize(
            &std::fs::read(out.join("images-00001.safetensors")).unwrap(),
        )
        .unwrap()
        .tensor("images")
        .unwrap()
        .data()
        .to_vec();
        assert_eq!(t.len(), 2 * 8 * 8 * 3);
        // The transparent image is white; the padded 24x10 red image is white at the top row.
        let last = &t[8 * 8 * 3..];
        assert!(last.iter().all(|&v| v == 255), "transparent -> white");
    }

    #[test]
    fn crop_keeps_the_centre_and_pad_adds_white() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.png");
        // Wide enough that the resize filter's support at the corner sees only the padding.
        png(&p, 100, 10, [0, 0, 255, 255]);
        let crop = load_square(&p, 8, Fit::Crop).unwrap();
        assert!(crop.chunks(3).all(|c| c == [0, 0, 255]), "all blue");
        let pad = load_square(&p, 8, Fit::Pad).unwrap();
        assert_eq!(&pad[..3], &[255, 255, 255], "white corner");
        // The 10-row blue band is a little over one output row: the centre is bluish.
        let centre = &pad[(4 * 8 + 4) * 3..(4 * 8 + 4) * 3 + 3];
        assert!(
            centre[0] < 200 && centre[2] == 255,
            "blue centre {centre:?}"
        );
    }

    #[test]
    fn a_bad_captions_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.jsonl");
        std::fs::write(&p, "{\"file\": \"a\", \"caption\": \"b\"}\n{oops}\n").unwrap();
        let e = read_captions(&p).unwrap_err().to_string();
        assert!(e.contains("c.jsonl:2"), "{e}");
    }
}
