//! RTMP URLs: `rtmp://host[:port]/app[/more]/stream`.

use thiserror::Error;

pub const DEFAULT_PORT: u16 = 1935;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    #[error("{0:?} is not an rtmp:// URL")]
    NotRtmp(String),
    #[error("{0:?} has no host")]
    NoHost(String),
    #[error("{0:?} has a bad port")]
    BadPort(String),
    #[error("{0:?} needs an application and a stream name (rtmp://host/app/stream)")]
    NoStream(String),
}

/// A publish URL split the way encoders split it: the tcUrl is everything
/// up to the last path segment, which is the stream name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RtmpUrl {
    pub host: String,
    pub port: u16,
    pub app: String,
    pub stream: String,
}

impl RtmpUrl {
    pub fn parse(url: &str) -> Result<Self, Error> {
        let (app, stream, host, port) = split(url)?;
        if stream.is_empty() || app.is_empty() {
            return Err(Error::NoStream(url.to_owned()));
        }
        Ok(Self {
            host,
            port,
            app,
            stream,
        })
    }

    /// The `host:port` to dial.
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    pub fn tc_url(&self) -> String {
        format!("rtmp://{}/{}", self.addr(), self.app)
    }

    /// Builds a URL from a tcUrl (`rtmp://host/app`) and a stream name.
    pub fn from_tc_url(tc_url: &str, stream: &str) -> Result<Self, Error> {
        let (app_prefix, last, host, port) = split(tc_url)?;
        let app = if app_prefix.is_empty() {
            last
        } else {
            format!("{app_prefix}/{last}")
        };
        if app.is_empty() || stream.is_empty() {
            return Err(Error::NoStream(tc_url.to_owned()));
        }
        Ok(Self {
            host,
            port,
            app,
            stream: stream.to_owned(),
        })
    }
}

/// Returns (path before the last segment, last segment, host, port).
fn split(url: &str) -> Result<(String, String, String, u16), Error> {
    let rest = url
        .strip_prefix("rtmp://")
        .ok_or_else(|| Error::NotRtmp(url.to_owned()))?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(|| Error::NoHost(url.to_owned()))?;
        (h.to_owned(), after.strip_prefix(':'))
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (authority.to_owned(), None),
        }
    };
    if host.is_empty() {
        return Err(Error::NoHost(url.to_owned()));
    }
    let port = match port {
        Some(p) => p.parse().map_err(|_| Error::BadPort(url.to_owned()))?,
        None => DEFAULT_PORT,
    };
    let path = path.trim_end_matches('/');
    let (before, last) = path.rsplit_once('/').unwrap_or(("", path));
    Ok((before.to_owned(), last.to_owned(), host, port))
}

/// Resolves a Reconnect Request `tcUrl` against the current one: absolute
/// URLs stand, relative ones replace the path (`/app2`) or the last segment.
pub fn resolve_tc_url(current: &str, reference: &str) -> String {
    if reference.contains("://") {
        return reference.to_owned();
    }
    let Some(rest) = current.split_once("://").map(|(_, r)| r) else {
        return reference.to_owned();
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    if let Some(path) = reference.strip_prefix('/') {
        return format!("rtmp://{authority}/{path}");
    }
    match current.rsplit_once('/') {
        Some((base, _)) if base.len() > "rtmp://".len() + authority.len() - 1 => format!("{base}/{reference}"),
        _ => format!("rtmp://{authority}/{reference}"),
    }
}

/// Renders `{app}` and `{stream}` in a URL template.
pub fn render(template: &str, app: &str, stream: &str) -> String {
    template.replace("{app}", app).replace("{stream}", stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_publish_urls() {
        let u = RtmpUrl::parse("rtmp://127.0.0.1:1936/live/key1").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.app.as_str(), u.stream.as_str()),
            ("127.0.0.1", 1936, "live", "key1")
        );
        assert_eq!(u.tc_url(), "rtmp://127.0.0.1:1936/live");
        let u = RtmpUrl::parse("rtmp://origin/app/inst/k?x=1").unwrap();
        assert_eq!((u.port, u.app.as_str(), u.stream.as_str()), (1935, "app/inst", "k?x=1"));
        assert_eq!(RtmpUrl::parse("rtmp://[::1]:99/a/b").unwrap().addr(), "[::1]:99");
        assert!(matches!(RtmpUrl::parse("http://x/a/b"), Err(Error::NotRtmp(_))));
        assert!(matches!(RtmpUrl::parse("rtmp://x/a"), Err(Error::NoStream(_))));
        assert!(matches!(RtmpUrl::parse("rtmp://x:no/a/b"), Err(Error::BadPort(_))));
        assert!(matches!(RtmpUrl::parse("rtmp:///a/b"), Err(Error::NoHost(_))));
    }

    #[test]
    fn builds_from_tc_url() {
        let u = RtmpUrl::from_tc_url("rtmp://10.0.0.2:1935/live", "k").unwrap();
        assert_eq!(u, RtmpUrl::parse("rtmp://10.0.0.2:1935/live/k").unwrap());
    }

    #[test]
    fn resolves_relative_tc_urls() {
        let cur = "rtmp://a.example:1935/live";
        assert_eq!(resolve_tc_url(cur, "rtmp://b:1936/live"), "rtmp://b:1936/live");
        assert_eq!(resolve_tc_url(cur, "/other"), "rtmp://a.example:1935/other");
        assert_eq!(resolve_tc_url(cur, "other"), "rtmp://a.example:1935/other");
    }

    #[test]
    fn renders_templates() {
        assert_eq!(
            render("rtmp://o:1935/{app}/{stream}", "live", "k"),
            "rtmp://o:1935/live/k"
        );
    }
}
