//! MNIST and its rotated benchmark: IDX / `.amat` / Hub sources, the regenerated MNIST-rot
//! splits (DESIGN.md, "MNIST-rot"), out-of-distribution sets, and the batch loader.
