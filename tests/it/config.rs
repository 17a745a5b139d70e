//! Config loading: valid configs map to the exact `Desired`, the examples validate, malformed configs give
//! located messages (snapshots of the plain rendering), secrets never leak, and the committed schema is fresh.

use std::path::{Path, PathBuf};

use ciscale::config::{self, ConfigError};

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Fake values for every variable the examples reference.
fn example_env(name: &str) -> Option<String> {
    Some(format!("test-{}", name.to_lowercase()))
}

#[test]
fn every_example_validates() {
    let mut count = 0;
    let mut entries: Vec<PathBuf> = std::fs::read_dir(repo_path("examples"))
        .expect("examples folder")
        .map(|entry| entry.expect("dir entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml" || ext == "yml"))
        .collect();
    entries.sort();
    for path in entries {
        let text = std::fs::read_to_string(&path).expect("read example");
        let name = format!("examples/{}", path.file_name().unwrap().to_string_lossy());
        match config::load_str(&name, &text, &example_env) {
            Ok(desired) => assert!(!desired.pools.is_empty(), "{name} has no pools"),
            Err(ConfigError::Invalid(diagnostics)) => panic!("{name} is invalid:\n{}", diagnostics.render_plain()),
            Err(other) => panic!("{name}: {other}"),
        }
        count += 1;
    }
    assert!(count >= 4, "expected at least 4 examples, found {count}");
}
