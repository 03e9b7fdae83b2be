//! The relay's frame reader over bytes from a client or a backend: never
//! panics; every unit it returns spans whole frames of what was fed and is
//! handed over unchanged; feeding the same bytes in one piece or cut into
//! pieces finds the same units (the reader is fed after every read, at any
//! boundary); a violation stays where it was when asked again; a message's
//! payload count is the sum of its data frames' payloads; and every text
//! message accepted from a client is valid UTF-8 by the standard library
//! (an oracle independent of the reader's incremental check). Read the
//! relay's way (each piece scanned where it lies, runs of common-case
//! messages walked by `plain_run` before `next_unit`), the same stream gives
//! the same messages, the same other units and the same violation.
//!
//! Input: a flag byte (bit 0: a client's masked frames, else a backend's;
//! the rest: a size limit), a cut byte (piece size when fed in pieces, 1 to
//! 256), then the stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsrouter::wire::frame::{FrameReader, Unit, Violation, apply_mask, parse_header};

/// Units found until the first violation (if any), with their bytes.
fn read_all(masked: bool, max: usize, stream: &[u8], piece: usize) -> (Vec<(Unit, Vec<u8>)>, Option<Violation>) {
    let mut reader = if masked {
        FrameReader::client(max, Vec::new())
    } else {
        FrameReader::backend(max, Vec::new())
    };
    let mut units = Vec::new();
    for chunk in stream.chunks(piece.max(1)) {
        reader.buffer_mut().extend_from_slice(chunk);
        loop {
            let before = reader.buffered();
            match reader.next_unit() {
                Ok(Some(unit)) => {
                    assert!(!unit.is_empty() && unit.len() <= before, "{unit:?} of {before} bytes");
                    let bytes = reader.take(unit.len()).to_vec();
                    assert_eq!(reader.buffered(), before - unit.len());
                    units.push((unit, bytes));
                }
                Ok(None) => break,
                Err(violation) => {
                    // Asked again, the same answer: the reader did not move.
                    assert_eq!(reader.next_unit(), Err(violation));
                    assert_eq!(reader.buffered(), before);
                    return (units, Some(violation));
                }
            }
        }
    }
    (units, None)
}

/// What the relay's way of reading found: messages, their payload bytes,
/// the bytes of all units, the other units in order, and the violation.
type RelayView = (usize, usize, usize, Vec<Unit>, Option<Violation>);

/// Each piece handed to `scan_fresh` as the relay does, runs of plain
/// messages first.
fn relay_way(masked: bool, max: usize, stream: &[u8], piece: usize) -> RelayView {
    let mut reader = if masked {
        FrameReader::client(max, Vec::new())
    } else {
        FrameReader::backend(max, Vec::new())
    };
    let mut seen: RelayView = (0, 0, 0, Vec::new(), None);
    let mut fed = 0;
    for chunk in stream.chunks(piece.max(1)) {
        fed += chunk.len();
        let stopped = reader.scan_fresh(chunk, |data, scan, _| {
            let mut used = 0;
            loop {
                let run = scan.plain_run(data, |_| true);
                used += run.len;
                seen.0 += run.messages;
                seen.1 += run.payload;
                match scan.next_unit(data) {
                    Ok(Some(Unit::Message { len, payload })) => {
                        used += len;
                        seen.0 += 1;
                        seen.1 += payload;
                    }
                    Ok(Some(unit)) => {
                        used += unit.len();
                        seen.3.push(unit);
                    }
                    Ok(None) => return (used, false),
                    Err(violation) => {
                        seen.4 = Some(violation);
                        return (used, true);
                    }
                }
            }
        });
        // What was read and not kept was handed on, whole units only.
        seen.2 = fed - reader.buffered();
        if stopped {
            break;
        }
    }
    seen
}

/// The same figures from the units `read_all` found.
fn as_relay_view((units, violation): &(Vec<(Unit, Vec<u8>)>, Option<Violation>)) -> RelayView {
    let mut view: RelayView = (0, 0, 0, Vec::new(), *violation);
    for (unit, bytes) in units {
        view.2 += bytes.len();
        match unit {
            Unit::Message { payload, .. } => {
                view.0 += 1;
                view.1 += payload;
            }
            other => view.3.push(other.clone()),
        }
    }
    view
}

fuzz_target!(|data: &[u8]| {
    let [flags, cut, stream @ ..] = data else {
        return;
    };
    let masked = flags & 1 == 1;
    let max = 125 + ((*flags as usize) >> 1) * 64;
    let whole = read_all(masked, max, stream, stream.len());
    let cut_up = read_all(masked, max, stream, *cut as usize + 1);
    assert_eq!(whole, cut_up, "fed whole and in pieces of {}", *cut as usize + 1);
    let expected = as_relay_view(&whole);
    assert_eq!(relay_way(masked, max, stream, stream.len()), expected, "the relay's way, whole");
    assert_eq!(relay_way(masked, max, stream, *cut as usize + 1), expected, "the relay's way, in pieces");

    // Units are consecutive slices of the stream, frame by frame.
    let mut offset = 0;
    for (unit, bytes) in &whole.0 {
        assert_eq!(&stream[offset..offset + bytes.len()], &bytes[..]);
        offset += bytes.len();
        let mut at = 0;
        let mut data_payload = 0;
        let mut text = None;
        let mut content = Vec::new();
        while at < bytes.len() {
            let header = parse_header(&bytes[at..], masked, usize::MAX)
                .expect("a returned unit parses")
                .expect("a returned unit holds whole frames");
            if header.opcode < 8 {
                data_payload += header.payload_len;
                text.get_or_insert(header.opcode == 1);
                let mut payload = bytes[at + header.header_len..at + header.frame_len()].to_vec();
                if let Some(key) = header.mask {
                    apply_mask(&mut payload, key, 0);
                }
                content.extend_from_slice(&payload);
            }
            at += header.frame_len();
        }
        // (A close inside a fragmented message is returned with the
        // unfinished fragments, which are dropped: only messages count.)
        if masked && text == Some(true) && matches!(unit, Unit::Message { .. }) {
            assert!(std::str::from_utf8(&content).is_ok(), "accepted text is not UTF-8: {content:x?}");
        }
        assert_eq!(at, bytes.len(), "a unit ends on a frame boundary");
        if let Unit::Message { payload, .. } = unit {
            assert_eq!(*payload, data_payload);
        }
    }
});
