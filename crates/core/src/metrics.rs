//! Every Prometheus metric mulo exports (DESIGN §5.4): names, kinds, labels and help texts, in
//! one table. The crates record through the `metrics` facade with these constants; a service
//! installs the exporter (`--metrics-listen`) and describes [`ALL`]. Without an exporter (embedded
//! `mulo generate`) recording is a no-op.
//!
//! Units are in the names (`_seconds`, `_bytes`, `_total` for counters); counters, not ratios,
//! so that a fleet's replicas add up.

/// What a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (`rate()` it).
    Counter,
    /// A value now.
    Gauge,
    /// Observations in buckets (`histogram_quantile()` it).
    Histogram,
}

/// One metric of the table.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// Full name, `mulo_` first, unit last.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// Label names.
    pub labels: &'static [&'static str],
    /// Which services export it.
    pub services: &'static [&'static str],
    /// Prometheus `# HELP` text.
    pub help: &'static str,
}

const GATEWAY: &[&str] = &["gateway"];
const ROLES: &[&str] = &["drafter", "verifier"];
const VERIFIER: &[&str] = &["verifier"];
const EVERY: &[&str] = &["gateway", "drafter", "verifier"];

// --- gateway: requests --------------------------------------------------------------------------

/// Generation requests finished, by decoding method and outcome.
pub const REQUESTS: &str = "mulo_requests_total";
/// Wall time of a generation request, by decoding method.
pub const REQUEST_DURATION: &str = "mulo_request_duration_seconds";
/// Generation requests running now.
pub const REQUESTS_IN_FLIGHT: &str = "mulo_requests_in_flight";
/// The gateway's limit of requests at once.
pub const REQUESTS_IN_FLIGHT_LIMIT: &str = "mulo_requests_in_flight_limit";

// --- gateway: the cycle (recorded by the coordinator) -------------------------------------------

/// Cycles (MuLo-SD blocks, SD/LANTERN rounds).
pub const CYCLES: &str = "mulo_cycles_total";
/// Draft tokens proposed to the target.
pub const PROPOSED_TOKENS: &str = "mulo_proposed_tokens_total";
/// Proposals that passed the acceptance test.
pub const ACCEPTED_TOKENS: &str = "mulo_accepted_tokens_total";
/// Positions the target sampled itself after a rejection.
pub const RESAMPLED_TOKENS: &str = "mulo_resampled_tokens_total";
/// Tokens of finished images.
pub const COMMITTED_TOKENS: &str = "mulo_committed_tokens_total";
/// Target forward passes spent on finished requests.
pub const TARGET_PASSES: &str = "mulo_target_passes_total";
/// Drafter (or small draft model) forward passes spent on finished requests.
pub const DRAFTER_PASSES: &str = "mulo_drafter_passes_total";
/// Requests that fell back to AR on the verifier, by reason.
pub const FALLBACKS: &str = "mulo_fallbacks_total";
/// Requests moved to another verifier replica, by reason.
pub const MIGRATIONS: &str = "mulo_migrations_total";
/// Seconds per stage call.
pub const STAGE_DURATION: &str = "mulo_stage_duration_seconds";
/// Payload bytes sent to a role replica.
pub const SENT_BYTES: &str = "mulo_sent_bytes_total";
/// Payload bytes received from a role replica.
pub const RECEIVED_BYTES: &str = "mulo_received_bytes_total";

// --- every service -------------------------------------------------------------------------------

/// gRPC calls served, by RPC and outcome.
pub const RPCS: &str = "mulo_rpcs_total";
/// Seconds from a call's arrival to its response headers.
pub const RPC_DURATION: &str = "mulo_rpc_duration_seconds";

// --- drafter and verifier ------------------------------------------------------------------------

/// GPT forward passes run by this process, by model.
pub const FORWARD_PASSES: &str = "mulo_forward_passes_total";
/// Sessions held now, by role.
pub const SESSIONS: &str = "mulo_sessions";
/// Sessions a role holds at most.
pub const SESSION_LIMIT: &str = "mulo_session_limit";
/// Bytes of KV cache held by the live sessions, by role.
pub const KV_CACHE_BYTES: &str = "mulo_kv_cache_bytes";
/// Text prompts turned into caption features by the verifier's text encoder, by cache outcome.
pub const TEXT_ENCODINGS: &str = "mulo_text_encodings_total";
/// Calls to the gateway by bearer token name and outcome (with `--auth-tokens`).
pub const TOKEN_REQUESTS: &str = "mulo_token_requests_total";
/// Nearest-code tables the verifier holds (MuLo-SD pools, LANTERN proximity sets): 0 or 1.
pub const POOL_TABLES: &str = "mulo_nearest_code_tables";
/// Bytes of the verifier's nearest-code table (host and device).
pub const POOL_TABLE_BYTES: &str = "mulo_nearest_code_table_bytes";
/// Sessions (request groups) in each batched forward, by model.
pub const BATCH_SESSIONS: &str = "mulo_batch_sessions";
/// Role calls running or waiting on the torch thread, by role.
pub const QUEUE_DEPTH: &str = "mulo_queue_depth";
/// Seconds a forward request waited for the batched forward that ran it, by model.
pub const QUEUE_WAIT: &str = "mulo_queue_wait_seconds";

/// Label values of [`STAGE_DURATION`]: `prefill` and `drafter_prefill` (the round trip of opening
/// the session on the verifier and the drafter), the roles' reported compute of `draft`,
/// `upsample`, `realign`, `verify`, `resample` and `decode`, the gateway's own `expand` (planning
/// the resample), and `network` (a role call's round trip minus the compute the role reported:
/// the wire, serialisation and queueing at the role).
pub const STAGES: &[&str] = &[
    "prefill",
    "drafter_prefill",
    "draft",
    "upsample",
    "realign",
    "verify",
    "expand",
    "resample",
    "decode",
    "network",
];

/// Label values of [`FALLBACKS`].
pub const FALLBACK_REASONS: &[&str] = &[
    "no_drafter",
    "drafter_open_failed",
    "grid_mismatch",
    "drafter_failed",
];

/// Label values of [`MIGRATIONS`]: the replica did not answer, or it answered without the
/// session (it restarted).
pub const MIGRATION_REASONS: &[&str] = &["unreachable", "session_lost", "peer_error"];

/// The whole table.
pub const ALL: &[Metric] = &[
    Metric {
        name: REQUESTS,
        kind: Kind::Counter,
        labels: &["method", "outcome"],
        services: GATEWAY,
        help: "Generation requests finished, by decoding method (ar, sd, lantern, mulo; unknown when it did not parse) and outcome (ok or the gRPC code, e.g. invalid_argument, resource_exhausted, unavailable, cancelled).",
    },
    Metric {
        name: REQUEST_DURATION,
        kind: Kind::Histogram,
        labels: &["method"],
        services: GATEWAY,
        help: "Seconds of an admitted generation request, from admission to the answer (PNG included), by decoding method.",
    },
    Metric {
        name: REQUESTS_IN_FLIGHT,
        kind: Kind::Gauge,
        labels: &[],
        services: GATEWAY,
        help: "Generation requests running now (admitted, not finished).",
    },
    Metric {
        name: REQUESTS_IN_FLIGHT_LIMIT,
        kind: Kind::Gauge,
        labels: &[],
        services: GATEWAY,
        help: "Requests the gateway runs at once (--max-in-flight); more are refused with RESOURCE_EXHAUSTED.",
    },
    Metric {
        name: CYCLES,
        kind: Kind::Counter,
        labels: &["method"],
        services: GATEWAY,
        help: "Speculation cycles of finished requests: MuLo-SD blocks, SD and LANTERN rounds.",
    },
    Metric {
        name: PROPOSED_TOKENS,
        kind: Kind::Counter,
        labels: &["method"],
        services: GATEWAY,
        help: "Draft tokens proposed to the target by finished requests.",
    },
    Metric {
        name: ACCEPTED_TOKENS,
        kind: Kind::Counter,
        labels: &["method"],
        services: GATEWAY,
        help: "Proposals of finished requests that passed the acceptance test (accepted / proposed is the acceptance rate).",
    },
    Metric {
        name: RESAMPLED_TOKENS,
        kind: Kind::Counter,
        labels: &["method"],
        services: GATEWAY,
        help: "Positions of finished requests that the target sampled after a rejection (MuLo-SD: the rejected positions and their neighbourhoods; SD/LANTERN: the correction or bonus token of a round).",
    },
    Metric {
        name: COMMITTED_TOKENS,
        kind: Kind::Counter,
        labels: &["method"],
        services: GATEWAY,
        help: "Tokens of finished images (committed_tokens / target_passes is tokens per target pass).",
    },
    Metric {
        name: TARGET_PASSES,
        kind: Kind::Counter,
        labels: &["method"],
        services: GATEWAY,
        help: "Target forward passes spent on finished requests (prefill included).",
    },
    Metric {
        name: DRAFTER_PASSES,
        kind: Kind::Counter,
        labels: &["method"],
        services: GATEWAY,
        help: "Drafter (MuLo-SD) or small draft model (SD, LANTERN) forward passes spent on finished requests (prefill included).",
    },
    Metric {
        name: FALLBACKS,
        kind: Kind::Counter,
        labels: &["reason"],
        services: GATEWAY,
        help: "MuLo-SD requests that fell back to AR on the verifier: no_drafter, drafter_open_failed, grid_mismatch, drafter_failed.",
    },
    Metric {
        name: MIGRATIONS,
        kind: Kind::Counter,
        labels: &["reason"],
        services: GATEWAY,
        help: "Attempts to move a request to another verifier replica (re-prefilled with its committed tokens), by the failure that caused it: unreachable, session_lost (the replica restarted), peer_error.",
    },
    Metric {
        name: STAGE_DURATION,
        kind: Kind::Histogram,
        labels: &["stage"],
        services: GATEWAY,
        help: "Seconds per stage call of the cycle: the round trip of opening the session (prefill, drafter_prefill), the compute the role reported (draft, upsample, realign, verify, resample, decode; SD and LANTERN report their draft and verify too), the gateway's planning (expand), and network: a call's round trip minus the compute the role reported.",
    },
    Metric {
        name: SENT_BYTES,
        kind: Kind::Counter,
        labels: &["peer"],
        services: GATEWAY,
        help: "Protobuf payload bytes sent to a drafter or verifier replica (peer = its address).",
    },
    Metric {
        name: RECEIVED_BYTES,
        kind: Kind::Counter,
        labels: &["peer"],
        services: GATEWAY,
        help: "Protobuf payload bytes received from a drafter or verifier replica (peer = its address).",
    },
    Metric {
        name: RPCS,
        kind: Kind::Counter,
        labels: &["rpc", "outcome"],
        services: EVERY,
        help: "gRPC calls served, by RPC (service/method; unknown paths and UNIMPLEMENTED answers as other) and outcome (ok, the gRPC code in the response headers, or cancelled when the caller went away first; a stream that fails after it started counts as ok).",
    },
    Metric {
        name: RPC_DURATION,
        kind: Kind::Histogram,
        labels: &["rpc"],
        services: EVERY,
        help: "Seconds from a gRPC call's arrival to its response headers: the whole call for unary RPCs, the time to the first answer for streams.",
    },
    Metric {
        name: FORWARD_PASSES,
        kind: Kind::Counter,
        labels: &["model"],
        services: ROLES,
        help: "GPT forward passes this process ran (warm-up excluded), by model: target, drafter, draft_small.",
    },
    Metric {
        name: SESSIONS,
        kind: Kind::Gauge,
        labels: &["role"],
        services: ROLES,
        help: "Sessions (requests) held now, by role.",
    },
    Metric {
        name: SESSION_LIMIT,
        kind: Kind::Gauge,
        labels: &["role"],
        services: ROLES,
        help: "Sessions the role holds at most (--max-sessions); more are refused with RESOURCE_EXHAUSTED.",
    },
    Metric {
        name: KV_CACHE_BYTES,
        kind: Kind::Gauge,
        labels: &["role"],
        services: ROLES,
        help: "Bytes of KV cache allocated by the live sessions, by role.",
    },
    Metric {
        name: BATCH_SESSIONS,
        kind: Kind::Histogram,
        labels: &["model"],
        services: ROLES,
        help: "Sessions served by each batched forward pass, by model (continuous batching: 1 when the role serves one session at a time).",
    },
    Metric {
        name: QUEUE_WAIT,
        kind: Kind::Histogram,
        labels: &["model"],
        services: ROLES,
        help: "Seconds each forward request of a role call waited on the torch thread, from the call asking for it to the batched forward pass that ran it, by model (the queue stage of a call; the rest is compute).",
    },
    Metric {
        name: QUEUE_DEPTH,
        kind: Kind::Gauge,
        labels: &["role"],
        services: ROLES,
        help: "Role calls running or waiting on the torch thread (--max-queue bounds it; more are refused with RESOURCE_EXHAUSTED).",
    },
    Metric {
        name: TEXT_ENCODINGS,
        kind: Kind::Counter,
        labels: &["cache"],
        services: VERIFIER,
        help: "Text prompts of a T5 family turned into caption features, by cache outcome (hit: the features of the same prompt were still cached; miss: the encoder ran).",
    },
    Metric {
        name: TOKEN_REQUESTS,
        kind: Kind::Counter,
        labels: &["token", "outcome"],
        services: GATEWAY,
        help: "Calls to the gateway's API with --auth-tokens, by token name (- when none matched) and outcome: admitted, unauthenticated, rate_limited or in_flight_limited.",
    },
    Metric {
        name: POOL_TABLES,
        kind: Kind::Gauge,
        labels: &[],
        services: VERIFIER,
        help: "Nearest-code tables the verifier holds: 1 once built at warm-up; it is [V, 1024] (capped at V) and every pool size k is a view of its first k columns, so no request builds one.",
    },
    Metric {
        name: POOL_TABLE_BYTES,
        kind: Kind::Gauge,
        labels: &[],
        services: VERIFIER,
        help: "Bytes of the verifier's nearest-code table (int64 on the model's device plus u32 on the host).",
    },
];

/// The `outcome` label of a gRPC status code: `ok` or the code in snake case.
pub fn outcome(code: i32) -> &'static str {
    match code {
        0 => "ok",
        1 => "cancelled",
        2 => "unknown",
        3 => "invalid_argument",
        4 => "deadline_exceeded",
        5 => "not_found",
        6 => "already_exists",
        7 => "permission_denied",
        8 => "resource_exhausted",
        9 => "failed_precondition",
        10 => "aborted",
        11 => "out_of_range",
        12 => "unimplemented",
        13 => "internal",
        14 => "unavailable",
        15 => "data_loss",
        16 => "unauthenticated",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prometheus_conventions() {
        let mut seen = std::collections::HashSet::new();
        for m in ALL {
            assert!(seen.insert(m.name), "{} twice", m.name);
            assert!(m.name.starts_with("mulo_"), "{}", m.name);
            assert!(
                m.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{}",
                m.name
            );
            match m.kind {
                Kind::Counter => assert!(m.name.ends_with("_total"), "{}", m.name),
                // Durations in seconds; the one count histogram is sessions per batch.
                Kind::Histogram => assert!(
                    m.name.ends_with("_seconds") || m.name == BATCH_SESSIONS,
                    "{}",
                    m.name
                ),
                Kind::Gauge => assert!(!m.name.ends_with("_total"), "{}", m.name),
            }
            assert!(!m.help.is_empty() && !m.services.is_empty());
            for l in m.labels {
                assert!(!l.starts_with("__") && *l != "le" && *l != "quantile");
            }
        }
        // Every constant is in the table.
        for n in [
            BATCH_SESSIONS,
            QUEUE_DEPTH,
            QUEUE_WAIT,
            REQUESTS,
            REQUEST_DURATION,
            REQUESTS_IN_FLIGHT,
            REQUESTS_IN_FLIGHT_LIMIT,
            CYCLES,
            PROPOSED_TOKENS,
            ACCEPTED_TOKENS,
            RESAMPLED_TOKENS,
            COMMITTED_TOKENS,
            TARGET_PASSES,
            DRAFTER_PASSES,
            FALLBACKS,
            MIGRATIONS,
            STAGE_DURATION,
            SENT_BYTES,
            RECEIVED_BYTES,
            RPCS,
            RPC_DURATION,
            FORWARD_PASSES,
            SESSIONS,
            SESSION_LIMIT,
            KV_CACHE_BYTES,
            TEXT_ENCODINGS,
            POOL_TABLES,
            POOL_TABLE_BYTES,
            TOKEN_REQUESTS,
        ] {
            assert!(seen.contains(n), "{n} is not in ALL");
        }
        assert_eq!(seen.len(), ALL.len());
    }

    #[test]
    fn outcomes_name_every_grpc_code() {
        assert_eq!(outcome(0), "ok");
        assert_eq!(outcome(3), "invalid_argument");
        assert_eq!(outcome(14), "unavailable");
        assert_eq!(outcome(99), "other");
        let names: std::collections::HashSet<_> = (0..=16).map(outcome).collect();
        assert_eq!(names.len(), 17);
    }
}
