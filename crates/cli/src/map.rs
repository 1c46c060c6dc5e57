//! `mulo generate --map FILE.png`: the generated image with every token cell tinted by what
//! happened to it (accepted draft, rejected and resampled, expanded around a rejection, or
//! sampled by the target without a proposal), and a one-line legend with the counts.

use std::path::Path;

use anyhow::{anyhow, Result};
use mulo_engine::BlockEvent;
use plotters::prelude::*;

/// What happened to one token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// A proposal the target accepted and kept.
    Accepted,
    /// A proposal the target rejected, resampled by the target.
    Resampled,
    /// A proposal the target accepted but resampled anyway: it lay next to a rejection (the
    /// expansion of radius `l`).
    Expanded,
    /// Sampled by the target with no proposal (AR, an AR fallback). SD and LANTERN mark the
    /// target's token after the accepted prefix (the correction after a rejection, or the bonus
    /// after a fully accepted round) as resampled.
    Target,
}

impl Fate {
    const ALL: [Fate; 4] = [
        Fate::Accepted,
        Fate::Resampled,
        Fate::Expanded,
        Fate::Target,
    ];

    fn name(self) -> &'static str {
        match self {
            Fate::Accepted => "accepted",
            Fate::Resampled => "resampled",
            Fate::Expanded => "expanded",
            Fate::Target => "target",
        }
    }

    fn colour(self) -> RGBColor {
        match self {
            Fate::Accepted => RGBColor(0, 170, 60),
            Fate::Resampled => RGBColor(230, 20, 20),
            Fate::Expanded => RGBColor(255, 160, 0),
            Fate::Target => RGBColor(40, 90, 255),
        }
    }
}

/// The fate of each of the grid's `n` tokens from the committed blocks' maps.
pub fn fates(events: &[BlockEvent], n: usize) -> Vec<Fate> {
    let mut out = vec![Fate::Target; n];
    for e in events {
        for (i, (&acc, &res)) in e.accepted.iter().zip(&e.resampled).enumerate() {
            if let Some(f) = out.get_mut(e.start + i) {
                *f = match (acc, res) {
                    (true, false) => Fate::Accepted,
                    (true, true) => Fate::Expanded,
                    (false, true) => Fate::Resampled,
                    (false, false) => Fate::Target,
                };
            }
        }
    }
    out
}

/// Count of each fate, in [`Fate::ALL`] order.
pub fn counts(fates: &[Fate]) -> [usize; 4] {
    Fate::ALL.map(|f| fates.iter().filter(|&&x| x == f).count())
}

/// Pixels per image pixel in the map.
const SCALE: u32 = 4;
/// Height of the legend band (two rows of two entries).
const LEGEND: u32 = 40;
/// Opacity of the tint.
const ALPHA: f64 = 0.45;

/// Writes the map: `image` scaled ×4, each of the `rows × cols` token cells tinted by its fate,
/// a legend below (without a font, the coloured squares and no text).
/// The legend reads e.g. "accepted 170  resampled 11  expanded 64  target 11".
pub fn write_map(
    path: &Path,
    image: &image::RgbImage,
    rows: usize,
    cols: usize,
    fates: &[Fate],
) -> Result<()> {
    let (w, h) = (image.width() * SCALE, image.height() * SCALE);
    let mut buf = vec![0u8; (w * (h + LEGEND) * 3) as usize];
    draw(
        &mut buf,
        image,
        (rows, cols),
        fates,
        crate::plot::register_font(),
    )?;
    let img =
        image::RgbImage::from_raw(w, h + LEGEND, buf).ok_or_else(|| anyhow!("map buffer size"))?;
    img.save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| anyhow!("{}: {e}", path.display()))
}

fn draw(
    buf: &mut [u8],
    image: &image::RgbImage,
    (rows, cols): (usize, usize),
    fates: &[Fate],
    text: bool,
) -> Result<()> {
    let (w, h) = (image.width() * SCALE, image.height() * SCALE);
    let err = |e: DrawingAreaErrorKind<_>| anyhow!("map: {e}");
    let root = BitMapBackend::with_buffer(buf, (w, h + LEGEND)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    for (x, y, p) in image.enumerate_pixels() {
        let c = RGBColor(p[0], p[1], p[2]);
        let (x0, y0) = ((x * SCALE) as i32, (y * SCALE) as i32);
        let r = [(x0, y0), (x0 + SCALE as i32, y0 + SCALE as i32)];
        root.draw(&Rectangle::new(r, c.filled())).map_err(err)?;
    }
    let (cw, ch) = (w as f64 / cols as f64, h as f64 / rows as f64);
    for (i, f) in fates.iter().enumerate().take(rows * cols) {
        let (r, c) = ((i / cols) as f64, (i % cols) as f64);
        let rect = [
            ((c * cw) as i32, (r * ch) as i32),
            (((c + 1.0) * cw) as i32, ((r + 1.0) * ch) as i32),
        ];
        root.draw(&Rectangle::new(rect, f.colour().mix(ALPHA).filled()))
            .map_err(err)?;
    }
    let n = counts(fates);
    let slot = w as i32 / 2;
    for (k, f) in Fate::ALL.iter().enumerate() {
        let x = (k % 2) as i32 * slot + 4;
        let y = h as i32 + 4 + (k / 2) as i32 * 18;
        root.draw(&Rectangle::new(
            [(x, y), (x + 12, y + 12)],
            f.colour().filled(),
        ))
        .map_err(err)?;
        if text {
            let label = format!("{} {}", f.name(), n[k]);
            root.draw(&Text::new(label, (x + 15, y), ("sans-serif", 12)))
                .map_err(err)?;
        }
    }
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn event(start: usize, accepted: &[bool], resampled: &[bool]) -> BlockEvent {
        BlockEvent {
            committed: start + accepted.len().max(resampled.len()),
            total: 8,
            start,
            tokens: vec![0; accepted.len().max(resampled.len())],
            accepted: accepted.to_vec(),
            resampled: resampled.to_vec(),
            target_passes: 1,
        }
    }

    #[test]
    fn fates_follow_the_block_maps() {
        let events = vec![
            event(0, &[true, true, false, true], &[false, true, true, false]),
            // An AR block: no maps, the target sampled it.
            event(4, &[], &[]),
        ];
        let f = fates(&events, 8);
        use Fate::*;
        assert_eq!(
            f,
            vec![Accepted, Expanded, Resampled, Accepted, Target, Target, Target, Target]
        );
        assert_eq!(counts(&f), [2, 1, 1, 4]);
    }

    #[test]
    fn the_map_tints_each_cell_with_its_fate() {
        let img = image::RgbImage::from_pixel(8, 8, image::Rgb([255, 255, 255]));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("map.png");
        use Fate::*;
        let f = [Accepted, Resampled, Expanded, Target];
        write_map(&path, &img, 2, 2, &f).unwrap();
        let m = image::open(&path).unwrap().to_rgb8();
        assert_eq!((m.width(), m.height()), (32, 32 + LEGEND));
        // The centre of each 16-pixel cell is white blended with the fate's colour.
        for (i, fate) in f.iter().enumerate() {
            let (x, y) = ((i % 2) as u32 * 16 + 8, (i / 2) as u32 * 16 + 8);
            let RGBColor(r, g, b) = fate.colour();
            let want = |c: u8| (f64::from(c) * ALPHA + 255.0 * (1.0 - ALPHA)).round();
            let got = m.get_pixel(x, y);
            for (k, c) in [r, g, b].into_iter().enumerate() {
                assert!(
                    (f64::from(got[k]) - want(c)).abs() <= 2.0,
                    "{fate:?}: {got:?}"
                );
            }
        }
    }
}
