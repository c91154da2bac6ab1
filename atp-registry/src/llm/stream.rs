//! Streaming (docs/PROTOCOL.md §9): a tool call's progress as it runs, then
//! its result, over `POST process/` with `Accept: text/event-stream` or a
//! WebSocket `task_request` with `"stream": true`.

use std::sync::Arc;

use futures_util::{
    StreamExt,
    stream::{self, BoxStream},
};
use serde_json::Value;
use tracing::Instrument;

use super::{
    Answers, CallOptions, LlmClient, LlmError,
    calls::{CallOutcome, ToolCall, parse_tool_calls, result_messages, task_outcome},
    context_of,
};
use crate::{
    schema::Provider,
    wire::{LlmToServer, ProgressBody, RequestId, ServerToLlm},
};

/// What [`LlmClient::call_tool_streaming`] and
/// [`LlmClient::get_toolkit_context_streaming`] yield: events, then the
/// end. An `Err` item is the last one.
pub type EventStream = BoxStream<'static, Result<StreamEvent, LlmError>>;

/// One event of an [`EventStream`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum StreamEvent {
    /// The toolkit's context: what
    /// [`get_toolkit_context`](LlmClient::get_toolkit_context) returns.
    /// The only event of a context stream.
    Context(Value),
    /// A `task_progress` of one of the calls.
    Progress(CallProgress),
    /// One call is over, with its outcome (calls end in any order).
    Finished(CallFinished),
    /// Every call is over: the result messages in the provider's own
    /// format, in call order, ready to append to the conversation (what
    /// [`call_tool`](LlmClient::call_tool) returns). The last event.
    Messages(Vec<Value>),
}

/// How far one call of a stream is.
#[derive(Debug, Clone, PartialEq)]
pub struct CallProgress {
    /// The call's place among the calls given (from 0).
    pub call: usize,
    /// The provider's id of the call.
    pub tool_call_id: String,
    /// The tool.
    pub tool: String,
    /// `progress`, `total`, `message`, as the tool reported them.
    pub progress: ProgressBody,
}

/// One call of a stream is over.
#[derive(Debug, Clone, PartialEq)]
pub struct CallFinished {
    /// The call's place among the calls given (from 0).
    pub call: usize,
    /// The provider's id of the call.
    pub tool_call_id: String,
    /// The tool.
    pub tool: String,
    /// The result as JSON text, or the error's message.
    pub outcome: CallOutcome,
}

/// What one call's share of the stream yields.
enum CallItem {
    Progress(ProgressBody),
    Finished(CallOutcome),
}

type CallStream = BoxStream<'static, (usize, Result<CallItem, LlmError>)>;

impl LlmClient {
    /// [`get_toolkit_context`](Self::get_toolkit_context), streamed: over
    /// HTTP the context comes as a `text/event-stream` event (the Python
    /// client's `get_toolkit_context_streaming`); over the WebSocket as
    /// its usual answer. Yields one [`StreamEvent::Context`], or an error.
    pub fn get_toolkit_context_streaming(
        &self,
        toolkit_id: &str,
        provider: &str,
        user_prompt: &str,
    ) -> EventStream {
        let client = self.clone();
        let request = self.context_request(toolkit_id, provider, user_prompt);
        let limit = self.inner.timeout;
        stream::once(async move {
            let (request_id, message) = request?;
            let deadline = tokio::time::Instant::now() + limit;
            let mut answers = client.open(&request_id, &message, true, limit).await?;
            loop {
                match next_before(&mut answers, deadline, limit).await {
                    Some(Ok(ServerToLlm::TaskProgress(_))) => {}
                    Some(Ok(answer)) => return context_of(answer).map(StreamEvent::Context),
                    Some(Err(e)) => return Err(e),
                    None => return Err(LlmError::ConnectionLost),
                }
            }
        })
        .boxed()
    }

    /// [`call_tool`](Self::call_tool), streamed: each call's progress as
    /// the tool reports it ([`StreamEvent::Progress`]), each call's outcome
    /// as it ends ([`StreamEvent::Finished`]), then the result messages
    /// ([`StreamEvent::Messages`]) and the end.
    ///
    /// Every call given streams, concurrently (the Python client's
    /// `call_tool_streaming` streams only the first one). Over HTTP each
    /// call is a `POST process/` with `Accept: text/event-stream`; over the
    /// WebSocket a `task_request` with `"stream": true`. A server that
    /// does not stream just answers: the events are then the outcomes and
    /// the messages. Each event is waited for at most the client's timeout.
    /// An error of the client or the connection is the last item; a call
    /// whose arguments are unreadable, or that the toolkit failed, is an
    /// error outcome, as with `call_tool`.
    ///
    /// ```no_run
    /// # async fn demo(atp: atp_registry::llm::LlmClient, calls: serde_json::Value) -> Result<(), atp_registry::llm::LlmError> {
    /// use atp_registry::llm::StreamEvent;
    /// use futures_util::StreamExt;
    ///
    /// let mut events = atp.call_tool_streaming("Demo", &calls, "anthropic", "");
    /// let mut messages = Vec::new();
    /// while let Some(event) = events.next().await {
    ///     match event? {
    ///         StreamEvent::Progress(p) => println!("{}: {} {:?}", p.tool, p.progress.progress, p.progress.message),
    ///         StreamEvent::Messages(m) => messages = m,
    ///         _ => {}
    ///     }
    /// }
    /// // … append `messages` to the conversation.
    /// # Ok(()) }
    /// ```
    pub fn call_tool_streaming(
        &self,
        toolkit_id: &str,
        tool_calls: &Value,
        provider: &str,
        user_prompt: &str,
    ) -> EventStream {
        self.call_tool_streaming_with(
            toolkit_id,
            tool_calls,
            provider,
            user_prompt,
            &CallOptions::default(),
        )
    }

    /// [`call_tool_streaming`](Self::call_tool_streaming) with
    /// [`CallOptions`]: `sequential` streams one call after the other, in
    /// call order; `timeout` bounds each call, from its request to its answer,
    /// however much progress comes in between.
    pub fn call_tool_streaming_with(
        &self,
        toolkit_id: &str,
        tool_calls: &Value,
        provider: &str,
        user_prompt: &str,
        options: &CallOptions,
    ) -> EventStream {
        let Ok(parsed) = provider.parse::<Provider>() else {
            let unknown = LlmError::UnknownProvider(provider.to_owned());
            return stream::once(async move { Err(unknown) }).boxed();
        };
        let calls = parse_tool_calls(parsed, tool_calls);
        let limit = options.timeout.unwrap_or(self.inner.timeout);
        let parent = options.parent_trace();
        let per_call: Vec<CallStream> = calls
            .iter()
            .enumerate()
            .map(|(i, call)| {
                let (task, span) = self.task_request(
                    toolkit_id,
                    call,
                    provider,
                    user_prompt,
                    options,
                    parent.as_ref(),
                    true,
                );
                one_call(self.clone(), i, task, limit, span)
            })
            .collect();
        let merged: CallStream = if options.sequential {
            stream::iter(per_call).flatten().boxed()
        } else {
            stream::select_all(per_call).boxed()
        };
        let state = Merge {
            outcomes: vec![None; calls.len()],
            calls: Arc::new(calls),
            merged,
            over: false,
        };
        stream::unfold(state, |mut s| async move {
            if s.over {
                return None;
            }
            let event = match s.merged.next().await {
                Some((i, Ok(CallItem::Progress(progress)))) => {
                    let call = &s.calls[i];
                    Ok(StreamEvent::Progress(CallProgress {
                        call: i,
                        tool_call_id: call.id.clone(),
                        tool: call.name.clone(),
                        progress,
                    }))
                }
                Some((i, Ok(CallItem::Finished(outcome)))) => {
                    let call = &s.calls[i];
                    s.outcomes[i] = Some(outcome.clone());
                    Ok(StreamEvent::Finished(CallFinished {
                        call: i,
                        tool_call_id: call.id.clone(),
                        tool: call.name.clone(),
                        outcome,
                    }))
                }
                Some((_, Err(e))) => {
                    s.over = true;
                    Err(e)
                }
                None => {
                    s.over = true;
                    let outcomes: Vec<CallOutcome> = s
                        .outcomes
                        .iter()
                        .map(|o| {
                            o.clone()
                                .unwrap_or_else(|| CallOutcome::error("The call got no answer"))
                        })
                        .collect();
                    Ok(StreamEvent::Messages(result_messages(&s.calls, &outcomes)))
                }
            };
            Some((event, s))
        })
        .boxed()
    }
}

/// The merged calls of a stream, and what they gave so far.
struct Merge {
    calls: Arc<Vec<ToolCall>>,
    outcomes: Vec<Option<CallOutcome>>,
    merged: CallStream,
    over: bool,
}

/// Where one call's share of a stream is.
enum CallState {
    /// Not sent yet (it is sent when first polled: a sequential stream
    /// sends each call once the one before it is over).
    Unsent(LlmClient, RequestId, Box<LlmToServer>),
    /// Sent: its answers, and when the whole call must be over.
    Open(Box<Answers>, tokio::time::Instant),
    Over,
}

/// The next answer of a call, waiting at most until its `deadline` (the
/// whole call's bound, `limit` after it was sent): a server that keeps
/// sending progress can not keep a stream open for ever.
async fn next_before(
    answers: &mut Answers,
    deadline: tokio::time::Instant,
    limit: std::time::Duration,
) -> Option<Result<ServerToLlm, LlmError>> {
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    if left.is_zero() {
        return Some(Err(LlmError::Timeout(limit)));
    }
    match answers.next(left).await {
        Some(Err(LlmError::Timeout(_))) => Some(Err(LlmError::Timeout(limit))),
        other => other,
    }
}

/// One call: its progress, then its outcome (or an error), in the call's
/// span.
fn one_call(
    client: LlmClient,
    index: usize,
    task: Result<(RequestId, LlmToServer), String>,
    limit: std::time::Duration,
    span: tracing::Span,
) -> CallStream {
    let (request_id, message) = match task {
        Ok(task) => task,
        Err(why) => {
            let item = (index, Ok(CallItem::Finished(CallOutcome::error(why))));
            return stream::once(async move { item }).boxed();
        }
    };
    let start = CallState::Unsent(client, request_id, Box::new(message));
    stream::unfold(start, move |state| {
        async move {
            let (mut answers, deadline) = match state {
                CallState::Over => return None,
                CallState::Open(answers, deadline) => (answers, deadline),
                CallState::Unsent(client, request_id, message) => {
                    let deadline = tokio::time::Instant::now() + limit;
                    match client.open(&request_id, &message, true, limit).await {
                        Ok(answers) => (Box::new(answers), deadline),
                        Err(e) => return Some(((index, Err(e)), CallState::Over)),
                    }
                }
            };
            Some(match next_before(&mut answers, deadline, limit).await {
                Some(Ok(ServerToLlm::TaskProgress(p))) => (
                    (index, Ok(CallItem::Progress(p.payload))),
                    CallState::Open(answers, deadline),
                ),
                Some(Ok(answer)) => (
                    (index, Ok(CallItem::Finished(task_outcome(&answer)))),
                    CallState::Over,
                ),
                Some(Err(e)) => ((index, Err(e)), CallState::Over),
                None => ((index, Err(LlmError::ConnectionLost)), CallState::Over),
            })
        }
        .instrument(span.clone())
    })
    .boxed()
}
