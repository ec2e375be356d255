//! The vendored candle-core's backward (vendor/README.md): a tensor's first gradient is stored
//! as it is, later ones are summed. Checked against gradients worked out by hand, in f64.

use candle_core::{DType, Device, Result, Tensor, Var};

fn var(v: &[f64], shape: (usize, usize)) -> Result<Var> {
    Var::from_tensor(&Tensor::from_slice(v, shape, &Device::Cpu)?)
}

fn values(t: &Tensor) -> Result<Vec<f64>> {
    t.flatten_all()?.to_vec1()
}

#[test]
fn fan_in_sums_every_consumer() -> Result<()> {
    // loss = Σ (x·x + 3x − x) ⇒ ∂loss/∂x = 2x + 2; x reaches the loss along four edges.
    let x = var(&[1.0, -2.0, 0.5, 4.0], (2, 2))?;
    let loss = ((x.as_tensor() * x.as_tensor())? + (x.as_tensor() * 3.0)? - x.as_tensor())?.sum_all()?;
    let g = loss.backward()?;
    assert_eq!(values(g.get(&x).unwrap())?, vec![4.0, -2.0, 3.0, 10.0]);
    Ok(())
}

#[test]
fn first_gradient_through_a_view_is_stored_contiguous() -> Result<()> {
    // loss = Σ wᵢⱼ·xⱼᵢ: x's only gradient arrives transposed (a strided view of wᵀ).
    let x = var(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], (2, 3))?;
    let w = Tensor::from_slice(&[1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0], (3, 2), &Device::Cpu)?;
    let loss = (x.as_tensor().t()? * &w)?.sum_all()?;
    let g = loss.backward()?;
    let gx = g.get(&x).unwrap();
    assert!(gx.is_contiguous());
    assert_eq!(gx.dims(), &[2, 3]);
    assert_eq!(values(gx)?, vec![1.0, 3.0, 5.0, 2.0, 4.0, 6.0]);
    Ok(())
}

#[test]
fn subtracted_first_gradient_is_negated() -> Result<()> {
    // loss = Σ (a − b)² ⇒ ∂/∂a = 2(a − b), ∂/∂b = −2(a − b); b's first gradient is subtracted.
    let a = var(&[3.0, 1.0], (1, 2))?;
    let b = var(&[1.0, 4.0], (1, 2))?;
    let loss = (a.as_tensor() - b.as_tensor())?.sqr()?.sum_all()?;
    let g = loss.backward()?;
    assert_eq!(values(g.get(&a).unwrap())?, vec![4.0, -6.0]);
    assert_eq!(values(g.get(&b).unwrap())?, vec![-4.0, 6.0]);
    // A tensor that is only subtracted, once.
    let loss = (Tensor::zeros((1, 2), DType::F64, &Device::Cpu)? - b.as_tensor())?.sum_all()?;
    assert_eq!(values(loss.backward()?.get(&b).unwrap())?, vec![-1.0, -1.0]);
    Ok(())
}
