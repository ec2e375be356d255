//! Photographs to model input as timm prepares them (`timm.data.create_transform` on PIL images):
//! decode, convert to the model's channels, resize, crop, scale to [0, 1], normalise.
//!
//! The arithmetic is Pillow's, so that a model sees what it saw in PyTorch: the resize is
//! `Image.resize` (a separable convolution whose support widens by the downscale factor, i.e.
//! antialiased; bicubic with a = −0.5; 22-bit fixed-point weights, each pass rounded and clipped
//! to 8 bits, horizontal first), the conversions are `Image.convert` ("L" from RGB with ITU-R
//! 601-2 luma in 16-bit fixed point; grey to RGB replicated), and the crops round as torchvision's
//! (`CenterCrop`: Python's round, half to even). `tests/preprocess.rs` holds all of it to a
//! fixture written by PIL and torchvision themselves.

use crate::config::Interpolation;
use rand::Rng;

/// An 8-bit image, rows of interleaved channels (1: grey, 3: RGB).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image8 {
    pub w: usize,
    pub h: usize,
    pub c: usize,
    pub data: Vec<u8>,
}

/// Why an image could not be read (the caller names the file).
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("{0}")]
    Format(#[from] image::ImageError),
    #[error("JPEG: {0}")]
    Jpeg(std::io::Error),
    #[error("the file ends before the image does (truncated)")]
    Truncated,
    #[error("unsupported pixel layout {0:?} (grey, grey + alpha, RGB and RGBA at 8 or 16 bits are read)")]
    Layout(image::ColorType),
}

/// What [`decode`] did besides decoding, so that a loader can say so once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conversion {
    None,
    /// A grey image replicated to RGB.
    GreyToRgb,
    /// An RGB image reduced to its luma.
    RgbToGrey,
    /// An alpha channel dropped (as `Image.convert("RGB")` / `("L")` does).
    AlphaDropped,
}

/// Decode PNG / JPEG (any format `image` reads) bytes to `channels` (1 or 3) as PIL's
/// `Image.open(f).convert("L" | "RGB")` would.
pub fn decode(bytes: &[u8], channels: usize) -> Result<(Image8, Conversion), DecodeError> {
    let src = if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        (decode_jpeg(bytes)?, Conversion::None)
    } else {
        decode_other(bytes)?
    };
    convert(src, channels)
}

/// JPEG by libjpeg-turbo's decoder (PIL's, bit for bit: its integer IDCT and fancy chroma
/// upsampling); grey JPEGs stay grey. libjpeg decodes a cut-off file as grey padding with a
/// warning, so a file whose last scan has no end marker is refused here (PIL's "image file is
/// truncated").
fn decode_jpeg(bytes: &[u8]) -> Result<Image8, DecodeError> {
    let last_scan = bytes.windows(2).rposition(|m| m == [0xFF, 0xDA]);
    let complete = last_scan.is_some_and(|s| bytes[s..].windows(2).any(|m| m == [0xFF, 0xD9]));
    if !complete {
        return Err(DecodeError::Truncated);
    }
    // libjpeg reports a corrupt stream by unwinding out of the call (mozjpeg's error manager).
    let decoded = std::panic::catch_unwind(|| -> std::io::Result<(usize, usize, bool, Vec<u8>)> {
        let d = mozjpeg::Decompress::new_mem(bytes)?;
        let grey = d.color_space() == mozjpeg::ColorSpace::JCS_GRAYSCALE;
        let (w, h) = (d.width(), d.height());
        let data = if grey {
            let mut s = d.grayscale()?;
            let px: Vec<u8> = s.read_scanlines()?;
            s.finish()?;
            px
        } else {
            let mut s = d.rgb()?;
            let px: Vec<[u8; 3]> = s.read_scanlines()?;
            s.finish()?;
            px.into_iter().flatten().collect()
        };
        Ok((w, h, grey, data))
    });
    let (w, h, grey, data) = match decoded {
        Ok(r) => r.map_err(DecodeError::Jpeg)?,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "corrupt JPEG data".into());
            return Err(DecodeError::Jpeg(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                msg,
            )));
        }
    };
    let c = if grey { 1 } else { 3 };
    if data.len() != w * h * c {
        return Err(DecodeError::Truncated);
    }
    Ok(Image8 { w, h, c, data })
}

/// PNG and the other formats of the `image` crate.
fn decode_other(bytes: &[u8]) -> Result<(Image8, Conversion), DecodeError> {
    use image::ColorType as C;
    let img = image::load_from_memory(bytes)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let color = img.color();
    // Grey, grey + alpha, RGB, RGBA at 8 or 16 bits; alpha dropped as `convert` does.
    let (grey, alpha) = match color {
        C::L8 | C::L16 => (true, false),
        C::La8 | C::La16 => (true, true),
        C::Rgb8 | C::Rgb16 => (false, false),
        C::Rgba8 | C::Rgba16 => (false, true),
        other => return Err(DecodeError::Layout(other)),
    };
    let (c, data) = match grey {
        true => (1, img.into_luma8().into_raw()),
        false => (3, img.into_rgb8().into_raw()),
    };
    let conversion = match alpha {
        true => Conversion::AlphaDropped,
        false => Conversion::None,
    };
    Ok((Image8 { w, h, c, data }, conversion))
}

/// `src` in `channels`, as `Image.convert("L" | "RGB")`.
fn convert((src, mut conversion): (Image8, Conversion), channels: usize) -> Result<(Image8, Conversion), DecodeError> {
    let out = match (src.c, channels) {
        (1, 3) => {
            conversion = Conversion::GreyToRgb;
            Image8 {
                c: 3,
                data: src.data.iter().flat_map(|&v| [v, v, v]).collect(),
                ..src
            }
        }
        (3, 1) => {
            conversion = Conversion::RgbToGrey;
            // Pillow's rgb2l: L = (19595 R + 38470 G + 7471 B + 0x8000) >> 16.
            let data = src
                .data
                .chunks_exact(3)
                .map(|p| ((19595 * p[0] as u32 + 38470 * p[1] as u32 + 7471 * p[2] as u32 + 0x8000) >> 16) as u8)
                .collect();
            Image8 { c: 1, data, ..src }
        }
        _ => src,
    };
    Ok((out, conversion))
}

/// Pillow's filters: (support, kernel).
fn filter(interp: Interpolation) -> (f64, fn(f64) -> f64) {
    fn bilinear(x: f64) -> f64 {
        let x = x.abs();
        if x < 1.0 {
            1.0 - x
        } else {
            0.0
        }
    }
    fn bicubic(x: f64) -> f64 {
        const A: f64 = -0.5;
        let x = x.abs();
        if x < 1.0 {
            ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * A
        } else {
            0.0
        }
    }
    match interp {
        Interpolation::Bilinear => (1.0, bilinear),
        Interpolation::Bicubic => (2.0, bicubic),
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for `n_in` → `n_out` over the input
/// span [in0, in1): per output pixel, its first input index and fixed-point weights.
fn coefficients(n_in: usize, in0: f64, in1: f64, n_out: usize, interp: Interpolation) -> Vec<(usize, Vec<i32>)> {
    let (support, kernel) = filter(interp);
    let scale = (in1 - in0) / n_out as f64;
    let filterscale = scale.max(1.0);
    let support = support * filterscale;
    (0..n_out)
        .map(|xx| {
            let center = in0 + (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's (int) truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(n_in as i64) as usize;
            let w: Vec<f64> = (xmin..xmax).map(|x| kernel((x as f64 - center + 0.5) * ss)).collect();
            let total: f64 = w.iter().sum();
            let fixed = w
                .iter()
                .map(|&k| {
                    let k = if total != 0.0 { k / total } else { k };
                    let v = k * (1u32 << PRECISION_BITS) as f64;
                    if v < 0.0 {
                        (v - 0.5) as i32
                    } else {
                        (v + 0.5) as i32
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One resampling pass along x (`horizontal`) or y, Pillow's `ImagingResampleHorizontal_8bpc` /
/// `ImagingResampleVertical_8bpc`, in its 32-bit integer arithmetic (255 · Σ|k| < 2³¹ for both
/// filters, so nothing overflows there or here).
fn pass(img: &Image8, coeffs: &[(usize, Vec<i32>)], horizontal: bool) -> Image8 {
    match horizontal {
        true => pass_horizontal(img, coeffs),
        false => pass_vertical(img, coeffs),
    }
}

fn pass_horizontal(img: &Image8, coeffs: &[(usize, Vec<i32>)]) -> Image8 {
    match img.c {
        1 => pass_horizontal_c::<1>(img, coeffs),
        3 => pass_horizontal_c::<3>(img, coeffs),
        _ => pass_horizontal_c::<4>(img, coeffs),
    }
}

/// The horizontal pass for `C` interleaved channels (a constant, so the tap loop unrolls).
fn pass_horizontal_c<const C: usize>(img: &Image8, coeffs: &[(usize, Vec<i32>)]) -> Image8 {
    let w = coeffs.len();
    let mut data = vec![0u8; w * img.h * C];
    for (src, dst) in img.data.chunks_exact(img.w * C).zip(data.chunks_exact_mut(w * C)) {
        for ((first, k), out) in coeffs.iter().zip(dst.chunks_exact_mut(C)) {
            let taps = &src[first * C..(first + k.len()) * C];
            let mut acc = [1i32 << (PRECISION_BITS - 1); C];
            for (px, &kt) in taps.chunks_exact(C).zip(k) {
                for ch in 0..C {
                    acc[ch] += px[ch] as i32 * kt;
                }
            }
            for ch in 0..C {
                out[ch] = clip8(acc[ch]);
            }
        }
    }
    Image8 {
        w,
        h: img.h,
        c: C,
        data,
    }
}

fn pass_vertical(img: &Image8, coeffs: &[(usize, Vec<i32>)]) -> Image8 {
    let row = img.w * img.c;
    let mut data = vec![0u8; row * coeffs.len()];
    let mut acc = vec![0i32; row];
    for ((first, k), dst) in coeffs.iter().zip(data.chunks_exact_mut(row)) {
        acc.fill(1 << (PRECISION_BITS - 1));
        for (t, &kt) in k.iter().enumerate() {
            let src = &img.data[(first + t) * row..(first + t + 1) * row];
            for (a, &v) in acc.iter_mut().zip(src) {
                *a += v as i32 * kt;
            }
        }
        for (o, &a) in dst.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    Image8 {
        w: img.w,
        h: coeffs.len(),
        c: img.c,
        data,
    }
}

/// `Image.resize((w, h), resample)` of the region `box` = (x0, y0, x1, y1) of `img` (the whole
/// image for a plain resize): horizontal pass first, each pass only where the size changes.
pub fn resize_box(img: &Image8, w: usize, h: usize, bbox: (f64, f64, f64, f64), interp: Interpolation) -> Image8 {
    let (x0, y0, x1, y1) = bbox;
    let need_h = w != img.w || x0 != 0.0 || x1 != img.w as f64;
    let need_v = h != img.h || y0 != 0.0 || y1 != img.h as f64;
    let vcoeffs = coefficients(img.h, y0, y1, h, interp);
    if !need_h {
        return if need_v {
            pass(img, &vcoeffs, false)
        } else {
            img.clone()
        };
    }
    // Only the rows the vertical pass reads (Pillow's ybox_first..ybox_last).
    let (first, last) = match (need_v, vcoeffs.first(), vcoeffs.last()) {
        (true, Some(a), Some(z)) => (a.0, z.0 + z.1.len()),
        _ => (0, img.h),
    };
    let rows = Image8 {
        w: img.w,
        h: last - first,
        c: img.c,
        data: img.data[first * img.w * img.c..last * img.w * img.c].to_vec(),
    };
    let out = pass(&rows, &coefficients(img.w, x0, x1, w, interp), true);
    if !need_v {
        return out;
    }
    let shifted: Vec<(usize, Vec<i32>)> = vcoeffs.into_iter().map(|(s, k)| (s - first, k)).collect();
    pass(&out, &shifted, false)
}

/// `Image.resize((w, h), resample)`.
pub fn resize(img: &Image8, w: usize, h: usize, interp: Interpolation) -> Image8 {
    resize_box(img, w, h, (0.0, 0.0, img.w as f64, img.h as f64), interp)
}

/// torchvision's `Resize(size)` with an int: the shorter side becomes `size`, the longer keeps
/// the aspect ratio (truncated).
pub fn resize_shorter(img: &Image8, size: usize, interp: Interpolation) -> Image8 {
    let (short, long) = (img.w.min(img.h), img.w.max(img.h));
    let long_new = (size as f64 * long as f64 / short as f64) as usize;
    let (w, h) = if img.w <= img.h {
        (size, long_new)
    } else {
        (long_new, size)
    };
    if (w, h) == (img.w, img.h) {
        return img.clone();
    }
    resize(img, w, h, interp)
}

/// Python's `round` (half to even) of a non-negative value.
fn round_half_even(v: f64) -> usize {
    let f = v.floor();
    let r = if v - f > 0.5 || (v - f == 0.5 && f % 2.0 != 0.0) {
        f + 1.0
    } else {
        f
    };
    r as usize
}

/// The rectangle (left, top, w, h) of `img`.
pub fn crop(img: &Image8, left: usize, top: usize, w: usize, h: usize) -> Image8 {
    let c = img.c;
    let mut data = Vec::with_capacity(w * h * c);
    for y in top..top + h {
        data.extend_from_slice(&img.data[(y * img.w + left) * c..(y * img.w + left + w) * c]);
    }
    Image8 { w, h, c, data }
}

/// torchvision's `CenterCrop(size)` of an image at least that large.
pub fn center_crop(img: &Image8, size: usize) -> Image8 {
    let top = round_half_even((img.h.saturating_sub(size)) as f64 / 2.0);
    let left = round_half_even((img.w.saturating_sub(size)) as f64 / 2.0);
    crop(img, left, top, size.min(img.w), size.min(img.h))
}

/// timm's evaluation transform (`transforms_imagenet_eval`): resize the shorter side to
/// ⌊size / crop_pct⌋, centre-crop `size`.
pub fn eval_transform(img: &Image8, size: usize, crop_pct: f64, interp: Interpolation) -> Image8 {
    let scale = (size as f64 / crop_pct).floor() as usize;
    center_crop(&resize_shorter(img, scale, interp), size)
}

/// torchvision's `RandomResizedCrop(size, scale, ratio)`: ten tries at a box of area
/// U(scale)·area and log-uniform aspect ratio that fits, else the centre crop at the nearest
/// allowed ratio; the box resized to `size`×`size`.
pub fn random_resized_crop(
    img: &Image8,
    size: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    interp: Interpolation,
    rng: &mut impl Rng,
) -> Image8 {
    let (wi, hi) = (img.w as f64, img.h as f64);
    let area = wi * hi;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0..=scale.1);
        let aspect = rng.random_range(lr0..=lr1).exp();
        let w = (target * aspect).sqrt().round() as usize;
        let h = (target / aspect).sqrt().round() as usize;
        if 0 < w && w <= img.w && 0 < h && h <= img.h {
            let top = rng.random_range(0..=img.h - h);
            let left = rng.random_range(0..=img.w - w);
            return resize(&crop(img, left, top, w, h), size, size, interp);
        }
    }
    let in_ratio = wi / hi;
    let (w, h) = if in_ratio < ratio.0 {
        (img.w, (wi / ratio.0).round() as usize)
    } else if in_ratio > ratio.1 {
        ((hi * ratio.1).round() as usize, img.h)
    } else {
        (img.w, img.h)
    };
    let (top, left) = ((img.h - h) / 2, (img.w - w) / 2);
    resize(&crop(img, left, top, w, h), size, size, interp)
}

/// Mirror left–right.
pub fn hflip(img: &Image8) -> Image8 {
    let c = img.c;
    let mut data = Vec::with_capacity(img.data.len());
    for row in img.data.chunks_exact(img.w * c) {
        for px in row.chunks_exact(c).rev() {
            data.extend_from_slice(px);
        }
    }
    Image8 { data, ..img.clone() }
}

/// `ToTensor` then `Normalize(mean, std)`: channel-major `c·h·w` floats, (v/255 − mean) / std
/// (in f64, rounded once to f32: through a table of the 256 values per channel).
pub fn to_chw(img: &Image8, mean: &[f64], std: &[f64]) -> Vec<f32> {
    let (c, n) = (img.c, img.w * img.h);
    let lut: Vec<[f32; 256]> = (0..c)
        .map(|ch| std::array::from_fn(|v| ((v as f64 / 255.0 - mean[ch]) / std[ch]) as f32))
        .collect();
    let mut out = vec![0f32; c * n];
    for (ch, (plane, lut)) in out.chunks_exact_mut(n).zip(&lut).enumerate() {
        for (o, px) in plane.iter_mut().zip(img.data.chunks_exact(c)) {
            *o = lut[px[ch] as usize];
        }
    }
    out
}
