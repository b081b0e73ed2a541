//! Facts about FLV/RTMP media payloads the server needs: keyframes and
//! sequence headers, for legacy codec ids and Enhanced RTMP FourCC packets.

use sha2::{Digest, Sha256};

/// The kind of an audio or video message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Audio,
    Video,
}

/// True for a video message that starts a GOP (a keyframe, not a sequence header).
pub fn is_video_keyframe(payload: &[u8]) -> bool {
    let Some(&b0) = payload.first() else { return false };
    let frame_type = (b0 >> 4) & 0x07;
    frame_type == 1 && !is_video_sequence_header(payload)
}

/// True for a video codec configuration (AVC/HEVC sequence header or an
/// Enhanced RTMP SequenceStart), which is re-sent after every reconnect.
pub fn is_video_sequence_header(payload: &[u8]) -> bool {
    let Some(&b0) = payload.first() else { return false };
    if b0 & 0x80 != 0 {
        // Enhanced RTMP: the low nibble is the packet type, 0 = SequenceStart.
        return b0 & 0x0f == 0;
    }
    let codec = b0 & 0x0f;
    // AVC (7) and the de-facto HEVC (12) carry an AVCPacketType byte.
    matches!(codec, 7 | 12) && payload.get(1) == Some(&0)
}

/// True for an audio codec configuration (AAC AudioSpecificConfig or an
/// Enhanced RTMP audio SequenceStart).
pub fn is_audio_sequence_header(payload: &[u8]) -> bool {
    let Some(&b0) = payload.first() else { return false };
    let format = b0 >> 4;
    match format {
        10 => payload.get(1) == Some(&0),
        // Enhanced RTMP audio (ExAudioTagHeader): low nibble 0 = SequenceStart.
        9 => b0 & 0x0f == 0,
        _ => false,
    }
}

/// True for configuration that a new upstream session must receive before media.
pub fn is_sequence_header(kind: Kind, payload: &[u8]) -> bool {
    match kind {
        Kind::Audio => is_audio_sequence_header(payload),
        Kind::Video => is_video_sequence_header(payload),
    }
}

/// Hash that identifies a payload in loss accounting (first 16 bytes of SHA-256, hex).
pub fn payload_hash(payload: &[u8]) -> String {
    let digest = Sha256::digest(payload);
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_legacy_and_enhanced_payloads() {
        assert!(is_video_keyframe(&[0x17, 0x01, 0, 0, 0]));
        assert!(!is_video_keyframe(&[0x27, 0x01, 0, 0, 0]));
        assert!(is_video_sequence_header(&[0x17, 0x00, 0, 0, 0]));
        assert!(!is_video_keyframe(&[0x17, 0x00, 0, 0, 0]));
        // Enhanced RTMP: isExHeader | keyframe | CodedFrames ('hvc1').
        assert!(is_video_keyframe(&[0x91, b'h', b'v', b'c', b'1']));
        assert!(is_video_sequence_header(&[0x90, b'h', b'v', b'c', b'1']));
        assert!(is_audio_sequence_header(&[0xaf, 0x00, 0x12, 0x10]));
        assert!(!is_audio_sequence_header(&[0xaf, 0x01, 0x21]));
        assert!(!is_video_keyframe(&[]));
        assert_eq!(payload_hash(b"abc").len(), 32);
    }
}
