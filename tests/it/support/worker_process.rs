//! The real `ipn-worker` binary as a child process, so a test can SIGKILL it mid-work and start
//! it again with the same id and settings.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::PATIENCE;

/// One `ipn-worker` process (restartable), configured by environment variables plus a config
/// file that binds a `downstream` queue to every event. Its log goes to a file, removed on drop
/// unless [`WorkerProcess::keep_log`] was called.
pub struct WorkerProcess {
    id: String,
    env: Vec<(String, String)>,
    config_file: PathBuf,
    log_file: PathBuf,
    keep_log: bool,
    port: u16,
    child: Option<Child>,
}

impl WorkerProcess {
    /// Starts `ipn-worker` with id `id` and the `IPN_*` variables `env`; returns once its
    /// `/healthz` answers.
    pub async fn start(id: &str, env: &[(String, String)]) -> WorkerProcess {
        let unique = uuid::Uuid::now_v7().simple();
        let config_file = std::env::temp_dir().join(format!("ipn-it-{unique}-{id}.toml"));
        std::fs::write(
            &config_file,
            "[[downstream]]\nqueue = \"downstream\"\nbindings = [\"#\"]\n",
        )
        .expect("write worker config");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let mut worker = WorkerProcess {
            id: id.to_owned(),
            env: env.to_vec(),
            log_file: std::env::temp_dir().join(format!("ipn-it-{unique}-{id}.log")),
            config_file,
            keep_log: false,
            port,
            child: None,
        };
        worker.spawn().await;
        worker
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file)
            .expect("open worker log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_ipn-worker"));
        // Only the settings given here: none from the environment the tests run in.
        for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("IPN_")) {
            command.env_remove(name);
        }
        let child = command
            .arg("--config")
            .arg(&self.config_file)
            // Quiet unless `env` asks for more.
            .env("RUST_LOG", "warn")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("IPN_WORKER__ID", &self.id)
            .env("IPN_WORKER__LISTEN", format!("127.0.0.1:{}", self.port))
            // Log lines go to stdout, start-up errors to stderr: both into the log file.
            .stdout(Stdio::from(log.try_clone().expect("clone log handle")))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("ipn-worker starts");
        self.child = Some(child);
        let url = format!("http://127.0.0.1:{}/healthz", self.port);
        let deadline = tokio::time::Instant::now() + PATIENCE * 3;
        while !super::http()
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || tokio::time::Instant::now() > deadline {
                panic!(
                    "{} did not answer /healthz (exit status {exited:?}); its log ends:\n{}",
                    self.id,
                    log_tail(&self.log_file, 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One metric's value from its `/metrics` (the first line starting with `name`); `None` when
    /// it does not answer.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        super::metric(&format!("http://127.0.0.1:{}/metrics", self.port), name).await
    }

    /// SIGKILL: the process ends at once, mid-work, acking and cleaning up nothing.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("SIGKILL the worker");
        }
    }

    /// Starts it again (after [`WorkerProcess::kill`]) with the same id and settings.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "restart after kill");
        self.spawn().await;
    }

    /// SIGTERM, then waits for a clean exit (code 0).
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let status = super::terminate(&mut child, PATIENCE * 3).await;
        assert!(status.success(), "{} exited cleanly: {status}", self.id);
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// Where it logs (the same file across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.log_file.clone()
    }

    /// Leaves the log file in place (its path is returned) for a failing test to point at.
    pub fn keep_log(&mut self) -> PathBuf {
        self.keep_log = true;
        self.log_file.clone()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config_file);
        if !self.keep_log {
            let _ = std::fs::remove_file(&self.log_file);
        }
    }
}

/// The last `lines` lines of the log file at `path` (empty if it cannot be read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(lines).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}
