//! Endpoint name resolution of the gateway: [`expand`] turns the `--drafter` / `--verifier`
//! endpoints into one endpoint per address, and a background task re-resolves the names and swaps
//! in the new replicas when they changed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::gateway;

/// One endpoint per address: a DNS name that resolves to several addresses (a Kubernetes
/// headless Service: one per pod) becomes one endpoint each, so requests spread over the pods and
/// each pod gets its own channel; a name that does not resolve yet is kept as it is (its channel
/// resolves it when it connects). Duplicates are dropped, order is kept.
pub async fn expand(endpoints: &[String]) -> Vec<String> {
    resolve(endpoints, false).await.unwrap_or_default()
}

/// Is `endpoint` a name to resolve (not an address literal)?
pub(crate) fn is_name(endpoint: &str) -> bool {
    let bare = endpoint
        .trim()
        .split_once("://")
        .map_or(endpoint.trim(), |(_, rest)| rest);
    bare.parse::<SocketAddr>().is_err()
}

/// [`expand`]; with `strict`, `None` when some name does not resolve (a re-resolution then keeps
/// the addresses it had rather than dropping the name's).
async fn resolve(endpoints: &[String], strict: bool) -> Option<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for e in endpoints {
        let e = e.trim();
        if e.is_empty() {
            continue;
        }
        let bare = e.split_once("://").map_or(e, |(_, rest)| rest);
        let resolved: Vec<String> = if bare.parse::<SocketAddr>().is_ok() {
            vec![bare.to_string()]
        } else {
            match tokio::net::lookup_host(bare).await {
                Ok(addrs) => addrs.map(|a| a.to_string()).collect(),
                Err(_) if strict => return None,
                Err(_) => vec![bare.to_string()],
            }
        };
        let resolved = if resolved.is_empty() {
            if strict {
                return None;
            }
            vec![bare.to_string()]
        } else {
            resolved
        };
        if resolved.len() > 1 && !strict {
            tracing::info!(
                name = e,
                addresses = resolved.len(),
                "endpoint name resolved"
            );
        }
        for r in resolved {
            if !out.contains(&r) {
                out.push(r);
            }
        }
    }
    Some(out)
}

/// Re-resolves the endpoint names every `every` and swaps in the new addresses when they changed.
pub(crate) fn re_resolve(
    state: Arc<gateway::GatewayState>,
    drafters: Vec<String>,
    verifiers: Vec<String>,
    every: Duration,
) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let (Some(d), Some(v)) = (
                resolve(&drafters, true).await,
                resolve(&verifiers, true).await,
            ) else {
                tracing::warn!(
                    "an endpoint name did not resolve: keeping the replicas as they are"
                );
                continue;
            };
            if v.is_empty() {
                continue;
            }
            match state.set_endpoints(&d, &v) {
                Ok(true) => tracing::info!(drafters = ?d, verifiers = ?v, "replicas re-resolved"),
                Ok(false) => {}
                Err(e) => tracing::warn!(%e, "re-resolved replicas refused"),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn endpoint_names_expand_to_their_addresses() {
        let got = expand(&["127.0.0.1:7000".into(), " 127.0.0.1:7000".into()]).await;
        assert_eq!(got, vec!["127.0.0.1:7000".to_string()]);
        let got = expand(&["localhost:7001".into()]).await;
        assert!(!got.is_empty());
        for a in &got {
            let a: SocketAddr = a.parse().unwrap();
            assert!(a.ip().is_loopback() && a.port() == 7001, "{a}");
        }
        // Unresolvable names stay for the channel to resolve later; a re-resolution keeps what it
        // had instead.
        let got = expand(&["no-such-host.invalid:7002".into()]).await;
        assert_eq!(got, vec!["no-such-host.invalid:7002".to_string()]);
        assert_eq!(
            resolve(&["no-such-host.invalid:7002".into()], true).await,
            None
        );
        assert!(is_name("localhost:7001") && is_name("http://verifier:50062"));
        assert!(!is_name("127.0.0.1:7001") && !is_name("http://[::1]:7001"));
    }
}
