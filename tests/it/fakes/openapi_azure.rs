//! A small, generic check of recorded HTTP exchanges against an OpenAPI 2 (Swagger) description, used to keep
//! the Azure DevOps fake (and the client talking to it) on the real wire format.
//!
//! For each exchange it finds the operations whose method and path template match (both `paths` and Azure's
//! `x-ms-paths`, whose keys carry a `?...` suffix to tell overloads apart) and checks, against at least one of
//! them: path parameters have the declared type; every query parameter sent is declared, with the declared type,
//! and every required one is sent (`api-version` included); a request body validates against the `body`
//! parameter's schema; a 200 answer validates against the response schema (JSON Schema draft 4 over the spec's
//! `definitions`, formats checked).
//!
//! One Azure quirk is built in: the spec describes list answers as bare arrays, but the service wraps every list
//! in `{"count": N, "value": [...]}`; for an array schema the check reads `value`.

use std::path::PathBuf;

use serde_json::{json, Map, Value};

use super::azure::Exchange;

/// The Azure task-agent spec, read from `../shared/specs` beside the repository.
pub fn azure_spec_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/specs/ado-taskAgent-7.1.json")
}

/// Loads the Azure spec; fails the test with a clear message when the specs folder is not there.
pub fn load_azure_spec() -> Swagger {
    let path = azure_spec_path();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|error| {
        panic!(
            "cannot read the Azure DevOps spec `{}` ({error}): the specs folder `shared/specs` must sit beside the \
             repository (it does in CI and in the workspace)",
            path.display()
        )
    });
    Swagger::from_text(&text).unwrap_or_else(|problem| panic!("`{}`: {problem}", path.display()))
}

#[derive(Debug)]
struct Operation {
    method: String,
    /// Path template split on `/`, e.g. `["{organization}", "_apis", ...]`.
    template: Vec<String>,
    /// The key it was found under (for messages).
    key: String,
    parameters: Vec<Value>,
    response_200: Option<Option<Value>>,
}

/// A Swagger 2 document, indexed for checking exchanges.
#[derive(Debug)]
pub struct Swagger {
    definitions: Value,
    operations: Vec<Operation>,
}

impl Swagger {
    pub fn from_text(text: &str) -> Result<Self, String> {
        // The Azure spec file starts with a UTF-8 byte-order mark, which JSON parsers refuse.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let document: Value = serde_json::from_str(text).map_err(|error| format!("not JSON: {error}"))?;
        if document.get("swagger").and_then(Value::as_str) != Some("2.0") {
            return Err("not a Swagger 2.0 document".to_owned());
        }
        let shared_parameters = document.get("parameters").cloned().unwrap_or(json!({}));
        let mut operations = Vec::new();
        for section in ["paths", "x-ms-paths"] {
            let Some(paths) = document.get(section).and_then(Value::as_object) else {
                continue;
            };
            for (key, item) in paths {
                let path = key.split('?').next().unwrap_or(key);
                let template: Vec<String> = path.trim_matches('/').split('/').map(str::to_owned).collect();
                let Some(item) = item.as_object() else { continue };
                let path_level: Vec<Value> = item
                    .get("parameters")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                for (method, operation) in item {
                    if !matches!(
                        method.as_str(),
                        "get" | "put" | "post" | "delete" | "patch" | "head" | "options"
                    ) {
                        continue;
                    }
                    let own = operation
                        .get("parameters")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default();
                    let parameters = path_level
                        .iter()
                        .chain(own.iter())
                        .map(|parameter| resolve_parameter(parameter, &shared_parameters))
                        .collect::<Result<Vec<_>, _>>()?;
                    let response_200 = operation
                        .get("responses")
                        .and_then(|responses| responses.get("200"))
                        .map(|response| response.get("schema").cloned());
                    operations.push(Operation {
                        method: method.to_ascii_uppercase(),
                        template: template.clone(),
                        key: format!("{section} {method} {key}"),
                        parameters,
                        response_200,
                    });
                }
            }
        }
        let definitions = document.get("definitions").cloned().unwrap_or(json!({}));
        Ok(Self {
            definitions,
            operations,
        })
    }

    /// Whether the spec describes this method and path at all.
    pub fn covers(&self, method: &str, path: &str) -> bool {
        let segments = split_path(path);
        self.operations
            .iter()
            .any(|operation| operation.method == method && template_matches(&operation.template, &segments))
    }

    /// Checks one exchange; `Err` lists what is wrong against every candidate operation.
    pub fn check(&self, exchange: &Exchange) -> Result<(), String> {
        let segments = split_path(&exchange.path);
        let candidates: Vec<&Operation> = self
            .operations
            .iter()
            .filter(|operation| operation.method == exchange.method && template_matches(&operation.template, &segments))
            .collect();
        if candidates.is_empty() {
            return Err(format!(
                "{} {}: no operation in the spec",
                exchange.method, exchange.path
            ));
        }
        let mut problems = Vec::new();
        for operation in candidates {
            match self.check_against(operation, &segments, exchange) {
                Ok(()) => return Ok(()),
                Err(found) => problems.push(format!("  against `{}`:\n    {}", operation.key, found.join("\n    "))),
            }
        }
        Err(format!(
            "{} {}:\n{}",
            exchange.method,
            exchange.path,
            problems.join("\n")
        ))
    }

    fn check_against(
        &self,
        operation: &Operation,
        segments: &[String],
        exchange: &Exchange,
    ) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        let of = |place: &'static str| {
            operation
                .parameters
                .iter()
                .filter(move |p| p.get("in").and_then(Value::as_str) == Some(place))
        };

        for (template, actual) in operation.template.iter().zip(segments) {
            let Some(name) = template.strip_prefix('{').and_then(|rest| rest.strip_suffix('}')) else {
                continue;
            };
            match of("path").find(|p| p.get("name").and_then(Value::as_str) == Some(name)) {
                Some(parameter) => {
                    if let Err(problem) = check_scalar(parameter, actual) {
                        problems.push(format!("path parameter `{name}` = `{actual}`: {problem}"));
                    }
                }
                None => problems.push(format!("path parameter `{name}` is not declared")),
            }
        }
        for (key, value) in &exchange.query {
            match of("query").find(|p| p.get("name").and_then(Value::as_str) == Some(key.as_str())) {
                Some(parameter) => {
                    if let Err(problem) = check_scalar(parameter, value) {
                        problems.push(format!("query parameter `{key}` = `{value}`: {problem}"));
                    }
                }
                None => problems.push(format!("query parameter `{key}` is not declared")),
            }
        }
        for required in of("query").filter(|p| p.get("required").and_then(Value::as_bool) == Some(true)) {
            let name = required.get("name").and_then(Value::as_str).unwrap_or_default();
            if !exchange.query.iter().any(|(key, _)| key == name) {
                problems.push(format!("required query parameter `{name}` is missing"));
            }
        }
        match (of("body").next(), &exchange.request_body) {
            (Some(parameter), Some(body)) => {
                if let Some(schema) = parameter.get("schema") {
                    problems.extend(
                        self.validate(schema, body)
                            .into_iter()
                            .map(|problem| format!("request body: {problem}")),
                    );
                }
            }
            (Some(parameter), None) if parameter.get("required").and_then(Value::as_bool) == Some(true) => {
                problems.push("the required request body is missing".to_owned());
            }
            (None, Some(_)) => problems.push("a request body is sent but none is declared".to_owned()),
            _ => {}
        }
        if exchange.status == 200 {
            match (&operation.response_200, &exchange.response_body) {
                (None, _) => problems.push("200 is not a declared response".to_owned()),
                (Some(Some(schema)), Some(body)) => {
                    let is_array = schema.get("type").and_then(Value::as_str) == Some("array");
                    let checked = if is_array {
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
                        self.validate(schema, checked)
                            .into_iter()
                            .map(|problem| format!("response: {problem}")),
                    );
                }
                (Some(Some(_)), None) => problems.push("the declared response body is missing".to_owned()),
                (Some(None), Some(body)) => problems.push(format!("an undeclared response body is sent: {body}")),
                (Some(None), None) => {}
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// Validates `instance` against a schema of this spec (its `$ref`s resolved in `definitions`).
    pub fn validate(&self, schema: &Value, instance: &Value) -> Vec<String> {
        let mut root: Map<String, Value> = schema.as_object().cloned().unwrap_or_default();
        root.insert("definitions".to_owned(), self.definitions.clone());
        let validator = match jsonschema::draft4::options()
            .should_validate_formats(true)
            .build(&Value::Object(root))
        {
            Ok(validator) => validator,
            Err(error) => return vec![format!("the spec's schema does not compile: {error}")],
        };
        validator
            .iter_errors(instance)
            .map(|error| format!("{} at `{}`", error, error.instance_path))
            .collect()
    }

    /// The schema of a named definition, as a `$ref` (for parts of the API the spec leaves out).
    pub fn definition(&self, name: &str) -> Value {
        assert!(
            self.definitions.get(name).is_some(),
            "the spec has no definition `{name}`"
        );
        json!({ "$ref": format!("#/definitions/{name}") })
    }
}

fn split_path(path: &str) -> Vec<String> {
    path.split('?')
        .next()
        .unwrap_or(path)
        .trim_matches('/')
        .split('/')
        .map(str::to_owned)
        .collect()
}

fn template_matches(template: &[String], segments: &[String]) -> bool {
    template.len() == segments.len()
        && template
            .iter()
            .zip(segments)
            .all(|(part, actual)| (part.starts_with('{') && part.ends_with('}')) || part == actual)
}

fn resolve_parameter(parameter: &Value, shared: &Value) -> Result<Value, String> {
    match parameter.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let name = reference
                .strip_prefix("#/parameters/")
                .ok_or_else(|| format!("unsupported `$ref` {reference}"))?;
            shared
                .get(name)
                .cloned()
                .ok_or_else(|| format!("unresolved `$ref` {reference}"))
        }
        None => Ok(parameter.clone()),
    }
}

/// A path or query value against a non-body parameter's `type`/`format`/`enum`.
fn check_scalar(parameter: &Value, value: &str) -> Result<(), String> {
    let kind = parameter.get("type").and_then(Value::as_str).unwrap_or("string");
    let format = parameter.get("format").and_then(Value::as_str);
    match (kind, format) {
        ("integer", Some("int32")) => value
            .parse::<i32>()
            .map(|_| ())
            .map_err(|_| "not an int32".to_owned())?,
        ("integer", _) => value
            .parse::<i64>()
            .map(|_| ())
            .map_err(|_| "not an integer".to_owned())?,
        ("boolean", _) if !matches!(value, "true" | "false") => return Err("not `true`/`false`".to_owned()),
        _ => {}
    }
    if let Some(allowed) = parameter.get("enum").and_then(Value::as_array) {
        if !allowed.iter().any(|candidate| candidate.as_str() == Some(value)) {
            return Err(format!("not one of {allowed:?}"));
        }
    }
    Ok(())
}
