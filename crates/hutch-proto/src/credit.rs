//! Per-stream credit accounting, the same on both ends of the connection.
//!
//! Every stream has one window per direction. The sender starts with [`WINDOW`] bytes of credit,
//! spends it on data frames (`Stdout`/`Stderr` from the agent, `Stdin` from the host) and waits
//! when it has none. The receiver queues what arrives, and as its consumer takes data it returns
//! that much credit with a `Credit` frame, batched to at least [`RETURN_AT`] bytes so a fast
//! consumer does not answer every frame. At any moment, per stream and direction:
//!
//! ```text
//! sender's credit + data in flight + receiver's queue + consumed-not-yet-returned
//!     + credit in flight = WINDOW
//! ```
//!
//! so a receiver never holds more than `WINDOW` bytes of a stream, however slow its consumer.
//! A peer that sends beyond its credit, or grants more than the window, is broken or hostile.

use crate::WINDOW;

/// Consumed bytes are handed back once at least this many have accumulated.
pub const RETURN_AT: u32 = WINDOW / 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CreditError {
    #[error("peer sent {got} data bytes on a stream with only {allowed} bytes of credit")]
    Overrun { got: u64, allowed: u64 },
    #[error("peer granted {grant} bytes while {avail} of the {WINDOW}-byte window were unspent")]
    OverGrant { grant: u32, avail: u64 },
}

/// The sending side of one stream direction: how much it may still send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendCredit {
    avail: u64,
}

impl Default for SendCredit {
    fn default() -> Self {
        SendCredit {
            avail: u64::from(WINDOW),
        }
    }
}

impl SendCredit {
    pub fn new() -> SendCredit {
        SendCredit::default()
    }

    /// Bytes that may be sent now.
    pub fn available(&self) -> u64 {
        self.avail
    }

    /// Spends up to `want` bytes; returns how many may be sent (0: wait for a grant).
    pub fn take(&mut self, want: usize) -> usize {
        let n = self.avail.min(want as u64);
        self.avail -= n;
        n as usize
    }

    /// Gives back what [`SendCredit::take`] returned but was not sent.
    pub fn untake(&mut self, n: usize) {
        self.avail = (self.avail + n as u64).min(u64::from(WINDOW));
    }

    /// The peer returned `n` bytes of credit.
    pub fn grant(&mut self, n: u32) -> Result<(), CreditError> {
        let next = self.avail + u64::from(n);
        if next > u64::from(WINDOW) {
            return Err(CreditError::OverGrant {
                grant: n,
                avail: self.avail,
            });
        }
        self.avail = next;
        Ok(())
    }
}

/// The receiving side of one stream direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecvCredit {
    /// What the peer may still send.
    peer_avail: u64,
    /// Received, not yet taken by the consumer.
    held: u64,
    /// Taken by the consumer, not yet returned to the peer.
    unreturned: u64,
}

impl Default for RecvCredit {
    fn default() -> Self {
        RecvCredit {
            peer_avail: u64::from(WINDOW),
            held: 0,
            unreturned: 0,
        }
    }
}

impl RecvCredit {
    pub fn new() -> RecvCredit {
        RecvCredit::default()
    }

    /// Bytes received and not yet consumed.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// A data frame of `n` bytes arrived; an error if the peer had no credit for it.
    pub fn received(&mut self, n: usize) -> Result<(), CreditError> {
        let n = n as u64;
        if n > self.peer_avail {
            return Err(CreditError::Overrun {
                got: n,
                allowed: self.peer_avail,
            });
        }
        self.peer_avail -= n;
        self.held += n;
        Ok(())
    }

    /// The consumer took `n` bytes; returns the grant to send to the peer, if one is due.
    pub fn consumed(&mut self, n: usize) -> Option<u32> {
        let n = (n as u64).min(self.held);
        self.held -= n;
        self.unreturned += n;
        if self.unreturned >= u64::from(RETURN_AT) {
            // unreturned <= WINDOW, so it fits a u32.
            let g = self.unreturned as u32;
            self.peer_avail += self.unreturned;
            self.unreturned = 0;
            Some(g)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    #[derive(Debug, Clone)]
    enum Op {
        /// The producer wants to send this many bytes.
        Send(usize),
        /// The consumer takes up to this many queued bytes.
        Consume(usize),
        /// The link delivers the oldest data frame.
        DeliverData,
        /// The link delivers the oldest credit frame.
        DeliverCredit,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1usize..200_000).prop_map(Op::Send),
            (1usize..200_000).prop_map(Op::Consume),
            Just(Op::DeliverData),
            Just(Op::DeliverCredit),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Whatever the interleaving, the receiver never holds more than the window, never sees
        /// an overrun from a sender that keeps to its credit, the bytes add up, and once
        /// everything is consumed and delivered the sender can send again (no deadlock).
        #[test]
        fn window_is_conserved(ops in proptest::collection::vec(op(), 1..300)) {
            let w = u64::from(WINDOW);
            let (mut tx, mut rx) = (SendCredit::new(), RecvCredit::new());
            let mut data: VecDeque<usize> = VecDeque::new();
            let mut credits: VecDeque<u32> = VecDeque::new();
            let (mut sent, mut got) = (0u64, 0u64);
            for o in ops {
                match o {
                    Op::Send(n) => {
                        let k = tx.take(n);
                        if k > 0 {
                            data.push_back(k);
                            sent += k as u64;
                        }
                    }
                    Op::Consume(n) => {
                        let k = (n as u64).min(rx.held()) as usize;
                        got += k as u64;
                        if let Some(g) = rx.consumed(k) {
                            credits.push_back(g);
                        }
                    }
                    Op::DeliverData => {
                        if let Some(k) = data.pop_front() {
                            prop_assert_eq!(rx.received(k), Ok(()));
                        }
                    }
                    Op::DeliverCredit => {
                        if let Some(g) = credits.pop_front() {
                            prop_assert_eq!(tx.grant(g), Ok(()));
                        }
                    }
                }
                let in_flight: u64 = data.iter().map(|&k| k as u64).sum();
                let credit_in_flight: u64 = credits.iter().map(|&g| u64::from(g)).sum();
                prop_assert_eq!(
                    tx.available() + in_flight + rx.held() + rx.unreturned + credit_in_flight,
                    w
                );
                prop_assert!(rx.held() <= w);
                prop_assert!(got <= sent);
            }
            // Drain: deliver everything, consume everything, deliver the credit.
            while let Some(k) = data.pop_front() {
                prop_assert_eq!(rx.received(k), Ok(()));
            }
            let rest = rx.held() as usize;
            if let Some(g) = rx.consumed(rest) {
                credits.push_back(g);
            }
            while let Some(g) = credits.pop_front() {
                prop_assert_eq!(tx.grant(g), Ok(()));
            }
            prop_assert!(tx.available() > w - u64::from(RETURN_AT));
        }

        /// A peer that ignores its credit is caught by the first frame that exceeds it.
        #[test]
        fn overrun_detected(frames in proptest::collection::vec(1usize..100_000, 1..40)) {
            let mut rx = RecvCredit::new();
            let mut total = 0u64;
            for k in frames {
                total += k as u64;
                let r = rx.received(k);
                prop_assert_eq!(r.is_err(), total > u64::from(WINDOW));
                if r.is_err() {
                    break;
                }
            }
        }
    }

    #[test]
    fn over_grant_refused() {
        let mut tx = SendCredit::new();
        assert!(tx.grant(1).is_err());
        assert_eq!(tx.take(10), 10);
        assert_eq!(tx.grant(10), Ok(()));
        assert!(tx.grant(u32::MAX).is_err());
        assert_eq!(tx.available(), u64::from(WINDOW));
    }
}
