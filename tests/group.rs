//! `--metrics group` (issue 20, part 3): per-step C_N equivariance errors
//! ‖f(g·x) − ρ(g)·f(x)‖ / ‖f(x)‖. A C4 G-CNN is equivariant at every step to float precision under
//! exact pixel rotations; a C8 G-CNN is at multiples of 90° but not at 45°, where its interpolated
//! filters enter at the lifting convolution; models without group feature maps are checked at
//! the output only.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use common::{blob_images, rng, tiny_vit_config};
use liederiv::lie::{GroupAccumulator, GroupReport};
use liederiv::models::build_with;
use liederiv::Config;

fn measure(sets: &[&str], x: &Tensor) -> GroupReport {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let cfg = Config::resolve_str("", "<test>", &sets).unwrap();
    measure_cfg(&cfg, x)
}

fn measure_cfg(cfg: &Config, x: &Tensor) -> GroupReport {
    let vm = VarMap::new();
    let model = build_with(cfg, &vm, DType::F32, &Device::Cpu).unwrap();
    let mut acc = GroupAccumulator::new(cfg.data.blank());
    acc.push(model.as_ref(), x).unwrap();
    acc.finish()
}

fn images() -> Tensor {
    blob_images(4, 1, 28, 2, DType::F32, &mut rng(1))
}

const GCNN: [&str; 3] = [
    "model.kind=\"gcnn\"",
    "model.gcnn.widths=[4, 4, 4]",
    "model.gcnn.kernel_size=5",
];

#[test]
fn a_c4_gcnn_is_equivariant_at_every_step() {
    let mut sets = GCNN.to_vec();
    sets.push("model.gcnn.group_order=4");
    let g = measure(&sets, &images());
    assert_eq!(g.order, 4);
    assert_eq!(g.angles_deg, [90.0, 180.0, 270.0]);
    let names: Vec<&str> = g.layers.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names.first(), Some(&"block0.conv"));
    assert_eq!(names.last(), Some(&"head"));
    assert!(
        names.contains(&"group_pool") && names.contains(&"block1.pool"),
        "{names:?}"
    );
    for l in &g.layers {
        for (a, e) in g.angles_deg.iter().zip(&l.errors) {
            assert_eq!(e.n(), 4);
            assert!(e.mean() < 1e-5, "{} at {a}°: {:e}", l.name, e.mean());
        }
    }
}

#[test]
fn a_c8_gcnn_breaks_at_45_degrees_from_its_lifting_conv_on() {
    let mut sets = GCNN.to_vec();
    sets.push("model.gcnn.group_order=8");
    let g = measure(&sets, &images());
    assert_eq!(g.order, 8);
    assert_eq!(g.angles_deg.len(), 7);
    for l in &g.layers {
        for (a, e) in g.angles_deg.iter().zip(&l.errors) {
            let right = (a % 90.0).abs() < 1e-9;
            if right {
                assert!(e.mean() < 1e-5, "{} at {a}°: {:e}", l.name, e.mean());
            } else if l.name == "block0.conv" {
                assert!(
                    e.mean() > 1e-3,
                    "{} at {a}°: {:e} (interpolation should show)",
                    l.name,
                    e.mean()
                );
            }
        }
    }
}

#[test]
fn models_without_group_features_are_checked_at_the_output() {
    let x = images();
    let cnn = measure(&["model.kind=\"cnn\"", "model.cnn.widths=[4, 8]"], &x);
    assert_eq!(cnn.order, 4);
    assert_eq!(cnn.layers.len(), 1);
    assert_eq!(cnn.layers[0].name, "output");
    assert!(
        cnn.layers[0].errors[0].mean() > 1e-4,
        "a random CNN is not invariant: {:e}",
        cnn.layers[0].errors[0].mean()
    );
    let vit = measure_cfg(&tiny_vit_config(16, &["model.vit.pool=\"mean\""]), &x);
    assert!(
        vit.layers[0].errors[0].mean() > 1e-4,
        "{:e}",
        vit.layers[0].errors[0].mean()
    );
    // Averaging over C4 makes the output invariant under these exact rotations.
    let averaged = measure_cfg(
        &tiny_vit_config(16, &["model.vit.pool=\"mean\"", "model.average_rotations=4"]),
        &x,
    );
    for (a, e) in averaged.angles_deg.iter().zip(&averaged.layers[0].errors) {
        assert!(e.mean() < 1e-5, "averaged ViT at {a}°: {:e}", e.mean());
    }
}
