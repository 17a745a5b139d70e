//! One HTTP exchange with Azure DevOps: the request (Basic auth with an empty user and the PAT, `api-version`,
//! a timeout) and the mapping of every answer onto [`providers::Error`](crate::providers::Error).
//!
//! Azure answers a bad or expired PAT in three ways depending on the endpoint and the client: `401`, a `302` to
//! the sign-in page, or `203 Non-Authoritative Information` with that sign-in page as HTML. Redirects are not
//! followed, and all three are [`Error::Unauthenticated`]. Rate limiting (Azure's "global consumption" limits)
//! comes as `429` with `Retry-After`, announced earlier by `X-RateLimit-*` headers on successful answers.

use std::time::Duration;

use reqwest::header::{HeaderMap, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;

use crate::model::Secret;
use crate::providers::http::retry_after;
use crate::providers::http::{self, status_error, ErrorAnswer};
use crate::providers::{Error, Result};

pub(super) const PROVIDER: &str = "azure-pipelines";
/// The REST API version every call asks for.
pub const API_VERSION: &str = "7.1";
/// Warn when fewer than this share of the rate-limit budget is left (Azure's `X-RateLimit-Remaining` of
/// `X-RateLimit-Limit`): early enough to lengthen `pollInterval` before requests get delayed or refused.
const LOW_REMAINING_SHARE: f64 = 0.1;
/// How much of an error body goes into a message: Azure's JSON errors are short; an HTML page is not shown.
const MAX_MESSAGE_CHARS: usize = 300;

/// What went wrong beyond the shared variants (carried in [`Error::Other`]). Never holds the PAT.
#[derive(Debug, thiserror::Error)]
pub enum AzureError {
    #[error("could not read the answer to {what}: {source}")]
    Decode {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("organization URL `{url}` is not a usable base URL\nhint: write it like `https://dev.azure.com/ORG`")]
    BadUrl { url: String },
    #[error("could not set up the HTTP client: {source}")]
    Client {
        #[source]
        source: reqwest::Error,
    },
}

/// The PAT-authenticated HTTP client of one organization.
pub(super) struct Http {
    client: reqwest::Client,
    /// The organization URL, always ending in `/` so path segments append.
    base: Url,
    pat: Secret,
    timeout: Duration,
}

impl std::fmt::Debug for Http {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http")
            .field("base", &self.base.as_str())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// A successful answer's body.
pub(super) struct Answer {
    body: Vec<u8>,
    what: String,
}

impl Answer {
    pub(super) fn json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.body)
            .map_err(|source| other(AzureError::Decode { what: self.what.clone(), source }))
    }
}

pub(super) fn other(error: AzureError) -> Error {
    Error::Other { provider: PROVIDER.to_owned(), source: Box::new(error) }
}

impl Http {
    pub(super) fn new(organization_url: &str, pat: Secret, timeout: Duration) -> Result<Self> {
        let bad_url = || other(AzureError::BadUrl { url: organization_url.to_owned() });
        let base = crate::providers::http::base_url(organization_url).ok_or_else(bad_url)?;
        let client = crate::providers::http::client_builder(timeout.min(Duration::from_secs(10)), timeout)
            // A bad PAT is answered with a redirect to the sign-in page: seeing it is how we know.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|source| other(AzureError::Client { source }))?;
        Ok(Self { client, base, pat, timeout })
    }

    /// The PAT the client authenticates with.
    pub(super) fn pat(&self) -> &Secret {
        &self.pat
    }

    /// The organization URL as configured (normalised, with a trailing `/`).
    pub(super) fn base(&self) -> &Url {
        &self.base
    }

    /// `{org}/_apis/distributedtask/{segments...}?{query}&api-version=7.1`.
    fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(["_apis", "distributedtask"]).extend(segments);
        }
        {
            let mut pairs = url.query_pairs_mut();
            for (key, value) in query {
                pairs.append_pair(key, value);
            }
            pairs.append_pair("api-version", API_VERSION);
        }
        url
    }

    /// Sends one request; `what` names it in errors (`agents of pool 7`). Any non-success is mapped to the
    /// shared error variants, with `not_found` naming what a 404 means.
    pub(super) async fn call(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<&serde_json::Value>,
        what: &str,
        not_found: &str,
    ) -> Result<Answer> {
        let url = self.url(segments, query);
        let mut request = self.client.request(method.clone(), url).basic_auth("", Some(self.pat.expose()));
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|error| self.transport_error(&error, what))?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await.map_err(|error| self.transport_error(&error, what))?.to_vec();
        tracing::debug!(%method, what, status = status.as_u16(), "azure devops call");
        warn_on_rate_limit_headers(&headers, status);
        map_status(status, &headers, &body, what, not_found)?;
        Ok(Answer { body, what: what.to_owned() })
    }

    fn transport_error(&self, error: &reqwest::Error, what: &str) -> Error {
        let message = if error.is_timeout() {
            format!("{what}: no answer within {}s from `{}`", self.timeout.as_secs_f64(), self.base)
        } else {
            // The URL holds no credential: the PAT travels in a header.
            let url = http::shown_url(error).map(|url| format!(" (`{url}`)")).unwrap_or_default();
            format!("{what}{url}: {}", http::transport_reason(error))
        };
        Error::Unavailable { provider: PROVIDER.to_owned(), message }
    }
}

/// Azure announces throttling before refusing: `Retry-After` on a successful answer means requests are being
/// delayed, and `X-RateLimit-Remaining` says how much of the budget is left.
fn warn_on_rate_limit_headers(headers: &HeaderMap, status: StatusCode) {
    if status == StatusCode::TOO_MANY_REQUESTS {
        return;
    }
    let number = |name: &str| -> Option<f64> { headers.get(name)?.to_str().ok()?.trim().parse().ok() };
    if status.is_success() && headers.contains_key(RETRY_AFTER) {
        tracing::warn!(
            retry_after_secs = retry_after(headers).map(|wait| wait.as_secs()),
            "azure devops is delaying ciscale's requests (rate limit)\nhint: lengthen `pollInterval`"
        );
    }
    if let Some(remaining) = number("x-ratelimit-remaining") {
        let low = match number("x-ratelimit-limit") {
            Some(limit) if limit > 0.0 => remaining / limit < LOW_REMAINING_SHARE,
            _ => remaining <= 0.0,
        };
        if low {
            tracing::warn!(
                remaining,
                limit = number("x-ratelimit-limit"),
                resource = headers.get("x-ratelimit-resource").and_then(|value| value.to_str().ok()),
                "azure devops rate-limit budget is nearly used up\nhint: lengthen `pollInterval`"
            );
        }
    }
}

/// Maps an HTTP status (and, for 2xx, the content type) onto the shared error variants.
pub(crate) fn map_status(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    what: &str,
    not_found: &str,
) -> Result<()> {
    let provider = || PROVIDER.to_owned();
    let bad_pat_hint = "hint: check the PAT (expired? scope \"Agent Pools (read, manage)\"?) and the organization URL";
    let is_html = headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.to_ascii_lowercase().contains("text/html"));
    match status.as_u16() {
        203 => Err(Error::Unauthenticated {
            provider: provider(),
            message: format!("{what}: answered with a sign-in page (203)\n{bad_pat_hint}"),
        }),
        200..=299 if is_html => Err(Error::Unauthenticated {
            provider: provider(),
            message: format!("{what}: answered with an HTML page instead of JSON (a sign-in page?)\n{bad_pat_hint}"),
        }),
        200..=299 => Ok(()),
        300..=399 => Err(Error::Unauthenticated {
            provider: provider(),
            message: format!("{what}: redirected ({}) to the sign-in page\n{bad_pat_hint}", status.as_u16()),
        }),
        _ => Err(status_error(ErrorAnswer {
            provider: PROVIDER,
            status,
            retry_after: retry_after(headers),
            what: not_found,
            message: &format!("{what}: {}{}", status, server_message(body, is_html)),
            credential_hint: bad_pat_hint,
        })),
    }
}

/// `: <message>` from Azure's JSON error body (`{"message": "...", "typeKey": "..."}`), or nothing.
fn server_message(body: &[u8], is_html: bool) -> String {
    if is_html {
        return String::new();
    }
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|value| value.get("message").and_then(|message| message.as_str()).map(str::to_owned));
    match message {
        Some(message) if !message.trim().is_empty() => {
            let mut message: String = message.trim().chars().take(MAX_MESSAGE_CHARS).collect();
            if message.ends_with('.') {
                message.pop();
            }
            format!(": {message}")
        }
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).expect("header value"));
        }
        map
    }

    #[test]
    fn statuses_map_onto_the_shared_variants() {
        let none = HeaderMap::new();
        let map = |code: u16, headers: &HeaderMap, body: &str| {
            map_status(
                StatusCode::from_u16(code).expect("status"),
                headers,
                body.as_bytes(),
                "agents of pool 1",
                "agent `5`",
            )
        };
        assert!(map(200, &none, "{}").is_ok());
        assert!(map(204, &none, "").is_ok());
        assert!(matches!(map(203, &none, "<html>"), Err(Error::Unauthenticated { .. })));
        let html = headers(&[("content-type", "text/html; charset=utf-8")]);
        assert!(matches!(map(200, &html, "<html>sign in</html>"), Err(Error::Unauthenticated { .. })));
        assert!(matches!(map(302, &none, ""), Err(Error::Unauthenticated { .. })));
        assert!(matches!(map(401, &none, ""), Err(Error::Unauthenticated { .. })));
        assert!(matches!(map(403, &none, ""), Err(Error::Unauthenticated { .. })));
        assert!(matches!(map(404, &none, ""), Err(Error::NotFound { what }) if what == "agent `5`"));
        assert!(matches!(map(409, &none, ""), Err(Error::AlreadyExists { .. })));
        let limited = headers(&[("retry-after", "7")]);
        assert!(matches!(
            map(429, &limited, ""),
            Err(Error::RateLimited { retry_after: Some(wait), .. }) if wait == Duration::from_secs(7)
        ));
        assert!(matches!(map(429, &none, ""), Err(Error::RateLimited { retry_after: None, .. })));
        assert!(matches!(map(503, &none, ""), Err(Error::Unavailable { .. })));
        let invalid = map(400, &none, r#"{"message": "The agent name is invalid.", "typeKey": "X"}"#);
        match invalid {
            Err(Error::Invalid { message, .. }) => {
                assert_eq!(message, "agents of pool 1: 400 Bad Request: The agent name is invalid")
            }
            other => panic!("400: {other:?}"),
        }
    }

    #[test]
    fn retry_after_from_seconds_or_reset() {
        assert_eq!(retry_after(&headers(&[("retry-after", "30")])), Some(Duration::from_secs(30)));
        let reset = jiff::Timestamp::now().as_second() + 120;
        let from_reset = retry_after(&headers(&[("x-ratelimit-reset", &reset.to_string())])).expect("reset");
        assert!(from_reset <= Duration::from_secs(120) && from_reset >= Duration::from_secs(100), "{from_reset:?}");
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")])), None);
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }

    #[test]
    fn urls_append_to_the_organization_path() {
        let http = Http::new("https://dev.azure.com/acme", Secret::new("x"), Duration::from_secs(1)).expect("http");
        let url = http.url(&["pools"], &[("poolName", "my pool")]);
        assert_eq!(
            url.as_str(),
            "https://dev.azure.com/acme/_apis/distributedtask/pools?poolName=my+pool&api-version=7.1"
        );
        let server =
            Http::new("http://tfs:8080/tfs/Collection/", Secret::new("x"), Duration::from_secs(1)).expect("http");
        assert_eq!(
            server.url(&["pools", "3", "agents", "5"], &[]).as_str(),
            "http://tfs:8080/tfs/Collection/_apis/distributedtask/pools/3/agents/5?api-version=7.1"
        );
        assert!(Http::new("not a url", Secret::new("x"), Duration::from_secs(1)).is_err());
        assert!(Http::new("mailto:a@b", Secret::new("x"), Duration::from_secs(1)).is_err());
    }
}
