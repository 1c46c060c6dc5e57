//! Between the wire (`mulo.v1` messages, `tonic::Status`) and the engine's types. Every field a
//! peer can get wrong is checked here and refused with `INVALID_ARGUMENT` naming the field.

use mulo_core::{Condition, ParamError, SamplingParams};
use mulo_engine::{EngineError, MethodStats, SessionRef, SessionSpec};
use mulo_model::ModelError;
use mulo_proto::v1 as pb;
use tonic::{Code, Status};

/// The gRPC status of an engine error (DESIGN §5.3).
pub fn status(e: &EngineError) -> Status {
    let code = match e {
        EngineError::Param(_) | EngineError::Model(ModelError::InvalidInput(_)) => {
            Code::InvalidArgument
        }
        EngineError::Model(ModelError::KvCapacity { .. }) => Code::ResourceExhausted,
        EngineError::Precondition(_) => Code::FailedPrecondition,
        EngineError::UnknownSession(_) => Code::NotFound,
        EngineError::Capacity(_) => Code::ResourceExhausted,
        EngineError::Unsupported(_) => Code::Unimplemented,
        EngineError::WorkerGone | EngineError::Peer { .. } => Code::Unavailable,
        EngineError::Model(_)
        | EngineError::Torch(_)
        | EngineError::Tokenizer(_)
        | EngineError::Family(_)
        | EngineError::Internal(_) => Code::Internal,
    };
    Status::new(code, e.to_string())
}

/// The engine error of a status a peer answered with (client side), so the coordinator can tell
/// a refused call from a lost peer.
pub fn engine_error(peer: &str, s: &Status) -> EngineError {
    let msg = format!("{peer}: {}", s.message());
    match s.code() {
        Code::InvalidArgument => EngineError::Param(ParamError::new("peer", msg)),
        Code::FailedPrecondition => EngineError::Precondition(msg),
        Code::NotFound => EngineError::UnknownSession(msg),
        Code::ResourceExhausted => EngineError::Capacity(msg),
        Code::Unimplemented => EngineError::Unsupported(msg),
        _ => EngineError::Peer {
            peer: peer.to_string(),
            code: s.code().description().to_string(),
            message: s.message().to_string(),
        },
    }
}

/// `INVALID_ARGUMENT` naming `field`.
pub fn invalid(field: &str, why: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {why}"))
}

/// `INVALID_ARGUMENT` of a parameter error (it names the field and, past a bound, the bound).
pub fn param(e: ParamError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// A count from the wire, between 1 and `max` (a bound of [`mulo_core::limits`]).
pub fn count_in(field: &'static str, v: u32, max: usize) -> Result<usize, Status> {
    mulo_core::limits::in_range(field, v as usize, max).map_err(param)?;
    Ok(v as usize)
}

/// A token list a peer sends to a role: at most [`mulo_core::limits::MAX_TOKENS`] ids (the role
/// checks them against its grid and codebook).
pub fn list_in(field: &'static str, v: &[u32]) -> Result<Vec<i64>, Status> {
    mulo_core::limits::at_most(field, v.len(), mulo_core::limits::MAX_TOKENS).map_err(param)?;
    Ok(tokens_in(v))
}

/// The deadline of a call: the client's (`grpc-timeout`), at most `cap`. A client deadline past
/// [`mulo_core::limits::MAX_DEADLINE_SECONDS`], or one that does not parse, is refused.
pub fn deadline_in(
    meta: &tonic::metadata::MetadataMap,
    cap: std::time::Duration,
) -> Result<std::time::Duration, Status> {
    let Some(v) = meta.get("grpc-timeout") else {
        return Ok(cap);
    };
    let bad = || {
        invalid(
            "deadline",
            "grpc-timeout must be 1 to 8 digits and a unit of HMSmun",
        )
    };
    let v = v.to_str().map_err(|_| bad())?;
    let (digits, unit) = v.split_at(v.len().saturating_sub(1));
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: f64 = digits.parse().map_err(|_| bad())?;
    let seconds = n * match unit {
        "H" => 3600.0,
        "M" => 60.0,
        "S" => 1.0,
        "m" => 1e-3,
        "u" => 1e-6,
        "n" => 1e-9,
        _ => return Err(bad()),
    };
    let max = mulo_core::limits::MAX_DEADLINE_SECONDS;
    if seconds > max {
        return Err(invalid(
            "deadline",
            format!("must be at most {max} s, got {seconds} s"),
        ));
    }
    Ok(std::time::Duration::from_secs_f64(seconds).min(cap))
}

/// A required message field.
pub fn required<T>(field: &str, v: Option<T>) -> Result<T, Status> {
    v.ok_or_else(|| invalid(field, "missing"))
}

/// Token ids from the wire (any `u32` fits; the role checks them against its codebook).
pub fn tokens_in(v: &[u32]) -> Vec<i64> {
    v.iter().map(|&t| i64::from(t)).collect()
}

/// Token ids to the wire (ids are never negative; a negative one would be an engine bug and is
/// refused rather than wrapped).
pub fn tokens_out(v: &[i64]) -> Result<Vec<u32>, Status> {
    v.iter()
        .map(|&t| u32::try_from(t).map_err(|_| Status::internal(format!("token id {t}"))))
        .collect()
}

/// A condition from the wire.
pub fn condition_in(field: &str, c: Option<pb::Condition>) -> Result<Condition, Status> {
    use pb::condition::Kind;
    let c = required(field, c)?;
    let cond = match required(field, c.kind)? {
        Kind::ClassId(id) => Condition::Class(id),
        Kind::Prompt(p) => Condition::Prompt(p),
        Kind::CaptionFeatures(f) => Condition::CaptionFeatures {
            features: f.features,
            len: f.len as usize,
            dim: f.dim as usize,
            mask: if f.mask.is_empty() {
                None
            } else {
                Some(f.mask)
            },
        },
    };
    cond.validate().map_err(|e| invalid(field, e))?;
    Ok(cond)
}

/// A condition to the wire (caption token ids are a model-side form and never travel).
pub fn condition_out(c: &Condition) -> Result<pb::Condition, Status> {
    use pb::condition::Kind;
    let kind = match c {
        Condition::Class(id) => Kind::ClassId(*id),
        Condition::Prompt(p) => Kind::Prompt(p.clone()),
        Condition::CaptionFeatures {
            features,
            len,
            dim,
            mask,
        } => Kind::CaptionFeatures(pb::CaptionFeatures {
            features: features.clone(),
            len: *len as u32,
            dim: *dim as u32,
            mask: mask.clone().unwrap_or_default(),
        }),
        Condition::CaptionTokens { .. } => {
            return Err(Status::internal(
                "caption token ids are not sent between services",
            ))
        }
    };
    Ok(pb::Condition { kind: Some(kind) })
}

/// Sampling from the wire, absent fields taken from `defaults`, validated.
pub fn sampling_in(
    field: &str,
    s: Option<pb::Sampling>,
    defaults: SamplingParams,
) -> Result<SamplingParams, Status> {
    let s = s.unwrap_or_default();
    let p = SamplingParams {
        cfg_scale: s.cfg_scale.unwrap_or(defaults.cfg_scale),
        temperature: s.temperature.unwrap_or(defaults.temperature),
        top_k: s.top_k.map_or(defaults.top_k, |k| k as usize),
        top_p: s.top_p.unwrap_or(defaults.top_p),
    };
    p.validate().map_err(|e| invalid(field, e))?;
    Ok(p)
}

/// Fully resolved sampling to the wire.
pub fn sampling_out(p: &SamplingParams) -> pb::Sampling {
    pb::Sampling {
        cfg_scale: Some(p.cfg_scale),
        temperature: Some(p.temperature),
        top_k: Some(p.top_k as u32),
        top_p: Some(p.top_p),
    }
}

/// A session spec from the wire (its sampling must be fully resolved by the caller).
pub fn spec_in(s: Option<pb::SessionSpec>) -> Result<SessionSpec, Status> {
    let s = required("spec", s)?;
    session_id_in("spec.session_id", &s.session_id)?;
    let sampling = s.sampling.unwrap_or_default();
    let (Some(cfg_scale), Some(temperature), Some(top_k), Some(top_p)) = (
        sampling.cfg_scale,
        sampling.temperature,
        sampling.top_k,
        sampling.top_p,
    ) else {
        return Err(invalid(
            "spec.sampling",
            "every field must be set (the gateway resolves the model's defaults)",
        ));
    };
    let sampling = SamplingParams {
        cfg_scale,
        temperature,
        top_k: top_k as usize,
        top_p,
    };
    sampling
        .validate()
        .map_err(|e| invalid("spec.sampling", e))?;
    Ok(SessionSpec {
        id: s.session_id,
        epoch: s.epoch,
        condition: condition_in("spec.condition", s.condition)?,
        sampling,
        seed: s.seed,
    })
}

/// A session id from the wire: 1 to 256 bytes.
pub fn session_id_in(field: &str, id: &str) -> Result<(), Status> {
    if id.is_empty() || id.len() > 256 {
        return Err(invalid(field, "1 to 256 characters"));
    }
    Ok(())
}

/// A session spec to the wire.
pub fn spec_out(s: &SessionSpec) -> Result<pb::SessionSpec, Status> {
    Ok(pb::SessionSpec {
        session_id: s.id.clone(),
        epoch: s.epoch,
        condition: Some(condition_out(&s.condition)?),
        sampling: Some(sampling_out(&s.sampling)),
        seed: s.seed,
    })
}

/// A session reference from the wire.
pub fn ref_in(r: Option<pb::SessionRef>) -> Result<SessionRef, Status> {
    let r = required("session", r)?;
    session_id_in("session.session_id", &r.session_id)?;
    Ok(SessionRef {
        id: r.session_id,
        epoch: r.epoch,
        committed: r.committed_len as usize,
    })
}

/// A session reference to the wire.
pub fn ref_out(r: &SessionRef) -> pb::SessionRef {
    pb::SessionRef {
        session_id: r.id.clone(),
        epoch: r.epoch,
        committed_len: r.committed as u32,
    }
}

/// A generation's stats to the wire.
pub fn stats_out(s: MethodStats, migrations: u32, wire_bytes: u64) -> pb::GenerateStats {
    pb::GenerateStats {
        method: s.method,
        tokens: s.tokens as u32,
        target_passes: s.target_passes as u32,
        drafter_passes: s.drafter_passes as u32,
        proposed: s.proposed as u32,
        accepted: s.accepted as u32,
        resampled: s.resampled as u32,
        cycles: s.cycles as u32,
        largest_island: s.largest_island as u32,
        fallback: s.fallback.unwrap_or_default(),
        migrations,
        seconds: s.seconds,
        stages: s.stages.into_iter().collect(),
        wire_bytes,
    }
}

/// A generation's stats from the wire.
pub fn stats_in(s: pb::GenerateStats) -> MethodStats {
    MethodStats {
        method: s.method,
        tokens: s.tokens as usize,
        target_passes: s.target_passes as usize,
        drafter_passes: s.drafter_passes as usize,
        proposed: s.proposed as usize,
        accepted: s.accepted as usize,
        resampled: s.resampled as usize,
        cycles: s.cycles as usize,
        largest_island: s.largest_island as usize,
        fallback: (!s.fallback.is_empty()).then_some(s.fallback),
        seconds: s.seconds,
        stages: s.stages.into_iter().collect(),
    }
}

/// Bits of a mask, LSB first within each byte.
pub fn pack_bits(bits: &[bool]) -> Vec<u8> {
    let mut out = vec![0u8; bits.len().div_ceil(8)];
    for (i, &b) in bits.iter().enumerate() {
        if b {
            out[i / 8] |= 1 << (i % 8);
        }
    }
    out
}

/// The first `n` bits of a packed mask.
pub fn unpack_bits(bytes: &[u8], n: usize) -> Vec<bool> {
    (0..n)
        .map(|i| bytes.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_are_parsed_capped_and_bounded() {
        let cap = std::time::Duration::from_secs(600);
        let meta = |v: &str| {
            let mut m = tonic::metadata::MetadataMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            m
        };
        assert_eq!(deadline_in(&Default::default(), cap).unwrap(), cap);
        assert_eq!(
            deadline_in(&meta("1500m"), cap).unwrap(),
            std::time::Duration::from_millis(1500)
        );
        assert_eq!(deadline_in(&meta("20M"), cap).unwrap(), cap);
        let e = deadline_in(&meta("2H"), cap).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("at most 3600"), "{e}");
        for bad in ["", "S", "12", "123456789S", "1.5S", "5x"] {
            assert!(deadline_in(&meta(bad), cap).is_err(), "{bad}");
        }
    }

    #[test]
    fn bits_round_trip() {
        let bits = [
            true, false, false, true, true, false, true, false, true, true,
        ];
        let packed = pack_bits(&bits);
        assert_eq!(packed, vec![0b0101_1001, 0b0000_0011]);
        assert_eq!(unpack_bits(&packed, bits.len()), bits);
    }

    #[test]
    fn engine_errors_map_to_the_documented_codes() {
        let cases = [
            (
                EngineError::Param(ParamError::new("tau", "must be in [0, 1]")),
                Code::InvalidArgument,
            ),
            (
                EngineError::Precondition("epoch".into()),
                Code::FailedPrecondition,
            ),
            (
                EngineError::Capacity("full".into()),
                Code::ResourceExhausted,
            ),
            (EngineError::UnknownSession("x".into()), Code::NotFound),
        ];
        for (e, code) in cases {
            let s = status(&e);
            assert_eq!(s.code(), code, "{e}");
            // And back: the client sees the same kind of error.
            let back = engine_error("peer", &s);
            assert_eq!(status(&back).code(), code);
        }
    }

    #[test]
    fn specs_and_refs_round_trip() {
        let spec = SessionSpec {
            id: "r1".into(),
            epoch: 2,
            condition: Condition::Prompt("red apple".into()),
            sampling: SamplingParams {
                cfg_scale: 5.0,
                temperature: 0.9,
                top_k: 10,
                top_p: 0.95,
            },
            seed: 7,
        };
        assert_eq!(spec_in(Some(spec_out(&spec).unwrap())).unwrap(), spec);
        let r = SessionRef {
            id: "r1".into(),
            epoch: 2,
            committed: 64,
        };
        assert_eq!(ref_in(Some(ref_out(&r))).unwrap(), r);
    }

    #[test]
    fn bad_fields_are_named() {
        let e = spec_in(None).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("spec"), "{e}");
        let e = condition_in(
            "condition",
            Some(pb::Condition {
                kind: Some(pb::condition::Kind::Prompt("  ".into())),
            }),
        )
        .unwrap_err();
        assert!(e.message().starts_with("condition"), "{e}");
        let e = sampling_in(
            "sampling",
            Some(pb::Sampling {
                top_p: Some(1.5),
                ..Default::default()
            }),
            SamplingParams::default(),
        )
        .unwrap_err();
        assert!(e.message().contains("top_p"), "{e}");
    }
}
