//! Starting the real service binaries on loopback ports for the integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};

/// A running service, killed when dropped. `addr` is known once it listens
/// ([`Proc::listening`], [`connect`]).
pub struct Proc {
    pub child: Child,
    pub addr: String,
    /// The address the service reports on stdout once it listens (it binds port 0).
    reported: Option<std::sync::mpsc::Receiver<String>>,
    /// The gateway's HTTP URL (`--http-listen`), reported before the gRPC address.
    http: Option<std::sync::mpsc::Receiver<String>>,
}

impl Proc {
    /// The URL of the gateway's HTTP listener (`mulo-gateway serving HTTP on URL`), once the
    /// gateway listens.
    pub async fn http_url(&mut self) -> String {
        self.listening().await;
        let rx = self.http.as_ref().expect("stdout was read");
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the gateway reported no HTTP URL (no --http-listen?)")
    }

    /// Waits until the service listens (its models are loaded and warm) and returns the address
    /// it bound: it prints `mulo-<role> listening on ADDR` then.
    pub async fn listening(&mut self) -> String {
        let Some(rx) = self.reported.take() else {
            return self.addr.clone();
        };
        let start = Instant::now();
        loop {
            match rx.try_recv() {
                Ok(addr) => {
                    self.addr = addr;
                    return self.addr.clone();
                }
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    panic!(
                        "the service exited before listening: {:?}",
                        self.child.try_wait()
                    )
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => {
                    assert!(
                        start.elapsed() < Duration::from_secs(120),
                        "not up in 120 s"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
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

/// Starts `name` on a loopback port of the system's choice with `args` (plus `--listen
/// 127.0.0.1:0`); [`Proc::listening`] or [`connect`] learn the port.
pub fn start(name: &str, args: &[&str]) -> Proc {
    start_env(name, args, &[])
}

/// [`start`] with extra environment variables.
pub fn start_env(name: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
    use std::io::BufRead;
    let mut child = Command::new(exe(name))
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env("MULO_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let (http_tx, http_rx) = std::sync::mpsc::channel();
    // Reads stdout to its end (the pipe never fills), passing on the reported addresses.
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if let Some((_, url)) = line.split_once(" serving HTTP on ") {
                let _ = http_tx.send(url.trim().to_string());
            } else if let Some((_, addr)) = line.split_once(" listening on ") {
                let _ = tx.send(addr.trim().to_string());
            }
        }
    });
    Proc {
        child,
        addr: String::new(),
        reported: Some(rx),
        http: Some(http_rx),
    }
}

/// A channel to `p` once it accepts connections (models load before it listens).
pub async fn connect(p: &mut Proc) -> Channel {
    p.listening().await;
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
    cluster_full([&[], &[]], gateway_args, env).await
}

/// [`cluster`] with each service serving Prometheus metrics; also returns their metrics
/// addresses (drafter, verifier, gateway).
pub async fn cluster_with_metrics() -> (Proc, Proc, Proc, Channel, [String; 3]) {
    let m: [String; 3] = std::array::from_fn(|_| format!("127.0.0.1:{}", free_port()));
    let (d, v, g, ch) = cluster_full(
        [
            &["--metrics-listen", m[0].as_str()],
            &["--metrics-listen", m[1].as_str()],
        ],
        &["--metrics-listen", m[2].as_str()],
        &[],
    )
    .await;
    (d, v, g, ch, m)
}

/// Drafter and verifier on the bundled family (one torch thread each, `role_args` added), up;
/// and the flags of a gateway over them.
pub async fn roles(role_args: [&[&str]; 2], env: &[(&str, &str)]) -> (Proc, Proc, Vec<String>) {
    let fam = family().to_str().unwrap().to_string();
    let role = ["--family", fam.as_str(), "--threads", "1"];
    let with = |extra: &[&str]| -> Vec<String> {
        role.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let (dargs, vargs) = (with(role_args[0]), with(role_args[1]));
    let mut drafter = start_env("mulo-drafter", &refs(&dargs), env);
    let mut verifier = start_env("mulo-verifier", &refs(&vargs), env);
    connect(&mut drafter).await;
    connect(&mut verifier).await;
    let gateway = with(&["--drafter", &drafter.addr, "--verifier", &verifier.addr]);
    (drafter, verifier, gateway)
}

/// [`cluster`] with extra flags for the drafter and the verifier, for the gateway, and an
/// environment for all three.
pub async fn cluster_full(
    role_args: [&[&str]; 2],
    gateway_args: &[&str],
    env: &[(&str, &str)],
) -> (Proc, Proc, Proc, Channel) {
    let (drafter, verifier, args) = roles(role_args, env).await;
    let mut args = refs(&args);
    args.extend_from_slice(gateway_args);
    let mut gateway = start_env("mulo-gateway", &args, env);
    let ch = connect(&mut gateway).await;
    (drafter, verifier, gateway, ch)
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A generation request for `prompt` with `method` and `seed` (PNG, no tokens).
pub fn request(prompt: &str, method: &str, seed: u64) -> mulo_proto::v1::GenerateRequest {
    mulo_proto::v1::GenerateRequest {
        request_id: String::new(),
        condition: Some(mulo_proto::v1::Condition {
            kind: Some(mulo_proto::v1::condition::Kind::Prompt(prompt.into())),
        }),
        method: method.into(),
        sampling: None,
        seed,
        return_tokens: false,
        skip_png: false,
    }
}

/// A role session `id` for "red apple", CFG 2, seed 1.
pub fn session_spec(id: &str) -> mulo_proto::v1::SessionSpec {
    mulo_proto::v1::SessionSpec {
        session_id: id.into(),
        epoch: 0,
        condition: Some(mulo_proto::v1::Condition {
            kind: Some(mulo_proto::v1::condition::Kind::Prompt("red apple".into())),
        }),
        sampling: Some(mulo_proto::v1::Sampling {
            cfg_scale: Some(2.0),
            temperature: Some(1.0),
            top_k: Some(0),
            top_p: Some(1.0),
        }),
        seed: 1,
    }
}

/// The Prometheus text a service serves on `http://addr/metrics`.
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let start = Instant::now();
    loop {
        match std::net::TcpStream::connect(addr) {
            Ok(mut s) => {
                write!(
                    s,
                    "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
                )
                .unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).unwrap();
                let (head, body) = out.split_once("\r\n\r\n").unwrap();
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                return body.to_string();
            }
            Err(_) if start.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("no metrics on {addr}: {e}"),
        }
    }
}

/// One sample of a Prometheus text exposition: name, labels, value.
pub type Sample = (String, Vec<(String, String)>, f64);

/// Samples of a Prometheus text exposition.
pub fn samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let body = rest.strip_suffix('}').unwrap();
                let labels = body
                    .split("\",")
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once("=\"").unwrap();
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                (n.to_string(), labels)
            }
            None => (series.to_string(), Vec::new()),
        };
        out.push((name, labels, value));
    }
    out
}

/// The samples of `name` whose labels include `labels`.
fn matching(text: &str, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
    samples(text)
        .into_iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| v)
        .collect()
}

/// Whether a sample of `name` with (at least) `labels` is exported.
pub fn has(text: &str, name: &str, labels: &[(&str, &str)]) -> bool {
    !matching(text, name, labels).is_empty()
}

/// Sum of the samples of `name` whose labels include `labels` (0 when there is none).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    matching(text, name, labels).iter().sum()
}

/// The ```sh blocks of a Markdown `doc` that follow a `<!-- tested: ... -->` line (the commands
/// a page promises work; the tests run them verbatim).
pub fn tested_blocks(doc: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = doc.lines();
    while let Some(l) = lines.next() {
        if !l.starts_with("<!-- tested:") {
            continue;
        }
        assert_eq!(
            lines.next(),
            Some("```sh"),
            "a tested block is a ```sh fence"
        );
        let body: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
        out.push(body.join("\n"));
    }
    out
}

/// Runs a shell block with bash (`-euo pipefail`) in `dir` with extra environment; returns its
/// stdout and stderr, failing the test when it fails.
pub fn run_block(block: &str, dir: &std::path::Path, env: &[(&str, &str)]) -> (String, String) {
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", block])
        .current_dir(dir)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "{block}\n--- stdout\n{so}\n--- stderr\n{se}"
    );
    (so, se)
}

/// The `mulo` command of this checkout (cargo brings it up to date first: the workspace build
/// of the services' tests does not build other packages' binaries).
pub fn mulo_cli() -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    let dir = deps.parent().unwrap().parent().unwrap().to_path_buf();
    // The profile of this test binary (target/<profile>/deps): build that one, not the default.
    let mut args = vec!["build", "--quiet", "-p", "mulo-cli", "--bin", "mulo"];
    let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
    if profile != "debug" {
        args.extend(["--profile", profile]);
    }
    let ok = Command::new(env!("CARGO"))
        .args(&args)
        .status()
        .unwrap()
        .success();
    assert!(ok, "building the mulo command failed");
    let exe = dir.join("mulo");
    assert!(exe.exists(), "{} missing", exe.display());
    exe
}

/// Resident memory of a process in MiB (Linux `/proc`).
pub fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb / 1024.0
}

/// A test PKI: a CA that issues certificates for 127.0.0.1 / localhost, written as PEM files.
pub struct Pki {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub ca: PathBuf,
}

impl Pki {
    /// A new CA named `name`, its certificate written to `dir/name-ca.pem`.
    pub fn new(dir: &std::path::Path, name: &str) -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let ca = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca, cert.pem()).unwrap();
        Self {
            issuer: rcgen::Issuer::new(params, key),
            ca,
        }
    }

    /// A certificate for 127.0.0.1 and localhost (server and client use) signed by the CA:
    /// `(cert.pem, key.pem)` under `dir` named `name`.
    pub fn issue(&self, dir: &std::path::Path, name: &str) -> (PathBuf, PathBuf) {
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

/// A virtual environment with the Python client's requirements (examples/python), made once per
/// requirements file under ~/.cache/mulo.
pub fn python_client_venv() -> PathBuf {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let req = repo.join("examples/python/requirements.txt");
    let text = std::fs::read_to_string(&req).unwrap();
    // FNV-1a of the requirements: a changed pin gets a fresh environment.
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let home = std::env::var("HOME").unwrap();
    let dir = PathBuf::from(home).join(format!(".cache/mulo/api-client-{hash:016x}"));
    let python = dir.join("bin/python");
    if !dir.join("ready").exists() {
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "python3 -m venv {}", dir.display());
        let ok = Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "-r"])
            .arg(&req)
            .status()
            .unwrap()
            .success();
        assert!(ok, "pip install -r {}", req.display());
        std::fs::write(dir.join("ready"), "").unwrap();
    }
    dir
}
