//! Plots, each written as `<stem>.png` (BitMapBackend) and `<stem>.svg` (SVGBackend) with an
//! embedded DejaVu Sans (assets/, Bitstream Vera license), so they render the same on a machine
//! without system fonts:
//! - training curves of one run: accuracy and loss per split, and LEE per split with one panel per
//!   transform on a log axis, ±1 standard error shaded ([`plot_training`]);
//! - the paper's Figure 4: cumulative share of the layerwise LEE by step, one line per transform
//!   ([`plot_layerwise`]);
//! - the paper's Figure 1 (right) / Table 1 view: test error against test LEE, one labelled point
//!   per run ([`plot_error_vs_lee`]) or one marker per row with ±1 std bars over its seeds and a
//!   legend ([`plot_rows_error_vs_lee`]);
//! - a row's LEE over training across its seeds, mean line and min–max band ([`plot_row_lee`]).

mod paper;
mod seeds;

pub use paper::{
    plot_angles, plot_error_vs_lee, plot_family_error_vs_lee, plot_layerwise, plot_layerwise_bars,
    plot_rows_error_vs_lee, RowPoint, ScatterPoint,
};
pub use seeds::plot_row_lee;

use super::{split_rank, EvalRecord, ReportError};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle, FontTransform};
use std::error::Error;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// File stems that [`plot_training`] writes in a run directory.
pub const ACCURACY_STEM: &str = "accuracy";
pub const LEE_STEM: &str = "lee";

static FONT: &[u8] = include_bytes!("../../../assets/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

type DrawResult = Result<(), Box<dyn Error>>;
/// (step, value) points of one line.
type Curve = Vec<(f64, f64)>;
/// (step, value, band low, band high) points of one line with its shaded band.
type Banded = Vec<(f64, f64, f64, f64)>;

/// One picture, drawable on any backend (PNG and SVG share the code).
trait Figure {
    fn size(&self) -> (u32, u32);
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult
    where
        DB::ErrorType: 'static;
}

/// Register the embedded font under plotters' sans-serif family (once per process).
fn ensure_font() -> Result<(), ReportError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    if *REGISTERED.get_or_init(|| register_font(FAMILY, FontStyle::Normal, FONT).is_ok()) {
        Ok(())
    } else {
        Err(ReportError::Plot {
            path: PathBuf::from("assets/DejaVuSans.ttf"),
            message: "the embedded font could not be parsed".into(),
        })
    }
}

fn with_ext(stem: &Path, ext: &str) -> PathBuf {
    let mut name = stem.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(ext);
    stem.with_file_name(name)
}

/// Draw `fig` to `<stem>.svg` and `<stem>.png`, each written atomically.
fn render<F: Figure>(stem: &Path, fig: &F) -> Result<(), ReportError> {
    ensure_font()?;
    let svg_path = with_ext(stem, "svg");
    let fail = |path: &Path, e: Box<dyn Error>| ReportError::Plot {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, fig.size()).into_drawing_area();
        fig.draw(&root)
            .and_then(|_| root.present().map_err(Into::into))
            .map_err(|e| fail(&svg_path, e))?;
    }
    super::write_atomic(&svg_path, svg.as_bytes())?;

    // The bitmap encoder picks the format from the extension, so the temporary name ends in .png.
    let png_path = with_ext(stem, "png");
    let tmp = crate::runtime::temp_sibling(&png_path, ".png");
    {
        let root = BitMapBackend::new(&tmp, fig.size()).into_drawing_area();
        let drawn = fig.draw(&root).and_then(|_| root.present().map_err(Into::into));
        if let Err(e) = drawn {
            let _ = std::fs::remove_file(&tmp);
            return Err(fail(&png_path, e));
        }
    }
    std::fs::rename(&tmp, &png_path).map_err(|e| ReportError::io(&png_path, e))
}

/// tab10: distinguishable, colour-blind-tolerant.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// A split keeps its colour in every plot: train blue, test orange, val purple, OOD sets after.
fn split_color(name: &str, all: &[String]) -> RGBColor {
    match name {
        "train" => PALETTE[0],
        "test" => PALETTE[1],
        "val" => PALETTE[4],
        _ => {
            let others: Vec<&String> = all
                .iter()
                .filter(|s| !["train", "test", "val"].contains(&s.as_str()))
                .collect();
            let i = others.iter().position(|s| *s == name).unwrap_or(0);
            [PALETTE[2], PALETTE[3], PALETTE[5], PALETTE[6], PALETTE[9]][i % 5]
        }
    }
}

fn text(size: u32) -> TextStyle<'static> {
    (FAMILY, size).into_font().into()
}

/// A non-empty axis range around the data (a single point gets a unit of room either side).
fn linear_range(lo: f64, hi: f64) -> std::ops::Range<f64> {
    if !(lo.is_finite() && hi.is_finite()) {
        return 0.0..1.0;
    }
    if hi - lo < 1e-12 * lo.abs().max(1.0) {
        return (lo - 1.0)..(hi + 1.0);
    }
    lo..hi
}

/// A log axis range covering the positive values with some margin; a decade when there is none.
fn log_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| *v > 0.0 && v.is_finite())
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        return (1e-6, 1e-5);
    }
    // At least two decades, so the axis always carries labelled decade ticks.
    let (lo, hi) = (lo / 2.0, hi * 2.0);
    let widen = (100.0 / (hi / lo)).max(1.0).sqrt();
    (lo / widen, hi * widen)
}

fn sci(v: &f64) -> String {
    format!("{v:.0e}")
}

/// Log axes are labelled at their decades only: plotters also ticks 2…9 × 10ᵏ, and those labels
/// (9e-1, 8e-1, 7e-1, …) pile on top of each other. `log_range` spans two decades or more, so
/// every log axis keeps at least two labels.
fn at_decades(v: f64, label: fn(&f64) -> String) -> String {
    let l = v.log10();
    if (l - l.round()).abs() < 1e-9 {
        label(&v)
    } else {
        String::new()
    }
}

fn decade_sci(v: &f64) -> String {
    at_decades(*v, sci)
}

fn decade_tick(v: &f64) -> String {
    at_decades(*v, tick)
}

/// A tick label: plain decimals (≤ 3 significant figures, no trailing zeros) between 0.01 and
/// 10⁴, scientific outside.
fn tick(v: &f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        return "0".into();
    }
    if !(1e-2..1e4).contains(&a) {
        return format!("{v:.1e}").replace(".0e", "e");
    }
    let decimals = (2 - a.log10().floor() as i32).max(0) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Step axes are integers: fractional ticks get no label.
fn step_tick(v: &f64) -> String {
    if (v - v.round()).abs() > 1e-9 {
        return String::new();
    }
    format!("{}", v.round() as i64)
}

fn draw_legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(position)
        .label_font(text(15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.5))
        .draw()?;
    Ok(())
}

fn legend_line(color: RGBColor) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
}

/// Training curves of one run.
struct Training<'a> {
    title: &'a str,
    records: &'a [EvalRecord],
    splits: Vec<String>,
}

/// The x range of a step axis covering `steps`.
fn step_range(steps: impl Iterator<Item = usize>) -> std::ops::Range<f64> {
    let (lo, hi) = steps.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), s| {
        (lo.min(s as f64), hi.max(s as f64))
    });
    linear_range(lo, hi)
}

impl Training<'_> {
    fn step_range(&self) -> std::ops::Range<f64> {
        step_range(self.records.iter().map(|r| r.step))
    }

    /// (step, value) pairs of one split's metric, in record order.
    fn series(&self, split: &str, get: impl Fn(&super::SplitMetrics) -> Option<f64>) -> Vec<(f64, f64)> {
        self.records
            .iter()
            .filter_map(|r| r.splits.get(split).and_then(&get).map(|v| (r.step as f64, v)))
            .collect()
    }
}

/// Accuracy (%) and loss per split over training, side by side.
struct AccuracyFigure<'a>(Training<'a>);

impl Figure for AccuracyFigure<'_> {
    fn size(&self) -> (u32, u32) {
        (1400, 560)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        let t = &self.0;
        root.fill(&WHITE)?;
        let root = root.titled(&format!("{}: accuracy and loss over training", t.title), text(26))?;
        let panels = root.split_evenly((1, 2));

        // Left: accuracy in percent (the y range follows the data so late progress stays visible).
        let acc: Vec<(String, Vec<(f64, f64)>)> = t
            .splits
            .iter()
            .map(|s| (s.clone(), t.series(s, |m| m.accuracy.map(|a| 100.0 * a))))
            .filter(|(_, v)| !v.is_empty())
            .collect();
        let lo = acc
            .iter()
            .flat_map(|(_, v)| v.iter().map(|p| p.1))
            .fold(100.0f64, f64::min);
        let mut chart = ChartBuilder::on(&panels[0])
            .caption("accuracy per split", text(20))
            .margin(15)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(t.step_range(), (lo - 2.0).clamp(0.0, 99.0)..100.0)?;
        chart
            .configure_mesh()
            .x_desc("training step")
            .x_label_formatter(&step_tick)
            .y_desc("accuracy (%)")
            .y_label_formatter(&tick)
            .axis_desc_style(text(18))
            .label_style(text(14))
            .draw()?;
        for (split, pts) in &acc {
            let c = split_color(split, &t.splits);
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
                .label(split.as_str())
                .legend(legend_line(c));
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))?;
        }
        if acc.is_empty() {
            chart.draw_series(std::iter::once(Text::new("no accuracy logged", (0.0, 50.0), text(18))))?;
        } else {
            draw_legend(&mut chart, SeriesLabelPosition::LowerRight)?;
        }

        // Right: loss on a log axis (training loss since the previous eval, and each split's).
        let mut loss: Vec<(String, RGBColor, Curve)> = vec![(
            "train (running)".into(),
            BLACK,
            t.records
                .iter()
                .filter_map(|r| Some((r.step as f64, r.train_loss?)))
                .collect(),
        )];
        for s in &t.splits {
            let pts = t.series(s, |m| m.loss);
            if !pts.is_empty() {
                loss.push((s.clone(), split_color(s, &t.splits), pts));
            }
        }
        let (ylo, yhi) = log_range(loss.iter().flat_map(|(_, _, v)| v.iter().map(|p| p.1)));
        let mut chart = ChartBuilder::on(&panels[1])
            .caption("cross-entropy loss", text(20))
            .margin(15)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(t.step_range(), (ylo..yhi).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("training step")
            .x_label_formatter(&step_tick)
            .y_desc("loss (nats, log scale)")
            .y_label_formatter(&decade_tick)
            .axis_desc_style(text(18))
            .label_style(text(14))
            .draw()?;
        for (name, c, pts) in &loss {
            let pts: Vec<(f64, f64)> = pts.iter().copied().filter(|p| p.1 > 0.0).collect();
            let c = *c;
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
                .label(name.as_str())
                .legend(legend_line(c));
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))?;
        }
        draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        root.present()?;
        Ok(())
    }
}

/// LEE per split over training, one panel per transform, log axis, a shaded band around each
/// line (±1 s.e. for one run, min–max over seeds for a row).
struct LeeFigure {
    title: String,
    /// What the lines and bands are, on the y axis.
    y_desc: &'static str,
    steps: std::ops::Range<f64>,
    /// Every split of the figure in reading order (they pick the colours).
    splits: Vec<String>,
    /// Per transform, the banded line of each split that has one.
    panels: Vec<(String, Vec<(String, Banded)>)>,
}

impl LeeFigure {
    fn grid(&self) -> (usize, usize) {
        let cols = self.panels.len().clamp(1, 3);
        (self.panels.len().div_ceil(cols).max(1), cols)
    }
}

impl Figure for LeeFigure {
    fn size(&self) -> (u32, u32) {
        let (rows, cols) = self.grid();
        (620 * cols as u32, 60 + 480 * rows as u32)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let root = root.titled(&self.title, text(26))?;
        for (panel, (transform, series)) in root.split_evenly(self.grid()).iter().zip(&self.panels) {
            // Band tops count too, so a seed far above the mean stays on the axis; a band bottom
            // near zero (mean − s.e. of a noisy estimate) would stretch the axis, so it is
            // clamped to the floor instead.
            let (ylo, yhi) = log_range(series.iter().flat_map(|(_, v)| v.iter().flat_map(|p| [p.1, p.3])));
            // Zero (an exactly equivariant model) has no place on a log axis: it sits on the floor.
            let clamp = |v: f64| v.max(ylo);
            let mut chart = ChartBuilder::on(panel)
                .caption(format!("transform: {transform}"), text(20))
                .margin(15)
                .x_label_area_size(50)
                .y_label_area_size(80)
                .build_cartesian_2d(self.steps.clone(), (ylo..yhi).log_scale())?;
            chart
                .configure_mesh()
                .x_desc("training step")
                .x_label_formatter(&step_tick)
                .y_desc(self.y_desc)
                .y_label_formatter(&decade_sci)
                .axis_desc_style(text(18))
                .label_style(text(14))
                .draw()?;
            for (split, pts) in series {
                let c = split_color(split, &self.splits);
                let mut band: Vec<(f64, f64)> = pts.iter().map(|&(x, _, _, hi)| (x, clamp(hi))).collect();
                band.extend(pts.iter().rev().map(|&(x, _, lo, _)| (x, clamp(lo))));
                chart.draw_series(std::iter::once(Polygon::new(band, c.mix(0.18))))?;
                let line: Vec<(f64, f64)> = pts.iter().map(|&(x, m, _, _)| (x, clamp(m))).collect();
                chart
                    .draw_series(LineSeries::new(line.clone(), c.stroke_width(2)))?
                    .label(split.as_str())
                    .legend(legend_line(c));
                chart.draw_series(line.iter().map(|&p| Circle::new(p, 3, c.filled())))?;
            }
            if !series.is_empty() {
                draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
            }
        }
        root.present()?;
        Ok(())
    }
}

/// The splits and transforms that appear anywhere in `records`, splits in a reading order
/// (train, val, test, then the rest alphabetically).
fn names_of(records: &[EvalRecord]) -> (Vec<String>, Vec<String>) {
    let mut splits = std::collections::BTreeSet::new();
    let mut transforms = std::collections::BTreeSet::new();
    for r in records {
        for (s, m) in &r.splits {
            splits.insert(s.clone());
            transforms.extend(m.lee.keys().cloned());
        }
    }
    let mut splits: Vec<String> = splits.into_iter().collect();
    splits.sort_by(|a, b| split_rank(a).cmp(&split_rank(b)).then(a.cmp(b)));
    (splits, transforms.into_iter().collect())
}

/// Write `accuracy.{png,svg}` and, when any LEE was logged, `lee.{png,svg}` into `dir`.
/// `title` names the run in the figure titles. Returns the stems written.
pub fn plot_training(dir: &Path, title: &str, records: &[EvalRecord]) -> Result<Vec<PathBuf>, ReportError> {
    if records.is_empty() {
        return Err(ReportError::Invalid {
            what: dir.display().to_string(),
            message: "no metrics records to plot; has the run reached its first eval?".into(),
        });
    }
    let (splits, transforms) = names_of(records);
    let mut written = Vec::new();
    let stem = dir.join(ACCURACY_STEM);
    render(
        &stem,
        &AccuracyFigure(Training {
            title,
            records,
            splits: splits.clone(),
        }),
    )?;
    written.push(stem);
    if !transforms.is_empty() {
        let panels = transforms
            .into_iter()
            .map(|transform| {
                let series = splits
                    .iter()
                    .map(|s| {
                        let pts: Banded = records
                            .iter()
                            .filter_map(|r| {
                                let m = r.splits.get(s)?.lee.get(&transform)?;
                                Some((r.step as f64, m.mean, m.mean - m.stderr, m.mean + m.stderr))
                            })
                            .collect();
                        (s.clone(), pts)
                    })
                    .filter(|(_, v)| !v.is_empty())
                    .collect();
                (transform, series)
            })
            .collect();
        let stem = dir.join(LEE_STEM);
        render(
            &stem,
            &LeeFigure {
                title: format!("{title}: local equivariance error (LEE) over training"),
                y_desc: "LEE (mean ± s.e., log scale)",
                steps: step_range(records.iter().map(|r| r.step)),
                splits,
                panels,
            },
        )?;
        written.push(stem);
    }
    Ok(written)
}

/// Figure 4: cumulative share of the layerwise contributions, in network order.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_axes_label_decades_only() {
        // The values plotters ticks on a log axis from 0.05 to 2: the decades and 2…9 × 10ᵏ.
        let labelled: Vec<String> = [0.05, 0.06, 0.09, 0.1, 0.2, 0.5, 0.9, 1.0, 2.0]
            .iter()
            .map(decade_sci)
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(labelled, ["1e-1", "1e0"]);
        // Decades computed the way an axis does (powers of ten in floating point) still count.
        assert_eq!(decade_sci(&10f64.powi(-3)), "1e-3");
        assert_eq!(decade_tick(&(0.1f64 * 3.0 / 3.0)), "0.1");
        assert_eq!(decade_tick(&0.3), "");
    }
}
