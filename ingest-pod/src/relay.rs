//! The relay: pushes one published stream to the upstream origin by RTMP,
//! from the very first frame, through origin refusals and reconnects.
//!
//! During a handover the previous pod may still hold the stream at the
//! origin ("already publishing"). The relay keeps everything in a bounded
//! queue and retries until the origin accepts, then flushes in order.
//!
//! An origin that goes silent without a reset (a dead node, a partition)
//! is given up after `io_timeout`: a write that does not complete, or media
//! sent and neither acknowledged nor followed by an answer to a ping.

mod budget;

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use thiserror::Error;
use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{Span, debug, info, warn};

use crate::metrics::Metrics;
use crate::registry::{ConnStats, RelayGuard};
use crate::rtmp::client;
use crate::rtmp::conn::{self, Reader, Writer};
use ingest_rtmp::amf0::Value;
use ingest_rtmp::chunk::RawMessage;
use ingest_rtmp::media::{self, Kind};
use ingest_rtmp::message::{self, CSID_AUDIO, CSID_DATA, CSID_VIDEO, Message, UserControl};
use ingest_rtmp::url::RtmpUrl;

pub use budget::{Budget, default_budget};

/// Settings shared by every relay of a pod.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Most media bytes one relay holds while the origin is unavailable.
    pub buffer_bytes: usize,
    /// First wait between attempts while the origin says the stream is busy
    /// (another pod still publishes it: a handover).
    pub busy_retry: Duration,
    /// Longest such wait: the wait grows by half after each busy answer, so
    /// a long handover (or hundreds at once) does not flood the origin.
    pub busy_retry_max: Duration,
    /// Longest wait between attempts after failures.
    pub max_backoff: Duration,
    /// How long a relay whose publisher left keeps trying to deliver.
    pub flush_timeout: Duration,
    /// Timeout of each step of connecting and publishing.
    pub step_timeout: Duration,
    /// An upstream connection is given up when a write to it takes longer,
    /// or when the origin has said nothing for this long since it was sent
    /// media (no acknowledgement, no answer to a ping).
    pub io_timeout: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            buffer_bytes: 64 << 20,
            busy_retry: Duration::from_millis(10),
            busy_retry_max: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            flush_timeout: Duration::from_secs(30),
            step_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(10),
        }
    }
}

/// Refusals in a row (not "already publishing") after which a relay gives
/// up and its publisher is told and closed.
const REFUSALS: u32 = 5;

/// Most media bytes the relay writes to the origin with one syscall.
const MAX_WRITE_BYTES: usize = 256 * 1024;

/// Acknowledgement window the relay asks of the origin: nginx-rtmp then
/// acknowledges every this many bytes, a sign of life while media flows
/// (pings cover slower streams).
const ACK_WINDOW: u32 = 256 * 1024;

/// A message waiting for the origin.
#[derive(Debug, Clone)]
pub struct Item {
    pub type_id: u8,
    pub timestamp: u32,
    pub payload: Bytes,
}

impl Item {
    fn kind(&self) -> Option<Kind> {
        match self.type_id {
            message::AUDIO => Some(Kind::Audio),
            message::VIDEO => Some(Kind::Video),
            _ => None,
        }
    }

    fn is_config(&self) -> bool {
        match self.kind() {
            Some(k) => media::is_sequence_header(k, &self.payload),
            None => true,
        }
    }
}

#[derive(Debug, Default)]
struct QueueInner {
    items: VecDeque<Item>,
    /// What the items cost: payloads plus [`budget::ITEM_OVERHEAD`] each.
    bytes: usize,
    closed: bool,
    overflowing: bool,
    /// An audio or video message (not configuration) has arrived.
    media_seen: bool,
    /// The relay gave up (the origin refuses the stream): why.
    failed: Option<String>,
    /// When the publisher left.
    closed_at: Option<Instant>,
    /// What reached the origin, for the next upstream session.
    config: Config,
    /// The relay's upstream writer while it is caught up (see [`Out`]).
    lent: Option<Box<Out>>,
}

/// Records in `config` and the relayed bytes what went out whole through `out`.
fn record_delivered(config: &mut Config, out: &mut Out, metrics: &Metrics) {
    let bytes = config.delivered(out.settle(), metrics);
    metrics.bytes_relayed.inc_by(bytes);
}

/// What `item` costs in a buffer.
fn cost(item: &Item) -> usize {
    item.payload.len() + budget::ITEM_OVERHEAD
}

/// The bounded queue between a session and its relay.
#[derive(Debug)]
pub struct Queue {
    inner: Mutex<QueueInner>,
    notify: Notify,
    first_media: Notify,
    closing: Notify,
    limit: usize,
    metrics: Metrics,
    budget: Arc<Budget>,
    /// Where the relay says it holds the stream and caught up.
    report: OnceLock<Arc<ConnStats>>,
    /// The stream, for logs written from other streams' tasks (the budget).
    stream: OnceLock<String>,
}

impl Queue {
    /// A queue of at most `limit` bytes under a budget of its own.
    pub fn new(limit: usize, metrics: Metrics) -> Arc<Self> {
        Self::with_budget(limit, metrics, &Budget::new(usize::MAX))
    }

    /// A queue of at most `limit` bytes that also counts against the
    /// pod-wide `budget` (which may shed its oldest GOPs).
    pub fn with_budget(limit: usize, metrics: Metrics, budget: &Arc<Budget>) -> Arc<Self> {
        let queue = Arc::new(Self {
            inner: Mutex::new(QueueInner::default()),
            notify: Notify::new(),
            first_media: Notify::new(),
            closing: Notify::new(),
            limit,
            metrics,
            budget: budget.clone(),
            report: OnceLock::new(),
            stream: OnceLock::new(),
        });
        budget.register(&queue);
        queue
    }

    /// Makes the relay report to `stats` whether it holds the stream at the
    /// origin with its backlog delivered ([`ConnStats::relay_caught_up`]).
    pub fn report_to(&self, stream: &str, stats: Arc<ConnStats>) {
        stats.relay_caught_up.store(false, Ordering::Relaxed);
        let _ = self.report.set(stats);
        let _ = self.stream.set(stream.to_owned());
    }

    fn set_caught_up(&self, yes: bool) {
        if let Some(stats) = self.report.get() {
            stats.relay_caught_up.store(yes, Ordering::Relaxed);
        }
    }

    fn is_empty(&self) -> bool {
        self.lock().items.is_empty()
    }

    fn lock(&self) -> MutexGuard<'_, QueueInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds messages in order and wakes the relay once. Never blocks: over
    /// the stream's limit or the pod's budget, whole GOPs are dropped from
    /// the front (configuration is kept; logged once per episode, counted
    /// in a metric). `Err` says why the relay gave up: the origin refuses
    /// the stream, and the publisher should be told and closed.
    pub fn push(&self, items: impl IntoIterator<Item = Item>) -> Result<(), String> {
        let mut q = self.lock();
        if let Some(why) = &q.failed {
            return Err(why.clone());
        }
        if q.closed {
            return Ok(());
        }
        let had_media = q.media_seen;
        let mut wake = false;
        let inner = &mut *q;
        if let Some(out) = inner.lent.as_mut().filter(|out| !out.stalled()) {
            // The relay is caught up: straight to the origin, without waking it.
            for item in items {
                inner.media_seen |= !item.is_config();
                out.queue(item);
            }
            out.try_write();
            record_delivered(&mut inner.config, out, &self.metrics);
            // What the socket did not take, or a failure, is the relay's to handle.
            wake = out.stalled();
        } else {
            for item in items {
                wake = true;
                q.media_seen |= !item.is_config();
                self.push_one(&mut q, item);
            }
        }
        let first_media = !had_media && q.media_seen;
        drop(q);
        if wake {
            self.notify.notify_one();
        }
        if first_media {
            self.first_media.notify_waiters();
        }
        if self.budget.used() > self.budget.limit() {
            self.budget.shed();
        }
        Ok(())
    }

    fn push_one(&self, q: &mut QueueInner, item: Item) {
        let c = cost(&item);
        q.bytes += c;
        q.items.push_back(item);
        self.metrics.relay_buffer_bytes.inc_by(c as i64);
        self.budget.charge(c);
        while q.bytes > self.limit {
            if self.drop_gop(q, "relay buffer full") == 0 {
                break;
            }
        }
    }

    /// What the queue holds, overhead included.
    fn cost(&self) -> usize {
        self.lock().bytes
    }

    /// Drops the oldest GOP (for the pod's budget). Returns the bytes freed.
    fn drop_oldest_gop(&self, why: &str) -> usize {
        self.drop_gop(&mut self.lock(), why)
    }

    /// Drops the media of the oldest GOP: from the front up to the next
    /// video keyframe (all of it for audio-only streams). Configuration
    /// (metadata, sequence headers) stays, the latest of each kind, so the
    /// origin can still decode what follows. Returns the bytes freed.
    fn drop_gop(&self, q: &mut QueueInner, why: &str) -> usize {
        let keyframe = |i: &Item| i.kind() == Some(Kind::Video) && media::is_video_keyframe(&i.payload);
        let mut kept: Vec<Item> = Vec::new();
        let (mut freed, mut media) = (0usize, false);
        while let Some(front) = q.items.front() {
            if media && !front.is_config() && keyframe(front) {
                break;
            }
            let Some(item) = q.items.pop_front() else { break };
            if item.is_config() {
                // A newer one of the same kind replaces an older one.
                if let Some(old) = kept.iter_mut().find(|k| k.type_id == item.type_id) {
                    freed += cost(old);
                    *old = item;
                } else {
                    kept.push(item);
                }
            } else {
                media = true;
                freed += cost(&item);
            }
        }
        for item in kept.into_iter().rev() {
            q.items.push_front(item);
        }
        if freed > 0 {
            if !q.overflowing {
                // Once per episode: until the relay has caught up again.
                let stream = self.stream.get().map_or("", String::as_str);
                warn!(
                    why,
                    stream, "dropping the oldest media of a stream until its next keyframe"
                );
                q.overflowing = true;
            }
            q.bytes -= freed;
            self.budget.release(freed);
            self.metrics.relay_dropped_bytes.inc_by(freed as u64);
            self.metrics.relay_buffer_bytes.dec_by(freed as i64);
        }
        freed
    }

    /// The relay gives up: the next push tells the session why.
    fn fail(&self, why: String) {
        self.lock().failed = Some(why);
    }

    /// No more messages will come (the publisher left).
    pub fn close(&self) {
        {
            let mut q = self.lock();
            q.closed = true;
            q.closed_at.get_or_insert_with(Instant::now);
        }
        self.notify.notify_one();
        self.closing.notify_waiters();
    }

    /// Resolves `timeout` after the publisher left.
    async fn flush_deadline(&self, timeout: Duration) {
        loop {
            // Registered before the check: a close in between still wakes it.
            let closing = self.closing.notified();
            let closed_at = self.lock().closed_at;
            if let Some(at) = closed_at {
                tokio::time::sleep_until(at + timeout).await;
                return;
            }
            closing.await;
        }
    }

    /// Moves up to `max_bytes` of messages (at least one) into `out`, waiting
    /// while the queue is empty. Nothing moved means the queue is closed and
    /// drained. The lent writer comes back first when a write through it
    /// stalled or failed, or the queue was closed.
    async fn take(&self, max_bytes: usize, out: &mut Vec<Item>) -> Option<Box<Out>> {
        loop {
            let notified = self.notify.notified();
            {
                let mut q = self.lock();
                if (q.lent.as_ref().is_some_and(|lent| lent.stalled()) || q.closed)
                    && let Some(lent) = q.lent.take()
                {
                    return Some(lent);
                }
                if !q.items.is_empty() {
                    let (mut taken, mut freed) = (0, 0);
                    while let Some(front) = q.items.front() {
                        if taken > 0 && taken + front.payload.len() > max_bytes {
                            break;
                        }
                        taken += front.payload.len();
                        freed += cost(front);
                        out.extend(q.items.pop_front());
                    }
                    q.bytes -= freed;
                    q.overflowing &= !q.items.is_empty();
                    self.budget.release(freed);
                    self.metrics.relay_buffer_bytes.dec_by(freed as i64);
                    return None;
                }
                if q.closed {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// Puts messages back at the front (after a failed write), leaving `items` empty.
    fn unget(&self, items: &mut Vec<Item>) {
        let mut q = self.lock();
        for item in items.drain(..).rev() {
            let c = cost(&item);
            q.bytes += c;
            self.budget.charge(c);
            self.metrics.relay_buffer_bytes.inc_by(c as i64);
            q.items.push_front(item);
        }
    }

    fn media_seen(&self) -> bool {
        self.lock().media_seen
    }

    /// Lends the relay's writer to the pushes (see [`Out`]); refused while
    /// anything waits in the queue, the writer has anything left to write,
    /// or the publisher left.
    fn lend(&self, out: Box<Out>) -> Result<(), Box<Out>> {
        let mut q = self.lock();
        if !q.items.is_empty() || q.closed || !out.inflight.is_empty() || out.writer.queued() > 0 {
            return Err(out);
        }
        q.lent = Some(out);
        Ok(())
    }

    /// The lent writer back, if it is lent.
    fn reclaim(&self) -> Option<Box<Out>> {
        self.lock().lent.take()
    }

    /// Records what went out whole through `out`.
    fn delivered(&self, out: &mut Out) {
        record_delivered(&mut self.lock().config, out, &self.metrics);
    }

    /// The configuration a new upstream session sends before media, if any
    /// media reached the origin before.
    fn replay(&self) -> Vec<Item> {
        let q = self.lock();
        if !q.config.delivered_any {
            return Vec::new();
        }
        q.config.items().cloned().collect()
    }

    /// Resolves once the first audio or video message has arrived.
    async fn media_arrived(&self) {
        loop {
            // Registered before the check: a push in between still wakes it.
            let notified = self.first_media.notified();
            if self.media_seen() {
                return;
            }
            notified.await;
        }
    }

    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        let q = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
        self.metrics.relay_buffer_bytes.dec_by(q.bytes as i64);
        self.budget.release(q.bytes);
    }
}

#[derive(Debug, Error)]
enum Error {
    #[error(transparent)]
    Conn(#[from] conn::Error),
    #[error("origin refused the publish: {0}")]
    Refused(String),
    #[error("origin is busy with this stream: {0}")]
    Busy(String),
    #[error("origin closed the connection")]
    Closed,
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("origin silent for {0:?}: no acknowledgement, no answer to a ping")]
    Silent(Duration),
}

impl From<client::Error> for Error {
    fn from(e: client::Error) -> Self {
        match e {
            client::Error::Conn(e) => Error::Conn(e),
            client::Error::Refused(why) => Error::Refused(why),
            client::Error::Busy(why) => Error::Busy(why),
            client::Error::Closed => Error::Closed,
            client::Error::Timeout(what) => Error::Timeout(what),
        }
    }
}

/// Configuration (metadata, sequence headers) last delivered, re-sent at the
/// start of every later upstream session.
#[derive(Debug, Default)]
struct Config {
    metadata: Option<Item>,
    video: Option<Item>,
    audio: Option<Item>,
    /// Some media reached the origin in an earlier session.
    delivered_any: bool,
    /// When the publish started, until its first audio or video reached
    /// the origin (`ingest_relay_first_delivery_seconds`).
    awaiting_first_media: Option<Instant>,
}

impl Config {
    /// Records the messages the origin got whole; returns their payload bytes.
    fn delivered(&mut self, items: impl IntoIterator<Item = Item>, metrics: &Metrics) -> u64 {
        let mut bytes = 0u64;
        for item in items {
            self.remember(&item);
            self.delivered_any = true;
            bytes += item.payload.len() as u64;
            if !item.is_config()
                && let Some(since) = self.awaiting_first_media.take()
            {
                metrics.relay_first_delivery.observe(since.elapsed().as_secs_f64());
            }
        }
        bytes
    }

    fn remember(&mut self, item: &Item) {
        match item.kind() {
            None if item.type_id == message::DATA_AMF0 => self.metadata = Some(item.clone()),
            Some(Kind::Video) if item.is_config() => self.video = Some(item.clone()),
            Some(Kind::Audio) if item.is_config() => self.audio = Some(item.clone()),
            _ => {}
        }
    }

    fn items(&self) -> impl Iterator<Item = &Item> {
        [&self.metadata, &self.video, &self.audio].into_iter().flatten()
    }
}

/// One relay: a publisher's stream, pushed from its queue to the origin.
pub struct Relay {
    pub url: RtmpUrl,
    /// When the publish started on this pod.
    pub since: Instant,
    pub queue: Arc<Queue>,
    pub cfg: RelayConfig,
    pub metrics: Metrics,
    pub stop: CancellationToken,
    /// Counts the relay as active while it runs.
    pub guard: RelayGuard,
    /// Where its log lines go. The relay is not instrumented with it: that
    /// would enter and leave the span on every poll, once per media tick.
    pub span: Span,
}

impl Relay {
    /// Runs until the queue is closed and delivered, or given up
    /// `flush_timeout` after the publisher left.
    pub async fn run(self) {
        // Bounds the whole flush, a wedged upstream session included: a drain
        // waits on this relay no longer.
        tokio::select! {
            () = deliver(&self) => {}
            () = self.queue.flush_deadline(self.cfg.flush_timeout) => {
                warn!(parent: &self.span, pending_bytes = self.queue.bytes(), "giving up delivering to the origin after the publisher left");
            }
        }
    }
}

/// Upstream sessions with retries, until delivered or stopped.
async fn deliver(relay: &Relay) {
    let Relay {
        queue,
        cfg,
        span,
        since,
        ..
    } = relay;
    queue.lock().config.awaiting_first_media = Some(*since);
    let mut retry = Retry::new(cfg);
    let mut attempt = 0u64;
    loop {
        attempt += 1;
        let media_before = queue.media_seen();
        // Whether the origin accepted the publish of this session.
        let mut published = false;
        let result = session(relay, &mut published).await;
        queue.set_caught_up(false);
        let wait_for_media = match result {
            Ok(()) => {
                info!(parent: span, "relay finished: everything delivered");
                return;
            }
            Err(err) => match retry.failed(relay, err, attempt, published, media_before) {
                Some(wait_for_media) => wait_for_media,
                None => return,
            },
        };
        if !retry.wait(relay, wait_for_media).await {
            return;
        }
    }
}

/// The waits between upstream sessions, and the origin's refusals in a row.
struct Retry {
    backoff: Duration,
    busy_wait: Duration,
    refusals: u32,
}

impl Retry {
    fn new(cfg: &RelayConfig) -> Self {
        Self {
            backoff: cfg.busy_retry,
            busy_wait: cfg.busy_retry,
            refusals: 0,
        }
    }

    /// Counts a failed session (attempt `attempt`; `published` if the
    /// origin had taken the stream) and sets the next wait. `None`: the
    /// origin refuses the stream, the relay gives up; else whether to retry
    /// as soon as the first media arrives.
    fn failed(&mut self, relay: &Relay, err: Error, attempt: u64, published: bool, media_before: bool) -> Option<bool> {
        let Relay {
            queue,
            cfg,
            metrics,
            span,
            ..
        } = relay;
        match err {
            Error::Busy(why) => {
                metrics.relay_retries.inc();
                debug!(parent: span, attempt, %why, retry_in = ?self.busy_wait, "origin busy with this stream, retrying");
                self.backoff = self.busy_wait;
                self.busy_wait = (self.busy_wait * 3 / 2).min(cfg.busy_retry_max.max(cfg.busy_retry));
                // A publisher moving make-before-break (Reconnect Request)
                // sends its first media here as it leaves its old pod, which
                // then releases the stream within milliseconds.
                Some(!media_before)
            }
            Error::Refused(why) if self.refusals + 1 >= REFUSALS => {
                // A rejected key, a missing app: retrying will not help.
                warn!(parent: span, %why, refusals = REFUSALS, "the origin refuses the stream: giving up");
                metrics.relay_refused.inc();
                queue.fail(format!("the origin refuses the stream: {why}"));
                None
            }
            err => {
                if matches!(err, Error::Refused(_)) {
                    self.refusals += 1;
                } else {
                    self.refusals = 0;
                }
                metrics.relay_retries.inc();
                self.busy_wait = cfg.busy_retry;
                if published {
                    // The origin worked until now: a new outage starts from the shortest wait.
                    metrics.relay_reconnects.inc();
                    self.backoff = cfg.busy_retry;
                }
                self.backoff = (self.backoff * 2).clamp(cfg.busy_retry, cfg.max_backoff);
                warn!(parent: span, attempt, %err, retry_in = ?self.backoff, "relay attempt failed");
                Some(false)
            }
        }
    }

    /// Waits out the backoff, or less once the first media arrives when
    /// `wait_for_media`; false when the relay is stopped meanwhile.
    async fn wait(&mut self, relay: &Relay, wait_for_media: bool) -> bool {
        let Relay {
            queue, cfg, stop, span, ..
        } = relay;
        let media_arrived = async {
            if wait_for_media {
                queue.media_arrived().await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = tokio::time::sleep(self.backoff) => {}
            () = media_arrived => {
                debug!(parent: span, "first media while the origin is busy: retrying soon");
                self.busy_wait = cfg.busy_retry;
                tokio::time::sleep(cfg.busy_retry).await;
            }
            () = stop.cancelled() => {
                warn!(parent: span, pending_bytes = queue.bytes(), "relay stopped before delivering everything");
                return false;
            }
        }
        true
    }
}

fn describe(command: &message::Command) -> String {
    let (code, desc) = client::status_text(command);
    format!("{code} {desc}").trim().to_owned()
}

/// Connects, publishes, and pumps the queue until it is closed and empty.
async fn session(relay: &Relay, published: &mut bool) -> Result<(), Error> {
    let Relay {
        url,
        queue,
        cfg,
        stop,
        span,
        ..
    } = relay;
    let client::Publishing {
        reader,
        writer,
        stream_id,
    } = client::publish(
        url,
        "FMLE/3.0 (compatible; lossless-ingest)",
        Vec::new(),
        cfg.step_timeout,
    )
    .await?;
    *published = true;
    info!(parent: span, origin = %url.addr(), "publishing to the origin");
    let mut up = Upstream {
        reader,
        out: Some(Box::new(Out::new(writer, stream_id))),
        live: Liveness::new(cfg.io_timeout),
        started: Instant::now(),
    };
    // Acknowledgements while media flows, and the answer to this first
    // ping, show that the origin's silence can be trusted later.
    up.out().writer.queue(&Message::WindowAckSize(ACK_WINDOW));
    up.ping().await?;
    // A later session: the origin needs the configuration again before media.
    for item in queue.replay() {
        up.out().writer.queue_raw(&raw(&item, stream_id));
    }
    let result = pump(&mut up, url, queue, stop).await;
    if result.is_err() {
        up.abandon(queue);
    }
    result
}

/// Sends the queue's messages as they come and answers the origin, until
/// the queue is closed and empty, the origin fails or goes silent.
async fn pump(up: &mut Upstream, url: &RtmpUrl, queue: &Queue, stop: &CancellationToken) -> Result<(), Error> {
    let mut items = Vec::new();
    // Caught up once per session: after that no extra look at the queue per batch.
    let mut caught_up = false;
    let mut tick = tokio::time::interval(up.live.tick());
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Registered once: a fresh `cancelled()` per message costs a lock each time.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        if caught_up {
            // Steady media: each push writes to the origin itself.
            up.lend(queue);
        }
        tokio::select! {
            biased;
            incoming = up.reader.next() => {
                up.reclaim(queue).await?;
                let msg = incoming?.ok_or(Error::Closed)?;
                up.live.heard(&msg);
                up.answer(msg).await?;
            }
            lent = queue.take(MAX_WRITE_BYTES, &mut items) => {
                if let Some(out) = lent {
                    up.take_back(out, queue).await?;
                    continue;
                }
                // Lent only while nothing waits in the queue: a no-op but for a close.
                up.reclaim(queue).await?;
                if items.is_empty() {
                    return up.finish(url).await;
                }
                up.write_batch(items.drain(..), queue).await?;
                if !caught_up && queue.is_empty() {
                    caught_up = true;
                    queue.set_caught_up(true);
                }
            }
            _ = tick.tick() => {
                up.reclaim(queue).await?;
                match up.live.check(Instant::now()) {
                    Check::Fine => {}
                    Check::Probe => up.ping().await?,
                    Check::Silent => return Err(Error::Silent(up.live.limit)),
                }
            }
            () = &mut stopped => return Err(Error::Closed),
        }
    }
}

/// The sending side of an upstream session. While the relay is caught up
/// it lends this to its queue: each push then writes straight to the
/// origin from the publisher's task instead of waking the relay's (one
/// task switch, its polls and a wake-up less per read). The relay takes it
/// back when a write could not finish, the origin speaks, liveness is due,
/// or the publisher leaves.
#[derive(Debug)]
struct Out {
    writer: Writer,
    sid: u32,
    /// Messages handed to `writer` and not yet out whole.
    inflight: VecDeque<Item>,
    /// Where each of them ends in the connection's output.
    ends: VecDeque<u64>,
    /// The first write while lent: the origin's silence counts from it.
    first_write: Option<Instant>,
    failed: Option<conn::Error>,
}

impl Out {
    fn new(writer: Writer, sid: u32) -> Self {
        Self {
            writer,
            sid,
            inflight: VecDeque::new(),
            ends: VecDeque::new(),
            first_write: None,
            failed: None,
        }
    }

    fn queue(&mut self, item: Item) {
        self.writer.queue_raw(&raw(&item, self.sid));
        self.ends
            .push_back(self.writer.bytes_out() + self.writer.queued() as u64);
        self.inflight.push_back(item);
    }

    /// A write while lent left a message the socket did not take whole, or
    /// failed: the rest is the relay's.
    fn stalled(&self) -> bool {
        self.failed.is_some() || !self.inflight.is_empty()
    }

    /// Removes and returns the messages out whole so far.
    fn settle(&mut self) -> impl Iterator<Item = Item> + '_ {
        let whole = written_whole(&self.ends, self.writer.bytes_out());
        self.ends.drain(..whole);
        self.inflight.drain(..whole)
    }

    /// Writes what the socket takes without waiting (a push while lent).
    fn try_write(&mut self) {
        let before = self.writer.bytes_out();
        if let Err(err) = self.writer.try_flush() {
            self.failed = Some(err);
        }
        if self.writer.bytes_out() > before {
            self.first_write.get_or_insert_with(Instant::now);
        }
    }
}

/// One upstream connection that publishes a stream.
struct Upstream {
    reader: Reader,
    /// `None` while lent to the queue.
    out: Option<Box<Out>>,
    live: Liveness,
    started: Instant,
}

impl Upstream {
    /// The sending side, which the pump takes back before any write.
    fn out(&mut self) -> &mut Out {
        self.out
            .as_mut()
            .expect("the relay takes its writer back before writing")
    }

    /// Lends the sending side to `queue` if it takes it.
    fn lend(&mut self, queue: &Queue) {
        if let Some(out) = self.out.take()
            && let Err(out) = queue.lend(out)
        {
            self.out = Some(out);
        }
    }

    /// Takes the sending side back from `queue` if it is lent.
    async fn reclaim(&mut self, queue: &Queue) -> Result<(), Error> {
        match queue.reclaim() {
            Some(out) => self.take_back(out, queue).await,
            None => Ok(()),
        }
    }

    /// Takes back the lent sending side and finishes what its pushes left.
    async fn take_back(&mut self, mut out: Box<Out>, queue: &Queue) -> Result<(), Error> {
        if let Some(at) = out.first_write.take() {
            self.live.wrote(at);
        }
        let failed = out.failed.take();
        self.out = Some(out);
        if let Some(err) = failed {
            return Err(err.into());
        }
        let result = self.flush().await;
        queue.delivered(self.out());
        result
    }

    /// After a failed session: counts what went out whole and puts back
    /// only what did not: resending what the origin may have recorded
    /// would duplicate it. A message cut short is resent whole; nginx-rtmp
    /// drops a message it got part of when the connection ends.
    fn abandon(&mut self, queue: &Queue) {
        let Some(mut out) = self.out.take().or_else(|| queue.reclaim()) else {
            return;
        };
        queue.delivered(&mut out);
        let mut rest: Vec<Item> = out.inflight.drain(..).collect();
        queue.unget(&mut rest);
    }

    /// Writes what is queued, failing when a write takes longer than the
    /// I/O timeout (an origin that stopped reading).
    async fn flush(&mut self) -> Result<(), Error> {
        let limit = self.live.limit;
        let writer = &mut self.out().writer;
        let written_before = writer.bytes_out();
        let result = match tokio::time::timeout(limit, writer.flush()).await {
            Ok(r) => r.map_err(Error::from),
            Err(_) => Err(Error::Timeout("writing to the origin")),
        };
        if writer.bytes_out() > written_before {
            self.live.wrote(Instant::now());
        }
        result
    }

    /// Queues `items` after what is queued already, flushes, and records
    /// what went out whole.
    async fn write_batch(&mut self, items: impl IntoIterator<Item = Item>, queue: &Queue) -> Result<(), Error> {
        let out = self.out();
        for item in items {
            out.queue(item);
        }
        let result = self.flush().await;
        queue.delivered(self.out());
        result
    }

    /// Sends a ping now: the origin's answer proves it still reads.
    async fn ping(&mut self) -> Result<(), Error> {
        let t = self.started.elapsed().as_millis() as u32;
        self.out()
            .writer
            .queue(&Message::UserControl(UserControl::PingRequest(t)));
        self.flush().await
    }

    /// Acts on a message from the origin.
    async fn answer(&mut self, msg: Message) -> Result<(), Error> {
        match msg {
            Message::UserControl(UserControl::PingRequest(t)) => {
                self.out()
                    .writer
                    .queue(&Message::UserControl(UserControl::PingResponse(t)));
                self.flush().await
            }
            Message::Command { command, .. } if command.name == "onStatus" => {
                let text = describe(&command);
                if text.contains("Error") || text.contains("Failed") || text.contains("BadName") {
                    return Err(Error::Refused(text));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Ends the publish cleanly: everything was delivered.
    async fn finish(&mut self, url: &RtmpUrl) -> Result<(), Error> {
        let limit = self.live.limit;
        let out = self.out();
        let stream = Value::string(url.stream.clone());
        let sid = Value::Number(f64::from(out.sid));
        out.writer
            .queue(&Message::command(0, "FCUnpublish", 5.0, vec![Value::Null, stream]));
        out.writer
            .queue(&Message::command(0, "deleteStream", 6.0, vec![Value::Null, sid]));
        self.flush().await?;
        match tokio::time::timeout(limit, self.out().writer.shutdown()).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(Error::Timeout("closing the upstream connection")),
        }
    }
}

/// How many messages ending at `ends` (positions in the connection's
/// output, in order) are complete once `bytes_out` bytes went out.
fn written_whole(ends: &VecDeque<u64>, bytes_out: u64) -> usize {
    ends.partition_point(|&end| end <= bytes_out)
}

/// What the origin's silence means: media went out and nothing came back.
#[derive(Debug)]
struct Liveness {
    limit: Duration,
    /// The first write since the origin last said anything.
    unanswered_since: Option<Instant>,
    /// A ping went out during the current silence.
    probed: bool,
    /// The origin has acknowledged or answered a ping on this connection.
    /// One that does neither can be judged only by its writes: its
    /// silence alone is no sign of failure.
    answers: bool,
}

/// What to do about the origin's silence now.
#[derive(Debug, PartialEq, Eq)]
enum Check {
    Fine,
    /// Silent for half the limit: ask with a ping.
    Probe,
    /// Silent for the whole limit: give the connection up.
    Silent,
}

impl Liveness {
    fn new(limit: Duration) -> Self {
        Self {
            limit,
            unanswered_since: None,
            probed: false,
            answers: false,
        }
    }

    /// How often to check: silence is noticed within 1¼ limits.
    fn tick(&self) -> Duration {
        (self.limit / 4).max(Duration::from_millis(10))
    }

    fn heard(&mut self, msg: &Message) {
        self.unanswered_since = None;
        self.probed = false;
        self.answers |= matches!(
            msg,
            Message::Acknowledgement(_) | Message::UserControl(UserControl::PingResponse(_))
        );
    }

    fn wrote(&mut self, now: Instant) {
        self.unanswered_since.get_or_insert(now);
    }

    fn check(&mut self, now: Instant) -> Check {
        let Some(since) = self.unanswered_since else {
            return Check::Fine;
        };
        let quiet = now.saturating_duration_since(since);
        if quiet >= self.limit && self.answers {
            return Check::Silent;
        }
        if quiet >= self.limit / 2 && !self.probed {
            self.probed = true;
            return Check::Probe;
        }
        Check::Fine
    }
}

fn raw(item: &Item, stream_id: u32) -> RawMessage {
    let csid = match item.type_id {
        message::AUDIO => CSID_AUDIO,
        message::VIDEO => CSID_VIDEO,
        _ => CSID_DATA,
    };
    RawMessage {
        csid,
        timestamp: item.timestamp,
        type_id: item.type_id,
        stream_id,
        payload: item.payload.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stress::{lcg, rounds};

    fn video(key: bool, len: usize) -> Item {
        let mut p = vec![if key { 0x17 } else { 0x27 }, 1];
        p.resize(len, 0);
        Item {
            type_id: message::VIDEO,
            timestamp: 0,
            payload: Bytes::from(p),
        }
    }

    const O: usize = budget::ITEM_OVERHEAD;

    fn audio_header() -> Item {
        // An AAC sequence header.
        Item {
            type_id: message::AUDIO,
            timestamp: 0,
            payload: Bytes::from_static(&[0xaf, 0, 0x12, 0x10]),
        }
    }

    /// The relay's sending side on one end of a loopback connection, its
    /// reading side, and the origin's end.
    async fn upstream() -> (Box<Out>, Reader, tokio::net::TcpStream) {
        upstream_with(None).await
    }

    /// [`upstream`] with a send buffer of `send_buffer` bytes (small: writes stall often).
    async fn upstream_with(send_buffer: Option<usize>) -> (Box<Out>, Reader, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ours, theirs) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let ours = ours.unwrap();
        if let Some(size) = send_buffer {
            socket2::SockRef::from(&ours).set_send_buffer_size(size).unwrap();
        }
        let (reader, writer) = conn::transport(ours);
        (Box::new(Out::new(writer, 1)), reader, theirs.unwrap().0)
    }

    /// A relay's session on [`upstream_with`]'s connection, ready to pump.
    async fn session_with(send_buffer: Option<usize>) -> (Upstream, tokio::net::TcpStream) {
        let (out, reader, origin) = upstream_with(send_buffer).await;
        let up = Upstream {
            reader,
            out: Some(out),
            live: Liveness::new(Duration::from_secs(10)),
            started: Instant::now(),
        };
        (up, origin)
    }

    /// The next `n` messages the origin's end receives.
    async fn received(origin: &mut tokio::net::TcpStream, n: usize) -> Vec<RawMessage> {
        use tokio::io::AsyncReadExt;
        let mut chunks = ingest_rtmp::chunk::ChunkReader::new(ingest_rtmp::chunk::Limits::default());
        let mut buf = bytes::BytesMut::new();
        let mut got = Vec::new();
        let reading = async {
            while got.len() < n {
                while let Some(msg) = chunks.read(&mut buf).unwrap() {
                    got.push(msg);
                }
                if got.len() < n {
                    assert!(origin.read_buf(&mut buf).await.unwrap() > 0, "closed early");
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), reading)
            .await
            .expect("the messages arrive");
        got
    }

    fn numbered(timestamp: u32, len: usize) -> Item {
        Item {
            timestamp,
            ..video(false, len)
        }
    }

    #[tokio::test]
    async fn pushes_while_the_writer_is_lent_go_straight_to_the_origin_and_wake_nobody() {
        let metrics = Metrics::default();
        let q = Queue::new(10_000, metrics.clone());
        let (out, _reader, mut origin) = upstream().await;
        q.lend(out).expect("an empty queue takes the writer");
        q.push([audio_header(), numbered(1, 300)]).expect("alive");
        q.push([numbered(2, 300)]).expect("alive");
        let got = received(&mut origin, 3).await;
        assert_eq!(got.iter().map(|m| m.timestamp).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(got[0].payload, audio_header().payload);
        assert!(got.iter().all(|m| m.stream_id == 1));
        assert_eq!(q.bytes(), 0, "nothing waits in the queue");
        assert_eq!(metrics.bytes_relayed.get(), 604);
        // What reached the origin is what a later session starts with.
        assert_eq!(q.replay().len(), 1);
        assert!(q.replay()[0].is_config());
        // The relay is not woken for these.
        let mut items = Vec::new();
        let woken = tokio::time::timeout(Duration::from_millis(100), q.take(usize::MAX, &mut items)).await;
        assert!(woken.is_err(), "the relay was woken");
        // A close brings the writer back to the relay, which finishes the publish.
        q.close();
        let lent = q.take(usize::MAX, &mut items).await;
        assert!(lent.is_some_and(|out| out.inflight.is_empty() && !out.stalled()));
    }

    #[tokio::test]
    async fn a_push_the_socket_cannot_take_wakes_the_relay_and_nothing_is_lost_or_reordered() {
        let metrics = Metrics::default();
        let q = Queue::new(64 << 20, metrics.clone());
        let (out, reader, mut origin) = upstream().await;
        q.lend(out).expect("an empty queue takes the writer");
        // The origin does not read: the socket's buffers fill until a push stalls.
        let mut pushed = 0;
        while q.lock().lent.as_ref().is_none_or(|out| !out.stalled()) {
            q.push([numbered(pushed, 64 * 1024)]).expect("alive");
            pushed += 1;
            assert!(pushed < 10_000, "the socket never filled");
        }
        // Later pushes wait in the queue, behind what the socket did not take.
        q.push([numbered(pushed, 100)]).expect("alive");
        pushed += 1;
        assert_eq!(q.lock().items.len(), 1);
        let mut items = Vec::new();
        let lent = tokio::time::timeout(Duration::from_secs(5), q.take(usize::MAX, &mut items))
            .await
            .expect("the relay is woken")
            .expect("its writer comes back first");
        assert!(items.is_empty());
        assert!(!lent.inflight.is_empty());
        let reading = tokio::spawn(async move { received(&mut origin, pushed as usize).await });
        // The relay finishes the stalled write, then sends what waited.
        let mut up = Upstream {
            reader,
            out: None,
            live: Liveness::new(Duration::from_secs(10)),
            started: Instant::now(),
        };
        up.take_back(lent, &q).await.expect("the origin reads again");
        assert!(up.out().inflight.is_empty());
        assert!(q.take(usize::MAX, &mut items).await.is_none());
        up.write_batch(items.drain(..), &q).await.expect("written");
        let got = reading.await.expect("join");
        assert_eq!(
            got.iter().map(|m| m.timestamp).collect::<Vec<_>>(),
            (0..pushed).collect::<Vec<_>>()
        );
        assert_eq!(metrics.bytes_relayed.get(), u64::from(pushed - 1) * 64 * 1024 + 100);
    }

    #[tokio::test]
    async fn a_push_that_fails_puts_back_only_what_did_not_go_out_whole() {
        let metrics = Metrics::default();
        let q = Queue::new(64 << 20, metrics.clone());
        let (out, reader, origin) = upstream().await;
        q.lend(out).expect("an empty queue takes the writer");
        q.push([numbered(0, 1000)]).expect("alive");
        drop(origin);
        // Writes fail once the reset of the closed end came back.
        let mut pushed = 1;
        while q.lock().lent.as_ref().is_none_or(|out| out.failed.is_none()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
            q.push([numbered(pushed, 1000)]).expect("alive");
            pushed += 1;
            assert!(pushed < 1000, "writes to a closed peer never failed");
        }
        q.push([numbered(pushed, 1000)]).expect("alive");
        pushed += 1;
        let mut items = Vec::new();
        let lent = q.take(usize::MAX, &mut items).await.expect("the writer comes back");
        let mut up = Upstream {
            reader,
            out: None,
            live: Liveness::new(Duration::from_secs(10)),
            started: Instant::now(),
        };
        assert!(up.take_back(lent, &q).await.is_err(), "the failure is the relay's");
        up.abandon(&q);
        // Every message is either out whole (counted) or back in the queue, in order.
        let out_whole = (metrics.bytes_relayed.get() / 1000) as u32;
        q.close();
        assert!(q.take(usize::MAX, &mut items).await.is_none());
        assert_eq!(
            items.iter().map(|i| i.timestamp).collect::<Vec<_>>(),
            (out_whole..pushed).collect::<Vec<_>>()
        );
        assert!(!items.is_empty(), "the failed write is resent");
    }

    #[tokio::test]
    async fn overflow_drops_whole_gops_from_the_front() {
        let metrics = Metrics::default();
        let q = Queue::new(1000 + 3 * O, metrics.clone());
        q.push([video(true, 300), video(false, 300)]).expect("alive");
        q.push([video(false, 300)]).expect("alive");
        q.push([video(true, 300)]).expect("alive"); // over the limit: the first GOP goes
        assert_eq!(q.bytes(), 300 + O);
        assert_eq!(metrics.relay_dropped_bytes.get(), 900 + 3 * O as u64);
        let mut items = Vec::new();
        q.take(usize::MAX, &mut items).await;
        assert_eq!(items.len(), 1);
        assert!(media::is_video_keyframe(&items[0].payload));
        q.close();
        items.clear();
        q.take(usize::MAX, &mut items).await;
        assert!(items.is_empty());
        assert_eq!(metrics.relay_buffer_bytes.get(), 0);
    }

    #[tokio::test]
    async fn unget_restores_order() {
        let q = Queue::new(10_000, Metrics::default());
        q.push((0..3u8).map(|i| Item {
            type_id: message::AUDIO,
            timestamp: u32::from(i),
            payload: Bytes::from(vec![0xaf, 1, i]),
        }))
        .expect("alive");
        let mut first = Vec::new();
        q.take(3, &mut first).await;
        assert_eq!(first.len(), 1);
        q.unget(&mut first);
        let mut all = Vec::new();
        q.take(usize::MAX, &mut all).await;
        assert_eq!(all.iter().map(|i| i.timestamp).collect::<Vec<_>>(), vec![0, 1, 2]);
    }

    #[test]
    fn only_messages_that_went_out_whole_count_as_written() {
        // Three messages of 100 bytes on the wire after 40 bytes queued before them.
        let ends = VecDeque::from([140, 240, 340]);
        assert_eq!(written_whole(&ends, 0), 0);
        assert_eq!(written_whole(&ends, 139), 0, "the first one cut short");
        assert_eq!(written_whole(&ends, 140), 1);
        assert_eq!(written_whole(&ends, 300), 2);
        assert_eq!(written_whole(&ends, 340), 3);
    }

    #[tokio::test]
    async fn a_write_that_failed_partway_puts_back_only_what_did_not_go_out_whole() {
        let q = Queue::new(10_000, Metrics::default());
        q.push((0..5u8).map(|i| Item {
            type_id: message::AUDIO,
            timestamp: u32::from(i),
            payload: Bytes::from(vec![0xaf, 1, i]),
        }))
        .expect("alive");
        let mut batch = Vec::new();
        q.take(usize::MAX, &mut batch).await;
        // The connection broke inside the third message.
        let written = written_whole(&VecDeque::from([10, 20, 30, 40, 50]), 25);
        batch.drain(..written);
        q.unget(&mut batch);
        let mut again = Vec::new();
        q.take(usize::MAX, &mut again).await;
        assert_eq!(again.iter().map(|i| i.timestamp).collect::<Vec<_>>(), vec![2, 3, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn silence_counts_only_after_media_went_out_and_only_from_an_origin_that_answers() {
        let limit = Duration::from_secs(10);
        let mut live = Liveness::new(limit);
        let t0 = Instant::now();
        // Nothing sent (an idle publisher): nothing expected.
        assert_eq!(live.check(t0 + limit * 5), Check::Fine);
        live.wrote(t0);
        live.wrote(t0 + limit / 4); // the silence started with the first write
        assert_eq!(live.check(t0 + limit / 4), Check::Fine);
        assert_eq!(live.check(t0 + limit / 2), Check::Probe);
        assert_eq!(live.check(t0 + limit * 3 / 4), Check::Fine, "one ping per silence");
        // An origin that never acknowledged nor answered a ping is judged by its writes only.
        assert_eq!(live.check(t0 + limit * 2), Check::Fine);
        live.heard(&Message::UserControl(UserControl::PingResponse(0)));
        assert_eq!(live.check(t0 + limit * 3), Check::Fine, "it spoke: no silence");
        let t1 = t0 + limit * 3;
        live.wrote(t1);
        assert_eq!(live.check(t1 + limit / 2), Check::Probe);
        assert_eq!(live.check(t1 + limit), Check::Silent);
        // Anything from the origin ends a silence; only acknowledgements and pongs show it answers.
        let mut other = Liveness::new(limit);
        other.heard(&Message::SetChunkSize(4096));
        other.wrote(t0);
        assert_eq!(other.check(t0 + limit), Check::Probe);
        assert_eq!(other.check(t0 + limit * 2), Check::Fine);
        other.heard(&Message::Acknowledgement(1));
        other.wrote(t0 + limit * 2);
        assert_eq!(other.check(t0 + limit * 3), Check::Silent);
    }

    #[tokio::test(start_paused = true)]
    async fn the_flush_deadline_runs_from_the_moment_the_publisher_left() {
        let q = Queue::new(10_000, Metrics::default());
        let timeout = Duration::from_secs(30);
        let deadline = tokio::spawn({
            let q = q.clone();
            async move { q.flush_deadline(timeout).await }
        });
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(!deadline.is_finished(), "no deadline while the publisher is there");
        q.close();
        let left = Instant::now();
        deadline.await.expect("join");
        assert_eq!(left.elapsed(), timeout);
    }

    #[tokio::test]
    async fn the_first_media_wakes_a_waiter_and_configuration_does_not() {
        let q = Queue::new(10_000, Metrics::default());
        let waiting = tokio::spawn({
            let q = q.clone();
            async move { q.media_arrived().await }
        });
        tokio::task::yield_now().await;
        // Metadata and sequence headers come before media on a new connection.
        q.push([
            Item {
                type_id: message::DATA_AMF0,
                timestamp: 0,
                payload: Bytes::from_static(b"meta"),
            },
            // An AVC sequence header.
            Item {
                type_id: message::VIDEO,
                timestamp: 0,
                payload: Bytes::from_static(&[0x17, 0, 0, 0, 0]),
            },
        ])
        .expect("alive");
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "configuration is not media");
        assert!(!q.media_seen());
        q.push([video(false, 10)]).expect("alive");
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken by the first media")
            .expect("join");
        assert!(q.media_seen());
        // Later waits resolve at once.
        tokio::time::timeout(Duration::from_secs(5), q.media_arrived())
            .await
            .expect("already seen");
    }

    #[tokio::test]
    async fn configuration_survives_overflow_and_empty_messages_count() {
        let metrics = Metrics::default();
        let q = Queue::new(2000, metrics.clone());
        q.push([audio_header(), video(true, 300)]).expect("alive");
        // A flood of empty audio messages: each costs its overhead.
        q.push((0..100).map(|_| Item {
            type_id: message::AUDIO,
            timestamp: 0,
            payload: Bytes::new(),
        }))
        .expect("alive");
        assert!(q.bytes() <= 2000, "{} bytes held over a 2000 limit", q.bytes());
        let mut items = Vec::new();
        q.close();
        q.take(usize::MAX, &mut items).await;
        assert!(
            items[0].is_config(),
            "the sequence header is kept first: {:?}",
            items[0]
        );
    }

    #[tokio::test]
    async fn the_pod_budget_sheds_the_stream_holding_most() {
        let metrics = Metrics::default();
        let budget = Budget::new(3000 + 8 * O);
        let big = Queue::with_budget(1 << 20, metrics.clone(), &budget);
        let small = Queue::with_budget(1 << 20, metrics.clone(), &budget);
        big.push([audio_header(), video(true, 1000), video(false, 500), video(true, 1000)])
            .expect("alive");
        small.push([video(true, 400)]).expect("alive");
        assert_eq!(metrics.relay_dropped_bytes.get(), 0, "within the budget");
        // Over the budget: the big stream loses its first GOP, the small one nothing.
        small.push([video(false, 400)]).expect("alive");
        assert!(
            budget.used() <= budget.limit(),
            "{} > {}",
            budget.used(),
            budget.limit()
        );
        assert_eq!(small.bytes(), 800 + 2 * O);
        assert_eq!(metrics.relay_dropped_bytes.get(), 1500 + 2 * O as u64);
        let mut items = Vec::new();
        big.take(usize::MAX, &mut items).await;
        assert!(items[0].is_config() && media::is_video_keyframe(&items[1].payload));
        drop((big, small));
        items.clear();
        assert_eq!(budget.used(), 0, "every byte given back");
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_media_delivered_is_timed_once_from_the_publish_start() {
        let metrics = Metrics::default();
        let mut config = Config {
            awaiting_first_media: Some(Instant::now()),
            ..Config::default()
        };
        let first = "ingest_relay_first_delivery_seconds_count";
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The origin was busy until now; configuration goes out before media.
        assert_eq!(config.delivered([audio_header()], &metrics), 4);
        assert!(
            metrics.scrape().contains(&format!("{first} 0\n")),
            "configuration is not media"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        config.delivered([video(true, 10), video(false, 10)], &metrics);
        // An upstream reconnect later delivers media again: not a first delivery.
        tokio::time::sleep(Duration::from_secs(5)).await;
        config.delivered([video(true, 10)], &metrics);
        let text = metrics.scrape();
        assert!(text.contains(&format!("{first} 1\n")), "{text}");
        assert!(text.contains("ingest_relay_first_delivery_seconds_sum 0.5\n"), "{text}");
        assert!(
            text.contains("ingest_relay_first_delivery_seconds_bucket{le=\"0.256\"} 0\n")
                && text.contains("ingest_relay_first_delivery_seconds_bucket{le=\"0.512\"} 1\n"),
            "{text}"
        );
    }

    /// Pushes messages 0..n of random sizes in random batches at random
    /// moments, then closes the queue; counts the pushes that went
    /// straight through (the writer still lent, not stalled, after them).
    fn spawn_pusher(q: &Arc<Queue>, n: u32, mut seed: u64) -> tokio::task::JoinHandle<u32> {
        let q = q.clone();
        tokio::spawn(async move {
            let mut through = 0;
            let mut i = 0u32;
            while i < n {
                let batch = 1 + lcg(&mut seed) % 4;
                let mut items = Vec::new();
                for _ in 0..batch {
                    if i < n {
                        let len = 10 + (lcg(&mut seed) % 20_000) as usize;
                        items.push(numbered(i, len));
                        i += 1;
                    }
                }
                q.push(items).expect("alive");
                if q.lock().lent.as_ref().is_some_and(|out| !out.stalled()) {
                    through += 1;
                }
                match lcg(&mut seed) % 8 {
                    0 => tokio::time::sleep(Duration::from_millis(1)).await,
                    1..=3 => tokio::task::yield_now().await,
                    _ => {}
                }
            }
            q.close();
            through
        })
    }

    /// Sends the origin's Acknowledgement, or with `pings` half the time a
    /// PingRequest, unless the socket cannot take it now.
    fn send_one(w: &mut ingest_rtmp::chunk::ChunkWriter, origin: &tokio::net::TcpStream, pings: bool, seed: &mut u64) {
        let msg = if !pings || lcg(seed).is_multiple_of(2) {
            Message::Acknowledgement(1)
        } else {
            Message::UserControl(UserControl::PingRequest(1))
        };
        let mut out = bytes::BytesMut::new();
        w.write(&msg.encode(), &mut out);
        // Never blocks the origin's reading: a write the socket cannot take is skipped.
        let _ = origin.try_write(&out);
    }

    /// A slow origin that speaks: it reads at random moments, sends an
    /// Acknowledgement (or, with `pings`, sometimes a PingRequest) now and
    /// then, and after `reset_after` bytes resets the connection (linger 0).
    /// Returns the timestamps of the video messages it got whole.
    fn spawn_origin(
        mut theirs: tokio::net::TcpStream,
        mut seed: u64,
        reset_after: usize,
        pings: bool,
    ) -> tokio::task::JoinHandle<Vec<u32>> {
        use tokio::io::AsyncReadExt;
        tokio::spawn(async move {
            let mut chunks = ingest_rtmp::chunk::ChunkReader::new(ingest_rtmp::chunk::Limits::default());
            let mut w = ingest_rtmp::chunk::ChunkWriter::default();
            let mut buf = bytes::BytesMut::new();
            let mut got = Vec::new();
            let mut read = 0usize;
            loop {
                while let Some(msg) = chunks.read(&mut buf).unwrap() {
                    if msg.type_id == message::VIDEO {
                        got.push(msg.timestamp);
                    }
                }
                if read >= reset_after {
                    let _ = socket2::SockRef::from(&theirs).set_linger(Some(Duration::ZERO));
                    break;
                }
                match lcg(&mut seed) % 16 {
                    0 => tokio::time::sleep(Duration::from_millis(3)).await,
                    1 => send_one(&mut w, &theirs, pings, &mut seed),
                    2 if pings => send_one(&mut w, &theirs, pings, &mut seed),
                    _ => {}
                }
                buf.reserve(64 * 1024);
                match theirs.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => read += k,
                }
            }
            got
        })
    }

    /// The pump with its writer lent and taken back at random moments: a
    /// slow origin (stalls), one that speaks (acks, pings: take-backs),
    /// pushes of random sizes from another task, then the close.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn write_through_under_stalls_and_take_backs_keeps_every_message_once_in_order() {
        let mut through = 0;
        for round in 0..rounds(12) {
            let metrics = Metrics::default();
            let q = Queue::new(1 << 30, metrics.clone());
            // Every other round a small send buffer: pushes stall often.
            let (mut up, theirs) = session_with((round % 2 == 0).then_some(32 * 1024)).await;
            let url = RtmpUrl::parse("rtmp://127.0.0.1/app/s").unwrap();
            let stop = CancellationToken::new();
            let n = 2000u32;
            let pusher = spawn_pusher(&q, n, round * 7919 + 1);
            let origin = spawn_origin(theirs, round * 31 + 5, usize::MAX, true);
            let result = tokio::time::timeout(Duration::from_secs(20), pump(&mut up, &url, &q, &stop)).await;
            let Ok(result) = result else {
                let inner = q.lock();
                panic!(
                    "round {round}: the pump hangs: queue holds {} items, closed {}, lent {:?}, relay holds {:?}, pusher done {}",
                    inner.items.len(),
                    inner.closed,
                    inner
                        .lent
                        .as_ref()
                        .map(|o| (o.inflight.len(), o.writer.queued(), o.failed.is_some())),
                    up.out.as_ref().map(|o| (o.inflight.len(), o.writer.queued())),
                    pusher.is_finished(),
                );
            };
            result.expect("delivered");
            through += pusher.await.expect("join");
            drop(up);
            let got = origin.await.expect("join");
            assert_eq!(got.len(), n as usize, "round {round}: count");
            for (i, t) in got.iter().enumerate() {
                assert_eq!(*t, i as u32, "round {round}: message {i} out of order or duplicated");
            }
            assert_eq!(q.bytes(), 0);
            assert_eq!(metrics.relay_buffer_bytes.get(), 0);
        }
        assert!(
            through > 0,
            "no push went straight through: the write-through path was never taken"
        );
    }

    /// As above, but the origin resets the connection at random points:
    /// across the sessions the origin never gets a message twice or out of
    /// order, and the last one arrives.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn write_through_across_resets_never_duplicates_or_reorders() {
        for round in 0..rounds(8) {
            let metrics = Metrics::default();
            let q = Queue::new(1 << 30, metrics.clone());
            let url = RtmpUrl::parse("rtmp://127.0.0.1/app/s").unwrap();
            let stop = CancellationToken::new();
            let n = 1500u32;
            let pusher = spawn_pusher(&q, n, round * 7919 + 11);
            let mut all = Vec::new();
            let mut seed = round * 13 + 7;
            for attempt in 0.. {
                assert!(attempt < 200, "round {round}: never delivered");
                let (mut up, theirs) = session_with(Some(32 * 1024)).await;
                // Some connections are reset after a random number of bytes.
                let budget = if lcg(&mut seed).is_multiple_of(3) {
                    usize::MAX
                } else {
                    (lcg(&mut seed) % 3_000_000) as usize
                };
                let origin_seed = lcg(&mut seed);
                let origin = spawn_origin(theirs, origin_seed, budget, false);
                let result = tokio::time::timeout(Duration::from_secs(30), pump(&mut up, &url, &q, &stop))
                    .await
                    .expect("the pump ends");
                if result.is_err() {
                    up.abandon(&q);
                }
                drop(up);
                let got = origin.await.expect("join");
                // Within one connection nothing is missing: only what was
                // on its way when it was reset can be.
                for pair in got.windows(2) {
                    assert_eq!(pair[0] + 1, pair[1], "round {round}, connection {attempt}: a gap");
                }
                all.extend(got);
                if result.is_ok() {
                    break;
                }
            }
            pusher.await.expect("join");
            for pair in all.windows(2) {
                assert!(
                    pair[0] < pair[1],
                    "round {round}: {} then {}: duplicated or reordered",
                    pair[0],
                    pair[1]
                );
            }
            assert_eq!(all.last(), Some(&(n - 1)), "round {round}");
            assert_eq!(q.bytes(), 0);
            assert_eq!(metrics.relay_buffer_bytes.get(), 0);
        }
    }

    #[tokio::test]
    async fn a_failed_relay_refuses_the_next_push() {
        let q = Queue::new(10_000, Metrics::default());
        q.fail("the origin refuses the stream: NetStream.Publish.BadName".into());
        let err = q.push([video(true, 10)]).expect_err("failed");
        assert!(err.contains("BadName"), "{err}");
    }
}
