//! Close codes by name (RFC 6455 7.4.1), and the faults a peer is closed
//! for, each with its code, its reason and its metric label: what a user
//! sees when the router ends a session, in one place.

use crate::metrics::CloseReason;
use crate::wire::frame::Violation;

pub const GOING_AWAY: u16 = 1001;
pub const PROTOCOL_ERROR: u16 = 1002;
pub const INVALID_PAYLOAD: u16 = 1007;
pub const POLICY_VIOLATION: u16 = 1008;
pub const MESSAGE_TOO_BIG: u16 = 1009;
pub const INTERNAL_ERROR: u16 = 1011;
pub const SERVICE_RESTART: u16 = 1012;
pub const TRY_AGAIN_LATER: u16 = 1013;
pub const BAD_GATEWAY: u16 = 1014;

/// What a peer did that ends its session: broke the protocol or a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A frame the protocol does not allow (1002).
    Protocol,
    /// Text that is not UTF-8 (1007).
    InvalidUtf8,
    /// A message or frame over `relay.max_message_bytes` (1009).
    TooBig,
    /// Over the session's message or byte rate (1008).
    MessageRate,
}

impl Fault {
    /// The close code the peer gets.
    pub fn code(self) -> u16 {
        match self {
            Fault::Protocol => PROTOCOL_ERROR,
            Fault::InvalidUtf8 => INVALID_PAYLOAD,
            Fault::TooBig => MESSAGE_TOO_BIG,
            Fault::MessageRate => POLICY_VIOLATION,
        }
    }

    /// The reason sent with the code.
    pub fn reason(self) -> &'static str {
        match self {
            Fault::Protocol => "protocol error",
            Fault::InvalidUtf8 => "invalid UTF-8",
            Fault::TooBig => "message too big",
            Fault::MessageRate => "message rate limit",
        }
    }

    /// Why the session of a client closed for it ended.
    pub fn close_reason(self) -> CloseReason {
        match self {
            Fault::Protocol => CloseReason::ProtocolError,
            Fault::InvalidUtf8 => CloseReason::InvalidUtf8,
            Fault::TooBig => CloseReason::MessageTooBig,
            Fault::MessageRate => CloseReason::MessageRate,
        }
    }
}

impl From<Violation> for Fault {
    fn from(violation: Violation) -> Fault {
        match violation {
            Violation::Protocol => Fault::Protocol,
            Violation::InvalidUtf8 => Fault::InvalidUtf8,
            Violation::TooBig => Fault::TooBig,
        }
    }
}

/// Backend close codes that move the session instead of ending it.
pub fn is_migrating(code: u16) -> bool {
    matches!(
        code,
        GOING_AWAY | INTERNAL_ERROR | SERVICE_RESTART | TRY_AGAIN_LATER | BAD_GATEWAY
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_closes_migrate() {
        for code in [1001, 1011, 1012, 1013, 1014] {
            assert!(is_migrating(code));
        }
        for code in [1000, 1008, 1002, 4000] {
            assert!(!is_migrating(code));
        }
    }

    #[test]
    fn each_fault_has_its_code() {
        let codes: Vec<u16> = [
            Fault::Protocol,
            Fault::InvalidUtf8,
            Fault::TooBig,
            Fault::MessageRate,
        ]
        .map(Fault::code)
        .to_vec();
        assert_eq!(codes, [1002, 1007, 1009, 1008]);
    }
}
