//! Gradient checkpointing (`train.grad_checkpointing`, `kernels::checkpoint`): each transformer
//! block is one graph node that keeps only its input and reruns in the backward. Oracle: the
//! plain step's gradients (candle's autograd through the whole graph) on the same weights, batch
//! and random stream. Drop path is on, so the backward must replay the forward's draws.
//! (The portable kernels' case is in `tests/portable.rs`, whose switch is process-wide.)

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use liederiv::kernels::checkpoint;
use liederiv::models::init::SeededVarMap;
use liederiv::models::mae::Mae;
use liederiv::models::{build_with, Rng};
use rand::SeedableRng;

fn images(b: usize, dtype: DType) -> Tensor {
    common::blob_images(b, 1, 28, 3, dtype, &mut common::rng(11))
}

fn labels(b: usize) -> Tensor {
    Tensor::from_vec((0..b as u32).map(|i| i % 10).collect::<Vec<_>>(), b, &Device::Cpu).unwrap()
}

/// Every variable's gradient under `plain` and `checkpointed`, which must agree to `tol`
/// (relative, per tensor), with the same loss and the same random stream left behind.
fn compare(
    varmap: &VarMap,
    tol: f64,
    plain: &dyn Fn(&mut Rng) -> Tensor,
    checkpointed: &dyn Fn(&mut Rng) -> Tensor,
) -> f64 {
    let (mut r1, mut r2) = (Rng::seed_from_u64(5), Rng::seed_from_u64(5));
    let (l1, l2) = (plain(&mut r1), checkpointed(&mut r2));
    assert_eq!(
        common::max_abs_diff(&l1, &l2),
        0.0,
        "the checkpointed forward changed the loss"
    );
    assert_eq!(r1, r2, "the checkpointed step drew a different random stream");
    let g1 = l1.backward().unwrap();
    let g2 = checkpoint::backward(&l2).unwrap();
    let mut worst: f64 = 0.0;
    for (name, v) in common::named_vars(varmap) {
        let (a, b) = (g1.get(v.as_tensor()), g2.get(v.as_tensor()));
        match (a, b) {
            (Some(a), Some(b)) => {
                let err = common::rel_err(b, a);
                assert!(
                    err <= tol,
                    "{name}: checkpointed gradient differs by {err:.2e} (relative)"
                );
                worst = worst.max(err);
            }
            (None, None) => {}
            _ => panic!("{name}: a gradient in one step only"),
        }
    }
    worst
}

fn classifier_config(depth: usize) -> liederiv::Config {
    common::tiny_vit_config(
        48,
        &[
            &format!("model.vit.depth={depth}"),
            "model.vit.heads=3",
            "model.vit.drop_path=0.3",
            "model.vit.pool=\"cls\"",
        ],
    )
}

#[test]
fn checkpointed_vit_gradients_equal_the_plain_steps() {
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-6)] {
        let cfg = classifier_config(3);
        let varmap = VarMap::new();
        let plain = build_with(&cfg, &varmap, dtype, &Device::Cpu).unwrap();
        let mut ckpt = build_with(&cfg, &varmap, dtype, &Device::Cpu).unwrap();
        ckpt.set_grad_checkpointing(true).unwrap();
        let (x, y) = (images(6, dtype), labels(6));
        let loss = |m: &dyn liederiv::models::Model, rng: &mut Rng| {
            candle_nn::loss::cross_entropy(&m.forward_train(&x, rng).unwrap(), &y).unwrap()
        };
        let worst = compare(&varmap, tol, &|rng| loss(plain.as_ref(), rng), &|rng| {
            loss(ckpt.as_ref(), rng)
        });
        eprintln!("{dtype:?}: largest relative gradient difference {worst:.2e}");
    }
}

#[test]
fn checkpointed_mae_gradients_equal_the_plain_steps() {
    let cfg = common::tiny_vit_config(32, &[]);
    let varmap = VarMap::new();
    let build = || {
        let vb = SeededVarMap::var_builder(&varmap, 3, DType::F64, &Device::Cpu);
        Mae::new(&cfg.model.vit, &cfg.model.mae, 28, 1, vb).unwrap()
    };
    let plain = build();
    let mut ckpt = build();
    ckpt.set_grad_checkpointing(true);
    let x = images(4, DType::F64);
    compare(&varmap, 1e-12, &|rng| plain.loss(&x, rng).unwrap(), &|rng| {
        ckpt.loss(&x, rng).unwrap()
    });
}

/// What the graph keeps: with checkpointing, three more blocks are three more nodes (each block's
/// node, holding its input); without, every op of every block stays.
#[test]
fn a_checkpointed_block_is_one_graph_node() {
    let nodes = |depth: usize, on: bool| {
        let cfg = classifier_config(depth);
        let varmap = VarMap::new();
        let mut m = build_with(&cfg, &varmap, DType::F32, &Device::Cpu).unwrap();
        m.set_grad_checkpointing(on).unwrap();
        let logits = m
            .forward_train(&images(2, DType::F32), &mut Rng::seed_from_u64(1))
            .unwrap();
        logits.sorted_nodes().iter().filter(|t| !t.is_variable()).count()
    };
    let (c3, c6) = (nodes(3, true), nodes(6, true));
    assert_eq!(c6 - c3, 3, "checkpointed: {c3} nodes at depth 3, {c6} at depth 6");
    let (p3, p6) = (nodes(3, false), nodes(6, false));
    assert!(
        (p6 - p3) / 3 >= 10,
        "plain: {p3} nodes at depth 3, {p6} at depth 6 (a block should be many ops)"
    );
}

#[test]
fn plain_backward_of_a_checkpointed_graph_is_refused() {
    let cfg = classifier_config(2);
    let varmap = VarMap::new();
    let mut m = build_with(&cfg, &varmap, DType::F32, &Device::Cpu).unwrap();
    m.set_grad_checkpointing(true).unwrap();
    let loss = m
        .forward_train(&images(2, DType::F32), &mut Rng::seed_from_u64(1))
        .unwrap()
        .sum_all()
        .unwrap();
    let err = loss.backward().map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("kernels::checkpoint::backward"), "{err}");
}

#[test]
fn grad_checkpointing_and_bf16_are_refused_for_models_without_blocks() {
    for kind in ["cnn", "gcnn"] {
        let sets = [
            format!("model.kind=\"{kind}\""),
            "train.grad_checkpointing=true".to_string(),
        ];
        let err = liederiv::Config::resolve_str("", "<test>", &sets)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("train.grad_checkpointing") && err.contains("vit"),
            "{kind}: {err}"
        );
    }
    let err = liederiv::Config::resolve_str(
        "",
        "<test>",
        &["model.kind=\"cnn\"".to_string(), "train.precision=\"bf16\"".to_string()],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("train.precision") && err.contains("vit"), "{err}");
    // MAE pretraining of a ViT, and the ViT itself, accept it.
    liederiv::Config::resolve_str("", "<test>", &["train.grad_checkpointing=true".to_string()]).unwrap();
}

/// Mixed precision (`train.precision = "bf16"`, `models::build_cast`): the model on bf16 casts
/// computes the f32 model's logits to bf16's precision, and its gradients reach the f32 weights
/// as f32, close to the f32 step's (the rotation-averaged wrapper too).
#[test]
fn bf16_casts_compute_near_f32_and_send_f32_gradients_to_the_weights() {
    for extra in [&[][..], &["model.average_rotations=4"][..]] {
        let mut sets = vec!["model.vit.heads=3"];
        sets.extend_from_slice(extra);
        let cfg = common::tiny_vit_config(48, &sets);
        let varmap = VarMap::new();
        let full = build_with(&cfg, &varmap, DType::F32, &Device::Cpu).unwrap();
        let cast = liederiv::models::build_cast(&cfg, &varmap, DType::BF16, &Device::Cpu).unwrap();
        let (x, y) = (images(8, DType::F32), labels(8));
        let l32 = full.forward_train(&x, &mut Rng::seed_from_u64(1)).unwrap();
        let l16 = cast
            .forward_train(&x.to_dtype(DType::BF16).unwrap(), &mut Rng::seed_from_u64(1))
            .unwrap();
        assert_eq!(l16.dtype(), DType::BF16);
        let l16 = l16.to_dtype(DType::F32).unwrap();
        let err = common::rel_err(&l16, &l32);
        assert!(
            err > 0.0 && err < 3e-2,
            "{extra:?}: bf16 logits off by {err:.2e} (relative)"
        );
        let g32 = candle_nn::loss::cross_entropy(&l32, &y).unwrap().backward().unwrap();
        let g16 = checkpoint::backward(&candle_nn::loss::cross_entropy(&l16, &y).unwrap()).unwrap();
        for (name, v) in common::named_vars(&varmap) {
            let (a, b) = (g32.get(v.as_tensor()).unwrap(), g16.get(v.as_tensor()).unwrap());
            assert_eq!(b.dtype(), DType::F32, "{name}");
            let err = common::rel_err(b, a);
            assert!(err < 0.1, "{extra:?} {name}: bf16 gradient off by {err:.2e} (relative)");
        }
    }
}
