//! Bad input from the network: a clear error, a closed connection, and a
//! pod that goes on serving.

use std::time::Duration;

use bytes::BytesMut;
use ingest_rtmp::chunk::{ChunkWriter, RawMessage};
use ingest_rtmp::handshake;
use ingest_testkit::lab::LocalPod;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn handshaken(pod: &LocalPod) -> TcpStream {
    let mut s = TcpStream::connect(pod.rtmp).await.expect("connect");
    s.write_all(&handshake::client_hello(0, 9)).await.expect("C0C1");
    let mut resp = vec![0u8; handshake::S0S1S2_SIZE];
    s.read_exact(&mut resp).await.expect("S0S1S2");
    s.write_all(&handshake::client_ack(&resp).expect("ack"))
        .await
        .expect("C2");
    s
}

/// Reads until the pod closes the connection; panics if it does not within 5 s.
async fn closed_by_pod(mut s: TcpStream) {
    let mut buf = vec![0u8; 65536];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the pod kept the connection open");
}

fn chunks(msgs: &[RawMessage]) -> BytesMut {
    let mut w = ChunkWriter::default();
    let mut out = BytesMut::new();
    for m in msgs {
        w.write(m, &mut out);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_are_closed_and_the_pod_survives() {
    let pod = LocalPod::start("hostile", &["--handshake-timeout", "1s", "--idle-timeout", "1s"])
        .await
        .expect("pod");

    // RTMPE (version 6) is refused at the handshake.
    let mut s = TcpStream::connect(pod.rtmp).await.expect("connect");
    let mut hello = handshake::client_hello(0, 1);
    hello[0] = 6;
    s.write_all(&hello).await.expect("write");
    closed_by_pod(s).await;

    // A handshake that never finishes times out.
    let mut s = TcpStream::connect(pod.rtmp).await.expect("connect");
    s.write_all(&[3, 0, 0]).await.expect("write");
    closed_by_pod(s).await;

    // Too many chunk streams.
    let mut s = handshaken(&pod).await;
    let many: Vec<RawMessage> = (3..200)
        .map(|csid| RawMessage {
            csid,
            timestamp: 0,
            type_id: 9,
            stream_id: 1,
            payload: vec![0u8; 300].into(),
        })
        .map(|mut m| {
            // Only the first chunk of each: every chunk stream stays open.
            m.payload.truncate(300);
            m
        })
        .collect();
    let bytes = chunks(&many);
    let _ = s.write_all(&bytes).await;
    closed_by_pod(s).await;

    // A command nested 1000 objects deep.
    let mut s = handshaken(&pod).await;
    let mut body = vec![0x02, 0, 7];
    body.extend_from_slice(b"connect");
    body.extend_from_slice(&[0, 0x3f, 0xf0, 0, 0, 0, 0, 0, 0]);
    for _ in 0..1000 {
        body.extend_from_slice(&[0x03, 0, 1, b'a']);
    }
    let cmd = RawMessage {
        csid: 3,
        timestamp: 0,
        type_id: 20,
        stream_id: 0,
        payload: body.into(),
    };
    let _ = s.write_all(&chunks(&[cmd])).await;
    closed_by_pod(s).await;

    // A format-3 chunk on a chunk stream that never had a header.
    let mut s = handshaken(&pod).await;
    let _ = s.write_all(&[0xc7, 1, 2, 3]).await;
    closed_by_pod(s).await;

    // A silent client hits the idle timeout.
    let s = handshaken(&pod).await;
    closed_by_pod(s).await;

    // An invalid Set Chunk Size (0).
    let mut s = handshaken(&pod).await;
    let scs = RawMessage {
        csid: 2,
        timestamp: 0,
        type_id: 1,
        stream_id: 0,
        payload: vec![0, 0, 0, 0].into(),
    };
    let _ = s.write_all(&chunks(&[scs])).await;
    closed_by_pod(s).await;

    // Random bytes after the handshake.
    let mut s = handshaken(&pod).await;
    let mut x = 0x1234_5678u32;
    let noise: Vec<u8> = (0..100_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let _ = s.write_all(&noise).await;
    closed_by_pod(s).await;

    // Still serving, nothing left behind.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(pod.registry.connection_count(), 0);
    assert!(pod.registry.serving());
    let s = handshaken(&pod).await;
    drop(s);
}
