//! TensorBoard event files, so that `tensorboard --logdir runs` shows every run's curves while it
//! trains: one `events.out.tfevents.<unix time>.<host>` file per run folder (and one in
//! `pretrain/`), one event per evaluation holding that record's scalars (tags in
//! [`scalars_of`]).
//!
//! The format is TFRecord framing around protobuf `Event`s: per record a little-endian u64
//! length, its masked CRC-32C, the bytes, their masked CRC-32C (CRC-32C from the `crc-fast`
//! crate). We write the two messages by hand (`Event {wall_time = 1, step = 2, file_version = 3,
//! summary = 5}`, `Summary.Value {tag = 1, simple_value = 2}`): the crates that generate them
//! (`tboard`) need `protoc` at every build, the others are unmaintained or pull image codecs.
//! [`read_events`] is the matching minimal reader (resume trims with it; tests read back with
//! it). TensorBoard 2.21's own reader was checked to load these files.

use super::{write_atomic, EvalRecord, ReportError};
use crc_fast::{checksum, CrcAlgorithm};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

const PREFIX: &str = "events.out.tfevents.";

/// The scalars of one evaluation: `train/loss` (absent at step 0), `train/lr`, per split
/// `accuracy/<split>`, `loss/<split>`, `lee_<transform>/<split>` (the mean), and every gap as
/// `gap/<name>`. Tags group by the part before the slash in TensorBoard.
pub fn scalars_of(r: &EvalRecord) -> Vec<(String, f64)> {
    let mut v: Vec<(String, f64)> = Vec::new();
    if let Some(l) = r.train_loss {
        v.push(("train/loss".into(), l));
    }
    v.push(("train/lr".into(), r.lr));
    for (split, m) in &r.splits {
        if let Some(a) = m.accuracy {
            v.push((format!("accuracy/{split}"), a));
        }
        if let Some(l) = m.loss {
            v.push((format!("loss/{split}"), l));
        }
        for (t, s) in &m.lee {
            v.push((format!("lee_{t}/{split}"), s.mean));
        }
    }
    v.extend(r.gaps().into_iter().map(|(g, x)| (format!("gap/{g}"), x)));
    v
}

/// One event as read back.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub wall_time: f64,
    pub step: i64,
    pub file_version: Option<String>,
    pub scalars: Vec<(String, f32)>,
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn bytes_field(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    varint(out, field << 3 | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn encode(e: &Event) -> Vec<u8> {
    let mut out = vec![0x09]; // wall_time: field 1, fixed64
    out.extend_from_slice(&e.wall_time.to_le_bytes());
    out.push(0x10); // step: field 2, varint
    varint(&mut out, e.step as u64);
    if let Some(v) = &e.file_version {
        bytes_field(&mut out, 3, v.as_bytes());
    }
    if !e.scalars.is_empty() {
        let mut summary = Vec::new();
        for (tag, x) in &e.scalars {
            let mut value = Vec::new();
            bytes_field(&mut value, 1, tag.as_bytes());
            value.push(0x15); // simple_value: field 2, fixed32
            value.extend_from_slice(&x.to_le_bytes());
            bytes_field(&mut summary, 1, &value);
        }
        bytes_field(&mut out, 5, &summary);
    }
    out
}

fn masked_crc(bytes: &[u8]) -> u32 {
    let c = checksum(CrcAlgorithm::Crc32Iscsi, bytes) as u32;
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// TFRecord framing of one serialised event.
fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// A protobuf reader over the fields we write; anything else is skipped by its wire type.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.0.split_first()?;
            self.0 = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (a, b) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = b;
        Some(a)
    }

    /// The next (field number, wire type, payload); varints come back as their 8 LE bytes.
    fn next_field(&mut self) -> Option<(u64, u64, Vec<u8>)> {
        if self.0.is_empty() {
            return None;
        }
        let key = self.varint()?;
        let payload = match key & 7 {
            0 => self.varint()?.to_le_bytes().to_vec(),
            1 => self.take(8)?.to_vec(),
            2 => {
                let n = self.varint()? as usize;
                self.take(n)?.to_vec()
            }
            5 => self.take(4)?.to_vec(),
            _ => return None,
        };
        Some((key >> 3, key & 7, payload))
    }
}

fn decode(data: &[u8]) -> Option<Event> {
    let mut e = Event {
        wall_time: 0.0,
        step: 0,
        file_version: None,
        scalars: Vec::new(),
    };
    let mut f = Fields(data);
    while let Some((field, _, p)) = f.next_field() {
        match field {
            1 => e.wall_time = f64::from_le_bytes(p.try_into().ok()?),
            2 => e.step = i64::from_le_bytes(p.try_into().ok()?),
            3 => e.file_version = Some(String::from_utf8(p).ok()?),
            5 => {
                let mut s = Fields(&p);
                while let Some((1, _, value)) = s.next_field() {
                    let (mut tag, mut x) = (String::new(), f32::NAN);
                    let mut v = Fields(&value);
                    while let Some((k, _, q)) = v.next_field() {
                        match k {
                            1 => tag = String::from_utf8(q).ok()?,
                            2 => x = f32::from_le_bytes(q.try_into().ok()?),
                            _ => {}
                        }
                    }
                    e.scalars.push((tag, x));
                }
            }
            _ => {}
        }
    }
    Some(e)
}

/// Every event of an event file, checking each record's length and data CRCs.
pub fn read_events(path: &Path) -> Result<Vec<Event>, ReportError> {
    let bytes = std::fs::read(path).map_err(|e| ReportError::io(path, e))?;
    let bad = |what: &str| {
        ReportError::io(
            path,
            std::io::Error::other(format!("not a TensorBoard event file: {what}")),
        )
    };
    let mut events = Vec::new();
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let len_bytes = rest.get(..8).ok_or_else(|| bad("truncated length"))?;
        let crc = rest.get(8..12).ok_or_else(|| bad("truncated length CRC"))?;
        if masked_crc(len_bytes).to_le_bytes() != crc {
            return Err(bad("length CRC mismatch"));
        }
        let n = u64::from_le_bytes(len_bytes.try_into().map_err(|_| bad("length"))?) as usize;
        let data = rest.get(12..12 + n).ok_or_else(|| bad("truncated record"))?;
        let crc = rest.get(12 + n..16 + n).ok_or_else(|| bad("truncated data CRC"))?;
        if masked_crc(data).to_le_bytes() != crc {
            return Err(bad("data CRC mismatch"));
        }
        events.push(decode(data).ok_or_else(|| bad("malformed event"))?);
        rest = &rest[16 + n..];
    }
    Ok(events)
}

/// The event file of a run folder, appended after every evaluation.
pub struct EventFile {
    path: PathBuf,
    file: File,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The event files already in `dir`, by name.
fn existing(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(PREFIX))
        })
        .collect();
    v.sort();
    v
}

impl EventFile {
    /// A fresh event file in `dir` (older ones there are removed, as the metrics files are
    /// replaced), or for `--resume` (`keep_through_step`) the run's existing one with only the
    /// events of steps up to the checkpoint kept, so a resumed run logs no step twice. A run
    /// from before event files gets one back-filled from `records` (stamped with the time now).
    pub fn open(dir: &Path, keep_through_step: Option<usize>, records: &[EvalRecord]) -> Result<Self, ReportError> {
        let old = existing(dir);
        let (path, events) = match (keep_through_step, old.first()) {
            (Some(step), Some(path)) => {
                let kept = read_events(path)?
                    .into_iter()
                    .filter(|e| e.file_version.is_some() || e.step <= step as i64)
                    .collect();
                (path.clone(), kept)
            }
            _ => {
                for p in &old {
                    std::fs::remove_file(p).map_err(|e| ReportError::io(p, e))?;
                }
                let host = std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
                    .filter(|h| !h.is_empty() && !h.contains('/'))
                    .unwrap_or_else(|| "localhost".into());
                let path = dir.join(format!("{PREFIX}{}.{host}", now() as u64));
                let mut events = vec![Event {
                    wall_time: now(),
                    step: 0,
                    file_version: Some("brain.Event:2".into()),
                    scalars: Vec::new(),
                }];
                events.extend(records.iter().map(|r| event_of(r, now())));
                (path, events)
            }
        };
        let bytes: Vec<u8> = events.iter().flat_map(|e| frame(&encode(e))).collect();
        write_atomic(&path, &bytes)?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| ReportError::io(&path, e))?;
        Ok(Self { path, file })
    }

    /// Append one evaluation's scalars as one event, and flush.
    pub fn append(&mut self, r: &EvalRecord) -> Result<(), ReportError> {
        self.file
            .write_all(&frame(&encode(&event_of(r, now()))))
            .and_then(|_| self.file.flush())
            .map_err(|e| ReportError::io(&self.path, e))
    }
}

fn event_of(r: &EvalRecord, wall_time: f64) -> Event {
    Event {
        wall_time,
        step: r.step as i64,
        file_version: None,
        scalars: scalars_of(r).into_iter().map(|(t, x)| (t, x as f32)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_and_framing_match_the_reference_values() {
        // CRC-32C check value (RFC 3720, B.4): "123456789" -> 0xE3069283.
        assert_eq!(checksum(CrcAlgorithm::Crc32Iscsi, b"123456789") as u32, 0xE306_9283);
        // An event round-trips through the framing and the reader's CRC checks.
        let e = Event {
            wall_time: 1.5,
            step: 300,
            file_version: None,
            scalars: vec![("lee_rotate/test".into(), 0.25), ("train/lr".into(), 1e-3)],
        };
        assert_eq!(decode(&encode(&e)), Some(e.clone()));
        let framed = frame(&encode(&e));
        let dir = std::env::temp_dir().join(format!("liederiv-tb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x");
        std::fs::write(&p, &framed).unwrap();
        assert_eq!(read_events(&p).unwrap(), vec![e]);
        let mut bad = framed.clone();
        bad[14] ^= 1;
        std::fs::write(&p, &bad).unwrap();
        assert!(read_events(&p).is_err(), "a flipped bit passed the CRC");
        std::fs::remove_dir_all(&dir).ok();
    }
}
