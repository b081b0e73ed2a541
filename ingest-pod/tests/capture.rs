//! The codec layers fed with bytes captured from a real encoder (ffmpeg 5.1).

use bytes::BytesMut;
use ingest_rtmp::amf0::Value;
use ingest_rtmp::chunk::ChunkReader;
use ingest_rtmp::handshake::{self, C0C1_SIZE, HANDSHAKE_SIZE};
use ingest_rtmp::media;
use ingest_rtmp::message::Message;

const CAPTURE: &[u8] = include_bytes!("data/ffmpeg-5.1-publish.bin");

/// Decodes the capture, feeding the reader `step` bytes at a time.
fn decode(step: usize) -> Vec<Message> {
    let mut reader = ChunkReader::default();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in CAPTURE[C0C1_SIZE + HANDSHAKE_SIZE..].chunks(step) {
        buf.extend_from_slice(piece);
        while let Some(raw) = reader.read(&mut buf).expect("valid chunk stream") {
            let msg = Message::decode(raw).expect("valid message");
            if let Message::SetChunkSize(n) = msg {
                reader.set_chunk_size(n).expect("chunk size");
            }
            out.push(msg);
        }
    }
    assert!(buf.is_empty(), "no trailing bytes");
    out
}

#[test]
fn ffmpeg_handshake_is_the_digest_variant_and_gets_a_plain_answer() {
    let c0c1 = &CAPTURE[..C0C1_SIZE];
    assert_eq!(c0c1[0], 3);
    assert_ne!(
        &c0c1[5..9],
        &[0, 0, 0, 0],
        "ffmpeg announces a version: the digest variant"
    );
    let answer = handshake::server_response(c0c1, 1, 2).expect("answered");
    assert_eq!(&answer[1 + HANDSHAKE_SIZE..][8..], &c0c1[9..], "S2 echoes C1");
    handshake::check_c2(&CAPTURE[C0C1_SIZE..C0C1_SIZE + HANDSHAKE_SIZE]).expect("C2");
}

#[test]
fn ffmpeg_publish_flow_decodes_the_same_in_any_split() {
    let whole = decode(CAPTURE.len());
    for step in [1, 7, 128, 4096] {
        assert_eq!(decode(step), whole, "split every {step} bytes");
    }
    let commands: Vec<&str> = whole
        .iter()
        .filter_map(|m| match m {
            Message::Command { command, .. } => Some(command.name.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        &commands[..5],
        &["connect", "releaseStream", "FCPublish", "createStream", "publish"]
    );
    let Some(Message::Command { command: connect, .. }) = whole.iter().find(|m| matches!(m, Message::Command { .. }))
    else {
        panic!("no connect")
    };
    let obj = connect.object().expect("command object");
    assert_eq!(obj.get("app").and_then(Value::as_str), Some("live"));
    assert!(
        obj.get("tcUrl")
            .and_then(Value::as_str)
            .is_some_and(|u| u.ends_with("/live"))
    );
    assert_eq!(obj.get("supportsGoAway"), None, "ffmpeg is an incapable publisher");
    assert!(whole.iter().any(|m| matches!(m, Message::SetChunkSize(4096))));

    let videos: Vec<_> = whole
        .iter()
        .filter_map(|m| {
            if let Message::Video { payload, timestamp, .. } = m {
                Some((payload, *timestamp))
            } else {
                None
            }
        })
        .collect();
    let audios = whole.iter().filter(|m| matches!(m, Message::Audio { .. })).count();
    assert!(
        media::is_video_sequence_header(videos[0].0),
        "AVC sequence header first"
    );
    // AVCPacketType 1 is a coded frame; ffmpeg ends with an end-of-sequence (2).
    let frames: Vec<_> = videos[1..].iter().filter(|(p, _)| p.get(1) == Some(&1)).collect();
    assert_eq!(frames.len(), 10, "10 frames at 10 fps for 1 s");
    assert_eq!(
        videos.last().and_then(|(p, _)| p.get(1)),
        Some(&2),
        "end of sequence last"
    );
    let keyframes = frames.iter().filter(|(p, _)| media::is_video_keyframe(p)).count();
    assert_eq!(keyframes, 2, "GOP of 5");
    assert!(
        frames.windows(2).all(|w| w[0].1 <= w[1].1),
        "video timestamps never go back"
    );
    assert!(audios > 15, "{audios} audio messages");
    assert!(
        whole
            .iter()
            .any(|m| matches!(m, Message::Data { payload, .. } if payload.windows(10).any(|w| w == b"onMetaData")))
    );
}
