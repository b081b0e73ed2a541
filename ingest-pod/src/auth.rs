//! Publish authorization: an HTTP callback asked on every publish, as
//! nginx-rtmp's `on_publish`, SRS's `on_publish` and MediaMTX's
//! `authHTTPAddress` do. A publisher that moves between pods is asked about
//! again on the new pod, with the same key.
//!
//! The pod POSTs JSON (`app`, `key`, `client_addr`, `capabilities`, `pod`);
//! a 2xx answer allows, optionally with `{"upstream_name": "..."}` to
//! publish upstream under another name; anything else, an error or no
//! answer within the timeout denies (fail closed: an outage of the callback
//! must not open the tier to anyone).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Most bytes read of the callback's answer.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

#[derive(Debug, Error)]
pub enum Error {
    #[error("the publish callback URL {0:?} is not an http:// URL")]
    BadUrl(String),
}

/// What the callback is told of a publish.
#[derive(Debug, Clone, Serialize)]
pub struct Request<'a> {
    pub app: &'a str,
    /// The stream key, in clear: the callback decides on it.
    pub key: &'a str,
    pub client_addr: String,
    pub capabilities: Capabilities,
    pub pod: &'a str,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Capabilities {
    pub go_away: bool,
    pub reconnect_request: bool,
}

#[derive(Debug, Default, Deserialize)]
struct Answer {
    #[serde(default)]
    upstream_name: Option<String>,
}

/// The callback's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Publish; upstream under this name instead of the key, if given.
    Allow { upstream_name: Option<String> },
    /// Refuse, and why (told to the publisher, logged without the key).
    Deny { reason: String, label: &'static str },
}

/// The configured callback.
#[derive(Clone)]
pub struct PublishAuth {
    url: hyper::Uri,
    timeout: Duration,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for PublishAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishAuth")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl PublishAuth {
    /// A callback at `url` (http://) answered within `timeout`.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, Error> {
        let uri: hyper::Uri = url.parse().map_err(|_| Error::BadUrl(crate::keys::redact_query(url)))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(Error::BadUrl(crate::keys::redact_query(url)));
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        Ok(Self {
            url: uri,
            timeout,
            client: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// Asks the callback about a publish. Never fails: no answer denies.
    pub async fn check(&self, req: &Request<'_>) -> Decision {
        match tokio::time::timeout(self.timeout, self.ask(req)).await {
            Ok(Ok(d)) => d,
            Ok(Err(reason)) => Decision::Deny { reason, label: "error" },
            Err(_) => Decision::Deny {
                reason: format!("the publish callback did not answer within {:?}", self.timeout),
                label: "timeout",
            },
        }
    }

    async fn ask(&self, req: &Request<'_>) -> Result<Decision, String> {
        let body = serde_json::to_vec(req).map_err(|e| format!("cannot encode the request: {e}"))?;
        let request = hyper::Request::post(self.url.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("cannot build the request: {e}"))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| format!("the publish callback is unreachable: {e}"))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| format!("the publish callback's answer could not be read: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Ok(Decision::Deny {
                reason: format!("the publish callback refused ({status})"),
                label: "deny",
            });
        }
        let answer: Answer = if body.iter().all(u8::is_ascii_whitespace) {
            Answer::default()
        } else {
            serde_json::from_slice(&body).map_err(|e| format!("the publish callback's answer is not JSON: {e}"))?
        };
        let upstream_name = answer.upstream_name.filter(|n| !n.is_empty());
        if let Some(n) = &upstream_name
            && (n.contains('/') || n.len() > 1024)
        {
            return Err("the publish callback's upstream_name is not a stream name".into());
        }
        Ok(Decision::Allow { upstream_name })
    }
}
