//! Stream keys are credentials: whoever has one can take over the
//! broadcast. The pod shows a keyed hash of each instead, in `/status`, the
//! control API and every log line, unless it runs with the reveal flag.
//!
//! The hash is HMAC-SHA256 keyed with a secret of the release (the control
//! token): the same on every pod of the release, so a stream can be
//! followed across a move, but a guessed key cannot be confirmed offline.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How the pod shows stream keys.
#[derive(Clone)]
pub struct StreamKeys {
    secret: Vec<u8>,
    reveal: bool,
}

impl std::fmt::Debug for StreamKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamKeys")
            .field("reveal", &self.reveal)
            .finish_non_exhaustive()
    }
}

impl StreamKeys {
    /// Hashes keyed with `secret`; `reveal` shows keys in clear instead.
    pub fn new(secret: &[u8], reveal: bool) -> Self {
        Self {
            secret: secret.to_vec(),
            reveal,
        }
    }

    /// Hashes keyed with a secret of this process only (a pod without a
    /// control token): stable for the pod's life, not across pods.
    pub fn random() -> Self {
        let mut secret = vec![0u8; 32];
        if let Err(err) =
            std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut secret))
        {
            // Still unguessable enough to tell streams apart; never a known key.
            tracing::warn!(%err, "no /dev/urandom: stream key hashes use the clock as their key");
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default();
            secret = now.to_le_bytes().to_vec();
        }
        Self::new(&secret, false)
    }

    /// The keyed hash of `key`: `hmac:` and 16 hex digits.
    pub fn hash(&self, key: &str) -> String {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.secret) else {
            // HMAC takes keys of any length; this cannot happen.
            return "hmac:?".to_owned();
        };
        mac.update(key.as_bytes());
        let digest = mac.finalize().into_bytes();
        let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
        format!("hmac:{hex}")
    }

    /// What the pod shows of `key`: its hash, or the key with the reveal flag.
    pub fn show(&self, key: &str) -> String {
        if self.reveal { key.to_owned() } else { self.hash(key) }
    }

    /// Whether keys are shown in clear.
    pub fn reveals(&self) -> bool {
        self.reveal
    }
}

/// A URL with its query string (`?token=...`, `?key=...`) hidden: what a
/// log line may carry of a tcUrl or an upstream URL.
pub fn redact_query(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?…"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_keyed_stable_and_hide_the_key() {
        let a = StreamKeys::new(b"release-secret", false);
        let b = StreamKeys::new(b"release-secret", false);
        let other = StreamKeys::new(b"another-release", false);
        let h = a.hash("live-key-1");
        assert_eq!(h, b.hash("live-key-1"), "the same on every pod of a release");
        assert_ne!(
            h,
            other.hash("live-key-1"),
            "a guess cannot be confirmed without the secret"
        );
        assert_ne!(h, a.hash("live-key-2"));
        assert!(
            h.starts_with("hmac:") && h.len() == 21 && !h.contains("live-key"),
            "{h}"
        );
        assert_eq!(a.show("k"), a.hash("k"));
        assert_eq!(StreamKeys::new(b"s", true).show("k"), "k");
        assert_ne!(StreamKeys::random().hash("k"), StreamKeys::random().hash("k"));
    }

    #[test]
    fn queries_are_hidden() {
        assert_eq!(
            redact_query("rtmp://o/live/{stream}?token=abc"),
            "rtmp://o/live/{stream}?…"
        );
        assert_eq!(redact_query("rtmp://o/live"), "rtmp://o/live");
    }
}
