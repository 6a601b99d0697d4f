//! The control channel: descriptor 3 of a template's entry program, through which the VMM
//! talks to the in-sandbox agent.
//!
//! A read with nothing to deliver does not block a thread: it *parks the sandbox* at that
//! syscall (`Outcome::AwaitingControl`). That is the moment a template is snapshotted and
//! the moment a fork resumes from, by completing the read with a request.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Descriptor number the agent finds the channel on.
pub const CONTROL_FD: i32 = 3;
/// Most bytes the agent may write before the VMM collects them (a reply larger than this
/// fails with `EFBIG`, so a runaway agent cannot grow host memory without bound).
pub const OUTBOX_LIMIT: usize = 256 << 20;

/// A read the program made that is waiting for bytes from the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRead {
    pub buf: u64,
    pub len: u64,
}

/// Bytes in flight on the channel, both ways.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ControlChannel {
    inbox: VecDeque<u8>,
    outbox: Vec<u8>,
    pending: Option<PendingRead>,
}

impl ControlChannel {
    /// Queues bytes for the program to read.
    pub fn push_inbound(&mut self, data: &[u8]) {
        self.inbox.extend(data);
    }

    /// Takes up to `max` queued inbound bytes.
    pub fn take_inbound(&mut self, max: usize) -> Vec<u8> {
        let n = max.min(self.inbox.len());
        self.inbox.drain(..n).collect()
    }

    pub fn has_inbound(&self) -> bool {
        !self.inbox.is_empty()
    }

    /// Appends what the program wrote; false if it would exceed `OUTBOX_LIMIT`.
    pub fn push_outbound(&mut self, data: &[u8]) -> bool {
        if self.outbox.len() + data.len() > OUTBOX_LIMIT {
            return false;
        }
        self.outbox.extend_from_slice(data);
        true
    }

    /// Everything the program wrote since the last call.
    pub fn take_outbound(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.outbox)
    }

    pub fn set_pending(&mut self, read: PendingRead) {
        self.pending = Some(read);
    }

    pub fn pending(&self) -> Option<PendingRead> {
        self.pending
    }

    pub fn take_pending(&mut self) -> Option<PendingRead> {
        self.pending.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_is_delivered_in_pieces() {
        let mut c = ControlChannel::default();
        c.push_inbound(b"hello");
        assert_eq!(c.take_inbound(2), b"he");
        assert!(c.has_inbound());
        assert_eq!(c.take_inbound(10), b"llo");
        assert!(!c.has_inbound());
    }

    #[test]
    fn outbound_is_bounded() {
        let mut c = ControlChannel::default();
        assert!(c.push_outbound(b"abc"));
        assert!(!c.push_outbound(&vec![0; OUTBOX_LIMIT]));
        assert_eq!(c.take_outbound(), b"abc");
        assert!(c.take_outbound().is_empty());
    }
}
