//! The WebSocket wire, below any session: [`frame`] is RFC 6455 at the byte
//! level (whole units found from headers, the protocol checks, the router's
//! own frames), [`peer`] one side's socket with its frame reader and write
//! queue, [`close`] the close codes by name and the faults a peer is
//! closed for. Nothing here knows about backends, placement or moves.

pub(crate) mod close;
pub mod frame;
pub(crate) mod peer;
