//! The gateway's HTTP API and live page with the real binaries (docs/http.md): curl-level
//! requests get the documented status and JSON, the PNG is the gRPC path's for the same seed,
//! the page's blocks run verbatim, tokens are checked as on gRPC, and headless Chromium drives
//! the page to a finished, tinted image.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use mulo_proto::v1::gateway_client::GatewayClient;
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `curl` with `args`; returns the HTTP status and the body.
fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl");
    assert!(out.status.success(), "curl {args:?}: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

/// POSTs `body` to the images API; the status and the JSON answer.
fn post(url: &str, body: &str, extra: &[&str]) -> (u16, Value) {
    let target = format!("{url}/v1/images/generations");
    let mut args = vec![
        target.as_str(),
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        body,
    ];
    args.extend_from_slice(extra);
    let (code, text) = curl(&args);
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (code, v)
}

/// Asserts an error answer: the status, the gRPC code and a word of the message.
fn refused(r: (u16, Value), status: u16, code: &str, says: &str) {
    let (got, v) = r;
    assert_eq!(got, status, "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains(says), "{says:?} not in {msg:?}");
}

fn png_of(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v["b64_json"].as_str().unwrap())
        .unwrap()
}

#[tokio::test]
async fn the_images_api_answers_as_documented_and_draws_the_grpc_image() {
    let (_d, _v, mut gw, ch) = common::cluster_with(&["--http-listen", "127.0.0.1:0"], &[]).await;
    let url = gw.http_url().await;

    let (code, ready) = curl(&[&format!("{url}/readyz")]);
    assert_eq!((code, ready.as_str()), (200, r#"{"status":"SERVING"}"#));
    let (code, models) = curl(&[&format!("{url}/v1/models")]);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(code, 200);
    assert_eq!(models["data"][0]["id"], "emoji");
    assert_eq!(models["data"][0]["size"], "64x64");

    // The PNG of the HTTP path is the gRPC path's for the same prompt, method and seed.
    let (code, v) = post(
        &url,
        r#"{"prompt": "red apple", "method": "mulo", "seed": 5, "size": "64x64"}"#,
        &[],
    );
    assert_eq!(code, 200, "{v}");
    let img = &v["data"][0];
    assert_eq!(img["seed"], 5);
    assert_eq!(img["stats"]["tokens"], 256);
    let grpc = GatewayClient::new(ch.clone())
        .generate(common::request("red apple", "mulo", 5))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(png_of(img), grpc.png);

    // n images: seeds seed, seed + 1; the second is the gRPC image of seed 6.
    let (code, v) = post(
        &url,
        r#"{"prompt": "red apple", "method": "ar", "seed": 5, "n": 2}"#,
        &[],
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    let six = GatewayClient::new(ch)
        .generate(common::request("red apple", "ar", 6))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(png_of(&v["data"][1]), six.png);
    assert_eq!(v["data"][1]["seed"], 6);

    // Refusals, with the gRPC code and the field.
    let p = |b: &str| post(&url, b, &[]);
    refused(p("{not json"), 400, "INVALID_ARGUMENT", "invalid JSON");
    refused(
        p(r#"{"prompt": "a", "sede": 1}"#),
        400,
        "INVALID_ARGUMENT",
        "sede",
    );
    refused(
        p(r#"{"prompt": "a", "method": "fast"}"#),
        400,
        "INVALID_ARGUMENT",
        "method",
    );
    refused(
        p(r#"{"prompt": "a", "method": "mulo:tau=7"}"#),
        400,
        "INVALID_ARGUMENT",
        "tau",
    );
    let long = format!(r#"{{"prompt": "{}"}}"#, "apple ".repeat(1000));
    refused(p(&long), 400, "INVALID_ARGUMENT", "4096");
    refused(
        p(r#"{"prompt": "a", "size": "1024x1024"}"#),
        400,
        "INVALID_ARGUMENT",
        "64x64",
    );
    refused(
        p(r#"{"prompt": "a", "n": 9}"#),
        400,
        "INVALID_ARGUMENT",
        "n must be 1 to 8",
    );
    refused(
        p(r#"{"prompt": "a", "response_format": "url"}"#),
        400,
        "INVALID_ARGUMENT",
        "b64_json",
    );
    refused(
        p(r#"{"prompt": "a", "model": "dall-e-3"}"#),
        404,
        "NOT_FOUND",
        "emoji",
    );
    refused(
        p(r#"{"seed": 1}"#),
        400,
        "INVALID_ARGUMENT",
        "prompt is required",
    );
    let huge = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(100_000));
    refused(p(&huge), 413, "RESOURCE_EXHAUSTED", "length limit");
    let (code, v) = curl(&[&format!("{url}/v2/nothing")]);
    assert_eq!(code, 404, "{v}");
    // A form POST (what a cross-site page can send without asking) is refused.
    let (code, v) = curl(&[
        &format!("{url}/v1/images/generations"),
        "-d",
        r#"{"prompt": "a"}"#,
    ]);
    let v: Value = serde_json::from_str(&v).unwrap();
    refused((code, v), 415, "INVALID_ARGUMENT", "application/json");
}

#[tokio::test]
async fn a_stream_sends_blocks_partial_images_and_the_grpc_image() {
    let (_d, _v, mut gw, ch) = common::cluster_with(&["--http-listen", "127.0.0.1:0"], &[]).await;
    let url = gw.http_url().await;
    let (code, text) = curl(&[
        "-N",
        &format!("{url}/v1/images/generations"),
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"prompt": "snowman", "method": "mulo:block_rows=2", "seed": 3, "stream": true}"#,
    ]);
    assert_eq!(code, 200, "{text}");
    let events: Vec<(String, Value)> = text
        .split("\n\n")
        .filter_map(|e| {
            let name = e.lines().find_map(|l| l.strip_prefix("event: "))?;
            let data = e.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((name.to_string(), serde_json::from_str(data).unwrap()))
        })
        .collect();
    let named = |n: &str| events.iter().filter(|(k, _)| k == n).count();
    // Four blocks of two draft rows; a partial image after some of them; the result last.
    assert_eq!(named("mulo.block"), 4, "{text}");
    // Partial images (as many as the decoding keeps up with) show uncommitted grids only.
    for (_, p) in events
        .iter()
        .filter(|(k, _)| k == "image_generation.partial_image")
    {
        assert!(p["committed"].as_u64().unwrap() < 256, "{p}");
        assert!(!p["b64_json"].as_str().unwrap().is_empty());
    }
    let (last, done) = events.last().unwrap();
    assert_eq!(last, "image_generation.completed");
    let blocks: Vec<&Value> = events
        .iter()
        .filter(|(k, _)| k == "mulo.block")
        .map(|(_, v)| v)
        .collect();
    let mut tokens = Vec::new();
    for b in &blocks {
        assert_eq!(b["start"].as_u64().unwrap() as usize, tokens.len());
        let n = b["tokens"].as_array().unwrap().len();
        assert_eq!(b["accepted"].as_array().unwrap().len(), n);
        assert_eq!(b["resampled"].as_array().unwrap().len(), n);
        tokens.extend(b["tokens"].as_array().unwrap().iter().cloned());
    }
    assert_eq!(tokens.len(), 256);
    assert!(blocks
        .windows(2)
        .all(|w| w[0]["target_passes"].as_u64() < w[1]["target_passes"].as_u64()));
    let mut want = common::request("snowman", "mulo:block_rows=2", 3);
    want.return_tokens = true;
    let grpc = GatewayClient::new(ch)
        .generate(want)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(png_of(done), grpc.png);
    let streamed: Vec<u32> = tokens.iter().map(|t| t.as_u64().unwrap() as u32).collect();
    assert_eq!(streamed, grpc.tokens);
}

#[tokio::test]
async fn the_http_page_blocks_run_and_tokens_are_checked_as_on_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.txt");
    let token = "team-http-abcdefghijklmnop";
    std::fs::write(&tokens, format!("team-http:{token}\n")).unwrap();
    let (_d, _v, mut gw, _ch) = common::cluster_with(
        &[
            "--http-listen",
            "127.0.0.1:0",
            "--auth-tokens",
            tokens.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    let url = gw.http_url().await;
    // No token, a wrong one: 401 with the gRPC code; the page and readiness need none.
    let body = r#"{"prompt": "red apple", "seed": 1}"#;
    refused(
        post(&url, body, &[]),
        401,
        "UNAUTHENTICATED",
        "authorization",
    );
    let wrong = ["-H", "Authorization: Bearer not-the-token-123456"];
    refused(post(&url, body, &wrong), 401, "UNAUTHENTICATED", "");
    assert_eq!(curl(&[&format!("{url}/readyz")]).0, 200);
    let (code, page) = curl(&[&format!("{url}/")]);
    assert_eq!(code, 200);
    assert!(page.contains("/assets/app.js"), "{page}");
    refused(
        {
            let (c, t) = curl(&[&format!("{url}/v1/models")]);
            (c, serde_json::from_str(&t).unwrap())
        },
        401,
        "UNAUTHENTICATED",
        "",
    );

    // docs/http.md's blocks, verbatim, against this gateway with the token.
    let doc = std::fs::read_to_string(repo().join("docs/http.md")).unwrap();
    let blocks = common::tested_blocks(&doc);
    assert_eq!(blocks.len(), 3, "generate, stream and error blocks");
    let env = [("MULO_HTTP", url.as_str()), ("MULO_TOKEN", token)];
    let run = |b: &str| common::run_block(b, dir.path(), &env).0;
    let out = run(&blocks[0]);
    assert!(out.contains("apple.png: 64x64, mulo:block_rows=8"), "{out}");
    assert!(Path::new(&dir.path().join("apple.png")).exists());
    let out = run(&blocks[1]);
    for want in ["event: mulo.block", "event: image_generation.completed"] {
        assert!(out.contains(want), "{want} not in {out}");
    }
    let out = run(&blocks[2]);
    assert!(
        out.contains(r#""code":"INVALID_ARGUMENT""#) && out.ends_with("400\n"),
        "{out}"
    );
}

#[tokio::test]
async fn headless_chromium_draws_a_generation_on_the_page() {
    let (Some(python), Some(driver)) = (
        option_env!("MULO_BROWSER_PYTHON"),
        option_env!("MULO_CHROMEDRIVER"),
    ) else {
        panic!("run scripts/setup-browser.sh (README's test command does): no MULO_BROWSER_PYTHON");
    };
    let (_d, _v, mut gw, _ch) = common::cluster_with(&["--http-listen", "127.0.0.1:0"], &[]).await;
    let url = gw.http_url().await;
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("http-page.png");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(repo().join("services/tests/support/browser.py"))
            .args([url.as_str(), shot.to_str().unwrap()])
            .env("MULO_CHROMEDRIVER", driver)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(page["state"], "done", "{page}");
    assert_eq!(page["error"], "", "{page}");
    let runs = page["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{page}");
    for r in runs {
        assert_eq!(r["state"], "done", "{page}");
        // The final image (64 px) and a tint on each of the 256 token cells.
        assert_eq!(r["final_width"], 64, "{page}");
        assert_eq!(r["tinted"], 256, "{page}");
        assert!(r["stats_rows"].as_u64().unwrap() > 5, "{page}");
    }
    assert_eq!(runs[0]["method"], "mulo:block_rows=2");
    assert_eq!(runs[0]["blocks"], 4, "{page}");
    assert!(
        page["speedup"].as_str().unwrap().contains("as fast as AR"),
        "{page}"
    );
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("http-page.png");
    let png = image::open(&shot).unwrap();
    assert!(png.width() >= 800, "{}", png.width());
    // Refreshes the README's screenshot when asked to.
    if let Ok(to) = std::env::var("MULO_SAVE_SCREENSHOT") {
        std::fs::copy(&shot, to).unwrap();
    }
}

#[tokio::test]
async fn an_http_request_in_flight_finishes_when_the_gateway_drains() {
    let (_d, _v, mut gw, ch) = common::cluster_with(&["--http-listen", "127.0.0.1:0"], &[]).await;
    let url = gw.http_url().await;
    let call = {
        let url = url.clone();
        std::thread::spawn(move || {
            post(
                &url,
                r#"{"prompt": "snowman", "method": "ar", "seed": 2}"#,
                &[],
            )
        })
    };
    // SIGTERM once the request is admitted.
    let mut client = GatewayClient::new(ch);
    let start = std::time::Instant::now();
    loop {
        let s = client
            .status(mulo_proto::v1::StatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if s.in_flight == 1 {
            break;
        }
        assert!(start.elapsed().as_secs() < 30, "the request never started");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let kill = Command::new("kill")
        .args(["-TERM", &gw.child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let (code, v) = tokio::task::spawn_blocking(move || call.join().unwrap())
        .await
        .unwrap();
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["data"][0]["stats"]["tokens"], 256);
    let exit = tokio::task::spawn_blocking(move || gw.child.wait().unwrap())
        .await
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn with_tls_flags_the_http_port_serves_https_with_the_same_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = common::Pki::new(dir.path(), "cluster");
    let (cert, key) = pki.issue(dir.path(), "gateway");
    let (_drafter, _verifier, args) = common::roles([&[], &[]], &[]).await;
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend([
        "--tls-cert",
        cert,
        "--tls-key",
        key,
        "--http-listen",
        "127.0.0.1:0",
    ]);
    let mut gw = common::start("mulo-gateway", &args);
    let url = gw.http_url().await;
    assert!(url.starts_with("https://"), "{url}");
    let ca = pki.ca.to_str().unwrap();
    let (code, ready) = curl(&["--cacert", ca, &format!("{url}/readyz")]);
    assert_eq!((code, ready.as_str()), (200, r#"{"status":"SERVING"}"#));
    // HTTP/1.1-only clients (Python's requests) negotiate too.
    let (code, v) = post(
        &url,
        r#"{"prompt": "red apple", "method": "ar", "seed": 1}"#,
        &["--cacert", ca, "--http1.1"],
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["data"][0]["stats"]["tokens"], 256);
    // Plaintext to the HTTPS port gets no answer.
    let plain = url.replace("https://", "http://");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", &format!("{plain}/readyz")])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
}

#[tokio::test]
async fn a_client_that_leaves_a_stream_cancels_its_generation() {
    let metrics = format!("127.0.0.1:{}", common::free_port());
    let (_d, _v, mut gw, _ch) = common::cluster_with(
        &["--http-listen", "127.0.0.1:0", "--metrics-listen", &metrics],
        &[],
    )
    .await;
    let url = gw.http_url().await;
    // AR streams a block per run of tokens; curl leaves after the first one.
    let out = Command::new("bash")
        .args([
            "-c",
            r#"curl -sSN "$1/v1/images/generations" -H 'Content-Type: application/json' \
            -d '{"prompt": "snowman", "method": "ar", "seed": 4, "stream": true}' \
            | grep -m1 '^event: mulo.block'"#,
            "_",
            &url,
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("mulo.block"),
        "{out:?}"
    );
    let cancelled =
        r#"mulo_requests_total{service="mulo-gateway",method="ar",outcome="cancelled"} 1"#;
    let start = std::time::Instant::now();
    loop {
        let (_, text) = curl(&[&format!("http://{metrics}/metrics")]);
        if text.contains(cancelled) {
            assert!(
                !text.contains(r#"method="ar",outcome="ok"} 1"#),
                "it ran to the end"
            );
            break;
        }
        assert!(start.elapsed().as_secs() < 30, "not cancelled:\n{text}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
