//! criterion benchmarks live in `benches/`; see README.md.
