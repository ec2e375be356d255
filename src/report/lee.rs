//! What `liederiv lee` prints and writes: the split × transform table, the layerwise tables and
//! CSV (paper Eq. 6, Figure 4), and the JSON document, whose schema is the serde structs below:
//! `{"model", "checkpoint", "stencil", "statistic", "output", "splits": {"test": {"n",
//! "accuracy", "lee": {"rotate": {"mean", "stderr"}, "rotate_scaled": ..., ...}, "metrics": {...},
//! "group": {"order", "angles_deg", "layers": [{"step", "errors": [...]}]}}, ...},
//! "layerwise": {"rotate": {"steps": [...], "sum_rel_error", "end_to_end", "n", "probes"}},
//! "layerwise_split"}`.

use crate::config::{LeeOutput, ModelKind, Statistic};
use crate::jvp::StepKind;
use crate::lie::{GroupReport, LayerwiseReport, LeeSpec, LeeSummary, MetricStat};
use crate::transforms::Stencil;
use serde::Serialize;
use std::collections::BTreeMap;

/// Everything measured on one split.
pub struct SplitResult {
    pub name: String,
    pub summary: LeeSummary,
    pub metrics: Vec<MetricStat>,
    pub group: Option<GroupReport>,
}

/// Split × transform: mean ± stderr, plus accuracy; then any metrics.
pub fn lee_table(spec: &LeeSpec, results: &[SplitResult]) -> String {
    let mut s = format!(
        "LEE ({}, {} stencil{}), mean ± stderr over images\n{:<14}{:>7}{:>9}",
        spec.statistic.name(),
        spec.stencil.name(),
        match spec.output {
            LeeOutput::Probs => String::new(),
            o => format!(", {o}"),
        },
        "split",
        "n",
        "acc"
    );
    for e in results.first().map(|r| r.summary.entries()).unwrap_or_default() {
        s += &format!("{:>24}", e.name);
    }
    s.push('\n');
    for r in results {
        let acc = r.summary.accuracy.map_or("-".to_string(), |a| format!("{a:.4}"));
        s += &format!("{:<14}{:>7}{:>9}", r.name, r.summary.n, acc);
        for e in r.summary.entries() {
            s += &format!("{:>24}", format!("{:.3e} ± {:.1e}", e.mean, e.stderr));
        }
        s.push('\n');
    }
    for r in results.iter().filter(|r| !r.metrics.is_empty()) {
        s += &format!("metrics on {} ({} images)\n", r.name, r.summary.n);
        for m in &r.metrics {
            s += &format!(
                "  {:<18}{:.4e} ± {:.1e}  ({} draws/image)\n",
                m.name,
                m.stat.mean(),
                m.stat.stderr(),
                m.draws
            );
        }
    }
    for r in results {
        if let Some(g) = &r.group {
            s += &group_table(&r.name, r.summary.n, g);
        }
    }
    s
}

/// One row per step, one column per group element: mean ± stderr of ‖f(g·x) − ρ(g)f(x)‖/‖f(x)‖.
pub fn group_table(split: &str, n: usize, g: &GroupReport) -> String {
    let mut s = format!(
        "C{} equivariance error ‖f(g·x) − ρ(g)·f(x)‖ / ‖f(x)‖ per step on {split} ({n} images)\n{:<24}",
        g.order, "step"
    );
    for a in &g.angles_deg {
        s += &format!("{:>22}", format!("{a}°"));
    }
    s.push('\n');
    for l in &g.layers {
        s += &format!("{:<24}", l.name);
        for e in &l.errors {
            s += &format!("{:>22}", format!("{:.2e} ± {:.0e}", e.mean(), e.stderr()));
        }
        s.push('\n');
    }
    s
}

/// The snake-case name a step kind has in the JSON and CSV.
fn kind_name(kind: StepKind) -> String {
    serde_json::to_value(kind)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

/// One transform's decomposition, one line per step.
pub fn layerwise_table(rep: &LayerwiseReport) -> String {
    let mut s = format!(
        "layerwise {} ({} images, {}): end-to-end {:.3e}, sum rel error {:.1e}\n{:>4}  {:<28}{:<12}{:>12}{:>8}{:>8}{:>12}{:>12}\n",
        rep.transform,
        rep.n,
        if rep.probes == 0 { "exact".to_string() } else { format!("{} probes", rep.probes) },
        rep.end_to_end,
        rep.sum_rel_error,
        "i",
        "step",
        "kind",
        "‖c‖²/K",
        "share",
        "cum",
        "EQ-Tf/N",
        "EQ-Tf/√N"
    );
    for st in &rep.steps {
        s += &format!(
            "{:>4}  {:<28}{:<12}{:>12.3e}{:>7.1}%{:>7.1}%{:>12.3e}{:>12.3e}\n",
            st.index,
            st.step,
            kind_name(st.kind),
            st.contribution,
            100.0 * st.share,
            100.0 * st.cumulative,
            st.eq_t_frac_n,
            st.eq_t_frac_sqrt_n
        );
    }
    s
}

/// Every transform's decomposition as CSV, one row per (transform, step).
pub fn layerwise_csv(reps: &[LayerwiseReport]) -> String {
    let mut s = String::from("transform,index,step,kind,contribution,share,cumulative,eq_t_frac_n,eq_t_frac_sqrt_n\n");
    for rep in reps {
        for st in &rep.steps {
            s += &format!(
                "{},{},{},{},{:e},{:e},{:e},{:e},{:e}\n",
                rep.transform,
                st.index,
                st.step,
                kind_name(st.kind),
                st.contribution,
                st.share,
                st.cumulative,
                st.eq_t_frac_n,
                st.eq_t_frac_sqrt_n
            );
        }
    }
    s
}

/// The `--json` document of `liederiv lee`.
#[derive(Serialize)]
pub struct LeeDoc {
    pub model: ModelKind,
    /// The checkpoint measured, when one was loaded.
    pub checkpoint: Option<String>,
    pub stencil: Stencil,
    pub statistic: Statistic,
    /// The output differentiated; for `features` / `tokens` every split also holds the
    /// scale-free forms as `<transform>_scaled`.
    pub output: LeeOutput,
    pub splits: BTreeMap<String, SplitDoc>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub layerwise: BTreeMap<String, LayerwiseDoc>,
    /// The split the layerwise decomposition ran on (present with `layerwise`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layerwise_split: Option<String>,
}

#[derive(Serialize)]
pub struct SplitDoc {
    pub n: usize,
    pub accuracy: Option<f64>,
    pub lee: BTreeMap<String, MeanStderrDoc>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, MetricDoc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupDoc>,
}

/// `--metrics group`: the C_N equivariance error of every step, per group element.
#[derive(Serialize)]
pub struct GroupDoc {
    pub order: usize,
    pub angles_deg: Vec<f64>,
    /// Per step in network order: `{"step", "errors": [{"mean", "stderr"}, ...]}` (one per angle).
    pub layers: Vec<GroupLayerDoc>,
}

#[derive(Serialize)]
pub struct GroupLayerDoc {
    pub step: String,
    pub errors: Vec<MeanStderrDoc>,
}

#[derive(Serialize)]
pub struct MeanStderrDoc {
    pub mean: f64,
    pub stderr: f64,
}

#[derive(Serialize)]
pub struct MetricDoc {
    pub mean: f64,
    pub stderr: f64,
    pub n: usize,
    pub draws: usize,
}

#[derive(Serialize)]
pub struct LayerwiseDoc {
    pub steps: Vec<StepDoc>,
    pub sum_rel_error: f64,
    pub end_to_end: f64,
    pub n: usize,
    pub probes: usize,
}

#[derive(Serialize)]
pub struct StepDoc {
    pub index: usize,
    pub step: String,
    pub kind: StepKind,
    pub contribution: f64,
    pub share: f64,
    pub cumulative: f64,
    pub eq_t_frac_n: f64,
    pub eq_t_frac_sqrt_n: f64,
}

impl LeeDoc {
    pub fn new(
        model: ModelKind,
        checkpoint: Option<String>,
        spec: &LeeSpec,
        results: &[SplitResult],
        layerwise: &[LayerwiseReport],
        layerwise_split: Option<&String>,
    ) -> Self {
        let splits = results
            .iter()
            .map(|r| {
                let lee = r.summary.entries().into_iter().map(|e| {
                    let v = MeanStderrDoc {
                        mean: e.mean,
                        stderr: e.stderr,
                    };
                    (e.name, v)
                });
                let metrics = r.metrics.iter().map(|m| {
                    let v = MetricDoc {
                        mean: m.stat.mean(),
                        stderr: m.stat.stderr(),
                        n: m.stat.n(),
                        draws: m.draws,
                    };
                    (m.name.clone(), v)
                });
                let doc = SplitDoc {
                    n: r.summary.n,
                    accuracy: r.summary.accuracy,
                    lee: lee.collect(),
                    metrics: metrics.collect(),
                    group: r.group.as_ref().map(|g| GroupDoc {
                        order: g.order,
                        angles_deg: g.angles_deg.clone(),
                        layers: g
                            .layers
                            .iter()
                            .map(|l| GroupLayerDoc {
                                step: l.name.clone(),
                                errors: l
                                    .errors
                                    .iter()
                                    .map(|e| MeanStderrDoc {
                                        mean: e.mean(),
                                        stderr: e.stderr(),
                                    })
                                    .collect(),
                            })
                            .collect(),
                    }),
                };
                (r.name.clone(), doc)
            })
            .collect();
        let layerwise: BTreeMap<String, LayerwiseDoc> = layerwise
            .iter()
            .map(|rep| {
                let steps = rep
                    .steps
                    .iter()
                    .map(|st| StepDoc {
                        index: st.index,
                        step: st.step.clone(),
                        kind: st.kind,
                        contribution: st.contribution,
                        share: st.share,
                        cumulative: st.cumulative,
                        eq_t_frac_n: st.eq_t_frac_n,
                        eq_t_frac_sqrt_n: st.eq_t_frac_sqrt_n,
                    })
                    .collect();
                let doc = LayerwiseDoc {
                    steps,
                    sum_rel_error: rep.sum_rel_error,
                    end_to_end: rep.end_to_end,
                    n: rep.n,
                    probes: rep.probes,
                };
                (rep.transform.name().to_string(), doc)
            })
            .collect();
        let layerwise_split = (!layerwise.is_empty()).then(|| layerwise_split.cloned()).flatten();
        Self {
            model,
            checkpoint,
            stencil: spec.stencil,
            statistic: spec.statistic,
            output: spec.output,
            splits,
            layerwise,
            layerwise_split,
        }
    }
}
