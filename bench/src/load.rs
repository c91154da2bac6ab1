//! The load generator: N keep-alive HTTP/1.1 connections, each sending its
//! next request as soon as the last answer is read (no pipelining), for a
//! warm-up, then a fixed duration or a fixed number of requests, whichever
//! ends first. Latencies are kept (one `u32` of microseconds each, bounded
//! by the request cap) and sorted for percentiles.
//!
//! It knows nothing of ATP: a [`Load`] is an address and a list of
//! requests to cycle through, so any server can be driven with it. The
//! requests go through the lean client of [`crate::http1`]; [`probe`] uses
//! hyper to check an answer fully.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{
    Request, StatusCode,
    header::{CONTENT_TYPE, HOST, HeaderValue},
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::{http1, procfs};

/// One request to send.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    /// `GET`, `POST`, ….
    pub method: hyper::Method,
    /// The path and query.
    pub path: String,
    /// The `Content-Type`, if any.
    pub content_type: Option<&'static str>,
    /// The body (`Content-Length` is set from it).
    pub body: Bytes,
}

impl RequestSpec {
    /// A `POST` of a JSON body.
    pub fn post_json(path: impl Into<String>, body: impl Into<Bytes>) -> Self {
        Self {
            method: hyper::Method::POST,
            path: path.into(),
            content_type: Some("application/json"),
            body: body.into(),
        }
    }

    /// The request as bytes on the wire, with `Host` and `Content-Length`.
    pub fn encode(&self, host: &str) -> Vec<u8> {
        let mut out = format!("{} {} HTTP/1.1\r\nHost: {host}\r\n", self.method, self.path);
        if let Some(ct) = self.content_type {
            out.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        if !self.body.is_empty() || self.method == hyper::Method::POST {
            out.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        out.push_str("\r\n");
        let mut out = out.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }

    fn build(&self, host: &HeaderValue) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = match self.path.parse() {
            Ok(uri) => uri,
            Err(_) => hyper::Uri::from_static("/"),
        };
        let headers = req.headers_mut();
        headers.insert(HOST, host.clone());
        if let Some(ct) = self.content_type {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
        }
        req
    }
}

/// A load to put on a server.
#[derive(Debug, Clone)]
pub struct Load {
    /// The server.
    pub addr: SocketAddr,
    /// The requests, sent in turn by each connection.
    pub requests: Vec<RequestSpec>,
    /// Concurrent keep-alive connections.
    pub connections: usize,
    /// Time spent before measuring (same load, not recorded).
    pub warmup: Duration,
    /// How long to measure.
    pub duration: Duration,
    /// The most requests measured; the run ends early when it is reached.
    pub max_requests: u64,
    /// A process whose CPU time (with its children's) and memory are
    /// read during the measurement: the server.
    pub server_pid: Option<u32>,
}

/// What a load run measured.
#[derive(Debug, Clone)]
pub struct LoadResult {
    /// Requests answered with a 2xx during the measurement.
    pub ok: u64,
    /// Requests answered with another status.
    pub bad_status: u64,
    /// Connection or protocol failures.
    pub errors: u64,
    /// Reconnections (a server that closes keep-alive connections).
    pub reconnects: u64,
    /// From the start of the measurement to the last answer.
    pub elapsed: Duration,
    /// Latencies of the 2xx answers, sorted, in microseconds.
    pub latencies_us: Vec<u32>,
    /// The server's CPU time during the measurement.
    pub server_cpu: Option<Duration>,
    /// The same, split into user space and kernel.
    pub server_cpu_split: Option<procfs::CpuTimes>,
    /// The server's largest resident memory seen during the measurement.
    pub server_peak_rss: Option<u64>,
    /// This process's (the load generator's) CPU time during the
    /// measurement.
    pub client_cpu: Duration,
    /// CPU time the rest of the machine used during the measurement (all
    /// busy time minus the server's and the load generator's): other
    /// processes, and time the hypervisor took.
    pub other_cpu: Option<Duration>,
}

impl LoadResult {
    /// Successful requests per second.
    pub fn rps(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.ok as f64 / secs
        } else {
            0.0
        }
    }

    /// The `p`-th percentile latency (`p` in 0..=100), in milliseconds.
    pub fn percentile_ms(&self, p: f64) -> f64 {
        percentile(&self.latencies_us, p) as f64 / 1000.0
    }

    /// The server's CPU time per successful request, in microseconds.
    pub fn cpu_us_per_request(&self) -> Option<f64> {
        let cpu = self.server_cpu?;
        (self.ok > 0).then(|| cpu.as_secs_f64() * 1e6 / self.ok as f64)
    }

    /// The server's user-space and kernel CPU time per successful request,
    /// in microseconds.
    pub fn cpu_split_us_per_request(&self) -> Option<(f64, f64)> {
        let split = self.server_cpu_split?;
        let n = self.ok as f64;
        (self.ok > 0).then(|| {
            (
                split.user.as_secs_f64() * 1e6 / n,
                split.system.as_secs_f64() * 1e6 / n,
            )
        })
    }

    /// What the rest of the machine used during the measurement, in % of
    /// one CPU.
    pub fn interference_percent(&self) -> Option<f64> {
        let secs = self.elapsed.as_secs_f64();
        (secs > 0.0).then_some(())?;
        Some(self.other_cpu?.as_secs_f64() / secs * 100.0)
    }

    /// The load generator's CPU time per successful request, in
    /// microseconds.
    pub fn client_cpu_us_per_request(&self) -> Option<f64> {
        (self.ok > 0).then(|| self.client_cpu.as_secs_f64() * 1e6 / self.ok as f64)
    }
}

/// The value at percentile `p` of sorted values (nearest rank).
pub fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

struct Shared {
    load: Load,
    encoded: Vec<Vec<u8>>,
    measure_start: Instant,
    end: Instant,
    started: AtomicU64,
}

#[derive(Default)]
struct WorkerOut {
    ok: u64,
    bad_status: u64,
    errors: u64,
    reconnects: u64,
    last_answer: Option<Instant>,
    latencies_us: Vec<u32>,
}

async fn connect(
    addr: SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        // Ends when the connection closes; a failure is seen by the sender.
        let _ = conn.await;
    });
    Ok(sender)
}

async fn worker(shared: Arc<Shared>, index: usize) -> WorkerOut {
    let mut out = WorkerOut::default();
    let requests = &shared.encoded;
    let mut next = index % requests.len().max(1);
    let mut conn: Option<http1::Conn> = None;
    let mut connected_once = false;
    loop {
        let now = Instant::now();
        if now >= shared.end {
            break;
        }
        let measured = now >= shared.measure_start;
        if measured && shared.started.fetch_add(1, Ordering::Relaxed) >= shared.load.max_requests {
            break;
        }
        let c = match &mut conn {
            Some(c) => c,
            None => match http1::Conn::connect(shared.load.addr).await {
                Ok(c) => {
                    if connected_once && measured {
                        out.reconnects += 1;
                    }
                    connected_once = true;
                    conn.insert(c)
                }
                Err(_) => {
                    if measured {
                        out.errors += 1;
                    }
                    // Do not spin on a refused connection.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
            },
        };
        let request = &requests[next];
        next = (next + 1) % requests.len();
        let t0 = Instant::now();
        let answer = c.send(request).await;
        let t1 = Instant::now();
        let measured = t0 >= shared.measure_start;
        match answer {
            Ok(answer) => {
                if answer.close {
                    conn = None;
                }
                if measured {
                    out.last_answer = Some(t1);
                    if (200..300).contains(&answer.status) {
                        out.ok += 1;
                        let us = (t1 - t0).as_micros().min(u32::MAX as u128) as u32;
                        out.latencies_us.push(us);
                    } else {
                        out.bad_status += 1;
                    }
                }
            }
            Err(_) => {
                conn = None;
                if measured {
                    out.errors += 1;
                }
            }
        }
    }
    out
}

/// Runs `load` on a new single-threaded runtime (the calling thread: pin
/// it first) and returns what was measured.
pub fn run(load: Load) -> std::io::Result<LoadResult> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(run_async(load)))
}

async fn run_async(load: Load) -> LoadResult {
    let start = Instant::now();
    let measure_start = start + load.warmup;
    let end = measure_start + load.duration;
    let host = load.addr.to_string();
    let encoded = load.requests.iter().map(|r| r.encode(&host)).collect();
    let server_pid = load.server_pid;
    let connections = load.connections.max(1);
    let shared = Arc::new(Shared {
        load,
        encoded,
        measure_start,
        end,
        started: AtomicU64::new(0),
    });
    let workers: Vec<_> = (0..connections)
        .map(|i| tokio::spawn(worker(shared.clone(), i)))
        .collect();

    tokio::time::sleep_until(measure_start.into()).await;
    let cpu_before = server_pid.map(procfs::tree_cpu_times);
    let client_before = procfs::self_cpu_time();
    let machine_before = procfs::machine_busy_time();
    // Sample the server's memory while the workers run.
    let mut peak_rss = server_pid.map(procfs::tree_rss);
    let mut all = futures_join(workers);
    let outs = loop {
        tokio::select! {
            outs = &mut all => break outs,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                if let (Some(pid), Some(peak)) = (server_pid, peak_rss.as_mut()) {
                    *peak = (*peak).max(procfs::tree_rss(pid));
                }
            }
        }
    };
    let cpu_after = server_pid.map(procfs::tree_cpu_times);
    let client_cpu = procfs::self_cpu_time().saturating_sub(client_before);
    let machine = procfs::machine_busy_time().saturating_sub(machine_before);
    let server_cpu_split = cpu_before.zip(cpu_after).map(|(b, a)| a.since(b));
    let server_cpu = server_cpu_split.map(procfs::CpuTimes::total);
    let other_cpu = server_cpu.map(|s| machine.saturating_sub(s).saturating_sub(client_cpu));

    let mut result = LoadResult {
        ok: 0,
        bad_status: 0,
        errors: 0,
        reconnects: 0,
        elapsed: Duration::ZERO,
        latencies_us: Vec::new(),
        server_cpu,
        server_cpu_split,
        server_peak_rss: peak_rss,
        client_cpu,
        other_cpu,
    };
    let mut last = measure_start;
    for out in outs {
        result.ok += out.ok;
        result.bad_status += out.bad_status;
        result.errors += out.errors;
        result.reconnects += out.reconnects;
        if let Some(t) = out.last_answer {
            last = last.max(t);
        }
        result.latencies_us.extend(out.latencies_us);
    }
    result.elapsed = last - measure_start;
    result.latencies_us.sort_unstable();
    result
}

/// Awaits every worker (a worker that panicked counts as nothing).
fn futures_join(
    workers: Vec<tokio::task::JoinHandle<WorkerOut>>,
) -> std::pin::Pin<Box<dyn Future<Output = Vec<WorkerOut>>>> {
    Box::pin(async move {
        let mut outs = Vec::with_capacity(workers.len());
        for w in workers {
            outs.push(w.await.unwrap_or_default());
        }
        outs
    })
}

/// Sends one request on a new connection and returns the status and body:
/// the readiness probe and the check that a server answers as expected.
pub async fn probe(addr: SocketAddr, spec: &RequestSpec) -> Result<(StatusCode, Bytes), String> {
    let mut sender = connect(addr).await?;
    let host = HeaderValue::from_str(&addr.to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
    let resp = sender
        .send_request(spec.build(&host))
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok((status, body))
}

/// Sends one request on a new connection from a throwaway runtime, giving
/// up after `timeout`: for readiness polling.
pub fn probe_once(
    addr: SocketAddr,
    spec: &RequestSpec,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        tokio::time::timeout(timeout, probe(addr, spec))
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[], 50.0), 0);
    }
}
