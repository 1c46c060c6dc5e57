//! The throughput-vs-concurrency plot of `mulo bench --concurrency` (plotters, PNG).

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use mulo_train::load::LoadRow;

/// One line per method and place: images/s against the number of clients.
pub fn throughput(path: &Path, rows: &[LoadRow]) -> Result<()> {
    let text = crate::plot::register_font();
    crate::plot::save_png(path, (900, 520), |buf, size| draw(buf, size, rows, text))
}

/// The lines: (label, points sorted by concurrency), in the rows' order. A method is named
/// without its parameters unless two settings of it were measured.
fn lines(rows: &[LoadRow]) -> Vec<(String, Vec<(f64, f64)>)> {
    let base = |m: &str| m.split(':').next().unwrap_or(m).to_string();
    let mut out: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for r in rows {
        let several = rows
            .iter()
            .any(|o| base(&o.method) == base(&r.method) && o.method != r.method);
        let name = if several {
            r.method.clone()
        } else {
            base(&r.method)
        };
        let label = format!("{name}{}", if r.remote { " @gateway" } else { "" });
        let point = (r.concurrency as f64, r.throughput_images_per_s);
        match out.iter_mut().find(|(l, _)| *l == label) {
            Some((_, points)) => points.push(point),
            None => out.push((label, vec![point])),
        }
    }
    for (_, points) in &mut out {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

fn draw(buf: &mut [u8], size: (u32, u32), rows: &[LoadRow], text: bool) -> Result<()> {
    let root = BitMapBackend::with_buffer(buf, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
    let max_c = rows.iter().map(|r| r.concurrency).max().unwrap_or(1) as f64;
    let max_t = rows
        .iter()
        .map(|r| r.throughput_images_per_s)
        .fold(0.1f64, f64::max)
        * 1.15;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if text {
        builder
            .caption("throughput against concurrent clients", ("sans-serif", 20))
            .x_label_area_size(40)
            .y_label_area_size(55);
    }
    let mut chart = builder
        .build_cartesian_2d(0.0..max_c * 1.05 + 0.5, 0.0..max_t)
        .map_err(|e| anyhow!("plot: {e}"))?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("clients (closed loop)").y_desc("images/s");
    } else {
        mesh.disable_x_axis().disable_y_axis();
    }
    mesh.draw().map_err(|e| anyhow!("plot: {e}"))?;
    let palette = [BLACK, BLUE, RED, GREEN, MAGENTA, CYAN];
    for (i, (label, points)) in lines(rows).into_iter().enumerate() {
        let color = palette[i % palette.len()];
        let faded = label.ends_with("@gateway");
        let style = if faded {
            color.mix(0.6).stroke_width(2)
        } else {
            color.stroke_width(2)
        };
        let series = chart
            .draw_series(LineSeries::new(points.clone(), style))
            .map_err(|e| anyhow!("plot: {e}"))?;
        if text {
            series
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(|e| anyhow!("plot: {e}"))?;
    }
    if text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow!("plot: {e}"))?;
    }
    root.present().map_err(|e| anyhow!("plot: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(method: &str, c: usize, remote: bool, t: f64) -> LoadRow {
        LoadRow {
            method: method.into(),
            concurrency: c,
            remote,
            images: 4,
            seconds: 1.0,
            throughput_images_per_s: t,
            latency_median_s: 1.0,
            latency_p90_s: 1.0,
            mean_batch_sessions: Some(1.0),
        }
    }

    #[test]
    fn one_line_per_method_and_place_sorted_by_clients() {
        let rows = [
            row("ar", 8, false, 4.0),
            row("ar", 1, false, 1.0),
            row("mulo:tau=0.3", 1, false, 1.5),
            row("ar", 1, true, 0.9),
        ];
        let l = lines(&rows);
        let names: Vec<&str> = l.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["ar", "mulo", "ar @gateway"]);
        assert_eq!(l[0].1, [(1.0, 1.0), (8.0, 4.0)]);
        // Two settings of one method are two lines, named with their parameters.
        let two = [
            row("mulo:tau=0.1", 1, false, 1.0),
            row("mulo:tau=0.3", 1, false, 2.0),
        ];
        let names: Vec<String> = lines(&two).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["mulo:tau=0.1", "mulo:tau=0.3"]);
    }
}
