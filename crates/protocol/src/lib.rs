//! The messages that cross a boundary: between the VMM and the agent inside a sandbox
//! (this module's frames), between the server and its worker processes (`worker`), and
//! the requests and results both carry (`exec`).
//!
//! Agent frames: each message is a frame: a 4-byte little-endian length, then a MessagePack map. Byte
//! strings stay binary (MessagePack `bin`), so code, stdin and files may hold any bytes;
//! nothing is ever found by scanning for a marker. Program output does not travel here at
//! all: the VMM captures descriptors 1 and 2 itself.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub mod exec;
pub mod files;
pub mod worker;

/// Version every frame carries; the agent refuses others.
pub const VERSION: u32 = 1;
/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 64 << 20;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("truncated frame: {have} of {need} bytes")]
    Truncated { have: usize, need: usize },
    #[error("encoding: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("decoding: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    #[error("protocol version {0} is not {VERSION}")]
    Version(u32),
}

/// Code to run, sent to a parked agent. Stdin and files are not in the frame: the VMM
/// serves stdin on descriptor 0 and places files in the filesystem before delivering it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub v: u32,
    /// Source code (any bytes; the agent decodes it as UTF-8 the way python3 would).
    #[serde(with = "serde_bytes")]
    pub code: Vec<u8>,
    /// Environment variables to set before running.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory to change to before running.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Run in the agent's persistent namespace (a session) instead of a fresh `__main__`.
    #[serde(default)]
    pub keep_namespace: bool,
    /// What the code is: `python` (also when empty), or a shell's name (`bash`, `sh`), which
    /// the agent runs the code with as `SHELL -c CODE`.
    #[serde(default)]
    pub language: String,
    /// The first request of a newly forked sandbox: the agent gives the runtime's random
    /// generators fresh seeds first (forks must not repeat each other's numbers). A
    /// session's later requests keep whatever seeds its code set.
    #[serde(default)]
    pub fresh_fork: bool,
}

impl Request {
    /// `code` for a fresh fork.
    pub fn code(code: impl Into<Vec<u8>>) -> Request {
        Request {
            v: VERSION,
            code: code.into(),
            fresh_fork: true,
            ..Request::default()
        }
    }
}

/// How the code ended, sent back by the agent before it parks again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub v: u32,
    pub exit_code: i32,
    /// Type name of the uncaught exception (`"MemoryError"`, …), if the code raised one.
    #[serde(default)]
    pub exception: Option<String>,
}

/// Encodes `message` as one frame.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let body = rmp_serde::to_vec_named(message)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Decodes the first frame of `bytes`; returns the message and the bytes it used.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<(T, usize), FrameError> {
    if bytes.len() < 4 {
        return Err(FrameError::Truncated {
            have: bytes.len(),
            need: 4,
        });
    }
    let len = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let end = 4 + len;
    if bytes.len() < end {
        return Err(FrameError::Truncated {
            have: bytes.len(),
            need: end,
        });
    }
    Ok((rmp_serde::from_slice(&bytes[4..end])?, end))
}

/// Decodes a reply and checks its version.
pub fn decode_reply(bytes: &[u8]) -> Result<Reply, FrameError> {
    let (reply, _): (Reply, usize) = decode(bytes)?;
    if reply.v != VERSION {
        return Err(FrameError::Version(reply.v));
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_any_bytes() {
        let request = Request::code(b"print('ZEROBOOT_DONE')\x00\xff".to_vec());
        let frame = encode(&request).unwrap();
        let (back, used): (Request, usize) = decode(&frame).unwrap();
        assert_eq!(back, request);
        assert_eq!(used, frame.len());
    }

    #[test]
    fn truncated_and_oversized_frames_are_errors() {
        let frame = encode(&Reply {
            v: VERSION,
            exit_code: 3,
            exception: None,
        })
        .unwrap();
        assert!(matches!(
            decode::<Reply>(&frame[..frame.len() - 1]),
            Err(FrameError::Truncated { .. })
        ));
        let mut huge = frame.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode::<Reply>(&huge),
            Err(FrameError::TooLarge(_))
        ));
        assert_eq!(decode_reply(&frame).unwrap().exit_code, 3);
    }
}
