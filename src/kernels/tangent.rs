//! The layout of tangents: `x: (B, ...)` carries `dx: (T, B, ...)`, T directions pushed through
//! one primal pass. These reshapes and broadcasts are what the tangent kernels compute on, so
//! they live here, below the JVP contract (`crate::jvp`, which re-exports them).

use candle_core::{Result, Tensor};

/// Broadcast a primal-shaped factor `(B, ...)` against a tangent `(T, B, ...)`.
pub fn tangent_mul(dx: &Tensor, factor: &Tensor) -> Result<Tensor> {
    dx.broadcast_mul(&factor.unsqueeze(0)?)
}

/// Merge the tangent axis into the batch: `(T, B, ...)` → `(T·B, ...)`, for ops that need a
/// fixed rank (conv2d). Returns the merged tensor and T.
pub fn merge_tangent(dx: &Tensor) -> Result<(Tensor, usize)> {
    let dims = dx.dims();
    let t = dims[0];
    let mut shape = vec![t * dims[1]];
    shape.extend_from_slice(&dims[2..]);
    Ok((dx.reshape(shape)?, t))
}

/// Undo [`merge_tangent`]: `(T·B, ...)` → `(T, B, ...)`.
pub fn split_tangent(dx: &Tensor, t: usize) -> Result<Tensor> {
    let dims = dx.dims();
    let mut shape = vec![t, dims[0] / t];
    shape.extend_from_slice(&dims[1..]);
    dx.reshape(shape)
}

/// `(T, G, R, K) × (G, K, M)` → `(T, G, R, M)`: a tangent on the left of a primal matrix, as one
/// batched matmul over G with the T directions folded into the rows (no copy of the primal).
pub fn tangent_matmul(dx: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (t, g, r, k) = dx.dims4()?;
    let m = w.dim(2)?;
    // (T, G, R, K) -> (G, T·R, K)
    let lhs = dx.transpose(0, 1)?.reshape((g, t * r, k))?;
    // (G, T·R, M) -> (G, T, R, M) -> (T, G, R, M)
    lhs.matmul(w)?.reshape((g, t, r, m))?.transpose(0, 1)
}
