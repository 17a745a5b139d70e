//! HTTP to Forgejo: one request at a time, `Authorization: token …`, every failure read into the shared
//! [`Error`] vocabulary with a message that names the request and never a credential.

use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::wire::ApiError;
use super::{Scope, PROVIDER};
use crate::model::{AgentId, Secret};
use crate::providers::http::{self, error_chain, retry_after, ErrorAnswer};
use crate::providers::{Error, Result};

/// A Forgejo API call answers in milliseconds; 15 s total rides out a slow database without letting one hung
/// call hold a cycle (the poll interval is 10 s by default).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Error bodies are quoted up to this many characters.
const QUOTED_CHARS: usize = 200;

/// An answer that is not what the API documents.
#[derive(Debug, thiserror::Error)]
#[error("unexpected answer from `{endpoint}`: {detail}")]
pub struct BadResponse {
    pub endpoint: String,
    pub detail: String,
}

/// What a request is about, for the messages of its failures.
#[derive(Clone, Copy)]
pub(super) enum Subject<'a> {
    /// A list of the scope (404: the scope or the API is missing, not a record).
    Scope,
    /// One runner record (404: that runner is gone).
    Runner(&'a AgentId),
}

pub(super) struct Http {
    client: reqwest::Client,
    /// Without a trailing `/`.
    server: String,
    token: Secret,
    scope: Scope,
}

impl Http {
    pub fn new(server: &str, token: Secret, scope: Scope, timeout: Duration) -> Result<Self> {
        let client = crate::providers::http::client(PROVIDER, CONNECT_TIMEOUT, timeout)?;
        Ok(Self { client, server: server.trim_end_matches('/').to_owned(), token, scope })
    }

    /// `GET path`, decoded, with the answer's headers (pagination reads `X-Total-Count`).
    pub async fn get<T: DeserializeOwned>(&self, path: &str, subject: Subject<'_>) -> Result<(T, HeaderMap)> {
        let (bytes, headers) = self.send(Method::GET, path, None::<&()>, subject).await?;
        let value = decode(&endpoint_name(&Method::GET, path), &bytes, true)?;
        Ok((value, headers))
    }

    /// `POST path` with a JSON body; the answer is decoded without quoting it in errors (it may hold a token).
    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let (bytes, _) = self.send(Method::POST, path, Some(body), Subject::Scope).await?;
        decode(&endpoint_name(&Method::POST, path), &bytes, false)
    }

    pub async fn delete(&self, path: &str, subject: Subject<'_>) -> Result<()> {
        self.send(Method::DELETE, path, None::<&()>, subject).await.map(drop)
    }

    async fn send<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        subject: Subject<'_>,
    ) -> Result<(Vec<u8>, HeaderMap)> {
        let endpoint = endpoint_name(&method, path);
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.server))
            .header(reqwest::header::AUTHORIZATION, format!("token {}", self.token.expose()))
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|error| transport_error(&endpoint, &error))?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.map_err(|error| transport_error(&endpoint, &error))?;
        if status.is_success() {
            return Ok((bytes.to_vec(), headers));
        }
        let said = server_said(&bytes, self.token.expose());
        Err(status_error(&endpoint, status, retry_after(&headers), subject, &said, &self.scope))
    }
}

/// Decodes a JSON answer. `quote`: serde's message may quote the offending value, which is fine for lists of
/// jobs and runners but not for an answer that may hold a token; then only the position is told.
fn decode<T: DeserializeOwned>(endpoint: &str, bytes: &[u8], quote: bool) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|error| {
        let detail = if quote {
            error.to_string()
        } else {
            format!("not the documented JSON (line {}, column {})", error.line(), error.column())
        };
        Error::Other {
            provider: PROVIDER.to_owned(),
            source: Box::new(BadResponse { endpoint: endpoint.to_owned(), detail }),
        }
    })
}

/// `GET /api/v1/admin/actions/runners` style name of a request, for messages (no query string, no host).
pub(super) fn endpoint_name(method: &Method, path: &str) -> String {
    let path = path.split('?').next().unwrap_or(path);
    format!("{method} {path}")
}

/// What an error answer says: Forgejo's `{"message": …}`, else the body as text (a proxy's page), cut short and
/// with the token blanked out should anything in front of Forgejo echo the request.
fn server_said(body: &[u8], token: &str) -> String {
    let text = match serde_json::from_slice::<ApiError>(body) {
        Ok(ApiError { message: Some(message) }) => message,
        _ => String::from_utf8_lossy(body).into_owned(),
    };
    let text = if token.is_empty() { text } else { text.replace(token, "***") };
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut quoted: String = text.chars().take(QUOTED_CHARS).collect();
    if quoted.len() < text.len() {
        quoted.push('…');
    }
    quoted
}

fn transport_error(endpoint: &str, error: &reqwest::Error) -> Error {
    let why = if error.is_timeout() {
        "timed out".to_owned()
    } else if error.is_connect() {
        "cannot connect".to_owned()
    } else {
        // reqwest's text names the URL, which holds no secret (the token travels in a header).
        error_chain(error)
    };
    Error::Unavailable { provider: PROVIDER.to_owned(), message: format!("`{endpoint}` {why}") }
}

fn status_error(
    endpoint: &str,
    status: StatusCode,
    retry_after: Option<Duration>,
    subject: Subject<'_>,
    said: &str,
    scope: &Scope,
) -> Error {
    let provider = PROVIDER.to_owned();
    let answered = if said.is_empty() {
        format!("`{endpoint}` answered {status}")
    } else {
        format!("`{endpoint}` answered {status}: {said}")
    };
    match (status.as_u16(), subject) {
        (401, _) => Error::Unauthenticated {
            provider,
            message: format!(
                "the token was refused ({answered})\nhint: use a Forgejo access token (user settings → \
                 applications → generate new token) with {}",
                scope.token_permissions()
            ),
        },
        (403, _) => Error::Unauthenticated {
            provider,
            message: format!(
                "the token may not manage the runners of {} ({answered})\nhint: {}",
                scope.describe(),
                scope.rights_hint()
            ),
        },
        (404, Subject::Runner(id)) => Error::NotFound { what: format!("forgejo runner `{id}`") },
        (404, Subject::Scope) => Error::Invalid {
            provider,
            message: format!(
                "{answered}\nhint: check that `server` is the Forgejo URL and that {} exists; listing jobs needs \
                 Forgejo 15 or later",
                scope.describe()
            ),
        },
        // 409, 422, 429, 5xx and the rest as every HTTP provider reads them.
        _ => http::status_error(ErrorAnswer {
            provider: PROVIDER,
            status,
            retry_after,
            what: &format!("forgejo runner ({answered})"),
            message: &answered,
            credential_hint: "",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_are_quoted_short_and_without_the_token() {
        let token = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(
            server_said(
                br#"{"message":"token does not have at least one of required scope(s): [write:user]","url":"x"}"#,
                token
            ),
            "token does not have at least one of required scope(s): [write:user]"
        );
        let echoed = format!("<html>bad request\n  Authorization: token {token}</html>");
        let said = server_said(echoed.as_bytes(), token);
        assert!(!said.contains(token), "{said}");
        assert!(said.contains("Authorization: token ***"), "{said}");
        let long = "x".repeat(1000);
        assert_eq!(server_said(long.as_bytes(), token).chars().count(), QUOTED_CHARS + 1);
    }

    #[test]
    fn a_registration_answer_is_never_quoted() {
        let token = "e1f3d26e034687a2b6856c4c6c3d87a469ff3bea";
        let body = format!(r#"{{"id":"{token}","uuid":"u","token":"{token}"}}"#);
        let error = decode::<super::super::wire::Registered>("POST /x", body.as_bytes(), false)
            .err()
            .expect("an id must be a number");
        assert!(!error.to_string().contains(token), "{error}");
        assert!(!format!("{error:?}").contains(token), "{error:?}");
        assert!(error.to_string().contains("line 1"), "{error}");
    }
}
