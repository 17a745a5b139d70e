//! A small, generic OpenAPI 3.0 checker: does a (method, path) exist in a spec, and do a request body and a
//! response body match the schemas the spec gives them? Used to hold the in-repo HTTP fakes and the clients that
//! talk to them to the real wire format. Specs are read from `../shared/specs/` (override: `CISCALE_SPECS`).
//!
//! OpenAPI 3.0 schemas are JSON Schema draft 4 plus `nullable`; `nullable: true` is rewritten to
//! `anyOf: [null, <schema>]` before validation. `$ref`s into `#/components/schemas` resolve because every schema
//! is validated inside a document that carries the spec's `components`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use serde_json::{json, Map, Value};

/// The folder holding the shared API specs.
pub fn specs_dir() -> PathBuf {
    std::env::var_os("CISCALE_SPECS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/specs")))
}

pub struct OpenApi {
    name: String,
    /// `paths` of the spec.
    paths: Map<String, Value>,
    /// `components`, with `nullable` rewritten.
    components: Value,
    validators: Mutex<HashMap<String, std::sync::Arc<jsonschema::Validator>>>,
}

impl OpenApi {
    /// Loads `file` from [`specs_dir`]; a missing folder or file fails the test saying which.
    pub fn load(file: &str) -> Self {
        let dir = specs_dir();
        assert!(
            dir.is_dir(),
            "the API spec folder `{}` is missing; the spec checks need it (set CISCALE_SPECS to another folder)",
            dir.display()
        );
        let path = dir.join(file);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|error| panic!("cannot read API spec `{}`: {error}", path.display()));
        let document: Value = serde_json::from_str(text.trim_start_matches('\u{feff}'))
            .unwrap_or_else(|error| panic!("API spec `{}` is not JSON: {error}", path.display()));
        let paths = document
            .get("paths")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let components = rewrite_nullable(document.get("components").cloned().unwrap_or(Value::Null));
        Self {
            name: file.to_owned(),
            paths,
            components,
            validators: Mutex::new(HashMap::new()),
        }
    }

    /// The spec's path template for a concrete path (`/servers/42` → `/servers/{id}`), preferring literal
    /// segments over parameters.
    pub fn template(&self, path: &str) -> Option<String> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        self.paths
            .keys()
            .filter_map(|template| {
                let parts: Vec<&str> = template.trim_matches('/').split('/').collect();
                if parts.len() != segments.len() {
                    return None;
                }
                let mut literal = 0;
                for (part, segment) in parts.iter().zip(&segments) {
                    if part.starts_with('{') && part.ends_with('}') {
                        continue;
                    }
                    if part != segment {
                        return None;
                    }
                    literal += 1;
                }
                Some((literal, template.clone()))
            })
            .max_by_key(|(literal, _)| *literal)
            .map(|(_, template)| template)
    }

    fn operation(&self, method: &str, path: &str) -> Result<&Value, String> {
        let template = self
            .template(path)
            .ok_or_else(|| format!("{}: no path matches `{path}`", self.name))?;
        self.paths
            .get(&template)
            .and_then(|item| item.get(method.to_ascii_lowercase()))
            .ok_or_else(|| format!("{}: `{template}` has no `{method}` operation", self.name))
    }

    /// The method and path exist, query parameters are declared, and the body matches the request schema.
    pub fn check_request(
        &self,
        method: &str,
        path: &str,
        query: &[String],
        body: Option<&Value>,
    ) -> Result<(), String> {
        let operation = self.operation(method, path)?;
        let declared: Vec<&str> = operation
            .get("parameters")
            .and_then(Value::as_array)
            .map(|parameters| {
                parameters
                    .iter()
                    .filter(|parameter| parameter.get("in").and_then(Value::as_str) == Some("query"))
                    .filter_map(|parameter| parameter.get("name").and_then(Value::as_str))
                    .collect()
            })
            .unwrap_or_default();
        for name in query {
            if !declared.contains(&name.as_str()) {
                return Err(format!(
                    "{}: `{method} {path}` has no query parameter `{name}`",
                    self.name
                ));
            }
        }
        let schema = operation.pointer("/requestBody/content/application~1json/schema");
        match (schema, body) {
            (Some(schema), Some(body)) => self.validate(schema, body, &format!("request `{method} {path}`")),
            (Some(_), None) => {
                if operation.pointer("/requestBody/required").and_then(Value::as_bool) == Some(true) {
                    Err(format!("{}: `{method} {path}` needs a body", self.name))
                } else {
                    Ok(())
                }
            }
            (None, Some(_)) => Err(format!("{}: `{method} {path}` takes no body", self.name)),
            (None, None) => Ok(()),
        }
    }

    /// The response body matches the schema the spec gives for this status (exact, then `4xx`/`5xx`, then
    /// `default`).
    pub fn check_response(&self, method: &str, path: &str, status: u16, body: &Value) -> Result<(), String> {
        let operation = self.operation(method, path)?;
        let responses = operation
            .get("responses")
            .ok_or_else(|| format!("{}: no responses", self.name))?;
        let class = format!("{}xx", status / 100);
        let response = responses
            .get(status.to_string())
            .or_else(|| responses.get(&class))
            .or_else(|| responses.get(class.to_ascii_uppercase()))
            .or_else(|| responses.get("default"))
            .ok_or_else(|| format!("{}: `{method} {path}` declares no {status} response", self.name))?;
        match response.pointer("/content/application~1json/schema") {
            Some(schema) => self.validate(schema, body, &format!("{status} response to `{method} {path}`")),
            None => Ok(()),
        }
    }

    fn validate(&self, schema: &Value, instance: &Value, what: &str) -> Result<(), String> {
        let key = schema.to_string();
        let validator = {
            let mut cache = self.validators.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            match cache.get(&key) {
                Some(validator) => validator.clone(),
                None => {
                    let mut root = rewrite_nullable(schema.clone());
                    if let Value::Object(object) = &mut root {
                        object.insert("components".to_owned(), self.components.clone());
                    }
                    let validator = jsonschema::options()
                        .with_draft(jsonschema::Draft::Draft4)
                        .should_validate_formats(false)
                        .build(&root)
                        .map_err(|error| format!("{}: schema for {what} does not compile: {error}", self.name))?;
                    let validator = std::sync::Arc::new(validator);
                    cache.insert(key, validator.clone());
                    validator
                }
            }
        };
        let errors: Vec<String> = validator
            .iter_errors(instance)
            .take(5)
            .map(|error| format!("{} at `{}`", error, error.instance_path))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{}: {what} does not match the spec: {}",
                self.name,
                errors.join("; ")
            ))
        }
    }
}

/// `{..., nullable: true}` → `{anyOf: [{type: null}, {...}]}`, everywhere in the tree.
fn rewrite_nullable(value: Value) -> Value {
    match value {
        Value::Object(mut object) => {
            let nullable = object.get("nullable").and_then(Value::as_bool) == Some(true);
            object.remove("nullable");
            let object: Map<String, Value> = object
                .into_iter()
                .map(|(key, value)| (key, rewrite_nullable(value)))
                .collect();
            if nullable {
                json!({ "anyOf": [{ "type": "null" }, Value::Object(object)] })
            } else {
                Value::Object(object)
            }
        }
        Value::Array(items) => Value::Array(items.into_iter().map(rewrite_nullable).collect()),
        other => other,
    }
}

#[test]
fn nullable_is_rewritten_and_checked() {
    let schema =
        rewrite_nullable(json!({ "type": "object", "properties": { "a": { "type": "string", "nullable": true } } }));
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft4)
        .build(&schema)
        .expect("compiles");
    assert!(validator.is_valid(&json!({ "a": null })));
    assert!(validator.is_valid(&json!({ "a": "x" })));
    assert!(!validator.is_valid(&json!({ "a": 1 })), "a wrong type still fails");
}
