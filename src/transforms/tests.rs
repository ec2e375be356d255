use super::*;
use candle_core::{DType, Device, Tensor};

fn blob(h: usize, w: usize) -> Tensor {
    // A smooth, off-centre Gaussian blob (B=1, C=1) in f64.
    let mut v = Vec::with_capacity(h * w);
    for i in 0..h {
        for j in 0..w {
            let (x, y) = (coord(j, w) - 0.15, coord(i, h) + 0.1);
            v.push((-(x * x + 2.0 * y * y) / 0.18).exp());
        }
    }
    Tensor::from_vec(v, (1, 1, h, w), &Device::Cpu).unwrap()
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn zero_parameter_is_identity() {
    let x = blob(28, 28);
    for tr in Transform::ALL {
        for pad in [Padding::Zeros, Padding::Reflect] {
            let y = apply(&x, tr, &[0.0], pad).unwrap();
            assert!(max_abs(&(y - &x).unwrap()) < 1e-12, "{tr}");
        }
    }
}

#[test]
fn rotate_90_is_exact_index_rotation() {
    let x = Tensor::arange(0f64, 28.0 * 28.0, &Device::Cpu)
        .unwrap()
        .reshape((1, 1, 28, 28))
        .unwrap();
    let y = apply(&x, Transform::Rotate, &[std::f64::consts::FRAC_PI_2], Padding::Zeros).unwrap();
    // A = [[0, 1], [-1, 0]]: y(u_x, u_y) = x(u_y, -u_x), i.e. y[i][j] = x[W-1-j][i].
    let xv = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let yv = y.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    for i in 0..28 {
        for j in 0..28 {
            assert!((yv[i * 28 + j] - xv[(27 - j) * 28 + i]).abs() < 1e-6);
        }
    }
}

#[test]
fn central_stencil_matches_symmetric_warp_derivative() {
    // For translations, shears and stretches the central stencil equals (ρ(ε)x − ρ(−ε)x)/2ε of the
    // bilinear warp exactly (for ε below one pixel); for the rest it matches on smooth images.
    let x = blob(28, 28);
    let eps = 1e-4;
    for tr in Transform::ALL {
        let lx = image_lie_derivative(&x, tr, Stencil::Central).unwrap();
        let plus = apply(&x, tr, &[eps], Padding::Reflect).unwrap();
        let minus = apply(&x, tr, &[-eps], Padding::Reflect).unwrap();
        let fd = ((plus - minus).unwrap() / (2.0 * eps)).unwrap();
        let err = max_abs(&(&lx - &fd).unwrap()) / max_abs(&lx).max(1e-12);
        assert!(err < 1e-3, "{tr}: relative error {err}");
    }
}

#[test]
fn tokens_leave_cls_untouched_and_match_image_derivative() {
    let img = blob(4, 4).to_dtype(DType::F64).unwrap();
    // (1, 1, 4, 4) -> tokens (1, 1 + 16, 1) with a cls token of value 5.
    let toks = img.reshape((1, 16, 1)).unwrap();
    let cls = Tensor::full(5f64, (1, 1, 1), &Device::Cpu).unwrap();
    let toks = Tensor::cat(&[cls, toks], 1).unwrap();
    let d = lie_derivative(
        &toks,
        super::Repr::Tokens { h: 4, w: 4, prefix: 1 },
        Transform::Rotate,
        Stencil::Central,
    )
    .unwrap();
    let di = image_lie_derivative(&img, Transform::Rotate, Stencil::Central).unwrap();
    let dv = d.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    assert_eq!(dv[0], 0.0);
    let iv = di.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    for k in 0..16 {
        assert!((dv[k + 1] - iv[k]).abs() < 1e-12);
    }
}

#[test]
fn spectral_derivative_is_exact_on_band_limited_signals() {
    let n = 28;
    let w = 2.0 * std::f64::consts::PI * 3.0 / n as f64;
    let v: Vec<f64> = (0..n).map(|j| (w * j as f64).sin()).collect();
    let x = Tensor::from_vec(v, (1, n), &Device::Cpu).unwrap();
    let d = grid_derivative(&x, Axis::X, Stencil::Spectral)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    for (j, dj) in d.iter().enumerate() {
        assert!((dj - w * (w * j as f64).cos()).abs() < 1e-10);
    }
}
