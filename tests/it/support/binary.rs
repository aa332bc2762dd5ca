//! The real `quotawatch` binary as a child process, for what only a process
//! can show: keys printed at first start, signals, `kill -9`, the CLI.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const BINARY: &str = env!("CARGO_BIN_EXE_quotawatch");

/// A command for the binary, isolated from the developer's environment and
/// working directory (so no stray `.env` or `quotawatch.db` is used).
pub fn command(dir: &Path, env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(BINARY);
    command.current_dir(dir).env_clear();
    if let Ok(path) = std::env::var("PATH") {
        command.env("PATH", path);
    }
    for (name, value) in env {
        command.env(name, value);
    }
    command.kill_on_drop(true);
    command
}

pub struct Server {
    pub child: Child,
    pub base: String,
    /// What the server printed on standard output before it was ready.
    pub printed: Vec<String>,
    pub stderr_path: PathBuf,
}

impl Server {
    /// Starts `quotawatch serve` on a free port and waits until it listens.
    pub async fn start(dir: &Path, env: &[(&str, &str)]) -> Self {
        let stderr_path = dir.join(format!("stderr-{}.log", rand::random::<u32>()));
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let mut env = env.to_vec();
        env.push(("QUOTAWATCH_LISTEN", "127.0.0.1:0"));
        let mut child = command(dir, &env)
            .arg("serve")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn quotawatch");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut printed = Vec::new();
        let base = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.expect("read stdout") {
                if let Some(url) = line.strip_prefix("quotawatch listening on ") {
                    return url.to_owned();
                }
                printed.push(line);
            }
            let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            panic!("quotawatch exited before listening; stderr:\n{log}");
        })
        .await
        .expect("quotawatch starts listening");
        Self {
            child,
            base,
            printed,
            stderr_path,
        }
    }

    /// The keys the server printed (lines holding only a key).
    pub fn printed_keys(&self) -> Vec<String> {
        self.printed
            .iter()
            .map(|line| line.trim())
            .filter(|line| line.starts_with("qw_"))
            .map(str::to_owned)
            .collect()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// `kill -9`: no chance to flush.
    pub async fn kill9(mut self) {
        self.child.kill().await.expect("SIGKILL");
    }

    /// SIGTERM, then wait for a clean exit.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("exits after SIGTERM")
            .expect("exit status")
    }
}

/// Runs a CLI command to completion: (success, stdout, stderr).
pub async fn run(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> (bool, String, String) {
    let output = command(dir, env)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run quotawatch");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
