//! The config room: `ciscale.yaml` → [`Desired`].
//!
//! Pipeline: find every duplicate key (`check::duplicate_keys`), parse the YAML with positions (`check::parse`) →
//! walk it against the JSON schema of the raw types, reporting structural problems (`check`) → interpolate
//! `${VAR}` from the environment (`interpolate`) → hash the document with its secrets masked (`config_hash`) →
//! check meaning and build [`Desired`] (`validate`). Every stage reports all its problems, located, into one
//! [`Diagnostics`]; only a YAML syntax error stops early. This module knows nothing of providers: names,
//! numbers and durations are checked here, whether a Hetzner server type exists is not.

mod check;
mod diag;
mod interpolate;
pub mod raw;
mod validate;

use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

pub use diag::{Diagnostics, Location, Problem, Severity, Span};

use std::collections::BTreeMap;

use crate::model::{BackendName, Desired};
use crate::simulate::models::Overrides;

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum ConfigError {
    /// The file could not be read; the message says why (missing, a directory, permission denied, ...).
    #[error("cannot read config `{}`: {}", path.display(), io_reason(source))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    #[diagnostic(transparent)]
    Invalid(Diagnostics),
}

impl ConfigError {
    /// The located problems, when the file was read but is not valid.
    pub fn diagnostics(&self) -> Option<&Diagnostics> {
        match self {
            ConfigError::Invalid(diagnostics) => Some(diagnostics),
            ConfigError::Io { .. } => None,
        }
    }

    /// What to do about an I/O error, when something can be said.
    pub fn hint(&self) -> Option<String> {
        let ConfigError::Io { path, source } = self else {
            return None;
        };
        let shown = path.display();
        match source.kind() {
            std::io::ErrorKind::NotFound => Some(
                "pass the config with `-c FILE` (or set `CISCALE_CONFIG`); `examples/` in the ciscale repository \
                 has configs to start from, and `examples/fake.yaml` runs without any account"
                    .to_owned(),
            ),
            std::io::ErrorKind::IsADirectory => {
                Some(format!("`-c` takes the config file, not its folder: e.g. `-c {shown}/ciscale.yaml`"))
            }
            std::io::ErrorKind::PermissionDenied => Some(format!(
                "the user ciscale runs as cannot read `{shown}`: give it read access (e.g. the file's group, \
                 `chgrp ciscale {shown} && chmod 0640 {shown}`)"
            )),
            _ => None,
        }
    }
}

/// An I/O error's reason in the words of a message (lower-case, without Rust's `(os error N)`).
fn io_reason(error: &std::io::Error) -> String {
    let reason = match error.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_owned(),
        std::io::ErrorKind::IsADirectory => "it is a directory".to_owned(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        std::io::ErrorKind::InvalidData => "it is not UTF-8 text".to_owned(),
        _ => {
            let text = error.to_string();
            let text = text.split(" (os error").next().unwrap_or(&text).to_owned();
            let mut chars = text.chars();
            chars.next().map(|first| first.to_lowercase().chain(chars).collect()).unwrap_or(text)
        }
    };
    reason
}

/// Whether the command that loads the config will use its secrets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Secrets {
    /// `apply`, `watch`, `observe`, `provision`: a secret whose variable is unset or empty is an error.
    #[default]
    Needed,
    /// `validate`, `plan --observed`: the values are never used, so an unset or empty one is only a warning (a
    /// pull-request pipeline can validate and plan without production secrets).
    Unused,
}

/// A valid config and what was worth a warning.
#[derive(Debug)]
pub struct Loaded {
    pub desired: Desired,
    /// Problems that did not make the config unusable for the command; `None` when there are none.
    pub warnings: Option<Diagnostics>,
    /// The backends' `simulation:` settings, by backend name (absent: the kind's defaults); read by
    /// `ciscale simulate` only.
    pub simulation: BTreeMap<BackendName, Overrides>,
}

/// Loads a config file; `${VAR}` references are read from the process environment. Relative paths in the config
/// resolve against the file's folder. Secrets are [`Secrets::Needed`]; warnings are dropped.
pub fn load_file(path: &Path) -> Result<Desired, ConfigError> {
    load_file_with(path, Secrets::Needed).map(|loaded| loaded.desired)
}

/// [`load_file`] for a command that says whether it needs the secrets, with the warnings.
pub fn load_file_with(path: &Path, secrets: Secrets) -> Result<Loaded, ConfigError> {
    let io = |source| ConfigError::Io { path: path.to_owned(), source };
    // `read_to_string` of a folder fails with a platform-dependent error on some systems; ask first.
    if path.is_dir() {
        return Err(io(std::io::Error::from(std::io::ErrorKind::IsADirectory)));
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    load_str_with(&path.display().to_string(), &text, &|name| std::env::var(name).ok(), secrets)
}

/// Loads a config from text. `source_name` names the file in messages and is the base for relative paths (its
/// folder); `env` answers `${VAR}` references. Secrets are [`Secrets::Needed`]; warnings are dropped.
pub fn load_str(source_name: &str, text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Desired, ConfigError> {
    load_str_with(source_name, text, env, Secrets::Needed).map(|loaded| loaded.desired)
}

/// [`load_str`] for `ciscale simulate` and `trace synthetic`: nothing is called, so secrets are
/// [`Secrets::Unused`]; the backends' `simulation:` settings are in [`Loaded::simulation`].
pub fn load_str_with_simulation(
    source_name: &str,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Loaded, ConfigError> {
    load_str_with(source_name, text, env, Secrets::Unused)
}

/// [`load_str`] for a command that says whether it needs the secrets, with the warnings.
pub fn load_str_with(
    source_name: &str,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
    secrets: Secrets,
) -> Result<Loaded, ConfigError> {
    let src = diag::SourceMap::new(text);
    let mut problems = diag::Problems::new(source_name);
    let invalid = |problems: diag::Problems, redacted: String| {
        ConfigError::Invalid(Diagnostics::new(source_name, redacted, problems.list))
    };

    check::duplicate_keys(&src, &mut problems);
    let Some(root) = check::parse(&src, &mut problems) else {
        return Err(invalid(problems, redact_unparsed(text)));
    };
    let schema = schema_value();
    let checked = check::check(&root, &schema, &src, &mut problems);
    let redacted = redact(text, &checked);

    let document = interpolate_document(&checked, &src, env, secrets, &mut problems);
    let config_hash = config_hash(&checked, &document);

    let base_dir = Path::new(source_name).parent().unwrap_or(Path::new("")).to_owned();
    let mut validator = validate::Validator {
        checked: &checked,
        document: &document,
        base_dir: &base_dir,
        env,
        problems: &mut problems,
        simulation: BTreeMap::new(),
    };
    let desired = validator.validate(config_hash);
    let simulation = std::mem::take(&mut validator.simulation);
    match desired {
        Some(desired) if problems.is_empty() => {
            let warnings = problems.take_warnings();
            let warnings = (!warnings.is_empty()).then(|| Diagnostics::new(source_name, redacted, warnings));
            Ok(Loaded { desired, warnings, simulation })
        }
        _ => {
            if problems.is_empty() {
                problems.push(
                    None,
                    "the config could not be read",
                    Some("this is a bug in ciscale's config checks; please report it".to_owned()),
                );
            }
            Err(invalid(problems, redacted))
        }
    }
}

fn schema_value() -> Value {
    serde_json::to_value(schemars::schema_for!(raw::RawConfig)).unwrap_or(Value::Null)
}

/// The JSON schema of the config file (draft 2020-12), pretty-printed with a trailing newline. Generated from
/// the raw types; `schemas/ciscale.schema.json` holds a copy (a test keeps it fresh).
pub fn schema_json() -> String {
    let mut text = serde_json::to_string_pretty(&schema_value()).unwrap_or_default();
    text.push('\n');
    text
}

/// A secret written inline (not only `${VAR}` references): it must not leave ciscale, not even hashed.
fn is_literal_secret(value: &str) -> bool {
    !interpolate::literal_part(value).trim().is_empty()
}

/// The source text with inline secret values blanked, for snippets in graphical diagnostics.
fn redact(text: &str, checked: &check::Checked) -> String {
    let literal_strings = checked.strings.iter().filter(|string| {
        string.secret
            && is_literal_secret(checked.document.pointer(&string.pointer).and_then(Value::as_str).unwrap_or_default())
    });
    let spans: Vec<Span> =
        literal_strings.map(|string| string.span).chain(checked.secret_nodes.iter().copied()).collect();
    blank_spans(text, &spans)
}

/// Replaces every byte of the spans but line breaks with `*`. Spans start and end on character boundaries and
/// every byte of a character is replaced, so the text stays UTF-8 and keeps its line layout.
fn blank_spans(text: &str, spans: &[Span]) -> String {
    let mut bytes = text.as_bytes().to_vec();
    for span in spans {
        let end = (span.offset + span.len).min(bytes.len());
        for byte in &mut bytes[span.offset.min(end)..end] {
            if *byte != b'\n' {
                *byte = b'*';
            }
        }
    }
    String::from_utf8(bytes).unwrap_or_else(|_| "(source hidden: it contains secrets)".to_owned())
}

/// Length of a YAML value written after `key:` on one line: up to a flow `,` or `}` (outside `${...}`), a
/// comment or the line end.
fn flow_value_len(rest: &str) -> usize {
    let mut in_reference = false;
    let mut previous = ' ';
    for (index, ch) in rest.char_indices() {
        match ch {
            '{' if previous == '$' => in_reference = true,
            '}' if in_reference => in_reference = false,
            ',' | '}' | '\n' if !in_reference => return index,
            '#' if previous.is_whitespace() => return index,
            _ => {}
        }
        previous = ch;
    }
    rest.len()
}

/// For a file that does not parse (so secret fields cannot be found by structure): blanks the value after any
/// `token:`, `pat:` or `agentPat:` on a line, unless it is only `${VAR}` references.
fn redact_unparsed(text: &str) -> String {
    let mut spans = Vec::new();
    let mut line_start = 0;
    for line in text.split_inclusive('\n') {
        for key in ["token:", "pat:", "agentPat:"] {
            let mut search = 0;
            while let Some(found) = line[search..].find(key) {
                let value_start = search + found + key.len();
                let value_len = flow_value_len(&line[value_start..]);
                let value = &line[value_start..value_start + value_len];
                if is_literal_secret(value.trim().trim_matches(['"', '\''])) {
                    spans.push(Span { line: 0, column: 0, offset: line_start + value_start, len: value_len });
                }
                search = value_start;
            }
        }
        line_start += line.len();
    }
    blank_spans(text, &spans)
}

/// `sha256:<hex>` of the canonical JSON (sorted keys, no whitespace) of the interpolated document, with every
/// secret as written (a `${VAR}` reference stays the reference, an inline secret becomes a marker): comments, key
/// order and formatting do not change it, a changed non-secret variable (`server: ${CI_URL}`) does, and no secret
/// value feeds it. A config without references in plain values hashes as it did before interpolation was
/// covered, so plan files made then stay valid.
fn config_hash(checked: &check::Checked, interpolated: &Value) -> String {
    let mut document = interpolated.clone();
    // `simulation:` is read by `ciscale simulate` only: tuning a boot time must not make saved plans stale.
    if let Some(backends) = document.get_mut("backends").and_then(Value::as_object_mut) {
        for backend in backends.values_mut().filter_map(Value::as_object_mut) {
            backend.remove("simulation");
        }
    }
    for string in checked.strings.iter().filter(|string| string.secret) {
        let written = checked.document.pointer(&string.pointer).and_then(Value::as_str).unwrap_or_default();
        if let Some(value) = document.pointer_mut(&string.pointer) {
            *value = if is_literal_secret(written) {
                Value::String("(secret)".to_owned())
            } else {
                Value::String(written.to_owned())
            };
        }
    }
    let mut canonical = String::new();
    write_canonical(&document, &mut canonical);
    let digest = Sha256::digest(canonical.as_bytes());
    let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("sha256:{hex}")
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (index, key) in keys.into_iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                if let Some(inner) = map.get(key) {
                    write_canonical(inner, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// What a secret field is for, in words for messages: `the API token of backend `hetzner``, plus what kind of
/// credential it takes (for hints), from its JSON pointer.
fn secret_role(checked: &check::Checked, pointer: &str) -> (String, Option<&'static str>) {
    let parts: Vec<String> =
        pointer.split('/').skip(1).map(|part| part.replace("~1", "/").replace("~0", "~")).collect();
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    let kind_of = |section: &str, name: &str| {
        checked
            .document
            .pointer(&check::pointer(&[check::Seg::Key(section.to_owned()), check::Seg::Key(name.to_owned())]))
            .and_then(|entry| entry.get("kind"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    match parts.as_slice() {
        ["backends", name, "token"] => (
            format!("the API token of backend `{name}`"),
            (kind_of("backends", name) == "hcloud")
                .then_some("a Hetzner Cloud project API token with read & write rights (Cloud Console → the project → Security → API tokens)"),
        ),
        ["ci", name, "token"] => (
            format!("the admin token of ci source `{name}`"),
            match kind_of("ci", name).as_str() {
                "woodpecker" => Some("a personal access token of a Woodpecker admin (the admin's user settings → personal access token)"),
                "forgejo" => Some("a Forgejo access token with `read:` and `write:` permission on the scope (admin, organization, repository or user), from Settings → Applications"),
                _ => None,
            },
        ),
        ["ci", name, "pat"] => (
            format!("the PAT of ci source `{name}`"),
            Some("an Azure DevOps personal access token with the scope Agent Pools (read & manage)"),
        ),
        ["ci", name, "agentPat"] => (
            format!("the agent PAT of ci source `{name}`"),
            Some("an Azure DevOps PAT scoped to Agent Pools (read & manage) only, which the agents register with"),
        ),
        ["pools", index, "agent", "secretEnv", key] => {
            let pool = checked
                .document
                .pointer(&format!("/pools/{index}/name"))
                .and_then(Value::as_str)
                .map_or_else(|| format!("pool #{index}"), |name| format!("pool `{name}`"));
            (format!("`{key}` in the secret env of {pool}"), None)
        }
        _ => (format!("the secret at `{pointer}`"), None),
    }
}

/// Where ciscale reads its environment from, for hints.
const ENV_PLACES: &str = "ciscale's environment (`export`, systemd `EnvironmentFile`, compose `environment:`)";

/// The document with `${VAR}` replaced in every string value; each problem is reported at its place. A secret
/// the command does not need ([`Secrets::Unused`]) is only a warning when unset or empty; a plain value's
/// reference is always needed (it shapes the plan and the config hash).
fn interpolate_document(
    checked: &check::Checked,
    src: &diag::SourceMap<'_>,
    env: &dyn Fn(&str) -> Option<String>,
    secrets: Secrets,
    problems: &mut diag::Problems,
) -> Value {
    let mut document = checked.document.clone();
    for string in &checked.strings {
        let Some(raw) = checked.document.pointer(&string.pointer).and_then(Value::as_str) else {
            continue;
        };
        // Agents may legitimately get an empty secret variable; a credential ciscale itself uses may not.
        let must_not_be_empty = string.secret && !string.pointer.contains("/secretEnv/");
        let needed = !string.secret || secrets == Secrets::Needed;
        let (value, errors) =
            if raw.contains('$') { interpolate::interpolate(raw, env) } else { (raw.to_owned(), Vec::new()) };
        let mut missing = false;
        for error in errors {
            let (severity_error, message, hint, range) = match error {
                interpolate::InterpolationError::Missing { name, at } => {
                    missing = true;
                    if string.secret {
                        let (role, credential) = secret_role(checked, &string.pointer);
                        let wanted = credential.map(|what| format!(" to {what}")).unwrap_or_default();
                        if needed {
                            (
                                true,
                                format!("environment variable `{name}` is not set; it holds {role}"),
                                format!("set `{name}`{wanted} in {ENV_PLACES}"),
                                at,
                            )
                        } else {
                            (
                                false,
                                format!("environment variable `{name}` is not set; it holds {role}"),
                                format!(
                                    "`validate` and `plan --observed` do not need it; `apply`, `watch` and `observe` \
                                     do: set `{name}`{wanted} where they run"
                                ),
                                at,
                            )
                        }
                    } else {
                        (
                            true,
                            format!("environment variable `{name}` is not set"),
                            format!("set `{name}` in {ENV_PLACES}, or write the value in place of `${{{name}}}`"),
                            at,
                        )
                    }
                }
                interpolate::InterpolationError::InvalidName { name, at } => (
                    true,
                    format!("invalid variable name `{name}` in `${{{name}}}`"),
                    "names are letters, digits and `_`, not starting with a digit".to_owned(),
                    at,
                ),
                interpolate::InterpolationError::Unterminated { at } => (
                    true,
                    "unterminated `${` reference".to_owned(),
                    "close it with `}`, or write `$${` for a literal `${`".to_owned(),
                    at,
                ),
                interpolate::InterpolationError::Unbraced { name, at } => {
                    if string.secret {
                        // The name is not shown: in an inline secret it would be part of the secret's value.
                        let (role, _) = secret_role(checked, &string.pointer);
                        (
                            true,
                            format!("{role} holds a `$NAME` without braces, which is not read from the environment"),
                            "write `${NAME}` to read the variable `NAME`, or `$$` for a `$` that belongs to the value"
                                .to_owned(),
                            at,
                        )
                    } else {
                        (
                            false,
                            format!("`${name}` is not read from the environment; it stays the text `${name}`"),
                            format!("write `${{{name}}}` to read the variable `{name}`, or `$${name}` to keep `${name}` as it is"),
                            at,
                        )
                    }
                }
            };
            let span = reference_span(src, string.span, &raw[range]);
            if severity_error {
                problems.push(Some(span), message, Some(hint));
            } else {
                problems.warn(Some(span), message, Some(hint));
            }
        }
        if must_not_be_empty && !missing && value.trim().is_empty() {
            let (role, credential) = secret_role(checked, &string.pointer);
            let names = interpolate::references(raw);
            let message = match names.as_slice() {
                [] => format!("{role} is empty"),
                [name] => format!("{role} is empty: `{name}` is set but empty"),
                _ => format!("{role} is empty: `{}` are set but empty", names.join("`, `")),
            };
            let hint = match credential {
                Some(what) => format!("it takes {what}"),
                None => "it needs a value".to_owned(),
            };
            if needed {
                problems.push(Some(string.span), message, Some(hint));
            } else {
                problems.warn(Some(string.span), message, Some(hint));
            }
        }
        if value != raw {
            if let Some(slot) = document.pointer_mut(&string.pointer) {
                *slot = Value::String(value);
            }
        }
    }
    document
}

/// The span of `reference` (e.g. `${TOKEN}`) inside the scalar at `scalar`, or the whole scalar when the source
/// text differs from the value (escapes, folded lines).
fn reference_span(src: &diag::SourceMap<'_>, scalar: Span, reference: &str) -> Span {
    let text = src.text();
    let end = (scalar.offset + scalar.len).min(text.len());
    let Some(found) = text.get(scalar.offset..end).and_then(|slice| slice.find(reference)) else {
        return scalar;
    };
    let offset = scalar.offset + found;
    let (line, column) = src.line_column(offset);
    Span { line, column, offset, len: reference.len() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        Some(format!("value-of-{name}"))
    }

    const MINIMAL: &str = "id: acme\nci:\n  wp: { kind: woodpecker, server: https://ci, token: \"${WP}\" }\nbackends:\n  h: { kind: hcloud, token: \"${HC}\" }\npools:\n  - name: linux\n    ci: { source: wp }\n    backend: { name: h }\n";

    #[test]
    fn hash_ignores_comments_order_and_formatting() {
        let reordered = "# a comment\nbackends:\n  h: {token: \"${HC}\", kind: hcloud}\nid: acme\npools:\n- backend: {name: h}\n  ci: {source: wp}\n  name: linux\nci:\n  wp:\n    token: \"${WP}\"\n    server: https://ci\n    kind: woodpecker\n";
        let first = load_str("a.yaml", MINIMAL, &env).unwrap();
        let second = load_str("b.yaml", reordered, &env).unwrap();
        assert_eq!(first.config_hash, second.config_hash);
        assert!(first.config_hash.starts_with("sha256:") && first.config_hash.len() == 7 + 64);
        let changed = MINIMAL.replace("name: linux", "name: linux2");
        assert_ne!(load_str("a.yaml", &changed, &env).unwrap().config_hash, first.config_hash);
    }

    #[test]
    fn hash_does_not_depend_on_secret_values() {
        let other_env = |name: &str| Some(format!("other-{name}"));
        assert_eq!(
            load_str("a.yaml", MINIMAL, &env).unwrap().config_hash,
            load_str("a.yaml", MINIMAL, &other_env).unwrap().config_hash
        );
        let inline_a = MINIMAL.replace("\"${HC}\"", "inline-secret-a");
        let inline_b = MINIMAL.replace("\"${HC}\"", "inline-secret-b");
        assert_eq!(
            load_str("a.yaml", &inline_a, &env).unwrap().config_hash,
            load_str("a.yaml", &inline_b, &env).unwrap().config_hash
        );
    }

    #[test]
    fn hash_covers_interpolated_plain_values_but_no_secret() {
        let with_url = MINIMAL.replace("https://ci", "\"${CI_URL}\"");
        let env_a = |name: &str| Some(if name == "CI_URL" { "https://a".to_owned() } else { format!("a-{name}") });
        let env_b = |name: &str| Some(if name == "CI_URL" { "https://b".to_owned() } else { format!("a-{name}") });
        let env_c = |name: &str| Some(if name == "CI_URL" { "https://a".to_owned() } else { format!("c-{name}") });
        let hash = |env: &dyn Fn(&str) -> Option<String>| load_str("a.yaml", &with_url, env).unwrap().config_hash;
        assert_ne!(hash(&env_a), hash(&env_b), "a changed plain variable changes the hash");
        assert_eq!(hash(&env_a), hash(&env_c), "changed secrets do not");
        // Written inline or through a variable, the same plain value hashes the same.
        let inline = MINIMAL.replace("https://ci", "https://a");
        assert_eq!(load_str("a.yaml", &inline, &env_a).unwrap().config_hash, hash(&env_a));
    }

    #[test]
    fn offline_loads_warn_about_unset_secrets_but_not_plain_values() {
        let unset = |_: &str| None;
        let loaded = load_str_with("a.yaml", MINIMAL, &unset, Secrets::Unused).expect("secrets are not needed");
        let warnings = loaded.warnings.expect("warnings");
        assert_eq!(warnings.problems().len(), 2, "{}", warnings.render_plain());
        assert!(warnings.problems().iter().all(|problem| problem.severity == Severity::Warning));
        assert!(load_str_with("a.yaml", MINIMAL, &unset, Secrets::Needed).is_err());
        let plain = MINIMAL.replace("https://ci", "\"${CI_URL}\"");
        let error = load_str_with("a.yaml", &plain, &unset, Secrets::Unused).unwrap_err();
        let problems = error.diagnostics().unwrap().problems();
        assert!(
            problems.iter().any(|p| p.severity == Severity::Error && p.message.contains("`CI_URL`")),
            "{problems:?}"
        );
        // Errors and warnings are reported together.
        assert!(problems.iter().any(|p| p.severity == Severity::Warning), "{problems:?}");
    }

    #[test]
    fn unparsable_files_get_token_values_blanked() {
        let text = "backends:\n  h: { kind: hcloud, token: hunter2, x: [\n  pat: \"${PAT}\"\n";
        let redacted = redact_unparsed(text);
        assert!(!redacted.contains("hunter2"), "{redacted}");
        assert!(redacted.contains("${PAT}"));
        assert_eq!(redacted.len(), text.len());
    }

    #[test]
    fn redaction_blanks_inline_secrets_only() {
        let text = MINIMAL.replace("\"${HC}\"", "hunter2").replace("https://ci", "https://ci-x");
        let src = diag::SourceMap::new(&text);
        let mut problems = diag::Problems::new("a.yaml");
        let root = check::parse(&src, &mut problems).unwrap();
        let checked = check::check(&root, &schema_value(), &src, &mut problems);
        let redacted = redact(&text, &checked);
        assert!(!redacted.contains("hunter2"));
        assert!(redacted.contains("token: *******"));
        assert!(redacted.contains("\"${WP}\""));
        assert_eq!(redacted.len(), text.len());
    }
}
