//! The Kubernetes overlays hang together: every overlay under k8s/overlays renders with
//! `kubectl kustomize`, and across its objects the selectors match the Deployments' pod labels,
//! Service, probe, `--listen` and NetworkPolicy ports agree with the container ports, the peer
//! lists name real Services and ports, and every flag and ConfigMap variable is one the binaries
//! accept (read from their `--help`). Schema validation is `scripts/validate-k8s.sh`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn render(overlay: &str) -> Vec<Value> {
    let dir = repo().join("k8s/overlays").join(overlay);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .expect("kubectl (with kustomize) must be installed to check the manifests");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| {
            let v: serde_yaml_ng::Value = serde::Deserialize::deserialize(doc).unwrap();
            serde_json::to_value(v).unwrap()
        })
        .collect()
}

fn overlays() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(repo().join("k8s/overlays"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Flags and environment variables of a binary.
type Accepted = (BTreeSet<String>, BTreeSet<String>);

/// The flags and environment variables a binary accepts, from its `--help` (read once).
fn accepted(bin: &str) -> Accepted {
    static CACHE: std::sync::Mutex<BTreeMap<String, Accepted>> =
        std::sync::Mutex::new(BTreeMap::new());
    if let Some(hit) = CACHE.lock().unwrap().get(bin) {
        return hit.clone();
    }
    let got = read_help(bin);
    CACHE.lock().unwrap().insert(bin.to_string(), got.clone());
    got
}

fn read_help(bin: &str) -> Accepted {
    let exe = match bin {
        "mulo-drafter" => env!("CARGO_BIN_EXE_mulo-drafter"),
        "mulo-verifier" => env!("CARGO_BIN_EXE_mulo-verifier"),
        "mulo-gateway" => env!("CARGO_BIN_EXE_mulo-gateway"),
        other => panic!("no binary {other}"),
    };
    let out = Command::new(exe).arg("--help").output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    let flags = help
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| w.trim_end_matches([',', '=']).to_string())
        .map(|w| w.split('=').next().unwrap_or_default().to_string())
        .collect();
    let envs = help
        .split("[env: ")
        .skip(1)
        .filter_map(|s| s.split('=').next())
        .map(str::to_string)
        .collect();
    (flags, envs)
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn selects(selector: &BTreeMap<String, String>, pod: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| pod.get(k) == Some(v))
}

struct Deploy {
    name: String,
    pod_labels: BTreeMap<String, String>,
    binary: String,
    port: u64,
    port_name: String,
}

fn check(overlay: &str, objects: &[Value]) {
    let kind = |o: &Value| o["kind"].as_str().unwrap_or_default().to_string();
    let name = |o: &Value| {
        o["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let mut deploys = Vec::new();
    for d in objects.iter().filter(|o| kind(o) == "Deployment") {
        let n = name(d);
        let pod_labels = labels(&d["spec"]["template"]["metadata"]["labels"]);
        let sel = labels(&d["spec"]["selector"]["matchLabels"]);
        assert!(
            selects(&sel, &pod_labels),
            "{overlay}: {n} selector vs its pod labels"
        );
        let containers = d["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        assert_eq!(containers.len(), 1, "{overlay}: {n}");
        let c = &containers[0];
        let command = c["command"][0].as_str().unwrap();
        let binary = command.rsplit('/').next().unwrap().to_string();
        let port = &c["ports"][0];
        let (port, port_name) = (
            port["containerPort"].as_u64().unwrap(),
            port["name"].as_str().unwrap().to_string(),
        );
        // Flags the binary takes; --listen on the container port.
        let (flags, _) = accepted(&binary);
        let args: Vec<&str> = c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        for a in args.iter().filter(|a| a.starts_with("--")) {
            assert!(
                flags.contains(*a),
                "{overlay}: {n} passes {a}, {binary} has no such flag"
            );
        }
        let listen = args
            .iter()
            .position(|a| *a == "--listen")
            .map(|i| args[i + 1])
            .expect("--listen");
        assert!(
            listen.ends_with(&format!(":{port}")),
            "{overlay}: {n} listens on {listen}"
        );
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            assert_eq!(
                c[probe]["grpc"]["port"].as_u64(),
                Some(port),
                "{overlay}: {n} {probe} port"
            );
        }
        // Every variable the pod gets from the ConfigMap: known to some binary (a typo would be
        // ignored silently by all of them).
        for from in c["envFrom"].as_array().into_iter().flatten() {
            let cm = from["configMapRef"]["name"].as_str().unwrap();
            let data = objects
                .iter()
                .find(|o| kind(o) == "ConfigMap" && name(o) == cm)
                .unwrap_or_else(|| panic!("{overlay}: {n} reads ConfigMap {cm}, not rendered"));
            for key in data["data"].as_object().unwrap().keys() {
                let known = ["mulo-drafter", "mulo-verifier", "mulo-gateway"]
                    .iter()
                    .any(|b| accepted(b).1.contains(key));
                assert!(
                    known,
                    "{overlay}: ConfigMap {cm} sets {key}, which no binary reads"
                );
            }
        }
        deploys.push(Deploy {
            name: n,
            pod_labels,
            binary,
            port,
            port_name,
        });
    }
    assert_eq!(deploys.len(), 3, "{overlay}: drafter, verifier, gateway");
    let one = |sel: &BTreeMap<String, String>, what: &str| -> &Deploy {
        let hits: Vec<&Deploy> = deploys
            .iter()
            .filter(|d| selects(sel, &d.pod_labels))
            .collect();
        assert_eq!(
            hits.len(),
            1,
            "{overlay}: {what} selects {} Deployments",
            hits.len()
        );
        hits[0]
    };
    let mut services = BTreeMap::new();
    for s in objects.iter().filter(|o| kind(o) == "Service") {
        let d = one(
            &labels(&s["spec"]["selector"]),
            &format!("Service {}", name(s)),
        );
        for p in s["spec"]["ports"].as_array().unwrap() {
            assert_eq!(
                p["port"].as_u64(),
                Some(d.port),
                "{overlay}: Service {} port",
                name(s)
            );
            assert_eq!(p["targetPort"].as_str(), Some(d.port_name.as_str()));
        }
        services.insert(name(s), (d.port, d.binary.clone()));
    }
    for p in objects.iter().filter(|o| kind(o) == "PodDisruptionBudget") {
        one(
            &labels(&p["spec"]["selector"]["matchLabels"]),
            &format!("PDB {}", name(p)),
        );
    }
    for h in objects
        .iter()
        .filter(|o| kind(o) == "HorizontalPodAutoscaler")
    {
        let target = h["spec"]["scaleTargetRef"]["name"].as_str().unwrap();
        assert!(
            deploys.iter().any(|d| d.name == target),
            "{overlay}: HPA target {target}"
        );
    }
    for np in objects.iter().filter(|o| kind(o) == "NetworkPolicy") {
        let d = one(
            &labels(&np["spec"]["podSelector"]["matchLabels"]),
            &name(np),
        );
        for rule in np["spec"]["ingress"].as_array().unwrap() {
            for p in rule["ports"].as_array().unwrap() {
                assert_eq!(
                    p["port"].as_u64(),
                    Some(d.port),
                    "{overlay}: {} port",
                    name(np)
                );
            }
            for from in rule["from"].as_array().into_iter().flatten() {
                let src = one(&labels(&from["podSelector"]["matchLabels"]), &name(np));
                assert_eq!(
                    src.binary, "mulo-gateway",
                    "{overlay}: only the gateway reaches {}",
                    d.name
                );
            }
        }
    }
    // Only the gateway may reach the roles: each role has a policy admitting just the gateway.
    for role in ["mulo-drafter", "mulo-verifier"] {
        assert!(
            objects.iter().any(|np| kind(np) == "NetworkPolicy"
                && one(&labels(&np["spec"]["podSelector"]["matchLabels"]), "policy").binary
                    == role),
            "{overlay}: no NetworkPolicy for {role}"
        );
    }
    // The gateway's peer lists name the roles' Services and ports.
    let cm = objects.iter().find(|o| kind(o) == "ConfigMap").unwrap();
    for (key, binary) in [
        ("MULO_DRAFTERS", "mulo-drafter"),
        ("MULO_VERIFIERS", "mulo-verifier"),
    ] {
        for peer in cm["data"][key].as_str().unwrap().split(',') {
            let (host, port) = peer.rsplit_once(':').unwrap();
            let svc = host.split('.').next().unwrap();
            let (p, b) = services
                .get(svc)
                .unwrap_or_else(|| panic!("{overlay}: {key} names {svc}, no such Service"));
            assert_eq!(
                (port.parse::<u64>().ok(), b.as_str()),
                (Some(*p), binary),
                "{overlay}: {key}"
            );
        }
    }
}

#[test]
fn every_overlay_renders_and_its_objects_agree() {
    let list = overlays();
    assert!(
        list.contains(&"cpu".to_string()) && list.contains(&"gpu".to_string()),
        "{list:?}"
    );
    for o in list {
        let objects = render(&o);
        check(&o, &objects);
    }
}

#[test]
fn the_check_catches_a_wrong_probe_port() {
    let mut objects = render("cpu");
    let d = objects
        .iter_mut()
        .find(|o| o["kind"] == "Deployment")
        .unwrap();
    d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = 1.into();
    let caught = std::panic::catch_unwind(|| check("cpu (altered)", &objects));
    assert!(caught.is_err());
}
