//! Calls to an ingest pod's control API (ingest.control.v1).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ingest_proto::v1::ingest_control_client::IngestControlClient;
use ingest_proto::v1::{
    CancelDrainRequest, GetStatusRequest, PodStatus, StartDrainRequest, StartDrainResponse, WatchStatusRequest,
};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::{ObjectRef, Store};
use thiserror::Error;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

/// Time allowed for connecting and for each call.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Error)]
pub(crate) enum Error {
    #[error("cannot reach {addr}: {source}")]
    Connect {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error("{addr} answered {status}")]
    Call { addr: String, status: Box<tonic::Status> },
    #[error("the control token is not valid in a header")]
    BadToken,
}

/// A client for one pod.
pub(crate) struct PodClient {
    addr: String,
    token: MetadataValue<tonic::metadata::Ascii>,
    inner: IngestControlClient<Channel>,
}

/// One gRPC channel per pod, reused by every call: a reconcile asks a
/// hundred pods without a hundred TCP and HTTP/2 handshakes. A channel
/// connects on first use and again after a failure on its own.
#[derive(Clone, Default)]
pub(crate) struct Channels {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    /// Dials over TLS when set; plaintext otherwise.
    tls: Option<ingest_proto::tls::Connector>,
}

impl Channels {
    /// Channels that dial the pods over TLS.
    pub(crate) fn with_tls(tls: ingest_proto::tls::Connector) -> Self {
        Self {
            channels: Arc::default(),
            tls: Some(tls),
        }
    }

    /// A client for `ip:port` on its pooled channel.
    pub(crate) fn client(&self, ip: &str, port: u16, token: &str) -> Result<PodClient, Error> {
        let addr = if ip.contains(':') {
            format!("[{ip}]:{port}")
        } else {
            format!("{ip}:{port}")
        };
        let token = format!("Bearer {token}").parse().map_err(|_| Error::BadToken)?;
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let channel = match channels.get(&addr) {
            Some(c) => c.clone(),
            None => {
                let endpoint = Endpoint::from_shared(format!("http://{addr}"))
                    .map_err(|source| Error::Connect {
                        addr: addr.clone(),
                        source,
                    })?
                    .connect_timeout(CALL_TIMEOUT);
                let channel = match &self.tls {
                    Some(tls) => endpoint.connect_with_connector_lazy(tls.clone()),
                    None => endpoint.connect_lazy(),
                };
                channels.insert(addr.clone(), channel.clone());
                channel
            }
        };
        Ok(PodClient {
            addr,
            token,
            inner: IngestControlClient::new(channel),
        })
    }

    /// Forgets the channels of pods whose IP is not in `live`.
    pub(crate) fn retain(&self, live: &std::collections::HashSet<String>) {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        channels.retain(|addr, _| {
            let ip = addr.rsplit_once(':').map_or(addr.as_str(), |(ip, _)| ip);
            live.contains(ip.trim_start_matches('[').trim_end_matches(']'))
        });
    }
}

impl PodClient {
    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.metadata_mut().insert("authorization", self.token.clone());
        req
    }

    fn err(&self, status: tonic::Status) -> Error {
        Error::Call {
            addr: self.addr.clone(),
            status: Box::new(status),
        }
    }

    pub(crate) async fn start_drain(&mut self, req: StartDrainRequest) -> Result<StartDrainResponse, Error> {
        let mut r = self.request(req);
        r.set_timeout(CALL_TIMEOUT);
        self.inner
            .start_drain(r)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| self.err(s))
    }

    /// The pod's counts and drain, without its publishers.
    pub(crate) async fn status(&mut self) -> Result<PodStatus, Error> {
        let mut r = self.request(GetStatusRequest {
            counts_only: true,
            ..GetStatusRequest::default()
        });
        r.set_timeout(CALL_TIMEOUT);
        self.inner
            .get_status(r)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| self.err(s))
    }

    /// The pod's status on every change (coalesced by the pod).
    pub(crate) async fn watch(&mut self) -> Result<tonic::Streaming<PodStatus>, Error> {
        let r = self.request(WatchStatusRequest {
            counts_only: true,
            ..WatchStatusRequest::default()
        });
        self.inner
            .watch_status(r)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| self.err(s))
    }

    /// Cancels the pod's drain `drain_id`: `Ok(None)` if cancelled, else
    /// the pod's reason (a pod that got SIGTERM refuses every cancel).
    pub(crate) async fn cancel_drain(&mut self, drain_id: &str) -> Result<Option<String>, Error> {
        let mut r = self.request(CancelDrainRequest {
            drain_id: drain_id.to_owned(),
        });
        r.set_timeout(CALL_TIMEOUT);
        self.inner
            .cancel_drain(r)
            .await
            .map(|r| {
                let r = r.into_inner();
                (!r.cancelled).then_some(r.reason)
            })
            .map_err(|s| self.err(s))
    }
}

/// The ingest pods the operator knows: one watch per ingest namespace (so
/// the operator needs no cluster-wide right on pods), or one cluster-wide
/// watch when no namespace is given.
#[derive(Clone)]
pub(crate) struct PodCache(Vec<Store<Pod>>);

impl PodCache {
    /// A cache of these stores (one per watched namespace).
    pub(crate) fn new(stores: Vec<Store<Pod>>) -> Self {
        Self(stores)
    }

    /// Every cached pod.
    pub(crate) fn state(&self) -> Vec<Arc<Pod>> {
        self.0.iter().flat_map(|s| s.state()).collect()
    }

    /// One pod, if cached.
    pub(crate) fn get(&self, key: &ObjectRef<Pod>) -> Option<Arc<Pod>> {
        self.0.iter().find_map(|s| s.get(key))
    }

    /// Resolves once every watch has listed its pods; false if one ended.
    pub(crate) async fn wait_until_ready(&self) -> bool {
        for s in &self.0 {
            if s.wait_until_ready().await.is_err() {
                return false;
            }
        }
        true
    }
}

impl From<Store<Pod>> for PodCache {
    fn from(store: Store<Pod>) -> Self {
        Self(vec![store])
    }
}
