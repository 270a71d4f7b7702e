//! IEC 62439-3 PRP-1 wire formats: the Redundancy Control Trailer (RCT) and supervision frames.
//!
//! Frames here are Ethernet frames without FCS, as TAP devices and packet sockets hand them over.
//!
//! The LSDU size in the RCT counts every byte after the Ethernet header (destination, source,
//! Length/Type, and the 802.1Q tag when there is one) up to and including the RCT. The VLAN tag is
//! left out so the value stays right when a bridge adds or strips the tag on the way. This is the
//! rule of Linux (`prp_fill_rct` and `prp_check_lsdu_size` in net/hsr) and the one Wireshark's
//! PRP dissector reports as `[correct]` (`length - offset`, offset 18 after a 0x8100 tag, else 14).
//! Only 0x8100 counts as a tag, as in both of those.

use serde::Serialize;
use thiserror::Error;

/// Bytes the trailer adds to a frame.
pub const RCT_LEN: usize = 6;
/// The PRP suffix closing every RCT, and the EtherType of supervision frames.
pub const PRP_SUFFIX: u16 = 0x88FB;
/// Destination, source and EtherType.
pub const ETH_HLEN: usize = 14;
/// The IEEE 802.1Q tag.
pub const VLAN_HLEN: usize = 4;
/// Smallest Ethernet frame without FCS.
pub const ETH_ZLEN: usize = 60;
/// Smallest 802.1Q-tagged frame without FCS: padding to this keeps the frame at least
/// [`ETH_ZLEN`] long when a bridge strips the tag, so no second padding pushes the RCT away from
/// the end.
pub const VLAN_ETH_ZLEN: usize = 64;
/// The LSDU size field is 12 bits wide.
pub const MAX_LSDU: usize = 0x0FFF;
/// Supervision frames go to 01:15:4E:00:01:XX; XX is configurable and 00 by default.
pub const SUPERVISION_DEST: [u8; 6] = [0x01, 0x15, 0x4E, 0x00, 0x01, 0x00];
/// LSDU size of a PRP-1 supervision frame (Linux `HSR_V1_SUP_LSDUSIZE`): the 60-byte minimum
/// frame plus the RCT, less the Ethernet header.
pub const SUPERVISION_LSDU: usize = ETH_ZLEN + RCT_LEN - ETH_HLEN;
/// SupVersion this implementation sends (PRP-1).
pub const SUP_VERSION: u16 = 1;

const ETH_P_8021Q: [u8; 2] = [0x81, 0x00];
const TLV_END: u8 = 0;
const TLV_DUPLICATE_DISCARD: u8 = 20;
const TLV_DUPLICATE_ACCEPT: u8 = 21;
const TLV_REDBOX: u8 = 30;
const TLV_VDAN: u8 = 31;

/// One of the two independent networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Lan {
    A,
    B,
}

impl Lan {
    /// The LanId nibble carried in the RCT.
    pub fn id(self) -> u8 {
        match self {
            Lan::A => 0xA,
            Lan::B => 0xB,
        }
    }

    /// The LAN a LanId nibble names; other values are not PRP.
    pub fn from_id(id: u8) -> Option<Lan> {
        match id {
            0xA => Some(Lan::A),
            0xB => Some(Lan::B),
            _ => None,
        }
    }

    /// 0 for A, 1 for B: an index into per-LAN arrays.
    pub fn index(self) -> usize {
        match self {
            Lan::A => 0,
            Lan::B => 1,
        }
    }

    pub fn other(self) -> Lan {
        match self {
            Lan::A => Lan::B,
            Lan::B => Lan::A,
        }
    }
}

/// Why a frame cannot carry a trailer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PrpError {
    #[error("frame of {len} bytes is shorter than an Ethernet header")]
    Runt { len: usize },
    #[error("frame would be {len} bytes with the PRP trailer, more than the {max} allowed")]
    TooLarge { len: usize, max: usize },
    #[error("LSDU size {lsdu} does not fit the trailer's 12-bit field")]
    LsduTooLarge { lsdu: usize },
}

/// A decoded Redundancy Control Trailer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rct {
    pub seq: u16,
    pub lan: Lan,
    pub lsdu: u16,
}

fn is_vlan(frame: &[u8]) -> bool {
    frame.get(12..14) == Some(&ETH_P_8021Q[..])
}

fn be16(frame: &[u8], at: usize) -> Option<u16> {
    let b = frame.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

fn rct_bytes(seq: u16, lan: Lan, lsdu: usize) -> [u8; RCT_LEN] {
    let s = seq.to_be_bytes();
    let w = ((u16::from(lan.id()) << 12) | (lsdu & MAX_LSDU) as u16).to_be_bytes();
    let p = PRP_SUFFIX.to_be_bytes();
    [s[0], s[1], w[0], w[1], p[0], p[1]]
}

/// Length of `frame` once padded and trailed, or why it cannot be.
pub fn trailed_len(frame: &[u8]) -> Result<usize, PrpError> {
    let len = frame.len();
    if len < ETH_HLEN {
        return Err(PrpError::Runt { len });
    }
    let (hdr, min) = if is_vlan(frame) {
        (ETH_HLEN + VLAN_HLEN, VLAN_ETH_ZLEN)
    } else {
        (ETH_HLEN, ETH_ZLEN)
    };
    let total = len.max(min) + RCT_LEN;
    let lsdu = total - hdr;
    if lsdu > MAX_LSDU {
        return Err(PrpError::LsduTooLarge { lsdu });
    }
    Ok(total)
}

/// Pads `frame` to the minimum size and appends the RCT, unless the result would exceed
/// `max_len` or not fit the trailer; on error the frame is left as it was.
pub fn add_trailer(
    frame: &mut Vec<u8>,
    seq: u16,
    lan: Lan,
    max_len: usize,
) -> Result<(), PrpError> {
    let total = trailed_len(frame)?;
    if total > max_len {
        return Err(PrpError::TooLarge {
            len: total,
            max: max_len,
        });
    }
    let hdr = if is_vlan(frame) {
        ETH_HLEN + VLAN_HLEN
    } else {
        ETH_HLEN
    };
    frame.resize(total - RCT_LEN, 0);
    frame.extend_from_slice(&rct_bytes(seq, lan, total - hdr));
    Ok(())
}

/// Writes `frame`, padded and trailed, to the start of `out` (a path's transmit buffer, say) and
/// returns its length; `out` must hold all of it.
pub fn write_trailed(frame: &[u8], seq: u16, lan: Lan, out: &mut [u8]) -> Result<usize, PrpError> {
    let total = trailed_len(frame)?;
    let Some(dst) = out.get_mut(..total) else {
        return Err(PrpError::TooLarge {
            len: total,
            max: out.len(),
        });
    };
    let hdr = if is_vlan(frame) {
        ETH_HLEN + VLAN_HLEN
    } else {
        ETH_HLEN
    };
    let body = total - RCT_LEN;
    dst[..frame.len()].copy_from_slice(frame);
    dst[frame.len()..body].fill(0);
    dst[body..].copy_from_slice(&rct_bytes(seq, lan, total - hdr));
    Ok(total)
}

/// Rewrites the LanId of a frame that already carries a valid RCT (to turn the LAN A copy into the
/// LAN B one without building it again). Returns false, changing nothing, for any other frame.
pub fn set_lan(frame: &mut [u8], lan: Lan) -> bool {
    if parse_trailer(frame).is_none() {
        return false;
    }
    let at = frame.len() - 4;
    frame[at] = (frame[at] & 0x0F) | (lan.id() << 4);
    true
}

/// The frame's RCT, if it has a valid one: the PRP suffix at the very end, LanId A or B, and an
/// LSDU size equal to the frame's own. The size check is what keeps a non-PRP frame whose last
/// two bytes happen to be 0x88FB from being taken for PRP and deduplicated away.
pub fn parse_trailer(frame: &[u8]) -> Option<Rct> {
    let len = frame.len();
    if len < ETH_HLEN + RCT_LEN {
        return None;
    }
    if be16(frame, len - 2)? != PRP_SUFFIX {
        return None;
    }
    let word = be16(frame, len - 4)?;
    let lan = Lan::from_id((word >> 12) as u8)?;
    let lsdu = word & MAX_LSDU as u16;
    let hdr = if is_vlan(frame) {
        ETH_HLEN + VLAN_HLEN
    } else {
        ETH_HLEN
    };
    if len.checked_sub(hdr)? != usize::from(lsdu) {
        return None;
    }
    Some(Rct {
        seq: be16(frame, len - RCT_LEN)?,
        lan,
        lsdu,
    })
}

/// The frame without its RCT, if it has a valid one. Padding added before the trailer stays: it is
/// what any NIC would have added to a short frame anyway.
pub fn strip(frame: &[u8]) -> Option<&[u8]> {
    parse_trailer(frame)?;
    frame.get(..frame.len() - RCT_LEN)
}

/// What a supervision frame says its sender does with duplicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeKind {
    /// TLV type 20: the usual PRP node.
    DuplicateDiscard,
    /// TLV type 21: a node that passes both copies up (test mode).
    DuplicateAccept,
}

/// A decoded PRP supervision frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Supervision {
    /// Ethernet source address.
    pub src: [u8; 6],
    /// Last byte of the destination (01:15:4E:00:01:XX).
    pub dest_last: u8,
    pub version: u16,
    /// Absent in SupVersion 0 frames.
    pub sup_seq: Option<u16>,
    pub kind: NodeKind,
    /// The node's MAC address (MacAddressA for the two-address SupVersion 0 form).
    pub node_mac: [u8; 6],
    pub redbox_mac: Option<[u8; 6]>,
    pub vdan_mac: Option<[u8; 6]>,
}

fn mac_at(frame: &[u8], at: usize) -> Option<[u8; 6]> {
    frame.get(at..at.checked_add(6)?)?.try_into().ok()
}

/// Builds a PRP-1 supervision frame from `node_mac`: SupPath 0, SupVersion 1, SupSequenceNumber
/// `sup_seq`, TLV 20 (duplicate discard) with the node's MAC, the end TLV, padding to 60 bytes
/// and the RCT with `seq` and `lan`. Supervision frames draw `seq` from the same counter as data
/// frames, since receivers run them through duplicate discard too.
pub fn build_supervision(node_mac: [u8; 6], sup_seq: u16, seq: u16, lan: Lan) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_ZLEN + RCT_LEN);
    f.extend_from_slice(&SUPERVISION_DEST);
    f.extend_from_slice(&node_mac);
    f.extend_from_slice(&PRP_SUFFIX.to_be_bytes());
    f.extend_from_slice(&SUP_VERSION.to_be_bytes());
    f.extend_from_slice(&sup_seq.to_be_bytes());
    f.extend_from_slice(&[TLV_DUPLICATE_DISCARD, 6]);
    f.extend_from_slice(&node_mac);
    f.extend_from_slice(&[TLV_END, 0]);
    f.resize(ETH_ZLEN, 0);
    f.extend_from_slice(&rct_bytes(seq, lan, SUPERVISION_LSDU));
    f
}

/// Decodes a PRP supervision frame, with or without its RCT, tagged or not. Returns None for
/// anything else, including HSR supervision (TLV 23) and frames too short for what they announce.
pub fn parse_supervision(frame: &[u8]) -> Option<Supervision> {
    // TLVs end at the end TLV, but a sender that leaves it out would have its RCT read as TLVs.
    let frame = strip(frame).unwrap_or(frame);
    if frame.get(..5)? != &SUPERVISION_DEST[..5] {
        return None;
    }
    let dest_last = *frame.get(5)?;
    let mut off = if is_vlan(frame) {
        ETH_HLEN + VLAN_HLEN
    } else {
        ETH_HLEN
    };
    if be16(frame, off - 2)? != PRP_SUFFIX {
        return None;
    }
    let version = be16(frame, off)? & 0x0FFF;
    off += 2;
    let sup_seq = if version > 0 {
        let s = be16(frame, off)?;
        off += 2;
        Some(s)
    } else {
        None
    };
    let mut node: Option<(NodeKind, [u8; 6])> = None;
    let mut redbox_mac = None;
    let mut vdan_mac = None;
    while let (Some(&ty), Some(&len)) = (frame.get(off), frame.get(off + 1)) {
        let len = usize::from(len);
        off += 2;
        if ty == TLV_END {
            break;
        }
        let Some(value) = frame.get(off..off + len) else {
            break;
        };
        match (ty, len) {
            (TLV_DUPLICATE_DISCARD | TLV_DUPLICATE_ACCEPT, 6 | 12) if node.is_none() => {
                let kind = if ty == TLV_DUPLICATE_DISCARD {
                    NodeKind::DuplicateDiscard
                } else {
                    NodeKind::DuplicateAccept
                };
                node = Some((kind, mac_at(value, 0)?));
            }
            (TLV_REDBOX, 6) => redbox_mac = mac_at(value, 0),
            (TLV_VDAN, 6) => vdan_mac = mac_at(value, 0),
            _ => {}
        }
        off += len;
    }
    let (kind, node_mac) = node?;
    Some(Supervision {
        src: mac_at(frame, 6)?,
        dest_last,
        version,
        sup_seq,
        kind,
        node_mac,
        redbox_mac,
        vdan_mac,
    })
}

/// True for frames addressed like supervision frames (01:15:4E:00:01:XX, EtherType 0x88FB), even
/// ones whose TLVs this implementation does not understand: such frames are for the redundancy
/// layer, never for the host.
pub fn is_supervision_addressed(frame: &[u8]) -> bool {
    let frame = strip(frame).unwrap_or(frame);
    let Some(dest) = frame.get(..5) else {
        return false;
    };
    let off = if is_vlan(frame) {
        ETH_HLEN + VLAN_HLEN
    } else {
        ETH_HLEN
    };
    dest == &SUPERVISION_DEST[..5] && be16(frame, off - 2) == Some(PRP_SUFFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize, fill: u8) -> Vec<u8> {
        let mut f = vec![fill; len];
        if len >= 14 {
            f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
            f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
            f[12..14].copy_from_slice(&[0x08, 0x00]);
        }
        f
    }

    fn vlan_frame(len: usize) -> Vec<u8> {
        let mut f = frame(len, 0x55);
        f[12..14].copy_from_slice(&[0x81, 0x00]);
        if len >= 18 {
            f[14..16].copy_from_slice(&[0x00, 0x64]);
            f[16..18].copy_from_slice(&[0x08, 0x00]);
        }
        f
    }

    /// Wireshark's PRP-1 check (packet-prp.c): "[correct]" when the size equals `length - offset`.
    fn wireshark_correct(f: &[u8]) -> bool {
        let offset = if u16::from_be_bytes([f[12], f[13]]) == 0x8100 {
            18
        } else {
            14
        };
        let lsdu = (u16::from_be_bytes([f[f.len() - 4], f[f.len() - 3]]) & 0x0FFF) as usize;
        lsdu == f.len() - offset
    }

    #[test]
    fn short_frames_are_padded_before_the_trailer() {
        for len in [14, 42, 59, 60] {
            let mut f = frame(len, 0xEE);
            add_trailer(&mut f, 7, Lan::A, 1518).unwrap();
            assert_eq!(f.len(), 66, "len {len}");
            assert_eq!(&f[60..], &[0x00, 0x07, 0xA0, 52, 0x88, 0xFB]);
            assert!(f[len..60].iter().all(|&b| b == 0), "padding is zeros");
            assert_eq!(&f[..len], &frame(len, 0xEE)[..]);
            assert!(wireshark_correct(&f));
        }
        let mut f = frame(61, 1);
        add_trailer(&mut f, 0xBEEF, Lan::B, 1518).unwrap();
        assert_eq!(f.len(), 67);
        assert_eq!(&f[61..], &[0xBE, 0xEF, 0xB0, 53, 0x88, 0xFB]);
    }

    #[test]
    fn lsdu_sizes_untagged_long_and_vlan() {
        let mut f = frame(1514, 3);
        add_trailer(&mut f, 1, Lan::A, 1520).unwrap();
        assert_eq!(parse_trailer(&f).unwrap().lsdu, 1506);

        // A short tagged frame pads to 64 and its tag is not counted.
        let mut v = vlan_frame(30);
        add_trailer(&mut v, 2, Lan::B, 1522).unwrap();
        assert_eq!(v.len(), 70);
        assert_eq!(parse_trailer(&v).unwrap().lsdu, 52);
        assert!(wireshark_correct(&v));

        let mut v = vlan_frame(100);
        add_trailer(&mut v, 3, Lan::A, 1522).unwrap();
        assert_eq!(v.len(), 106);
        assert_eq!(parse_trailer(&v).unwrap().lsdu, 88);
        assert!(wireshark_correct(&v));

        // Stripping the tag (as a bridge would) leaves the size right.
        let mut untagged = v[..12].to_vec();
        untagged.extend_from_slice(&v[16..]);
        let r = parse_trailer(&untagged).unwrap();
        assert_eq!((r.seq, r.lan, r.lsdu), (3, Lan::A, 88));
    }

    #[test]
    fn largest_lsdu_fits_and_one_more_does_not() {
        let mut f = frame(ETH_HLEN + MAX_LSDU - RCT_LEN, 0);
        add_trailer(&mut f, 0, Lan::A, usize::MAX).unwrap();
        assert_eq!(parse_trailer(&f).unwrap().lsdu as usize, MAX_LSDU);
        let mut g = frame(ETH_HLEN + MAX_LSDU - RCT_LEN + 1, 0);
        let before = g.clone();
        assert_eq!(
            add_trailer(&mut g, 0, Lan::A, usize::MAX),
            Err(PrpError::LsduTooLarge { lsdu: MAX_LSDU + 1 })
        );
        assert_eq!(g, before);
    }

    #[test]
    fn errors_leave_the_frame_alone() {
        let mut f = frame(1514, 9);
        let before = f.clone();
        assert_eq!(
            add_trailer(&mut f, 0, Lan::A, 1518),
            Err(PrpError::TooLarge {
                len: 1520,
                max: 1518
            })
        );
        assert_eq!(f, before);
        for len in 0..ETH_HLEN {
            let mut r = frame(len, 1);
            assert_eq!(
                add_trailer(&mut r, 0, Lan::A, 100),
                Err(PrpError::Runt { len })
            );
            assert_eq!(r.len(), len);
            let mut out = [0u8; 100];
            assert_eq!(
                write_trailed(&r, 0, Lan::A, &mut out),
                Err(PrpError::Runt { len })
            );
        }
        let mut small = [0u8; 65];
        assert_eq!(
            write_trailed(&frame(20, 1), 0, Lan::A, &mut small),
            Err(PrpError::TooLarge { len: 66, max: 65 })
        );
    }

    #[test]
    fn write_trailed_matches_add_trailer() {
        for len in [14, 20, 60, 61, 64, 100, 1514] {
            for f in [frame(len, 0x77), vlan_frame(len)] {
                let mut v = f.clone();
                add_trailer(&mut v, 0x1234, Lan::B, usize::MAX).unwrap();
                let mut out = vec![0xFFu8; 2000];
                let n = write_trailed(&f, 0x1234, Lan::B, &mut out).unwrap();
                assert_eq!(&out[..n], &v[..]);
            }
        }
    }

    #[test]
    fn round_trip_and_strip() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..2000 {
            let len = 14 + (next() % 1600) as usize;
            let mut f: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if next() % 3 == 0 {
                f[12..14].copy_from_slice(&[0x81, 0x00]);
            } else if f[12..14] == [0x81, 0x00] {
                f[12] = 0x08;
            }
            let seq = next() as u16;
            let lan = if next() & 1 == 0 { Lan::A } else { Lan::B };
            let orig = f.clone();
            add_trailer(&mut f, seq, lan, usize::MAX).unwrap();
            let r = parse_trailer(&f).unwrap();
            assert_eq!((r.seq, r.lan), (seq, lan));
            assert!(wireshark_correct(&f));
            let s = strip(&f).unwrap();
            assert_eq!(&s[..len], &orig[..]);
            assert!(s[len..].iter().all(|&b| b == 0));
            let mut g = f.clone();
            assert!(set_lan(&mut g, lan.other()));
            assert_eq!(
                parse_trailer(&g).unwrap(),
                Rct {
                    lan: lan.other(),
                    ..r
                }
            );
        }
    }

    #[test]
    fn non_prp_frames_ending_in_the_suffix_are_not_prp() {
        // Ends in 0x88FB with LanId A but a size that does not match the frame's.
        let mut f = frame(100, 0);
        f[94..].copy_from_slice(&[0x00, 0x01, 0xA0, 16, 0x88, 0xFB]);
        assert_eq!(parse_trailer(&f), None);
        assert_eq!(strip(&f), None);
        assert!(!set_lan(&mut f, Lan::B));
        // Right size, but LanId is neither A nor B.
        f[96] = 0x50;
        f[97] = 86;
        assert_eq!(parse_trailer(&f), None);
        f[96] = 0xA0;
        assert_eq!(parse_trailer(&f).unwrap().lsdu, 86);
        // Size right for an untagged frame, but this one is tagged.
        let mut v = vlan_frame(100);
        v[94..].copy_from_slice(&[0x00, 0x01, 0xA0, 86, 0x88, 0xFB]);
        assert_eq!(parse_trailer(&v), None);

        // Random frames forced to end in the suffix: recognised only when the size matches.
        let mut state = 0x1234_5678_9ABC_DEF1u64;
        let mut hits = 0;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 200) as usize;
            let mut f: Vec<u8> = (0..len).map(|i| (state >> (i % 56)) as u8).collect();
            if len >= 2 {
                f[len - 2..].copy_from_slice(&[0x88, 0xFB]);
            }
            if let Some(r) = parse_trailer(&f) {
                hits += 1;
                assert!(wireshark_correct(&f));
                assert!(matches!(f[len - 4] >> 4, 0xA | 0xB));
                assert_eq!(r.lsdu as usize, len - if is_vlan(&f) { 18 } else { 14 });
            }
        }
        assert!(hits < 200, "{hits} random frames taken for PRP");
    }

    #[test]
    fn nothing_panics_on_tiny_or_odd_frames() {
        for len in 0..80 {
            for fill in [0x00, 0x81, 0x88, 0xFB, 0xFF] {
                let mut f = vec![fill; len];
                let _ = parse_trailer(&f);
                let _ = strip(&f);
                let _ = parse_supervision(&f);
                let _ = is_supervision_addressed(&f);
                let _ = set_lan(&mut f, Lan::A);
                let _ = trailed_len(&f);
                if len >= 14 {
                    f[12..14].copy_from_slice(&[0x81, 0x00]);
                    let _ = parse_trailer(&f);
                    let _ = parse_supervision(&f);
                    let mut g = f.clone();
                    add_trailer(&mut g, 1, Lan::B, usize::MAX).unwrap();
                    assert!(parse_trailer(&g).is_some());
                }
                if len >= 5 {
                    f[..5].copy_from_slice(&SUPERVISION_DEST[..5]);
                    let _ = parse_supervision(&f);
                    let _ = is_supervision_addressed(&f);
                }
            }
        }
    }

    #[test]
    fn supervision_layout_matches_linux_and_wireshark() {
        let mac = [0x02, 0xAA, 0xBB, 0xCC, 0xDD, 0xEE];
        let f = build_supervision(mac, 0x0102, 0x0304, Lan::B);
        assert_eq!(f.len(), 66);
        assert_eq!(&f[..6], &SUPERVISION_DEST);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x88, 0xFB]);
        assert_eq!(&f[14..16], &[0x00, 0x01], "SupPath 0, SupVersion 1");
        assert_eq!(&f[16..18], &[0x01, 0x02]);
        assert_eq!(&f[18..20], &[20, 6]);
        assert_eq!(&f[20..26], &mac);
        assert_eq!(&f[26..28], &[0, 0], "end TLV");
        assert!(f[28..60].iter().all(|&b| b == 0));
        let r = parse_trailer(&f).unwrap();
        assert_eq!(
            (r.seq, r.lan, r.lsdu as usize),
            (0x0304, Lan::B, SUPERVISION_LSDU)
        );
        assert_eq!(SUPERVISION_LSDU, 52);
        assert!(wireshark_correct(&f));

        let s = parse_supervision(&f).unwrap();
        assert_eq!(
            s,
            Supervision {
                src: mac,
                dest_last: 0,
                version: 1,
                sup_seq: Some(0x0102),
                kind: NodeKind::DuplicateDiscard,
                node_mac: mac,
                redbox_mac: None,
                vdan_mac: None,
            }
        );
        assert_eq!(parse_supervision(strip(&f).unwrap()), Some(s));
        assert!(is_supervision_addressed(&f));
    }

    #[test]
    fn supervision_parsing_variants() {
        let mac = [0x02, 1, 2, 3, 4, 5];
        let rb = [0x02, 9, 9, 9, 9, 9];
        // A RedBox announcing a node behind it, to destination ...:01:07, no RCT.
        let mut f = SUPERVISION_DEST.to_vec();
        f[5] = 7;
        f.extend_from_slice(&rb);
        f.extend_from_slice(&[0x88, 0xFB, 0x00, 0x01, 0x00, 0x09, 21, 6]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[30, 6]);
        f.extend_from_slice(&rb);
        f.extend_from_slice(&[0, 0]);
        f.resize(60, 0);
        let s = parse_supervision(&f).unwrap();
        assert_eq!(
            (s.dest_last, s.kind, s.node_mac, s.redbox_mac),
            (7, NodeKind::DuplicateAccept, mac, Some(rb))
        );
        assert_eq!(s.sup_seq, Some(9));

        // SupVersion 0: no sequence number, MacAddressA and MacAddressB.
        let mut g = SUPERVISION_DEST.to_vec();
        g.extend_from_slice(&mac);
        g.extend_from_slice(&[0x88, 0xFB, 0x00, 0x00, 20, 12]);
        g.extend_from_slice(&mac);
        g.extend_from_slice(&rb);
        g.resize(60, 0);
        let s = parse_supervision(&g).unwrap();
        assert_eq!((s.version, s.sup_seq, s.node_mac), (0, None, mac));

        // Tagged.
        let mut t = build_supervision(mac, 1, 1, Lan::A)[..12].to_vec();
        t.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
        t.extend_from_slice(&build_supervision(mac, 1, 1, Lan::A)[12..60]);
        assert_eq!(parse_supervision(&t).unwrap().node_mac, mac);

        // HSR (TLV 23), wrong EtherType, wrong address, truncated TLV: not PRP supervision.
        let good = build_supervision(mac, 1, 1, Lan::A);
        let mut h = good.clone();
        h[18] = 23;
        assert_eq!(parse_supervision(&h), None);
        let mut e = good.clone();
        e[13] = 0xFC;
        assert_eq!(parse_supervision(&e), None);
        assert!(!is_supervision_addressed(&e));
        let mut d = good.clone();
        d[3] = 1;
        assert_eq!(parse_supervision(&d), None);
        assert_eq!(parse_supervision(&good[..24]), None);
    }
}
