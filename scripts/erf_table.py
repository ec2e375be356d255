"""Coefficients of models::fused's f32 erf, branch-free so that its loops vectorise:

  |z| ≤ 1:      erf(z) = z · P(v),                 v = 2z² − 1 ∈ [−1, 1]
  1 < |z| < 4:  erf(z) = 1 − exp(−z²) · R(w),      w = (2z − 5)/3 ∈ (−1, 1)
  |z| ≥ 4:      erf(z) = ±1 in f32 (1 − erf(4) ≈ 1.5e-8 < ulp(1)/2)

P (degree 6) and R (degree 10, R(z) = erfc(z)·exp(z²) is smooth) are Chebyshev interpolants
(near-minimax) converted to monomial form. Prints the Rust constants and the worst error of an
f32 evaluation (numpy float32 Horner, exp correctly rounded) on every z = k·2⁻¹⁴ in [0, 4)
against Python's math.erf.

    /work/venv-torch/bin/python scripts/erf_table.py
"""
import math

import numpy as np
from numpy.polynomial import chebyshev as C

DEG_P, DEG_R = 6, 10
f32 = np.float32


def erf_over_z(v):
    z = math.sqrt((v + 1) / 2)
    return math.erf(z) / z if z > 0 else 2 / math.sqrt(math.pi)


def scaled_erfc(w):
    z = (3 * w + 5) / 2
    return math.erfc(z) * math.exp(z * z)


P = C.cheb2poly(C.chebinterpolate(np.vectorize(erf_over_z), DEG_P))
R = C.cheb2poly(C.chebinterpolate(np.vectorize(scaled_erfc), DEG_R))


def horner(coeffs, x):
    acc = np.full_like(x, f32(coeffs[-1]))
    for c in coeffs[-2::-1]:
        acc = acc * x + f32(c)
    return acc


z = np.arange(0, 4, 2.0**-14, dtype=f32)
small = z * horner(P, z * z * f32(2) - f32(1))
w = z * f32(2 / 3) - f32(5 / 3)
large = f32(1) - np.exp(-(z * z).astype(np.float64)).astype(f32) * horner(R, w)
y = np.where(z <= 1, small, large).astype(np.float64)
exact = np.array([math.erf(float(t)) for t in z])
err = np.abs(y - exact)
ulp = np.maximum(np.abs(exact), 1e-38) * 2.0**-23
print(f"// worst |error| {err.max():.2e} (at z = {z[err.argmax()]}), worst {np.max(err / ulp):.2f} ulp")
for name, coeffs in (("ERF_P", P), ("ERF_R", R)):
    # str of the f32: the shortest decimal that round-trips to it (clippy: excessive_precision)
    print(f"const {name}: [f32; {len(coeffs)}] = [" + ", ".join(str(f32(c)) for c in coeffs) + "];")
