"""Coefficients of models::fused's f32 erf: erf on [0, 4) in 16 pieces of width 1/4, each a
degree-7 polynomial in u = 8·(z − z_i) − 1 ∈ [−1, 1) (Chebyshev interpolation at 32 nodes, then
monomial form, evaluated in f64). Prints the Rust table and the worst error on a dense grid.

    /work/venv-torch/bin/python scripts/erf_table.py
"""
import math

import numpy as np
from numpy.polynomial import chebyshev as C

PIECES, WIDTH, DEG = 16, 0.25, 7
rows = []
worst = 0.0
for i in range(PIECES):
    z0 = i * WIDTH
    f = np.vectorize(lambda u: math.erf(z0 + (u + 1) * WIDTH / 2))
    cheb = C.chebinterpolate(f, DEG)
    mono = C.cheb2poly(cheb)
    u = np.linspace(-1, 1, 20001)
    approx = np.polyval(mono[::-1], u)
    worst = max(worst, float(np.max(np.abs(approx - f(u)))))
    rows.append(mono)
print(f"// worst |error| on the pieces: {worst:.2e}")
print(f"const ERF_PIECES: [[f64; {DEG + 1}]; {PIECES}] = [")
for mono in rows:
    # repr: the shortest decimal that round-trips to the same f64 (clippy: excessive_precision)
    print("    [" + ", ".join(repr(float(c)) for c in mono) + "],")
print("];")
