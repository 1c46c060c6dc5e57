//! Small synthetic copies of the emoji npm packages, for tests of the data pipeline and of the
//! commands built on it (not used by the product itself).

use std::io::Write;
use std::path::{Path, PathBuf};

/// A `size`×`size` RGBA PNG: the left half `color`, the right half transparent.
pub fn png(color: [u8; 4], size: u32) -> Vec<u8> {
    let img = image::RgbaImage::from_fn(size, size, |x, _| {
        if x < size / 2 {
            image::Rgba(color)
        } else {
            image::Rgba([0, 0, 0, 0]) // transparent: white after compositing
        }
    });
    let mut out = std::io::Cursor::new(Vec::new());
    // Encoding an in-memory RGBA image cannot fail.
    let _ = img.write_to(&mut out, image::ImageFormat::Png);
    out.into_inner()
}

/// `emoji.json` of the synthetic packages: a grinning face (training split), a waving hand with
/// one skin-tone variation (held-out split, google only) and a skin-tone swatch (Component, left
/// out by the builder).
pub const EMOJI_JSON: &str = r#"[
  {"name": "GRINNING FACE", "unified": "1F600", "image": "1f600.png", "short_names": ["grinning"],
   "category": "Smileys & Emotion", "subcategory": "face-smiling",
   "has_img_google": true, "has_img_twitter": true},
  {"name": "WAVING HAND SIGN", "unified": "1F44B", "image": "1f44b.png", "short_names": ["wave"],
   "category": "People & Body", "subcategory": "hand-fingers-open",
   "has_img_google": true, "has_img_twitter": false,
   "skin_variations": {"1F3FF": {"unified": "1F44B-1F3FF", "image": "1f44b-1f3ff.png",
                                 "has_img_google": true, "has_img_twitter": false}}},
  {"name": "EMOJI MODIFIER FITZPATRICK TYPE-1-2", "unified": "1F3FB", "image": "1f3fb.png",
   "short_names": ["skin-tone-2"], "category": "Component", "subcategory": "skin-tone",
   "has_img_google": true, "has_img_twitter": true}
]"#;

/// Writes `<dir>/<vendor>.tgz` laid out like the npm package, with [`EMOJI_JSON`] and `files`
/// under `img/<vendor>/64/`.
pub fn tarball(dir: &Path, vendor: &str, files: &[(&str, Vec<u8>)]) -> PathBuf {
    let path = dir.join(format!("{vendor}.tgz"));
    let write = || -> std::io::Result<()> {
        let gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&path)?,
            flate2::Compression::fast(),
        );
        let mut tar = tar::Builder::new(gz);
        let mut add = |name: &str, data: &[u8]| -> std::io::Result<()> {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, name, data)
        };
        add("package/emoji.json", EMOJI_JSON.as_bytes())?;
        for (name, data) in files {
            add(&format!("package/img/{vendor}/64/{name}"), data)?;
        }
        tar.into_inner()?.finish()?.flush()
    };
    if let Err(e) = write() {
        panic!("writing {}: {e}", path.display());
    }
    path
}

/// Both synthetic packages with every image present: `(vendor, tarball)` pairs for
/// [`super::emoji::build`] or `mulo data emoji --google/--twitter`.
pub fn packages(dir: &Path) -> Vec<(String, PathBuf)> {
    let google = tarball(
        dir,
        "google",
        &[
            ("1f600.png", png([200, 100, 0, 255], 64)),
            ("1f44b.png", png([10, 20, 30, 255], 64)),
            ("1f44b-1f3ff.png", png([90, 60, 30, 255], 64)),
            ("1f3fb.png", png([1, 1, 1, 255], 64)),
        ],
    );
    let twitter = tarball(dir, "twitter", &[("1f600.png", png([0, 0, 255, 128], 64))]);
    vec![("google".into(), google), ("twitter".into(), twitter)]
}
