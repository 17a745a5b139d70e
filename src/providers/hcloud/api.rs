//! The HTTP exchange with the Hetzner Cloud API: one request, a timeout, and the mapping of every failure onto
//! [`providers::Error`](crate::providers::Error).
//!
//! Bodies are the `hcloud` crate's models (they track the official API). Requests are sent with reqwest
//! directly rather than through the crate's `apis::*` functions because those drop the response headers: a 429
//! would lose `Retry-After` / `RateLimit-Reset`, which the retry logic and the watch loop's backoff need, and they
//! fold every non-2xx answer into one error kind. The crate's `Configuration` would add nothing else here (its
//! `base_path_mapping` is exactly our `endpoint`), and its derived `Debug` prints the bearer token.

use std::fmt;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::model::Secret;
use crate::providers::http::retry_after;
use crate::providers::http::{status_error, ErrorAnswer};
use crate::providers::Error;

pub(super) const PROVIDER: &str = "hcloud";
const TOKEN_HINT: &str = "hint: check the project API token (it needs read & write)";

/// What Hetzner answered when a request failed: the `error` object of its error response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ApiFailure {
    pub status: StatusCode,
    /// Hetzner's error code (`resource_unavailable`, `uniqueness_error`, ...); empty when the body had none.
    pub code: String,
    pub message: String,
}

/// An answer ciscale could not use (malformed JSON, a body of the wrong shape). Never carries the body: a create
/// response holds the root password.
#[derive(Debug, thiserror::Error)]
#[error("unreadable response to `{request}`: {detail}")]
pub(super) struct Unreadable {
    pub request: String,
    pub detail: String,
}

/// The HTTP client of one Hetzner project.
#[derive(Clone)]
pub(super) struct Api {
    client: reqwest::Client,
    /// The API root without a trailing slash, e.g. `https://api.hetzner.cloud/v1`.
    endpoint: String,
    token: Secret,
    timeout: Duration,
}

impl fmt::Debug for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Api")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// How a request failed, before it is mapped onto the shared error type (the create fallback needs the code).
pub(super) enum Failure {
    Api(ApiFailure, Option<Duration>),
    Mapped(Error),
}

impl Failure {
    pub fn into_error(self, what: &str) -> Error {
        match self {
            Failure::Api(failure, retry_after) => map_failure(&failure, retry_after, what),
            Failure::Mapped(error) => error,
        }
    }
}

impl Api {
    pub fn new(endpoint: &str, token: Secret, timeout: Duration) -> Result<Self, Error> {
        let client = crate::providers::http::client(PROVIDER, timeout.min(Duration::from_secs(10)), timeout)?;
        Ok(Self { client, endpoint: endpoint.trim_end_matches('/').to_owned(), token, timeout })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Sends one request and decodes a 2xx body as `T`; any other answer is a [`Failure`].
    pub async fn send<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&dyn ErasedBody>,
    ) -> Result<T, Failure> {
        let request_name = format!("{method} {path}");
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.endpoint))
            .bearer_auth(self.token.expose())
            .query(query);
        if let Some(body) = body {
            request = request.header(reqwest::header::CONTENT_TYPE, "application/json").body(body.to_json());
        }
        let response = request.send().await.map_err(|error| Failure::Mapped(self.transport(&request_name, &error)))?;
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.map_err(|error| Failure::Mapped(self.transport(&request_name, &error)))?;
        if status.is_success() {
            return serde_json::from_str(&text).map_err(|error| {
                Failure::Mapped(Error::Other {
                    provider: PROVIDER.to_owned(),
                    source: Box::new(Unreadable { request: request_name, detail: error.to_string() }),
                })
            });
        }
        let (code, message) = match serde_json::from_str::<hcloud::models::ErrorResponse>(&text) {
            Ok(body) => (body.error.code, body.error.message),
            Err(_) => (String::new(), format!("HTTP {status} without an error body")),
        };
        let retry_after = (status == StatusCode::TOO_MANY_REQUESTS).then(|| retry_after(&headers)).flatten();
        Err(Failure::Api(ApiFailure { status, code, message }, retry_after))
    }

    /// A request that never got an answer. reqwest's message names the URL, never the header holding the token.
    fn transport(&self, request: &str, error: &reqwest::Error) -> Error {
        let message = if error.is_timeout() {
            format!("`{request}` to `{}` timed out after {}s", self.endpoint, self.timeout.as_secs_f64())
        } else {
            crate::providers::http::transport_message(request, error)
        };
        Error::Unavailable { provider: PROVIDER.to_owned(), message }
    }
}

/// A JSON body, object-safe so `send` takes any model.
pub(super) trait ErasedBody: Sync {
    fn to_json(&self) -> Vec<u8>;
}

impl<T: Serialize + Sync> ErasedBody for T {
    fn to_json(&self) -> Vec<u8> {
        // Serialising the crate's plain models cannot fail (string keys, no custom serialisers).
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Codes meaning "this server type / location has no room right now": the create fallback tries the next
/// candidate on these.
pub(super) fn is_capacity(failure: &ApiFailure) -> bool {
    matches!(failure.code.as_str(), "resource_unavailable" | "placement_error" | "resource_limit_exceeded")
        || (failure.code == "invalid_input" && failure.message.contains("unsupported location for server type"))
}

/// Hetzner's answer in the shared error vocabulary. The code decides where it is more precise than the status.
pub(super) fn map_failure(failure: &ApiFailure, retry_after: Option<Duration>, what: &str) -> Error {
    let provider = PROVIDER.to_owned();
    let message = format!("{} ({})", failure.message, if failure.code.is_empty() { "no code" } else { &failure.code });
    if is_capacity(failure) {
        return Error::Capacity { provider, message };
    }
    match failure.code.as_str() {
        "uniqueness_error" => return Error::AlreadyExists { what: what.to_owned() },
        "not_found" => return Error::NotFound { what: what.to_owned() },
        "rate_limit_exceeded" => return Error::RateLimited { provider, retry_after },
        "unauthorized" | "forbidden" | "token_readonly" => {
            return Error::Unauthenticated { provider, message: format!("{message}\n{TOKEN_HINT}") }
        }
        // The resource is busy with another action, or the API is in maintenance: the same call works later.
        "locked" | "conflict" | "maintenance" | "timeout" | "server_error" | "service_error" | "unavailable" => {
            return Error::Unavailable { provider, message }
        }
        _ => {}
    }
    status_error(ErrorAnswer {
        provider: PROVIDER,
        status: failure.status,
        retry_after,
        what,
        message: &message,
        credential_hint: TOKEN_HINT,
    })
}

#[cfg(test)]
mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use reqwest::header::{HeaderMap, RETRY_AFTER};

    use super::*;

    fn failure(status: u16, code: &str) -> ApiFailure {
        ApiFailure {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::IM_A_TEAPOT),
            code: code.to_owned(),
            message: "m".to_owned(),
        }
    }

    #[test]
    fn codes_win_over_statuses() {
        assert!(matches!(map_failure(&failure(412, "resource_unavailable"), None, "x"), Error::Capacity { .. }));
        assert!(matches!(map_failure(&failure(409, "uniqueness_error"), None, "x"), Error::AlreadyExists { .. }));
        assert!(matches!(map_failure(&failure(409, "conflict"), None, "x"), Error::Unavailable { .. }));
        assert!(matches!(map_failure(&failure(423, "locked"), None, "x"), Error::Unavailable { .. }));
        assert!(matches!(map_failure(&failure(422, "invalid_input"), None, "x"), Error::Invalid { .. }));
        assert!(matches!(map_failure(&failure(401, ""), None, "x"), Error::Unauthenticated { .. }));
        assert!(matches!(map_failure(&failure(502, ""), None, "x"), Error::Unavailable { .. }));
        let limited = map_failure(&failure(429, "rate_limit_exceeded"), Some(Duration::from_secs(7)), "x");
        assert!(matches!(limited, Error::RateLimited { retry_after: Some(wait), .. } if wait.as_secs() == 7));
    }

    #[test]
    fn retry_after_reads_either_header() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "12".parse().expect("header"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(12)));
        let mut headers = HeaderMap::new();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        headers.insert("ratelimit-reset", (now + 30).to_string().parse().expect("header"));
        let wait = retry_after(&headers).map(|d| d.as_secs());
        assert!(matches!(wait, Some(29..=30)), "{wait:?}");
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }
}
