//! Following an IngestDrain: a progress line redrawn in place on a
//! terminal (one line per change otherwise), and an exit status by how the
//! drain ended.

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

use super::{Error, Exit, Result, WaitArgs, get_drain};
use crate::crd::{DrainPhase, IngestDrain};

/// How often the line is redrawn on a terminal (the deadline counts down).
const REDRAW: Duration = Duration::from_secs(1);

/// When following stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Until {
    /// The drain ended, whichever way.
    End,
    /// The drain is Cancelled.
    Cancelled,
}

/// `kubectl ingest wait NAME`.
pub(super) async fn run(
    client: &Client,
    ns: &str,
    args: WaitArgs,
    interrupt: impl Future<Output = ()>,
) -> Result<Exit> {
    let WaitArgs { name, timeout } = args;
    // A clear error now, rather than a watch that retries for ever.
    get_drain(client, ns, &name).await?;
    let api: Api<IngestDrain> = Api::namespaced(client.clone(), ns);
    follow(api, &name, Until::End, timeout, interrupt).await
}

/// Follows the drain `name` until `until`, `timeout` or `interrupt`.
pub(crate) async fn follow(
    api: Api<IngestDrain>,
    name: &str,
    until: Until,
    timeout: Option<Duration>,
    interrupt: impl Future<Output = ()>,
) -> Result<Exit> {
    let mut printer = Printer::new(std::io::stdout().is_terminal());
    let mut changes = std::pin::pin!(watcher::watch_object(api, name).default_backoff());
    let mut redraw = tokio::time::interval(REDRAW);
    let give_up = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    let mut give_up = std::pin::pin!(give_up);
    let mut interrupt = std::pin::pin!(interrupt);
    let mut last: Option<IngestDrain> = None;
    loop {
        tokio::select! {
            change = changes.next() => match change {
                Some(Ok(Some(drain))) => {
                    printer.show(name, &drain)?;
                    if let Some(exit) = ended(&drain, until) {
                        printer.finish()?;
                        explain(name, &drain, exit);
                        return Ok(exit);
                    }
                    last = Some(drain);
                }
                Some(Ok(None)) => {
                    printer.finish()?;
                    eprintln!("{name} was deleted (a drain deleted mid-way cancels its pods' drains)");
                    return Ok(Exit::Cancelled);
                }
                // Retried with a backoff; the line stays as it was.
                Some(Err(err)) => {
                    printer.finish()?;
                    eprintln!("watching {name}: {err} (retrying)");
                }
                None => return Err(Error::Api { what: format!("watching {name}"), message: "the watch ended".into() }),
            },
            _ = redraw.tick(), if printer.tty => {
                if let Some(drain) = &last {
                    printer.show(name, drain)?;
                }
            }
            () = &mut give_up => {
                printer.finish()?;
                let phase = last.as_ref().map(phase_of).unwrap_or_default();
                let after = ingest_runtime::format_duration(timeout.unwrap_or_default());
                match until {
                    Until::End => eprintln!(
                        "{name} is still {phase:?} after {after}: the drain goes on (`kubectl ingest cancel {name}` stops it)"
                    ),
                    Until::Cancelled => eprintln!(
                        "{name} is still {phase:?} after {after}: the operator has not cancelled it yet (is it running?)"
                    ),
                }
                return Ok(Exit::StillRunning);
            }
            () = &mut interrupt => {
                printer.finish()?;
                eprintln!(
                    "interrupted: {name} goes on (`kubectl ingest wait {name}` follows it again, `kubectl ingest cancel {name}` stops it)"
                );
                return Ok(Exit::Interrupted);
            }
        }
    }
}

fn phase_of(drain: &IngestDrain) -> DrainPhase {
    drain.status.as_ref().map(|s| s.phase).unwrap_or_default()
}

/// How following ends at this state of the drain, if it does. A status
/// written for an older spec (just cancelled, say) is not the end yet.
pub(crate) fn ended(drain: &IngestDrain, until: Until) -> Option<Exit> {
    let status = drain.status.as_ref()?;
    let current = match (status.observed_generation, drain.metadata.generation) {
        (Some(seen), Some(now)) => seen >= now,
        _ => true,
    };
    if !current {
        return None;
    }
    match until {
        Until::Cancelled => (status.phase == DrainPhase::Cancelled).then_some(Exit::Ok),
        Until::End => exit_for(status.phase),
    }
}

/// The exit status of a drain that ended in `phase`.
pub(crate) fn exit_for(phase: DrainPhase) -> Option<Exit> {
    match phase {
        DrainPhase::Pending | DrainPhase::Draining => None,
        DrainPhase::Drained => Some(Exit::Ok),
        DrainPhase::TimedOut => Some(Exit::TimedOut),
        DrainPhase::Cancelled => Some(Exit::Cancelled),
        DrainPhase::Failed => Some(Exit::Failed),
    }
}

/// Why a drain ended otherwise than asked, on stderr: the pods' own words.
fn explain(name: &str, drain: &IngestDrain, exit: Exit) {
    if exit == Exit::Ok {
        return;
    }
    let status = drain.status.clone().unwrap_or_default();
    // An operator older than the count writes none: say nothing then.
    match status.totals.left_at_deadline {
        n if status.phase == DrainPhase::TimedOut && n > 0 => {
            eprintln!("{name} ended TimedOut: {n} publisher(s) left at the deadline");
        }
        _ => eprintln!("{name} ended {:?}", status.phase),
    }
    for row in status.pods.iter().filter(|r| r.message.is_some()) {
        eprintln!(
            "  {}: {:?}: {}",
            row.name,
            row.state,
            row.message.as_deref().unwrap_or_default()
        );
    }
}

/// Where a drain is, as the progress line tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Progress {
    pub(crate) phase: DrainPhase,
    pub(crate) pods: i64,
    pub(crate) drained: i64,
    /// Publishers on the pods still draining; once TimedOut, those the
    /// deadline found.
    pub(crate) remaining: i64,
    pub(crate) signalled: i64,
    pub(crate) migrated: i64,
    pub(crate) clock: Clock,
}

/// The time part of the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Clock {
    /// Not started: the whole deadline is ahead.
    Deadline(Duration),
    /// Running: this much left to the deadline.
    Left(Duration),
    /// Ended after this long.
    Took(Duration),
}

impl Progress {
    pub(crate) fn of(drain: &IngestDrain, now: Timestamp) -> Self {
        let status = drain.status.clone().unwrap_or_default();
        let deadline = Duration::from_secs(drain.spec.deadline_seconds.max(0).unsigned_abs());
        let since = |t: Timestamp, from: Timestamp| Duration::try_from(t.duration_since(from)).unwrap_or_default();
        let clock = match (&status.started_at, &status.completed_at) {
            (Some(start), Some(end)) if status.phase.is_terminal() => Clock::Took(since(end.0, start.0)),
            (Some(start), _) => Clock::Left(deadline.saturating_sub(since(now, start.0))),
            (None, _) => Clock::Deadline(deadline),
        };
        let t = &status.totals;
        Self {
            phase: status.phase,
            pods: t.pods,
            drained: t.drained_pods,
            remaining: if status.phase == DrainPhase::TimedOut {
                t.left_at_deadline
            } else {
                t.remaining_publishers
            },
            signalled: t.signalled,
            migrated: t.migrated,
            clock,
        }
    }

    /// The line, e.g. `drain-x  Draining  pods 1/2 drained  publishers:
    /// 3 left, 5 signalled, 2 migrated  deadline in 4m12s`.
    pub(crate) fn line(&self, name: &str) -> String {
        let fmt = ingest_runtime::format_duration;
        let clock = match self.clock {
            Clock::Deadline(d) => format!("deadline {} once started", fmt(d)),
            Clock::Left(d) if d.is_zero() => "deadline passed".to_owned(),
            Clock::Left(d) => format!("deadline in {}", fmt(d)),
            Clock::Took(d) => format!("took {}", fmt(d)),
        };
        let at_deadline = if self.phase == DrainPhase::TimedOut {
            " at the deadline"
        } else {
            ""
        };
        format!(
            "{name}  {:?}  pods {}/{} drained  publishers: {} left{at_deadline}, {} signalled, {} migrated  {clock}",
            self.phase, self.drained, self.pods, self.remaining, self.signalled, self.migrated
        )
    }

    /// Whether the line says something new, the countdown aside.
    fn differs(&self, other: &Self) -> bool {
        let clock_differs = match (&self.clock, &other.clock) {
            (Clock::Left(_), Clock::Left(_)) => false,
            (a, b) => a != b,
        };
        clock_differs
            || Self {
                clock: other.clock.clone(),
                ..self.clone()
            } != *other
    }
}

/// Writes progress lines: redrawn in place on a terminal, else one line
/// per change.
struct Printer {
    tty: bool,
    last: Option<Progress>,
    /// A line is drawn without its newline (terminal only).
    open: bool,
}

impl Printer {
    fn new(tty: bool) -> Self {
        Self {
            tty,
            last: None,
            open: false,
        }
    }

    fn show(&mut self, name: &str, drain: &IngestDrain) -> std::io::Result<()> {
        let progress = Progress::of(drain, Timestamp::now());
        let text = self.text(name, progress);
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())?;
        out.flush()
    }

    /// What to write for `progress`: the whole line again after a carriage
    /// return (clearing the rest) on a terminal; elsewhere the line only
    /// when it changed.
    fn text(&mut self, name: &str, progress: Progress) -> String {
        let line = progress.line(name);
        if self.tty {
            self.open = true;
            self.last = Some(progress);
            return format!("\r{line}\x1b[K");
        }
        if self.last.as_ref().is_some_and(|last| !last.differs(&progress)) {
            return String::new();
        }
        self.last = Some(progress);
        line + "\n"
    }

    /// Ends a line left open on a terminal.
    fn finish(&mut self) -> std::io::Result<()> {
        if self.open {
            self.open = false;
            let mut out = std::io::stdout().lock();
            out.write_all(b"\n")?;
            out.flush()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn drain(status: serde_json::Value, generation: i64) -> IngestDrain {
        serde_json::from_value(json!({
            "apiVersion": "ingest.lossless.dev/v1alpha1",
            "kind": "IngestDrain",
            "metadata": { "name": "d", "namespace": "live", "generation": generation },
            "spec": { "selector": { "matchLabels": { "app": "ingest" } }, "deadlineSeconds": 300 },
            "status": status
        }))
        .expect("drain")
    }

    fn at(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    fn draining() -> IngestDrain {
        drain(
            json!({
                "phase": "Draining",
                "startedAt": "2026-12-10T10:00:00Z",
                "observedGeneration": 1,
                "totals": { "pods": 2, "drainedPods": 1, "remainingPublishers": 3, "signalled": 5, "migrated": 2 }
            }),
            1,
        )
    }

    #[test]
    fn the_line_says_phase_pods_publishers_and_time_left() {
        let p = Progress::of(&draining(), at("2026-12-10T10:00:48Z"));
        assert_eq!(
            p.line("drain-node-a-x7k2p"),
            "drain-node-a-x7k2p  Draining  pods 1/2 drained  publishers: 3 left, 5 signalled, 2 migrated  deadline in 4m12s"
        );
        let late = Progress::of(&draining(), at("2026-12-10T10:06:00Z"));
        assert!(late.line("d").ends_with("deadline passed"), "{}", late.line("d"));
    }

    #[test]
    fn before_the_operator_writes_a_status_the_whole_deadline_is_ahead() {
        let fresh: IngestDrain = drain(serde_json::Value::Null, 1);
        assert_eq!(
            Progress::of(&fresh, at("2026-12-10T10:00:00Z")).line("d"),
            "d  Pending  pods 0/0 drained  publishers: 0 left, 0 signalled, 0 migrated  deadline 5m once started"
        );
        assert_eq!(ended(&fresh, Until::End), None);
    }

    #[test]
    fn an_ended_drain_says_how_long_it_took() {
        let done = drain(
            json!({
                "phase": "Drained",
                "startedAt": "2026-12-10T10:00:00Z",
                "completedAt": "2026-12-10T10:00:12Z",
                "observedGeneration": 1,
                "totals": { "pods": 2, "drainedPods": 2, "remainingPublishers": 0, "signalled": 5, "migrated": 5 }
            }),
            1,
        );
        let line = Progress::of(&done, at("2026-12-10T11:00:00Z")).line("d");
        assert!(
            line.ends_with("pods 2/2 drained  publishers: 0 left, 5 signalled, 5 migrated  took 12s"),
            "{line}"
        );
        assert_eq!(ended(&done, Until::End), Some(Exit::Ok));
        assert_eq!(ended(&done, Until::Cancelled), None);
    }

    #[test]
    fn a_timed_out_drain_counts_the_publishers_its_deadline_found() {
        let timed_out = drain(
            json!({
                "phase": "TimedOut",
                "startedAt": "2026-12-10T10:00:00Z",
                "completedAt": "2026-12-10T10:00:30Z",
                "observedGeneration": 1,
                "totals": { "pods": 2, "drainedPods": 2, "remainingPublishers": 0, "leftAtDeadline": 2,
                            "signalled": 5, "migrated": 5 }
            }),
            1,
        );
        let line = Progress::of(&timed_out, at("2026-12-10T11:00:00Z")).line("d");
        assert!(
            line.ends_with("pods 2/2 drained  publishers: 2 left at the deadline, 5 signalled, 5 migrated  took 30s"),
            "{line}"
        );
        assert_eq!(ended(&timed_out, Until::End), Some(Exit::TimedOut));
    }

    #[test]
    fn exit_status_by_phase() {
        assert_eq!(exit_for(DrainPhase::Pending), None);
        assert_eq!(exit_for(DrainPhase::Draining), None);
        assert_eq!(exit_for(DrainPhase::Drained), Some(Exit::Ok));
        assert_eq!(exit_for(DrainPhase::TimedOut), Some(Exit::TimedOut));
        assert_eq!(exit_for(DrainPhase::Cancelled), Some(Exit::Cancelled));
        assert_eq!(exit_for(DrainPhase::Failed), Some(Exit::Failed));
    }

    #[test]
    fn a_status_of_an_older_spec_is_not_the_end() {
        // Cancelled (generation 2) while the status still says Drained (of 1).
        let stale = drain(
            json!({ "phase": "Drained", "observedGeneration": 1, "startedAt": "2026-12-10T10:00:00Z" }),
            2,
        );
        assert_eq!(ended(&stale, Until::End), None);
        assert_eq!(ended(&stale, Until::Cancelled), None);
        let cancelled = drain(
            json!({ "phase": "Cancelled", "observedGeneration": 2, "startedAt": "2026-12-10T10:00:00Z" }),
            2,
        );
        assert_eq!(ended(&cancelled, Until::Cancelled), Some(Exit::Ok));
        assert_eq!(ended(&cancelled, Until::End), Some(Exit::Cancelled));
    }

    #[test]
    fn a_terminal_redraws_in_place_elsewhere_one_line_per_change() {
        let d = draining();
        let t0 = Progress::of(&d, at("2026-12-10T10:00:48Z"));
        let t1 = Progress::of(&d, at("2026-12-10T10:00:49Z"));
        let mut tty = Printer::new(true);
        assert!(tty.text("d", t0.clone()).starts_with("\rd  Draining"));
        let again = tty.text("d", t1.clone());
        assert!(
            again.starts_with('\r') && again.contains("4m11s") && again.ends_with("\x1b[K"),
            "{again:?}"
        );
        assert!(tty.open);

        let mut log = Printer::new(false);
        assert!(log.text("d", t0).ends_with("deadline in 4m12s\n"));
        assert_eq!(log.text("d", t1), "", "only the countdown changed");
        let mut moved = draining();
        if let Some(s) = moved.status.as_mut() {
            s.totals.migrated = 3;
            s.totals.remaining_publishers = 2;
        }
        let changed = log.text("d", Progress::of(&moved, at("2026-12-10T10:00:50Z")));
        assert!(
            changed.contains("2 left, 5 signalled, 3 migrated") && changed.ends_with('\n'),
            "{changed:?}"
        );
        assert!(!log.open);
    }
}
