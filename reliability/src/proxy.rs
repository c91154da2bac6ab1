//! A TCP forwarder that cuts connections: put between a client and a
//! server, it forwards bytes both ways until told to cut, then closes both
//! sides at once — neither peer is asked or warned, as when a proxy, a NAT
//! or a cable dies.

use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// A running proxy. Dropping it stops accepting and cuts every connection.
#[derive(Debug)]
pub struct CutProxy {
    addr: SocketAddr,
    cut: watch::Sender<u64>,
    freeze: watch::Sender<u64>,
    accepted: watch::Sender<usize>,
    stats: Arc<Stats>,
    accept: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Default)]
struct Stats {
    cuts_done: AtomicUsize,
    downstream_bytes: AtomicU64,
    cut_after_downstream: AtomicU64,
}

impl CutProxy {
    /// Listens on a loopback port and forwards every connection to
    /// `upstream`.
    pub async fn start(upstream: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (cut, _) = watch::channel(0u64);
        let (freeze, _) = watch::channel(0u64);
        let (accepted, _) = watch::channel(0usize);
        let stats = Arc::new(Stats {
            cut_after_downstream: AtomicU64::new(u64::MAX),
            ..Stats::default()
        });
        let accept = {
            let cut = cut.clone();
            let freeze = freeze.clone();
            let accepted = accepted.clone();
            let stats = stats.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    // Subscribed before it counts as accepted: a cut after
                    // `wait_accepted` reaches this connection.
                    let cut = cut.subscribe();
                    let freeze = freeze.subscribe();
                    accepted.send_modify(|n| *n += 1);
                    let stats = stats.clone();
                    tokio::spawn(async move {
                        if let Ok(server) = TcpStream::connect(upstream).await {
                            forward(client, server, cut, freeze, &stats).await;
                        }
                    });
                }
            })
        };
        Ok(Self {
            addr,
            cut,
            freeze,
            accepted,
            stats,
            accept,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Cuts every connection open now (new ones are forwarded again).
    pub fn cut_all(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    /// Freezes every connection open now: from now on they carry nothing,
    /// either way, and stay open (a black-holed route: neither side hears
    /// anything, not even a close). New connections are forwarded.
    pub fn freeze_all(&self) {
        self.freeze.send_modify(|n| *n += 1);
    }

    /// Cuts the connection that carries the `bytes`-th byte from a server
    /// to a client from now on (mid-answer), once; `None` turns that off.
    pub fn cut_after_downstream(&self, bytes: Option<u64>) {
        let at = bytes.map_or(u64::MAX, |b| {
            self.stats.downstream_bytes.load(Ordering::SeqCst) + b
        });
        self.stats.cut_after_downstream.store(at, Ordering::SeqCst);
    }

    /// How many connections were accepted.
    pub fn accepted(&self) -> usize {
        *self.accepted.borrow()
    }

    /// Waits (at most `limit`) until `n` connections in all have been
    /// accepted; returns whether they were.
    pub async fn wait_accepted(&self, n: usize, limit: std::time::Duration) -> bool {
        let mut rx = self.accepted.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|v| *v >= n))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// How many connections were cut.
    pub fn cuts(&self) -> usize {
        self.stats.cuts_done.load(Ordering::SeqCst)
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut_all();
    }
}

async fn forward(
    client: TcpStream,
    server: TcpStream,
    mut cut: watch::Receiver<u64>,
    mut freeze: watch::Receiver<u64>,
    stats: &Stats,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let mut up = vec![0u8; 16 * 1024];
    let mut down = vec![0u8; 16 * 1024];
    let (mut up_open, mut down_open) = (true, true);
    while up_open || down_open {
        tokio::select! {
            _ = cut.changed() => {
                stats.cuts_done.fetch_add(1, Ordering::SeqCst);
                return;
            }
            _ = freeze.changed() => {
                // Hold both sockets, carry nothing, until cut (or dropped).
                let _ = cut.changed().await;
                return;
            }
            r = cr.read(&mut up), if up_open => match r {
                Ok(0) | Err(_) => { up_open = false; let _ = sw.shutdown().await; }
                Ok(n) => if sw.write_all(&up[..n]).await.is_err() { return },
            },
            r = sr.read(&mut down), if down_open => match r {
                Ok(0) | Err(_) => { down_open = false; let _ = cw.shutdown().await; }
                Ok(n) => {
                    let total = stats.downstream_bytes.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                    let limit = stats.cut_after_downstream.load(Ordering::SeqCst);
                    if total >= limit {
                        // Forward only up to the limit, then cut.
                        let keep = n.saturating_sub((total - limit) as usize);
                        let _ = cw.write_all(&down[..keep]).await;
                        stats.cut_after_downstream.store(u64::MAX, Ordering::SeqCst);
                        stats.cuts_done.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    if cw.write_all(&down[..n]).await.is_err() { return }
                }
            },
        }
    }
}
