//! Server-Sent Events: output chunks while the code runs, then the result.
//!
//! Events: `stdout` and `stderr` carry a chunk as a JSON string (invalid UTF-8 replaced);
//! `result` carries the execution's JSON result; `error` carries an error body. A comment
//! line keeps an idle stream alive every 15 s.
//!
//! Output waits for the client in a bounded queue (`QUEUE_BYTES`), kept as bytes; chunks
//! of one stream written back to back are merged, so a program writing a byte at a time
//! makes a few large events, not one per byte. When the client reads slower than the code
//! writes, the queue fills and the worker's call thread waits, which stops the worker's
//! output window (`forkvm_protocol::worker::OUTPUT_WINDOW`) and pauses the sandbox. A
//! client that goes away stops the waiting, and its execution is cancelled. The result
//! event is written piece by piece as the client takes it (`result_json`).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use forkvm_protocol::worker::OutputStream;
use forkvm_worker::Tap;
use tokio::sync::Notify;

use crate::result_json::{JsonPieces, json_string};

/// Most output bytes waiting for one client.
pub const QUEUE_BYTES: usize = 1 << 20;
/// Most output bytes in one event (each may grow up to six times as a JSON string).
pub const EVENT_BYTES: usize = 64 << 10;
/// How often an idle stream gets a keep-alive comment.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[derive(Default)]
struct Queue {
    chunks: VecDeque<(OutputStream, Vec<u8>)>,
    bytes: usize,
    /// The result (or error) event, once the run is over.
    last: Option<JsonPieces>,
    /// The client went away.
    closed: bool,
}

/// The queue between the thread that receives output and the response.
#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    /// Room was made (the producer waits on it).
    room: Condvar,
    /// Something was queued (the response waits on it).
    ready: Notify,
    /// The client went away (the run is then dropped, which cancels it).
    gone: Notify,
}

/// What the response sends next.
enum Next {
    Output(Bytes),
    Last(JsonPieces),
}

impl Shared {
    /// Queues `data`, waiting for room until `deadline` (then dropping it).
    fn push(&self, stream: OutputStream, data: &[u8], deadline: Instant) {
        let mut queue = self.queue.lock().expect("queue lock");
        while queue.bytes > 0 && queue.bytes + data.len() > QUEUE_BYTES && !queue.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            queue = self
                .room
                .wait_timeout(queue, left.min(Duration::from_millis(100)))
                .expect("queue lock")
                .0;
        }
        if queue.closed {
            return;
        }
        match queue.chunks.back_mut() {
            Some((last, bytes)) if *last == stream => bytes.extend_from_slice(data),
            _ => queue.chunks.push_back((stream, data.to_vec())),
        }
        queue.bytes += data.len();
        drop(queue);
        self.ready.notify_one();
    }

    /// The next event: up to `EVENT_BYTES` of the oldest chunk, or the last event once the
    /// output is all sent. `None` while there is nothing yet.
    fn pop(&self) -> Option<Next> {
        let mut queue = self.queue.lock().expect("queue lock");
        if let Some((stream, bytes)) = queue.chunks.front_mut() {
            let stream = *stream;
            let take = bytes.len().min(EVENT_BYTES);
            let data: Vec<u8> = bytes.drain(..take).collect();
            if bytes.is_empty() {
                queue.chunks.pop_front();
            }
            queue.bytes -= take;
            drop(queue);
            self.room.notify_all();
            return Some(Next::Output(output_event(stream, &data)));
        }
        queue.last.take().map(Next::Last)
    }

    fn finish(&self, last: JsonPieces) {
        self.queue.lock().expect("queue lock").last = Some(last);
        self.ready.notify_one();
    }

    fn close(&self) {
        let mut queue = self.queue.lock().expect("queue lock");
        queue.closed = true;
        queue.chunks.clear();
        queue.bytes = 0;
        drop(queue);
        self.room.notify_all();
        self.gone.notify_one();
    }
}

fn output_event(stream: OutputStream, data: &[u8]) -> Bytes {
    let name: &[u8] = if stream == OutputStream::Stderr {
        b"event: stderr\ndata: "
    } else {
        b"event: stdout\ndata: "
    };
    let text = json_string(data);
    let mut event = Vec::with_capacity(name.len() + text.len() + 2);
    event.extend_from_slice(name);
    event.extend_from_slice(&text);
    event.extend_from_slice(b"\n\n");
    Bytes::from(event)
}

/// Marks the queue closed when the response is dropped (the client went away).
struct CloseOnDrop(Arc<Shared>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// What the response stream holds between polls.
struct Sending<H> {
    guard: CloseOnDrop,
    /// The last event, being sent piece by piece.
    last: Option<JsonPieces>,
    /// Held until the response is done (the result's share of the budget).
    _hold: H,
}

/// The SSE response: output events as they are queued, then the last event.
fn response<H: Send + 'static>(shared: Arc<Shared>, hold: H) -> Response {
    let state = Sending {
        guard: CloseOnDrop(shared),
        last: None,
        _hold: hold,
    };
    let events = futures_util::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(last) = &mut state.last {
                return last.next().map(|piece| (Ok::<_, Infallible>(piece), state));
            }
            match state.guard.0.pop() {
                Some(Next::Output(event)) => return Some((Ok(event), state)),
                Some(Next::Last(pieces)) => state.last = Some(pieces),
                None => {
                    let ready = state.guard.0.ready.notified();
                    if tokio::time::timeout(KEEP_ALIVE, ready).await.is_err() {
                        return Some((Ok(Bytes::from_static(b":\n\n")), state));
                    }
                }
            }
        }
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(events),
    )
        .into_response()
}

/// Answers with an event stream: runs `run` (given the output tap) on a task, sending
/// output as it comes and the result (or error) last. Output waits for a slow client at
/// most `timeout` (the request's own limit) and a second more. `hold` is kept until the
/// response is sent or dropped.
pub fn spawn<F, Fut, H>(timeout: Duration, hold: H, run: F) -> Response
where
    F: FnOnce(Tap) -> Fut + Send + 'static,
    Fut: std::future::Future<
            Output = Result<forkvm_protocol::exec::ExecResult, crate::error::ApiError>,
        > + Send,
    H: Send + 'static,
{
    let shared = Arc::new(Shared::default());
    let deadline = Instant::now() + timeout + Duration::from_secs(1);
    let producer = shared.clone();
    let tap: Tap = Arc::new(move |stream, data: &[u8]| producer.push(stream, data, deadline));
    let finisher = shared.clone();
    tokio::spawn(async move {
        let outcome = tokio::select! {
            outcome = run(tap) => outcome,
            // Dropping the run cancels its execution (`CancelOnDrop`).
            () = finisher.gone.notified() => return,
        };
        let last = match outcome {
            Ok(result) => JsonPieces::exec(result).framed(b"event: result\ndata: ", b"\n\n"),
            Err(error) => JsonPieces::ready(
                serde_json::to_vec(&crate::api::exec::error_body(error))
                    .expect("API types serialize"),
            )
            .framed(b"event: error\ndata: ", b"\n\n"),
        };
        finisher.finish(last);
    });
    response(shared, hold)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_of_one_stream_merge_and_events_are_bounded() {
        let shared = Shared::default();
        let far = Instant::now() + Duration::from_secs(60);
        for _ in 0..1000 {
            shared.push(OutputStream::Stdout, b"x", far);
        }
        shared.push(OutputStream::Stderr, b"e", far);
        shared.push(OutputStream::Stdout, &vec![b'y'; 2 * EVENT_BYTES], far);
        let queue = shared.queue.lock().unwrap();
        assert_eq!(queue.chunks.len(), 3);
        assert_eq!(queue.bytes, 1001 + 2 * EVENT_BYTES);
        drop(queue);
        let mut events = 0;
        while shared.pop().is_some() {
            events += 1;
        }
        assert_eq!(
            events, 4,
            "1000 one-byte writes, one stderr, two full events"
        );
    }

    #[test]
    fn a_full_queue_waits_until_its_deadline_then_drops() {
        let shared = Shared::default();
        let far = Instant::now() + Duration::from_secs(60);
        shared.push(OutputStream::Stdout, &vec![0; QUEUE_BYTES], far);
        shared.push(
            OutputStream::Stdout,
            b"late",
            Instant::now() + Duration::from_millis(50),
        );
        assert_eq!(shared.queue.lock().unwrap().bytes, QUEUE_BYTES);
        // A client that goes away frees the queue and stops any wait.
        shared.close();
        shared.push(OutputStream::Stdout, b"after", far);
        assert_eq!(shared.queue.lock().unwrap().bytes, 0);
    }
}
