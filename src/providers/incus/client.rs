//! The Incus REST API over its unix socket: one request = one fresh connection, the JSON envelope
//! (`sync`/`async`/`error`), operations waited on with a bound, and HTTP/Incus errors mapped onto
//! [`providers::Error`](crate::providers::Error).
//!
//! Why no connection pool: a pooled keep-alive client (hyper-util's legacy client with its default pool) on the
//! Incus socket made incusd 6.0.4 hang instance starts and stops in 40–70 % of runs on our machines; a fresh
//! connection per request passed every run. A unix-socket connect costs microseconds, so nothing is lost. That is
//! also why `hyperlocal` is not used: its value is a pooled `Client` connector, and we hand-shake each
//! connection ourselves with `hyper::client::conn::http1`.

use std::time::Duration;

use bytes_body::Body;
use http_body_util::BodyExt as _;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Deserialize;
use serde_json::Value;
use tokio::net::UnixStream;

use crate::providers::Error;

pub(crate) const PROVIDER: &str = "incus";

/// Characters left as they are in a query value; everything else is percent-encoded.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// Percent-encodes one query or path value.
pub(crate) fn encode(value: &str) -> String {
    utf8_percent_encode(value, QUERY_VALUE).to_string()
}

/// An Incus list filter `key eq value`. incusd 6.0.4 refuses a quoted value without whitespace ("unterminated
/// quote") and compares a single-quoted one with its quotes, so values are quoted only when they must be.
pub(crate) fn filter_eq(key: &str, value: &str) -> String {
    if value.chars().any(char::is_whitespace) {
        format!("{key} eq \"{}\"", value.replace('"', "\\\""))
    } else {
        format!("{key} eq {value}")
    }
}

mod bytes_body {
    /// A whole request body in memory (JSON, a pushed file): Incus bodies are small.
    pub type Body = http_body_util::Full<hyper::body::Bytes>;
}

/// A request to the Incus API.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    pub method: Method,
    /// Path and query, starting with `/1.0`; the project is appended by [`Client::send`].
    pub path: String,
    pub body: Vec<u8>,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
}

impl Call {
    pub fn get(path: impl Into<String>) -> Self {
        Self { method: Method::GET, path: path.into(), body: Vec::new(), content_type: "", headers: Vec::new() }
    }
    pub fn delete(path: impl Into<String>) -> Self {
        Self { method: Method::DELETE, ..Self::get(path) }
    }
    pub fn json(method: Method, path: impl Into<String>, body: &Value) -> Self {
        Self {
            method,
            path: path.into(),
            body: body.to_string().into_bytes(),
            content_type: "application/json",
            headers: Vec::new(),
        }
    }
}

/// The parts of Incus's response envelope ciscale reads.
#[derive(Debug, Deserialize)]
struct Envelope {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_code: u16,
    #[serde(default)]
    operation: String,
    #[serde(default)]
    metadata: Value,
}

/// A finished request: `metadata` of a sync response, or the operation path of an async one.
#[derive(Debug)]
pub(crate) enum Reply {
    Sync(Value),
    Async { operation: String },
}

impl Reply {
    pub fn into_sync(self) -> Value {
        match self {
            Reply::Sync(value) => value,
            Reply::Async { .. } => Value::Null,
        }
    }
}

/// Connection settings of one Incus server; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    pub socket: std::path::PathBuf,
    pub project: Option<String>,
    /// Bound on one HTTP request (connect + response).
    pub request_timeout: Duration,
}

impl Client {
    /// Adds `project=` to a path when a project is configured.
    pub fn with_project(&self, path: &str) -> String {
        match &self.project {
            Some(project) => {
                let separator = if path.contains('?') { '&' } else { '?' };
                format!("{path}{separator}project={}", encode(project))
            }
            None => path.to_owned(),
        }
    }

    /// Sends one request on a fresh connection and decodes Incus's envelope.
    pub async fn send(&self, call: Call) -> Result<Reply, Error> {
        self.send_with_timeout(call, self.request_timeout).await
    }

    pub async fn send_with_timeout(&self, call: Call, timeout: Duration) -> Result<Reply, Error> {
        let what = format!("{} {}", call.method, call.path);
        let (status, body) = match tokio::time::timeout(timeout, self.round_trip(call)).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(Error::Unavailable {
                    provider: PROVIDER.into(),
                    message: format!("`{what}` timed out after {}s", timeout.as_secs_f64()),
                })
            }
        };
        let envelope: Envelope = serde_json::from_slice(&body).map_err(|error| Error::Other {
            provider: PROVIDER.into(),
            source: format!("`{what}` answered {status} with a body that is not Incus JSON: {error}").into(),
        })?;
        if envelope.kind == "error" || !status.is_success() {
            let code = if envelope.error_code != 0 { envelope.error_code } else { status.as_u16() };
            return Err(map_error(code, &envelope.error, &what));
        }
        if envelope.kind == "async" {
            return Ok(Reply::Async { operation: envelope.operation });
        }
        Ok(Reply::Sync(envelope.metadata))
    }

    async fn round_trip(&self, call: Call) -> Result<(StatusCode, Vec<u8>), Error> {
        let unavailable = |message: String| Error::Unavailable { provider: PROVIDER.into(), message };
        let stream = UnixStream::connect(&self.socket).await.map_err(|error| {
            unavailable(format!(
                "cannot connect to `{}`: {error}\nhint: is `incusd` running and may this user open its socket?",
                self.socket.display()
            ))
        })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|error| unavailable(format!("handshake on `{}`: {error}", self.socket.display())))?;
        // The connection task ends when the response is read and the sender is dropped: nothing is pooled.
        let driver = tokio::spawn(async move {
            drop(connection.await);
        });
        let mut request = Request::builder()
            .method(call.method.clone())
            .uri(self.with_project(&call.path))
            .header(hyper::header::HOST, "incus");
        if !call.content_type.is_empty() {
            request = request.header(CONTENT_TYPE, call.content_type);
        }
        for (name, value) in &call.headers {
            let value = HeaderValue::from_str(value).map_err(|_| Error::Invalid {
                provider: PROVIDER.into(),
                message: format!("header `{name}` has a value HTTP cannot carry"),
            })?;
            request = request.header(HeaderName::from_static(name), value);
        }
        let request = request.body(Body::from(call.body)).map_err(|error| Error::Invalid {
            provider: PROVIDER.into(),
            message: format!("cannot build request `{}`: {error}", call.path),
        })?;
        let response =
            sender.send_request(request).await.map_err(|error| unavailable(format!("`{}`: {error}", call.path)))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|error| unavailable(format!("reading `{}`: {error}", call.path)))?
            .to_bytes()
            .to_vec();
        drop(sender);
        driver.abort();
        Ok((status, body))
    }

    /// Waits for an operation to finish (server-side long poll, bounded by `timeout`) and returns its metadata.
    /// A failed operation maps its message like an error response.
    pub async fn wait(&self, operation: &str, timeout: Duration) -> Result<Value, Error> {
        let secs = timeout.as_secs().max(1);
        let call = Call::get(format!("{operation}/wait?timeout={secs}"));
        // The HTTP bound is the server's wait plus slack, so the server answers first when it can.
        let reply = self.send_with_timeout(call, timeout + Duration::from_secs(10)).await?;
        let operation_body = reply.into_sync();
        let status = operation_body.get("status").and_then(Value::as_str).unwrap_or_default();
        match status {
            "Success" => Ok(operation_body.get("metadata").cloned().unwrap_or(Value::Null)),
            "Failure" | "Cancelled" => {
                let message = operation_body.get("err").and_then(Value::as_str).unwrap_or("operation failed");
                let description = operation_body.get("description").and_then(Value::as_str).unwrap_or("operation");
                Err(map_error(500, message, &description.to_lowercase()))
            }
            _ => Err(Error::Unavailable {
                provider: PROVIDER.into(),
                message: format!("operation `{operation}` still {status:?} after {secs}s"),
            }),
        }
    }

    /// Sends a call and, if it started an operation, waits for it.
    pub async fn send_and_wait(&self, call: Call, timeout: Duration) -> Result<Value, Error> {
        match self.send(call).await? {
            Reply::Sync(metadata) => Ok(metadata),
            Reply::Async { operation } => self.wait(&operation, timeout).await,
        }
    }
}

/// Incus reports most failures as 500 with a message; the messages that mean "missing" or "exists" are mapped
/// onto those variants so callers can treat them as done.
pub(crate) fn map_error(code: u16, message: &str, what: &str) -> Error {
    let lower = message.to_lowercase();
    let text = if message.is_empty() { format!("`{what}` failed with {code}") } else { format!("{what}: {message}") };
    if code == 404 || lower.contains("not found") {
        return Error::NotFound { what: format!("incus: {message}") };
    }
    if code == 409 || lower.contains("already exists") || lower.contains("unique constraint failed") {
        return Error::AlreadyExists { what: format!("incus: {message}") };
    }
    // An instance still busy with another operation (a create a killed ciscale started keeps running
    // server-side) is worth retrying, not a rejection.
    if lower.contains("is busy running") {
        return Error::Unavailable { provider: PROVIDER.into(), message: text };
    }
    match code {
        401 | 403 => Error::Unauthenticated { provider: PROVIDER.into(), message: text },
        429 => Error::RateLimited { provider: PROVIDER.into(), retry_after: None },
        400 => Error::Invalid { provider: PROVIDER.into(), message: text },
        503 | 504 => Error::Unavailable { provider: PROVIDER.into(), message: text },
        _ if lower.contains("no space left") || lower.contains("out of memory") => {
            Error::Capacity { provider: PROVIDER.into(), message: text }
        }
        _ if (500..600).contains(&code) => Error::Invalid { provider: PROVIDER.into(), message: text },
        _ => Error::Other { provider: PROVIDER.into(), source: text.into() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_incus_messages_onto_provider_errors() {
        assert!(matches!(map_error(404, "Instance not found", "get"), Error::NotFound { .. }));
        assert!(matches!(
            map_error(500, "Add instance info to the database: UNIQUE constraint failed: instances.name", "create"),
            Error::AlreadyExists { .. }
        ));
        assert!(matches!(map_error(403, "not authorized", "get"), Error::Unauthenticated { .. }));
        assert!(matches!(map_error(503, "shutting down", "get"), Error::Unavailable { .. }));
        assert!(matches!(map_error(500, "Image not provided for instance creation", "create"), Error::Invalid { .. }));
    }

    #[test]
    fn project_is_appended_encoded() {
        let client =
            Client { socket: "/x".into(), project: Some("c i".into()), request_timeout: Duration::from_secs(1) };
        assert_eq!(client.with_project("/1.0/instances"), "/1.0/instances?project=c%20i");
        assert_eq!(client.with_project("/1.0/instances?recursion=1"), "/1.0/instances?recursion=1&project=c%20i");
    }
}
