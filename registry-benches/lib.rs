//! The criterion benchmarks of `atp-registry` (`cargo bench -p
//! atp-registry-benches`); this library is empty, the benchmarks are in
//! `benches/`. See `docs/BENCHMARKS.md`.
