//! `data.source = "folder"` (photos in torchvision's ImageFolder layout): the loader's tensors
//! against PIL / torchvision's (the preprocessing fixture, end to end through a folder), the
//! training transforms' determinism, `train | eval | lee | data info` on the shipped example
//! config, and bad input (a truncated or non-image file, a folder without classes, a class train
//! does not have): a clear error naming the file or folder, never a panic or a skipped image.

mod common;

use candle_core::{DType, Device, Tensor};
use liederiv::config::Config;
use liederiv::data::{self, Images};
use std::path::{Path, PathBuf};

const PHOTOS: [&str; 5] = ["astronaut", "camera", "chelsea", "coffee", "rocket"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A folder with train/ and test/, each class one of the fixture photos (its own file).
fn photo_folder(dir: &Path) {
    for split in ["train", "test"] {
        for name in PHOTOS {
            let src = ["png", "jpg"]
                .iter()
                .map(|e| repo().join(format!("tests/fixtures/photos/{name}.{e}")))
                .find(|p| p.exists())
                .unwrap();
            let d = dir.join(split).join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::copy(&src, d.join(src.file_name().unwrap())).unwrap();
        }
    }
}

fn folder_cfg(dir: &Path, extra: &[&str]) -> Config {
    let mut sets: Vec<String> = vec![
        "data.source=\"folder\"".into(),
        format!("data.folder={:?}", dir.display().to_string()),
        "data.ood=[]".into(),
        "model.num_classes=5".into(),
        "model.vit.patch_size=8".into(),
        "eval.splits=[\"test\"]".into(),
        "lee.splits=[\"test\"]".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    Config::resolve_str("", "<test>", &sets).unwrap()
}

#[test]
fn folder_batches_equal_timm_preprocessing_of_the_same_files() {
    // The fixture holds what PIL + torchvision's timm eval transform make of each photo (8-bit,
    // before ToTensor); through the folder, the loader must give (v/255 − mean) / std of exactly
    // those values (1e-6: the f64 → f32 rounding of the normalisation).
    let fixture =
        candle_core::safetensors::load(repo().join("tests/fixtures/preprocess.safetensors"), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    photo_folder(dir.path());
    let (mean, std) = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);
    for (size, pct, interp, ch) in [
        (64, "0.9", "bicubic", 3),
        (48, "0.875", "bilinear", 3),
        (48, "0.875", "bicubic", 1),
    ] {
        let cfg = folder_cfg(
            dir.path(),
            &[
                &format!("data.image_size={size}"),
                &format!("data.crop_pct={pct}"),
                &format!("data.interpolation=\"{interp}\""),
                &format!("data.channels={ch}"),
                &match ch {
                    3 => "data.mean=[0.485, 0.456, 0.406]".to_string(),
                    _ => "data.mean=0.5".to_string(),
                },
                &match ch {
                    3 => "data.std=[0.229, 0.224, 0.225]".to_string(),
                    _ => "data.std=0.25".to_string(),
                },
            ],
        );
        let test = data::load_split(&cfg, "test").unwrap();
        assert_eq!(test.classes, PHOTOS);
        assert_eq!(test.labels, [0, 1, 2, 3, 4]);
        let idx: Vec<usize> = (0..5).collect();
        let (x, y) = data::batch(&test, &idx, &cfg.data, &Device::Cpu).unwrap();
        assert_eq!(x.dims(), [5, ch, size, size]);
        assert_eq!(y.to_vec1::<u32>().unwrap(), [0, 1, 2, 3, 4]);
        for (i, name) in PHOTOS.iter().enumerate() {
            let mode = if ch == 3 { "rgb" } else { "l" };
            let key = format!("eval.{name}.{interp}.{size}.{pct}.{mode}");
            let want = fixture[&key].to_dtype(DType::F64).unwrap().permute((2, 0, 1)).unwrap(); // (C, S, S)
            let want = (0..ch)
                .map(|c| {
                    let (m, s) = if ch == 3 { (mean[c], std[c]) } else { (0.5, 0.25) };
                    ((want.get(c).unwrap() / 255.0).unwrap() - m).unwrap() / s
                })
                .collect::<candle_core::Result<Vec<_>>>()
                .unwrap();
            let want = Tensor::stack(&want, 0).unwrap();
            let got = x.get(i).unwrap().to_dtype(DType::F64).unwrap();
            let err = common::max_abs_diff(&got, &want);
            assert!(err < 1e-6, "{key}: {err:.2e}");
        }
    }
}

#[test]
fn training_crops_are_seeded_and_differ_from_evaluation() {
    let dir = tempfile::tempdir().unwrap();
    photo_folder(dir.path());
    let cfg = folder_cfg(
        dir.path(),
        &[
            "data.image_size=32",
            "data.channels=3",
            "augment.random_resized_crop=true",
            "augment.hflip=0.5",
        ],
    );
    let train = data::load_split(&cfg, "train").unwrap();
    let idx = [4, 0, 2, 2];
    let draw = |seed: u64| {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        data::train_batch(&train, &idx, &cfg.data, &cfg.augment, &Device::Cpu, &mut rng)
            .unwrap()
            .0
    };
    let (a, b, c) = (draw(1), draw(1), draw(2));
    assert_eq!(
        common::max_abs_diff(&a, &b),
        0.0,
        "same seed, same batch (whatever the threads did)"
    );
    assert!(common::max_abs_diff(&a, &c) > 0.1, "another seed, other crops");
    // The same image twice in one batch gets two crops (one stream per position).
    let (i2, i3) = (a.get(2).unwrap(), a.get(3).unwrap());
    assert!(common::max_abs_diff(&i2, &i3) > 0.1);
    let (eval, _) = data::batch(&train, &idx, &cfg.data, &Device::Cpu).unwrap();
    assert!(common::max_abs_diff(&a, &eval) > 0.1);

    // An OOD set is one more folder of class folders (here test/ again, under another name);
    // digits' seeded rotation does not apply to photos and is refused.
    let ood = |rotate: bool, limit: usize| {
        let set = format!("data.ood=[{{ name = \"again\", path = \"test\", rotate = {rotate}, limit = {limit} }}]");
        let sets = [
            "data.source=\"folder\"".to_string(),
            format!("data.folder={:?}", dir.path().display().to_string()),
            "model.num_classes=5".into(),
            "model.vit.patch_size=8".into(),
            "data.image_size=32".into(),
            "eval.splits=[\"test\"]".into(),
            "lee.splits=[\"test\"]".into(),
            set,
        ];
        Config::resolve_str("", "<test>", &sets)
    };
    let again = data::load_split(&ood(false, 0).unwrap(), "ood_again").unwrap();
    let test = data::load_split(&cfg, "test").unwrap();
    assert_eq!((again.name.as_str(), &again.labels), ("ood_again", &test.labels));
    let three = data::load_split(&ood(false, 3).unwrap(), "ood_again").unwrap();
    assert_eq!(
        three.labels,
        [0, 1, 2],
        "an OOD set's limit: its first images, one per class"
    );
    let err = ood(true, 0).unwrap_err().to_string();
    assert!(err.contains("data.ood[0].rotate") && err.contains("digits"), "{err}");
    // The default OOD set (rotated Fashion-MNIST) is refused for photos at once, with what to do.
    let err = Config::resolve_str(
        "",
        "<test>",
        &["data.source=\"folder\"".into(), "data.folder=\"x\"".into()],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("data.ood = []"), "{err}");
}

#[test]
fn the_first_images_of_a_photo_split_cover_every_class() {
    // Folders list class by class; the split interleaves them, so eval.limit / lee.limit /
    // train_limit subsets are spread over the classes (6 per class in the example's train/).
    let cfg = Config::resolve_str(
        "",
        "<test>",
        &[
            "data.source=\"folder\"".into(),
            format!(
                "data.folder={:?}",
                repo().join("tests/fixtures/photo_folder").display().to_string()
            ),
            "data.ood=[]".into(),
            "eval.splits=[\"test\"]".into(),
            "lee.splits=[\"test\"]".into(),
            "model.num_classes=4".into(),
        ],
    )
    .unwrap();
    let train = data::load_split(&cfg, "train").unwrap();
    assert_eq!(train.labels[..8], [0, 1, 2, 3, 0, 1, 2, 3]);
    assert_eq!(train.class_counts(), [6, 6, 6, 6]);
    let (items, labels) = data::interleave_classes(vec!['a', 'b', 'c', 'd', 'e'], vec![1, 1, 1, 0, 2]);
    assert_eq!((items, labels), (vec!['d', 'a', 'e', 'b', 'c'], vec![0, 1, 2, 1, 1]));
}

#[test]
fn example_config_trains_evaluates_and_measures_from_the_cli() {
    let out = tempfile::tempdir().unwrap();
    let config = repo().join("configs/imagefolder_example.toml");
    let config = config.to_str().unwrap();
    let sets = vec![
        format!("output.dir={:?}", out.path().display().to_string()),
        format!(
            "data.folder={:?}",
            repo().join("tests/fixtures/photo_folder").display().to_string()
        ),
        "output.progress=false".into(),
    ];
    let (ok, stdout, stderr) = common::liederiv(&["train", "--config", config], &sets);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stderr.contains("train: 24 images in 4 classes"), "{stderr}");
    assert!(stderr.contains("is grey: replicated to RGB"), "{stderr}");
    assert_eq!(stderr.matches("replicated to RGB").count(), 1, "said once: {stderr}");
    let run = out.path().join("imagefolder_example");
    let classes: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("classes.json")).unwrap()).unwrap();
    assert_eq!(
        classes["classes"],
        serde_json::json!(["camera", "cat", "coffee", "rocket"])
    );
    assert!(run.join("summary.json").exists() && run.join("checkpoint.safetensors").exists());

    let (ok, stdout, stderr) = common::liederiv(&["eval", "--config", config, "--angles", "0:360:90"], &sets);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stderr.contains("measuring checkpoint"), "{stderr}");
    assert!(stdout.contains("| test  | 8 |"), "{stdout}");
    assert!(run.join("angles.csv").exists());

    let (ok, stdout, stderr) = common::liederiv(&["lee", "--config", config], &sets);
    assert!(ok, "{stdout}\n{stderr}");
    let row = stdout.lines().find(|l| l.starts_with("test")).unwrap_or_default();
    assert_eq!(row.split_whitespace().nth(1), Some("8"), "{stdout}");

    let (ok, stdout, stderr) = common::liederiv(&["data", "info", "--config", config, "--json"], &sets);
    assert!(ok, "{stdout}\n{stderr}");
    let info: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(info["splits"]["train"]["class_counts"], serde_json::json!([6, 6, 6, 6]));
    assert_eq!(info["splits"]["test"]["n"], 8);
}

#[test]
fn bad_folders_and_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    photo_folder(dir.path());
    let cfg = folder_cfg(dir.path(), &["data.image_size=32", "data.channels=3"]);
    let err_of = |cfg: &Config, split: &str| -> String {
        let s = match data::load_split(cfg, split) {
            Ok(s) => s,
            Err(e) => return e.to_string(),
        };
        let idx: Vec<usize> = (0..s.len()).collect();
        data::batch(&s, &idx, &cfg.data, &Device::Cpu).unwrap_err().to_string()
    };

    // A truncated JPEG: named, and said to be truncated.
    let cat = dir.path().join("test/chelsea/chelsea.jpg");
    let bytes = std::fs::read(&cat).unwrap();
    std::fs::write(&cat, &bytes[..bytes.len() / 2]).unwrap();
    let err = err_of(&cfg, "test");
    assert!(err.contains("chelsea.jpg") && err.contains("truncated"), "{err}");
    // A file that is no image at all, with an image's name.
    std::fs::write(&cat, b"not a picture").unwrap();
    let err = err_of(&cfg, "test");
    assert!(
        err.contains("chelsea.jpg") && err.contains("not a readable image"),
        "{err}"
    );
    std::fs::write(&cat, &bytes).unwrap();
    // Other files are listed as ignored, not read.
    std::fs::write(dir.path().join("test/chelsea/notes.txt"), b"x").unwrap();
    let test = data::load_split(&cfg, "test").unwrap();
    assert_eq!(test.len(), 5);
    let Images::Photos(p) = &test.images else {
        panic!("a photo split")
    };
    assert!((0..p.len()).all(|i| !p.name(i).ends_with(".txt")));

    // A class folder train does not have.
    std::fs::create_dir_all(dir.path().join("test/zebra")).unwrap();
    std::fs::copy(&cat, dir.path().join("test/zebra/z.jpg")).unwrap();
    let err = err_of(&cfg, "test");
    assert!(err.contains("\"zebra\"") && err.contains("train's classes"), "{err}");
    std::fs::remove_dir_all(dir.path().join("test/zebra")).unwrap();
    // An empty class folder.
    std::fs::create_dir_all(dir.path().join("test/coffee/empty")).unwrap();
    std::fs::create_dir_all(dir.path().join("train/zz_empty")).unwrap();
    let err = err_of(&cfg, "train");
    assert!(err.contains("zz_empty") && err.contains("no PNG / JPEG"), "{err}");
    std::fs::remove_dir_all(dir.path().join("train/zz_empty")).unwrap();

    // A folder of files without class folders, and a folder that is not there.
    let flat = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(flat.path().join("train")).unwrap();
    std::fs::copy(&cat, flat.path().join("train/a.jpg")).unwrap();
    let err = err_of(&folder_cfg(flat.path(), &["data.image_size=32"]), "train");
    assert!(err.contains("no class folders"), "{err}");
    let err = err_of(&folder_cfg(flat.path(), &["data.image_size=32"]), "test");
    assert!(err.contains("does not exist") && err.contains("ImageFolder"), "{err}");

    // Config: a folder source needs data.folder; mean / std need one value or one per channel;
    // too few classes in the model.
    let err = Config::resolve_str("", "<test>", &["data.source=\"folder\"".into()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("data.folder"), "{err}");
    let err = Config::resolve_str("", "<test>", &["data.channels=3".into(), "data.mean=[0.1, 0.2]".into()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("data.mean") && err.contains("one per channel"), "{err}");
    let out = tempfile::tempdir().unwrap();
    let sets = vec![
        "data.source=\"folder\"".into(),
        format!("data.folder={:?}", dir.path().display().to_string()),
        "data.ood=[]".into(),
        "data.image_size=28".into(),
        "train.batch_size=4".into(),
        "eval.splits=[\"test\"]".into(),
        "lee.splits=[\"test\"]".into(),
        format!("output.dir={:?}", out.path().display().to_string()),
    ];
    let (ok, _, stderr) = common::liederiv(&["train"], &sets);
    assert!(!ok);
    assert!(
        stderr.contains("model.num_classes = 10 but the train set has 5 classes (astronaut, camera, chelsea, coffee, rocket); set model.num_classes = 5"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_flat_folder_with_a_labels_csv_is_a_split() {
    // train/ and test/ hold the photos directly; train.csv / test.csv name each file's class.
    // Classes are train's sorted distinct labels; the batches equal the class-folder layout's.
    let nested = tempfile::tempdir().unwrap();
    photo_folder(nested.path());
    let flat = tempfile::tempdir().unwrap();
    for split in ["train", "test"] {
        std::fs::create_dir_all(flat.path().join(split)).unwrap();
        let mut csv = String::from("file,label\n");
        for name in PHOTOS.iter().rev() {
            let src = std::fs::read_dir(nested.path().join(split).join(name))
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
                .path();
            let file = format!("img_{name}.{}", src.extension().unwrap().to_string_lossy());
            std::fs::copy(&src, flat.path().join(split).join(&file)).unwrap();
            csv += &format!("{file},{name}\n");
        }
        std::fs::write(flat.path().join(format!("{split}.csv")), csv).unwrap();
    }
    let sets = ["data.image_size=32", "data.channels=3"];
    let (a, b) = (folder_cfg(nested.path(), &sets), folder_cfg(flat.path(), &sets));
    let (sa, sb) = (
        data::load_split(&a, "test").unwrap(),
        data::load_split(&b, "test").unwrap(),
    );
    assert_eq!(sb.classes, PHOTOS);
    assert_eq!(sb.labels, [0, 1, 2, 3, 4], "labels by class name, classes interleaved");
    let (xa, _) = data::batch(&sa, &[0, 1, 2, 3, 4], &a.data, &Device::Cpu).unwrap();
    let (xb, _) = data::batch(&sb, &[0, 1, 2, 3, 4], &b.data, &Device::Cpu).unwrap();
    assert_eq!(common::max_abs_diff(&xa, &xb), 0.0);

    // A listed file that is not there, and a missing header: the CSV and its line named.
    std::fs::write(
        flat.path().join("test.csv"),
        "file,label\nimg_rocket.jpg,rocket\nnope.jpg,cat\n",
    )
    .unwrap();
    let err = data::load_split(&b, "test").unwrap_err().to_string();
    assert!(
        err.contains("test.csv:3") && err.contains("nope.jpg") && err.contains("does not exist"),
        "{err}"
    );
    // A byte-order mark (as spreadsheets write) before the header is fine.
    let csv = std::fs::read_to_string(flat.path().join("train.csv")).unwrap();
    std::fs::write(flat.path().join("train.csv"), format!("\u{feff}{csv}")).unwrap();
    assert_eq!(data::load_split(&b, "train").unwrap().len(), 5);
    std::fs::write(flat.path().join("test.csv"), "img_rocket.jpg,rocket\n").unwrap();
    let err = data::load_split(&b, "test").unwrap_err().to_string();
    assert!(err.contains("test.csv:1") && err.contains("header file,label"), "{err}");
}
