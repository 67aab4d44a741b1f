//! Lease ids: the opaque handle a pull hands out for one delivery of one message.
//!
//! A lease id is 40 lowercase hex digits packing four numbers: the queue's number in this
//! emulator, the emulator's epoch (random, renewed by a reset), the message's sequence
//! number in its queue and the message's version at the time it was leased. Acks and
//! retries are therefore resolved without a lookup table: the queue parses the id, finds the
//! message by sequence number and compares versions to tell a current lease from a stale
//! one. Clients must treat the id as opaque; nothing outside this module relies on the
//! layout.

/// The parts of a lease id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lease {
    /// The number the registry gave the queue when it created it.
    pub queue_no: u32,
    /// The emulator epoch the lease was issued in; a reset changes the epoch, so leases
    /// issued before it become unknown.
    pub epoch: u32,
    /// The message's sequence number inside its queue.
    pub seq: u64,
    /// The message's version when it was leased; any later state change bumps the version.
    pub version: u32,
}

/// Length of an encoded lease id, in characters.
pub(crate) const LEASE_ID_LEN: usize = 40;

const HEX: &[u8; 16] = b"0123456789abcdef";

fn push_hex(out: &mut Vec<u8>, value: u64, digits: u32) {
    for shift in (0..digits).rev() {
        let nibble = (value >> (shift * 4)) & 0xf;
        // `nibble` is at most 15, so the index is in bounds.
        out.push(HEX[nibble as usize]);
    }
}

fn parse_hex(text: &[u8]) -> Option<u64> {
    let mut value: u64 = 0;
    for &c in text {
        let digit = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => return None,
        };
        value = (value << 4) | u64::from(digit);
    }
    Some(value)
}

impl Lease {
    /// Appends the encoded id (40 hex digits, no quotes) to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        push_hex(out, u64::from(self.queue_no), 8);
        push_hex(out, u64::from(self.epoch), 8);
        push_hex(out, self.seq, 16);
        push_hex(out, u64::from(self.version), 8);
    }

    /// Parses an id written by [`Lease::write`]; anything else gives `None`.
    pub fn parse(text: &str) -> Option<Lease> {
        let bytes = text.as_bytes();
        if bytes.len() != LEASE_ID_LEN {
            return None;
        }
        // Each field has at most 16 hex digits, so the values fit their types.
        Some(Lease {
            queue_no: u32::try_from(parse_hex(&bytes[0..8])?).ok()?,
            epoch: u32::try_from(parse_hex(&bytes[8..16])?).ok()?,
            seq: parse_hex(&bytes[16..32])?,
            version: u32::try_from(parse_hex(&bytes[32..40])?).ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let lease = Lease {
            queue_no: 7,
            epoch: 0xdead_beef,
            seq: u64::MAX - 3,
            version: 42,
        };
        let mut out = Vec::new();
        lease.write(&mut out);
        assert_eq!(out.len(), LEASE_ID_LEN);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(Lease::parse(&text), Some(lease));
    }

    #[test]
    fn rejects_other_text() {
        assert_eq!(Lease::parse(""), None);
        assert_eq!(Lease::parse("not-a-lease"), None);
        assert_eq!(Lease::parse(&"g".repeat(LEASE_ID_LEN)), None);
        assert_eq!(Lease::parse(&"A".repeat(LEASE_ID_LEN)), None);
        assert_eq!(Lease::parse(&"0".repeat(LEASE_ID_LEN + 1)), None);
    }
}
