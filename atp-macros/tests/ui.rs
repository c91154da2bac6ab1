//! What `#[tool]` and `#[toolkit]` refuse at compile time, and the
//! messages they give (`tests/ui/*.stderr`; `TRYBUILD=overwrite` writes
//! them anew).
//!
//! Opt-in, with `ATP_TRYBUILD=1` (`.ci/run` sets it): trybuild builds the
//! cases in a project and target directory of its own, so from a fresh
//! clone it first compiles atp-registry and its dependencies again (about
//! a minute and a half on 2 cores, too long for every `cargo test`; a few
//! seconds once built). Without it the test says, loudly, that it was
//! skipped and how to run it.

use std::io::Write;

/// Set to `1`, the compile-error cases run.
const ENABLE: &str = "ATP_TRYBUILD";

#[test]
fn compile_errors() {
    match std::env::var(ENABLE).as_deref() {
        Ok("1") => {}
        Ok(v) if !v.is_empty() && v != "0" => {
            panic!("{ENABLE}={v:?}: set it to 1 to run the compile-error cases, or unset it")
        }
        _ => {
            let line = format!(
                "*** SKIPPED: the compile errors of #[tool] (trybuild): {ENABLE} is not 1. Run them with \
                 `{ENABLE}=1 cargo test -p atp-macros --test ui` (the first run builds atp-registry \
                 again for trybuild, ~1.5 min on 2 cores); `.ci/run` sets it\n"
            );
            let _ = std::io::stderr().write_all(line.as_bytes());
            return;
        }
    }
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
