//! Fuzzing of the public request decoding and validation (docs/security.md): structure-aware
//! generation of `GenerateRequest`s (method strings from the parameter grammar and garbage,
//! sampling with NaN/∞/huge values, every kind of condition with inconsistent sizes, deadlines
//! and bearer tokens as metadata, against a gateway with and one without tokens), raw bytes through
//! protobuf decoding, and the session specs and role-call fields the roles decode. Every input must
//! come back as a request within every bound or a status of a defined code (INVALID_ARGUMENT,
//! UNAUTHENTICATED), never a panic. More than 100 000 inputs run in the test command; the corpus
//! under `tests/fuzz-corpus/` (encoded requests that could hurt a replica before the bounds; any
//! crasher this fuzzer finds joins them) is replayed first, and proptest records any new failure
//! in `tests/fuzz-regressions.txt`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use mulo_core::SamplingParams;
use mulo_proto::v1 as pb;
use mulo_server::convert::{count_in, list_in, ref_in, spec_in};
use mulo_server::gateway::{FamilyInfo, GatewayLimits, GatewayService};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};
use prost::Message;
use tonic::Code;

/// Inputs of each kind per run: 110 000 in all.
const STRUCTURED: u32 = 60_000;
const RAW: u32 = 25_000;
const ROLE: u32 = 25_000;

fn gateway(auth: Option<std::sync::Arc<mulo_server::auth::Auth>>) -> GatewayService {
    GatewayService::new(
        FamilyInfo {
            name: "fuzz".into(),
            rows: 16,
            cols: 16,
            sampling: SamplingParams::default(),
            condition: "caption".into(),
            pixels_per_token: 4,
        },
        Vec::new(),
        Vec::new(),
        GatewayLimits {
            auth,
            ..GatewayLimits::default()
        },
        None,
    )
}

/// The token the guarded gateway accepts.
const TOKEN: &str = "fuzz-token-0123456789";

/// A gateway checking bearer tokens (no rate limit: every answer depends on the input alone).
fn guarded_gateway(dir: &std::path::Path) -> GatewayService {
    let f = dir.join("tokens");
    std::fs::write(&f, format!("fuzz:{TOKEN}\n")).unwrap();
    let limits = mulo_server::auth::TokenLimits {
        rate: 0.0,
        burst: 1.0,
        max_in_flight: 1,
    };
    let auth = mulo_server::auth::Auth::new(f, limits).unwrap();
    gateway(Some(std::sync::Arc::new(auth)))
}

/// `authorization` values: absent, the token, near misses, other schemes, garbage.
fn authorization() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(prop_oneof![
        Just(format!("Bearer {TOKEN}")),
        Just(format!("bearer   {TOKEN} ")),
        Just(format!("Bearer {}", &TOKEN[1..])),
        Just(format!("Basic {TOKEN}")),
        "Bearer [ -~]{0,40}",
        "[ -~]{0,40}",
    ])
}

/// Whether an accepted request is within every bound of `mulo_core::limits`.
fn within_bounds(g: &mulo_engine::GenerateRequest) -> bool {
    use mulo_core::limits as l;
    use mulo_core::Method;
    let s = &g.sampling;
    let sampling = (0.0..=l::MAX_CFG_SCALE).contains(&s.cfg_scale)
        && (0.0..=l::MAX_TEMPERATURE).contains(&s.temperature)
        && s.top_k <= l::MAX_TOP_K
        && s.top_p > 0.0
        && s.top_p <= 1.0;
    let method = match g.method {
        Method::Ar => true,
        Method::Sd(p) => (1..=l::MAX_GAMMA).contains(&p.gamma),
        Method::Lantern(p) => {
            (1..=l::MAX_GAMMA).contains(&p.gamma)
                && (1..=l::MAX_LANTERN_K).contains(&p.k)
                && (0.0..=1.0).contains(&p.delta)
        }
        Method::Mulo(p) => {
            (1..=l::MAX_POOL_K).contains(&p.pool_k)
                && (1..=l::MAX_BLOCK_ROWS).contains(&p.block_rows)
                && p.radius <= l::MAX_RADIUS
                && p.zipar_window <= l::MAX_ZIPAR_WINDOW
                && (0.0..=1.0).contains(&p.tau)
        }
    };
    let condition = match &g.condition {
        mulo_core::Condition::Prompt(p) => !p.trim().is_empty() && p.len() <= l::MAX_PROMPT_BYTES,
        mulo_core::Condition::CaptionFeatures {
            features, len, dim, ..
        } => {
            *len <= l::MAX_CAPTION_ROWS
                && *dim <= l::MAX_CAPTION_DIM
                && features.len() == len * dim
                && features.iter().all(|v| v.is_finite())
        }
        _ => true,
    };
    sampling && method && condition && !g.id.is_empty() && g.id.len() <= 256
}

/// Numbers a parser or a bound can trip on.
fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|v| v.to_string()),
        (0u64..3000).prop_map(|v| v.to_string()),
        Just("nan".to_string()),
        Just("inf".to_string()),
        Just("-0".to_string()),
        Just("1e309".to_string()),
        Just("99999999999999999999999".to_string()),
        ".{0,12}",
    ]
}

/// Method strings: a known or unknown name, then key=value pairs from the grammar or garbage.
fn method() -> impl Strategy<Value = String> {
    let name = prop_oneof![
        Just("ar"),
        Just("sd"),
        Just("lantern"),
        Just("mulo"),
        Just(""),
        Just("MULO"),
        Just("greedy")
    ];
    let key = prop_oneof![
        Just("tau".to_string()),
        Just("pool_k".to_string()),
        Just("radius".to_string()),
        Just("block_rows".to_string()),
        Just("zipar_window".to_string()),
        Just("rejection".to_string()),
        Just("pipeline".to_string()),
        Just("gamma".to_string()),
        Just("k".to_string()),
        Just("delta".to_string()),
        "[a-z_]{0,8}",
    ];
    let value = prop_oneof![
        number(),
        Just("local".to_string()),
        Just("raster".to_string()),
        Just("on".to_string())
    ];
    let pair = (key, value).prop_map(|(k, v)| format!("{k}={v}"));
    prop_oneof![
        (name, proptest::collection::vec(pair, 0..5)).prop_map(|(n, ps)| if ps.is_empty() {
            n.to_string()
        } else {
            format!("{n}:{}", ps.join(","))
        }),
        ".{0,40}",
    ]
}

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>(),
        -2.0..200.0f64,
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(0.0),
        Just(1.0)
    ]
}

fn sampling() -> impl Strategy<Value = Option<pb::Sampling>> {
    proptest::option::of(
        (
            proptest::option::of(float()),
            proptest::option::of(float()),
            proptest::option::of(any::<u32>()),
            proptest::option::of(float()),
        )
            .prop_map(|(c, t, k, p)| pb::Sampling {
                cfg_scale: c,
                temperature: t,
                top_k: k,
                top_p: p,
            }),
    )
}

fn condition() -> impl Strategy<Value = Option<pb::Condition>> {
    use pb::condition::Kind;
    let size = prop_oneof![0u32..6, any::<u32>(), Just(512u32), Just(8193u32)];
    let features = (
        proptest::collection::vec(any::<f32>(), 0..48),
        size.clone(),
        size,
        proptest::collection::vec(any::<bool>(), 0..8),
    )
        .prop_map(|(features, len, dim, mask)| {
            Kind::CaptionFeatures(pb::CaptionFeatures {
                features,
                len,
                dim,
                mask,
            })
        });
    let kind = prop_oneof![
        any::<u32>().prop_map(Kind::ClassId),
        ".{0,64}".prop_map(Kind::Prompt),
        (0usize..6000).prop_map(|n| Kind::Prompt("a".repeat(n))),
        features,
    ];
    proptest::option::of(proptest::option::of(kind).prop_map(|kind| pb::Condition { kind }))
}

/// A `grpc-timeout` value: well-formed, out of bound, or garbage.
fn timeout() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(prop_oneof![
        (0u64..100_000_000, "[HMSmun]").prop_map(|(n, u)| format!("{n}{u}")),
        "[ -~]{0,12}",
    ])
}

fn request() -> impl Strategy<Value = (pb::GenerateRequest, Option<String>)> {
    (
        prop_oneof![Just(String::new()), "[A-Za-z0-9._-]{1,140}", ".{0,20}"],
        condition(),
        method(),
        sampling(),
        any::<u64>(),
        any::<bool>(),
        timeout(),
    )
        .prop_map(|(request_id, condition, method, sampling, seed, b, t)| {
            let r = pb::GenerateRequest {
                request_id,
                condition,
                method,
                sampling,
                seed,
                return_tokens: b,
                skip_png: !b,
            };
            (r, t)
        })
}

fn with_metadata(
    r: pb::GenerateRequest,
    timeout: Option<&str>,
    auth: Option<&str>,
) -> tonic::Request<pb::GenerateRequest> {
    let mut req = tonic::Request::new(r);
    if let Some(t) = timeout.and_then(|t| t.parse().ok()) {
        req.metadata_mut().insert("grpc-timeout", t);
    }
    if let Some(a) = auth.and_then(|a| a.parse().ok()) {
        req.metadata_mut().insert("authorization", a);
    }
    req
}

/// Validates one request as the gateway does; an error must have a defined code, and what is
/// accepted must be within every bound.
fn check(
    gw: &GatewayService,
    r: pb::GenerateRequest,
    timeout: Option<&str>,
) -> Result<(), TestCaseError> {
    match gw.validate(with_metadata(r, timeout, None)) {
        Ok(g) => prop_assert!(within_bounds(&g), "{:?}", g),
        Err(s) => prop_assert_eq!(s.code(), Code::InvalidArgument, "{:?}", s),
    }
    Ok(())
}

/// The guarded gateway answers as the open one for the right token, UNAUTHENTICATED otherwise.
fn check_guarded(
    open: &GatewayService,
    guarded: &GatewayService,
    r: pb::GenerateRequest,
    timeout: Option<&str>,
    auth: Option<&str>,
) -> Result<(), TestCaseError> {
    let want = open.validate(with_metadata(r.clone(), timeout, None));
    let got = guarded.validate(with_metadata(r, timeout, auth));
    let sent = auth.filter(|a| a.parse::<tonic::metadata::MetadataValue<_>>().is_ok());
    let valid = sent.is_some_and(|a| {
        a.trim()
            .split_once(' ')
            .is_some_and(|(s, t)| s.eq_ignore_ascii_case("bearer") && t.trim() == TOKEN)
    });
    if valid {
        let code = |r: &Result<mulo_engine::GenerateRequest, tonic::Status>| {
            r.as_ref().err().map(|s| s.code())
        };
        prop_assert_eq!(code(&got), code(&want));
    } else {
        prop_assert_eq!(got.err().map(|s| s.code()), Some(Code::Unauthenticated));
    }
    Ok(())
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/fuzz-regressions.txt",
        ))),
        ..Config::default()
    })
}

fn corpus() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-corpus");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .collect();
    files.sort();
    files
}

#[test]
fn public_requests_decode_and_validate_to_defined_answers() {
    let gw = gateway(None);
    let dir = tempfile::tempdir().unwrap();
    let guarded = guarded_gateway(dir.path());
    // The corpus first: each file one encoded request, refused with INVALID_ARGUMENT.
    let files = corpus();
    assert!(files.len() >= 5, "{} corpus files", files.len());
    for f in &files {
        let r = pb::GenerateRequest::decode(std::fs::read(f).unwrap().as_slice()).unwrap();
        let e = gw.validate(tonic::Request::new(r)).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}: {e:?}", f.display());
    }
    let ran = AtomicUsize::new(0);
    runner(STRUCTURED)
        .run(&(request(), authorization()), |((r, t), a)| {
            ran.fetch_add(1, Ordering::Relaxed);
            check(&gw, r.clone(), t.as_deref())?;
            check_guarded(&gw, &guarded, r, t.as_deref(), a.as_deref())
        })
        .unwrap();
    // Raw bytes through protobuf decoding: a decode error, or a request checked as above.
    runner(RAW)
        .run(&proptest::collection::vec(any::<u8>(), 0..256), |bytes| {
            ran.fetch_add(1, Ordering::Relaxed);
            match pb::GenerateRequest::decode(bytes.as_slice()) {
                Ok(r) => check(&gw, r, None),
                Err(_) => Ok(()),
            }
        })
        .unwrap();
    let n = ran.load(Ordering::Relaxed);
    eprintln!("fuzzed {n} gateway requests");
    assert_eq!(n, (STRUCTURED + RAW) as usize);
}

fn spec() -> impl Strategy<Value = Option<pb::SessionSpec>> {
    proptest::option::of(
        (
            ".{0,300}",
            any::<u64>(),
            condition(),
            sampling(),
            any::<u64>(),
        )
            .prop_map(
                |(session_id, epoch, condition, sampling, seed)| pb::SessionSpec {
                    session_id,
                    epoch,
                    condition,
                    sampling,
                    seed,
                },
            ),
    )
}

#[test]
fn role_call_fields_decode_to_defined_answers() {
    let ran = AtomicUsize::new(0);
    let fields = (
        spec(),
        proptest::option::of((".{0,8}", any::<u64>(), any::<u32>())),
        any::<u32>(),
        prop_oneof![0usize..64, 65_500usize..65_600],
    );
    runner(ROLE)
        .run(&fields, |(spec, r, count, n)| {
            ran.fetch_add(1, Ordering::Relaxed);
            let defined = |s: &tonic::Status| s.code() == Code::InvalidArgument;
            if let Err(s) = spec_in(spec) {
                prop_assert!(defined(&s), "{:?}", s);
            }
            let r = r.map(|(session_id, epoch, committed_len)| pb::SessionRef {
                session_id,
                epoch,
                committed_len,
            });
            if let Err(s) = ref_in(r) {
                prop_assert!(defined(&s), "{:?}", s);
            }
            match count_in("pool_k", count, mulo_core::limits::MAX_POOL_K) {
                Ok(k) => prop_assert!((1..=mulo_core::limits::MAX_POOL_K).contains(&k)),
                Err(s) => prop_assert!(defined(&s) && s.message().contains("pool_k")),
            }
            let list = vec![7u32; n];
            match list_in("proposals", &list) {
                Ok(v) => prop_assert!(v.len() == n && n <= mulo_core::limits::MAX_TOKENS),
                Err(s) => prop_assert!(defined(&s) && n > mulo_core::limits::MAX_TOKENS),
            }
            Ok(())
        })
        .unwrap();
    let n = ran.load(Ordering::Relaxed);
    eprintln!("fuzzed {n} role-call inputs");
    assert_eq!(n, ROLE as usize);
}
