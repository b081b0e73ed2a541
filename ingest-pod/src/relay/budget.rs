//! One memory budget for every relay buffer of the pod. A per-stream cap
//! alone lets a few hundred streams buffering through an origin outage
//! outgrow the container's memory limit; the budget sheds whole GOPs from
//! the streams holding most, so the pod survives and keeps every publisher.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use super::Queue;

/// What one buffered message costs besides its payload: the `Item` in the
/// queue and the allocation holding the payload. Counted so that a flood
/// of empty messages is bounded too.
pub(super) const ITEM_OVERHEAD: usize = 64;

/// Budget when no container limit can be read and none is configured.
pub(super) const DEFAULT_BUDGET: usize = 512 << 20;

/// The pod-wide budget of relay buffers.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
    queues: Mutex<Vec<Weak<Queue>>>,
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
            queues: Mutex::new(Vec::new()),
        })
    }

    /// The budget in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes the relay buffers hold now, overhead included.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub(super) fn register(&self, queue: &Arc<Queue>) {
        let mut queues = self.lock();
        queues.retain(|q| q.strong_count() > 0);
        queues.push(Arc::downgrade(queue));
    }

    pub(super) fn charge(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(super) fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Over the budget, drops the oldest GOP of the stream holding most
    /// until under it again. Called by a queue after it released its lock
    /// (this takes the other queues' locks one at a time).
    pub(super) fn shed(&self) {
        while self.used() > self.limit {
            let biggest = {
                let queues = self.lock();
                queues.iter().filter_map(Weak::upgrade).max_by_key(|q| q.cost())
            };
            let Some(queue) = biggest else { return };
            if queue.drop_oldest_gop("the pod's relay memory budget is full") == 0 {
                // Only configuration is left anywhere: nothing more to shed.
                return;
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Weak<Queue>>> {
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The default budget: half the container's memory limit when one is set
/// (the rest is the runtime, sockets and per-connection buffers), else
/// [`DEFAULT_BUDGET`].
pub fn default_budget() -> usize {
    memory_limit(Path::new("/proc/self/cgroup"), Path::new("/sys/fs/cgroup")).map_or(DEFAULT_BUDGET, |l| l / 2)
}

/// This process's cgroup memory limit (v2 `memory.max`, v1
/// `memory.limit_in_bytes`), if one is set.
fn memory_limit(proc_cgroup: &Path, root: &Path) -> Option<usize> {
    let own = std::fs::read_to_string(proc_cgroup).unwrap_or_default();
    let mut candidates = Vec::new();
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        if controllers.is_empty() {
            candidates.push(root.join(path).join("memory.max"));
        } else if controllers.split(',').any(|c| c == "memory") {
            candidates.push(root.join("memory").join(path).join("memory.limit_in_bytes"));
        }
    }
    // In a container the cgroup namespace shows its own cgroup as the root.
    candidates.push(root.join("memory.max"));
    candidates.push(root.join("memory/memory.limit_in_bytes"));
    candidates
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .filter_map(|s| s.trim().parse::<u64>().ok())
        // "max" does not parse; v1 writes an unlimited limit as ~2^63.
        .find(|&l| l < 1 << 60)
        .and_then(|l| usize::try_from(l).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_limit_of_its_own_cgroup_v1_and_v2() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let proc = root.join("cgroup");
        std::fs::create_dir_all(root.join("memory/kubepods/pod1")).expect("dirs");
        std::fs::write(root.join("memory/memory.limit_in_bytes"), "9223372036854771712\n").expect("write");
        std::fs::write(root.join("memory/kubepods/pod1/memory.limit_in_bytes"), "1073741824\n").expect("write");
        std::fs::write(&proc, "9:memory:/kubepods/pod1\n1:cpu:/\n").expect("write");
        assert_eq!(memory_limit(&proc, root), Some(1 << 30));

        std::fs::write(&proc, "0::/slice/pod2\n").expect("write");
        std::fs::create_dir_all(root.join("slice/pod2")).expect("dirs");
        std::fs::write(root.join("slice/pod2/memory.max"), "max\n").expect("write");
        assert_eq!(memory_limit(&proc, root), None, "unlimited everywhere");
        std::fs::write(root.join("slice/pod2/memory.max"), "536870912\n").expect("write");
        assert_eq!(memory_limit(&proc, root), Some(512 << 20));
    }
}
