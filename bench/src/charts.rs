//! SVG charts of a comparison (plotters, SVG backend only: no fonts or
//! system libraries; text size is estimated).

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::compare::{Report, Summary};

type DrawResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Draw every chart; returns the files written.
pub fn draw_all(report: &Report, out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let measured: Vec<&Summary> = report
        .scenarios
        .iter()
        .filter(|s| s.skipped.is_none())
        .collect();
    let mut files = Vec::new();
    let mut draw = |name: String, f: &dyn Fn(&Path) -> DrawResult<()>| -> anyhow::Result<()> {
        let path = out.join(name);
        f(&path).map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))?;
        files.push(path);
        Ok(())
    };
    let rps: Vec<(String, f64)> = measured
        .iter()
        .filter_map(|s| Some((s.name.to_string(), s.closed_rps?)))
        .collect();
    let title = format!(
        "Closed-loop req/s ({} connections, {} B responses; higher is better)",
        report.settings.connections, report.settings.body_size
    );
    draw("throughput.svg".into(), &|p| bars(p, &title, "req/s", &rps))?;
    let bulk: Vec<(String, f64)> = measured
        .iter()
        .filter_map(|s| Some((s.name.to_string(), s.bulk_gbit_per_s?)))
        .collect();
    let title = format!(
        "TCP bulk throughput, {} streams (higher is better)",
        report.settings.bulk_streams
    );
    draw("bulk.svg".into(), &|p| bars(p, &title, "Gbit/s", &bulk))?;
    for (i, rate) in report.settings.rates.iter().enumerate() {
        let series: Vec<(String, [(&str, f64); 5])> = measured
            .iter()
            .filter_map(|s| Some((s.name.to_string(), s.rates.get(i)?.latency.points())))
            .collect();
        let title = format!("Latency at {rate} req/s, open loop (lower is better)");
        draw(format!("latency-{rate}.svg"), &|p| {
            percentiles(p, &title, &series)
        })?;
        let cpu: Vec<(String, f64)> = measured
            .iter()
            .filter(|s| !s.proxies.is_empty())
            .filter_map(|s| {
                Some((
                    s.name.to_string(),
                    s.rates.get(i)?.cpu_s_per_1k.iter().sum(),
                ))
            })
            .collect();
        if i == 0 {
            let title = format!(
                "CPU seconds per 1,000 requests at {rate} req/s, both proxies (lower is better)"
            );
            draw("cpu.svg".into(), &|p| {
                bars(p, &title, "CPU s / 1k req", &cpu)
            })?;
        }
    }
    Ok(files)
}

fn bars(path: &Path, title: &str, unit: &str, data: &[(String, f64)]) -> DrawResult<()> {
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let top = data
        .iter()
        .map(|(_, v)| *v)
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let top = if top > 0.0 { top * 1.15 } else { 1.0 };
    // A segmented 0..k range has k + 1 segments: one per bar.
    let last = (data.len().max(2) - 1) as u32;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d((0u32..last).into_segmented(), 0f64..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(unit)
        .y_label_formatter(&|v| short(*v))
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => data
                .get(*i as usize)
                .map(|(name, _)| name.clone())
                .unwrap_or_default(),
            _ => String::new(),
        })
        .draw()?;
    chart.draw_series(data.iter().enumerate().map(|(i, (name, v))| {
        let i = i as u32;
        let color = color_of(name);
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), *v),
            ],
            color.filled(),
        );
        bar.set_margin(0, 0, 12, 12);
        bar
    }))?;
    chart.draw_series(data.iter().enumerate().map(|(i, (_, v))| {
        Text::new(
            short(*v),
            (SegmentValue::CenterOf(i as u32), *v + top * 0.01),
            TextStyle::from(("sans-serif", 14).into_font())
                .pos(Pos::new(HPos::Center, VPos::Bottom)),
        )
    }))?;
    root.present()?;
    Ok(())
}

/// One color per scenario, the same in every chart.
fn color_of(name: &str) -> PaletteColor<Palette99> {
    let known = ["direct"]
        .into_iter()
        .chain(crate::compare::PROXY_SCENARIOS)
        .position(|n| n == name);
    Palette99::pick(known.unwrap_or(name.len()))
}

fn short(v: f64) -> String {
    let a = v.abs();
    if a >= 10_000.0 {
        format!("{:.1}k", v / 1000.0)
    } else if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn percentiles(path: &Path, title: &str, series: &[(String, [(&str, f64); 5])]) -> DrawResult<()> {
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let values = series.iter().flat_map(|(_, p)| p.iter().map(|(_, v)| *v));
    let lo = values
        .clone()
        .filter(|v| *v > 0.0)
        .fold(f64::INFINITY, f64::min);
    let hi = values.fold(0.0, f64::max);
    let (lo, hi) = if lo.is_finite() && hi > lo {
        (lo * 0.8, hi * 1.25)
    } else {
        (0.01, 10.0)
    };
    let labels = ["p50", "p90", "p99", "p99.9", "max"];
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d((0u32..4).into_segmented(), (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .y_desc("latency, ms (log scale)")
        .y_labels(12)
        .y_label_formatter(&|v| short(*v))
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => labels.get(*i as usize).unwrap_or(&"").to_string(),
            _ => String::new(),
        })
        .draw()?;
    for (name, points) in series {
        let color = color_of(name);
        let legend_name = name.clone();
        let pts: Vec<(SegmentValue<u32>, f64)> = points
            .iter()
            .enumerate()
            .map(|(i, (_, v))| (SegmentValue::CenterOf(i as u32), v.max(lo)))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(
                    vec![(x, y), (x + 20, y)],
                    color_of(&legend_name).stroke_width(2),
                )
            });
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
