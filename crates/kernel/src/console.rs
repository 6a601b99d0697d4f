//! The sandbox's standard streams: where stdout/stderr bytes go, with a cap, and where stdin
//! bytes come from.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use crate::file::Stream;

/// Where stdin reads come from.
pub enum Input {
    /// Reads return end-of-file.
    Empty,
    /// A fixed byte string (a request's stdin).
    Bytes { data: Vec<u8>, pos: usize },
    /// A host reader (the CLI passes its own stdin through).
    Host(Box<dyn Read + Send>),
}

/// An in-memory sink for a sandbox's output that the host reads afterwards (or while it
/// runs, for streaming). Clones share the buffer.
#[derive(Clone, Default)]
pub struct CaptureBuffer(Arc<Mutex<Vec<u8>>>);

impl CaptureBuffer {
    /// Takes the bytes written so far, leaving the buffer empty.
    pub fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().expect("capture lock"))
    }

    /// A copy of the bytes written so far.
    pub fn contents(&self) -> Vec<u8> {
        self.0.lock().expect("capture lock").clone()
    }
}

impl Write for CaptureBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("capture lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A stream reached its byte cap; the sandbox must stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLimitReached {
    pub stream: Stream,
    pub limit: u64,
}

/// The standard streams of one sandbox and the per-stream output cap.
pub struct Console {
    stdin: Input,
    stdout: Box<dyn Write + Send>,
    stderr: Box<dyn Write + Send>,
    limit: u64,
    written: [u64; 2],
}

impl Console {
    /// `limit` is the number of bytes each of stdout and stderr may carry.
    pub fn new(
        stdin: Input,
        stdout: Box<dyn Write + Send>,
        stderr: Box<dyn Write + Send>,
        limit: u64,
    ) -> Self {
        Self {
            stdin,
            stdout,
            stderr,
            limit,
            written: [0, 0],
        }
    }

    /// A console for the time between a session's requests: no input, and output that
    /// nobody reads is dropped (uncapped, so a chatty background job does not end the
    /// sandbox).
    pub fn discarding() -> Self {
        Self::new(
            Input::Empty,
            Box::new(std::io::sink()),
            Box::new(std::io::sink()),
            u64::MAX,
        )
    }

    /// Bytes written so far to stdout and stderr.
    pub fn written(&self) -> (u64, u64) {
        (self.written[0], self.written[1])
    }

    /// Writes `data` to `stream`. When the cap is reached, the part that fits is written and
    /// the caller must end the sandbox.
    pub fn write(&mut self, stream: Stream, data: &[u8]) -> Result<(), OutputLimitReached> {
        let (index, sink) = match stream {
            Stream::Stdout => (0, &mut self.stdout),
            Stream::Stderr => (1, &mut self.stderr),
            Stream::Stdin => return Ok(()),
        };
        let room = self.limit.saturating_sub(self.written[index]);
        let take = data.len().min(room as usize);
        // A host write error (closed pipe) is not the sandbox's fault: the bytes are dropped,
        // as a process writing to a closed terminal would lose them.
        let _ = sink.write_all(&data[..take]);
        self.written[index] += take as u64;
        if take < data.len() {
            let _ = sink.flush();
            return Err(OutputLimitReached {
                stream,
                limit: self.limit,
            });
        }
        Ok(())
    }

    /// Reads up to `buf.len()` stdin bytes; 0 means end-of-file.
    pub fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match &mut self.stdin {
            Input::Empty => Ok(0),
            Input::Bytes { data, pos } => {
                let n = buf.len().min(data.len() - *pos);
                buf[..n].copy_from_slice(&data[*pos..*pos + n]);
                *pos += n;
                Ok(n)
            }
            Input::Host(reader) => reader.read(buf),
        }
    }

    /// Flushes both output streams.
    pub fn flush(&mut self) {
        let _ = self.stdout.flush();
        let _ = self.stderr.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_each_stream_separately() {
        let out = CaptureBuffer::default();
        let err = CaptureBuffer::default();
        let mut c = Console::new(
            Input::Empty,
            Box::new(out.clone()),
            Box::new(err.clone()),
            5,
        );
        c.write(Stream::Stdout, b"abc").unwrap();
        let hit = c.write(Stream::Stdout, b"defg").unwrap_err();
        assert_eq!(hit.stream, Stream::Stdout);
        assert_eq!(out.contents(), b"abcde");
        c.write(Stream::Stderr, b"12345").unwrap();
        assert_eq!(c.written(), (5, 5));
    }

    #[test]
    fn stdin_bytes_then_eof() {
        let data = b"hello".to_vec();
        let mut c = Console::new(
            Input::Bytes { data, pos: 0 },
            Box::new(std::io::sink()),
            Box::new(std::io::sink()),
            10,
        );
        let mut buf = [0u8; 3];
        assert_eq!(c.read(&mut buf).unwrap(), 3);
        assert_eq!(c.read(&mut buf).unwrap(), 2);
        assert_eq!(c.read(&mut buf).unwrap(), 0);
    }
}
