//! `kubectl ingest` (issue 16 point 4), the release binary copied onto
//! PATH as a user installs it and found by kubectl's own plugin discovery:
//! its status table against what the publishers announced, a pod drained
//! and followed to Drained, a second drain followed until `--timeout`,
//! interrupted (Ctrl-C) and cancelled while followed, a third followed to
//! its deadline (TimedOut, exit 3) past a publisher that cannot move and
//! that a fourth then disconnects, and the errors a user meets (no CRD, no
//! such node, pod or drain).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use ingest_e2e::cluster::eventually;
use ingest_e2e::lossless::{self, Announces, Stage, drain_status, ingest_pods, say};
use ingest_e2e::rtmp::BackgroundPublisher;
use ingest_e2e::system::{self, RTMP_PORT};
use ingest_e2e::{Cluster, Scenario};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::lossless::scenario;

const NS: &str = "kubectl-plugin";
/// The binary's name: kubectl runs `kubectl-ingest` for `kubectl ingest`.
const PLUGIN: &str = "kubectl-ingest";

pub fn scenarios() -> Vec<Scenario> {
    vec![scenario("kubectl_plugin", NS, |c| Box::pin(kubectl_plugin(c)))]
}

/// What one `kubectl ingest ...` printed, and its exit status.
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// `kubectl ingest` with the plugin's directory first on PATH.
struct Plugin {
    path: OsString,
    /// Holds the copy; removed with it.
    home: tempfile::TempDir,
}

impl Plugin {
    /// Copies the release binary into a directory of its own, as the README
    /// says to install it.
    fn install() -> Result<Self> {
        let binary = system::release_binary(PLUGIN)?;
        let dir = tempfile::tempdir()?;
        std::fs::copy(&binary, dir.path().join(PLUGIN)).with_context(|| format!("copying {}", binary.display()))?;
        let mut dirs = vec![dir.path().to_path_buf()];
        dirs.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
        Ok(Self {
            path: std::env::join_paths(dirs)?,
            home: dir,
        })
    }

    fn dir(&self) -> &Path {
        self.home.path()
    }

    fn command(&self, c: &Cluster, args: &[&str]) -> tokio::process::Command {
        let mut argv = vec!["ingest"];
        argv.extend_from_slice(args);
        let mut cmd = c.kubectl_command(&argv);
        cmd.env("PATH", &self.path);
        cmd
    }

    /// Runs `kubectl ingest ARGS` to the end, printing what it printed.
    async fn run(&self, c: &Cluster, args: &[&str]) -> Result<Ran> {
        say(&format!("$ kubectl ingest {}", args.join(" ")));
        let out = self.command(c, args).output().await.context("running kubectl ingest")?;
        let ran = Ran {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        show(&ran);
        Ok(ran)
    }
}

fn show(ran: &Ran) {
    for line in ran.stdout.lines() {
        say(&format!("  {line}"));
    }
    for line in ran.stderr.lines() {
        say(&format!("  (stderr) {line}"));
    }
    say(&format!(
        "  (exit {})",
        ran.code.map_or("signal".to_owned(), |c| c.to_string())
    ));
}

/// `kubectl ingest wait NAME` interrupted by SIGINT (Ctrl-C) once it
/// printed its first progress line: exit 130, the drain still running.
async fn interrupted(c: &Cluster, plugin: &Plugin, name: &str) -> Result<()> {
    say(&format!("$ kubectl ingest wait {name} -n {NS}   (then Ctrl-C)"));
    let mut child = plugin
        .command(c, &["wait", name, "-n", NS])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .context("no progress line")??
        .unwrap_or_default();
    // kubectl execs the plugin: this pid is the plugin's.
    let pid = child.id().context("the follower's pid")?.to_string();
    let kill = tokio::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .await?;
    ensure!(kill.success(), "kill -INT {pid}");
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .context("the follower did not stop at SIGINT")??;
    let ran = Ran {
        code: out.status.code(),
        stdout: format!("{first}\n{}", String::from_utf8_lossy(&out.stdout)),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    show(&ran);
    ensure!(
        ran.code == Some(130) && ran.stderr.contains(&format!("interrupted: {name} goes on")),
        "Ctrl-C must exit 130 and say the drain goes on"
    );
    let status = drain_status(c, NS, name).await?.unwrap_or_default();
    ensure!(
        status["phase"] == "Draining",
        "{name} after the Ctrl-C: phase {}",
        status["phase"]
    );
    Ok(())
}

/// The status table as rows of cells by column name.
fn table(stdout: &str) -> Result<Vec<BTreeMap<String, String>>> {
    let mut lines = stdout.lines();
    let header: Vec<&str> = lines.next().context("no table")?.split_whitespace().collect();
    lines
        .map(|l| {
            let cells: Vec<&str> = l.split_whitespace().collect();
            ensure!(cells.len() == header.len(), "a row that does not fit the header: {l:?}");
            Ok(header
                .iter()
                .zip(cells)
                .map(|(h, c)| ((*h).to_owned(), c.to_owned()))
                .collect())
        })
        .collect()
}

fn row<'a>(rows: &'a [BTreeMap<String, String>], pod: &str) -> Result<&'a BTreeMap<String, String>> {
    rows.iter()
        .find(|r| r.get("POD").map(String::as_str) == Some(pod))
        .with_context(|| format!("no row for {pod}"))
}

/// Whether a pod of `status -o json` says what its table row says.
fn json_agrees(pod: &serde_json::Value, r: &BTreeMap<String, String>) -> bool {
    let cell = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_owned(),
        v => v.to_string(),
    };
    let drain = &pod["drain"];
    pod["status"] == "read"
        && cell(&pod["node"]) == r["NODE"]
        && cell(&pod["ready"]) == r["READY"]
        && cell(&pod["publishers"]["goAway"]) == r["GO_AWAY"]
        && cell(&pod["publishers"]["reconnect"]) == r["RECONNECT"]
        && cell(&pod["publishers"]["incapable"]) == r["INCAPABLE"]
        && ["name", "phase", "signalled", "migrated", "remaining"]
            .iter()
            .zip(["DRAIN", "PHASE", "SIGNALLED", "MIGRATED", "REMAINING"])
            .all(|(field, column)| cell(&drain[field]) == r[column])
}

async fn kubectl_plugin(c: Arc<Cluster>) -> Result<()> {
    let plugin = Plugin::install()?;
    let list = c
        .kubectl_command(&["plugin", "list"])
        .env("PATH", &plugin.path)
        .stderr(Stdio::null())
        .output()
        .await?;
    let list = String::from_utf8_lossy(&list.stdout);
    let listed = plugin.dir().join(PLUGIN);
    ensure!(
        list.lines().any(|l| Path::new(l.trim()) == listed),
        "kubectl plugin list does not show {}:\n{list}",
        listed.display()
    );
    say(&format!("kubectl plugin list: {}", listed.display()));

    // Before the chart: the CRD is missing, and the plugin says so.
    system::purge(&c, NS).await?;
    let node = c.nodes().first().context("no node")?.clone();
    let no_crd = plugin.run(&c, &["drain", "node", &node, "-n", NS]).await?;
    ensure!(
        no_crd.code == Some(1)
            && no_crd
                .stderr
                .contains("IngestDrain CRD (ingestdrains.ingest.lossless.dev) is not installed"),
        "a drain without the CRD must fail and say why"
    );

    let stage = Stage::install(&c, NS, &[]).await?;
    let fleet = lossless::start_fleet(&stage, "plug", 6).await?;
    // The Service spreads the capable publishers as it likes; the busiest
    // pod is the one drained to Drained. The incapable publisher dials
    // another pod directly, so that pod can be drained only to its deadline.
    let before = ingest_pods(&c, NS).await?;
    let target = before
        .iter()
        .max_by_key(|p| p.streams.len())
        .filter(|p| !p.streams.is_empty())
        .with_context(|| format!("no ingest pod holds a publisher: {before:?}"))?
        .clone();
    let other = before
        .iter()
        .find(|p| p.name != target.name)
        .context("a second ingest pod")?
        .clone();
    let ip = Api::<Pod>::namespaced(c.client(), NS)
        .get(&other.name)
        .await?
        .status
        .and_then(|s| s.pod_ip)
        .with_context(|| format!("{} has no IP", other.name))?;
    let incapable = BackgroundPublisher::with_signals(&format!("rtmp://{ip}:{RTMP_PORT}/live/plug-inc"), false, false)?;
    eventually("the incapable publisher streaming", Duration::from_secs(60), || async {
        let frames = incapable.progress().video_frames;
        ensure!(frames >= 60, "{frames} frames");
        Ok(())
    })
    .await?;
    let announced: BTreeMap<&str, &str> = fleet
        .iter()
        .map(|p| {
            let column = match p.announces {
                Announces::GoAway => "GO_AWAY",
                Announces::ReconnectRequest | Announces::Both => "RECONNECT",
            };
            (p.stream.as_str(), column)
        })
        .chain([("plug-inc", "INCAPABLE")])
        .collect();
    let pods = ingest_pods(&c, NS).await?;

    // The table counts each pod's publishers by what they announced.
    let status = plugin.run(&c, &["status", "-n", NS]).await?;
    ensure!(status.code == Some(0), "kubectl ingest status failed");
    let rows = table(&status.stdout)?;
    ensure!(
        rows.len() == pods.len(),
        "{} rows for {} ingest pods",
        rows.len(),
        pods.len()
    );
    for p in &pods {
        let r = row(&rows, &p.name)?;
        for column in ["GO_AWAY", "RECONNECT", "INCAPABLE"] {
            let want = p
                .streams
                .iter()
                .filter(|s| announced.get(s.as_str()) == Some(&column))
                .count();
            ensure!(
                r[column] == want.to_string(),
                "{} {column} is {}, want {want} (streams {:?})",
                p.name,
                r[column],
                p.streams
            );
        }
        ensure!(
            r["NODE"] == p.node && r["READY"] == "true" && r["DRAIN"] == "-",
            "{}: {r:?}",
            p.name
        );
    }

    // A pod with capable publishers only drains to Drained: exit 0.
    let n = target.streams.len();
    let drained = plugin
        .run(
            &c,
            &["drain", "pod", &target.name, "-n", NS, "--wait", "--timeout", "2m"],
        )
        .await?;
    ensure!(drained.code == Some(0), "drain --wait must exit 0 once Drained");
    let name = drained
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("ingestdrain.ingest.lossless.dev/"))
        .and_then(|l| l.split_whitespace().next())
        .context("the drain did not print its name")?
        .to_owned();
    let progress: Vec<&str> = drained
        .stdout
        .lines()
        .filter(|l| l.starts_with(&format!("{name}  ")))
        .collect();
    ensure!(
        progress.iter().any(|l| l.contains("  Draining  "))
            && progress.last().is_some_and(|l| {
                l.contains("  Drained  pods 1/1 drained  publishers: 0 left") && l.contains(&format!("{n} migrated"))
            }),
        "the progress lines do not go from Draining to Drained with {n} migrated: {progress:?}"
    );
    let status = plugin.run(&c, &["status", "-n", NS]).await?;
    let rows = table(&status.stdout)?;
    let r = row(&rows, &target.name)?;
    ensure!(
        r["DRAIN"] == name
            && r["PHASE"] == "drained"
            && r["READY"] == "false"
            && r["REMAINING"] == "0"
            && r["MIGRATED"] == n.to_string(),
        "the drained pod's row: {r:?}"
    );
    // The same for scripts: `-o json` agrees with the table, pod by pod.
    let json = plugin.run(&c, &["status", "-n", NS, "-o", "json"]).await?;
    ensure!(json.code == Some(0), "kubectl ingest status -o json failed");
    let listed: serde_json::Value = serde_json::from_str(&json.stdout).context("status -o json is not JSON")?;
    let listed = listed["pods"].as_array().context("no \"pods\" list")?;
    ensure!(
        listed.len() == rows.len(),
        "{} pods in JSON, {} rows",
        listed.len(),
        rows.len()
    );
    for pod in listed {
        let r = row(&rows, pod["pod"].as_str().context("a pod without its name")?)?;
        ensure!(
            json_agrees(pod, r),
            "status -o json {pod} disagrees with the table's {r:?}"
        );
    }

    // A second drain, followed, is cancelled: the follower exits 4, the pod serves again.
    let follow_args = [
        "drain",
        "pod",
        &other.name,
        "-n",
        NS,
        "--name",
        "plugin-cancel",
        "--propagation-delay",
        "60s",
        "--wait",
    ];
    say(&format!("$ kubectl ingest {} &", follow_args.join(" ")));
    let follower = plugin
        .command(&c, &follow_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    eventually("plugin-cancel Draining", Duration::from_secs(30), || async {
        let status = drain_status(&c, NS, "plugin-cancel").await?.unwrap_or_default();
        ensure!(status["phase"] == "Draining", "phase {}", status["phase"]);
        Ok(())
    })
    .await?;
    // Following stops without stopping the drain: at --timeout (6), at Ctrl-C (130).
    let timed = plugin
        .run(&c, &["wait", "plugin-cancel", "-n", NS, "--timeout", "2s"])
        .await?;
    ensure!(
        timed.code == Some(6) && timed.stderr.contains("is still Draining after 2s: the drain goes on"),
        "wait --timeout must exit 6 and say the drain goes on"
    );
    interrupted(&c, &plugin, "plugin-cancel").await?;
    let cancel = plugin
        .run(&c, &["cancel", "plugin-cancel", "-n", NS, "--wait", "--timeout", "1m"])
        .await?;
    ensure!(
        cancel.code == Some(0) && cancel.stdout.contains("plugin-cancel cancelled"),
        "cancel --wait must exit 0 once Cancelled"
    );
    let out = tokio::time::timeout(Duration::from_secs(30), follower.wait_with_output())
        .await
        .context("the follower did not end with the cancel")??;
    let followed = Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    say("(the follower of plugin-cancel)");
    show(&followed);
    ensure!(
        followed.code == Some(4)
            && followed
                .stdout
                .lines()
                .any(|l| l.starts_with("plugin-cancel  Cancelled")),
        "a followed drain that is cancelled must end Cancelled with exit 4"
    );
    let status = eventually(
        &format!("{} ready again", other.name),
        Duration::from_secs(60),
        || async {
            let out = plugin.command(&c, &["status", "-n", NS]).output().await?;
            let rows = table(&String::from_utf8_lossy(&out.stdout))?;
            let r = row(&rows, &other.name)?.clone();
            ensure!(r["READY"] == "true" && r["PHASE"] == "cancelled", "{r:?}");
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        },
    )
    .await?;
    say("$ kubectl ingest status (after the cancel)");
    for line in status.lines() {
        say(&format!("  {line}"));
    }

    // A third drain of that pod meets the incapable publisher, which the
    // Wait policy leaves alone: it ends TimedOut at its deadline, exit 3.
    let deadline_moved = drained_to_deadline(&c, &plugin, &other.name, &incapable).await?;

    // What a user gets wrong is refused, with the reason.
    for (args, says) in [
        (
            vec!["drain", "node", "no-such-node", "-n", NS],
            "node \"no-such-node\" not found",
        ),
        (
            vec!["drain", "pod", "no-such-pod", "-n", NS],
            "pod \"no-such-pod\" not found",
        ),
        (
            vec!["cancel", "no-such-drain", "-n", NS],
            "IngestDrain \"no-such-drain\" not found",
        ),
    ] {
        let ran = plugin.run(&c, &args).await?;
        ensure!(
            ran.code == Some(1) && ran.stderr.contains(says),
            "want exit 1 saying {says:?}"
        );
    }

    let report = incapable.stop().await?;
    ensure!(
        report.error.is_none(),
        "the incapable publisher stopped early: {:?}",
        report.error
    );
    let rows = lossless::stop_and_audit(&stage, fleet).await?;
    // One signal per drain a stream was on: the first (Drained) one, the
    // one to the deadline; none from the cancelled drain.
    // Streams that reached the deadline drain's pod after it was read got
    // its one signal too: as many as it moved beyond those read.
    let (deadline_moved, moved) = deadline_moved;
    let mut late = 0;
    for r in &rows {
        let want = usize::from(target.streams.contains(&r.stream)) + usize::from(deadline_moved.contains(&r.stream));
        let extra = r.signals.len().checked_sub(want);
        ensure!(
            matches!(extra, Some(0)) || (matches!(extra, Some(1)) && !deadline_moved.contains(&r.stream)),
            "{}: on {} and then {}: want {want} signal(s), yet {r:?}",
            r.stream,
            target.name,
            other.name
        );
        late += extra.unwrap_or(0);
    }
    ensure!(
        late == moved - deadline_moved.len(),
        "{late} stream(s) got a signal beyond those read, the deadline drain moved {moved} for {} read",
        deadline_moved.len()
    );
    say(&format!("audit at the origin:\n{}", lossless::report(&rows).trim_end()));
    Ok(())
}

/// `kubectl ingest drain pod POD --name NAME FLAGS... --wait` in the
/// scenario's namespace, followed for at most two minutes.
fn followed_pod_drain<'a>(pod: &'a str, name: &'a str, flags: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["drain", "pod", pod, "-n", NS, "--name", name];
    args.extend_from_slice(flags);
    args.extend(["--wait", "--timeout", "2m"]);
    args
}

/// Drains `pod`, which holds the incapable publisher, with a short deadline
/// and the Wait policy, followed: its capable publishers move, the drain
/// ends TimedOut at the deadline (exit 3, saying so on stderr) and the
/// incapable publisher keeps streaming. Returns the streams that moved.
async fn drained_to_deadline(
    c: &Cluster,
    plugin: &Plugin,
    pod: &str,
    incapable: &BackgroundPublisher,
) -> Result<(Vec<String>, usize)> {
    let name = "plugin-deadline";
    let on_pod = ingest_pods(c, NS)
        .await?
        .into_iter()
        .find(|p| p.name == pod)
        .with_context(|| format!("{pod} is gone"))?;
    let capable: Vec<String> = on_pod.streams.iter().filter(|s| *s != "plug-inc").cloned().collect();
    ensure!(
        on_pod.streams.iter().any(|s| s == "plug-inc"),
        "the incapable publisher is not on {pod}: {:?}",
        on_pod.streams
    );
    // The capable publishers have 14 s to move: the counts below need
    // them all gone by the deadline.
    let deadline = Duration::from_secs(15);
    let started = std::time::Instant::now();
    let ran = plugin
        .run(
            c,
            &followed_pod_drain(
                pod,
                name,
                &[
                    "--deadline",
                    "15s",
                    "--propagation-delay",
                    "1s",
                    "--incapable-policy",
                    "Wait",
                ],
            ),
        )
        .await?;
    let took = started.elapsed();
    ensure!(ran.code == Some(3), "a followed drain that ends TimedOut must exit 3");
    ensure!(
        took >= deadline,
        "the drain ended TimedOut {took:.1?} after it was created, before its {deadline:?} deadline"
    );
    ensure!(
        ran.stderr
            .lines()
            .any(|l| l == format!("{name} ended TimedOut: 1 publisher(s) left at the deadline")),
        "stderr does not say the drain ended TimedOut with the incapable publisher left"
    );
    ensure!(
        ran.stderr.lines().any(|l| l.trim()
            == format!(
                "{pod}: TimedOut: the deadline found 1 publisher(s) on the pod: left connected (incapablePolicy Wait)"
            )),
        "stderr does not say what the deadline found on {pod}"
    );
    let last = ran
        .stdout
        .lines()
        .rfind(|l| l.starts_with(&format!("{name}  ")))
        .context("no progress line")?;
    // The streams read before the drain, and any that reached the pod
    // since: every one signalled moved.
    let n = capable.len();
    let counts = last
        .strip_prefix(&format!(
            "{name}  TimedOut  pods 1/1 drained  publishers: 1 left at the deadline, "
        ))
        .and_then(|rest| rest.split_once(" signalled, "))
        .and_then(|(s, rest)| {
            Some((
                s.parse::<usize>().ok()?,
                rest.split_once(" migrated")?.0.parse::<usize>().ok()?,
            ))
        });
    let moved = match counts {
        Some((s, m)) if s == m && s >= n => s,
        _ => bail!(
            "the last progress line does not count the incapable publisher left and at least the {n} capable ones moved: {last}"
        ),
    };
    // Wait leaves the incapable publisher streaming past the deadline.
    let frames = incapable.progress().video_frames;
    eventually(
        "the incapable publisher streaming past the deadline",
        Duration::from_secs(10),
        || async {
            let now = incapable.progress();
            ensure!(
                now.video_frames >= frames + 30 && now.connections == 1,
                "{now:?}, {frames} video frames at the deadline"
            );
            Ok(())
        },
    )
    .await?;
    say(&format!(
        "{name}: TimedOut (exit 3) {took:.1?} after it began; {n} capable publisher(s) moved, the incapable one streams on"
    ));

    // A drain that asks to disconnect cuts whom Wait kept: its deadline,
    // counted from the pod's first drain, has passed. The ended drain goes
    // first: while it exists, the operator leaves its pods to it.
    say(&format!("$ kubectl delete ingestdrain {name} -n {NS}"));
    c.kubectl(&["-n", NS, "delete", "ingestdrain", name, "--wait"]).await?;
    let forced = plugin
        .run(
            c,
            &followed_pod_drain(
                pod,
                "plugin-force",
                &["--deadline", "1s", "--incapable-policy", "disconnect"],
            ),
        )
        .await?;
    ensure!(forced.code == Some(3), "the forcing drain must end TimedOut, exit 3");
    ensure!(
        forced.stderr.lines().any(|l| l.trim()
            == format!("{pod}: TimedOut: the deadline found 1 publisher(s) on the pod: disconnected")),
        "stderr does not say the forcing drain disconnected the publisher on {pod}"
    );
    eventually("the incapable publisher cut", Duration::from_secs(30), || async {
        let now = incapable.progress();
        ensure!(now.unplanned_reconnects >= 1, "{now:?}");
        Ok(())
    })
    .await?;
    say("plugin-force: the publisher the Wait drain kept was cut (it dials the pod again)");
    Ok((capable, moved))
}
