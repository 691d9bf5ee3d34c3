//! Draws the scenario benchmark results (JSON lines written by scripts/bench)
//! as SVG: toggle-to-client latency and worker CPU against clients, one line
//! per toggle rate.
//!
//! `omcb-bench-plot RESULTS.jsonl OUT_DIR`

use plotters::prelude::*;
use serde_json::Value;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() == 3, "usage: omcb-bench-plot RESULTS.jsonl OUT_DIR");
    let rows: Vec<Value> = std::fs::read_to_string(&args[1])?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let matrix: Vec<&Value> = rows.iter().filter(|r| r["scenario"] == "matrix").collect();
    let out = std::path::Path::new(&args[2]);
    plot(&matrix, &out.join("latency.svg"), "p99 toggle -> every client (ms)", |r| {
        r["latency_ms"]["p99"].as_f64()
    })?;
    plot(&matrix, &out.join("cpu.svg"), "worker CPU (cores)", |r| r["worker_cpu_cores"].as_f64())?;
    Ok(())
}

fn plot(
    rows: &[&Value],
    path: &std::path::Path,
    y_label: &str,
    y: impl Fn(&Value) -> Option<f64>,
) -> anyhow::Result<()> {
    let mut rates: Vec<u64> = rows.iter().filter_map(|r| r["rate"].as_u64()).collect();
    rates.sort_unstable();
    rates.dedup();
    let x_max = rows.iter().filter_map(|r| r["clients"].as_f64()).fold(1.0, f64::max) * 1.05;
    let y_max = rows.iter().filter_map(|r| y(r)).fold(0.001, f64::max) * 1.15;
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(y_label, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart.configure_mesh().x_desc("clients").y_desc(y_label).draw()?;
    for (i, rate) in rates.iter().enumerate() {
        let mut pts: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r["rate"].as_u64() == Some(*rate))
            .filter_map(|r| Some((r["clients"].as_f64()?, y(r)?)))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(format!("{rate} toggles/s"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart.draw_series(pts.iter().map(|&(x, y)| Circle::new((x, y), 4, color.filled())))?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}
