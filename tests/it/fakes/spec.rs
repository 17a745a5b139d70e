//! Checks HTTP traffic against a published API description (Swagger 2 or OpenAPI 3) from `../shared/specs/`:
//! find the operation of a method and a concrete path, validate a JSON body against its request or response
//! schema. Every in-repo HTTP fake runs what it serves (and what its client sends) through this, so a fake that
//! drifts from the real wire format fails the tests.
//!
//! Generic on purpose: Woodpecker (Swagger 2, `#/definitions/...`), Hetzner and Azure DevOps (OpenAPI 3,
//! `#/components/schemas/...`) all load here.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

/// The folder holding the specs: `$CISCALE_SPECS_DIR`, or `shared/specs` beside the repository.
pub fn specs_dir() -> PathBuf {
    match std::env::var_os("CISCALE_SPECS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/specs"),
    }
}

/// One loaded API description. Cheap to clone; compiled validators are cached.
#[derive(Clone)]
pub struct Spec {
    name: String,
    doc: Arc<Value>,
    /// Path prefix of every operation (`/api` for Woodpecker's `basePath`, `` for most OpenAPI 3 files).
    base_path: String,
    draft: jsonschema::Draft,
    cache: Arc<Mutex<HashMap<String, Arc<jsonschema::Validator>>>>,
}

/// The operation a request maps to.
#[derive(Debug, Clone)]
pub struct Operation {
    /// The path template as the spec writes it (`/agents/{agent_id}`).
    pub template: String,
    pub method: String,
}

impl Spec {
    /// Loads `file` (e.g. `woodpecker-swagger.json`) from [`specs_dir`]. Panics with a clear message when the
    /// folder or the file is missing: these tests cannot say anything without it.
    pub fn load(file: &str) -> Spec {
        let dir = specs_dir();
        if !dir.is_dir() {
            panic!(
                "the API specs folder `{}` is missing: the in-repo fakes are checked against the published \
                 specs there\nhint: put the `shared/specs` folder beside the repository, or set \
                 `CISCALE_SPECS_DIR`",
                dir.display()
            );
        }
        let path = dir.join(file);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|error| panic!("cannot read API spec `{}`: {error}", path.display()));
        // Azure's file starts with a byte-order mark.
        let mut doc: Value = serde_json::from_str(text.trim_start_matches('\u{feff}'))
            .unwrap_or_else(|error| panic!("API spec `{}` is not JSON: {error}", path.display()));
        let swagger2 = doc.get("swagger").is_some();
        let base_path = if swagger2 {
            doc.get("basePath")
                .and_then(Value::as_str)
                .unwrap_or("")
                .trim_end_matches('/')
                .to_owned()
        } else {
            // OpenAPI 3: the path part of the first server URL, when it has one.
            doc.pointer("/servers/0/url")
                .and_then(Value::as_str)
                .and_then(|url| url.split("://").nth(1))
                .and_then(|rest| {
                    rest.find('/')
                        .map(|slash| rest[slash..].trim_end_matches('/').to_owned())
                })
                .unwrap_or_default()
        };
        if !swagger2 {
            // OpenAPI 3.0's `nullable` is not JSON Schema: spell it as a `null` type.
            rewrite_nullable(&mut doc);
        }
        Spec {
            name: file.to_owned(),
            doc: Arc::new(doc),
            base_path,
            draft: if swagger2 {
                jsonschema::Draft::Draft4
            } else {
                jsonschema::Draft::Draft202012
            },
            cache: Arc::default(),
        }
    }

    /// Overrides the path prefix (Hetzner's paths have no `/v1` in the spec, but clients send it).
    pub fn with_base_path(mut self, base_path: &str) -> Spec {
        self.base_path = base_path.trim_end_matches('/').to_owned();
        self
    }

    /// The operation serving `method` on the concrete `path` (query string ignored), or why there is none.
    pub fn operation(&self, method: &str, path: &str) -> Result<Operation, String> {
        let path = path.split('?').next().unwrap_or(path);
        let relative = path
            .strip_prefix(&self.base_path)
            .filter(|rest| rest.starts_with('/'))
            .ok_or_else(|| {
                format!(
                    "{}: `{method} {path}` is outside the API's base path `{}`",
                    self.name, self.base_path
                )
            })?;
        let method_key = method.to_ascii_lowercase();
        let paths = self
            .doc
            .get("paths")
            .and_then(Value::as_object)
            .ok_or("spec has no `paths`")?;
        // Literal segments beat parameters (`/agents/{id}` vs a literal `/agents/tasks`): fewest parameters win.
        let mut best: Option<(usize, &String)> = None;
        for (template, item) in paths {
            if item.get(&method_key).is_none() {
                continue;
            }
            if let Some(params) = template_matches(template, relative) {
                if best.is_none_or(|(fewest, _)| params < fewest) {
                    best = Some((params, template));
                }
            }
        }
        match best {
            Some((_, template)) => Ok(Operation {
                template: template.clone(),
                method: method_key,
            }),
            None => Err(format!("{}: no operation `{method} {relative}` in the spec", self.name)),
        }
    }

    fn operation_value(&self, operation: &Operation) -> &Value {
        &self.doc["paths"][&operation.template][&operation.method]
    }

    /// Validates a response body of `status` for `method path`. A status the operation does not list falls back
    /// to `default`; an operation without a body schema accepts only an empty body (`Value::Null`).
    pub fn check_response(&self, method: &str, path: &str, status: u16, body: &Value) -> Result<(), String> {
        let operation = self.operation(method, path)?;
        let op = self.operation_value(&operation);
        let responses = op
            .get("responses")
            .ok_or_else(|| format!("`{method} {path}` has no responses"))?;
        let response = responses
            .get(status.to_string())
            .or_else(|| responses.get("default"))
            .ok_or_else(|| {
                format!(
                    "{}: `{method} {}` does not document status {status}",
                    self.name, operation.template
                )
            })?;
        let schema = response
            .get("schema")
            .or_else(|| response.pointer("/content/application~1json/schema"))
            .or_else(|| {
                response
                    .get("content")
                    .and_then(Value::as_object)
                    .and_then(|c| c.values().next()?.get("schema"))
            });
        match schema {
            Some(schema) => self.validate(&format!("{method} {} {status}", operation.template), schema, body),
            None if body.is_null() => Ok(()),
            None => Err(format!(
                "{}: `{method} {}` {status} documents no body, got one",
                self.name, operation.template
            )),
        }
    }

    /// Validates a request body of `method path` against its body parameter (Swagger 2) or `requestBody`.
    pub fn check_request(&self, method: &str, path: &str, body: &Value) -> Result<(), String> {
        let operation = self.operation(method, path)?;
        let op = self.operation_value(&operation);
        let swagger_body = op
            .get("parameters")
            .and_then(Value::as_array)
            .and_then(|params| params.iter().find(|param| param.get("in") == Some(&json!("body"))))
            .and_then(|param| param.get("schema"));
        let schema = swagger_body.or_else(|| op.pointer("/requestBody/content/application~1json/schema"));
        match schema {
            Some(schema) => self.validate(&format!("{method} {} request", operation.template), schema, body),
            None if body.is_null() => Ok(()),
            None => Err(format!(
                "{}: `{method} {}` takes no body, got one",
                self.name, operation.template
            )),
        }
    }

    fn validate(&self, what: &str, schema: &Value, body: &Value) -> Result<(), String> {
        let validator = self.validator(what, schema)?;
        let problems: Vec<String> = validator
            .iter_errors(body)
            .map(|error| format!("at `{}`: {error}", error.instance_path))
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{}: `{what}` body does not match the spec:\n  {}",
                self.name,
                problems.join("\n  ")
            ))
        }
    }

    fn validator(&self, what: &str, schema: &Value) -> Result<Arc<jsonschema::Validator>, String> {
        let mut cache = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(validator) = cache.get(what) {
            return Ok(validator.clone());
        }
        // `$ref`s point into the document (`#/definitions/X`, `#/components/schemas/X`): give the schema a root
        // that has those sections, and keep the schema itself under `allOf` so `$ref` siblings stay meaningful.
        let mut root = json!({ "allOf": [schema] });
        for section in ["definitions", "components"] {
            if let Some(value) = self.doc.get(section) {
                root[section] = value.clone();
            }
        }
        let validator = jsonschema::options()
            .with_draft(self.draft)
            .should_validate_formats(false)
            .build(&root)
            .map_err(|error| format!("{}: schema of `{what}` does not compile: {error}", self.name))?;
        let validator = Arc::new(validator);
        cache.insert(what.to_owned(), validator.clone());
        Ok(validator)
    }
}

/// The number of parameter segments if `template` (`/agents/{agent_id}`) matches `path` (`/agents/3`).
fn template_matches(template: &str, path: &str) -> Option<usize> {
    let template_segments: Vec<&str> = template.trim_end_matches('/').split('/').collect();
    let path_segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    if template_segments.len() != path_segments.len() {
        return None;
    }
    let mut params = 0;
    for (expected, actual) in template_segments.iter().zip(&path_segments) {
        if expected.starts_with('{') && expected.ends_with('}') {
            if actual.is_empty() {
                return None;
            }
            params += 1;
        } else if expected != actual {
            return None;
        }
    }
    Some(params)
}

fn rewrite_nullable(value: &mut Value) {
    match value {
        Value::Object(map) => {
            if map.get("nullable") == Some(&Value::Bool(true)) {
                map.remove("nullable");
                match map.get("type").cloned() {
                    Some(Value::String(kind)) => {
                        map.insert("type".to_owned(), json!([kind, "null"]));
                        if let Some(Value::Array(options)) = map.get_mut("enum") {
                            options.push(Value::Null);
                        }
                    }
                    _ => {
                        let inner = Value::Object(std::mem::take(map));
                        map.insert("anyOf".to_owned(), json!([{ "type": "null" }, inner]));
                    }
                }
            }
            for child in map.values_mut() {
                rewrite_nullable(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(rewrite_nullable),
        _ => {}
    }
}

#[test]
fn woodpecker_spec_finds_operations_and_rejects_wrong_bodies() {
    let spec = Spec::load("woodpecker-swagger.json");
    assert_eq!(
        spec.operation("GET", "/api/agents/12").expect("operation").template,
        "/agents/{agent_id}"
    );
    assert_eq!(
        spec.operation("GET", "/api/agents/12/tasks")
            .expect("operation")
            .template,
        "/agents/{agent_id}/tasks"
    );
    assert_eq!(
        spec.operation("GET", "/api/agents?page=2&perPage=50")
            .expect("operation")
            .template,
        "/agents"
    );
    assert!(spec.operation("PUT", "/api/agents/12").is_err(), "no PUT on agents");
    assert!(spec.operation("GET", "/agents").is_err(), "outside the base path");

    let agent = json!({ "id": 3, "name": "a", "no_schedule": false, "custom_labels": { "k": "v" } });
    spec.check_response("GET", "/api/agents/3", 200, &agent)
        .expect("a valid agent");
    let wrong = json!({ "id": "three", "no_schedule": "no" });
    let error = spec
        .check_response("GET", "/api/agents/3", 200, &wrong)
        .expect_err("a wrong agent");
    assert!(error.contains("/id") && error.contains("/no_schedule"), "{error}");
    // `$ref` into definitions resolves: a queue task's labels must be strings.
    let queue = json!({ "pending": [{ "id": "1", "labels": { "repo": 1 } }], "running": [] });
    assert!(spec.check_response("GET", "/api/queue/info", 200, &queue).is_err());
    assert!(
        spec.check_response("GET", "/api/queue/info", 418, &json!({})).is_err(),
        "undocumented status"
    );
    spec.check_response("DELETE", "/api/agents/3", 200, &Value::Null)
        .expect("delete has no body");
    spec.check_request("PATCH", "/api/agents/3", &json!({ "no_schedule": true }))
        .expect("a valid patch");
    assert!(spec
        .check_request("PATCH", "/api/agents/3", &json!({ "no_schedule": "yes" }))
        .is_err());
}
