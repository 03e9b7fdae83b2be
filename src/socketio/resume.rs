//! A Socket.IO session across a move. The new backend's Socket.IO server
//! has never seen the client: the router consumes its engine.io OPEN
//! packet (the client keeps its own engine.io session), sends it the
//! client's namespace CONNECT packets (with their auth payload), and
//! consumes its acknowledgements, so the server runs its connection
//! handler and the client notices nothing. A refusal (`44`) goes to the
//! client as Socket.IO delivers it. Only then are the client's messages
//! replayed, without the packets that belong to one connection (pings,
//! pongs, upgrades, CONNECTs) and without binary attachments whose
//! placeholder packet is gone.
//!
//! The CONNECT packets are noted as the relay forwards the client's frames
//! ([`crate::socketio::Connects::note_in_frames`]), including those for
//! namespaces joined long after the session opened, and taken from its
//! long-polling requests ([`crate::socketio::SidTable`]).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::socketio::{Connects, Packet, packet_kind};
use crate::wire::frame::{OP_BINARY, OP_TEXT, Unit, message_payload};
use crate::wire::peer::{Peer, ReadHint};

/// Why a session could not resume on its new backend.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("the new backend sent no engine.io OPEN packet in time")]
    Timeout,
    #[error("the new backend went away while the session resumed")]
    Lost,
}

/// Make a new backend's Socket.IO server take the session: consume its
/// OPEN, send `connects`, consume its acknowledgements. What else it sends
/// meanwhile is queued for the client (its connection handler's emits, a
/// refusal).
pub async fn resume<C, B>(
    client: &mut Peer<C>,
    backend: &mut Peer<B>,
    connects: &Connects,
    within: Duration,
) -> Result<(), ResumeError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + ReadHint + Unpin,
{
    tokio::time::timeout(within, async {
        let next_message = async |backend: &mut Peer<B>| loop {
            match backend.next_unit().await {
                Ok(Unit::Message { len, .. }) => {
                    let frames = backend.reader.take(len);
                    let (_, payload) = message_payload(&frames);
                    return Ok((frames, packet_kind(&payload)));
                }
                // Nothing to answer for: the relay pings this hop itself.
                Ok(unit @ (Unit::Ping { .. } | Unit::Pong { .. })) => {
                    backend.reader.skip(unit.len())
                }
                Ok(Unit::Close { .. }) | Err(_) => return Err(ResumeError::Lost),
            }
        };
        loop {
            let (frames, kind) = next_message(backend).await?;
            if kind == Packet::Open {
                break;
            }
            client.queue(frames);
        }
        let packets = connects.to_send();
        let mut batch = BytesMut::new();
        for packet in &packets {
            batch.extend_from_slice(&backend.frame(OP_TEXT, packet));
        }
        backend
            .send(batch.freeze())
            .await
            .map_err(|_| ResumeError::Lost)?;
        let mut unanswered = packets.len();
        while unanswered > 0 {
            let (frames, kind) = next_message(backend).await?;
            match kind {
                Packet::Connect => unanswered -= 1,
                Packet::ConnectError => {
                    unanswered -= 1;
                    client.queue(frames);
                }
                _ => client.queue(frames),
            }
        }
        Ok(())
    })
    .await
    .unwrap_or(Err(ResumeError::Timeout))
}

/// The client messages to replay to a new backend, without those about one
/// connection (engine.io pings, pongs, upgrade probes; CONNECTs, sent
/// again already) and without leading binary attachments whose
/// placeholder packet is no longer there.
pub fn replayable<T>(messages: Vec<T>, frames: impl Fn(&T) -> &Bytes) -> Vec<T> {
    let mut placeholder_seen = false;
    messages
        .into_iter()
        .filter(|message| {
            let (opcode, payload) = message_payload(frames(message));
            if opcode == OP_BINARY {
                return placeholder_seen;
            }
            placeholder_seen = true;
            !matches!(packet_kind(&payload), Packet::Connect | Packet::Transport)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::encode;

    #[test]
    fn replays_leave_out_transport_packets_connects_and_orphan_attachments() {
        let masked = |opcode, payload: &[u8]| encode(opcode, payload, Some([3, 1, 4, 1]));
        let messages = vec![
            masked(OP_BINARY, b"\x01\x02"),
            masked(OP_TEXT, b"3"),
            masked(OP_TEXT, b"40"),
            masked(OP_TEXT, br#"451-["file",{"_placeholder":true,"num":0}]"#),
            masked(OP_BINARY, b"\x03"),
            masked(OP_TEXT, br#"42["chat","hi"]"#),
        ];
        let kept = replayable(messages.clone(), |m| m);
        assert_eq!(kept, messages[3..].to_vec());
    }
}
