//! The continuous image transforms of the paper (section 4): their finite affine matrices A(t),
//! their generators B = dA/dt at t = 0, the finite warp, and the Lie derivative of an image
//! (or of tokens / group feature maps) through a pixel stencil.
//!
//! Conventions are fixed in DESIGN.md ("Coordinates and transforms"): u ∈ [-1, 1]² with
//! align_corners=True, (ρ(t)x)(u) = x(A(t)·[u; 1]), bilinear, reflection without repeating the
//! border. The reference code's stretch_y bug (a zero on the diagonal) is not copied.

mod stencil;
mod warp;

pub use stencil::{grid_derivative, image_lie_derivative, lie_derivative, Axis, Repr, Stencil};
pub use warp::{apply, warp, Blank, Padding};

/// A 2×3 affine matrix acting on normalized coordinates `[u_x, u_y, 1]`.
pub type Affine = [[f64; 3]; 2];

/// The identity warp.
pub const IDENTITY: Affine = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]];

/// One continuous transform of the paper.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transform {
    TranslateX,
    TranslateY,
    Rotate,
    ShearX,
    ShearY,
    StretchX,
    StretchY,
    Scale,
    Hyperbolic,
    /// x ↦ (1 + t)·x on the normalized image: not a warp.
    Saturate,
}

impl Transform {
    pub const ALL: [Transform; 10] = [
        Transform::TranslateX,
        Transform::TranslateY,
        Transform::Rotate,
        Transform::ShearX,
        Transform::ShearY,
        Transform::StretchX,
        Transform::StretchY,
        Transform::Scale,
        Transform::Hyperbolic,
        Transform::Saturate,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Transform::TranslateX => "translate_x",
            Transform::TranslateY => "translate_y",
            Transform::Rotate => "rotate",
            Transform::ShearX => "shear_x",
            Transform::ShearY => "shear_y",
            Transform::StretchX => "stretch_x",
            Transform::StretchY => "stretch_y",
            Transform::Scale => "scale",
            Transform::Hyperbolic => "hyperbolic",
            Transform::Saturate => "saturate",
        }
    }

    /// A(t) for the spatial transforms (t in radians for `rotate`); `None` for `saturate`.
    pub fn matrix(self, t: f64) -> Option<Affine> {
        let (c, s) = (t.cos(), t.sin());
        Some(match self {
            Transform::TranslateX => [[1.0, 0.0, t], [0.0, 1.0, 0.0]],
            Transform::TranslateY => [[1.0, 0.0, 0.0], [0.0, 1.0, t]],
            Transform::Rotate => [[c, s, 0.0], [-s, c, 0.0]],
            Transform::ShearX => [[1.0, t, 0.0], [0.0, 1.0, 0.0]],
            Transform::ShearY => [[1.0, 0.0, 0.0], [t, 1.0, 0.0]],
            Transform::StretchX => [[1.0 + t, 0.0, 0.0], [0.0, 1.0, 0.0]],
            Transform::StretchY => [[1.0, 0.0, 0.0], [0.0, 1.0 + t, 0.0]],
            Transform::Scale => [[1.0 - t, 0.0, 0.0], [0.0, 1.0 - t, 0.0]],
            Transform::Hyperbolic => [[t.cosh(), t.sinh(), 0.0], [t.sinh(), t.cosh(), 0.0]],
            Transform::Saturate => return None,
        })
    }

    /// The generator B = dA/dt at t = 0; `None` for `saturate` (whose generator is x ↦ x).
    pub fn generator(self) -> Option<Affine> {
        Some(match self {
            Transform::TranslateX => [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]],
            Transform::TranslateY => [[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]],
            Transform::Rotate => [[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]],
            Transform::ShearX => [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]],
            Transform::ShearY => [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]],
            Transform::StretchX => [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
            Transform::StretchY => [[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
            Transform::Scale => [[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]],
            Transform::Hyperbolic => [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]],
            Transform::Saturate => return None,
        })
    }
}

impl std::fmt::Display for Transform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Normalized coordinate of pixel index `i` on an axis of `n` pixels (align_corners=True).
pub fn coord(i: usize, n: usize) -> f64 {
    if n <= 1 {
        0.0
    } else {
        -1.0 + 2.0 * i as f64 / (n - 1) as f64
    }
}

#[cfg(test)]
mod tests;
