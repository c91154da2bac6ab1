//! Serving the router: what `axum::serve` does (HTTP/1.1 with upgrades,
//! graceful shutdown), plus a header read timeout — a connection that has
//! not sent a whole request head in time is closed. `axum::serve` has none,
//! so idle or half-sent connections (slowloris) were held for ever, and
//! enough of them (as many as the process may open files) stopped the
//! server from accepting anyone.

use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::watch};

/// Serves `router` on `listener` until `stop` turns true, then lets the
/// requests in flight finish and returns once every connection is closed
/// (upgraded WebSockets are the handlers' to close).
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    mut stop: watch::Receiver<bool>,
    header_read_timeout: Duration,
) -> std::io::Result<()> {
    // Each connection holds a receiver; `closed()` on the sender resolves
    // when the last one is gone.
    let (open_tx, open_rx) = watch::channel(());
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = crate::stopped(&mut stop) => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, a connection reset before it was
                // accepted…: wait a little and go on, as `axum::serve` does.
                tracing::warn!("accepting a connection failed: {e}");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    _ = crate::stopped(&mut stop) => break,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout)
            .serve_connection(
                TokioIo::new(stream),
                TowerToHyperService::new(router.clone()),
            )
            .with_upgrades();
        let mut stop = stop.clone();
        let open = open_rx.clone();
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                done = conn.as_mut() => {
                    if let Err(e) = done {
                        tracing::trace!("connection ended: {e}");
                    }
                }
                _ = crate::stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(open);
        });
    }
    drop(listener);
    drop(open_rx);
    open_tx.closed().await;
    Ok(())
}
