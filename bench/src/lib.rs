//! weft-bench: load generator and side-by-side scenario runner.
//!
//! A skeleton until the benchmark issue: benchmarks compare configurations
//! side by side in one run and report ratios, because the machines are shared
//! and noisy (see ../shared/DESIGN.md).
