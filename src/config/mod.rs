//! The config room: `ciscale.yaml` → [`Desired`].
//!
//! Pipeline: parse the YAML with positions (`check::parse`) → walk it against the JSON schema of the raw types,
//! reporting structural problems (`check`) → hash the document before interpolation (`config_hash`) →
//! interpolate `${VAR}` from the environment (`interpolate`) → check meaning and build [`Desired`] (`validate`).
//! Every stage reports all its problems, located, into one [`Diagnostics`]; only a YAML syntax error stops early.
//! This module knows nothing of providers: names, numbers and durations are checked here, whether a Hetzner
//! server type exists is not.

mod check;
mod diag;
mod interpolate;
pub mod raw;
mod validate;

use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

pub use diag::{Diagnostics, Location, Problem, Span};

use std::collections::BTreeMap;

use crate::model::{BackendName, Desired};
use crate::simulate::models::Overrides;

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum ConfigError {
    #[error("cannot read config `{path}`")]
    #[diagnostic(help("pass the config with `-c FILE`"))]
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
}

/// Loads a config file; `${VAR}` references are read from the process environment. Relative paths in the config
/// resolve against the file's folder.
pub fn load_file(path: &Path) -> Result<Desired, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_owned(),
        source,
    })?;
    load_str(&path.display().to_string(), &text, &|name| {
        std::env::var(name).ok()
    })
}

/// Loads a config from text. `source_name` names the file in messages and is the base for relative paths (its
/// folder); `env` answers `${VAR}` references.
pub fn load_str(
    source_name: &str,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Desired, ConfigError> {
    load_str_with_simulation(source_name, text, env).map(|loaded| loaded.desired)
}

/// A config with the parts only `ciscale simulate` reads.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub desired: Desired,
    /// The backends' `simulation:` settings, by backend name (absent: the kind's defaults).
    pub simulation: BTreeMap<BackendName, Overrides>,
}

/// [`load_str`], keeping the backends' `simulation:` settings.
pub fn load_str_with_simulation(
    source_name: &str,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Loaded, ConfigError> {
    let src = diag::SourceMap::new(text);
    let mut problems = diag::Problems::new(source_name);
    let invalid = |problems: diag::Problems, redacted: String| {
        ConfigError::Invalid(Diagnostics::new(source_name, redacted, problems.list))
    };

    let Some(root) = check::parse(&src, &mut problems) else {
        return Err(invalid(problems, redact_unparsed(text)));
    };
    let schema = schema_value();
    let checked = check::check(&root, &schema, &src, &mut problems);
    let redacted = redact(text, &checked);

    let config_hash = config_hash(&checked);
    let document = interpolate_document(&checked, &src, env, &mut problems);

    let base_dir = Path::new(source_name)
        .parent()
        .unwrap_or(Path::new(""))
        .to_owned();
    let mut validator = validate::Validator {
        checked: &checked,
        document: &document,
        base_dir: &base_dir,
        problems: &mut problems,
        simulation: BTreeMap::new(),
    };
    let desired = validator.validate(config_hash);
    let simulation = std::mem::take(&mut validator.simulation);
    match desired {
        Some(desired) if problems.is_empty() => Ok(Loaded { desired, simulation }),
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
            && is_literal_secret(
                checked
                    .document
                    .pointer(&string.pointer)
                    .and_then(Value::as_str)
                    .unwrap_or_default(),
            )
    });
    let spans: Vec<Span> = literal_strings
        .map(|string| string.span)
        .chain(checked.secret_nodes.iter().copied())
        .collect();
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
                    spans.push(Span {
                        line: 0,
                        column: 0,
                        offset: line_start + value_start,
                        len: value_len,
                    });
                }
                search = value_start;
            }
        }
        line_start += line.len();
    }
    blank_spans(text, &spans)
}

/// `sha256:<hex>` of the canonical JSON (sorted keys, no whitespace) of the document before interpolation, with
/// inline secrets replaced by a marker: comments, key order and formatting do not change it, and no secret value
/// feeds it.
fn config_hash(checked: &check::Checked) -> String {
    let mut document = checked.document.clone();
    // `simulation:` is read by `ciscale simulate` only: tuning a boot time must not make saved plans stale.
    if let Some(backends) = document.get_mut("backends").and_then(Value::as_object_mut) {
        for backend in backends.values_mut().filter_map(Value::as_object_mut) {
            backend.remove("simulation");
        }
    }
    for string in checked.strings.iter().filter(|string| string.secret) {
        if let Some(value) = document.pointer_mut(&string.pointer) {
            if value.as_str().is_some_and(is_literal_secret) {
                *value = Value::String("(secret)".to_owned());
            }
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

/// The document with `${VAR}` replaced in every string value; each failed reference is reported at its place.
fn interpolate_document(
    checked: &check::Checked,
    src: &diag::SourceMap<'_>,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut diag::Problems,
) -> Value {
    let mut document = checked.document.clone();
    for string in &checked.strings {
        let Some(raw) = checked
            .document
            .pointer(&string.pointer)
            .and_then(Value::as_str)
        else {
            continue;
        };
        if !raw.contains('$') {
            continue;
        }
        match interpolate::interpolate(raw, env) {
            Ok(value) => {
                if let Some(slot) = document.pointer_mut(&string.pointer) {
                    *slot = Value::String(value);
                }
            }
            Err(errors) => {
                for error in errors {
                    let (message, hint, range) = match error {
                        interpolate::InterpolationError::Missing { name, at } => (
                            format!("environment variable `{name}` is not set"),
                            format!("export {name}=... or remove the reference"),
                            at,
                        ),
                        interpolate::InterpolationError::InvalidName { name, at } => (
                            format!("invalid variable name `{name}` in `${{{name}}}`"),
                            "names are letters, digits and `_`, not starting with a digit"
                                .to_owned(),
                            at,
                        ),
                        interpolate::InterpolationError::Unterminated { at } => (
                            "unterminated `${` reference".to_owned(),
                            "close it with `}`, or write `$${` for a literal `${`".to_owned(),
                            at,
                        ),
                    };
                    let span = reference_span(src, string.span, &raw[range]);
                    problems.push(Some(span), message, Some(hint));
                }
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
    let Some(found) = text
        .get(scalar.offset..end)
        .and_then(|slice| slice.find(reference))
    else {
        return scalar;
    };
    let offset = scalar.offset + found;
    let (line, column) = src.line_column(offset);
    Span {
        line,
        column,
        offset,
        len: reference.len(),
    }
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
        assert_ne!(
            load_str("a.yaml", &changed, &env).unwrap().config_hash,
            first.config_hash
        );
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
    fn unparsable_files_get_token_values_blanked() {
        let text = "backends:\n  h: { kind: hcloud, token: hunter2, x: [\n  pat: \"${PAT}\"\n";
        let redacted = redact_unparsed(text);
        assert!(!redacted.contains("hunter2"), "{redacted}");
        assert!(redacted.contains("${PAT}"));
        assert_eq!(redacted.len(), text.len());
    }

    #[test]
    fn redaction_blanks_inline_secrets_only() {
        let text = MINIMAL
            .replace("\"${HC}\"", "hunter2")
            .replace("https://ci", "https://ci-x");
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
