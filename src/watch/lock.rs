//! One actor per owner id on a host: `apply` and `watch` hold an exclusive lock on `<lock dir>/<owner>.lock`, so a
//! cron `apply` and the daemon never act at the same time (they would plan the same creates twice).
//!
//! The lock is the operating system's (`flock`): it goes away with the process, so a crashed or killed holder never
//! leaves a stale lock behind. The file holds the holder's pid and start time, for the message the loser prints.
//!
//! # Safety against planted files
//! The default directory may be under `/tmp`, where anyone can create names, and the lock is often taken by root
//! (a cron job). So nothing here can be turned against another file:
//! - the directory is created private (0700); an existing one must be a real directory (not a symlink), not
//!   writable by everyone, and owned by the current user or root (root itself may use another user's directory,
//!   such as the daemon's `/run/ciscale`: the file checks below protect it there);
//! - the file is opened with `O_NOFOLLOW` (a symlink is refused, never followed), created 0644 (less with the
//!   umask), never truncated on open, and must be a regular file with a single link (a hard link to `/etc/shadow`
//!   is refused);
//! - the stamp is written over the start of the file, padded to a fixed width, so the file is never truncated.

use std::fs::{File, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
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
    /// The directory or the file is not what a lock may be taken in: someone else could have planted it.
    #[error("refusing the lock {what} `{path}`: {why}")]
    Unsafe { what: &'static str, path: PathBuf, why: String },
}

impl LockError {
    /// What to do about it, when something can be said.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            LockError::Unsafe { .. } => Some(
                "remove it if you did not make it, or point `CISCALE_LOCK_DIR` at a directory of your own (the \
                 daemon and cron must use the same one)",
            ),
            _ => None,
        }
    }
}

/// `O_NOFOLLOW | O_CLOEXEC`: a symlink in place of the lock file is an error (`ELOOP`), never followed.
const NOFOLLOW_CLOEXEC: i32 = (rustix::fs::OFlags::NOFOLLOW.bits() | rustix::fs::OFlags::CLOEXEC.bits()) as i32;

/// Width the stamp is padded to, so a shorter stamp fully covers a longer earlier one without truncating.
const STAMP_WIDTH: usize = 80;

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
        private_dir(dir)?;
        let path = dir.join(format!("{owner}.lock"));
        let open = |write: bool| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(write)
                .create(write)
                .truncate(false)
                // Readable by all: it holds a pid and a time, and a daemon must be able to lock a file a root cron
                // job created (and the reverse).
                .mode(0o644)
                .custom_flags(NOFOLLOW_CLOEXEC)
                .open(&path)
        };
        // A file another user made (root's cron, the daemon's user) may be read-only for us: `flock` works on a
        // read-only descriptor, only the stamp is not written then.
        let mut writable = true;
        let opened = match open(true) {
            Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => {
                writable = false;
                open(false)
            }
            other => other,
        };
        let mut file = opened.map_err(|source| match source.raw_os_error() {
            // ELOOP: the name is a symlink.
            Some(code) if code == rustix::io::Errno::LOOP.raw_os_error() => {
                LockError::Unsafe { what: "file", path: path.clone(), why: "it is a symbolic link".to_owned() }
            }
            _ => io(&path)(source),
        })?;
        let metadata = file.metadata().map_err(io(&path))?;
        if !metadata.file_type().is_file() {
            return Err(LockError::Unsafe { what: "file", path, why: "it is not a regular file".to_owned() });
        }
        if metadata.nlink() != 1 {
            return Err(LockError::Unsafe {
                what: "file",
                path,
                why: format!("it has {} hard links (a lock file has one)", metadata.nlink()),
            });
        }
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
        let stamp = format!(
            "pid {}, since {}",
            std::process::id(),
            jiff::Timestamp::now().round(jiff::Unit::Second).unwrap_or_default()
        );
        if writable {
            let padded = format!("{stamp:<STAMP_WIDTH$}\n");
            let written = file.seek(SeekFrom::Start(0)).and_then(|_| file.write_all(padded.as_bytes()));
            written.map_err(io(&path))?;
        }
        Ok(Self { file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Creates `dir` private (0700) or checks that an existing one is safe to take a lock in (see the module docs).
fn private_dir(dir: &Path) -> Result<(), LockError> {
    let unsafe_dir = |why: String| LockError::Unsafe { what: "directory", path: dir.to_owned(), why };
    if let Some(parent) = dir.parent().filter(|parent| !parent.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| LockError::Io { path: parent.to_owned(), source })?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => return Err(LockError::Io { path: dir.to_owned(), source }),
    }
    let metadata = std::fs::symlink_metadata(dir).map_err(|source| LockError::Io { path: dir.to_owned(), source })?;
    if metadata.file_type().is_symlink() {
        return Err(unsafe_dir("it is a symbolic link".to_owned()));
    }
    if !metadata.is_dir() {
        return Err(unsafe_dir("it is not a directory".to_owned()));
    }
    if metadata.permissions().mode() & 0o002 != 0 {
        return Err(unsafe_dir(format!(
            "it is writable by everyone (mode {:o})",
            metadata.permissions().mode() & 0o7777
        )));
    }
    let me = rustix::process::geteuid().as_raw();
    if metadata.uid() != me && metadata.uid() != 0 && me != 0 {
        return Err(unsafe_dir(format!("it belongs to uid {}, not to you (uid {me}) or root", metadata.uid())));
    }
    Ok(())
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

    #[test]
    fn a_planted_symlink_is_refused_and_its_target_untouched() {
        let dir = tempfile::tempdir().expect("temp dir");
        let locks = dir.path().join("locks");
        std::fs::create_dir(&locks).expect("lock dir");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").expect("victim");
        std::os::unix::fs::symlink(&victim, locks.join("acme.lock")).expect("plant");
        let error = OwnerLock::acquire(&locks, "acme", Duration::ZERO).expect_err("refused");
        assert!(matches!(error, LockError::Unsafe { .. }), "{error:?}");
        assert!(error.to_string().contains("symbolic link"), "{error}");
        assert_eq!(std::fs::read_to_string(&victim).expect("victim"), "precious");
    }

    #[test]
    fn a_planted_hard_link_is_refused_and_its_target_untouched() {
        let dir = tempfile::tempdir().expect("temp dir");
        let locks = dir.path().join("locks");
        std::fs::create_dir(&locks).expect("lock dir");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").expect("victim");
        std::fs::hard_link(&victim, locks.join("acme.lock")).expect("plant");
        let error = OwnerLock::acquire(&locks, "acme", Duration::ZERO).expect_err("refused");
        assert!(error.to_string().contains("hard links"), "{error}");
        assert_eq!(std::fs::read_to_string(&victim).expect("victim"), "precious");
    }

    #[test]
    fn unsafe_directories_are_refused_and_new_ones_are_private() {
        let dir = tempfile::tempdir().expect("temp dir");
        let fresh = dir.path().join("fresh");
        drop(OwnerLock::acquire(&fresh, "acme", Duration::ZERO).expect("lock"));
        let mode = std::fs::metadata(&fresh).expect("dir").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{mode:o}");
        let file_mode = std::fs::metadata(fresh.join("acme.lock")).expect("file").permissions().mode() & 0o022;
        assert_eq!(file_mode, 0, "nobody else may write it: {file_mode:o}");

        let open = dir.path().join("open");
        std::fs::create_dir(&open).expect("dir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let error = OwnerLock::acquire(&open, "acme", Duration::ZERO).expect_err("world-writable");
        assert!(error.to_string().contains("writable by everyone"), "{error}");

        let linked = dir.path().join("linked");
        std::os::unix::fs::symlink(&fresh, &linked).expect("symlink");
        let error = OwnerLock::acquire(&linked, "acme", Duration::ZERO).expect_err("symlinked dir");
        assert!(error.to_string().contains("symbolic link"), "{error}");
    }

    #[test]
    fn a_longer_earlier_stamp_is_covered_without_truncating() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
        std::fs::write(dir.path().join("acme.lock"), "x".repeat(STAMP_WIDTH + 1)).expect("old stamp");
        drop(OwnerLock::acquire(dir.path(), "acme", Duration::ZERO).expect("lock"));
        let text = std::fs::read_to_string(dir.path().join("acme.lock")).expect("read");
        assert!(text.starts_with(&format!("pid {}", std::process::id())), "{text}");
        // The padded stamp and its newline cover every byte of the old one.
        assert!(!text.contains('x'), "{text:?}");
        assert_eq!(text.len(), STAMP_WIDTH + 1);
    }
}
