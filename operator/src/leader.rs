//! Leader election on a coordination.k8s.io Lease: one replica drives
//! drains; every external act is idempotent, so a brief overlap is harmless.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::settings::LeaseSettings;

/// Keeps trying to hold the Lease; `leader` says whether this replica does.
pub(crate) async fn run(client: Client, lease: LeaseSettings, leader: watch::Sender<bool>, stop: CancellationToken) {
    let LeaseSettings {
        namespace,
        name,
        identity,
        duration,
    } = lease;
    let (name, identity) = (name.as_str(), identity.as_str());
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let secs = i32::try_from(duration.as_secs().max(1)).unwrap_or(15);
    loop {
        let holding = match try_hold(&api, name, identity, secs).await {
            Ok(h) => h,
            Err(err) => {
                warn!(%err, "lease update failed");
                // Not renewed: assume the worst before the Lease can expire.
                false
            }
        };
        leader.send_if_modified(|l| {
            if *l != holding {
                info!(identity, leader = holding, "leadership changed");
                *l = holding;
                return true;
            }
            false
        });
        tokio::select! {
            () = tokio::time::sleep(duration / 3) => {}
            () = stop.cancelled() => break,
        }
    }
    // Step down at once so the other replica takes over quickly.
    if *leader.borrow() {
        let _ = release(&api, name, identity).await;
        leader.send_replace(false);
    }
}

async fn try_hold(api: &Api<Lease>, name: &str, identity: &str, secs: i32) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let Some(mut lease) = api.get_opt(name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(identity.into()),
                lease_duration_seconds: Some(secs),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let expired = spec
        .renew_time
        .as_ref()
        .is_none_or(|t| t.0 + SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(secs))) < now);
    if holder != identity && !holder.is_empty() && !expired {
        return Ok(false);
    }
    if holder != identity {
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.holder_identity = Some(identity.into());
    spec.lease_duration_seconds = Some(secs);
    spec.renew_time = Some(MicroTime(now));
    // replace carries the resourceVersion: a concurrent change wins and we lose.
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

async fn release(api: &Api<Lease>, name: &str, identity: &str) -> Result<(), kube::Error> {
    let Some(mut lease) = api.get_opt(name).await? else {
        return Ok(());
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    if spec.holder_identity.as_deref() == Some(identity) {
        spec.holder_identity = None;
        spec.renew_time = None;
        api.replace(name, &PostParams::default(), &lease).await?;
    }
    Ok(())
}
