//! The in-memory fake world: one fake backend and one fake CI sharing a state, for tests, demos and offline
//! trials. Like object_store's `InMemory`, clones share the state. With a state file, the world lives in a JSON
//! file every call reloads and every mutation rewrites (atomically, under a lock file), so separate `ciscale`
//! processes and a test driving them see one world. Two `open`s of one path in one process are deliberately
//! separate handles synchronised only through the file (no in-process registry): they behave exactly like two
//! processes, which is what the persistence tests check. The file I/O is blocking and short; fine for a fake.
//!
//! It follows the [`Backend`](crate::providers::Backend) and [`CiSource`](crate::providers::CiSource) contracts
//! exactly (the conformance suite checks it), counts every call per operation, gives deterministic ids
//! (`fake-1`, agents `1`, tasks `t1`), can play the CI and its agents ([`FakeWorld::simulate`]) and fails calls
//! on demand ([`FakeWorld::inject`]).

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fs4::fs_std::FileExt;
use jiff::Timestamp;

use crate::model::{FakeSpec, Price, TaskId};
use crate::providers::{Error, Result};
use crate::simulate::synthetic::{JobTemplate, Profile};

mod backend;
mod ci;
mod fault;
mod state;

pub use backend::FakeBackend;
pub use ci::{FakeCi, CI_CAPABILITIES};
pub use fault::{Fault, FaultKind, Op};
pub use state::{
    labels_match, sha256_hex, ArmedFault, Counters, ExecRecord, FakeAgent, FakeInstance, FakeTask, JournalEntry,
    PushedFile, WorldState, DEFAULT_RUN_FOR_SECS, EPHEMERAL_LABEL, FEED_BACKFILL_SECS,
};

/// Why the fake world's state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot lock fake state file `{path}`")]
    Lock { path: PathBuf, source: std::io::Error },
    #[error("cannot read fake state file `{path}`")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("fake state file `{path}` is not valid fake state\nhint: delete it to start from an empty world")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("cannot write fake state file `{path}`")]
    Write { path: PathBuf, source: std::io::Error },
}

impl From<StoreError> for Error {
    fn from(error: StoreError) -> Self {
        Error::Other { provider: "fake".to_owned(), source: Box::new(error) }
    }
}

/// The fake world. Cheap to clone; clones share the state.
#[derive(Clone)]
pub struct FakeWorld {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<WorldState>,
    state_file: Option<PathBuf>,
    simulate: bool,
    /// Made-up jobs the CI receives as time passes ([`FakeWorld::set_job_feed`]).
    feed: Mutex<Option<JobFeed>>,
}

/// Jobs of a synthetic trace ([`crate::simulate::synthetic`]) that arrive in the fake CI's queue as the world's
/// clock passes their time: a demo world with work of its own. Deterministic: the jobs depend only on the
/// profile, the seed and the time, so a restarted `watch` sees the same jobs at the same moments.
#[derive(Debug, Clone, PartialEq)]
pub struct JobFeed {
    pub profile: Profile,
    pub seed: u64,
    /// One per pool of the CI source: what its jobs ask for.
    pub templates: Vec<JobTemplate>,
}

impl fmt::Debug for FakeWorld {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeWorld")
            .field("state_file", &self.inner.state_file)
            .field("simulate", &self.inner.simulate)
            .finish_non_exhaustive()
    }
}

impl Default for FakeWorld {
    fn default() -> Self {
        Self::new()
    }
}

/// The state, locked: in memory by the mutex, on disk by an exclusive lock on `<state file>.lock` (released when
/// this is dropped), so concurrent calls from threads and processes are serialised.
struct Locked<'world> {
    state: MutexGuard<'world, WorldState>,
    _file_lock: Option<File>,
}

impl FakeWorld {
    /// An empty in-memory world that does not simulate on its own.
    pub fn new() -> Self {
        Self::build(None, false)
    }

    /// The world a config's fake backend or CI names. A state file that does not exist yet is an empty world.
    pub fn open(spec: &FakeSpec) -> Result<Self> {
        let world = Self::build(spec.state_file.clone(), spec.simulate);
        // Surface a corrupt or unreadable file now rather than on the first call.
        drop(world.lock()?);
        Ok(world)
    }

    fn build(state_file: Option<PathBuf>, simulate: bool) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(WorldState::default()),
                state_file,
                simulate,
                feed: Mutex::new(None),
            }),
        }
    }

    pub fn backend(&self) -> FakeBackend {
        FakeBackend::new(self.clone())
    }

    pub fn ci(&self) -> FakeCi {
        FakeCi::new(self.clone())
    }

    /// Whether CI observations play the CI first (see [`FakeSpec::simulate`]).
    pub fn simulates(&self) -> bool {
        self.inner.simulate
    }

    /// Lets jobs of a synthetic trace arrive on their own while the world simulates: each CI observation first
    /// queues the feed's jobs whose time has come since the previous one (the first one those of the last ten
    /// minutes, so a fresh demo has work at once).
    pub fn set_job_feed(&self, feed: JobFeed) {
        *self.inner.feed.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(feed);
    }

    pub(crate) fn job_feed(&self) -> Option<JobFeed> {
        self.inner.feed.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Adds a pending task that runs [`DEFAULT_RUN_FOR_SECS`] once taken.
    pub fn push_task(&self, labels: BTreeMap<String, String>) -> TaskId {
        self.push_task_for(labels, Duration::from_secs(DEFAULT_RUN_FOR_SECS))
    }

    /// Adds a pending task that runs `run_for` once taken.
    pub fn push_task_for(&self, labels: BTreeMap<String, String>, run_for: Duration) -> TaskId {
        self.update(|state| {
            state.counters.tasks += 1;
            let id = TaskId::new(format!("t{}", state.counters.tasks));
            state.tasks.push(FakeTask {
                id: id.clone(),
                labels,
                demands: Vec::new(),
                agent_id: None,
                started_at: None,
                run_for_secs: run_for.as_secs(),
            });
            id
        })
    }

    /// A copy of the whole state, for assertions.
    pub fn snapshot(&self) -> WorldState {
        self.helper(false, |state| state.clone())
    }

    /// Changes the state directly (tests only: to set up what no provider call can, e.g. an agent that went
    /// silent). Persisted like any mutation.
    pub fn update<T>(&self, change: impl FnOnce(&mut WorldState) -> T) -> T {
        self.helper(true, change)
    }

    /// Sets the fake's clock (it stays there until set or advanced again).
    pub fn set_now(&self, now: Timestamp) {
        self.update(|state| state.now = Some(now));
    }

    /// Moves the fake's clock forward (from the real time if it was following the real clock).
    pub fn advance(&self, by: Duration) {
        self.update(|state| {
            let now = state.now();
            let by = jiff::SignedDuration::try_from(by).unwrap_or(jiff::SignedDuration::MAX);
            state.now = Some(now.checked_add(by).unwrap_or(Timestamp::MAX));
        });
    }

    /// Sets the hourly price the backend reports for a machine type.
    pub fn set_price(&self, machine_type: &str, price: Price) {
        self.update(|state| {
            state.prices.insert(machine_type.to_owned(), price);
        });
    }

    /// Whether the backend offers push-file/exec (a container host) or needs the credential in user data.
    pub fn set_exec_capability(&self, exec: bool) {
        self.update(|state| state.exec_capability = exec);
    }

    /// Whether the agents' instances live on another backend (an HTTP fake of a cloud) instead of this world: the
    /// simulation then treats every registered agent as running on a running instance (see
    /// [`WorldState::instances_elsewhere`]).
    pub fn set_instances_elsewhere(&self, elsewhere: bool) {
        self.update(|state| state.instances_elsewhere = elsewhere);
    }

    /// Plays the CI and its agents for one step: agents whose instance (same name) runs check in; running tasks
    /// that ran their time finish (the agent's `last_work` is now; an ephemeral agent's instance powers off);
    /// pending tasks go, in order, to a checked-in, undrained, free agent whose labels match
    /// ([`labels_match`]). Called at the start of every CI observation when the spec says `simulate`.
    pub fn simulate(&self) {
        self.update(WorldState::simulate);
    }

    /// Arms a fault (see [`Fault`]).
    pub fn inject(&self, fault: Fault) {
        self.update(|state| state.faults.push(ArmedFault { fault, seen: 0, fired: 0 }));
    }

    /// Calls of one operation so far (failed ones included).
    pub fn calls(&self, op: Op) -> u64 {
        self.snapshot().calls.get(op.key()).copied().unwrap_or(0)
    }

    /// Holds the caller of the next successful call of `op` for `hold` once that call has taken effect, before
    /// the answer reaches the caller (crash tests kill the calling process there: the world changed, the caller
    /// never heard). One-shot; [`WorldState::held`] says when it fired.
    pub fn hold_after(&self, op: Op, hold: Duration) {
        self.update(|state| {
            state.holds.insert(op.key().to_owned(), u64::try_from(hold.as_millis()).unwrap_or(u64::MAX));
        });
    }

    /// Starts keeping [`WorldState::journal`] (crash tests check their promises against it).
    pub fn keep_journal(&self) {
        self.update(|state| {
            state.journal.get_or_insert_with(Vec::new);
        });
    }

    /// Runs one provider call: counts it, lets an armed fault fail it (before or after it takes effect) or hold
    /// it before it takes effect, and persists whatever it changed. The call is counted when it arrives, so a held
    /// call shows in [`WorldState::calls`] at once. An armed hold ([`Self::hold_after`]) delays the answer of a
    /// successful call.
    pub(crate) async fn call<T>(&self, op: Op, body: impl FnOnce(&mut WorldState) -> Result<T>) -> Result<T> {
        let mut hold = None;
        let result = self.call_held(op, body, &mut hold).await;
        if let Some(hold) = hold {
            tokio::time::sleep(hold).await;
        }
        result
    }

    /// [`Self::call`] up to the answer. A call that goes through at once is counted and takes effect under one
    /// lock, so other processes see both or neither.
    async fn call_held<T>(
        &self,
        op: Op,
        body: impl FnOnce(&mut WorldState) -> Result<T>,
        hold: &mut Option<Duration>,
    ) -> Result<T> {
        let hold_for = {
            let mut locked = self.lock()?;
            let state = &mut *locked.state;
            *state.calls.entry(op.key().to_owned()).or_default() += 1;
            let fault = fault::check(&mut state.faults, op);
            match fault.as_ref().map(FaultKind::when) {
                Some(fault::When::Held(hold_for)) => {
                    // The fault's progress is saved before the wait, so other processes see it.
                    self.save(&locked.state)?;
                    hold_for
                }
                _ => {
                    let result = Self::take_effect(state, op, fault, body, hold);
                    self.save(&locked.state)?;
                    return result;
                }
            }
        };
        // Unlocked while held: the rest of the world goes on.
        tokio::time::sleep(hold_for).await;
        let mut locked = self.lock()?;
        let result = Self::take_effect(&mut locked.state, op, None, body, hold);
        self.save(&locked.state)?;
        result
    }

    fn take_effect<T>(
        state: &mut WorldState,
        op: Op,
        fault: Option<FaultKind>,
        body: impl FnOnce(&mut WorldState) -> Result<T>,
        hold: &mut Option<Duration>,
    ) -> Result<T> {
        let result = match &fault {
            Some(kind) if kind.when() == fault::When::Before => Err(kind.to_error(op)),
            Some(kind) => body(state).and_then(|_| Err(kind.to_error(op))),
            None => body(state),
        };
        if result.is_ok() {
            if let Some(millis) = state.holds.remove(op.key()) {
                state.held.push(op.key().to_owned());
                *hold = Some(Duration::from_millis(millis));
            }
        }
        result
    }

    /// Test helpers have infallible signatures: a state file they cannot use is logged and the in-memory state
    /// used instead, so the test fails on its assertions with the log telling why.
    fn helper<T>(&self, mutates: bool, body: impl FnOnce(&mut WorldState) -> T) -> T {
        let mut locked = match self.lock() {
            Ok(locked) => locked,
            Err(error) => {
                tracing::error!(%error, "fake world: using the in-memory state");
                Locked { state: self.memory(), _file_lock: None }
            }
        };
        let result = body(&mut locked.state);
        if mutates {
            if let Err(error) = self.save(&locked.state) {
                tracing::error!(%error, "fake world: change kept in memory only");
            }
        }
        result
    }

    fn memory(&self) -> MutexGuard<'_, WorldState> {
        // A panic while holding the lock leaves plain data behind: still usable.
        self.inner.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Locks the state and, when file-backed, reloads it from the file: another process may have changed it.
    fn lock(&self) -> Result<Locked<'_>, StoreError> {
        let mut state = self.memory();
        let Some(path) = &self.inner.state_file else {
            return Ok(Locked { state, _file_lock: None });
        };
        let lock_path = sibling(path, ".lock");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| StoreError::Lock { path: lock_path.clone(), source })?;
        lock_file.lock_exclusive().map_err(|source| StoreError::Lock { path: lock_path.clone(), source })?;
        *state = match std::fs::read(path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| StoreError::Parse { path: path.clone(), source })?
            }
            Err(error) if error.kind() == ErrorKind::NotFound => WorldState::default(),
            Err(source) => return Err(StoreError::Read { path: path.clone(), source }),
        };
        Ok(Locked { state, _file_lock: Some(lock_file) })
    }

    /// Writes the state file atomically (temp file + rename): a reader never sees half a world.
    fn save(&self, state: &WorldState) -> Result<(), StoreError> {
        let Some(path) = &self.inner.state_file else {
            return Ok(());
        };
        let write_error = |source| StoreError::Write { path: path.clone(), source };
        let json = serde_json::to_vec_pretty(state).map_err(|error| write_error(std::io::Error::other(error)))?;
        let temp = sibling(path, &format!(".tmp.{}", std::process::id()));
        std::fs::write(&temp, json).map_err(write_error)?;
        std::fs::rename(&temp, path).map_err(write_error)
    }
}

/// `dir/name` + suffix, next to the state file (same file system, so a rename is atomic).
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().map(|name| name.to_os_string()).unwrap_or_else(|| "fake-state".into());
    name.push(suffix);
    path.with_file_name(name)
}
