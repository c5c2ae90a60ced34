//! What the benchmarks share to report their figures: the median, and SVG plots
//! under `tests/plots/`, which `BENCHMARKS.md` links (`cargo xtask bench` writes
//! both).

use std::path::PathBuf;

use plotters::prelude::*;

/// The median of `values`: the middle one, or the upper of the middle two for an
/// even count, so that it is always a value measured; `None` when there are none.
#[must_use]
pub fn median<T: Copy + PartialOrd>(values: impl IntoIterator<Item = T>) -> Option<T> {
    let mut v: Vec<T> = values.into_iter().collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v.get(v.len() / 2).copied()
}

/// Where the plots go: `tests/plots/`, beside the benchmarks that draw them.
#[must_use]
pub fn plots_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("plots");
    std::fs::create_dir_all(&dir).expect("plots dir");
    dir
}

/// Colours of the series, in order.
const COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Horizontal grouped bars: one group per category (top to bottom), one bar per
/// series in it, values along x in `unit`. Written to `plots_dir()/file`.
///
/// # Panics
/// If the SVG cannot be drawn or written.
pub fn bars(file: &str, title: &str, unit: &str, categories: &[&str], series: &[(&str, Vec<f64>)]) {
    let path = plots_dir().join(file);
    let height = 80 + 28 * categories.len() * series.len().max(1);
    let root =
        SVGBackend::new(&path, (1000, u32::try_from(height).expect("height"))).into_drawing_area();
    root.fill(&WHITE).expect("fill");
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0_f64, f64::max)
        * 1.1;
    let n = categories.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(300)
        .build_cartesian_2d(0.0..max.max(1e-9), 0.0..n as f64)
        .expect("chart");
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc(unit)
        .y_labels(n * 2 + 1)
        .y_label_formatter(&|y| {
            // Each group's label sits at its centre, n - i - 0.5.
            categories
                .iter()
                .enumerate()
                .find(|(i, _)| ((n - i) as f64 - 0.5 - y).abs() < 1e-6)
                .map_or_else(String::new, |(_, c)| (*c).to_owned())
        })
        .draw()
        .expect("mesh");
    let band = 0.8 / series.len().max(1) as f64;
    for (s, (name, values)) in series.iter().enumerate() {
        let colour = COLOURS[s % COLOURS.len()];
        chart
            .draw_series(values.iter().enumerate().map(|(i, &v)| {
                let top = n as f64 - i as f64 - 0.1 - band * s as f64;
                Rectangle::new([(0.0, top - band), (v, top)], colour.filled())
            }))
            .expect("bars")
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled()));
    }
    legend(&mut chart);
    root.present().expect("write svg");
}

/// Lines over time: each series is (x, y) points, x in seconds. Written to
/// `plots_dir()/file`.
///
/// # Panics
/// If the SVG cannot be drawn or written.
pub fn lines(
    file: &str,
    title: &str,
    (x_desc, y_desc): (&str, &str),
    y_range: std::ops::Range<f64>,
    series: &[(&str, Vec<(f64, f64)>)],
) {
    let path = plots_dir().join(file);
    let root = SVGBackend::new(&path, (900, 480)).into_drawing_area();
    root.fill(&WHITE).expect("fill");
    let (lo, hi) = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(x, _)| x))
        .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)));
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(lo.min(0.0)..hi.max(1.0), y_range)
        .expect("chart");
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()
        .expect("mesh");
    for (s, (name, points)) in series.iter().enumerate() {
        let colour = COLOURS[s % COLOURS.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                colour.stroke_width(2),
            ))
            .expect("line")
            .label(*name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], colour.stroke_width(2)));
    }
    legend(&mut chart);
    root.present().expect("write svg");
}

/// The series' names in a box in the lower right corner.
fn legend<'a, DB: DrawingBackend + 'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
) {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .expect("legend");
}
