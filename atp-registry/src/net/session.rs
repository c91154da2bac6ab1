//! One WebSocket session driver for the four WebSocket loops of atp-rs:
//! the toolkit runtime, the `LlmClient`, and atp-server's toolkit and
//! LLM sockets.
//!
//! It owns what they share: the heartbeat (a ping every interval; a peer
//! from which nothing has come for two intervals is dead), a bounded
//! outbox (producers wait when it is full: backpressure), batched writes
//! (a message and up to 64 queued behind it per flush), a bound on every
//! write (a peer that does not read for two ping intervals is dead too),
//! and a graceful close (stop reading, let the work in flight finish
//! within a grace period while its answers still go out, then a close
//! frame). What a frame means is the [`Handler`]'s business.

use std::{future::Future, time::Duration};

use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::{sync::mpsc, time::Instant};

/// How many messages a connection's outbox holds before producers wait.
pub const OUTBOX_CAPACITY: usize = 256;

/// How many queued messages go out with one flush (one write).
const BATCH: usize = 64;

/// A connection's outbox: clone the sender to the tasks that answer.
pub fn outbox() -> (mpsc::Sender<String>, mpsc::Receiver<String>) {
    mpsc::channel(OUTBOX_CAPACITY)
}

/// A frame as the driver sees it.
#[derive(Debug)]
pub enum Frame<T> {
    /// A text frame.
    Text(T),
    /// A binary frame (ATP is JSON text).
    Binary,
    /// A close frame, with its reason.
    Close(String),
    /// A ping or a pong.
    Control,
}

/// The frame type of a WebSocket library.
pub trait Frames {
    /// The library's message type.
    type Message;
    /// The text of a text frame.
    type Text: std::ops::Deref<Target = str>;
    /// A text frame.
    fn text(text: String) -> Self::Message;
    /// A ping frame.
    fn ping() -> Self::Message;
    /// A close frame.
    fn close(code: u16, reason: &'static str) -> Self::Message;
    /// What a received frame is.
    fn read(message: Self::Message) -> Frame<Self::Text>;
}

/// What the driver does after a frame.
#[derive(Debug)]
pub enum Flow {
    /// Go on.
    Continue,
    /// Send this frame at once, then go on.
    Reply(String),
    /// Send this frame (if any), close with this code and reason, and end.
    Close(Option<String>, u16, &'static str),
}

/// What a session does with what it receives.
pub trait Handler: Send {
    /// Resolves when another frame may be read (e.g. once a concurrency
    /// permit is free). While it waits, the outbox keeps draining.
    fn ready(&mut self) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }

    /// A text frame.
    fn on_text(&mut self, text: &str) -> Flow;

    /// A binary frame.
    fn on_binary(&mut self) -> Flow {
        Flow::Continue
    }

    /// Resolves when the work in flight is done (called after a stop,
    /// bounded by the grace period).
    fn drained(&mut self) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }
}

/// How a session runs.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// How often to ping; silence for two intervals ends the session.
    pub ping_interval: Duration,
    /// How long a stop lets the work in flight finish.
    pub grace_period: Duration,
    /// The close frame sent on a stop (unless the stop signal gives its
    /// own, see [`StopReason`]).
    pub stop_close: (u16, &'static str),
}

/// What a stop signal of [`run`] resolves to: `()` closes with
/// [`SessionOptions::stop_close`]; `Some((code, reason))` with that close
/// frame instead (say, a policy close for a revoked key).
pub trait StopReason {
    /// The close frame to send instead of `stop_close`, if any.
    fn close_frame(&self) -> Option<(u16, &'static str)>;
}

impl StopReason for () {
    fn close_frame(&self) -> Option<(u16, &'static str)> {
        None
    }
}

impl StopReason for Option<(u16, &'static str)> {
    fn close_frame(&self) -> Option<(u16, &'static str)> {
        *self
    }
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The stop signal: work in flight was let finish, a close frame sent.
    Stopped,
    /// The peer closed the connection (with its reason, if any).
    Closed(String),
    /// A read or write failed.
    Failed(String),
    /// Nothing came from the peer for two ping intervals, or it did not
    /// read what was sent for as long.
    Dead,
    /// The handler closed the session ([`Flow::Close`]).
    Refused,
    /// Every sender of the outbox is gone.
    OutboxClosed,
}

/// Runs a session until it ends. `first` is sent before anything else.
pub async fn run<F, Si, St, E, H>(
    mut sink: Si,
    mut stream: St,
    mut outbox: mpsc::Receiver<String>,
    handler: &mut H,
    opts: &SessionOptions,
    first: Option<String>,
    stop: impl Future<Output = impl StopReason>,
) -> Ended
where
    F: Frames,
    Si: Sink<F::Message> + Unpin,
    Si::Error: std::fmt::Display,
    St: Stream<Item = Result<F::Message, E>> + Unpin,
    E: std::fmt::Display,
    H: Handler,
{
    let bound = opts.ping_interval * 2;
    let mut ping =
        tokio::time::interval_at(Instant::now() + opts.ping_interval, opts.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_seen = Instant::now();
    let mut ready = false;
    tokio::pin!(stop);
    let mut close = opts.stop_close;
    if let Some(text) = first
        && let Err(e) = write::<F, _>(&mut sink, Some(text), &mut outbox, bound).await
    {
        return e;
    }
    let ended = loop {
        tokio::select! {
            biased;
            why = &mut stop => {
                if let Some(frame) = why.close_frame() {
                    close = frame;
                }
                break None;
            }
            out = outbox.recv() => match out {
                Some(text) => {
                    if let Err(e) = write::<F, _>(&mut sink, Some(text), &mut outbox, bound).await {
                        return e;
                    }
                }
                None => {
                    let _ = sink.close().await;
                    return Ended::OutboxClosed;
                }
            },
            _ = handler.ready(), if !ready => ready = true,
            frame = stream.next(), if ready => {
                last_seen = Instant::now();
                let flow = match frame {
                    None => break Some(Ended::Closed(String::new())),
                    Some(Err(e)) => break Some(Ended::Failed(e.to_string())),
                    Some(Ok(m)) => match F::read(m) {
                        Frame::Text(t) => {
                            ready = false;
                            handler.on_text(&t)
                        }
                        Frame::Binary => handler.on_binary(),
                        Frame::Close(reason) => break Some(Ended::Closed(reason)),
                        Frame::Control => Flow::Continue,
                    },
                };
                match flow {
                    Flow::Continue => {}
                    Flow::Reply(text) => {
                        if let Err(e) = write::<F, _>(&mut sink, Some(text), &mut outbox, bound).await {
                            return e;
                        }
                    }
                    Flow::Close(last, code, reason) => {
                        if let Some(text) = last {
                            let _ = bounded(bound, sink.send(F::text(text))).await;
                        }
                        let _ = bounded(bound, sink.send(F::close(code, reason))).await;
                        break Some(Ended::Refused);
                    }
                }
            }
            _ = ping.tick() => {
                if last_seen.elapsed() >= bound {
                    let _ = bounded(opts.ping_interval, sink.send(F::close(1011, "no answer to pings"))).await;
                    break Some(Ended::Dead);
                }
                if let Err(e) = write::<F, _>(&mut sink, None, &mut outbox, bound).await {
                    return e;
                }
            }
        }
    };
    if let Some(ended) = ended {
        return ended;
    }
    // Stopping: read nothing more; let the work in flight finish while
    // its answers still go out.
    let deadline = tokio::time::sleep(opts.grace_period);
    tokio::pin!(deadline);
    let mut drained = false;
    while !drained {
        tokio::select! {
            _ = handler.drained() => drained = true,
            Some(text) = outbox.recv() => {
                if write::<F, _>(&mut sink, Some(text), &mut outbox, bound).await.is_err() {
                    return Ended::Stopped;
                }
            }
            _ = &mut deadline => {
                tracing::warn!("grace period over: abandoning the work in flight");
                break;
            }
        }
    }
    while let Ok(text) = outbox.try_recv() {
        if bounded(bound, sink.feed(F::text(text))).await.is_err() {
            return Ended::Stopped;
        }
    }
    let (code, reason) = close;
    let _ = bounded(bound, sink.send(F::close(code, reason))).await;
    let _ = bounded(bound, sink.close()).await;
    Ended::Stopped
}

/// Runs a write, failing when it takes longer than `limit`.
async fn bounded<T, E: std::fmt::Display>(
    limit: Duration,
    write: impl Future<Output = Result<T, E>>,
) -> Result<T, Ended> {
    match tokio::time::timeout(limit, write).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Ended::Failed(e.to_string())),
        Err(_) => Err(Ended::Dead),
    }
}

/// Sends `first` (a text frame, or a ping when `None`) and the messages
/// already queued behind it (up to 64) with one flush, within `limit`.
async fn write<F, Si>(
    sink: &mut Si,
    first: Option<String>,
    queue: &mut mpsc::Receiver<String>,
    limit: Duration,
) -> Result<(), Ended>
where
    F: Frames,
    Si: Sink<F::Message> + Unpin,
    Si::Error: std::fmt::Display,
{
    bounded(limit, async {
        sink.feed(first.map_or_else(F::ping, F::text)).await?;
        for _ in 0..BATCH {
            match queue.try_recv() {
                Ok(next) => sink.feed(F::text(next)).await?,
                Err(_) => break,
            }
        }
        sink.flush().await
    })
    .await
}

/// The frames of tokio-tungstenite (the toolkit runtime and `LlmClient`).
#[cfg(feature = "_net")]
#[derive(Debug)]
pub(crate) struct Tungstenite;

#[cfg(feature = "_net")]
impl Frames for Tungstenite {
    type Message = tokio_tungstenite::tungstenite::Message;
    type Text = tokio_tungstenite::tungstenite::Utf8Bytes;

    fn text(text: String) -> Self::Message {
        Self::Message::text(text)
    }

    fn ping() -> Self::Message {
        Self::Message::Ping(Default::default())
    }

    fn close(code: u16, reason: &'static str) -> Self::Message {
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        Self::Message::Close(Some(CloseFrame {
            code: code.into(),
            reason: reason.into(),
        }))
    }

    fn read(message: Self::Message) -> Frame<Self::Text> {
        use tokio_tungstenite::tungstenite::Message;
        match message {
            Message::Text(t) => Frame::Text(t),
            Message::Binary(_) => Frame::Binary,
            Message::Close(c) => Frame::Close(c.map(|c| c.reason.to_string()).unwrap_or_default()),
            _ => Frame::Control,
        }
    }
}
