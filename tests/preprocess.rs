//! Photographs to model input (`data::preprocess`) against PIL, torchvision and timm themselves:
//! `tests/fixtures/preprocess.safetensors`, written by `scripts/fixtures/make_preprocess_fixture.py`
//! from the photos in `tests/fixtures/photos/`. Values are 8-bit (timm's tensors × 255).
//!
//! Our resize, conversions and crops are Pillow's arithmetic and our JPEG decoder is PIL's
//! (libjpeg-turbo's), so everything agrees to the bit: checked on PIL's decoded pixels, then from
//! the files (the bound is 1/255 per pixel).

use candle_core::{DType, Device, Tensor};
use image::ImageEncoder;
use liederiv::config::Interpolation;
use liederiv::data::preprocess::{decode, eval_transform, resize, Conversion, Image8};
use std::collections::HashMap;
use std::path::PathBuf;

fn fixture() -> HashMap<String, Tensor> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/preprocess.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn image_of(t: &Tensor) -> Image8 {
    let (h, w, c) = t.dims3().unwrap();
    let data = t
        .to_dtype(DType::U8)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    Image8 { w, h, c, data }
}

fn photo(name: &str) -> (PathBuf, Vec<u8>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/photos");
    let path = ["png", "jpg"]
        .iter()
        .map(|e| dir.join(format!("{name}.{e}")))
        .find(|p| p.exists())
        .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes)
}

/// Largest per-pixel difference in 8-bit steps; panics on a shape mismatch.
fn max_diff(ours: &Image8, theirs: &Image8, what: &str) -> u8 {
    assert_eq!(
        (ours.w, ours.h, ours.c),
        (theirs.w, theirs.h, theirs.c),
        "{what}: shape"
    );
    ours.data
        .iter()
        .zip(&theirs.data)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0)
}

/// PIL's RGB pixels of a photo: from the fixture for the JPEGs, our own decode of the PNGs
/// (lossless, so the same pixels).
fn pil_rgb(fx: &HashMap<String, Tensor>, name: &str) -> Image8 {
    match fx.get(&format!("decode.{name}.rgb")) {
        Some(t) => image_of(t),
        None => decode(&photo(name).1, 3).unwrap().0,
    }
}

fn interp(name: &str) -> Interpolation {
    match name {
        "bilinear" => Interpolation::Bilinear,
        "bicubic" => Interpolation::Bicubic,
        other => panic!("filter {other}"),
    }
}

const PHOTOS: [&str; 5] = ["astronaut", "chelsea", "coffee", "camera", "rocket"];

#[test]
fn resize_is_pillows_to_the_bit() {
    let fx = fixture();
    let mut checked = 0;
    for (key, t) in &fx {
        let parts: Vec<&str> = key.split('.').collect();
        if parts[0] != "resize" {
            continue;
        }
        let (w, h) = parts[3].split_once('x').unwrap();
        let ours = resize(
            &pil_rgb(&fx, parts[1]),
            w.parse().unwrap(),
            h.parse().unwrap(),
            interp(parts[2]),
        );
        assert_eq!(max_diff(&ours, &image_of(t), key), 0, "{key}");
        checked += 1;
    }
    assert_eq!(checked, 14);
}

#[test]
fn timm_eval_transform_is_matched_to_the_bit_on_pils_pixels() {
    let fx = fixture();
    let mut checked = 0;
    for (key, t) in &fx {
        // eval.<photo>.<filter>.<size>.<pct with a dot>.<mode>
        let Some(rest) = key.strip_prefix("eval.") else {
            continue;
        };
        let parts: Vec<&str> = rest.split('.').collect();
        let (name, filter, size, mode) = (parts[0], parts[1], parts[2], parts[parts.len() - 1]);
        let pct: f64 = parts[3..parts.len() - 1].join(".").parse().unwrap();
        let rgb = pil_rgb(&fx, name);
        let input = if mode == "l" {
            // PIL's convert("L") of the RGB pixels, through our decoder's conversion: re-encode
            // the RGB pixels losslessly and decode them to one channel.
            let mut png = Vec::new();
            image::codecs::png::PngEncoder::new(&mut png)
                .write_image(&rgb.data, rgb.w as u32, rgb.h as u32, image::ColorType::Rgb8)
                .unwrap();
            let (grey, conversion) = decode(&png, 1).unwrap();
            assert_eq!(conversion, Conversion::RgbToGrey);
            grey
        } else {
            rgb
        };
        let ours = eval_transform(&input, size.parse().unwrap(), pct, interp(filter));
        assert_eq!(max_diff(&ours, &image_of(t), key), 0, "{key}");
        checked += 1;
    }
    assert_eq!(checked, 32);
}

#[test]
fn from_the_files_decoding_and_the_eval_transform_are_pils_to_the_bit() {
    let fx = fixture();
    for name in PHOTOS {
        let (path, bytes) = photo(name);
        let (ours, _) = decode(&bytes, 3).unwrap();
        if let Some(t) = fx.get(&format!("decode.{name}.rgb")) {
            let d = max_diff(&ours, &image_of(t), name);
            assert_eq!(d, 0, "{}: decoded pixels differ from PIL's by {d}/255", path.display());
        }
        for (size, pct) in [(48, 0.875), (64, 0.9)] {
            let key = format!("eval.{name}.bicubic.{size}.{pct}.rgb");
            let d = max_diff(
                &eval_transform(&ours, size, pct, Interpolation::Bicubic),
                &image_of(&fx[&key]),
                &key,
            );
            assert_eq!(d, 0, "{key}: {d}/255 from the file");
        }
    }
}

#[test]
fn grey_photos_become_rgb_when_the_model_wants_three_channels() {
    let (_, bytes) = photo("camera");
    let (grey, c1) = decode(&bytes, 1).unwrap();
    let (rgb, c3) = decode(&bytes, 3).unwrap();
    assert_eq!((c1, c3), (Conversion::None, Conversion::GreyToRgb));
    assert_eq!((grey.c, rgb.c), (1, 3));
    for (i, px) in rgb.data.chunks_exact(3).enumerate() {
        assert_eq!(px, [grey.data[i]; 3]);
    }
}

/// A cut-off or corrupt file is an error, never an image padded with grey.
#[test]
fn truncated_and_corrupt_files_are_refused() {
    for name in ["chelsea", "astronaut"] {
        let (path, bytes) = photo(name);
        for cut in [bytes.len() * 3 / 4, bytes.len() / 2, 200, 10] {
            let r = decode(&bytes[..cut], 3);
            assert!(r.is_err(), "{} cut to {cut} bytes decoded", path.display());
        }
        let mut bad = bytes.clone();
        let mid = bad.len() / 2;
        bad[mid..mid + 64].iter_mut().for_each(|b| *b = 0xFF);
        // Either refused or decoded; never a panic.
        let _ = decode(&bad, 3);
    }
    assert!(decode(b"not an image at all", 3).is_err());
}

/// The training crops: the whole image when scale and ratio allow only it; always the asked
/// size; a flip mirrors each row and undoes itself.
#[test]
fn training_crops_and_flips_keep_their_contracts() {
    use liederiv::data::preprocess::{hflip, random_resized_crop};
    use rand::SeedableRng;
    let fx = fixture();
    let img = pil_rgb(&fx, "chelsea"); // 120×80
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let whole = random_resized_crop(&img, 40, (1.0, 1.0), (1.5, 1.5), Interpolation::Bicubic, &mut rng);
    assert_eq!(whole, resize(&img, 40, 40, Interpolation::Bicubic));
    for _ in 0..20 {
        let c = random_resized_crop(
            &img,
            32,
            (0.08, 1.0),
            (0.75, 4.0 / 3.0),
            Interpolation::Bilinear,
            &mut rng,
        );
        assert_eq!((c.w, c.h, c.c, c.data.len()), (32, 32, 3, 32 * 32 * 3));
    }
    let f = hflip(&img);
    assert_eq!(hflip(&f), img);
    assert_eq!(&f.data[..3], &img.data[(img.w - 1) * 3..img.w * 3]);
}
