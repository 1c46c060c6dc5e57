//! The three services as separate processes on loopback ports, for `mulo bench --distributed`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Drafter, verifier and gateway processes, killed when dropped.
#[derive(Debug)]
pub struct Cluster {
    children: Vec<Child>,
    /// The gateway's `host:port`.
    pub gateway: String,
    /// The drafter's and the verifier's `host:port`.
    pub drafter: String,
    pub verifier: String,
    /// How the roles were placed, for the report.
    pub placement: String,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A service binary next to this `mulo` executable.
fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the mulo executable")?;
    let p = exe.with_file_name(name);
    if !p.is_file() {
        bail!(
            "{} not found next to {}: build the services (cargo build --release -p mulo-services)",
            name,
            exe.display()
        );
    }
    Ok(p)
}

fn has_taskset() -> bool {
    Command::new("taskset")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

async fn wait_up(addr: &str, child: &mut Child, name: &str) -> Result<()> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("{name} exited while starting ({status})");
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!("{name} did not listen on {addr} within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Cluster {
    /// Starts the three services on `family` with `threads` torch threads per role; with
    /// `pin` (and `taskset` on the machine) the drafter runs on CPU 0 and the verifier on the last
    /// CPU, so that they do not share a core.
    /// `role_flags` go to the drafter and the verifier (batching).
    pub async fn start(
        family: &Path,
        threads: i32,
        pin: bool,
        role_flags: &[String],
    ) -> Result<Self> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let pin = pin && cpus > 1 && has_taskset();
        let mut me = Self {
            children: Vec::new(),
            gateway: String::new(),
            drafter: String::new(),
            verifier: String::new(),
            placement: if pin {
                format!(
                    "drafter on CPU 0, verifier on CPU {}, {threads} torch thread(s) each",
                    cpus - 1
                )
            } else {
                format!("unpinned, {threads} torch thread(s) per role")
            },
        };
        let fam = family.display().to_string();
        let threads = threads.to_string();
        let mut spawn = |name: &str, cpu: Option<usize>, extra: &[String]| -> Result<String> {
            let addr = format!("127.0.0.1:{}", free_port()?);
            let bin = sibling(name)?;
            let mut cmd = match cpu {
                Some(c) => {
                    let mut t = Command::new("taskset");
                    t.args(["-c", &c.to_string()]).arg(bin);
                    t
                }
                None => Command::new(bin),
            };
            cmd.args(["--listen", &addr, "--family", &fam, "--threads", &threads])
                .args(extra)
                .env("MULO_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit());
            me.children
                .push(cmd.spawn().with_context(|| format!("starting {name}"))?);
            Ok(addr)
        };
        let drafter = spawn("mulo-drafter", pin.then_some(0), role_flags)?;
        let verifier = spawn("mulo-verifier", pin.then_some(cpus - 1), role_flags)?;
        let gateway = spawn(
            "mulo-gateway",
            None,
            &[
                "--drafter".into(),
                drafter.clone(),
                "--verifier".into(),
                verifier.clone(),
            ],
        )?;
        let names = ["mulo-drafter", "mulo-verifier", "mulo-gateway"];
        for (i, addr) in [&drafter, &verifier, &gateway].iter().enumerate() {
            let child = &mut me.children[i];
            wait_up(addr, child, names[i]).await?;
        }
        me.gateway = gateway;
        me.drafter = drafter;
        me.verifier = verifier;
        Ok(me)
    }
}
