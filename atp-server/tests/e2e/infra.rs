//! The PostgreSQL and NATS servers of the many-server tests: the harness
//! is `atp_conformance::infra` (shared with the benchmarks).

pub use atp_conformance::infra::*;

/// Runs a blocking harness step (starting, killing or restarting
/// PostgreSQL or NATS) without stalling the runtime's other tasks (the
/// servers under test); needs the multi-threaded runtime.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[test]
fn postgres_and_nats_start_and_stop() {
    if let Some(mut pg) = Postgres::start() {
        assert!(pg.sql("atp", "SELECT 1"));
        pg.restart();
        assert!(pg.sql("atp", "SELECT 1"), "the data survives a restart");
    }
    if let Some(mut nats) = Nats::start() {
        nats.restart();
        assert!(std::net::TcpStream::connect(("127.0.0.1", nats.port)).is_ok());
    }
}
