//! docs/api.md's commands work: its blocks marked *tested* run verbatim with bash against a
//! running gateway (grpcurl over reflection, the Python client on stubs generated from the proto
//! files), in a scratch directory, with a virtual environment from
//! examples/python/requirements.txt.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Width and height of a PNG file.
fn png_size(path: &Path) -> (u32, u32) {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        &b[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is no PNG",
        path.display()
    );
    let be = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    (be(16), be(20))
}

#[tokio::test]
async fn the_api_page_commands_run_against_a_gateway() {
    let blocks =
        common::tested_blocks(&std::fs::read_to_string(repo().join("docs/api.md")).unwrap());
    assert_eq!(blocks.len(), 2, "grpcurl and Python blocks");
    let env = common::python_client_venv();
    let (_d, _v, gateway, _ch) = common::cluster().await;

    // The scratch directory the blocks run in: the proto files and the example client.
    let tmp = std::env::temp_dir().join(format!("mulo-api-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(tmp.join("examples/python")).unwrap();
    std::fs::create_dir_all(tmp.join("bin")).unwrap();
    std::os::unix::fs::symlink(repo().join("proto"), tmp.join("proto")).unwrap();
    std::fs::copy(
        repo().join("examples/python/mulo_client.py"),
        tmp.join("examples/python/mulo_client.py"),
    )
    .unwrap();
    let has_grpcurl = Command::new("sh")
        .args(["-c", "command -v grpcurl"])
        .output()
        .unwrap()
        .status
        .success();
    if !has_grpcurl {
        let shim = tmp.join("bin/grpcurl");
        std::fs::write(
            &shim,
            format!(
                "#!/bin/sh\nexec \"{}\" \"{}\" \"$@\"\n",
                env.join("bin/python").display(),
                repo().join("services/tests/support/grpcurl.py").display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!(
        "{}:{}:{}",
        tmp.join("bin").display(),
        env.join("bin").display(),
        std::env::var("PATH").unwrap()
    );
    let run = |block: &str| {
        common::run_block(
            block,
            &tmp,
            &[("PATH", path.as_str()), ("GATEWAY", gateway.addr.as_str())],
        )
    };

    let (out, _) = run(&blocks[0]);
    for want in [
        "mulo.v1.Gateway\n",
        "grpc.health.v1.Health",
        "mulo.v1.Gateway.GenerateStream",
        "\"family\": \"emoji\"",
        "\"tokens\": 256",
        "\"targetPasses\"",
    ] {
        assert!(out.contains(want), "grpcurl block: no {want:?} in\n{out}");
    }

    let (out, err) = run(&blocks[1]);
    assert_eq!(png_size(&tmp.join("apple.png")), (64, 64));
    assert_eq!(png_size(&tmp.join("frog.png")), (64, 64));
    assert!(out.contains("apple.png: 16x16 tokens by mulo:"), "{out}");
    assert!(out.contains("frog.png: 16x16 tokens by ar"), "{out}");
    assert!(err.contains("256/256 tokens"), "{err}");

    // The client's error path: the code and the field, exit status 1.
    let out = Command::new(env.join("bin/python"))
        .arg(tmp.join("examples/python/mulo_client.py"))
        .args([
            "--gateway",
            &gateway.addr,
            "--prompt",
            "x",
            "--method",
            "nope",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("INVALID_ARGUMENT") && err.contains("method"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}
