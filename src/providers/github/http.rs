//! The HTTP side of the GitHub source: authenticated requests, conditional requests, rate limits, pagination,
//! and the mapping of every answer onto [`providers::Error`](crate::providers::Error).
//!
//! # Conditional requests
//! Every `GET` remembers the answer's `ETag` and body per URL and sends `If-None-Match` the next time. GitHub
//! answers `304 Not Modified` when nothing changed, and a 304 to an authorised conditional request does not count
//! against the primary rate limit, so an idle poll costs next to nothing of the hourly budget. The remembered
//! answers are pruned: one not used for a few observations (a finished run's jobs) is dropped
//! ([`Http::prune`]).
//!
//! # Rate limits
//! - Primary: `X-RateLimit-Limit/Remaining/Used/Reset/Resource` on every answer are kept ([`RateBudget`], the
//!   remaining budget for metrics). An answer with `X-RateLimit-Remaining: 0` (403 or 429) blocks every further
//!   call until `X-RateLimit-Reset`: GitHub may ban an integration that keeps calling while limited.
//! - Secondary (too many requests per minute or at once): 403 or 429 with `Retry-After`, or without it but saying
//!   "rate limit" — then GitHub asks for at least a minute. Calls are blocked for that long.
//! Both become [`Error::RateLimited`] with the wait, so a retry or the next cycle waits it out. A blocked call is
//! refused here, without a request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use reqwest::header::{HeaderMap, ACCEPT, ETAG, IF_NONE_MATCH, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;

use super::auth::{expiry, needs_renewal, CachedToken, Credentials};
use super::wire::{ErrorBody, InstallationToken};
use super::PROVIDER;
use crate::model::Secret;
use crate::providers::http::{error_chain, retry_after, status_error, ErrorAnswer};
use crate::providers::{Error, Result};

/// The REST API version every call asks for.
pub const API_VERSION: &str = "2022-11-28";
/// Page size of every list call: GitHub's maximum.
pub const PER_PAGE: usize = 100;
/// A list that keeps returning full pages is not believed past this many (GitHub itself caps run lists at 1,000
/// results).
const MAX_PAGES: usize = 100;
/// How long to wait after a secondary rate limit that names no time: GitHub asks for "at least one minute".
pub const SECONDARY_LIMIT_WAIT: Duration = Duration::from_secs(60);
/// Warn once per rate-limit window when less than this share of the primary budget is left.
const LOW_BUDGET_SHARE: f64 = 0.1;
/// How much of an error message goes into ours.
const MAX_MESSAGE_CHARS: usize = 300;

/// The primary rate-limit budget as GitHub last reported it (`X-RateLimit-*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateBudget {
    pub limit: u64,
    pub remaining: u64,
    pub used: Option<u64>,
    /// When the window ends and `remaining` is back at `limit`.
    pub reset: Timestamp,
    /// `core` for the REST calls ciscale makes.
    pub resource: Option<String>,
}

/// What this source has sent, for measurements and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApiStats {
    /// Requests sent with the installation token or the configured token (`access_tokens` calls not included).
    pub requests: u64,
    /// Of those, answered `304 Not Modified` (free against the primary limit).
    pub not_modified: u64,
    /// Answers that were a rate limit.
    pub rate_limited: u64,
    /// Installation tokens minted (`POST /app/installations/{id}/access_tokens`).
    pub token_mints: u64,
}

/// A remembered `GET` answer.
struct Cached {
    etag: String,
    body: Arc<Vec<u8>>,
    /// The generation of the last observation that used it.
    used: u64,
}

/// One API call, described for [`Http::call`].
pub(super) struct Call<'a> {
    pub method: Method,
    /// Path segments below the endpoint (escaped here).
    pub segments: &'a [&'a str],
    pub query: &'a [(&'a str, &'a str)],
    pub body: Option<&'a serde_json::Value>,
    /// Names the request in messages (`queued runs of `acme/app``).
    pub what: &'a str,
    /// What a 404 means (`github runner `12``).
    pub not_found: &'a str,
    /// What a 422 means, when the call gives it a meaning of its own (a busy runner refused removal).
    pub unprocessable: Option<&'a str>,
}

impl<'a> Call<'a> {
    pub(super) fn get(segments: &'a [&'a str], query: &'a [(&'a str, &'a str)], what: &'a str) -> Self {
        Self { method: Method::GET, segments, query, body: None, what, not_found: what, unprocessable: None }
    }
}

/// A successful answer's body.
pub(super) struct Answer {
    body: Arc<Vec<u8>>,
    what: String,
}

impl Answer {
    pub(super) fn json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.body).map_err(|error| bad_answer(&self.what, &error.to_string()))
    }
}

/// An answer that is not what the API documents.
#[derive(Debug, thiserror::Error)]
#[error("unexpected answer to {what}: {detail}")]
pub struct BadAnswer {
    pub what: String,
    pub detail: String,
}

pub(super) fn bad_answer(what: &str, detail: &str) -> Error {
    Error::Other {
        provider: PROVIDER.to_owned(),
        source: Box::new(BadAnswer { what: what.to_owned(), detail: detail.to_owned() }),
    }
}

/// The authenticated client of one GitHub endpoint.
pub(super) struct Http {
    client: reqwest::Client,
    /// The API root, ending in `/` (`https://api.github.com/`, `https://ghe.example.com/api/v3/`).
    base: Url,
    credentials: Credentials,
    conditional: bool,
    timeout: Duration,
    cache: Mutex<HashMap<String, Cached>>,
    generation: Mutex<u64>,
    budget: Mutex<Option<RateBudget>>,
    warned_reset: Mutex<Option<Timestamp>>,
    blocked_until: Mutex<Option<Timestamp>>,
    stats: Mutex<ApiStats>,
}

impl std::fmt::Debug for Http {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http")
            .field("base", &self.base.as_str())
            .field("credentials", &self.credentials)
            .field("conditional", &self.conditional)
            .finish_non_exhaustive()
    }
}

/// Locks a mutex; a poisoned one (a panic elsewhere) still holds usable data.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An answer GitHub should not have given (a shape or value the API does not describe).
pub(super) fn invalid(message: String) -> Error {
    Error::Invalid { provider: PROVIDER.to_owned(), message }
}

impl Http {
    pub(super) fn new(endpoint: &str, credentials: Credentials, conditional: bool, timeout: Duration) -> Result<Self> {
        let bad_url = || {
            invalid(format!(
                "`endpoint` `{endpoint}` is not an http(s) URL\nhint: `https://api.github.com`, or \
                 `https://HOST/api/v3` for GitHub Enterprise Server"
            ))
        };
        let base = crate::providers::http::base_url(endpoint).ok_or_else(bad_url)?;
        let client = crate::providers::http::client(PROVIDER, timeout.min(Duration::from_secs(10)), timeout)?;
        Ok(Self {
            client,
            base,
            credentials,
            conditional,
            timeout,
            cache: Mutex::new(HashMap::new()),
            generation: Mutex::new(0),
            budget: Mutex::new(None),
            warned_reset: Mutex::new(None),
            blocked_until: Mutex::new(None),
            stats: Mutex::new(ApiStats::default()),
        })
    }

    pub(super) fn endpoint(&self) -> &str {
        self.base.as_str()
    }

    pub(super) fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    pub(super) fn budget(&self) -> Option<RateBudget> {
        lock(&self.budget).clone()
    }

    pub(super) fn stats(&self) -> ApiStats {
        *lock(&self.stats)
    }

    /// Starts an observation: answers it uses are marked with the new generation.
    pub(super) fn next_generation(&self) -> u64 {
        let mut generation = lock(&self.generation);
        *generation += 1;
        *generation
    }

    /// Forgets remembered answers no observation of the last `keep` generations used.
    pub(super) fn prune(&self, keep: u64) {
        let current = *lock(&self.generation);
        lock(&self.cache).retain(|_, cached| current.saturating_sub(cached.used) < keep.max(1));
    }

    /// How many answers are remembered (for tests of the pruning).
    pub(super) fn remembered(&self) -> usize {
        lock(&self.cache).len()
    }

    fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        if !query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (key, value) in query {
                pairs.append_pair(key, value);
            }
        }
        url
    }

    /// A call refused before it is sent while a rate limit lasts.
    fn check_blocked(&self, now: Timestamp) -> Result<()> {
        let mut blocked = lock(&self.blocked_until);
        match *blocked {
            Some(until) if until > now => {
                Err(Error::RateLimited { provider: PROVIDER.to_owned(), retry_after: Some(wait_until(until, now)) })
            }
            Some(_) => {
                *blocked = None;
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn block_for(&self, wait: Duration, now: Timestamp) {
        let until = now + SignedDuration::try_from(wait).unwrap_or(SignedDuration::ZERO);
        let mut blocked = lock(&self.blocked_until);
        if blocked.is_none_or(|current| current < until) {
            *blocked = Some(until);
        }
    }

    /// The token for the next call: the configured one, or the cached installation token (renewed first when it
    /// expires within the margin).
    async fn bearer(&self) -> Result<Secret> {
        match &self.credentials {
            Credentials::Token(token) => Ok(token.clone()),
            Credentials::App { cache, renew_margin, .. } => {
                // Held while minting: concurrent calls wait for this renewal and reuse it.
                let mut cached = cache.lock().await;
                let now = Timestamp::now();
                if let Some(current) = cached.as_ref() {
                    if !needs_renewal(current.expires_at, now, *renew_margin) {
                        return Ok(current.token.clone());
                    }
                }
                let fresh = self.mint_installation_token(now).await?;
                let token = fresh.token.clone();
                *cached = Some(fresh);
                Ok(token)
            }
        }
    }

    /// Drops the cached installation token (after GitHub refused it).
    async fn drop_token(&self) {
        if let Credentials::App { cache, .. } = &self.credentials {
            *cache.lock().await = None;
        }
    }

    /// `POST /app/installations/{id}/access_tokens`, authenticated with a fresh app JWT.
    async fn mint_installation_token(&self, now: Timestamp) -> Result<CachedToken> {
        let Credentials::App { app_id, installation_id, .. } = &self.credentials else {
            return Err(invalid("no GitHub App configured".to_owned()));
        };
        self.check_blocked(now)?;
        let jwt =
            self.credentials.app_jwt(now).unwrap_or_else(|| Err(invalid("no GitHub App configured".to_owned())))?;
        let id = installation_id.to_string();
        let url = self.url(&["app", "installations", &id, "access_tokens"], &[]);
        let what = format!("an installation token of GitHub App `{app_id}` (installation {installation_id})");
        let response = self
            .client
            .post(url)
            .header(ACCEPT, "application/vnd.github+json")
            .header("x-github-api-version", API_VERSION)
            .bearer_auth(jwt.expose())
            .send()
            .await
            .map_err(|error| self.transport_error(&error, &what))?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await.map_err(|error| self.transport_error(&error, &what))?;
        lock(&self.stats).token_mints += 1;
        if status.is_success() {
            let answer: InstallationToken =
                serde_json::from_slice(&body).map_err(|error| bad_answer(&what, &error.to_string()))?;
            tracing::debug!(app_id = %app_id, installation_id, "github installation token minted");
            return Ok(CachedToken { expires_at: expiry(answer.expires_at.as_deref(), now), token: answer.token });
        }
        let message = server_message(&body);
        if let Some(wait) = rate_limit_wait(status, &headers, &message, now) {
            return Err(self.rate_limited(wait, now, &what));
        }
        let hint = "hint: check `appId`, `installationId` (the number at the end of the installation's settings URL) \
                    and the private key; the JWT is refused when this host's clock is off by minutes";
        Err(match status.as_u16() {
            401 | 403 | 404 => Error::Unauthenticated {
                provider: PROVIDER.to_owned(),
                message: format!("{what}: {status}{message}\n{hint}"),
            },
            _ => self.status_error(status, &headers, &message, &what, &what, None),
        })
    }

    /// Sends one call; a `GET` is conditional (when enabled) and a 304 returns the remembered body.
    pub(super) async fn call(&self, call: Call<'_>) -> Result<Answer> {
        self.send(call, true).await
    }

    /// Sends one call whose answer is not remembered for a conditional request: a one-off read (the job history
    /// of `ciscale trace export` reads thousands of finished runs once; remembering them would only hold memory).
    pub(super) async fn call_once(&self, call: Call<'_>) -> Result<Answer> {
        self.send(call, false).await
    }

    async fn send(&self, call: Call<'_>, remember: bool) -> Result<Answer> {
        let url = self.url(call.segments, call.query);
        let key = url.as_str().to_owned();
        let conditional = remember && self.conditional && call.method == Method::GET;
        let mut attempt = 0;
        loop {
            let now = Timestamp::now();
            self.check_blocked(now)?;
            let token = self.bearer().await?;
            let mut request = self
                .client
                .request(call.method.clone(), url.clone())
                .header(ACCEPT, "application/vnd.github+json")
                .header("x-github-api-version", API_VERSION)
                .bearer_auth(token.expose());
            if conditional {
                if let Some(cached) = lock(&self.cache).get(&key) {
                    request = request.header(IF_NONE_MATCH, cached.etag.as_str());
                }
            }
            if let Some(body) = call.body {
                request = request.json(body);
            }
            let response = request.send().await.map_err(|error| self.transport_error(&error, call.what))?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = response.bytes().await.map_err(|error| self.transport_error(&error, call.what))?;
            lock(&self.stats).requests += 1;
            self.record_budget(&headers);
            tracing::debug!(method = %call.method, what = call.what, status = status.as_u16(), "github call");

            if status == StatusCode::NOT_MODIFIED && conditional {
                let generation = *lock(&self.generation);
                let mut cache = lock(&self.cache);
                let Some(cached) = cache.get_mut(&key) else {
                    return Err(bad_answer(call.what, "304 Not Modified to a request with nothing remembered"));
                };
                cached.used = generation;
                lock(&self.stats).not_modified += 1;
                return Ok(Answer { body: cached.body.clone(), what: call.what.to_owned() });
            }
            if status.is_success() {
                let body = Arc::new(body.to_vec());
                if conditional {
                    let etag = headers.get(ETAG).and_then(|value| value.to_str().ok());
                    let mut cache = lock(&self.cache);
                    match etag {
                        Some(etag) => {
                            let used = *lock(&self.generation);
                            cache.insert(key, Cached { etag: etag.to_owned(), body: body.clone(), used });
                        }
                        None => {
                            cache.remove(&key);
                        }
                    }
                }
                return Ok(Answer { body, what: call.what.to_owned() });
            }
            // A revoked or (by clock skew) expired installation token: mint a fresh one and try once more.
            if status == StatusCode::UNAUTHORIZED && attempt == 0 && self.credentials.is_app() {
                attempt += 1;
                self.drop_token().await;
                continue;
            }
            let message = server_message(&body);
            if let Some(wait) = rate_limit_wait(status, &headers, &message, now) {
                return Err(self.rate_limited(wait, now, call.what));
            }
            return Err(self.status_error(status, &headers, &message, call.what, call.not_found, call.unprocessable));
        }
    }

    /// Every page of a list call (`per_page=100`, `page=1..`), until `total_count` items are in or a page comes
    /// back short. `split` takes a page apart into its `total_count` and its items.
    pub(super) async fn pages<T, Item>(
        &self,
        segments: &[&str],
        query: &[(&str, &str)],
        what: &str,
        split: impl Fn(T) -> (Option<u64>, Vec<Item>),
    ) -> Result<Vec<Item>>
    where
        T: DeserializeOwned,
    {
        let per_page = PER_PAGE.to_string();
        let mut items = Vec::new();
        for page in 1..=MAX_PAGES {
            let page_text = page.to_string();
            let mut paged: Vec<(&str, &str)> = query.to_vec();
            paged.push(("per_page", &per_page));
            paged.push(("page", &page_text));
            let answer = self.call(Call::get(segments, &paged, what)).await?;
            let (total, batch) = split(answer.json::<T>()?);
            let short = batch.len() < PER_PAGE;
            items.extend(batch);
            if short || total.is_some_and(|total| items.len() as u64 >= total) {
                break;
            }
        }
        Ok(items)
    }

    fn rate_limited(&self, wait: Duration, now: Timestamp, what: &str) -> Error {
        self.block_for(wait, now);
        lock(&self.stats).rate_limited += 1;
        tracing::warn!(
            what,
            wait_secs = wait.as_secs(),
            "github rate limit reached: no calls until it has passed\nhint: for `watch`, lengthen `pollInterval`, or \
             receive `workflow_job` webhooks and poll fewer repositories per cycle; for `trace export`, export a \
             shorter window after the reset"
        );
        Error::RateLimited { provider: PROVIDER.to_owned(), retry_after: Some(wait) }
    }

    fn status_error(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        message: &str,
        what: &str,
        not_found: &str,
        unprocessable: Option<&str>,
    ) -> Error {
        let hint = if self.credentials.is_app() {
            "hint: the GitHub App needs the repository permissions Actions: read and Administration: read and write \
             (repository runners), or the organisation permission Self-hosted runners: read and write"
        } else {
            "hint: a fine-grained token needs Actions: read and Administration: read and write on the repositories \
             (organisation runners: Self-hosted runners: read and write); a classic token `repo` and `admin:org` \
             (enterprise runners: `manage_runners:enterprise`)"
        };
        match status.as_u16() {
            401 => Error::Unauthenticated {
                provider: PROVIDER.to_owned(),
                message: format!("{what}: the credentials were refused (401{message})\n{hint}"),
            },
            403 => Error::Unauthenticated {
                provider: PROVIDER.to_owned(),
                message: format!("{what}: not allowed (403{message})\n{hint}"),
            },
            409 => Error::AlreadyExists { what: format!("{not_found} (409{message})") },
            422 if unprocessable.is_some() => Error::Invalid {
                provider: PROVIDER.to_owned(),
                message: format!("{} (422{message})", unprocessable.unwrap_or_default()),
            },
            _ => status_error(ErrorAnswer {
                provider: PROVIDER,
                status,
                retry_after: retry_after(headers),
                what: not_found,
                message: &format!("{what}: {status}{message}"),
                credential_hint: hint,
            }),
        }
    }

    fn transport_error(&self, error: &reqwest::Error, what: &str) -> Error {
        let message = if error.is_timeout() {
            format!("{what}: no answer within {}s", self.timeout.as_secs_f64())
        } else if error.is_connect() {
            format!("{what}: cannot connect to `{}`", self.base)
        } else {
            // reqwest's text names the URL (no credential: tokens travel in a header) and the cause.
            format!("{what}: {}", error_chain(error))
        };
        Error::Unavailable { provider: PROVIDER.to_owned(), message }
    }

    /// Keeps the primary budget the answer reports. Answers arriving out of order within one window keep the
    /// lowest `remaining` seen; a later window replaces the earlier.
    fn record_budget(&self, headers: &HeaderMap) {
        let Some(seen) = budget_from_headers(headers) else {
            return;
        };
        let mut budget = lock(&self.budget);
        let merged = match budget.take() {
            Some(old) if old.reset == seen.reset && old.resource == seen.resource => {
                RateBudget { remaining: old.remaining.min(seen.remaining), used: old.used.max(seen.used), ..seen }
            }
            Some(old) if old.reset > seen.reset && old.resource == seen.resource => old,
            _ => seen,
        };
        let low = merged.limit > 0 && (merged.remaining as f64) < merged.limit as f64 * LOW_BUDGET_SHARE;
        if low {
            let mut warned = lock(&self.warned_reset);
            if *warned != Some(merged.reset) {
                *warned = Some(merged.reset);
                tracing::warn!(
                    remaining = merged.remaining,
                    limit = merged.limit,
                    reset = %merged.reset,
                    "github rate-limit budget is nearly used up\nhint: for `watch`, lengthen `pollInterval`, or receive \
                     `workflow_job` webhooks and poll fewer repositories per cycle; for `trace export`, export a \
                     shorter window"
                );
            }
        }
        *budget = Some(merged);
    }
}

fn wait_until(until: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(until.duration_since(now)).unwrap_or(Duration::ZERO)
}

/// The `X-RateLimit-*` headers of an answer; `None` when it has none (GitHub Enterprise Server with rate
/// limits off).
pub(super) fn budget_from_headers(headers: &HeaderMap) -> Option<RateBudget> {
    let text = |name: &str| headers.get(name).and_then(|value| value.to_str().ok()).map(str::trim);
    let number = |name: &str| text(name).and_then(|value| value.parse::<u64>().ok());
    let reset = text("x-ratelimit-reset")?.parse::<i64>().ok()?;
    Some(RateBudget {
        limit: number("x-ratelimit-limit")?,
        remaining: number("x-ratelimit-remaining")?,
        used: number("x-ratelimit-used"),
        reset: Timestamp::from_second(reset).ok()?,
        resource: text("x-ratelimit-resource").map(str::to_owned),
    })
}

/// How long a refusal asks to wait, if it is a rate limit: GitHub's documented reading of 403 and 429 —
/// `Retry-After` first; else `X-RateLimit-Remaining: 0` means wait until `X-RateLimit-Reset`; else a 429, or a
/// 403 whose message names a rate limit, means at least a minute. Any other 403 is a permission problem.
pub(super) fn rate_limit_wait(
    status: StatusCode,
    headers: &HeaderMap,
    message: &str,
    now: Timestamp,
) -> Option<Duration> {
    if !matches!(status.as_u16(), 403 | 429) {
        return None;
    }
    if headers.contains_key(RETRY_AFTER) {
        if let Some(wait) = retry_after(headers) {
            return Some(wait);
        }
    }
    let remaining = headers
        .get("x-ratelimit-remaining")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok());
    if remaining == Some(0) {
        let reset = headers
            .get("x-ratelimit-reset")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<i64>().ok())
            .and_then(|reset| Timestamp::from_second(reset).ok());
        return Some(match reset {
            // A reset already past still waits a second: GitHub's clock may run ahead of ours.
            Some(reset) => wait_until(reset, now).max(Duration::from_secs(1)),
            None => SECONDARY_LIMIT_WAIT,
        });
    }
    if status == StatusCode::TOO_MANY_REQUESTS || message.to_ascii_lowercase().contains("rate limit") {
        return Some(SECONDARY_LIMIT_WAIT);
    }
    None
}

/// `: <message>` from GitHub's JSON error body (with its validation `errors`), or nothing. Cut short; a body
/// that is not GitHub's JSON (a proxy's HTML page) is not quoted.
fn server_message(body: &[u8]) -> String {
    let Ok(error) = serde_json::from_slice::<ErrorBody>(body) else {
        return String::new();
    };
    let mut text = error.message.unwrap_or_default().trim().to_owned();
    if let Some(errors) = error.errors.filter(|errors| !errors.is_null()) {
        let errors = errors.to_string();
        if errors != "[]" {
            text = format!("{text} {errors}");
        }
    }
    let mut text: String = text.trim().chars().take(MAX_MESSAGE_CHARS).collect();
    if text.ends_with('.') {
        text.pop();
    }
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
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

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).expect("timestamp")
    }

    #[test]
    fn rate_limits_are_told_from_permission_errors() {
        let now = at(1_800_000_000);
        let status = |code: u16| StatusCode::from_u16(code).expect("status");
        // Secondary, with Retry-After.
        assert_eq!(
            rate_limit_wait(status(403), &headers(&[("retry-after", "30")]), "", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            rate_limit_wait(status(429), &headers(&[("retry-after", "5")]), "", now),
            Some(Duration::from_secs(5))
        );
        // Primary exhausted: until the reset.
        let exhausted = headers(&[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "1800000120")]);
        assert_eq!(rate_limit_wait(status(403), &exhausted, "", now), Some(Duration::from_secs(120)));
        let past = headers(&[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "1799999000")]);
        assert_eq!(rate_limit_wait(status(403), &past, "", now), Some(Duration::from_secs(1)));
        // Secondary without a time: a minute.
        let message = "You have exceeded a secondary rate limit. Please wait a few minutes before you try again";
        let budget_left = headers(&[("x-ratelimit-remaining", "4000"), ("x-ratelimit-reset", "1800000120")]);
        assert_eq!(rate_limit_wait(status(403), &budget_left, message, now), Some(SECONDARY_LIMIT_WAIT));
        assert_eq!(rate_limit_wait(status(429), &HeaderMap::new(), "", now), Some(SECONDARY_LIMIT_WAIT));
        // A permission problem carries the same headers but is not a rate limit.
        assert_eq!(rate_limit_wait(status(403), &budget_left, "Resource not accessible by integration", now), None);
        assert_eq!(rate_limit_wait(status(404), &exhausted, "", now), None);
    }

    #[test]
    fn budgets_are_read_from_headers() {
        let budget = budget_from_headers(&headers(&[
            ("x-ratelimit-limit", "12500"),
            ("x-ratelimit-remaining", "12000"),
            ("x-ratelimit-used", "500"),
            ("x-ratelimit-reset", "1800000000"),
            ("x-ratelimit-resource", "core"),
        ]))
        .expect("budget");
        assert_eq!(
            budget,
            RateBudget {
                limit: 12500,
                remaining: 12000,
                used: Some(500),
                reset: at(1_800_000_000),
                resource: Some("core".to_owned()),
            }
        );
        assert_eq!(budget_from_headers(&HeaderMap::new()), None, "rate limits off (GHES)");
    }

    #[test]
    fn server_messages_are_short_and_never_html() {
        assert_eq!(server_message(br#"{"message": "Not Found.", "documentation_url": "x"}"#), ": Not Found");
        assert_eq!(
            server_message(br#"{"message": "Validation Failed", "errors": ["labels is too short"]}"#),
            ": Validation Failed [\"labels is too short\"]"
        );
        assert_eq!(server_message(b"<html>proxy error</html>"), "");
        let long = format!(r#"{{"message": "{}"}}"#, "x".repeat(1000));
        assert_eq!(server_message(long.as_bytes()).len(), 2 + MAX_MESSAGE_CHARS);
    }
}
