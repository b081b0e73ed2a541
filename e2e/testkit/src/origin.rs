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
    nginx: &'static str,
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
        let mut origin = Self {
            child: spawn(nginx, dir)?,
            addr,
            dir: dir.to_owned(),
            nginx,
        };
        origin.wait_listening()?;
        Ok(origin)
    }

    fn wait_listening(&mut self) -> Result<(), Error> {
        let start = Instant::now();
        while std::net::TcpStream::connect(self.addr).is_err() {
            if start.elapsed() > Duration::from_secs(10) || matches!(self.child.try_wait(), Ok(Some(_))) {
                return Err(Error::NotListening(self.addr, self.dir.join("error.log")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The origin crashes (SIGKILL to nginx's master and workers) and comes
    /// back on the same address with the same configuration. Blocks until
    /// the new one listens. Recordings keep every tag nginx wrote.
    pub fn crash_and_restart(&mut self) -> Result<(), Error> {
        let workers = children(self.child.id());
        let _ = self.child.kill();
        let _ = self.child.wait();
        kill_all(workers);
        self.child = spawn(self.nginx, &self.dir)?;
        self.wait_listening()
    }

    /// Asks nginx to quit gracefully (SIGQUIT lets it finish writing
    /// recordings), then kills the master and workers still there.
    fn stop(&mut self) {
        let workers = children(self.child.id());
        let _ = Command::new("kill")
            .args(["-QUIT", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        let mut exited = false;
        while !exited && start.elapsed() < Duration::from_secs(3) {
            exited = matches!(self.child.try_wait(), Ok(Some(_)));
            std::thread::sleep(Duration::from_millis(20));
        }
        if !exited {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        // A worker outliving its master would keep the port.
        kill_all(workers);
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
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts nginx with `<dir>/nginx.conf`.
fn spawn(nginx: &'static str, dir: &Path) -> std::io::Result<Child> {
    Command::new(nginx)
        .arg("-p")
        .arg(dir.join("tmp"))
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

/// Sends SIGKILL to those of `pids` still running, and waits until they are gone.
fn kill_all(pids: Vec<u32>) {
    let pids: Vec<u32> = pids.into_iter().filter(|&p| running(p)).collect();
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg("-KILL")
        .args(pids.iter().map(u32::to_string))
        .stderr(Stdio::null())
        .status();
    let start = Instant::now();
    while pids.iter().any(|&p| running(p)) && start.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The fields of `/proc/<pid>/stat` after the command name (which may hold
/// spaces and parentheses): state, ppid, ...
fn stat_fields(pid: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat.rsplit_once(')')?.1.split_whitespace().map(str::to_owned).collect())
}

/// The process exists and is not a zombie.
fn running(pid: u32) -> bool {
    stat_fields(&pid.to_string()).is_some_and(|f| f.first().is_some_and(|state| state != "Z"))
}

/// Processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let child: u32 = name.to_str()?.parse().ok()?;
            let ppid: u32 = stat_fields(name.to_str()?)?.get(1)?.parse().ok()?;
            (ppid == pid).then_some(child)
        })
        .collect()
}
