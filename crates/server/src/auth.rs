//! Bearer tokens at the gateway (docs/security.md): `authorization: Bearer <token>` metadata
//! checked in constant time against named tokens from a file or a Kubernetes Secret (re-read when
//! it changes, so tokens rotate without a restart), and per token a rate limit (token bucket) and
//! a cap on requests in flight. A token's name appears in logs and metrics; the token never does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use crate::reload::Reloading;

/// Tokens shorter than this are refused when the file is read.
pub const MIN_TOKEN_LEN: usize = 16;
use mulo_core::metrics::TOKEN_REQUESTS;

/// Named tokens, stored as digests (so that comparing takes the same time for any length).
#[derive(Debug, Default)]
pub struct TokenSet {
    tokens: Vec<(String, [u8; 32])>,
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !ok {
        // The value is not echoed: a line written token:name would print the token.
        bail!("a token name must be 1 to 64 characters of [A-Za-z0-9._-]");
    }
    Ok(())
}

impl TokenSet {
    /// Parses `name:token` lines (blank lines and `#` comments skipped); every bad line is an
    /// error naming its number (never its content).
    pub fn parse(text: &str) -> Result<Self> {
        let (set, errors) = Self::parse_lenient(text);
        match errors.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(set),
        }
    }

    /// [`TokenSet::parse`] keeping the good lines: the set and the errors of the bad ones.
    fn parse_lenient(text: &str) -> (Self, Vec<anyhow::Error>) {
        let mut set = Self::default();
        let mut errors = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let r = match line.split_once(':') {
                Some((name, token)) => set.add(name.trim(), token.trim()),
                None => Err(anyhow::anyhow!("expected name:token")),
            };
            if let Err(e) = r {
                errors.push(e.context(format!("line {}", i + 1)));
            }
        }
        (set, errors)
    }

    /// Reads a `name:token` file, or a directory with one file per token (its name the token's
    /// name, its content the token: a Kubernetes Secret mounted as a volume). `strict` (start-up):
    /// any bad entry, or none at all, is an error. Otherwise (a reload) it fails closed: bad
    /// entries are logged and left out, and an unreadable path gives an empty set (every caller
    /// refused) — a revoked token never stays valid because the new file has a mistake.
    pub fn load(path: &Path, strict: bool) -> Result<Self> {
        let (set, errors) = match Self::read(path) {
            Ok(x) => x,
            Err(e) if !strict => (Self::default(), vec![e]),
            Err(e) => return Err(e),
        };
        for e in &errors {
            if strict {
                bail!("{}: {e:#}", path.display());
            }
            tracing::error!(path = %path.display(), error = %format!("{e:#}"), "bearer token left out");
        }
        if strict && set.tokens.is_empty() {
            bail!("{} holds no token", path.display());
        }
        Ok(set)
    }

    fn read(path: &Path) -> Result<(Self, Vec<anyhow::Error>)> {
        if !path.is_dir() {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            return Ok(Self::parse_lenient(&text));
        }
        let mut set = Self::default();
        let mut errors = Vec::new();
        for f in crate::reload::files(path)? {
            let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let r = std::fs::read_to_string(&f)
                .with_context(|| format!("reading {}", f.display()))
                .and_then(|token| set.add(name, token.trim()));
            if let Err(e) = r {
                errors.push(e.context(format!("{}", f.display())));
            }
        }
        Ok((set, errors))
    }

    fn add(&mut self, name: &str, token: &str) -> Result<()> {
        check_name(name)?;
        if token.len() < MIN_TOKEN_LEN {
            bail!("a token is shorter than {MIN_TOKEN_LEN} characters");
        }
        if self.tokens.iter().any(|(n, _)| n == name) {
            bail!("a token name appears twice");
        }
        self.tokens
            .push((name.to_string(), digest(token.as_bytes())));
        Ok(())
    }

    /// The name of `token`, comparing with every stored token in constant time.
    pub fn name_of(&self, token: &str) -> Option<&str> {
        let d = digest(token.as_bytes());
        let mut found = None;
        for (name, stored) in &self.tokens {
            if bool::from(stored.ct_eq(&d)) {
                found = Some(name.as_str());
            }
        }
        found
    }
}

/// Per-token limits.
#[derive(Debug, Clone, Copy)]
pub struct TokenLimits {
    /// Requests per second a token may start on average; 0 = no rate limit.
    pub rate: f64,
    /// Requests a token may start at once after being idle (the bucket's size).
    pub burst: f64,
    /// Requests of one token generated at once.
    pub max_in_flight: usize,
}

/// A token bucket: `burst` requests at once, refilled at `rate` per second.
#[derive(Debug, Clone)]
pub struct Bucket {
    level: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket at `now`.
    pub fn full(burst: f64, now: Instant) -> Self {
        Self {
            level: burst,
            at: now,
        }
    }

    /// Takes one request at `now`, or says how long until one may be taken.
    pub fn take(&mut self, limits: &TokenLimits, now: Instant) -> Result<(), Duration> {
        if limits.rate <= 0.0 {
            return Ok(());
        }
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + dt * limits.rate).min(limits.burst);
        self.at = now;
        if self.level >= 1.0 {
            self.level -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - self.level) / limits.rate;
            Err(Duration::try_from_secs_f64(wait).unwrap_or(Duration::MAX))
        }
    }
}

#[derive(Debug)]
struct PerToken {
    bucket: Bucket,
    in_flight: Arc<Semaphore>,
}

/// What an admitted caller holds for its request: its token's name and in-flight slot.
#[derive(Debug)]
pub struct Caller {
    /// The token's name (logs and metrics).
    pub name: String,
    _slot: Option<OwnedSemaphorePermit>,
}

/// The gateway's authentication and per-token limits.
#[derive(Debug)]
pub struct Auth {
    tokens: Reloading<TokenSet>,
    limits: TokenLimits,
    callers: Mutex<HashMap<String, PerToken>>,
}

fn count(name: &str, outcome: &'static str) {
    metrics::counter!(TOKEN_REQUESTS, "token" => name.to_string(), "outcome" => outcome)
        .increment(1);
}

/// The bearer token of a call's metadata.
fn bearer(meta: &MetadataMap) -> Option<&str> {
    let v = meta.get("authorization")?.to_str().ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

impl Auth {
    /// Tokens from `path` (file or directory, re-read when it changes) with per-token `limits`.
    pub fn new(path: PathBuf, limits: TokenLimits) -> Result<Self> {
        let p = path.clone();
        let tokens = Reloading::new(
            &format!("bearer tokens {}", path.display()),
            vec![path],
            Box::new(move |first| TokenSet::load(&p, first)),
        )?;
        Ok(Self {
            tokens,
            limits,
            callers: Mutex::new(HashMap::new()),
        })
    }

    /// The name of the call's token, or UNAUTHENTICATED.
    pub fn authenticate(&self, meta: &MetadataMap) -> Result<String, Status> {
        let Some(token) = bearer(meta) else {
            count("-", "unauthenticated");
            return Err(Status::unauthenticated(
                "missing credentials: send metadata 'authorization: Bearer <token>'",
            ));
        };
        match self.tokens.get().name_of(token) {
            Some(name) => Ok(name.to_string()),
            None => {
                count("-", "unauthenticated");
                Err(Status::unauthenticated("invalid bearer token"))
            }
        }
    }

    /// Authenticates a call and takes one request of its token's rate (RESOURCE_EXHAUSTED with
    /// a retry hint past it) and, for `generate`, one in-flight slot.
    pub fn admit(&self, meta: &MetadataMap, generate: bool) -> Result<Caller, Status> {
        let name = self.authenticate(meta)?;
        let mut callers = self
            .callers
            .lock()
            .map_err(|_| Status::internal("token state poisoned"))?;
        let now = Instant::now();
        let per = callers.entry(name.clone()).or_insert_with(|| PerToken {
            bucket: Bucket::full(self.limits.burst, now),
            in_flight: Arc::new(Semaphore::new(self.limits.max_in_flight.max(1))),
        });
        if let Err(wait) = per.bucket.take(&self.limits, now) {
            count(&name, "rate_limited");
            return Err(retry_later(
                format!(
                    "token '{name}' is over its rate of {} requests/s: retry in {:.3} s",
                    self.limits.rate,
                    wait.as_secs_f64()
                ),
                wait,
            ));
        }
        let slot = if generate {
            let Ok(p) = per.in_flight.clone().try_acquire_owned() else {
                count(&name, "in_flight_limited");
                let wait = Duration::from_millis(100);
                return Err(retry_later(
                    format!(
                        "token '{name}' has {} requests in flight, its limit: retry in {:.3} s",
                        self.limits.max_in_flight,
                        wait.as_secs_f64()
                    ),
                    wait,
                ));
            };
            Some(p)
        } else {
            None
        };
        count(&name, "admitted");
        Ok(Caller { name, _slot: slot })
    }
}

/// RESOURCE_EXHAUSTED with a `google.rpc.RetryInfo` detail saying when to try again.
fn retry_later(message: String, wait: Duration) -> Status {
    use tonic_types::{ErrorDetails, StatusExt};
    Status::with_error_details(
        Code::ResourceExhausted,
        message,
        ErrorDetails::with_retry_info(Some(wait)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(auth: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", auth.parse().unwrap());
        m
    }

    #[test]
    fn token_files_and_secret_directories() {
        let set =
            TokenSet::parse("# team tokens\nalpha: aaaaaaaaaaaaaaaa1\n\nbeta:bbbbbbbbbbbbbbbb2\n")
                .unwrap();
        assert_eq!(set.name_of("aaaaaaaaaaaaaaaa1"), Some("alpha"));
        assert_eq!(set.name_of("bbbbbbbbbbbbbbbb2"), Some("beta"));
        assert_eq!(set.name_of("aaaaaaaaaaaaaaaa"), None);
        for bad in [
            "x",
            "a:short",
            "a b:cccccccccccccccccc",
            "a:cccccccccccccccccc\na:dddddddddddddddddd",
        ] {
            assert!(TokenSet::parse(bad).is_err(), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ci"), "cccccccccccccccccc\n").unwrap();
        std::fs::write(dir.path().join("..data"), "ignored").unwrap();
        let set = TokenSet::load(dir.path(), true).unwrap();
        assert_eq!(set.name_of("cccccccccccccccccc"), Some("ci"));
        let empty = tempfile::tempdir().unwrap();
        assert!(TokenSet::load(empty.path(), true).is_err());
        // A line written token:name does not print the token in the error.
        let e = TokenSet::parse("secret-secret-secret-1:team-a").unwrap_err();
        assert!(!format!("{e:#}").contains("secret-secret"), "{e:#}");
    }

    /// A reload fails closed: a new file with a bad line still revokes the tokens it dropped,
    /// and a removed file refuses everyone.
    #[test]
    fn reloads_revoke_tokens_even_when_the_new_file_has_mistakes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tokens");
        std::fs::write(&f, "old:oooooooooooooooo1\n").unwrap();
        let limits = TokenLimits {
            rate: 0.0,
            burst: 1.0,
            max_in_flight: 4,
        };
        let auth = Auth::new(f.clone(), limits).unwrap();
        let old = meta("Bearer oooooooooooooooo1");
        auth.admit(&old, false).unwrap();
        std::fs::write(&f, "new:nnnnnnnnnnnnnnnn1\nbroken line\n").unwrap();
        std::thread::sleep(crate::reload::CHECK_EVERY);
        assert_eq!(
            auth.admit(&old, false).unwrap_err().code(),
            Code::Unauthenticated
        );
        assert_eq!(
            auth.admit(&meta("Bearer nnnnnnnnnnnnnnnn1"), false)
                .unwrap()
                .name,
            "new"
        );
        std::fs::remove_file(&f).unwrap();
        std::thread::sleep(crate::reload::CHECK_EVERY);
        let e = auth
            .admit(&meta("Bearer nnnnnnnnnnnnnnnn1"), false)
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
    }

    #[test]
    fn buckets_allow_bursts_then_the_rate() {
        let limits = TokenLimits {
            rate: 2.0,
            burst: 3.0,
            max_in_flight: 1,
        };
        let t0 = Instant::now();
        let mut b = Bucket::full(limits.burst, t0);
        for _ in 0..3 {
            b.take(&limits, t0).unwrap();
        }
        let wait = b.take(&limits, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-9, "{wait:?}");
        b.take(&limits, t0 + Duration::from_millis(500)).unwrap();
        assert!(b.take(&limits, t0 + Duration::from_millis(600)).is_err());
        // Idle for long: back to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            b.take(&limits, later).unwrap();
        }
        assert!(b.take(&limits, later).is_err());
    }

    #[test]
    fn callers_are_named_limited_and_refused_with_a_hint() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tokens");
        std::fs::write(&f, "team-a:aaaaaaaaaaaaaaaa1\n").unwrap();
        let limits = TokenLimits {
            rate: 1.0,
            burst: 2.0,
            max_in_flight: 1,
        };
        let auth = Auth::new(f, limits).unwrap();
        let e = auth.admit(&MetadataMap::new(), true).unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        let e = auth
            .admit(&meta("Bearer wrong-token-123456"), true)
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        let ok = meta("Bearer aaaaaaaaaaaaaaaa1");
        let first = auth.admit(&ok, true).unwrap();
        assert_eq!(first.name, "team-a");
        // One in flight: a second generate waits for the first to end.
        let e = auth.admit(&ok, true).unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted);
        assert!(e.message().contains("in flight"), "{e}");
        drop(first);
        // The burst of 2 is spent: the third request is over the rate, with a retry hint.
        let e = auth.admit(&ok, false).unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted);
        use tonic_types::StatusExt;
        let hint = e.get_details_retry_info().unwrap().retry_delay.unwrap();
        assert!(
            hint > Duration::from_millis(900) && hint <= Duration::from_secs(1),
            "{hint:?}"
        );
    }
}
