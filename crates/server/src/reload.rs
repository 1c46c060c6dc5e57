//! Values read from files and read again when the files change on disk (bearer tokens,
//! certificates and keys): a rotation is picked up without a restart. A Kubernetes Secret mounted as
//! a volume swaps its files atomically (a `..data` symlink), so a change is one consistent state.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};

/// How often the files are looked at, at most.
pub const CHECK_EVERY: Duration = Duration::from_millis(500);

/// What identifies the files' contents: each file's path, size and modification time.
type Signature = Vec<(PathBuf, u64, Option<SystemTime>)>;

/// The files under `path`: itself, or a directory's visible regular files (not `.`-prefixed, as
/// Kubernetes' `..data`), sorted by name.
pub fn files(path: &Path) -> Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))? {
        let p = e?.path();
        let hidden = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_none_or(|n| n.starts_with('.'));
        if !hidden && p.is_file() {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

fn signature(paths: &[PathBuf]) -> Signature {
    let mut sig = Vec::new();
    for p in paths {
        for f in files(p).unwrap_or_default() {
            let m = std::fs::metadata(&f).ok();
            let (len, modified) = m.map_or((0, None), |m| (m.len(), m.modified().ok()));
            sig.push((f, len, modified));
        }
    }
    sig
}

/// The loader of a [`Reloading`] value: reads it from the watched paths; its argument is true
/// for the first load (at start-up) and false for a reload.
pub type Loader<T> = Box<dyn Fn(bool) -> Result<T> + Send + Sync>;

struct State<T> {
    value: Arc<T>,
    signature: Signature,
    checked: Instant,
}

/// A value loaded from `paths` by `load`, loaded again on the first [`Reloading::get`] after one
/// of the files changed. A reload that fails keeps the previous value (and logs why).
pub struct Reloading<T> {
    what: String,
    paths: Vec<PathBuf>,
    load: Loader<T>,
    state: Mutex<State<T>>,
}

impl<T> std::fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading")
            .field("what", &self.what)
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

impl<T> Reloading<T> {
    /// Loads `what` now (an error is returned: a service does not start with a bad file).
    pub fn new(what: &str, paths: Vec<PathBuf>, load: Loader<T>) -> Result<Self> {
        let signature = signature(&paths);
        let value = Arc::new(load(true).with_context(|| what.to_string())?);
        Ok(Self {
            what: what.to_string(),
            paths,
            load,
            state: Mutex::new(State {
                value,
                signature,
                checked: Instant::now(),
            }),
        })
    }

    /// The value now: re-read when the files changed since the last look (at most every
    /// [`CHECK_EVERY`]).
    pub fn get(&self) -> Arc<T> {
        let Ok(mut s) = self.state.lock() else {
            // A panic while holding the lock: keep serving what was loaded.
            return self.get_poisoned();
        };
        if s.checked.elapsed() >= CHECK_EVERY {
            s.checked = Instant::now();
            let now = signature(&self.paths);
            if now != s.signature {
                match (self.load)(false) {
                    Ok(v) => {
                        tracing::info!(what = %self.what, "reloaded after a change on disk");
                        s.value = Arc::new(v);
                        s.signature = now;
                    }
                    Err(e) => {
                        // Not retried until the files change again (a half-written rotation
                        // changes them once more when it completes).
                        s.signature = now;
                        tracing::error!(what = %self.what, error = %format!("{e:#}"), "reload failed: keeping the previous one");
                    }
                }
            }
        }
        s.value.clone()
    }

    fn get_poisoned(&self) -> Arc<T> {
        match self.state.lock() {
            Ok(s) => s.value.clone(),
            Err(p) => p.into_inner().value.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_on_disk_is_picked_up_and_a_bad_one_keeps_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("v");
        std::fs::write(&f, "1").unwrap();
        let path = f.clone();
        let r = Reloading::new(
            "value",
            vec![f.clone()],
            Box::new(move |_| -> Result<u32> {
                Ok(std::fs::read_to_string(&path)?.trim().parse()?)
            }),
        )
        .unwrap();
        assert_eq!(*r.get(), 1);
        std::fs::write(&f, "22").unwrap();
        std::thread::sleep(CHECK_EVERY);
        assert_eq!(*r.get(), 22);
        std::fs::write(&f, "not a number").unwrap();
        std::thread::sleep(CHECK_EVERY);
        assert_eq!(*r.get(), 22, "a bad file keeps the last good value");
    }

    #[test]
    fn directories_list_visible_files_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b"), "x").unwrap();
        std::fs::write(dir.path().join("a"), "x").unwrap();
        std::fs::write(dir.path().join("..data"), "x").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let names: Vec<_> = files(dir.path())
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(names, ["a", "b"]);
    }
}
