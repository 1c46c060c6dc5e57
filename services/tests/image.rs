//! The Dockerfile names only files the build produces: every `COPY` from the build context is a
//! path of the repository that `.dockerignore` keeps, every `COPY --from` takes what that build
//! stage's `scripts/collect-runtime.sh` writes to `/out`, the targets the Kubernetes overlays pull
//! (`mulo-cpu`, `mulo-cuda`) exist, and the commands of the Deployments are binaries the image
//! carries. `collect-runtime.sh` itself runs here on this build's binaries and libtorch and checks
//! that every library they load is among those it gathers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Stages of the Dockerfile: name → its instructions (continuation lines joined).
fn stages(text: &str) -> Vec<(String, Vec<String>)> {
    let joined = text.replace("\\\n", " ");
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for line in joined.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let upper = line.to_ascii_uppercase();
        if upper.starts_with("FROM ") {
            let name = line
                .split_whitespace()
                .skip_while(|w| !w.eq_ignore_ascii_case("as"))
                .nth(1)
                .unwrap_or_default()
                .to_string();
            out.push((name, Vec::new()));
        } else if let Some(last) = out.last_mut() {
            last.1.push(line.to_string());
        }
    }
    out
}

fn ignored(path: &str) -> bool {
    let rules = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    rules
        .lines()
        .map(str::trim)
        .filter(|r| !r.is_empty() && !r.starts_with('#'))
        .any(|r| path.starts_with(r.trim_end_matches('/')))
}

#[test]
fn the_dockerfile_names_only_files_the_build_produces() {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let stages = stages(&text);
    let by_name: BTreeMap<&str, &Vec<String>> =
        stages.iter().map(|(n, i)| (n.as_str(), i)).collect();
    for target in ["cpu", "cuda"] {
        assert!(by_name.contains_key(target), "no target {target}");
    }
    for (stage, instructions) in &stages {
        for ins in instructions.iter().filter(|i| i.starts_with("COPY ")) {
            let words: Vec<&str> = ins.split_whitespace().collect();
            let from = words
                .iter()
                .find_map(|w| w.strip_prefix("--from="))
                .map(str::to_string);
            let args: Vec<&str> = words[1..]
                .iter()
                .filter(|w| !w.starts_with("--"))
                .copied()
                .collect();
            let (srcs, _dest) = args.split_at(args.len() - 1);
            for src in srcs {
                match &from {
                    None if *src == "." => {}
                    None => {
                        assert!(
                            repo().join(src).exists() && !ignored(src),
                            "{stage}: COPY {src}: not in the build context"
                        );
                    }
                    Some(producer) => {
                        let made = by_name.get(producer.as_str()).unwrap_or_else(|| {
                            panic!("{stage}: COPY --from={producer}: no such stage")
                        });
                        assert!(
                            made.iter().any(|i| i.starts_with("RUN ")
                                && i.contains("scripts/collect-runtime.sh")
                                && i.trim_end().ends_with(" /out")),
                            "{stage}: stage {producer} does not collect into /out"
                        );
                        assert!(
                            ["/out/bin/", "/out/lib/"].contains(src),
                            "{stage}: COPY --from={producer} {src}: collect-runtime.sh writes /out/bin/ and /out/lib/"
                        );
                    }
                }
            }
        }
    }
    // The overlays pull these targets and run these binaries.
    for (overlay, image) in [("cpu", "mulo-cpu"), ("gpu", "mulo-cuda")] {
        let k = std::fs::read_to_string(
            repo()
                .join("k8s/overlays")
                .join(overlay)
                .join("kustomization.yaml"),
        )
        .unwrap();
        assert!(
            k.contains(&format!("/{image}")),
            "overlay {overlay} should pull {image}"
        );
    }
    let script = std::fs::read_to_string(repo().join("scripts/collect-runtime.sh")).unwrap();
    for role in ["drafter", "verifier", "gateway"] {
        let base = std::fs::read_to_string(repo().join(format!("k8s/base/{role}.yaml"))).unwrap();
        let bin = format!("mulo-{role}");
        assert!(base.contains(&format!("/usr/local/bin/{bin}")), "{role}");
        assert!(script.contains(&bin), "collect-runtime.sh gathers {bin}");
    }
}

#[test]
fn collect_runtime_gathers_every_library_the_binaries_load() {
    let libtorch = std::env::var("LIBTORCH").expect("LIBTORCH (from .cargo/config.toml)");
    let bins = Path::new(env!("CARGO_BIN_EXE_mulo-drafter"))
        .parent()
        .unwrap();
    let out = std::env::temp_dir().join(format!("mulo-collect-{}", std::process::id()));
    let run = |lib: &Path| {
        let _ = std::fs::remove_dir_all(&out);
        Command::new("bash")
            .arg(repo().join("scripts/collect-runtime.sh"))
            .arg(lib)
            .arg(bins)
            .arg(&out)
            .env("MULO_COLLECT_LINK", "1")
            .output()
            .unwrap()
    };
    let ok = run(Path::new(&libtorch));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    for b in ["mulo-drafter", "mulo-verifier", "mulo-gateway"] {
        assert!(out.join("bin").join(b).exists(), "{b}");
    }
    assert!(out.join("lib/libtorch_cpu.so").exists());
    // Without the libraries next to torch (the CUDA runtime of the wheels) the check fails.
    let bare = std::env::temp_dir().join(format!("mulo-bare-torch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&bare);
    std::fs::create_dir_all(bare.join("torch")).unwrap();
    std::os::unix::fs::symlink(Path::new(&libtorch).join("lib"), bare.join("torch/lib")).unwrap();
    let missing = run(&bare.join("torch"));
    assert!(
        !missing.status.success(),
        "a missing library must fail the check"
    );
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not found"));
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&bare);
}
