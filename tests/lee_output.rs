//! `lee.output`: the LEE of logits, pooled features and tokens (issue 20, part 1). Oracles: an
//! exactly rotation-invariant representation (zero feature LEE, computed, not hard-coded), the
//! closed form of a linear representation (raw and scale-free, in f64 outside the LEE code), f64
//! central differences of every readout of the real models, and the linear head that links the
//! features to the logits.

mod common;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarMap;
use common::{blob_images, randn, rng, tiny_vit_config};
use liederiv::jvp::{merge_tangent, Jvp, Repr, StepKind, Tape};
use liederiv::lie::{lee_penalty, lee_split, LeeOutput, LeeSpec, Statistic};
use liederiv::models::{build_with, Model, Readout, ReadoutJvp, Rng};
use liederiv::transforms::{coord, image_lie_derivative, Stencil, Transform};
use liederiv::Config;

const SIZE: usize = 28;

/// features = tanh(Σ_p w_k(p)·x_p) with per-feature pixel weights `w: (D, H·W)`, logits = F·head.
struct Representation {
    w: Tensor,
    head: Tensor,
    /// Apply tanh (else the features are the linear map w·x).
    tanh: bool,
}

impl Representation {
    fn features(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let z = x.flatten_from(1)?.matmul(&self.w.t()?)?;
        let f = if self.tanh { z.tanh()? } else { z.clone() };
        Ok((z, f))
    }
}

impl Jvp for Representation {
    fn jvp(&self, x: &Tensor, dx: &Tensor, tape: &mut Tape) -> Result<(Tensor, Tensor)> {
        let r = self.jvp_at(x, dx, tape, Readout::Logits)?;
        Ok((r.y, r.dy))
    }
}

impl Model for Representation {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.features(x)?.1.matmul(&self.head)
    }
    fn forward_train(&self, x: &Tensor, _rng: &mut Rng) -> Result<Tensor> {
        self.forward(x)
    }
    fn jvp_at(&self, x: &Tensor, dx: &Tensor, tape: &mut Tape, at: Readout) -> Result<ReadoutJvp> {
        let (z, f) = self.features(x)?;
        let (t, b) = (dx.dim(0)?, dx.dim(1)?);
        let mut df = dx.reshape((t, b, ()))?.broadcast_matmul(&self.w.t()?)?;
        if self.tanh {
            df = df.broadcast_mul(&(1.0 - z.tanh()?.sqr()?)?.unsqueeze(0)?)?;
        }
        let df = tape.step("features", StepKind::Pool, Repr::Invariant, &f, df)?;
        let logits = f.matmul(&self.head)?;
        Ok(match at {
            Readout::Features => ReadoutJvp { logits, y: f, dy: df },
            _ => ReadoutJvp {
                dy: df.broadcast_matmul(&self.head)?,
                y: logits.clone(),
                logits,
            },
        })
    }
}

/// Pixel weights `(rows, H·W)` from a function of the normalised coordinates (u_x, u_y).
fn weights(rows: &[&dyn Fn(f64, f64) -> f64]) -> Tensor {
    let v: Vec<f64> = rows
        .iter()
        .flat_map(|f| (0..SIZE * SIZE).map(move |p| f(coord(p % SIZE, SIZE), coord(p / SIZE, SIZE))))
        .collect();
    Tensor::from_vec(v, (rows.len(), SIZE * SIZE), &Device::Cpu).unwrap()
}

fn spec(output: LeeOutput, statistic: Statistic) -> LeeSpec {
    LeeSpec {
        transforms: vec![Transform::Rotate, Transform::TranslateX],
        stencil: Stencil::Central,
        statistic,
        output,
        batch_size: 3,
    }
}

/// Images that vanish in a border ring, so the central stencil's summation by parts has no
/// boundary term.
fn images(b: usize, seed: u64) -> Tensor {
    blob_images(b, 1, SIZE, 3, DType::F64, &mut rng(seed))
}

/// tanh of the mass and of the second radial moment Σ (u_x² + u_y²)·x: invariant under
/// rotations about the centre exactly, also on the grid (the central difference of a quadratic
/// is exact, so Σ_p w_p (L_rot x)_p sums by parts to Σ_p x_p (u_y ∂_x w − u_x ∂_y w) = 0).
#[test]
fn an_invariant_representation_has_zero_feature_lee() {
    let head = randn(&[2, 10], 1.0, DType::F64, &mut rng(3));
    let mass = |_: f64, _: f64| 0.02;
    let radial = |ux: f64, uy: f64| 0.05 * (ux * ux + uy * uy);
    let invariant = Representation {
        w: weights(&[&mass, &radial]),
        head: head.clone(),
        tanh: true,
    };
    // The control: a moment along one axis only is not invariant.
    let along_x = |ux: f64, _: f64| 0.05 * ux * ux;
    let control = Representation {
        w: weights(&[&mass, &along_x]),
        head,
        tanh: true,
    };
    let x = images(6, 1);
    let sp = spec(LeeOutput::Features, Statistic::Sq);
    let lee = lee_split(&invariant, &x, None, &sp).unwrap();
    let other = lee_split(&control, &x, None, &sp).unwrap();
    let (rot, rot_control) = (lee.lee[0].1.mean(), other.lee[0].1.mean());
    assert!(rot < 1e-28, "rotation LEE of an invariant representation: {rot:e}");
    assert!(
        rot_control > 1e-8,
        "the control's rotation LEE {rot_control:e} should be far from 0"
    );
    // Translation moves the mass off-centre: the radial moment changes.
    assert!(lee.lee[1].1.mean() > 1e-8, "translate: {:e}", lee.lee[1].1.mean());
    // The logits and probabilities of the invariant representation are invariant too.
    for output in [LeeOutput::Logits, LeeOutput::Probs] {
        let l = lee_split(&invariant, &x, None, &spec(output, Statistic::Sq)).unwrap();
        assert!(l.lee[0].1.mean() < 1e-26, "{output}: {:e}", l.lee[0].1.mean());
    }
}

/// For F(x) = A·x: L_X F = A·L_X x, so LEE = (1/D)·Σ_k (A·L_X x)_k² per image (`sq`) or
/// (1/D)·Σ_k |…| (`abs`); the scale-free forms divide the split means by the mean over images of
/// (1/D)·Σ_k F_k² (`sq`) or its root (`abs`). Computed here with plain f64 loops.
#[test]
fn feature_lee_of_a_linear_map_is_its_closed_form() {
    let (d, n) = (5, 7);
    let a = randn(&[d, SIZE * SIZE], 0.1, DType::F64, &mut rng(5));
    let model = Representation {
        w: a.clone(),
        head: randn(&[d, 10], 1.0, DType::F64, &mut rng(6)),
        tanh: false,
    };
    let x = images(n, 2);
    let a_rows: Vec<Vec<f64>> = a.to_vec2().unwrap();
    let apply = |img: &[f64]| -> Vec<f64> {
        a_rows
            .iter()
            .map(|r| r.iter().zip(img).map(|(w, v)| w * v).sum())
            .collect()
    };
    let flat = |t: &Tensor| -> Vec<Vec<f64>> { t.flatten_from(1).unwrap().to_vec2().unwrap() };
    let xs = flat(&x);
    let mean_sq: f64 = xs
        .iter()
        .map(|img| apply(img).iter().map(|f| f * f).sum::<f64>() / d as f64)
        .sum::<f64>()
        / n as f64;
    for statistic in [Statistic::Sq, Statistic::Abs] {
        let sp = spec(LeeOutput::Features, statistic);
        let summary = lee_split(&model, &x, None, &sp).unwrap();
        let entries = summary.entries();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["rotate", "translate_x", "rotate_scaled", "translate_x_scaled"]);
        for (t, tr) in sp.transforms.iter().enumerate() {
            let lx = flat(&image_lie_derivative(&x, *tr, Stencil::Central).unwrap());
            let per: Vec<f64> = lx
                .iter()
                .map(|img| {
                    let v = apply(img);
                    match statistic {
                        Statistic::Sq => v.iter().map(|c| c * c).sum::<f64>() / d as f64,
                        Statistic::Abs => v.iter().map(|c| c.abs()).sum::<f64>() / d as f64,
                    }
                })
                .collect();
            let want = per.iter().sum::<f64>() / n as f64;
            let div = match statistic {
                Statistic::Sq => mean_sq,
                Statistic::Abs => mean_sq.sqrt(),
            };
            let (raw, scaled) = (&entries[t], &entries[t + 2]);
            assert!(
                (raw.mean - want).abs() < 1e-12 * want,
                "{statistic} {tr}: {} vs {want}",
                raw.mean
            );
            assert!(
                (scaled.mean - want / div).abs() < 1e-12 * want / div,
                "{statistic} {tr} scaled: {} vs {}",
                scaled.mean,
                want / div
            );
            assert_eq!((raw.n, scaled.n), (n, n));
        }
        // Scale-free: 3·A has 9× (sq) or 3× (abs) the raw LEE and the same scale-free LEE.
        let tripled = Representation {
            w: (&a * 3.0).unwrap(),
            head: model.head.clone(),
            tanh: false,
        };
        let e3 = lee_split(&tripled, &x, None, &sp).unwrap().entries();
        let factor = if statistic == Statistic::Sq { 9.0 } else { 3.0 };
        for (e, e3) in entries.iter().zip(&e3) {
            let want = if e.name.ends_with("_scaled") {
                e.mean
            } else {
                factor * e.mean
            };
            assert!(
                (e3.mean - want).abs() < 1e-12 * want,
                "{statistic} {}: {} vs {want}",
                e.name,
                e3.mean
            );
        }
    }
    // The probabilities and logits have no scale-free form.
    let probs = lee_split(&model, &x, None, &spec(LeeOutput::Probs, Statistic::Sq)).unwrap();
    assert_eq!(probs.entries().len(), 2);
    // The penalty on a representation is its scale-free mean over the batch and transforms.
    let trs = [Transform::Rotate];
    let pen = lee_penalty(&model, &x, &trs, Stencil::Central, LeeOutput::Features)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let rot = lee_split(&model, &x, None, &spec(LeeOutput::Features, Statistic::Sq))
        .unwrap()
        .entries()[2]
        .mean;
    assert!((pen - rot).abs() < 1e-12 * rot, "penalty {pen} vs scale-free LEE {rot}");
}

fn configs() -> Vec<(&'static str, Config)> {
    let conv = |kind: &str, extra: &[&str]| {
        let mut sets = vec![format!("model.kind=\"{kind}\"")];
        sets.extend(extra.iter().map(|s| s.to_string()));
        Config::resolve_str("", "<test>", &sets).unwrap()
    };
    vec![
        ("vit_mean", tiny_vit_config(16, &["model.vit.pool=\"mean\""])),
        ("vit_cls", tiny_vit_config(16, &[])),
        ("cnn", conv("cnn", &["model.cnn.widths=[4, 8]"])),
        (
            "gcnn",
            conv(
                "gcnn",
                &[
                    "model.gcnn.widths=[2, 2]",
                    "model.gcnn.group_order=4",
                    "model.gcnn.kernel_size=3",
                ],
            ),
        ),
    ]
}

/// Every readout of the real models against f64 central differences of the readout's own
/// primal, along a random input direction, and the features against the logits through the
/// linear head (logits = F·Wᵀ + b, so dlogits = dF·Wᵀ).
#[test]
fn readouts_of_the_real_models_match_finite_differences_and_the_head() {
    for (name, cfg) in configs() {
        let vm = VarMap::new();
        let model = build_with(&cfg, &vm, DType::F64, &Device::Cpu).unwrap();
        let x = randn(&[2, 1, SIZE, SIZE], 1.0, DType::F64, &mut rng(7));
        let v = randn(&[1, 2, 1, SIZE, SIZE], 1.0, DType::F64, &mut rng(8));
        let mut readouts = vec![Readout::Logits, Readout::Features];
        if name.starts_with("vit") {
            readouts.push(Readout::Tokens);
        }
        for at in readouts {
            let r = model.jvp_at(&x, &v, &mut Tape::off(), at).unwrap();
            let eps = 1e-5;
            let (vm1, _) = merge_tangent(&v).unwrap();
            let y = |s: f64| {
                model
                    .jvp_at(&(&x + (&vm1 * s).unwrap()).unwrap(), &v, &mut Tape::off(), at)
                    .unwrap()
                    .y
            };
            let fd = ((y(eps) - y(-eps)).unwrap() / (2.0 * eps)).unwrap();
            let dy = r.dy.get(0).unwrap();
            assert_eq!(fd.dims(), dy.dims(), "{name} {at:?}");
            let err = common::max_abs_diff(&fd, &dy) / common::max_abs(&fd).max(1e-12);
            assert!(
                err < 1e-6,
                "{name} {at:?}: relative error {err:e} against f64 central differences"
            );
            let logits = model.forward(&x).unwrap();
            assert!(
                common::max_abs_diff(&r.logits, &logits) < 1e-12,
                "{name} {at:?}: logits differ"
            );
        }
        let (head_w, head_b) = {
            let data = vm.data().lock().unwrap();
            (
                data["head.weight"].as_tensor().clone(),
                data["head.bias"].as_tensor().clone(),
            )
        };
        let f = model.jvp_at(&x, &v, &mut Tape::off(), Readout::Features).unwrap();
        let l = model.jvp_at(&x, &v, &mut Tape::off(), Readout::Logits).unwrap();
        let through = f.dy.broadcast_matmul(&head_w.t().unwrap()).unwrap();
        assert!(
            common::max_abs_diff(&through, &l.dy) < 1e-10,
            "{name}: features are not what the head reads"
        );
        // The primal too: features · Wᵀ + b = the logits (the head's bias is not zero here).
        let head_b = (head_b + 0.5).unwrap();
        vm.data().lock().unwrap()["head.bias"].set(&head_b).unwrap();
        let logits = model.forward(&x).unwrap();
        let primal =
            f.y.matmul(&head_w.t().unwrap())
                .unwrap()
                .broadcast_add(&head_b)
                .unwrap();
        let err = common::max_abs_diff(&primal, &logits);
        assert!(err < 1e-12, "{name}: features · Wᵀ + b vs the logits: {err:e}");
        let tokens = name.starts_with("vit");
        let t = model.jvp_at(&x, &v, &mut Tape::off(), Readout::Tokens);
        assert_eq!(t.is_ok(), tokens, "{name}: tokens readout");
        if tokens {
            assert_eq!(t.unwrap().y.dims(), [2, 16, 16], "{name}: 16 patch tokens of width 16");
        }
    }
}

#[test]
fn the_config_names_the_output_and_reads_the_old_spelling() {
    let cfg = Config::resolve_str("[lee]\noutput = \"features\"\n", "f.toml", &[]).unwrap();
    assert_eq!(cfg.lee.output, LeeOutput::Features);
    // Run folders written before `output` existed.
    let old = Config::resolve_str("[lee]\nuse_logits = true\n", "old.toml", &[]).unwrap();
    assert_eq!(old.lee.output, LeeOutput::Logits);
    assert!(!old.to_toml().contains("use_logits"), "the old key is never written");
    let back = Config::resolve_str(&old.to_toml(), "again.toml", &[]).unwrap();
    assert_eq!(back.lee.output, LeeOutput::Logits);
    let e = Config::resolve_str("[lee]\nuse_logits = true\noutput = \"features\"\n", "both.toml", &[])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("lee.use_logits") && e.contains("features"), "{e}");
    for (sets, key) in [
        (vec!["model.kind=\"cnn\"", "lee.output=\"tokens\""], "lee.output"),
        (vec!["model.average_rotations=4", "lee.output=\"tokens\""], "lee.output"),
        (
            vec!["model.kind=\"gcnn\"", "train.lee_penalty_output=\"tokens\""],
            "train.lee_penalty_output",
        ),
    ] {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let e = Config::resolve_str("", "<test>", &sets)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains(key) && e.contains("tokens"), "{sets:?}: {e}");
    }
    let e = Config::resolve_str("", "<test>", &["lee.output=\"pixels\"".into()])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("lee.output") && e.contains("features"), "{e}");
}

/// The rotation-averaged model's features are averaged too: invariant under rot90 for N = 4.
#[test]
fn averaged_features_are_c4_invariant() {
    let cfg = tiny_vit_config(16, &["model.vit.pool=\"mean\"", "model.average_rotations=4"]);
    let vm = VarMap::new();
    let model = build_with(&cfg, &vm, DType::F32, &Device::Cpu).unwrap();
    let x = randn(&[2, 1, SIZE, SIZE], 1.0, DType::F32, &mut rng(9));
    let rot = x.flip(&[3]).unwrap().transpose(2, 3).unwrap().contiguous().unwrap();
    let v = randn(&[1, 2, 1, SIZE, SIZE], 1.0, DType::F32, &mut rng(10));
    let f = |x: &Tensor| model.jvp_at(x, &v, &mut Tape::off(), Readout::Features).unwrap().y;
    let (a, b) = (f(&x), f(&rot));
    assert_eq!(a.dims(), [2, 16]);
    let diff = common::max_abs_diff(&a, &b) / common::max_abs(&a);
    assert!(diff < 1e-5, "averaged features moved under rot90 by {diff:e}");
    let plain = tiny_vit_config(16, &["model.vit.pool=\"mean\""]);
    let inner = build_with(&plain, &vm, DType::F32, &Device::Cpu).unwrap();
    let g = |x: &Tensor| inner.jvp_at(x, &v, &mut Tape::off(), Readout::Features).unwrap().y;
    let moved = common::max_abs_diff(&g(&x), &g(&rot)) / common::max_abs(&g(&x));
    assert!(
        moved > 1e-3,
        "control: the plain ViT's features should move under rot90 ({moved:e})"
    );
}
