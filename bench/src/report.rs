//! Output: a terminal table, a JSON file, and SVG charts.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::Serialize;

use crate::load::{Percentiles, RunResult};

pub fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

/// Prints one run as a table row block.
pub fn print_run(label: &str, r: &RunResult) {
    let l = &r.latency_us;
    println!(
        "{label:<18} rate {:>7}/s  achieved {:>9.1}/s  ok {:>8}  p50 {:>7} ms  p90 {:>7} ms  p99 {:>7} ms  p99.9 {:>7} ms  max {:>8} ms",
        r.requested_rate,
        r.achieved_rate,
        r.completed,
        ms(l.p50),
        ms(l.p90),
        ms(l.p99),
        ms(l.p999),
        ms(l.max)
    );
    if !r.errors.is_empty() {
        println!("{:<18} errors {:?}", "", r.errors);
    }
    let statuses: Vec<String> = r.statuses.iter().map(|(s, n)| format!("{s}:{n}")).collect();
    println!("{:<18} statuses {}", "", statuses.join(" "));
}

/// Writes `value` as pretty JSON to `dir/name.json`.
pub fn write_json<T: Serialize>(dir: &Path, name: &str, value: &T) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(value)?)?;
    Ok(path)
}

type Series<'a> = (&'a str, Vec<(f64, f64)>, RGBColor);

/// A line chart as SVG.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series<'_>],
) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let xs = series.iter().flat_map(|s| s.1.iter().map(|p| p.0));
    let ys = series.iter().flat_map(|s| s.1.iter().map(|p| p.1));
    let (x0, x1) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    let y1 = ys.fold(0.0f64, f64::max);
    let (x0, x1) = if x0 >= x1 {
        (0.0, x0.max(1.0))
    } else {
        (x0, x1)
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, 0.0..(y1 * 1.1).max(0.001))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (name, points, color) in series {
        let c = *color;
        chart
            .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart
            .draw_series(points.iter().map(|p| Circle::new(*p, 3, c.filled())))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// Latency percentiles per second of a run.
pub fn timeline_chart(
    path: &Path,
    title: &str,
    timeline: &[(u64, Percentiles)],
) -> anyhow::Result<()> {
    let pick = |f: fn(&Percentiles) -> u64| -> Vec<(f64, f64)> {
        timeline
            .iter()
            .map(|(s, p)| (*s as f64, f(p) as f64 / 1000.0))
            .collect()
    };
    line_chart(
        path,
        title,
        "second of the run",
        "latency (ms)",
        &[
            ("p50", pick(|p| p.p50), BLUE),
            ("p99", pick(|p| p.p99), RED),
            ("p99.9", pick(|p| p.p999), MAGENTA),
        ],
    )
}
