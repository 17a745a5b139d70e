//! One actor per owner id on a host: `apply` and `watch` hold an exclusive lock on `<lock dir>/<owner>.lock`, so a
//! cron `apply` and the daemon never act at the same time (they would plan the same creates twice).
//!
//! The lock is the operating system's (`flock`): it goes away with the process, so a crashed or killed holder never
//! leaves a stale lock behind. The file holds the holder's pid and start time, for the message the loser prints.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where lock files live: `CISCALE_LOCK_DIR`, else `$XDG_RUNTIME_DIR/ciscale`, else the temp dir's `ciscale`.
/// Everything that must exclude each other (the daemon and cron) has to agree on it; the systemd unit sets it.
pub fn lock_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CISCALE_LOCK_DIR").filter(|dir| !dir.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR").filter(|dir| !dir.is_empty()) {
        return PathBuf::from(runtime).join("ciscale");
    }
    std::env::temp_dir().join("ciscale")
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another ciscale is acting for owner `{owner}`{holder}")]
    Held { owner: String, holder: String },
    #[error("could not use the lock file `{path}`")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An exclusive lock for one owner id, released on drop.
#[derive(Debug)]
pub struct OwnerLock {
    file: File,
    path: PathBuf,
}

impl OwnerLock {
    /// Takes the lock, waiting up to `timeout` for a holder to finish (polling: `flock` cannot wait with a timeout).
    pub fn acquire(dir: &Path, owner: &str, timeout: Duration) -> Result<Self, LockError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| LockError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(format!("{owner}.lock"));
        let mut file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io(&path))?;
        let deadline = Instant::now() + timeout;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100).min(timeout));
                }
                Err(TryLockError::WouldBlock) => {
                    let mut holder = String::new();
                    drop(file.read_to_string(&mut holder));
                    let holder = holder.trim();
                    let holder = if holder.is_empty() { String::new() } else { format!(" ({holder})") };
                    return Err(LockError::Held { owner: owner.to_owned(), holder });
                }
                Err(TryLockError::Error(source)) => return Err(LockError::Io { path, source }),
            }
        }
        let stamp = format!("pid {}, since {}", std::process::id(), jiff::Timestamp::now().round(jiff::Unit::Second).unwrap_or_default());
        let written = file.set_len(0).and_then(|()| file.rewind()).and_then(|()| file.write_all(stamp.as_bytes()));
        written.map_err(io(&path))?;
        Ok(Self { file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for OwnerLock {
    fn drop(&mut self) {
        // Closing the file releases the lock anyway; unlocking first makes the release immediate and explicit.
        drop(self.file.unlock());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = OwnerLock::acquire(dir.path(), "acme", Duration::ZERO).expect("free lock");
        let refused = OwnerLock::acquire(dir.path(), "acme", Duration::from_millis(250)).expect_err("held");
        let text = refused.to_string();
        assert!(text.contains("owner `acme`") && text.contains(&format!("pid {}", std::process::id())), "{text}");

        // Other owners are independent.
        OwnerLock::acquire(dir.path(), "other", Duration::ZERO).expect("another owner's lock is free");

        drop(first);
        OwnerLock::acquire(dir.path(), "acme", Duration::ZERO).expect("released on drop");
    }
}
