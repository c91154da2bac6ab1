//! What `#[tool]` and `#[toolkit]` refuse at compile time, and the
//! messages they give (`tests/ui/*.stderr`; `TRYBUILD=overwrite` writes
//! them anew).

#[test]
fn compile_errors() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
