//! The paper's two summary figures: Figure 4 (cumulative share of the layerwise LEE by step) and
//! Figure 1-right / Table 1's view (test error against test LEE, one point per run, or one marker
//! per row with bars over its seeds).

use super::*;
use crate::report::angles::AngleSeries;

struct LayerwiseFigure<'a> {
    transforms: &'a [(String, Vec<f64>)],
    step_names: &'a [String],
    /// One bar per step (its own share) instead of the cumulative line, under this title.
    bars: Option<&'a str>,
}

impl Figure for LayerwiseFigure<'_> {
    fn size(&self) -> (u32, u32) {
        (((self.step_names.len() as u32) * 22).clamp(1000, 2400), 760)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let n = self.step_names.len();
        let names = self.step_names;
        let caption = self
            .bars
            .unwrap_or("Layerwise LEE: cumulative share by step (paper Fig. 4)");
        let y_desc = if self.bars.is_some() {
            "share of Σ contributions (%)"
        } else {
            "cumulative share of Σ contributions (%)"
        };
        let ymax = match self.bars {
            // Bars: up to the largest share.
            Some(_) => {
                self.transforms
                    .iter()
                    .flat_map(|(_, c)| {
                        let total: f64 = c.iter().sum();
                        c.iter().map(move |v| if total > 0.0 { 100.0 * v / total } else { 0.0 })
                    })
                    .fold(1.0f64, f64::max)
                    * 1.1
            }
            None => 102.0,
        };
        let mut chart = ChartBuilder::on(root)
            .caption(caption, text(26))
            .margin(20)
            .x_label_area_size(230)
            .y_label_area_size(80)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0.0f64..ymax)?;
        chart
            .configure_mesh()
            .x_labels(0)
            .y_label_style(text(14))
            .x_desc("network step (input → output)")
            .y_desc(y_desc)
            .y_label_formatter(&tick)
            .axis_desc_style(text(18))
            .disable_x_mesh()
            .draw()?;
        // Step names under the axis, written downwards from their tick (plotters' own rotated
        // tick labels are centred on the tick and overlap the axis). Every k-th when crowded.
        let stride = n.div_ceil(100).max(1);
        let style = text(13)
            .transform(FontTransform::Rotate90)
            .pos(Pos::new(HPos::Left, VPos::Center));
        for (i, name) in names.iter().enumerate().step_by(stride) {
            let (px, py) = chart.backend_coord(&(i as f64, 0.0));
            root.draw(&Text::new(name.clone(), (px, py + 8), style.clone()))?;
        }
        for (k, (name, contrib)) in self.transforms.iter().enumerate() {
            let c = PALETTE[k % PALETTE.len()];
            let total: f64 = contrib.iter().sum();
            if self.bars.is_some() {
                let w = 0.4 / self.transforms.len() as f64;
                let off = (2 * k + 1) as f64 * w - 0.4;
                chart
                    .draw_series(contrib.iter().enumerate().map(|(i, v)| {
                        let share = if total > 0.0 { 100.0 * v / total } else { 0.0 };
                        let x = i as f64 + off;
                        Rectangle::new([(x - w, 0.0), (x + w, share)], c.filled())
                    }))?
                    .label(format!("{name} (Σ = {total:.2e})"))
                    .legend(legend_line(c));
                continue;
            }
            let mut acc = 0.0;
            let pts: Vec<(f64, f64)> = contrib
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    acc += v;
                    (i as f64, if total > 0.0 { 100.0 * acc / total } else { 0.0 })
                })
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
                .label(format!("{name} (Σ = {total:.2e})"))
                .legend(legend_line(c));
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))?;
        }
        draw_legend(&mut chart, SeriesLabelPosition::LowerRight)?;
        root.present()?;
        Ok(())
    }
}

/// Figure-4-style plot of a layerwise decomposition: for each transform, the cumulative share (%)
/// of its per-step contributions (‖J_{N:i+1} L_X f_i‖²/K, network order) up to each step.
/// Every contribution vector must have one value per entry of `step_names`.
pub fn plot_layerwise(
    path_stem: &Path,
    transforms: &[(String, Vec<f64>)],
    step_names: &[String],
) -> Result<(), ReportError> {
    check_layerwise(path_stem, transforms, step_names)?;
    render(
        path_stem,
        &LayerwiseFigure {
            transforms,
            step_names,
            bars: None,
        },
    )
}

/// One model's layerwise decomposition as bars: each step's share (%) of the summed
/// contributions, one bar per step and transform, under `title`.
pub fn plot_layerwise_bars(
    path_stem: &Path,
    title: &str,
    transforms: &[(String, Vec<f64>)],
    step_names: &[String],
) -> Result<(), ReportError> {
    check_layerwise(path_stem, transforms, step_names)?;
    render(
        path_stem,
        &LayerwiseFigure {
            transforms,
            step_names,
            bars: Some(title),
        },
    )
}

/// Refuse a layerwise plot whose contributions do not fit its steps or are not squared norms.
fn check_layerwise(
    path_stem: &Path,
    transforms: &[(String, Vec<f64>)],
    step_names: &[String],
) -> Result<(), ReportError> {
    let bad = |message: String| ReportError::Invalid {
        what: format!("layerwise plot {}", path_stem.display()),
        message,
    };
    if step_names.is_empty() || transforms.is_empty() {
        return Err(bad("needs at least one step and one transform".into()));
    }
    for (name, c) in transforms {
        if c.len() != step_names.len() {
            return Err(bad(format!(
                "transform `{name}` has {} contributions for {} steps",
                c.len(),
                step_names.len()
            )));
        }
        if let Some(v) = c.iter().find(|v| !v.is_finite() || **v < 0.0) {
            return Err(bad(format!(
                "transform `{name}` has contribution {v}; squared norms are finite and ≥ 0"
            )));
        }
    }
    Ok(())
}

/// One run in the error-vs-LEE scatter.
#[derive(Clone, Debug, PartialEq)]
pub struct ScatterPoint {
    pub label: String,
    /// Test error in percent.
    pub test_error_pct: f64,
    /// Test-split LEE mean and its standard error.
    pub lee: f64,
    pub lee_stderr: f64,
}

/// One row (a config over its seeds) in the error-vs-LEE scatter: means over the seeds and their
/// sample standard deviations (0 for a single seed).
#[derive(Clone, Debug, PartialEq)]
pub struct RowPoint {
    pub row: String,
    /// Runs the means are over.
    pub seeds: usize,
    pub test_error_pct: f64,
    pub test_error_std: f64,
    pub lee: f64,
    pub lee_std: f64,
}

/// A marker with its half-widths on each axis.
struct Marker {
    label: String,
    /// Colour index (PALETTE).
    colour: usize,
    x: f64,
    x_bar: f64,
    y: f64,
    y_bar: f64,
}

struct ScatterFigure {
    title: String,
    x_desc: String,
    y_desc: &'static str,
    markers: Vec<Marker>,
    /// Name the markers in a legend beside the plot instead of a label beside each point (which
    /// collide once there are many runs).
    legend: bool,
    /// The names of the colours (a family per colour), listed in the plot's corner.
    families: Vec<String>,
}

/// Width of the scatter's plot, and of the legend column beside it when there is one.
const PLOT_WIDTH: u32 = 1000;
const LEGEND_WIDTH: u32 = 330;

impl Figure for ScatterFigure {
    fn size(&self) -> (u32, u32) {
        (PLOT_WIDTH + if self.legend { LEGEND_WIDTH } else { 0 }, 700)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let (plot, side) = if self.legend {
            let (plot, side) = root.split_horizontally(PLOT_WIDTH);
            (plot, Some(side))
        } else {
            (root.clone(), None)
        };
        let (xlo, xhi) = log_range(self.markers.iter().flat_map(|m| [m.x, m.x + m.x_bar]));
        // Room on the right for the labels beside the points.
        let (xlo, xhi) = if self.legend {
            (xlo, xhi)
        } else {
            (xlo / 2.0, xhi * 4.0)
        };
        let ymax = self.markers.iter().map(|m| m.y + m.y_bar).fold(0.0f64, f64::max);
        let mut chart = ChartBuilder::on(&plot)
            .caption(&self.title, text(22))
            .margin(20)
            .x_label_area_size(60)
            .y_label_area_size(80)
            .build_cartesian_2d((xlo..xhi).log_scale(), 0.0..(ymax * 1.15).max(1.0))?;
        chart
            .configure_mesh()
            .x_desc(self.x_desc.as_str())
            .y_desc(self.y_desc)
            .y_label_formatter(&tick)
            .x_label_formatter(&decade_sci)
            .axis_desc_style(text(18))
            .label_style(text(14))
            .draw()?;
        for m in &self.markers {
            let c = PALETTE[m.colour % PALETTE.len()];
            let bar = c.stroke_width(2);
            let (x, y) = (m.x.max(xlo), m.y);
            // Caps are in pixels, so they look the same anywhere on the log axis; an end clamped
            // to an axis floor (a bar reaching below it) gets none.
            let mut caps = Vec::new();
            if m.x_bar > 0.0 {
                let (a, b) = (m.x - m.x_bar, m.x + m.x_bar);
                chart.draw_series(std::iter::once(PathElement::new(vec![(a.max(xlo), y), (b, y)], bar)))?;
                caps.extend([(a, y, false), (b, y, false)].into_iter().filter(|c| c.0 > xlo));
            }
            if m.y_bar > 0.0 {
                let (lo, hi) = (m.y - m.y_bar, m.y + m.y_bar);
                chart.draw_series(std::iter::once(PathElement::new(vec![(x, lo.max(0.0)), (x, hi)], bar)))?;
                caps.extend([(x, lo, true), (x, hi, true)].into_iter().filter(|c| c.1 >= 0.0));
            }
            chart.draw_series(caps.into_iter().map(|(cx, cy, flat)| {
                let cap = if flat {
                    vec![(-6, 0), (6, 0)]
                } else {
                    vec![(0, -6), (0, 6)]
                };
                EmptyElement::at((cx, cy)) + PathElement::new(cap, bar)
            }))?;
            chart.draw_series(std::iter::once(Circle::new((x, y), 7, c.filled())))?;
            if !self.legend {
                chart.draw_series(std::iter::once(
                    EmptyElement::at((x, y)) + Text::new(m.label.clone(), (10, -18), text(16)),
                ))?;
            }
        }
        for (k, family) in self.families.iter().enumerate() {
            let c = PALETTE[k % PALETTE.len()];
            let y = 90 + 26 * k as i32;
            plot.draw(&Circle::new((120, y), 6, c.filled()))?;
            plot.draw(&Text::new(family.clone(), (134, y - 8), text(16)))?;
        }
        if let Some(side) = side {
            side.draw(&Text::new("rows", (10, 70), text(18)))?;
            for (k, m) in self.markers.iter().enumerate() {
                let c = PALETTE[m.colour % PALETTE.len()];
                let y = 110 + 34 * k as i32;
                side.draw(&Circle::new((22, y), 7, c.filled()))?;
                side.draw(&Text::new(m.label.clone(), (40, y - 9), text(16)))?;
            }
        }
        root.present()?;
        Ok(())
    }
}

/// Refuse a scatter with a non-finite number, naming the offending run or row.
fn check_finite<'a, const N: usize>(
    path_stem: &Path,
    items: impl IntoIterator<Item = (&'a str, [f64; N])>,
) -> Result<(), ReportError> {
    match items.into_iter().find(|(_, v)| !v.iter().all(|x| x.is_finite())) {
        Some((label, _)) => Err(ReportError::Invalid {
            what: format!("scatter plot {}", path_stem.display()),
            message: format!("`{label}` has a non-finite test error or LEE"),
        }),
        None => Ok(()),
    }
}

/// The Table-1 view: test error (%) against test LEE for `transform` (log x), one labelled
/// point per run with a ±1 s.e. bar. Runs with a non-finite value are refused.
pub fn plot_error_vs_lee(path_stem: &Path, transform: &str, points: &[ScatterPoint]) -> Result<(), ReportError> {
    check_finite(
        path_stem,
        points
            .iter()
            .map(|p| (p.label.as_str(), [p.test_error_pct, p.lee, p.lee_stderr])),
    )?;
    let markers = points
        .iter()
        .enumerate()
        .map(|(k, p)| Marker {
            label: p.label.clone(),
            colour: k,
            x: p.lee,
            x_bar: p.lee_stderr,
            y: p.test_error_pct,
            y_bar: 0.0,
        })
        .collect();
    let figure = ScatterFigure {
        title: format!("Test error vs test LEE ({transform}), one point per run"),
        x_desc: format!("test LEE, {transform} (log scale), bar ±1 s.e."),
        y_desc: "test error (%)",
        markers,
        legend: false,
        families: Vec::new(),
    };
    render(path_stem, &figure)
}

/// The paper's Figure-1 view of a model zoo: error (%) against LEE for `transform` (log x), one
/// labelled point per model with a ±1 s.e. bar, one colour per family (`points[i].1`), the
/// families named in the corner.
pub fn plot_family_error_vs_lee(
    path_stem: &Path,
    transform: &str,
    split: &str,
    points: &[(ScatterPoint, String)],
) -> Result<(), ReportError> {
    check_finite(
        path_stem,
        points
            .iter()
            .map(|(p, _)| (p.label.as_str(), [p.test_error_pct, p.lee, p.lee_stderr])),
    )?;
    let mut families: Vec<String> = Vec::new();
    for (_, f) in points {
        if !families.contains(f) {
            families.push(f.clone());
        }
    }
    let markers = points
        .iter()
        .map(|(p, f)| Marker {
            label: p.label.clone(),
            colour: families.iter().position(|g| g == f).unwrap_or(0),
            x: p.lee,
            x_bar: p.lee_stderr,
            y: p.test_error_pct,
            y_bar: 0.0,
        })
        .collect();
    let figure = ScatterFigure {
        title: format!("Error vs LEE ({transform}) on {split}, one point per model (paper Fig. 1)"),
        x_desc: format!("{split} LEE, {transform} (log scale), bar ±1 s.e."),
        y_desc: "error (%)",
        markers,
        legend: false,
        families,
    };
    render(path_stem, &figure)
}

/// The Table-1 view over seeds: one marker per row at (mean test LEE for `transform`, mean test
/// error), bars of ±1 sample standard deviation over the row's seeds on both axes, log x, and a
/// legend naming each row with its seed count. Rows with a non-finite value are refused.
pub fn plot_rows_error_vs_lee(path_stem: &Path, transform: &str, rows: &[RowPoint]) -> Result<(), ReportError> {
    check_finite(
        path_stem,
        rows.iter()
            .map(|r| (r.row.as_str(), [r.test_error_pct, r.test_error_std, r.lee, r.lee_std])),
    )?;
    let markers = rows
        .iter()
        .enumerate()
        .map(|(k, r)| Marker {
            colour: k,
            label: format!(
                "{} ({} {})",
                r.row,
                r.seeds,
                if r.seeds == 1 { "seed" } else { "seeds" }
            ),
            x: r.lee,
            x_bar: r.lee_std,
            y: r.test_error_pct,
            y_bar: r.test_error_std,
        })
        .collect();
    let figure = ScatterFigure {
        title: format!("Test error vs test LEE ({transform}), one marker per row, mean over seeds"),
        x_desc: format!("test LEE, {transform} (log scale), mean, bar ±1 sample std over seeds"),
        y_desc: "test error (%), mean, bar ±1 sample std over seeds",
        markers,
        legend: true,
        families: Vec::new(),
    };
    render(path_stem, &figure)
}

/// Error and true-class probability against the extra rotation angle, one line per series.
struct AngleFigure<'a> {
    series: &'a [AngleSeries],
}

impl Figure for AngleFigure<'_> {
    fn size(&self) -> (u32, u32) {
        (1500, 620)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let panels = root.split_evenly((1, 2));
        let emax = self
            .series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|q| q.1))
            .fold(0.0f64, f64::max);
        for (i, panel) in panels.iter().enumerate() {
            let (caption, ydesc, ymax) = match i {
                0 => ("test error vs rotation", "error (%)", (emax * 1.1).max(1.0)),
                _ => ("confidence vs rotation", "mean p(true class)", 1.0),
            };
            let mut chart = ChartBuilder::on(panel)
                .caption(caption, text(20))
                .margin(15)
                .x_label_area_size(50)
                .y_label_area_size(70)
                .build_cartesian_2d(0.0f64..360.0, 0.0f64..ymax)?;
            chart
                .configure_mesh()
                .x_desc("extra rotation θ (degrees)")
                .y_desc(ydesc)
                .x_labels(9)
                .x_label_formatter(&tick)
                .y_label_formatter(&tick)
                .axis_desc_style(text(18))
                .label_style(text(14))
                .draw()?;
            for (k, (label, pts)) in self.series.iter().enumerate() {
                let c = PALETTE[k % PALETTE.len()];
                let line: Vec<(f64, f64)> = pts.iter().map(|p| (p.0, if i == 0 { p.1 } else { p.2 })).collect();
                chart
                    .draw_series(LineSeries::new(line, c.stroke_width(2)))?
                    .label(label.as_str())
                    .legend(legend_line(c));
            }
            draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        }
        root.present()?;
        Ok(())
    }
}

/// Error (%) and mean true-class probability against the extra rotation angle, one line per
/// `(label, [(degrees, error %, probability)])`, as `<stem>.{png,svg}`.
pub fn plot_angles(path_stem: &Path, series: &[AngleSeries]) -> Result<(), ReportError> {
    if series.iter().all(|(_, p)| p.is_empty()) {
        return Err(ReportError::Invalid {
            what: format!("angle plot {}", path_stem.display()),
            message: "no points".into(),
        });
    }
    render(path_stem, &AngleFigure { series })
}
