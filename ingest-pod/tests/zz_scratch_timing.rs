// Scratch timing of an upstream publish to nginx-rtmp (deleted after use).
use ingest_pod::origin::Origin;
use ingest_pod::rtmp::amf0::Value;
use ingest_pod::rtmp::conn::{self, OUTGOING_CHUNK_SIZE};
use ingest_pod::rtmp::message::Message;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timing() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start(dir.path(), "127.0.0.1").unwrap();
    for quick in [false, false, false] {
        let t = Instant::now();
        let tcp = tokio::net::TcpStream::connect(origin.addr()).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let t_tcp = t.elapsed();
        let (mut r, mut w) = conn::connect(tcp, Duration::from_secs(5)).await.unwrap();
        let t_hs = t.elapsed();
        w.queue(&Message::SetChunkSize(OUTGOING_CHUNK_SIZE));
        w.queue(&Message::command(
            0,
            "connect",
            1.0,
            vec![Value::object([
                ("app", Value::string("live")),
                ("type", Value::string("nonprivate")),
                ("tcUrl", Value::string(format!("rtmp://{}/live", origin.addr()))),
            ])],
        ));
        w.flush().await.unwrap();
        let mut log = vec![];
        loop {
            let m = r.next().await.unwrap().unwrap();
            log.push((t.elapsed(), format!("{:?}", m).chars().take(60).collect::<String>()));
            if matches!(&m, Message::Command{command, ..} if command.name == "_result") {
                break;
            }
        }
        w.queue(&Message::command(
            0,
            "releaseStream",
            2.0,
            vec![Value::Null, Value::string("s")],
        ));
        w.queue(&Message::command(
            0,
            "FCPublish",
            3.0,
            vec![Value::Null, Value::string("s")],
        ));
        w.queue(&Message::command(0, "createStream", 4.0, vec![Value::Null]));
        w.flush().await.unwrap();
        loop {
            let m = r.next().await.unwrap().unwrap();
            log.push((t.elapsed(), format!("{:?}", m).chars().take(60).collect::<String>()));
            if matches!(&m, Message::Command{command, ..} if command.name == "_result" && command.transaction == 4.0) {
                break;
            }
        }
        w.send(&Message::command(
            1,
            "publish",
            5.0,
            vec![Value::Null, Value::string("s"), Value::string("live")],
        ))
        .await
        .unwrap();
        loop {
            let m = r.next().await.unwrap().unwrap();
            log.push((t.elapsed(), format!("{:?}", m).chars().take(60).collect::<String>()));
            if matches!(&m, Message::Command{command, ..} if command.name == "onStatus") {
                break;
            }
        }
        println!("quick={quick} tcp {t_tcp:?} handshake {t_hs:?}");
        for (at, m) in log {
            println!("  {at:?} {m}");
        }
        w.shutdown().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
