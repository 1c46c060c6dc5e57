//! The speed-vs-quality plot of `mulo bench` (plotters, PNG).

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use mulo_train::bench::BenchRow;

/// Fonts tried for the labels (the first that exists is used; without one the plot has no text).
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/Library/Fonts/Arial.ttf",
];

pub(crate) fn register_font() -> bool {
    for f in FONTS {
        if let Ok(bytes) = std::fs::read(f) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    false
}

/// The parameters whose values differ between the `mulo` rows (what a sweep varies).
fn varying(rows: &[BenchRow]) -> Vec<String> {
    let mulo: Vec<&BenchRow> = rows.iter().filter(|r| r.method == "mulo").collect();
    let Some(first) = mulo.first() else {
        return Vec::new();
    };
    first
        .params
        .keys()
        .filter(|k| {
            mulo.iter()
                .any(|r| r.params.get(*k) != first.params.get(*k))
        })
        .cloned()
        .collect()
}

/// Label of a point: the method, or for `mulo` the parameters that vary between the `mulo` rows
/// (all of them would not fit).
fn label(r: &BenchRow, keys: &[String]) -> String {
    if r.method != "mulo" {
        return r.method.clone();
    }
    let varied: Vec<String> = keys
        .iter()
        .filter_map(|k| r.params.get(k).map(|v| format!("{k}={v}")))
        .collect();
    if varied.is_empty() {
        "mulo".into()
    } else {
        varied.join(" ")
    }
}

/// Two panels: speed-up vs AR against FID-emoji (lower is better) and against category
/// adherence (higher is better); the `mulo` rows of a one-parameter sweep are joined.
pub fn speed_quality(path: &Path, rows: &[BenchRow]) -> Result<()> {
    let text = register_font();
    if !text {
        eprintln!(
            "warning: no font found for the plot's labels ({}); drawing without text",
            FONTS.join(", ")
        );
    }
    save_png(path, (1200, 500), |buf, size| draw(buf, size, rows, text))
}

/// Draws into an RGB buffer of `size` with `draw` and writes it as a PNG.
pub(crate) fn save_png(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&mut [u8], (u32, u32)) -> Result<()>,
) -> Result<()> {
    let mut buf = vec![0u8; (size.0 * size.1 * 3) as usize];
    draw(&mut buf, size)?;
    let img = image::RgbImage::from_raw(size.0, size.1, buf)
        .ok_or_else(|| anyhow!("plot buffer size"))?;
    img.save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| anyhow!("{}: {e}", path.display()))
}

fn draw(buf: &mut [u8], size: (u32, u32), rows: &[BenchRow], text: bool) -> Result<()> {
    let root = BitMapBackend::with_buffer(buf, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
    let panels = root.split_evenly((1, 2));
    let max_speed = rows.iter().map(|r| r.speedup_vs_ar).fold(1.0f64, f64::max) * 1.15;
    type Pick = fn(&BenchRow) -> Option<f64>;
    let metrics: [(&str, Pick); 2] = [
        ("FID-emoji (lower is better)", |r| r.fid_emoji),
        ("category adherence % (higher is better)", |r| {
            r.adherence.map(|a| a * 100.0)
        }),
    ];
    for (panel, (name, pick)) in panels.iter().zip(metrics) {
        let values: Vec<f64> = rows.iter().filter_map(pick).collect();
        let (lo, hi) = values
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        let (lo, hi) = if lo.is_finite() {
            let pad = ((hi - lo) * 0.15).max(0.5);
            (lo - pad, hi + pad)
        } else {
            (0.0, 1.0)
        };
        let mut builder = ChartBuilder::on(panel);
        builder.margin(15);
        if text {
            builder
                .caption(format!("speed-up vs AR against {name}"), ("sans-serif", 18))
                .x_label_area_size(40)
                .y_label_area_size(55);
        }
        let mut chart = builder
            .build_cartesian_2d(0.0..max_speed, lo..hi)
            .map_err(|e| anyhow!("plot: {e}"))?;
        let mut mesh = chart.configure_mesh();
        if text {
            mesh.x_desc("speed-up vs AR (median latency)").y_desc(name);
        } else {
            mesh.disable_x_axis().disable_y_axis();
        }
        mesh.draw().map_err(|e| anyhow!("plot: {e}"))?;
        let keys = varying(rows);
        let sweep: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.method == "mulo")
            .filter_map(|r| pick(r).map(|v| (r.speedup_vs_ar, v)))
            .collect();
        // A line only through a one-parameter sweep (other variants are separate points).
        if sweep.len() > 1 && keys.len() == 1 {
            let mut sorted = sweep.clone();
            sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart
                .draw_series(LineSeries::new(sorted, BLUE.mix(0.5)))
                .map_err(|e| anyhow!("plot: {e}"))?;
        }
        for r in rows {
            let Some(v) = pick(r) else { continue };
            let color = match r.method.as_str() {
                "ar" => BLACK,
                "sd" => RED,
                "lantern" => GREEN,
                _ => BLUE,
            };
            let font = ("sans-serif", 13).into_font().color(&color);
            let name = if text { label(r, &keys) } else { String::new() };
            chart
                .draw_series(std::iter::once(
                    EmptyElement::at((r.speedup_vs_ar, v))
                        + Circle::new((0, 0), 5, color.filled())
                        + Text::new(name, (7, -14), font),
                ))
                .map_err(|e| anyhow!("plot: {e}"))?;
        }
    }
    root.present().map_err(|e| anyhow!("plot: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(method: &str, params: &[(&str, &str)]) -> BenchRow {
        BenchRow {
            method: method.into(),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..BenchRow::default()
        }
    }

    #[test]
    fn mulo_points_are_labelled_by_what_the_sweep_varies() {
        let rows = [
            row("ar", &[]),
            row(
                "mulo",
                &[("tau", "0.05"), ("pool_k", "256"), ("radius", "1")],
            ),
            row(
                "mulo",
                &[("tau", "0.1"), ("pool_k", "256"), ("radius", "1")],
            ),
        ];
        let keys = varying(&rows);
        assert_eq!(keys, vec!["tau".to_string()]);
        assert_eq!(label(&rows[0], &keys), "ar");
        assert_eq!(label(&rows[2], &keys), "tau=0.1");
        // A single mulo row varies nothing: it is just "mulo".
        assert_eq!(label(&rows[1], &varying(&rows[..2])), "mulo");
    }
}
