//! TLS, mutual TLS and bearer tokens with the real binaries (docs/security.md): roles configured
//! for mTLS refuse a gateway without a client certificate signed by their CA and serve the one
//! with it; a TLS gateway with tokens serves the Python client with a valid token, refuses it
//! without or with a wrong one (UNAUTHENTICATED) and a plaintext client; certificates and tokens
//! rotated on disk are picked up without a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mulo_proto::v1 as pb;
use mulo_proto::v1::gateway_client::GatewayClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Waits for a service's plaintext health port (`--health-listen`) to say SERVING.
async fn wait_serving(p: &mut common::Proc, health: &str) {
    use tonic_health::pb::health_check_response::ServingStatus;
    let start = std::time::Instant::now();
    loop {
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!("the service of {health} exited early: {status}");
        }
        if let Ok(c) = Endpoint::from_shared(format!("http://{health}"))
            .unwrap()
            .connect()
            .await
        {
            let r = tonic_health::pb::health_client::HealthClient::new(c)
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            if r.is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32) {
                return;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{health} not up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts `name` with TLS flags and a plaintext health port; returns it once serving.
async fn start_tls(name: &str, args: &[&str]) -> common::Proc {
    let health = format!("127.0.0.1:{}", common::free_port());
    let mut all = args.to_vec();
    all.extend(["--health-listen", &health]);
    let mut p = common::start(name, &all);
    wait_serving(&mut p, &health).await;
    p.listening().await;
    p
}

/// A TLS channel to `addr` trusting `ca`, with a client identity when given.
async fn tls_channel(
    addr: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name("localhost");
    if let Some((c, k)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(c).unwrap(),
            std::fs::read(k).unwrap(),
        ));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
}

/// A verifier `Info` over TLS: whether the handshake and the call went through.
async fn verifier_answers(addr: &str, ca: &Path, identity: Option<(&Path, &Path)>) -> bool {
    let Ok(ch) = tls_channel(addr, ca, identity).await else {
        return false;
    };
    mulo_proto::v1::verifier_client::VerifierClient::new(ch)
        .info(pb::VerifierInfoRequest {})
        .await
        .is_ok()
}

fn request() -> pb::GenerateRequest {
    let mut r = common::request("red apple", "mulo", 7);
    r.return_tokens = true;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_with_mtls_accept_only_a_gateway_with_the_right_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = common::Pki::new(d, "cluster");
    let rogue = common::Pki::new(d, "rogue");
    let (role_cert, role_key) = pki.issue(d, "roles");
    let (gw_cert, gw_key) = pki.issue(d, "gateway");
    let (bad_cert, bad_key) = rogue.issue(d, "intruder");
    let fam = common::family();
    let mtls = [
        "--family",
        s(&fam),
        "--threads",
        "1",
        "--tls-cert",
        s(&role_cert),
        "--tls-key",
        s(&role_key),
        "--tls-client-ca",
        s(&pki.ca),
    ];
    let drafter = start_tls("mulo-drafter", &mtls).await;
    let verifier = start_tls("mulo-verifier", &mtls).await;

    // Straight to the verifier: no client certificate, or one from another CA, is refused
    // during the handshake; the cluster's certificate is served.
    assert!(!verifier_answers(&verifier.addr, &pki.ca, None).await);
    assert!(!verifier_answers(&verifier.addr, &pki.ca, Some((&bad_cert, &bad_key))).await);
    assert!(verifier_answers(&verifier.addr, &pki.ca, Some((&gw_cert, &gw_key))).await);

    let gateway = |identity: Option<(&Path, &Path)>| {
        let mut args: Vec<String> = [
            "--family",
            s(&fam),
            "--threads",
            "1",
            "--drafter",
            &drafter.addr,
            "--verifier",
            &verifier.addr,
            "--roles-ca",
            s(&pki.ca),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        if let Some((c, k)) = identity {
            args.extend(["--roles-cert", s(c), "--roles-key", s(k)].map(String::from));
        }
        args
    };
    // A gateway without a client certificate: the roles refuse it, the request fails.
    let args = gateway(None);
    let mut no_cert = common::start(
        "mulo-gateway",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let mut gw = GatewayClient::new(common::connect(&mut no_cert).await);
    let e = gw.generate(request()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    // With the cluster's client certificate: served, both roles used.
    let args = gateway(Some((&gw_cert, &gw_key)));
    let mut with_cert = common::start(
        "mulo-gateway",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let mut gw = GatewayClient::new(common::connect(&mut with_cert).await);
    let r = gw.generate(request()).await.unwrap().into_inner();
    assert_eq!(r.tokens.len(), 256);
    let stats = r.stats.unwrap();
    assert!(
        stats.fallback.is_empty() && stats.drafter_passes > 0,
        "{stats:?}"
    );
    assert!(r.png.starts_with(b"\x89PNG"));
}

/// Runs the Python client against a TLS gateway; returns (exit code, stdout, stderr).
fn python(venv: &Path, scratch: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(venv.join("bin/python"))
        .arg(scratch.join("examples/python/mulo_client.py"))
        .args(args)
        .current_dir(scratch)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The stubs of the Python client, generated in `scratch` (as docs/api.md does).
fn python_scratch(venv: &Path, scratch: &Path) {
    std::fs::create_dir_all(scratch.join("examples/python/gen")).unwrap();
    std::os::unix::fs::symlink(repo().join("proto"), scratch.join("proto")).unwrap();
    std::fs::copy(
        repo().join("examples/python/mulo_client.py"),
        scratch.join("examples/python/mulo_client.py"),
    )
    .unwrap();
    let ok = Command::new(venv.join("bin/python"))
        .args(["-m", "grpc_tools.protoc", "-I", "proto"])
        .args([
            "--python_out=examples/python/gen",
            "--grpc_python_out=examples/python/gen",
        ])
        .args(
            ["common", "drafter", "gateway", "info", "verifier"]
                .map(|f| format!("proto/mulo/v1/{f}.proto")),
        )
        .current_dir(scratch)
        .status()
        .unwrap()
        .success();
    assert!(ok, "protoc");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_gateway_with_tokens_serves_python_and_rotates_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let venv = common::python_client_venv();
    python_scratch(&venv, d);
    let blocks =
        common::tested_blocks(&std::fs::read_to_string(repo().join("docs/security.md")).unwrap());
    assert_eq!(blocks.len(), 2, "the token file and Python blocks");
    // The page's token file block, run in the scratch directory.
    common::run_block(&blocks[0], d, &[]);
    let tokens = d.join("tokens.txt");
    let text = std::fs::read_to_string(&tokens).unwrap();
    let token = text
        .lines()
        .next()
        .unwrap()
        .split_once(':')
        .unwrap()
        .1
        .to_string();
    assert!(token.len() >= 16, "{text}");

    let pki = common::Pki::new(d, "cluster");
    let (cert, key) = pki.issue(d, "gateway");
    let fam = common::family();
    let role = ["--family", s(&fam), "--threads", "1"];
    let mut drafter = common::start("mulo-drafter", &role);
    let mut verifier = common::start("mulo-verifier", &role);
    common::connect(&mut drafter).await;
    common::connect(&mut verifier).await;
    let (dr, v) = (drafter.addr.clone(), verifier.addr.clone());
    let gateway = start_tls(
        "mulo-gateway",
        &[
            "--family",
            s(&fam),
            "--threads",
            "1",
            "--drafter",
            &dr,
            "--verifier",
            &v,
            "--tls-cert",
            s(&cert),
            "--tls-key",
            s(&key),
            "--auth-tokens",
            s(&tokens),
        ],
    )
    .await;

    // The page's Python block: TLS with the CA and the token.
    let path = format!(
        "{}:{}",
        venv.join("bin").display(),
        std::env::var("PATH").unwrap()
    );
    let env = [
        ("PATH", path.as_str()),
        ("GATEWAY", gateway.addr.as_str()),
        ("CA", s(&pki.ca)),
    ];
    let (out, _) = common::run_block(&blocks[1], d, &env);
    assert!(out.contains("apple.png: 16x16 tokens by mulo:"), "{out}");
    assert!(std::fs::read(d.join("apple.png"))
        .unwrap()
        .starts_with(b"\x89PNG"));

    // `mulo generate --gateway` over TLS with the token; without the token it fails, naming why.
    let cli = |extra: &[&str]| {
        Command::new(common::mulo_cli())
            .args([
                "generate",
                "red apple",
                "--no-progress",
                "--gateway",
                &gateway.addr,
            ])
            .args(["--gateway-ca", s(&pki.ca), "--out", s(&d.join("cli.png"))])
            .args(extra)
            .env_remove("MULO_TOKEN")
            .output()
            .unwrap()
    };
    let out = cli(&["--token", &token]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing credentials"), "{err}");

    // No token, a wrong token: UNAUTHENTICATED, exit status 1.
    let base = [
        "--gateway",
        &gateway.addr,
        "--ca-cert",
        s(&pki.ca),
        "--prompt",
        "x",
    ];
    let (code, _, err) = python(&venv, d, &base);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("UNAUTHENTICATED") && err.contains("authorization"),
        "{err}"
    );
    let wrong: Vec<&str> = base
        .iter()
        .copied()
        .chain(["--token", "not-the-token-1234567"])
        .collect();
    let (code, _, err) = python(&venv, d, &wrong);
    assert_eq!(code, Some(1));
    assert!(err.contains("UNAUTHENTICATED"), "{err}");

    // A plaintext client to the TLS port gets no answer; health stays open on its port.
    let plain = Endpoint::from_shared(format!("http://{}", gateway.addr)).unwrap();
    let failed = match plain.connect().await {
        Err(_) => true,
        Ok(ch) => GatewayClient::new(ch).generate(request()).await.is_err(),
    };
    assert!(failed, "a plaintext client was served on the TLS port");

    // Rotation on disk: a new CA's certificate replaces the served one, and a new token the old.
    let next = common::Pki::new(d, "next");
    let trusts_next = || async {
        match tls_channel(&gateway.addr, &next.ca, None).await {
            Ok(ch) => {
                let mut r = tonic::Request::new(pb::ListModelsRequest {});
                r.metadata_mut()
                    .insert("authorization", format!("Bearer {token}").parse().unwrap());
                GatewayClient::new(ch).list_models(r).await.is_ok()
            }
            Err(_) => false,
        }
    };
    assert!(!trusts_next().await, "the new CA is not served yet");
    let (c2, k2) = next.issue(d, "gateway-2");
    std::fs::copy(&k2, &key).unwrap();
    std::fs::copy(&c2, &cert).unwrap();
    let start = std::time::Instant::now();
    while !trusts_next().await {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the rotated certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let new_token = "rotated-token-abcdefghijkl";
    std::fs::write(&tokens, format!("team-b:{new_token}\n")).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    let run = |t: &str| {
        let args: Vec<&str> = ["--gateway", gateway.addr.as_str(), "--ca-cert", s(&next.ca)]
            .into_iter()
            .chain(["--prompt", "red apple", "--token", t, "--out", "b.png"])
            .collect();
        python(&venv, d, &args)
    };
    let (code, _, err) = run(&token);
    assert_eq!(code, Some(1), "the old token still works");
    assert!(err.contains("UNAUTHENTICATED"), "{err}");
    let (code, out, err) = run(new_token);
    assert_eq!(code, Some(0), "{out}\n{err}");
}
