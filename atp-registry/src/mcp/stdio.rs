//! MCP over stdio: a toolkit as the local server a desktop agent (Claude
//! Desktop, Cursor, VS Code) starts as a child process.
//!
//! The transport of the MCP specification: one JSON-RPC message per line
//! on stdin, one per line on stdout, nothing else on stdout (logs go to
//! stderr, through `tracing`). Requests are served concurrently — a slow
//! tool does not hold up `ping` — and a call's notifications (progress,
//! logs) are written, in order, as the tool makes them, all before its
//! response.

use std::{io, sync::Arc, time::Duration};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader},
    sync::mpsc,
    task::JoinSet,
};

use super::{McpHead, ToolkitMcp, handle_message_live};
use crate::{AuthToken, Secret, ToolKitClient};

/// The environment variable [`ToolKitClient::serve_stdio`] reads the
/// token of tools that need one from (a call's `auth_token` argument
/// wins).
pub const AUTH_TOKEN_ENV: &str = "ATP_MCP_AUTH_TOKEN";

/// How long the calls in flight at the end of the input may still take.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How many answers may wait for the writer.
const WRITE_QUEUE: usize = 256;

/// How many notifications of one call may wait for the writer; more are
/// dropped (a report never holds up a tool).
const NOTIFICATION_QUEUE: usize = 64;

impl ToolKitClient {
    /// Serves the toolkit as an MCP server over stdio (the MCP stdio
    /// transport), until stdin ends: what a desktop agent runs as a child
    /// process.
    ///
    /// Reads newline-delimited JSON-RPC messages from stdin and writes
    /// each request's notifications (its progress and logs) then its
    /// response to stdout, one JSON per line; notifications from the
    /// client get no answer. Requests run concurrently. A line longer
    /// than the toolkit's [body limit](Self::with_body_limit) gets an
    /// error (id `null`) and is skipped, invalid JSON a parse error. At
    /// the end of stdin the calls in flight get 10 s to finish, then it
    /// returns `Ok(())`. Nothing but protocol messages is written to
    /// stdout: send your logs to stderr.
    ///
    /// Stdio is local: there is no DNS-rebinding check. The token of tools
    /// that need one is the call's `auth_token` argument, else the
    /// environment variable `ATP_MCP_AUTH_TOKEN` ([`AUTH_TOKEN_ENV`]).
    ///
    /// ```no_run
    /// # async fn demo() -> std::io::Result<()> {
    /// let toolkit = atp_registry::ToolKitClient::new("key", "my_app");
    /// // toolkit.register_tool(...)?;
    /// toolkit.serve_stdio().await
    /// # }
    /// ```
    pub async fn serve_stdio(&self) -> io::Result<()> {
        let token = std::env::var(AUTH_TOKEN_ENV)
            .ok()
            .filter(|t| !t.is_empty())
            .map(Secret::new);
        serve_lines(self, token, tokio::io::stdin(), tokio::io::stdout()).await
    }
}

/// [`ToolKitClient::serve_stdio`] over any reader and writer (a pipe, a
/// socket, an in-memory duplex in a test), with `auth_token` for the
/// tools that need one.
pub async fn serve_lines<R, W>(
    toolkit: &ToolKitClient,
    auth_token: Option<AuthToken>,
    input: R,
    output: W,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let limit = toolkit.body_limit();
    let token = auth_token.map(Arc::new);
    let (tx, rx) = mpsc::channel::<Vec<u8>>(WRITE_QUEUE);
    let writer = tokio::spawn(write_lines(output, rx));
    let mut input = BufReader::new(input);
    let mut calls = JoinSet::new();
    let mut line = Vec::new();
    let read = loop {
        // Reap the calls that have finished (their panics are logged).
        while let Some(done) = calls.try_join_next() {
            log_join(done);
        }
        match read_line(&mut input, &mut line, limit).await {
            Ok(Line::Eof) => break Ok(()),
            Ok(Line::TooLong) => {
                tracing::warn!(limit, "MCP stdio: a message over the limit was skipped");
                let e = json!({"jsonrpc": "2.0", "id": null, "error": {
                    "code": -32000,
                    "message": format!("Message is larger than the limit of {limit} bytes"),
                    "data": {"code": "payload_too_large"},
                }});
                if tx.send(to_line(&e)).await.is_err() {
                    break Ok(());
                }
            }
            Ok(Line::Message) => {
                let body = Bytes::from(std::mem::take(&mut line));
                if body.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let (toolkit, token, tx) = (toolkit.clone(), token.clone(), tx.clone());
                calls.spawn(async move {
                    let out = answer(toolkit, token, body, tx.clone()).await;
                    if !out.is_empty() {
                        // The writer is gone only when the output is.
                        let _ = tx.send(out).await;
                    }
                });
            }
            Err(e) => break Err(e),
        }
        if tx.is_closed() {
            // The output is closed: nobody to answer.
            break Ok(());
        }
    };
    // The end of the input: the calls in flight finish (bounded), their
    // answers are written, then the writer stops.
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while let Some(done) = calls.join_next().await {
            log_join(done);
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            calls = calls.len(),
            "MCP stdio: calls still running at the end of the input were cancelled"
        );
        calls.shutdown().await;
    }
    drop(tx);
    let written = writer
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e.to_string())));
    read.and(written)
}

/// Runs one message: its notifications (progress, logs) are written as
/// the tool makes them, through `out`; returns the response's line, or
/// nothing. A tool that panics gets an internal error.
async fn answer(
    toolkit: ToolKitClient,
    token: Option<Arc<AuthToken>>,
    body: Bytes,
    out: mpsc::Sender<Vec<u8>>,
) -> Vec<u8> {
    let message = body.clone();
    let (live, mut notifications) = mpsc::channel::<Value>(NOTIFICATION_QUEUE);
    // Each notification to the writer as it comes; done (and so written
    // before the response) once the call has dropped its sender.
    let forward = tokio::spawn(async move {
        while let Some(n) = notifications.recv().await {
            if out.send(to_line(&n)).await.is_err() {
                break;
            }
        }
    });
    let run = tokio::spawn(async move {
        let head = McpHead {
            accept: None,
            protocol_version: None,
            bearer: token.as_deref(),
        };
        handle_message_live(&ToolkitMcp(&toolkit), &head, &message, &live).await
    });
    let reply = run.await;
    let _ = forward.await;
    let reply = match reply {
        Ok(reply) => reply,
        Err(e) => {
            tracing::error!(error = %e, "MCP stdio: a call failed");
            let id = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|m| m.get("id").cloned())
                .unwrap_or(Value::Null);
            if id.is_null() {
                return Vec::new();
            }
            let e = json!({"jsonrpc": "2.0", "id": id,
                "error": {"code": -32603, "message": "Internal error: the tool panicked"}});
            return to_line(&e);
        }
    };
    let Some(reply) = reply else {
        return Vec::new();
    };
    let mut lines = Vec::new();
    for m in reply.notifications.iter().chain([&reply.response]) {
        lines.extend(to_line(m));
    }
    lines
}

fn to_line(v: &Value) -> Vec<u8> {
    // serde_json escapes the newlines in strings: one message, one line.
    let mut line = serde_json::to_vec(v).unwrap_or_default();
    line.push(b'\n');
    line
}

fn log_join(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        tracing::error!(error = %e, "MCP stdio: a call task panicked");
    }
}

/// The one writer: whole answers, in the order they are ready, flushed.
async fn write_lines<W: AsyncWrite + Unpin>(
    mut output: W,
    mut rx: mpsc::Receiver<Vec<u8>>,
) -> io::Result<()> {
    while let Some(lines) = rx.recv().await {
        let written = async {
            output.write_all(&lines).await?;
            output.flush().await
        }
        .await;
        if let Err(e) = written {
            rx.close();
            if e.kind() == io::ErrorKind::BrokenPipe {
                // The client went away: nobody to answer.
                tracing::debug!("MCP stdio: the output was closed");
                return Ok(());
            }
            return Err(e);
        }
    }
    Ok(())
}

enum Line {
    /// A line is in the buffer (its newline removed).
    Message,
    /// A line over the limit was read and dropped.
    TooLong,
    /// The input ended (a last line without a newline is a message).
    Eof,
}

/// Reads one line into `line`, keeping at most `limit` bytes of it.
async fn read_line<R: AsyncBufRead + Unpin>(
    input: &mut R,
    line: &mut Vec<u8>,
    limit: usize,
) -> io::Result<Line> {
    line.clear();
    let mut too_long = false;
    loop {
        let buf = input.fill_buf().await?;
        if buf.is_empty() {
            return Ok(if too_long {
                Line::TooLong
            } else if line.is_empty() {
                Line::Eof
            } else {
                Line::Message
            });
        }
        let (chunk, end) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if !too_long {
            if line.len() + chunk.len() > limit {
                too_long = true;
                line.clear();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        let used = end.unwrap_or(buf.len());
        input.consume(used);
        if end.is_some() {
            if too_long {
                return Ok(Line::TooLong);
            }
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(Line::Message);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_bounded() {
        let data: &[u8] = b"short\r\n0123456789abcdef\nok\nlast";
        let mut input = BufReader::with_capacity(4, data);
        let mut line = Vec::new();
        let mut seen = Vec::new();
        loop {
            match read_line(&mut input, &mut line, 8).await.unwrap() {
                Line::Message => seen.push(String::from_utf8(line.clone()).unwrap()),
                Line::TooLong => seen.push("<too long>".into()),
                Line::Eof => break,
            }
        }
        assert_eq!(seen, ["short", "<too long>", "ok", "last"]);
    }

    #[tokio::test]
    async fn serves_lines() {
        let toolkit = ToolKitClient::new("key", "t");
        toolkit
            .register_tool(
                crate::Tool::new("whoami").params(["x"]),
                |call: crate::Call| async move {
                    Ok::<_, crate::ToolError>(
                        json!({"token": call.auth_token().map(|t| t.expose().to_owned())}),
                    )
                },
            )
            .unwrap();
        let input: &[u8] = b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}\nnot json\n{\"jsonrpc\":\"2.0\",\"method\":\"notifications/initialized\"}\n{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"tools/call\",\"params\":{\"name\":\"whoami\"}}\n";
        let (client, server) = tokio::io::duplex(1 << 16);
        serve_lines(&toolkit, Some(Secret::new("tok")), input, server)
            .await
            .unwrap();
        let mut out = String::new();
        let mut client = client;
        tokio::io::AsyncReadExt::read_to_string(&mut client, &mut out)
            .await
            .unwrap();
        let mut answers: Vec<Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        answers.sort_by_key(|a| a["id"].as_i64().unwrap_or(0));
        assert_eq!(answers.len(), 3, "{out}");
        assert_eq!(answers[0]["error"]["code"], -32700);
        assert_eq!(answers[1]["result"], json!({}));
        assert_eq!(answers[2]["result"]["structuredContent"]["token"], "tok");
    }
}
