//! The Kubernetes overlays hang together: every overlay under k8s/overlays renders with
//! `kubectl kustomize`, and across its objects the selectors match the Deployments' pod labels,
//! Service, probe, `--listen` and NetworkPolicy ports agree with the container ports, the peer
//! lists name real Services and ports, and every flag and ConfigMap variable is one the binaries
//! accept (read from their `--help`); metrics ports, annotations and the observability kit
//! (collector, scrape job, alert rules) agree with the services; with TLS, the certificate files
//! are mounted Secrets of cert-manager Certificates whose names and usages fit their use. Schema validation is
//! `scripts/validate-deploy.sh`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn render(overlay: &str) -> Vec<Value> {
    render_dir(&format!("k8s/overlays/{overlay}"))
}

/// Renders a kustomization of the repository with `kubectl kustomize`.
fn render_dir(dir: &str) -> Vec<Value> {
    let dir = repo().join(dir);
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

/// The Secret mounted at the directory of `path` in the pod's only container.
fn secret_of(pod: &Value, path: &str) -> Option<String> {
    let dir = path.rsplit_once('/')?.0;
    let volume = pod["containers"][0]["volumeMounts"]
        .as_array()?
        .iter()
        .find(|m| m["mountPath"] == dir)?["name"]
        .as_str()?;
    pod["volumes"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == volume)?["secret"]["secretName"]
        .as_str()
        .map(str::to_string)
}

/// A container's environment variable set on the container itself.
fn env_var<'a>(c: &'a Value, name: &str) -> Option<&'a str> {
    c["env"].as_array()?.iter().find(|e| e["name"] == name)?["value"].as_str()
}

/// TLS of a container: every file its TLS variables name lies in a mounted Secret volume under
/// the key cert-manager writes (tls.crt, tls.key, ca.crt).
fn check_tls_files(overlay: &str, n: &str, pod: &Value, env: &BTreeMap<String, String>) {
    for (var, key) in [
        ("MULO_TLS_CERT", "tls.crt"),
        ("MULO_TLS_KEY", "tls.key"),
        ("MULO_TLS_CLIENT_CA", "ca.crt"),
        ("MULO_ROLES_CA", "ca.crt"),
        ("MULO_ROLES_CERT", "tls.crt"),
        ("MULO_ROLES_KEY", "tls.key"),
    ] {
        let Some(path) = env.get(var) else { continue };
        assert!(path.ends_with(&format!("/{key}")), "{overlay}: {n} {var}");
        assert!(
            secret_of(pod, path).is_some(),
            "{overlay}: {n} {var} {path}: no Secret mounted there"
        );
    }
    if env.contains_key("MULO_TLS_CERT") != env.contains_key("MULO_TLS_KEY") {
        panic!("{overlay}: {n} sets one of MULO_TLS_CERT and MULO_TLS_KEY");
    }
}

/// cert-manager's objects: each Certificate's issuer is rendered; each Secret a pod mounts is a
/// Certificate's (or the tokens Secret the operator creates); the roles' certificate names what
/// the gateway checks and serves servers, the gateway's client certificate authenticates clients.
fn check_certificates(overlay: &str, objects: &[Value]) {
    let of = |k: &str| -> Vec<&Value> { objects.iter().filter(|o| o["kind"] == k).collect() };
    let certs = of("Certificate");
    if certs.is_empty() {
        return;
    }
    let issuers: BTreeSet<&str> = of("Issuer")
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap())
        .collect();
    let by_secret: BTreeMap<&str, &Value> = certs
        .iter()
        .map(|c| (c["spec"]["secretName"].as_str().unwrap(), *c))
        .collect();
    for c in &certs {
        let issuer = c["spec"]["issuerRef"]["name"].as_str().unwrap();
        assert!(
            issuers.contains(issuer),
            "{overlay}: issuer {issuer} not rendered"
        );
    }
    let usages = |secret: &str| -> Vec<String> {
        by_secret[secret]["spec"]["usages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u.as_str().unwrap().to_string())
            .collect()
    };
    let deploys = of("Deployment");
    let pods: Vec<&Value> = deploys
        .iter()
        .map(|d| &d["spec"]["template"]["spec"])
        .collect();
    for pod in &pods {
        let c = &pod["containers"][0];
        for v in pod["volumes"].as_array().into_iter().flatten() {
            if let Some(s) = v["secret"]["secretName"].as_str() {
                assert!(
                    by_secret.contains_key(s) || s == "mulo-gateway-tokens",
                    "{overlay}: Secret {s} is no Certificate's"
                );
            }
        }
        if let Some(cert) = env_var(c, "MULO_TLS_CERT") {
            let s = secret_of(pod, cert).unwrap();
            assert!(usages(&s).contains(&"server auth".into()), "{overlay}: {s}");
        }
        let Some(cert) = env_var(c, "MULO_ROLES_CERT") else {
            continue;
        };
        let s = secret_of(pod, cert).unwrap();
        assert!(usages(&s).contains(&"client auth".into()), "{overlay}: {s}");
        let name = env_var(c, "MULO_ROLES_SERVER_NAME").unwrap();
        // Every role serves a certificate with the name the gateway checks.
        for role in &pods {
            let rc = &role["containers"][0];
            if rc["command"][0].as_str().unwrap().ends_with("mulo-gateway") {
                continue;
            }
            let rs = secret_of(role, env_var(rc, "MULO_TLS_CERT").unwrap()).unwrap();
            let names = &by_secret[rs.as_str()]["spec"]["dnsNames"];
            assert!(
                names.as_array().unwrap().iter().any(|x| x == name),
                "{overlay}: the roles' certificate does not name {name}"
            );
        }
    }
}

struct Deploy {
    name: String,
    pod_labels: BTreeMap<String, String>,
    binary: String,
    /// The gRPC port (container port named `grpc`).
    port: u64,
    /// Every container port by name.
    ports: BTreeMap<String, u64>,
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
        let ports: BTreeMap<String, u64> = c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap().to_string(),
                    p["containerPort"].as_u64().unwrap(),
                )
            })
            .collect();
        let port = *ports
            .get("grpc")
            .unwrap_or_else(|| panic!("{overlay}: {n} has no port named grpc"));
        // Metrics: the port the ConfigMap's MULO_METRICS_LISTEN serves on, and the one the pod
        // annotations point Prometheus at.
        let metrics = *ports
            .get("metrics")
            .unwrap_or_else(|| panic!("{overlay}: {n} has no port named metrics"));
        let cm = objects
            .iter()
            .find(|o| kind(o) == "ConfigMap" && name(o) == "mulo-config")
            .unwrap();
        let listen = cm["data"]["MULO_METRICS_LISTEN"]
            .as_str()
            .unwrap_or_default();
        assert!(
            listen.ends_with(&format!(":{metrics}")),
            "{overlay}: MULO_METRICS_LISTEN {listen} vs {n}'s metrics port {metrics}"
        );
        let notes = &d["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(notes["prometheus.io/scrape"], "true", "{overlay}: {n}");
        assert_eq!(
            notes["prometheus.io/port"].as_str(),
            Some(metrics.to_string().as_str()),
            "{overlay}: {n} prometheus.io/port"
        );
        assert_eq!(notes["prometheus.io/path"], "/metrics", "{overlay}: {n}");
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
        // HTTP (the gateway's images API and page) on the port named http, and only there.
        let http = args
            .iter()
            .position(|a| *a == "--http-listen")
            .map(|i| args[i + 1]);
        match (http, ports.get("http")) {
            (Some(h), Some(p)) => assert!(h.ends_with(&format!(":{p}")), "{overlay}: {n} {h}"),
            (None, None) => {}
            (h, p) => panic!("{overlay}: {n}: --http-listen {h:?} but http port {p:?}"),
        }
        // Variables set on the container itself: read by its binary.
        let env: BTreeMap<String, String> = c["env"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                let name = e["name"].as_str().unwrap().to_string();
                assert!(
                    accepted(&binary).1.contains(&name),
                    "{overlay}: {n} sets {name}, which {binary} does not read"
                );
                (name, e["value"].as_str().unwrap_or_default().to_string())
            })
            .collect();
        // Probes: on the gRPC port, or on the plaintext health port the binary serves health on
        // (with TLS on the gRPC port).
        let probe_port = match env.get("MULO_HEALTH_LISTEN") {
            Some(h) => {
                let health = *ports
                    .get("health")
                    .unwrap_or_else(|| panic!("{overlay}: {n} has no port named health"));
                assert!(h.ends_with(&format!(":{health}")), "{overlay}: {n} {h}");
                health
            }
            None => port,
        };
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            assert_eq!(
                c[probe]["grpc"]["port"].as_u64(),
                Some(probe_port),
                "{overlay}: {n} {probe} port"
            );
        }
        check_tls_files(overlay, &n, &d["spec"]["template"]["spec"], &env);
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
            ports,
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
            let target = p["targetPort"].as_str().unwrap();
            let container = d.ports.get(target).unwrap_or_else(|| {
                panic!(
                    "{overlay}: Service {} targets port {target}, not a port of {}",
                    name(s),
                    d.name
                )
            });
            assert_eq!(
                p["port"].as_u64(),
                Some(*container),
                "{overlay}: Service {} port {target}",
                name(s)
            );
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
    // NetworkPolicies: their ports are ports of the pods they select; pods may be reached from
    // other pods only by the gateway, and from another namespace (monitoring) only on metrics.
    let mut reached_by_gateway = BTreeSet::new();
    for np in objects.iter().filter(|o| kind(o) == "NetworkPolicy") {
        let sel = labels(&np["spec"]["podSelector"]["matchLabels"]);
        let targets: Vec<&Deploy> = deploys
            .iter()
            .filter(|d| selects(&sel, &d.pod_labels))
            .collect();
        assert!(
            !targets.is_empty(),
            "{overlay}: {} selects no pod",
            name(np)
        );
        for rule in np["spec"]["ingress"].as_array().unwrap() {
            let ports: Vec<u64> = rule["ports"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["port"].as_u64().unwrap())
                .collect();
            for t in &targets {
                for p in &ports {
                    assert!(
                        t.ports.values().any(|c| c == p),
                        "{overlay}: {} opens {p}, not a port of {}",
                        name(np),
                        t.name
                    );
                }
            }
            for from in rule["from"].as_array().into_iter().flatten() {
                if from.get("podSelector").is_some() {
                    let src = one(&labels(&from["podSelector"]["matchLabels"]), &name(np));
                    assert_eq!(
                        src.binary,
                        "mulo-gateway",
                        "{overlay}: only the gateway reaches other pods ({})",
                        name(np)
                    );
                    for t in &targets {
                        reached_by_gateway.insert(t.binary.clone());
                    }
                } else {
                    assert!(
                        from.get("namespaceSelector").is_some(),
                        "{overlay}: {}",
                        name(np)
                    );
                    // Other namespaces: Prometheus on metrics, and the client namespaces on the
                    // gateway's gRPC port and its HTTP port (labelled ones only).
                    for t in &targets {
                        let open = [Some(t.port), t.ports.get("http").copied()];
                        let client_port = t.binary == "mulo-gateway"
                            && ports.contains(&t.port)
                            && ports.iter().all(|p| open.contains(&Some(*p)))
                            && from["namespaceSelector"]["matchLabels"]["mulo.dev/client"]
                                == "true";
                        assert!(
                            client_port
                                || ports.iter().all(|p| Some(p) == t.ports.get("metrics")),
                            "{overlay}: {} opens more than the metrics port of {} to another namespace",
                            name(np),
                            t.name
                        );
                    }
                }
            }
            // A rule without sources admits everyone: none may.
            assert!(
                rule.get("from").is_some(),
                "{overlay}: {} is open to everyone",
                name(np)
            );
        }
    }
    // Only the gateway may reach the roles: each role has a policy admitting the gateway.
    for role in ["mulo-drafter", "mulo-verifier"] {
        assert!(
            reached_by_gateway.contains(role),
            "{overlay}: no NetworkPolicy admits the gateway to {role}"
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
        check_certificates(&o, &objects);
    }
}

#[test]
fn the_check_catches_a_roles_certificate_without_the_checked_name() {
    let mut objects = render("secure");
    check_certificates("secure", &objects);
    let cert = objects
        .iter_mut()
        .find(|o| o["kind"] == "Certificate" && o["metadata"]["name"] == "mulo-roles")
        .unwrap();
    cert["spec"]["dnsNames"] = serde_json::json!(["mulo-verifier"]);
    let caught = std::panic::catch_unwind(|| check_certificates("secure (altered)", &objects));
    assert!(caught.is_err());
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

#[test]
fn the_check_catches_a_role_port_opened_to_another_namespace() {
    let mut objects = render("cpu");
    let np = objects
        .iter_mut()
        .find(|o| {
            o["kind"] == "NetworkPolicy" && o["metadata"]["name"] == "mulo-metrics-from-monitoring"
        })
        .unwrap();
    np["spec"]["ingress"][0]["ports"][0]["port"] = 50062.into();
    np["spec"]["podSelector"]["matchLabels"] =
        serde_json::json!({"app.kubernetes.io/name": "mulo-verifier"});
    let caught = std::panic::catch_unwind(|| check("cpu (altered)", &objects));
    assert!(caught.is_err());
}

fn yaml(text: &str) -> Value {
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).unwrap();
    serde_json::to_value(v).unwrap()
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn observability_matches_the_services() {
    let obs = render_dir("k8s/observability");
    let cpu = render("cpu");
    let find = |objs: &[Value], kind: &str, name: &str| -> Value {
        objs.iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
            .clone()
    };
    // The services export to the collector's Service, on the port its OTLP receiver listens on.
    let cm = find(&cpu, "ConfigMap", "mulo-config");
    let endpoint = cm["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"].as_str().unwrap();
    let host = endpoint
        .trim_start_matches("http://")
        .split(':')
        .next()
        .unwrap();
    let svc = find(&obs, "Service", host);
    let sp = &svc["spec"]["ports"][0];
    assert_eq!(sp["port"].as_u64(), Some(port_of(endpoint)));
    let dep = find(&obs, "Deployment", host);
    let c = &dep["spec"]["template"]["spec"]["containers"][0];
    let cport = |name: &str| -> u64 {
        c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("collector port {name}"))["containerPort"]
            .as_u64()
            .unwrap()
    };
    let target = sp["targetPort"].as_str().unwrap();
    let conf = find(&obs, "ConfigMap", "otel-collector-config");
    let conf = yaml(conf["data"]["config.yaml"].as_str().unwrap());
    let grpc = conf["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
        .as_str()
        .unwrap();
    assert_eq!(port_of(grpc), cport(target));
    let health = conf["extensions"]["health_check"]["endpoint"]
        .as_str()
        .unwrap();
    assert_eq!(port_of(health), cport("health"));
    // Every exporter and processor a pipeline names is configured.
    for (_, p) in conf["service"]["pipelines"].as_object().unwrap() {
        for part in ["receivers", "processors", "exporters"] {
            for x in p[part].as_array().unwrap() {
                assert!(
                    conf[part].get(x.as_str().unwrap()).is_some(),
                    "pipeline names {part} {x}, not configured"
                );
            }
        }
    }
    // The volume mount holds the file the collector is started with.
    let mount = c["volumeMounts"][0]["mountPath"].as_str().unwrap();
    assert!(c["args"][0]
        .as_str()
        .unwrap()
        .ends_with(&format!("{mount}/config.yaml")));
    // Prometheus keeps the pods' port named like the Deployments' metrics port, on their path.
    let prom = find(&obs, "ConfigMap", "mulo-prometheus");
    let job = yaml(prom["data"]["prometheus.yml"].as_str().unwrap());
    let job = &job["scrape_configs"][0];
    assert_eq!(job["metrics_path"], "/metrics");
    let keeps_metrics_port = job["relabel_configs"].as_array().unwrap().iter().any(|r| {
        r["source_labels"][0] == "__meta_kubernetes_pod_container_port_name"
            && r["action"] == "keep"
            && r["regex"] == "metrics"
    });
    assert!(keeps_metrics_port);
    let ns = cpu.iter().find(|o| o["kind"] == "Namespace").unwrap()["metadata"]["name"].clone();
    assert_eq!(
        job["kubernetes_sd_configs"][0]["namespaces"]["names"][0],
        ns
    );
    // Alert rules only name metrics the services export.
    let alerts = prom["data"]["alerts.yml"].as_str().unwrap();
    let rules = yaml(alerts);
    let known: BTreeSet<&str> = mulo_core::metrics::ALL.iter().map(|m| m.name).collect();
    let mut named = 0;
    for rule in rules["groups"][0]["rules"].as_array().unwrap() {
        let expr = rule["expr"].as_str().unwrap();
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if !word.starts_with("mulo_") {
                continue;
            }
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| word.strip_suffix(s))
                .unwrap_or(word);
            assert!(known.contains(base), "alert {} names {word}", rule["alert"]);
            named += 1;
        }
    }
    assert!(named >= 5);
}
