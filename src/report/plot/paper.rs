//! The paper's two summary figures: Figure 4 (cumulative share of the layerwise LEE by step) and
//! Figure 1-right / Table 1's view (test error against test LEE, one point per run).

use super::*;
use crate::report::angles::AngleSeries;

struct LayerwiseFigure<'a> {
    transforms: &'a [(String, Vec<f64>)],
    step_names: &'a [String],
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
        let mut chart = ChartBuilder::on(root)
            .caption("Layerwise LEE: cumulative share by step (paper Fig. 4)", text(26))
            .margin(20)
            .x_label_area_size(230)
            .y_label_area_size(80)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0.0f64..102.0)?;
        chart
            .configure_mesh()
            .x_labels(0)
            .y_label_style(text(14))
            .x_desc("network step (input → output)")
            .y_desc("cumulative share of Σ contributions (%)")
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
    render(path_stem, &LayerwiseFigure { transforms, step_names })
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

struct ScatterFigure<'a> {
    transform: &'a str,
    points: &'a [ScatterPoint],
}

impl Figure for ScatterFigure<'_> {
    fn size(&self) -> (u32, u32) {
        (1000, 700)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        let (xlo, xhi) = log_range(self.points.iter().map(|p| p.lee));
        let (xlo, xhi) = (xlo / 2.0, xhi * 4.0); // room for the labels on the right
        let ymax = self.points.iter().map(|p| p.test_error_pct).fold(0.0f64, f64::max);
        let mut chart = ChartBuilder::on(root)
            .caption(
                format!("Test error vs test LEE ({}), one point per run", self.transform),
                text(26),
            )
            .margin(20)
            .x_label_area_size(60)
            .y_label_area_size(80)
            .build_cartesian_2d((xlo..xhi).log_scale(), 0.0..(ymax * 1.15).max(1.0))?;
        chart
            .configure_mesh()
            .x_desc(format!("test LEE, {} (log scale)", self.transform))
            .y_desc("test error (%)")
            .y_label_formatter(&tick)
            .x_label_formatter(&decade_sci)
            .axis_desc_style(text(18))
            .label_style(text(14))
            .draw()?;
        for (k, p) in self.points.iter().enumerate() {
            let c = PALETTE[k % PALETTE.len()];
            let x = p.lee.max(xlo);
            let y = p.test_error_pct;
            let (a, b) = ((p.lee - p.lee_stderr).max(xlo), (p.lee + p.lee_stderr).max(xlo));
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(a, y), (b, y)],
                c.stroke_width(2),
            )))?;
            chart.draw_series(std::iter::once(Circle::new((x, y), 6, c.filled())))?;
            chart.draw_series(std::iter::once(
                EmptyElement::at((x, y)) + Text::new(p.label.clone(), (10, -18), text(16)),
            ))?;
        }
        root.present()?;
        Ok(())
    }
}

/// The Table-1 view: test error (%) against test LEE for `transform` (log x), one labelled
/// point per run with a ±1 s.e. bar. Runs with a non-finite value are refused.
pub fn plot_error_vs_lee(path_stem: &Path, transform: &str, points: &[ScatterPoint]) -> Result<(), ReportError> {
    if let Some(p) = points
        .iter()
        .find(|p| !(p.test_error_pct.is_finite() && p.lee.is_finite() && p.lee_stderr.is_finite()))
    {
        return Err(ReportError::Invalid {
            what: format!("scatter plot {}", path_stem.display()),
            message: format!("run `{}` has a non-finite test error or LEE", p.label),
        });
    }
    render(path_stem, &ScatterFigure { transform, points })
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
