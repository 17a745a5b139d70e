//! Checks HTTP traffic against a published API description (Swagger 2 or OpenAPI 3) from `../shared/specs/`:
//! find the operation of a method and a concrete path, check its path and query parameters, validate a JSON
//! request or response body against the schema the spec gives it. Every in-repo HTTP fake (Woodpecker, Hetzner,
//! Azure DevOps) runs its traffic through this one checker, so a fake or a client that drifts from the real wire
//! format fails the tests.
//!
//! What it checks, for the operation(s) of the most specific path template that matches (literal segments beat
//! parameters; Azure's `x-ms-paths` overloads of one template are all tried, one must pass):
//! - the method exists on that template;
//! - every path parameter is declared, with the declared type;
//! - every query parameter sent is declared, with the declared type, and every required one is sent;
//! - a request body validates against the `body` parameter (Swagger 2) or `requestBody` (OpenAPI 3); a required
//!   body is present; no body is sent where none is declared;
//! - a response status is documented (exact, `4xx`, then `default`) and its body validates against the schema;
//!   no body is sent where none is documented, and a documented one is not missing.
//!
//! Schemas are JSON Schema draft 4 (what both Swagger 2 and OpenAPI 3.0 build on) with formats checked, validated
//! inside a root that carries the spec's `definitions` and `components`, so `#/definitions/X` and
//! `#/components/schemas/X` resolve. OpenAPI 3.0's `nullable: true` is rewritten to `anyOf: [null, schema]`.
//!
//! Per-service quirks are options: [`Spec::with_base_path`], [`Spec::lists_wrapped_in_count_value`] (Azure),
//! [`Spec::errors_undocumented`] (Azure, GitHub), [`Spec::conditional_requests`] (GitHub).
//!
//! `$ref`s to shared parameters (`#/parameters/X`, `#/components/parameters/X`) and to shared responses
//! (`#/components/responses/X`) are resolved.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};

/// The folder holding the specs: `$CISCALE_SPECS_DIR`, or `shared/specs` beside the repository.
pub fn specs_dir() -> PathBuf {
    match std::env::var_os("CISCALE_SPECS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/specs"),
    }
}

const METHODS: [&str; 7] = ["get", "put", "post", "delete", "patch", "head", "options"];

/// One operation of the spec: a method on a path template.
#[derive(Debug, Clone)]
pub struct Operation {
    /// The path template as the spec writes it, without Azure's `?...` overload suffix (`/agents/{agent_id}`).
    pub template: String,
    /// Lower case, as the spec's keys (`get`).
    pub method: String,
    /// Where it was found (`paths get /agents/{agent_id}`), for messages.
    key: String,
    segments: Vec<String>,
    /// Path-level and operation-level parameters, `$ref`s resolved.
    parameters: Vec<Value>,
    /// The operation object.
    value: Value,
}

impl Operation {
    fn parameters_in(&self, place: &'static str) -> impl Iterator<Item = &Value> + '_ {
        self.parameters.iter().filter(move |parameter| parameter.get("in").and_then(Value::as_str) == Some(place))
    }

    fn parameter(&self, place: &'static str, name: &str) -> Option<&Value> {
        self.parameters_in(place).find(|parameter| parameter.get("name").and_then(Value::as_str) == Some(name))
    }

    /// The number of parameter segments if this template matches the concrete `segments`.
    fn matches(&self, segments: &[&str]) -> Option<usize> {
        if self.segments.len() != segments.len() {
            return None;
        }
        let mut params = 0;
        for (expected, actual) in self.segments.iter().zip(segments) {
            if is_parameter(expected) {
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
}

/// One HTTP exchange (or half of one) to check. `request: None` skips the request checks (query and body),
/// `response: None` the response checks.
#[derive(Debug, Clone)]
pub struct Exchange<'a> {
    pub method: &'a str,
    /// The path as sent, with the base path; a query string on it is ignored.
    pub path: &'a str,
    pub request: Option<Request<'a>>,
    pub response: Option<Response<'a>>,
}

#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub query: Vec<(&'a str, &'a str)>,
    pub body: Option<&'a Value>,
}

#[derive(Debug, Clone, Copy)]
pub struct Response<'a> {
    pub status: u16,
    pub body: Option<&'a Value>,
}

/// One loaded API description. Cheap to clone; compiled validators are cached.
#[derive(Clone)]
pub struct Spec {
    name: String,
    /// `definitions` and `components` of the document (`nullable` rewritten): the root of every validation.
    schemas: Arc<Map<String, Value>>,
    /// Whether named schemas live under `#/definitions` (Swagger 2) or `#/components/schemas` (OpenAPI 3).
    swagger2: bool,
    operations: Arc<Vec<Operation>>,
    /// Path prefix of every operation (`/api` for Woodpecker's `basePath`, empty for most OpenAPI 3 files).
    base_path: String,
    lists_wrapped: bool,
    errors_undocumented: bool,
    conditional: bool,
    cache: Arc<Mutex<HashMap<String, Arc<jsonschema::Validator>>>>,
}

impl Spec {
    /// Loads `file` (e.g. `woodpecker-swagger.json`) from [`specs_dir`]. Panics with a clear message when the
    /// folder or the file is missing: these tests cannot say anything without it.
    pub fn load(file: &str) -> Spec {
        Spec::load_from(&specs_dir(), file)
    }

    /// [`Spec::load`] from another folder.
    pub fn load_from(dir: &std::path::Path, file: &str) -> Spec {
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
        Spec::from_text(file, &text).unwrap_or_else(|problem| panic!("API spec `{}`: {problem}", path.display()))
    }

    /// Parses and indexes a spec document; `name` prefixes every message.
    pub fn from_text(name: &str, text: &str) -> Result<Spec, String> {
        // Azure's file starts with a UTF-8 byte-order mark, which JSON parsers refuse.
        let document: Value =
            serde_json::from_str(text.trim_start_matches('\u{feff}')).map_err(|error| format!("not JSON: {error}"))?;
        let swagger2 = match (document.get("swagger"), document.get("openapi")) {
            (Some(version), _) if version == "2.0" => true,
            (None, Some(version)) if version.as_str().is_some_and(|v| v.starts_with("3.")) => false,
            _ => return Err("neither Swagger 2.0 nor OpenAPI 3".to_owned()),
        };
        // OpenAPI 3 servers are deployment URLs: paths are taken as they are unless a caller says otherwise.
        let base_path = match document.get("basePath").and_then(Value::as_str) {
            Some(base) if swagger2 => base.trim_end_matches('/').to_owned(),
            _ => String::new(),
        };
        let document = if swagger2 { document } else { rewrite_nullable(document) };
        // Swagger 2 keeps shared parameters at `#/parameters`, OpenAPI 3 at `#/components/parameters`.
        let shared_parameters = document
            .get("parameters")
            .or_else(|| document.pointer("/components/parameters"))
            .cloned()
            .unwrap_or(json!({}));
        let shared_responses = document.pointer("/components/responses").cloned().unwrap_or(json!({}));
        let mut operations = Vec::new();
        for section in ["paths", "x-ms-paths"] {
            let Some(paths) = document.get(section).and_then(Value::as_object) else {
                continue;
            };
            for (key, item) in paths {
                let template = key.split('?').next().unwrap_or(key);
                let segments: Vec<String> = template.trim_matches('/').split('/').map(str::to_owned).collect();
                let Some(item) = item.as_object() else { continue };
                let path_level = item.get("parameters").and_then(Value::as_array).cloned().unwrap_or_default();
                for (method, operation) in item {
                    if !METHODS.contains(&method.as_str()) {
                        continue;
                    }
                    let own = operation.get("parameters").and_then(Value::as_array).cloned().unwrap_or_default();
                    let parameters = path_level
                        .iter()
                        .chain(&own)
                        .map(|parameter| resolve_parameter(parameter, &shared_parameters))
                        .collect::<Result<Vec<_>, _>>()?;
                    operations.push(Operation {
                        template: template.to_owned(),
                        method: method.clone(),
                        key: format!("{section} {method} {key}"),
                        segments: segments.clone(),
                        parameters,
                        value: resolve_responses(operation, &shared_responses)?,
                    });
                }
            }
        }
        let mut schemas = Map::new();
        for section in ["definitions", "components"] {
            if let Some(value) = document.get(section) {
                schemas.insert(section.to_owned(), value.clone());
            }
        }
        Ok(Spec {
            name: name.to_owned(),
            schemas: Arc::new(schemas),
            swagger2,
            operations: Arc::new(operations),
            base_path,
            lists_wrapped: false,
            errors_undocumented: false,
            conditional: false,
            cache: Arc::default(),
        })
    }

    /// Overrides the path prefix the traffic carries before the spec's paths.
    pub fn with_base_path(mut self, base_path: &str) -> Spec {
        self.base_path = base_path.trim_end_matches('/').to_owned();
        self
    }

    /// Azure: the spec describes list answers as bare arrays, but the service wraps every list in
    /// `{"count": N, "value": [...]}`; for an array schema the check demands the wrapper and reads `value`.
    pub fn lists_wrapped_in_count_value(mut self) -> Spec {
        self.lists_wrapped = true;
        self
    }

    /// Azure: the spec documents only successful answers; an error status (400 and above) the operation does not
    /// list is not checked (a documented one still is).
    pub fn errors_undocumented(mut self) -> Spec {
        self.errors_undocumented = true;
        self
    }

    /// GitHub: any `GET` may be answered `304 Not Modified` (no body) to a conditional request (`If-None-Match`),
    /// as HTTP allows; the spec documents the 304 on a few operations only.
    pub fn conditional_requests(mut self) -> Spec {
        self.conditional = true;
        self
    }

    /// `path` relative to the base path, without its query, split in segments.
    fn segments<'p>(&self, method: &str, path: &'p str) -> Result<Vec<&'p str>, String> {
        let path = path.split('?').next().unwrap_or(path);
        let relative =
            path.strip_prefix(self.base_path.as_str()).filter(|rest| rest.starts_with('/')).ok_or_else(|| {
                format!("{}: `{method} {path}` is outside the API's base path `{}`", self.name, self.base_path)
            })?;
        Ok(relative.trim_end_matches('/').trim_start_matches('/').split('/').collect())
    }

    /// The operations of the most specific templates matching `path` (fewest parameter segments), any method.
    /// Azure's overloads of one template are equally specific, so all of them stay.
    fn most_specific(&self, segments: &[&str]) -> Vec<&Operation> {
        let matching: Vec<(usize, &Operation)> =
            self.operations.iter().filter_map(|operation| Some((operation.matches(segments)?, operation))).collect();
        let Some(fewest) = matching.iter().map(|(params, _)| *params).min() else {
            return Vec::new();
        };
        matching.into_iter().filter(|(params, _)| *params == fewest).map(|(_, operation)| operation).collect()
    }

    /// The operations `method path` may be (several for Azure's overloads), or why there is none.
    fn candidates(&self, method: &str, path: &str) -> Result<Vec<&Operation>, String> {
        let segments = self.segments(method, path)?;
        let specific = self.most_specific(&segments);
        let Some(first) = specific.first() else {
            return Err(format!("{}: no path of the spec matches `{method} {path}`", self.name));
        };
        let method_key = method.to_ascii_lowercase();
        let candidates: Vec<&Operation> = specific.iter().copied().filter(|op| op.method == method_key).collect();
        if candidates.is_empty() {
            return Err(format!(
                "{}: no operation `{method} {}` in the spec (for `{path}`)",
                self.name, first.template
            ));
        }
        Ok(candidates)
    }

    /// The operation serving `method` on the concrete `path` (query string ignored), or why there is none.
    pub fn operation(&self, method: &str, path: &str) -> Result<Operation, String> {
        let candidates = self.candidates(method, path)?;
        Ok(candidates[0].clone())
    }

    /// The spec's path template for a concrete path (`/servers/42` → `/servers/{id}`), preferring literal
    /// segments over parameters, whatever the method.
    pub fn template(&self, path: &str) -> Option<String> {
        let segments = self.segments("", path).ok()?;
        self.most_specific(&segments).first().map(|operation| operation.template.clone())
    }

    /// Whether any template of the spec matching `path` has `method` (the spec mentions this call at all).
    pub fn covers(&self, method: &str, path: &str) -> bool {
        let Ok(segments) = self.segments(method, path) else {
            return false;
        };
        let method_key = method.to_ascii_lowercase();
        self.operations.iter().any(|operation| operation.method == method_key && operation.matches(&segments).is_some())
    }

    /// The request of `method path`: parameters and body.
    pub fn check_request(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<(), String> {
        self.check(Exchange { method, path, request: Some(Request { query: query.to_vec(), body }), response: None })
    }

    /// The response of `status` to `method path`: the status is documented and the body is the documented one.
    pub fn check_response(&self, method: &str, path: &str, status: u16, body: Option<&Value>) -> Result<(), String> {
        self.check(Exchange { method, path, request: None, response: Some(Response { status, body }) })
    }

    /// Checks one exchange against every operation it may be; `Err` says what is wrong against each.
    pub fn check<'a>(&self, exchange: impl Into<Exchange<'a>>) -> Result<(), String> {
        let exchange = exchange.into();
        let candidates = self.candidates(exchange.method, exchange.path)?;
        let segments = self.segments(exchange.method, exchange.path)?;
        let mut failures = Vec::new();
        for operation in candidates {
            let problems = self.problems(operation, &segments, &exchange);
            if problems.is_empty() {
                return Ok(());
            }
            failures.push(format!("  against `{}`:\n    {}", operation.key, problems.join("\n    ")));
        }
        Err(format!(
            "{}: `{} {}` is not what the spec says:\n{}",
            self.name,
            exchange.method,
            exchange.path,
            failures.join("\n")
        ))
    }

    fn problems(&self, operation: &Operation, segments: &[&str], exchange: &Exchange) -> Vec<String> {
        let mut problems = Vec::new();
        for (template, actual) in operation.segments.iter().zip(segments) {
            let Some(name) = template.strip_prefix('{').and_then(|rest| rest.strip_suffix('}')) else {
                continue;
            };
            match operation.parameter("path", name) {
                Some(parameter) => {
                    if let Err(problem) = check_scalar(parameter, actual) {
                        problems.push(format!("path parameter `{name}` = `{actual}`: {problem}"));
                    }
                }
                None => problems.push(format!("path parameter `{name}` is not declared")),
            }
        }
        if let Some(request) = &exchange.request {
            self.request_problems(operation, request, &mut problems);
        }
        if let Some(response) = &exchange.response {
            self.response_problems(operation, response, &mut problems);
        }
        problems
    }

    fn request_problems(&self, operation: &Operation, request: &Request, problems: &mut Vec<String>) {
        for &(name, value) in &request.query {
            match operation.parameter("query", name) {
                Some(parameter) => {
                    if let Err(problem) = check_scalar(parameter, value) {
                        problems.push(format!("query parameter `{name}` = `{value}`: {problem}"));
                    }
                }
                None => problems.push(format!("query parameter `{name}` is not declared")),
            }
        }
        for required in operation.parameters_in("query").filter(|p| is_required(p)) {
            let name = required.get("name").and_then(Value::as_str).unwrap_or_default();
            if !request.query.iter().any(|(sent, _)| *sent == name) {
                problems.push(format!("required query parameter `{name}` is missing"));
            }
        }
        // Swagger 2: a `body` parameter; OpenAPI 3: `requestBody`.
        let (schema, required) = match operation.parameters_in("body").next() {
            Some(parameter) => (parameter.get("schema"), is_required(parameter)),
            None => match operation.value.get("requestBody") {
                Some(request_body) => (content_schema(request_body), is_required(request_body)),
                None => (None, false),
            },
        };
        match (schema, request.body) {
            (Some(schema), Some(body)) => problems
                .extend(self.validate(schema, body).into_iter().map(|problem| format!("request body: {problem}"))),
            (Some(_), None) if required => problems.push("the required request body is missing".to_owned()),
            (None, Some(_)) => problems.push("a request body is sent but none is declared".to_owned()),
            _ => {}
        }
    }

    fn response_problems(&self, operation: &Operation, response: &Response, problems: &mut Vec<String>) {
        let status = response.status;
        if self.conditional && status == 304 && operation.method == "get" {
            if let Some(body) = response.body {
                problems.push(format!("304 carries no body, got one: {body}"));
            }
            return;
        }
        let responses = operation.value.get("responses");
        let class = format!("{}xx", status / 100);
        let documented = responses.and_then(|responses| {
            responses
                .get(status.to_string())
                .or_else(|| responses.get(&class))
                .or_else(|| responses.get(class.to_ascii_uppercase()))
                .or_else(|| responses.get("default"))
        });
        let Some(documented) = documented else {
            if !(self.errors_undocumented && status >= 400) {
                problems.push(format!("status {status} is not a documented response"));
            }
            return;
        };
        let schema = documented.get("schema").or_else(|| content_schema(documented));
        match (schema, response.body) {
            (Some(schema), Some(body)) => {
                let is_array = schema.get("type").and_then(Value::as_str) == Some("array");
                let checked = if self.lists_wrapped && is_array {
                    match body.get("value") {
                        Some(value) if body.get("count").is_some_and(Value::is_u64) => value,
                        _ => {
                            problems.push("a list answer is not wrapped as `{count, value}`".to_owned());
                            body
                        }
                    }
                } else {
                    body
                };
                problems.extend(
                    self.validate(schema, checked).into_iter().map(|problem| format!("{status} response: {problem}")),
                );
            }
            (Some(_), None) => problems.push(format!("the documented {status} response body is missing")),
            (None, Some(body)) => problems.push(format!("{status} documents no body, got one: {body}")),
            (None, None) => {}
        }
    }

    /// Validates `instance` against a schema of this spec (its `$ref`s resolved in the spec); the problems found.
    pub fn validate(&self, schema: &Value, instance: &Value) -> Vec<String> {
        let validator = match self.validator(schema) {
            Ok(validator) => validator,
            Err(problem) => return vec![problem],
        };
        validator.iter_errors(instance).map(|error| format!("{error} at `{}`", error.instance_path)).collect()
    }

    fn validator(&self, schema: &Value) -> Result<Arc<jsonschema::Validator>, String> {
        let key = schema.to_string();
        let mut cache = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(validator) = cache.get(&key) {
            return Ok(validator.clone());
        }
        // The schema sits under `allOf` in a root that has the spec's `definitions`/`components`, so its `$ref`s
        // resolve and `$ref` siblings stay meaningful.
        let mut root = (*self.schemas).clone();
        root.insert("allOf".to_owned(), json!([schema]));
        let validator = jsonschema::draft4::options()
            .should_validate_formats(true)
            .build(&Value::Object(root))
            .map_err(|error| format!("{}: the spec's schema does not compile: {error}", self.name))?;
        let validator = Arc::new(validator);
        cache.insert(key, validator.clone());
        Ok(validator)
    }

    /// The schema of a named definition, as a `$ref` (for parts of the API the spec leaves out).
    pub fn definition(&self, name: &str) -> Value {
        let (section, pointer) = if self.swagger2 {
            ("/definitions/", "#/definitions/")
        } else {
            ("/components/schemas/", "#/components/schemas/")
        };
        let root = Value::Object((*self.schemas).clone());
        assert!(
            root.pointer(&format!("{section}{name}")).is_some(),
            "{}: the spec has no definition `{name}`",
            self.name
        );
        json!({ "$ref": format!("{pointer}{name}") })
    }
}

fn is_parameter(segment: &str) -> bool {
    segment.starts_with('{') && segment.ends_with('}')
}

fn is_required(value: &Value) -> bool {
    value.get("required").and_then(Value::as_bool) == Some(true)
}

/// The JSON schema of an OpenAPI 3 request body or response: `application/json`, else the first media type's.
fn content_schema(value: &Value) -> Option<&Value> {
    value.pointer("/content/application~1json/schema").or_else(|| {
        value.get("content").and_then(Value::as_object).and_then(|content| content.values().next()?.get("schema"))
    })
}

/// An operation with every `responses` entry that is a `$ref` to `#/components/responses/X` replaced by X.
fn resolve_responses(operation: &Value, shared: &Value) -> Result<Value, String> {
    let mut operation = operation.clone();
    if let Some(responses) = operation.get_mut("responses").and_then(Value::as_object_mut) {
        for response in responses.values_mut() {
            let Some(reference) = response.get("$ref").and_then(Value::as_str) else {
                continue;
            };
            // Other forms (Swagger 2's `#/responses/X`) are left as they are: no spec here uses them.
            let Some(name) = reference.strip_prefix("#/components/responses/") else {
                continue;
            };
            *response = shared.get(name).cloned().ok_or_else(|| format!("unresolved `$ref` {reference}"))?;
        }
    }
    Ok(operation)
}

fn resolve_parameter(parameter: &Value, shared: &Value) -> Result<Value, String> {
    match parameter.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let name = reference
                .strip_prefix("#/parameters/")
                .or_else(|| reference.strip_prefix("#/components/parameters/"))
                .ok_or_else(|| format!("unsupported `$ref` {reference}"))?;
            shared.get(name).cloned().ok_or_else(|| format!("unresolved `$ref` {reference}"))
        }
        None => Ok(parameter.clone()),
    }
}

/// A path or query value against a non-body parameter's `type`/`format`/`enum` (Swagger 2: on the parameter;
/// OpenAPI 3: in its `schema`).
fn check_scalar(parameter: &Value, value: &str) -> Result<(), String> {
    let described = parameter.get("schema").unwrap_or(parameter);
    let kind = described.get("type").and_then(Value::as_str).unwrap_or("string");
    let format = described.get("format").and_then(Value::as_str);
    match (kind, format) {
        ("integer", Some("int32")) => value.parse::<i32>().map(|_| ()).map_err(|_| "not an int32".to_owned())?,
        ("integer", _) => value.parse::<i64>().map(|_| ()).map_err(|_| "not an integer".to_owned())?,
        ("boolean", _) if !matches!(value, "true" | "false") => return Err("not `true`/`false`".to_owned()),
        _ => {}
    }
    if let Some(allowed) = described.get("enum").and_then(Value::as_array) {
        if !allowed.iter().any(|candidate| candidate.as_str() == Some(value)) {
            return Err(format!("not one of {allowed:?}"));
        }
    }
    Ok(())
}

/// `{..., nullable: true}` → `{anyOf: [{type: null}, {...}]}`, everywhere in the tree.
fn rewrite_nullable(value: Value) -> Value {
    match value {
        Value::Object(mut object) => {
            let nullable = object.get("nullable").and_then(Value::as_bool) == Some(true);
            object.remove("nullable");
            let object: Map<String, Value> =
                object.into_iter().map(|(key, value)| (key, rewrite_nullable(value))).collect();
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
    let validator = jsonschema::options().with_draft(jsonschema::Draft::Draft4).build(&schema).expect("compiles");
    assert!(validator.is_valid(&json!({ "a": null })));
    assert!(validator.is_valid(&json!({ "a": "x" })));
    assert!(!validator.is_valid(&json!({ "a": 1 })), "a wrong type still fails");
}

#[test]
fn a_missing_specs_folder_fails_clearly() {
    let outcome = std::panic::catch_unwind(|| {
        // Through the loader's own check, not the environment (tests run in parallel).
        let dir = PathBuf::from("/nonexistent/specs");
        assert!(!dir.is_dir());
        Spec::load_from(&dir, "hcloud.json")
    });
    let message = outcome.err().and_then(|panic| panic.downcast::<String>().ok()).expect("a panic with a message");
    assert!(message.contains("/nonexistent/specs") && message.contains("CISCALE_SPECS_DIR"), "{message}");
}

#[test]
fn woodpecker_spec_finds_operations_and_rejects_wrong_bodies() {
    let spec = Spec::load("woodpecker-swagger.json");
    assert_eq!(spec.operation("GET", "/api/agents/12").expect("operation").template, "/agents/{agent_id}");
    assert_eq!(spec.operation("GET", "/api/agents/12/tasks").expect("operation").template, "/agents/{agent_id}/tasks");
    assert_eq!(spec.operation("GET", "/api/agents?page=2&perPage=50").expect("operation").template, "/agents");
    assert!(spec.operation("PUT", "/api/agents/12").is_err(), "no PUT on agents");
    assert!(spec.operation("GET", "/agents").is_err(), "outside the base path");
    assert!(
        spec.check_request("GET", "/api/agents", &[("no_such_parameter", "1")], None).is_err(),
        "an undeclared query parameter"
    );
    assert!(spec.check_request("GET", "/api/agents/three", &[], None).is_err(), "a path parameter of the wrong type");

    let agent = json!({ "id": 3, "name": "a", "no_schedule": false, "custom_labels": { "k": "v" } });
    spec.check_response("GET", "/api/agents/3", 200, Some(&agent)).expect("a valid agent");
    let wrong = json!({ "id": "three", "no_schedule": "no" });
    let error = spec.check_response("GET", "/api/agents/3", 200, Some(&wrong)).expect_err("a wrong agent");
    assert!(error.contains("/id") && error.contains("/no_schedule"), "{error}");
    // `$ref` into definitions resolves: a queue task's labels must be strings.
    let queue = json!({ "pending": [{ "id": "1", "labels": { "repo": 1 } }], "running": [] });
    assert!(spec.check_response("GET", "/api/queue/info", 200, Some(&queue)).is_err());
    assert!(spec.check_response("GET", "/api/queue/info", 418, Some(&json!({}))).is_err(), "undocumented status");
    spec.check_response("DELETE", "/api/agents/3", 200, None).expect("delete has no body");
    spec.check_request("PATCH", "/api/agents/3", &[], Some(&json!({ "no_schedule": true }))).expect("a valid patch");
    assert!(spec.check_request("PATCH", "/api/agents/3", &[], Some(&json!({ "no_schedule": "yes" }))).is_err());
}
