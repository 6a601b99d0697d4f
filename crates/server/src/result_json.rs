//! Execution results written as JSON piece by piece, while the response is sent.
//!
//! A result's output stays the bytes the worker sent until the client takes it. Made into a
//! JSON string all at once, output can grow sixfold (a control byte becomes `\u0001`), and
//! a batch multiplies that by its size; here each piece is made from at most `PIECE_BYTES`
//! of output when the response body is polled for it, so a slow client holds the raw
//! bytes and one piece, never the expanded text. The JSON is the same document
//! `serde_json` makes of `ExecResponse` (with `stdout` and `stderr` first).

use std::collections::VecDeque;

use axum::body::Bytes;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use forkvm_protocol::exec::ExecResult;
use uuid::Uuid;

use crate::wire::ExecResponse;

/// Most output bytes turned into JSON per piece (a multiple of 3, for base64).
pub const PIECE_BYTES: usize = 48 << 10;

enum Part {
    /// JSON made already.
    Raw(Bytes),
    /// Output as the body of a JSON string (invalid UTF-8 replaced), from `at` on.
    Text { bytes: Bytes, at: usize },
    /// Output in base64, from `at` on.
    Base64 { bytes: Bytes, at: usize },
}

/// A JSON document made as it is read: an iterator of its pieces.
pub struct JsonPieces {
    parts: VecDeque<Part>,
}

impl JsonPieces {
    /// One execution's response (`ExecResponse`).
    pub fn exec(result: ExecResult) -> JsonPieces {
        let mut parts = VecDeque::new();
        push_exec(&mut parts, result);
        JsonPieces { parts }
    }

    /// A batch's response (`BatchResponse`).
    pub fn batch(results: Vec<ExecResult>) -> JsonPieces {
        let mut parts = VecDeque::new();
        parts.push_back(Part::Raw(Bytes::from_static(b"{\"results\":[")));
        for (i, result) in results.into_iter().enumerate() {
            if i > 0 {
                parts.push_back(Part::Raw(Bytes::from_static(b",")));
            }
            push_exec(&mut parts, result);
        }
        parts.push_back(Part::Raw(Bytes::from_static(b"]}")));
        JsonPieces { parts }
    }

    /// JSON made already (an error body).
    pub fn ready(json: Vec<u8>) -> JsonPieces {
        JsonPieces {
            parts: VecDeque::from([Part::Raw(Bytes::from(json))]),
        }
    }

    /// These pieces between `before` and `after` (an SSE event's frame).
    pub fn framed(mut self, before: &'static [u8], after: &'static [u8]) -> JsonPieces {
        self.parts.push_front(Part::Raw(Bytes::from_static(before)));
        self.parts.push_back(Part::Raw(Bytes::from_static(after)));
        self
    }

    /// All of it at once.
    #[cfg(test)]
    fn collect_all(self) -> Vec<u8> {
        self.flat_map(|b| b.to_vec()).collect()
    }
}

impl Iterator for JsonPieces {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        loop {
            let part = self.parts.front_mut()?;
            let piece = match part {
                Part::Raw(bytes) => {
                    let bytes = std::mem::take(bytes);
                    self.parts.pop_front();
                    bytes
                }
                Part::Text { bytes, at } => {
                    let (piece, used) = text_piece(&bytes[*at..]);
                    *at += used;
                    if *at >= bytes.len() {
                        self.parts.pop_front();
                    }
                    piece
                }
                Part::Base64 { bytes, at } => {
                    let end = (*at + PIECE_BYTES).min(bytes.len());
                    let piece = Bytes::from(BASE64.encode(&bytes[*at..end]));
                    *at = end;
                    if *at >= bytes.len() {
                        self.parts.pop_front();
                    }
                    piece
                }
            };
            if !piece.is_empty() {
                return Some(piece);
            }
        }
    }
}

/// Appends `result` as an `ExecResponse` object.
fn push_exec(parts: &mut VecDeque<Part>, mut result: ExecResult) {
    // The output moves into shared buffers (no copy); the rest is made JSON now.
    let stdout = Bytes::from(std::mem::take(&mut result.stdout));
    let stderr = Bytes::from(std::mem::take(&mut result.stderr));
    let summary = {
        let mut fields = serde_json::to_value(ExecResponse::from_result(Uuid::now_v7(), &result))
            .expect("API types serialize");
        let map = fields.as_object_mut().expect("an object");
        for field in ["stdout", "stderr", "stdout_base64", "stderr_base64"] {
            map.remove(field);
        }
        serde_json::to_vec(&fields).expect("API types serialize")
    };
    let text = |name: &'static str, bytes: &Bytes| {
        [
            Part::Raw(Bytes::from(format!("\"{name}\":\""))),
            Part::Text {
                bytes: bytes.clone(),
                at: 0,
            },
            Part::Raw(Bytes::from_static(b"\",")),
        ]
    };
    let raw = |name: &'static str, bytes: &Bytes| {
        let invalid = std::str::from_utf8(bytes).is_err();
        invalid.then(|| {
            [
                Part::Raw(Bytes::from(format!("\"{name}\":\""))),
                Part::Base64 {
                    bytes: bytes.clone(),
                    at: 0,
                },
                Part::Raw(Bytes::from_static(b"\",")),
            ]
        })
    };
    parts.push_back(Part::Raw(Bytes::from_static(b"{")));
    parts.extend(text("stdout", &stdout));
    parts.extend(text("stderr", &stderr));
    parts.extend(raw("stdout_base64", &stdout).into_iter().flatten());
    parts.extend(raw("stderr_base64", &stderr).into_iter().flatten());
    // The summary's own braces: `{` dropped (ours is open), `}` kept.
    parts.push_back(Part::Raw(Bytes::from(summary).slice(1..)));
}

/// `bytes` as one JSON string (invalid UTF-8 replaced), made at once: for small chunks.
pub fn json_string(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 2);
    out.push(b'"');
    let mut at = 0;
    while at < bytes.len() {
        let (piece, used) = text_piece(&bytes[at..]);
        out.extend_from_slice(&piece);
        at += used;
    }
    out.push(b'"');
    out
}

/// The next piece of a JSON string's body from `bytes` (lossy UTF-8, as
/// `String::from_utf8_lossy` decodes): the piece and how many bytes it used.
fn text_piece(bytes: &[u8]) -> (Bytes, usize) {
    let mut out = Vec::with_capacity(PIECE_BYTES + PIECE_BYTES / 4);
    let mut used = 0;
    for chunk in bytes.utf8_chunks() {
        let valid = chunk.valid();
        let room = PIECE_BYTES.saturating_sub(used);
        if valid.len() > room {
            let mut cut = room;
            while !valid.is_char_boundary(cut) {
                cut -= 1;
            }
            escape_into(&mut out, &valid[..cut]);
            used += cut;
            // Made no progress (a character longer than the room left): take it whole.
            if used == 0 {
                let first = valid.chars().next().map_or(0, char::len_utf8);
                escape_into(&mut out, &valid[..first]);
                used = first;
            }
            return (Bytes::from(out), used);
        }
        escape_into(&mut out, valid);
        used += valid.len();
        if !chunk.invalid().is_empty() {
            out.extend_from_slice(
                char::REPLACEMENT_CHARACTER
                    .encode_utf8(&mut [0; 4])
                    .as_bytes(),
            );
            used += chunk.invalid().len();
        }
        if used >= PIECE_BYTES {
            break;
        }
    }
    (Bytes::from(out), used)
}

/// Appends `text` escaped as the inside of a JSON string (as `serde_json` escapes).
fn escape_into(out: &mut Vec<u8>, text: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = text.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => &[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(b >> 4) as usize],
                HEX[(b & 0xf) as usize],
            ],
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(escaped);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use forkvm_protocol::exec::{ErrorKind, ExecError, Timings};

    fn result(stdout: Vec<u8>, stderr: Vec<u8>) -> ExecResult {
        ExecResult {
            stdout,
            stderr,
            stdout_truncated: false,
            stderr_truncated: true,
            exit_code: 3,
            error: ExecError {
                kind: ErrorKind::OutputLimit,
                message: "too much".into(),
            },
            timings: Timings {
                fork_us: 10,
                exec_us: 20,
                total_us: 30,
                queue_us: 40,
            },
            unsupported_syscalls: Default::default(),
        }
    }

    /// The pieces make the document `serde_json` makes (ids aside).
    fn assert_same(result: ExecResult) {
        let expected =
            serde_json::to_value(ExecResponse::from_result(Uuid::nil(), &result)).unwrap();
        let pieces: Vec<Bytes> = JsonPieces::exec(result).collect();
        assert!(pieces.iter().all(|p| p.len() <= 6 * PIECE_BYTES + 64));
        let bytes: Vec<u8> = pieces.iter().flat_map(|p| p.to_vec()).collect();
        let mut got: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        got["id"] = expected["id"].clone();
        assert_eq!(got, expected);
    }

    #[test]
    fn output_of_every_kind_comes_out_as_serde_json_writes_it() {
        assert_same(result(b"hello\n".to_vec(), Vec::new()));
        assert_same(result(
            "quote \" backslash \\ tab \t nul \0 bell \x07 del \x7f é 😀".into(),
            vec![0xff, b'a', 0xe2, 0x82, b'b', 0xf0, 0x9f, 0x98],
        ));
        // Large, spanning many pieces, with multi-byte characters and invalid bytes
        // across the piece boundaries.
        let mut big = Vec::new();
        for i in 0..200_000u32 {
            match i % 7 {
                0 => big.extend_from_slice("é".as_bytes()),
                1 => big.push(1),
                2 => big.push(0xff),
                3 => big.extend_from_slice("😀".as_bytes()),
                4 => big.extend_from_slice(&[0xe2, 0x82]),
                _ => big.push(b'x'),
            }
        }
        assert_same(result(big.clone(), big));
        assert_same(result(
            vec![1; 3 * PIECE_BYTES + 1],
            vec![b'"'; PIECE_BYTES],
        ));
    }

    #[test]
    fn a_batch_is_an_array_of_results() {
        let results = vec![
            result(b"a".to_vec(), vec![0xff]),
            result(Vec::new(), Vec::new()),
        ];
        let expected: Vec<_> = results
            .iter()
            .map(|r| serde_json::to_value(ExecResponse::from_result(Uuid::nil(), r)).unwrap())
            .collect();
        let bytes = JsonPieces::batch(results).collect_all();
        let mut got: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        for (g, e) in got["results"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .zip(&expected)
        {
            g["id"] = e["id"].clone();
        }
        assert_eq!(got["results"], serde_json::Value::from(expected));
    }
}
