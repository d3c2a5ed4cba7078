//! CPU scoring kernels (issue 4): fused Taylor / magnitude scores and activation statistics.
