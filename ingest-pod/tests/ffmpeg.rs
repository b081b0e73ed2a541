//! ffmpeg (an incapable publisher) through a real ingest pod to a real
//! nginx-rtmp origin: every audio/video message arrives exactly once.

use std::path::Path;
use std::time::Duration;

use clap::Parser;
use ingest_pod::config::Args;
use ingest_pod::server::Server;
use ingest_rtmp::flv;
use ingest_rtmp::media::{self, Kind};
use ingest_testkit::ffmpeg::TestStream;
use ingest_testkit::origin::Origin;

/// Audio/video payload hashes of an FLV file, without sequence headers.
fn media_hashes(path: &Path) -> Vec<String> {
    let tags = flv::read_tags(std::fs::File::open(path).expect("open flv")).expect("read flv");
    tags.iter()
        .filter_map(|t| {
            let kind = match t.tag_type {
                flv::TAG_AUDIO => Kind::Audio,
                flv::TAG_VIDEO => Kind::Video,
                _ => return None,
            };
            (!media::is_sequence_header(kind, &t.data)).then(|| media::payload_hash(&t.data))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffmpeg_stream_reaches_the_origin_whole() {
    ingest_runtime::init_logs(ingest_runtime::LogFormat::Text);
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(&dir.path().join("origin"), "127.0.0.1").expect("start nginx-rtmp");
    let template = origin.template();
    let record_dir = dir.path().join("pod-recordings");
    std::fs::create_dir_all(&record_dir).expect("record dir");
    let record_arg = record_dir.display().to_string();
    let args = Args::try_parse_from([
        "ingest-pod",
        "--rtmp-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--upstream",
        &template,
        "--grace-period",
        "5s",
        "--record-dir",
        &record_arg,
    ])
    .expect("args");
    let server = Server::bind(args).await.expect("bind");
    let rtmp = server.rtmp_addr();
    let registry = server.registry();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async move {
        let _ = stop_rx.await;
    }));

    let local = dir.path().join("sent.flv");
    let stream = TestStream {
        fps: 25,
        gop: 25,
        zerolatency: true,
        audio_bitrate: Some("64k"),
        ..TestStream::new(3)
    };
    let status = stream
        .command_with_copy(&format!("rtmp://{rtmp}/live/ffmpeg1"), &local)
        .status()
        .await
        .expect("run ffmpeg");
    assert!(status.success(), "ffmpeg failed: {status}");

    // Wait for the relay to flush and unpublish.
    for _ in 0..100 {
        if registry.connection_count() == 0 && registry.relays_active() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(registry.relays_active(), 0, "relay finished");
    assert_eq!(registry.totals().ended, 1, "ffmpeg counted as an unsignalled publisher");
    drop(origin); // nginx finishes its recording files
    let recordings: Vec<_> = std::fs::read_dir(dir.path().join("origin/rec"))
        .expect("rec dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(recordings.len(), 1, "one upstream publish session: {recordings:?}");
    let sent = media_hashes(&local);
    let received = media_hashes(&recordings[0]);
    assert!(sent.len() > 100, "ffmpeg sent {} messages", sent.len());
    assert_eq!(received, sent, "the origin got exactly what ffmpeg sent, in order");
    // The pod's own FLV recording of the publish session holds the same.
    let own: Vec<_> = std::fs::read_dir(&record_dir)
        .expect("pod recordings")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(own.len(), 1, "one file per publish session: {own:?}");
    assert!(
        own[0]
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("ffmpeg1-"))
    );
    assert_eq!(media_hashes(&own[0]), sent, "the pod's recording holds every message");

    let _ = stop_tx.send(());
    running.await.expect("join").expect("server");
}
