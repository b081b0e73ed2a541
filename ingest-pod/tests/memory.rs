//! A pod's memory is bounded as a whole: the real `ingest-pod` binary runs
//! in a memory cgroup with a hard limit, the path to a real nginx-rtmp
//! origin is cut while publishers stream more than the pod can buffer, and
//! the pod must survive (no OOM kill), keep every publisher, and resume
//! every stream with its configuration once the origin is back.
//!
//! Needs root and a cgroup v1 memory controller or cgroup v2 (CI machines
//! have both; the test fails, never skips, without them).

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::metric;
use ingest_testkit::audit;
use ingest_testkit::lab::Link;
use ingest_testkit::origin::{Origin, free_port};
use ingest_testkit::publisher::{Publisher, PublisherConfig};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// The container's limit in this test.
const LIMIT: u64 = 160 << 20;
const PUBLISHERS: usize = 24;
const BITRATE: u64 = 3_000_000;
/// Long enough to buffer more than the limit: 24 × 3 Mbit/s is 9 MB/s.
const OUTAGE: Duration = Duration::from_secs(22);

/// A memory cgroup this test creates and removes.
struct MemoryCgroup {
    dir: PathBuf,
    v2: bool,
}

impl MemoryCgroup {
    fn create(name: &str, limit: u64) -> Self {
        let v1 = PathBuf::from("/sys/fs/cgroup/memory");
        let (dir, v2) = if v1.is_dir() {
            (v1.join(name), false)
        } else {
            (PathBuf::from("/sys/fs/cgroup").join(name), true)
        };
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e} (run as root)", dir.display()));
        let file = if v2 { "memory.max" } else { "memory.limit_in_bytes" };
        std::fs::write(dir.join(file), limit.to_string()).expect("setting the memory limit");
        Self { dir, v2 }
    }

    fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// OOM kills inside the cgroup so far.
    fn oom_kills(&self) -> u64 {
        let file = if self.v2 { "memory.events" } else { "memory.oom_control" };
        let text = std::fs::read_to_string(self.dir.join(file)).expect("reading the OOM counter");
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Highest memory use seen, page cache included.
    fn peak(&self) -> u64 {
        let file = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        std::fs::read_to_string(self.dir.join(file))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Starts the pod binary inside `cgroup` (it joins before it execs).
fn spawn_pod(cgroup: &MemoryCgroup, rtmp: &str, http: &str, upstream: &str) -> Child {
    let script = format!("echo $$ > {} && exec \"$0\" \"$@\"", cgroup.procs().display());
    Command::new("sh")
        .args(["-c", &script, env!("CARGO_BIN_EXE_ingest-pod")])
        .args(["--rtmp-listen", rtmp, "--http-listen", http, "--upstream", upstream])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawning ingest-pod")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_under_a_memory_limit_survives_an_origin_outage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path(), "127.0.0.1").expect("nginx-rtmp");
    let link = Link::start(origin.addr()).await.expect("link");
    let cgroup = MemoryCgroup::create(&format!("lossless-ingest-test-{}", std::process::id()), LIMIT);
    let rtmp = free_port("127.0.0.1").expect("port").to_string();
    let http = free_port("127.0.0.1").expect("port").to_string();
    let upstream = format!("rtmp://{}/live/{{stream}}", link.addr);
    let mut pod = spawn_pod(&cgroup, &rtmp, &http, &upstream);
    common::listening(&rtmp).await;
    common::listening(&http).await;

    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for i in 0..PUBLISHERS {
        let cfg = PublisherConfig {
            fps: 25,
            gop: 25,
            video_bitrate_bps: BITRATE,
            width: 320,
            height: 240,
            ..PublisherConfig::new(format!("rtmp://{rtmp}/live/mem{i:02}"))
        };
        tasks.push(tokio::spawn(Publisher::new(cfg).expect("publisher").run(stop.clone())));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(metric(&http, "ingest_relays_active").await as usize, PUBLISHERS);

    // The origin becomes unreachable for longer than the pod can buffer.
    link.cut().await;
    let budget = metric(&http, "ingest_relay_budget_bytes").await;
    tokio::time::sleep(OUTAGE).await;
    assert!(
        pod.try_wait().expect("pod status").is_none(),
        "the pod died during the outage ({} OOM kills)",
        cgroup.oom_kills()
    );
    let held = metric(&http, "ingest_relay_buffer_bytes").await;
    let dropped = metric(&http, "ingest_relay_dropped_bytes_total").await;
    println!(
        "outage {OUTAGE:?}: {held:.0} B buffered of a {budget:.0} B budget, {dropped:.0} B dropped, peak {} of {LIMIT} B",
        cgroup.peak()
    );
    assert!(held <= budget, "{held} B buffered over the {budget} B budget");
    assert!(dropped > 0.0, "the outage should have outgrown the budget");
    link.restore();

    // Every stream resumes: 3 s more, then the publishers stop cleanly.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    let mut reports = Vec::new();
    for t in tasks {
        reports.push(t.await.expect("join").expect("publisher report"));
    }
    for _ in 0..200 {
        if metric(&http, "ingest_relays_active").await == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(cgroup.oom_kills(), 0, "the pod's cgroup saw an OOM kill");
    pod.kill().await.expect("stop the pod");
    let records = origin.record_dir();
    drop(origin); // nginx closes its recordings
    for r in &reports {
        assert_eq!(r.unplanned_reconnects, 0, "{}: the publisher was cut", r.stream);
        let result = audit::audit_dir(&r.stream, &r.sent, &records).expect("audit");
        assert!(
            result.sessions >= 2,
            "{}: no upstream session after the outage: {result}",
            r.stream
        );
        assert!(
            result.config_messages >= 2 * result.sessions,
            "{}: a session without its configuration: {result}",
            r.stream
        );
        assert_eq!((result.duplicated, result.out_of_order), (0, 0), "{result}");
    }
}
