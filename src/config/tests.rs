use super::*;

fn err(text: &str, overrides: &[&str]) -> String {
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    match Config::resolve_str(text, "test.toml", &o) {
        Ok(_) => panic!("expected an error for {text:?} {overrides:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn defaults_are_valid() {
    let c = Config::resolve_str("", "test.toml", &[]).unwrap();
    assert_eq!(c, Config::default());
}

#[test]
fn unknown_key_names_key_file_and_line() {
    let e = err("name = \"x\"\n[train]\nsteps = 3\nlrr = 0.1\n", &[]);
    assert!(e.contains("train.lrr"), "{e}");
    assert!(e.contains("test.toml:4"), "{e}");
    assert!(e.contains("unknown field"), "{e}");
}

#[test]
fn wrong_type_names_key() {
    let e = err("[train]\nbase_lr = \"fast\"\n", &[]);
    assert!(e.contains("train.base_lr"), "{e}");
    assert!(e.contains("test.toml:2"), "{e}");
    let e = err("", &["train.steps=many"]);
    assert!(e.contains("train.steps"), "{e}");
}

#[test]
fn out_of_range_names_key_and_allowed_values() {
    let e = err("[train]\nbase_lr = -1.0\n", &[]);
    assert!(e.contains("train.base_lr") && e.contains("> 0"), "{e}");
    let e = err("", &["lee.stencil=sideways"]);
    assert!(e.contains("lee.stencil") && e.contains("central"), "{e}");
    let e = err("", &["model.vit.patch_size=5"]);
    assert!(e.contains("model.vit.patch_size") && e.contains("divisor"), "{e}");
    let e = err("", &["lee.transforms=[\"rotate\", \"twist\"]"]);
    assert!(e.contains("lee.transforms[1]"), "{e}");
}

#[test]
fn overrides_apply_in_order_and_keep_types() {
    let o = vec![
        "train.base_lr=5e-4".to_string(),
        "model.kind=cnn".into(),
        "train.steps=7".into(),
        "train.steps=9".into(),
    ];
    let c = Config::resolve_str("[train]\nsteps = 3\n", "t", &o).unwrap();
    assert_eq!(c.train.base_lr, 5e-4);
    assert_eq!(c.model.kind, super::ModelKind::Cnn);
    assert_eq!(c.train.steps, 9);
    assert!(err("", &["nokey"]).contains("dotted.key=value"));
    let e = err("name = \"a\"\n", &["name.x=1"]);
    assert!(e.contains("not a section") && e.contains("name.x"), "{e}");
}

#[test]
fn resolved_config_round_trips_through_toml() {
    let c = Config::resolve_str("", "t", &["model.kind=gcnn".into(), "data.train_limit=100".into()]).unwrap();
    let back = Config::resolve_str(&c.to_toml(), "saved", &[]).unwrap();
    assert_eq!(c, back);
}

/// Every config the repository ships (configs/, experiments/) resolves: a key renamed or a value
/// refused by a later check would otherwise surface only when someone runs it.
#[test]
fn every_shipped_config_resolves() {
    fn tomls(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let p = entry.path();
            if p.is_dir() {
                tomls(&p, out);
            } else if p.extension().is_some_and(|e| e == "toml") {
                out.push(p);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    tomls(&root.join("configs"), &mut files);
    tomls(&root.join("experiments"), &mut files);
    // Run folders' config.toml files and the comparison specs are not training configs.
    files.retain(|p| {
        !p.components().any(|c| c.as_os_str() == "runs") && p.file_name().is_some_and(|n| n != "paper.toml")
    });
    assert!(files.len() >= 10, "{files:?}");
    for f in &files {
        if let Err(e) = Config::resolve(Some(f), &[]) {
            panic!("{}: {e}", f.display());
        }
    }
}
