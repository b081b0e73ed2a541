//! One step of a drain: the rows, the pods asked, the evictions, the
//! events and metrics of a new phase, and the status.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::SignedDuration;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use super::{Context, EVICTION_RETRY, Error, PROGRESS_REQUEUE, cancel, drive, evict, rows, status};
use crate::crd::{DrainPhase, IngestDrain, IngestDrainStatus, PodDrainStatus};
use crate::state;

/// Where a drain stands in time at this step.
pub(super) struct Clock {
    pub(super) now: Time,
    /// When the drain started (now, for its first step).
    pub(super) started: Time,
    pub(super) past_deadline: bool,
    /// Until the deadline; zero once past it.
    pub(super) remaining: Duration,
}

impl Clock {
    fn new(old: &IngestDrainStatus, deadline_seconds: i64) -> Self {
        let now = super::now();
        let started = old.started_at.clone().unwrap_or_else(|| now.clone());
        let deadline = started.0 + SignedDuration::from_secs(deadline_seconds);
        Self {
            past_deadline: now.0 >= deadline,
            remaining: Duration::try_from(deadline.duration_since(now.0)).unwrap_or(Duration::ZERO),
            now,
            started,
        }
    }
}

/// One step of a drain; returns the phase it left the drain in.
pub(super) async fn apply(drain: &IngestDrain, ctx: &Context) -> Result<(Action, DrainPhase), Error> {
    let old = drain.status.clone().unwrap_or_default();
    if old.phase.is_terminal()
        && old.observed_generation == drain.metadata.generation
        && !evict::pending(drain, &old.pods)
    {
        return Ok((Action::await_change(), old.phase));
    }
    let pods = ctx.pods_of(drain);
    let clock = Clock::new(&old, drain.spec.deadline_seconds);
    let mut rows = rows::current(drain, &old, &pods);
    if drain.spec.cancel {
        cancel::cancel(drain, ctx, rows, &pods, &old, &clock).await?;
        return Ok((Action::await_change(), DrainPhase::Cancelled));
    }

    let token = ctx.token()?;
    // Computed on every reconcile (every wave): a pod that started
    // draining since, for any drain or its own SIGTERM, is no target.
    let redirects = state::redirect_targets(drain, &pods, &drive::draining_pods(drain, &rows, &ctx.drains));
    let targets = rows::reachable(&mut rows, &pods, &clock);
    let request = drive::start_request(drain, clock.remaining, redirects);
    drive::drive(drain, ctx, &mut rows, targets, request, &token, &clock).await;
    state::keep_left_at_deadline(&mut rows);
    // Judged before evicting: an Evicted row no longer says whether the pod
    // drained or timed out.
    let phase = state::overall_phase(&rows, clock.past_deadline);
    if drain.spec.evict {
        evict::evict_released(drain, ctx, &mut rows).await;
    }
    // After the evictions: a refusal's message goes with a later success.
    state::say_left_at_deadline(&mut rows, drain.spec.incapable_policy);
    if phase != old.phase {
        announce(drain, ctx, phase, &rows, &clock).await;
    }
    let evictions_left = evict::pending(drain, &rows);
    status::write(drain, ctx, phase, rows, &old, &clock).await?;
    if phase.is_terminal() {
        ctx.followers.forget(drain);
    }
    let action = if !phase.is_terminal() {
        Action::requeue(PROGRESS_REQUEUE)
    } else if evictions_left {
        Action::requeue(EVICTION_RETRY)
    } else {
        Action::await_change()
    };
    Ok((action, phase))
}

/// The drain entered `phase`: an Event, and the drain's metrics once it is
/// over.
async fn announce(drain: &IngestDrain, ctx: &Context, phase: DrainPhase, rows: &[PodDrainStatus], clock: &Clock) {
    let t = state::totals(rows);
    let (type_, note) = match phase {
        DrainPhase::TimedOut => (
            EventType::Warning,
            format!(
                "deadline passed with {} publishers left; the pods may go",
                t.left_at_deadline
            ),
        ),
        _ => (
            EventType::Normal,
            format!(
                "{} pods, {} drained, {} publishers remain, {} migrated",
                t.pods, t.drained_pods, t.remaining_publishers, t.migrated
            ),
        ),
    };
    ctx.event(drain, type_, &format!("{phase:?}"), note).await;
    if phase.is_terminal() {
        let secs = clock.now.0.duration_since(clock.started.0).as_secs_f64().max(0.0);
        ctx.metrics.drain_duration.observe(secs);
        ctx.metrics.migrated.inc_by(t.migrated.max(0) as u64);
    }
}
