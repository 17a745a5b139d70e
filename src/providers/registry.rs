//! Turns the config's `ci:` and `backends:` sections into live provider handles.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use super::fake::FakeWorld;
use super::{Backend, CiSource, Error, Providers, Result};
use crate::model::{BackendKind, CiKind, Desired, FakeSpec};

/// Connects to every provider the config names. No network call is made here: the first call is the first
/// observation, so a `plan --observed` never needs this at all.
pub fn connect(desired: &Desired) -> Result<Providers> {
    // A fake backend and a fake CI naming the same state file must share one world, or the fake CI could not see
    // the fake instances its agents run on.
    let mut worlds: BTreeMap<Option<PathBuf>, FakeWorld> = BTreeMap::new();
    let mut world_for = |spec: &FakeSpec| -> Result<FakeWorld> {
        if let Some(world) = worlds.get(&spec.state_file) {
            return Ok(world.clone());
        }
        let world = FakeWorld::open(spec)?;
        worlds.insert(spec.state_file.clone(), world.clone());
        Ok(world)
    };

    let mut providers = Providers::default();
    for (name, spec) in &desired.backends {
        let backend: Arc<dyn Backend> = match &spec.kind {
            BackendKind::Fake(fake) => Arc::new(world_for(fake)?.backend()),
            other => return Err(not_yet(other.name(), "backend")),
        };
        providers.backends.insert(name.clone(), backend);
    }
    for (name, spec) in &desired.ci {
        let source: Arc<dyn CiSource> = match &spec.kind {
            CiKind::Fake(fake) => Arc::new(world_for(fake)?.ci()),
            other => return Err(not_yet(other.name(), "ci source")),
        };
        providers.ci.insert(name.clone(), source);
    }
    Ok(providers)
}

fn not_yet(kind: &str, what: &'static str) -> Error {
    Error::Unsupported { provider: kind.to_owned(), operation: what }
}
