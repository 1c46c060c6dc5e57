//! Starting the real service binaries on loopback ports for the integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};

/// A running service, killed when dropped.
pub struct Proc {
    pub child: Child,
    pub addr: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The bundled family in the source tree.
pub fn family() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/emoji")
}

fn exe(name: &str) -> &'static str {
    match name {
        "mulo-drafter" => env!("CARGO_BIN_EXE_mulo-drafter"),
        "mulo-verifier" => env!("CARGO_BIN_EXE_mulo-verifier"),
        _ => env!("CARGO_BIN_EXE_mulo-gateway"),
    }
}

/// Starts `name` on a free loopback port with `args` (plus `--listen`).
pub fn start(name: &str, args: &[&str]) -> Proc {
    start_env(name, args, &[])
}

/// [`start`] with extra environment variables.
pub fn start_env(name: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
    let addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new(exe(name))
        .arg("--listen")
        .arg(&addr)
        .args(args)
        .env("MULO_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Proc { child, addr }
}

/// A channel to `p` once it accepts connections (models load before it listens).
pub async fn connect(p: &mut Proc) -> Channel {
    let url = format!("http://{}", p.addr);
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!("{} exited early: {status}", p.addr);
        }
        match Endpoint::from_shared(url.clone()).unwrap().connect().await {
            Ok(c) => return c,
            Err(_) if start.elapsed() < Duration::from_secs(60) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("{} did not come up: {e}", p.addr),
        }
    }
}

/// A channel to a service already up.
pub async fn connect_to(addr: &str) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Drafter, verifier and a gateway over them, on the bundled family, each on one torch thread.
pub async fn cluster() -> (Proc, Proc, Proc, Channel) {
    cluster_with(&[], &[]).await
}

/// [`cluster`] with extra gateway flags and an environment for all three.
pub async fn cluster_with(
    gateway_args: &[&str],
    env: &[(&str, &str)],
) -> (Proc, Proc, Proc, Channel) {
    let fam = family();
    let fam = fam.to_str().unwrap();
    let role = ["--family", fam, "--threads", "1"];
    let mut drafter = start_env("mulo-drafter", &role, env);
    let mut verifier = start_env("mulo-verifier", &role, env);
    connect(&mut drafter).await;
    connect(&mut verifier).await;
    let (d, v) = (drafter.addr.clone(), verifier.addr.clone());
    let mut args = vec![
        "--family",
        fam,
        "--threads",
        "1",
        "--drafter",
        &d,
        "--verifier",
        &v,
    ];
    args.extend_from_slice(gateway_args);
    let mut gateway = start_env("mulo-gateway", &args, env);
    let ch = connect(&mut gateway).await;
    (drafter, verifier, gateway, ch)
}

/// The `mulo` command of this checkout (cargo brings it up to date first: the workspace build
/// of the services' tests does not build other packages' binaries).
pub fn mulo_cli() -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    let dir = deps.parent().unwrap().parent().unwrap().to_path_buf();
    let ok = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "-p", "mulo-cli", "--bin", "mulo"])
        .status()
        .unwrap()
        .success();
    assert!(ok, "building the mulo command failed");
    let exe = dir.join("mulo");
    assert!(exe.exists(), "{} missing", exe.display());
    exe
}
