//! `liederiv data prepare | info`: build (or read back from the cache) every split the config
//! defines and print its size, hash and class counts — as a table, or as the JSON
//! `{"splits": {"train": {"n", "sha256", "class_counts"}, ...}}` that makes determinism
//! checkable from outside.

use crate::config::Config;
use crate::data;
use anyhow::Context;
use std::time::Instant;

/// Build every split of `cfg` (train, val, test, ood_<name>...) and print the summary.
/// `prepare` only changes the wording: both build what is not cached.
pub fn run(cfg: &Config, prepare: bool, json: bool) -> anyhow::Result<()> {
    let mut entries = Vec::new();
    let mut rows = Vec::new();
    for name in cfg.split_names() {
        let t0 = Instant::now();
        let s = data::load_split(cfg, &name).with_context(|| format!("building split {name}"))?;
        let path = data::location(cfg, &name).with_context(|| format!("locating split {name}"))?;
        let (n, sha, counts) = (s.len(), s.sha256()?, s.class_counts());
        // Written by hand so the splits keep the config's order (train, val, test, ood_*).
        entries.push(format!(
            "{}: {{\"n\": {n}, \"sha256\": \"{sha}\", \"class_counts\": {}}}",
            serde_json::Value::from(name.as_str()),
            serde_json::Value::from(counts.clone())
        ));
        rows.push((name, n, sha, counts, t0.elapsed().as_secs_f64(), path));
    }
    if json {
        println!("{{\"splits\": {{{}}}}}", entries.join(", "));
        return Ok(());
    }
    if prepare {
        println!("prepared {} splits under {}", rows.len(), cfg.data.cache_dir);
    }
    println!(
        "{:<14} {:>7}  {:<16}  {:>6}  {:<44}  file",
        "split", "n", "sha256", "time", "class counts"
    );
    for (name, n, sha, counts, secs, path) in rows {
        let counts: Vec<String> = counts.iter().map(usize::to_string).collect();
        println!(
            "{name:<14} {n:>7}  {:<16}  {secs:>5.1}s  {:<44}  {}",
            &sha[..16],
            counts.join(" "),
            path.display()
        );
    }
    Ok(())
}
