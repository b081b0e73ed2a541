//! A local nginx-rtmp origin that records every stream, for tests, the
//! demo and benchmarks (nginx with Debian's libnginx-mod-rtmp).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Where Debian puts the RTMP module.
pub const RTMP_MODULE: &str = "/usr/lib/nginx/modules/ngx_rtmp_module.so";

#[derive(Debug, Error)]
pub enum Error {
    #[error("nginx with the RTMP module is not installed ({0}); run .ci/setup")]
    NotInstalled(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("nginx did not start listening on {0} (see {1})")]
    NotListening(SocketAddr, PathBuf),
}

/// A running nginx-rtmp origin; stopped on drop.
pub struct Origin {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

/// Picks a free TCP port on `ip`.
pub fn free_port(ip: &str) -> std::io::Result<SocketAddr> {
    TcpListener::bind((ip, 0))?.local_addr()
}

impl Origin {
    /// Starts nginx on `ip` (a free port) with one worker, recording the
    /// `live` application into `<dir>/rec` with `record all; record_unique on; record_append on;`.
    pub fn start(dir: &Path, ip: &str) -> Result<Self, Error> {
        Self::start_with_hooks(dir, ip, None)
    }

    /// [`Origin::start`], and when `hook` is set (an `http://host:port/path`
    /// URL), nginx-rtmp's `on_publish` and `on_publish_done` notifications
    /// are POSTed there (form fields `call`, `name`, `clientid`, ...). The
    /// endpoint must answer 2xx or nginx refuses the publish; the times of
    /// arrival give the handover stall at the origin.
    pub fn start_with_hooks(dir: &Path, ip: &str, hook: Option<&str>) -> Result<Self, Error> {
        if !Path::new(RTMP_MODULE).exists() {
            return Err(Error::NotInstalled(RTMP_MODULE.to_owned()));
        }
        let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .ok_or_else(|| Error::NotInstalled("nginx".into()))?;
        std::fs::create_dir_all(dir.join("rec"))?;
        std::fs::create_dir_all(dir.join("tmp"))?;
        let addr = free_port(ip)?;
        let hooks = hook
            .map(|url| format!("on_publish {url};\n            on_publish_done {url};"))
            .unwrap_or_default();
        let conf = format!(
            r#"load_module {RTMP_MODULE};
daemon off;
master_process on;
worker_processes 1;
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 8192; }}
rtmp {{
    server {{
        listen {addr};
        chunk_size 4096;
        application live {{
            live on;
            record all;
            record_unique on;
            # File names have one-second resolution: a second publish within
            # the same second appends instead of truncating.
            record_append on;
            record_path {dir}/rec;
            {hooks}
        }}
    }}
}}
"#,
            dir = dir.display()
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let child = Command::new(nginx)
            .arg("-p")
            .arg(dir.join("tmp"))
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let origin = Self {
            child,
            addr,
            dir: dir.to_owned(),
        };
        let start = Instant::now();
        while std::net::TcpStream::connect(addr).is_err() {
            if start.elapsed() > Duration::from_secs(10) {
                return Err(Error::NotListening(addr, origin.dir.join("error.log")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(origin)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Upstream URL template for ingest pods: `rtmp://addr/live/{stream}`.
    pub fn template(&self) -> String {
        format!("rtmp://{}/live/{{stream}}", self.addr)
    }

    /// Directory with the recordings.
    pub fn record_dir(&self) -> PathBuf {
        self.dir.join("rec")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        // SIGQUIT lets nginx finish writing recordings; then make sure it is gone.
        let _ = Command::new("kill")
            .arg("-QUIT")
            .arg(self.child.id().to_string())
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
