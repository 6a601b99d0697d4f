//! Server-Sent Events: output chunks while the code runs, then the result.
//!
//! Events: `stdout` and `stderr` carry a chunk as a JSON string (invalid UTF-8 replaced);
//! `result` carries the execution's JSON result; `error` carries an error body.

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use forkvm_protocol::worker::OutputStream;
use forkvm_worker::Tap;
use futures_util::Stream as FuturesStream;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// What the blocking side sends to the response.
pub enum Message {
    Output(OutputStream, Vec<u8>),
    Final(Event),
}

/// A tap forwarding output as events, and the receiving end.
pub fn channel() -> (Tap, UnboundedSender<Message>, UnboundedReceiver<Message>) {
    let (tx, rx) = unbounded_channel();
    let output = tx.clone();
    let tap: Tap = Arc::new(move |stream, data: &[u8]| {
        // A closed channel means the client went away: the code still runs to its end.
        let _ = output.send(Message::Output(stream, data.to_vec()));
    });
    (tap, tx, rx)
}

fn to_event(message: Message) -> Event {
    match message {
        Message::Output(stream, data) => {
            let name = if stream == OutputStream::Stderr {
                "stderr"
            } else {
                "stdout"
            };
            let text = String::from_utf8_lossy(&data);
            Event::default()
                .event(name)
                .data(serde_json::to_string(&text).expect("a string serializes"))
        }
        Message::Final(event) => event,
    }
}

/// The SSE response reading `rx` up to and including the final event. (The output tap
/// stays with the sandbox afterwards, so the channel itself may outlive the request.)
pub fn response(rx: UnboundedReceiver<Message>) -> Response {
    let events = futures_util::stream::unfold((rx, false), |(mut rx, finished)| async move {
        if finished {
            return None;
        }
        let message = rx.recv().await?;
        let finished = matches!(message, Message::Final(_));
        Some((Ok(to_event(message)), (rx, finished)))
    });
    let events: std::pin::Pin<Box<dyn FuturesStream<Item = Result<Event, Infallible>> + Send>> =
        Box::pin(events);
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// An event with a JSON payload.
pub fn json_event<T: serde::Serialize>(name: &str, value: &T) -> Event {
    Event::default()
        .event(name)
        .data(serde_json::to_string(value).expect("API types serialize"))
}

/// Answers with an event stream: runs `run` (given the output tap) on a task, sending
/// output as it comes and the result (or error) last.
pub fn spawn<F, Fut>(run: F) -> Response
where
    F: FnOnce(Tap) -> Fut + Send + 'static,
    Fut: std::future::Future<
            Output = Result<forkvm_protocol::exec::ExecResult, crate::error::ApiError>,
        > + Send,
{
    let (tap, tx, rx) = channel();
    tokio::spawn(async move {
        let event = match run(tap).await {
            Ok(result) => json_event(
                "result",
                &crate::wire::ExecResponse::from_result(uuid::Uuid::now_v7(), &result),
            ),
            Err(error) => json_event("error", &crate::api::exec::error_body(error)),
        };
        let _ = tx.send(Message::Final(event));
    });
    response(rx)
}
