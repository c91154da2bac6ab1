//! atp-server's console in a real browser; the tests are in
//! `tests/browser/` (`ATP_BROWSER=1 cargo test -p atp-console-tests`).
