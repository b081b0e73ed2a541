//! WatchStatus followers: one task per (drain, pod) that wakes the drain's
//! reconcile whenever the pod reports a change.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::task::JoinHandle;

use crate::crd::IngestDrain;
use crate::pods::PodClient;

/// The followers of every running drain, by `namespace/drain/pod`.
pub(crate) struct Followers {
    tasks: Mutex<HashMap<String, JoinHandle<()>>>,
    wake: UnboundedSender<ObjectRef<IngestDrain>>,
}

impl Followers {
    /// No followers yet; the receiver gets the drains to reconcile.
    pub(crate) fn new() -> (Self, UnboundedReceiver<ObjectRef<IngestDrain>>) {
        let (wake, rx) = unbounded_channel();
        (
            Self {
                tasks: Default::default(),
                wake,
            },
            rx,
        )
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, JoinHandle<()>>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Follows the pod's status for `drain` unless already following.
    pub(super) fn follow(&self, drain: &IngestDrain, pod: &str, mut client: PodClient) {
        let key = format!("{}/{}/{pod}", drain.namespace().unwrap_or_default(), drain.name_any());
        let mut tasks = self.lock();
        tasks.retain(|_, t| !t.is_finished());
        if tasks.contains_key(&key) {
            return;
        }
        let target = ObjectRef::from_obj(drain);
        let wake = self.wake.clone();
        tasks.insert(
            key,
            tokio::spawn(async move {
                let Ok(mut stream) = client.watch().await else { return };
                while let Ok(Some(_)) = stream.message().await {
                    if wake.send(target.clone()).is_err() {
                        return;
                    }
                }
            }),
        );
    }

    /// Stops following the pods of `drain`.
    pub(super) fn forget(&self, drain: &IngestDrain) {
        let prefix = format!("{}/{}/", drain.namespace().unwrap_or_default(), drain.name_any());
        self.lock().retain(|k, t| {
            let keep = !k.starts_with(&prefix);
            if !keep {
                t.abort();
            }
            keep
        });
    }
}
