//! atp-server's console (`/console`) in headless Chromium, against a real
//! server and real toolkits on loopback. The server-side helpers are
//! atp-server's end-to-end test helpers, shared by path (these tests use
//! only some of them).

#[allow(dead_code)]
#[path = "../../../atp-server/tests/e2e/common.rs"]
mod common;
mod console;
#[allow(dead_code)]
#[path = "../../../atp-server/tests/e2e/hooks.rs"]
mod hooks;
#[allow(dead_code)]
#[path = "../../../atp-server/tests/e2e/oauth_provider.rs"]
mod oauth_provider;
