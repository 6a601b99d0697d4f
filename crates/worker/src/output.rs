//! Streaming a call's output to the server, paced by the server.
//!
//! Every chunk a sandbox writes becomes an `Event::Output` (at most `OUTPUT_CHUNK` bytes),
//! but no more than `OUTPUT_WINDOW` of them are in flight: each must be taken
//! (`Call::OutputTaken`) before another goes. When the client reading the stream is slow,
//! the server stops taking, the window fills, and the sandbox's own thread waits in its
//! `write`: the sandbox pauses, and neither process buffers more than the window. The wait
//! ends at the request's deadline (the run loop then ends the sandbox); output after that
//! is dropped.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use forkvm_protocol::worker::{Event, OUTPUT_CHUNK, OUTPUT_WINDOW, OutputStream, write_frame};

use forkvm_engine::{Streams, Tap};
use forkvm_kernel::file::Stream;

use crate::service::Writer;

/// How many output events of one call are in flight.
#[derive(Default)]
struct Window {
    in_flight: Mutex<u32>,
    taken: Condvar,
}

impl Window {
    /// Waits for room for one more event; false if `deadline` came first.
    fn reserve(&self, deadline: Instant) -> bool {
        let mut in_flight = self.in_flight.lock().expect("window lock");
        while *in_flight >= OUTPUT_WINDOW {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            in_flight = self
                .taken
                .wait_timeout(in_flight, left.min(Duration::from_millis(100)))
                .expect("window lock")
                .0;
        }
        *in_flight += 1;
        true
    }

    fn take(&self) {
        let mut in_flight = self.in_flight.lock().expect("window lock");
        *in_flight = in_flight.saturating_sub(1);
        self.taken.notify_all();
    }
}

/// The windows of the calls streaming now.
#[derive(Default)]
pub struct Windows(Mutex<HashMap<u64, Arc<Window>>>);

impl Windows {
    /// Streams for call `id` that send each chunk to the server as it is written, paced
    /// by the server, until `deadline`.
    pub fn streams(&self, id: u64, writer: Writer, deadline: Instant) -> Streams {
        let window = Arc::new(Window::default());
        self.0
            .lock()
            .expect("windows lock")
            .insert(id, window.clone());
        let tap: Tap = Arc::new(move |which, data: &[u8]| {
            let stream = match which {
                Stream::Stderr => OutputStream::Stderr,
                _ => OutputStream::Stdout,
            };
            for chunk in data.chunks(OUTPUT_CHUNK) {
                if !window.reserve(deadline) {
                    return;
                }
                let event = Event::Output {
                    id,
                    stream,
                    data: chunk.to_vec(),
                };
                let _ = write_frame(&mut *writer.lock().expect("writer lock"), &event);
            }
        });
        Streams::with_tap(tap)
    }

    /// The server took one event of call `call`.
    pub fn taken(&self, call: u64) {
        let window = self.0.lock().expect("windows lock").get(&call).cloned();
        if let Some(window) = window {
            window.take();
        }
    }

    /// Call `id` ended.
    pub fn remove(&self, id: u64) {
        self.0.lock().expect("windows lock").remove(&id);
    }
}
