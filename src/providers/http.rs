//! HTTP plumbing shared by the reqwest-based providers (`woodpecker`, `hcloud`, `azure_pipelines`): how long a
//! refusal asks to wait, and the default reading of an error status in the shared [`Error`] vocabulary. Each
//! provider keeps its own messages and handles its special cases before falling back on [`status_error`]
//! (Hetzner's error codes, Azure's sign-in pages, Woodpecker's admin-token and agent answers).

use std::time::Duration;

use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::StatusCode;

use super::Error;

/// How long a 429 (or a throttled answer) asks to wait: `Retry-After` in seconds (fractions allowed) or as an
/// HTTP date; else a rate-limit reset time in UNIX seconds (Hetzner's `RateLimit-Reset`, Azure's
/// `X-RateLimit-Reset`). A reset time already past still asks for a second: the server's clock may run ahead.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok()).map(str::trim);
    let now = jiff::Timestamp::now();
    if let Some(value) = header(RETRY_AFTER.as_str()) {
        if let Ok(seconds) = value.parse::<f64>() {
            if seconds.is_finite() && seconds >= 0.0 {
                return Some(Duration::from_secs_f64(seconds));
            }
        }
        if let Ok(date) = jiff::fmt::rfc2822::parse(value) {
            return Some(Duration::try_from(date.timestamp().duration_since(now)).unwrap_or(Duration::ZERO));
        }
    }
    let reset: i64 = header("ratelimit-reset")
        .or_else(|| header("x-ratelimit-reset"))?
        .parse()
        .ok()?;
    let wait = reset.saturating_sub(now.as_second()).max(1);
    Some(Duration::from_secs(wait.unsigned_abs()))
}

/// An error answer, as a provider describes it for [`status_error`].
pub(crate) struct ErrorAnswer<'a> {
    pub provider: &'a str,
    pub status: StatusCode,
    /// From [`retry_after`], for a 429.
    pub retry_after: Option<Duration>,
    /// What a 404 or a 409 is about (`agent `5``).
    pub what: &'a str,
    /// The message of any other answer: names the request and what the server said, never a credential.
    pub message: &'a str,
    /// The `hint:` line added to a 401 or 403.
    pub credential_hint: &'a str,
}

/// The default mapping of an HTTP error status: 401/403 → [`Error::Unauthenticated`], 404 → [`Error::NotFound`],
/// 409 → [`Error::AlreadyExists`], 429 → [`Error::RateLimited`], 5xx → [`Error::Unavailable`] (the same call
/// works later), anything else → [`Error::Invalid`] (it will not).
pub(crate) fn status_error(answer: ErrorAnswer<'_>) -> Error {
    let provider = answer.provider.to_owned();
    let message = answer.message.to_owned();
    match answer.status.as_u16() {
        401 | 403 => Error::Unauthenticated {
            provider,
            message: format!("{message}\n{}", answer.credential_hint),
        },
        404 => Error::NotFound {
            what: answer.what.to_owned(),
        },
        409 => Error::AlreadyExists {
            what: answer.what.to_owned(),
        },
        429 => Error::RateLimited {
            provider,
            retry_after: answer.retry_after,
        },
        500..=599 => Error::Unavailable { provider, message },
        _ => Error::Invalid { provider, message },
    }
}

/// An error's message followed by its sources' (`a: b: c`): reqwest's top-level text alone rarely says why.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, value.parse().expect("header value"));
        }
        headers
    }

    #[test]
    fn retry_after_reads_seconds_dates_and_reset_times() {
        assert_eq!(
            retry_after(&headers(&[("retry-after", "12")])),
            Some(Duration::from_secs(12))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", "1.5")])),
            Some(Duration::from_millis(1500))
        );
        let in_a_minute = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(60);
        let date = jiff::fmt::rfc2822::to_string(&in_a_minute.to_zoned(jiff::tz::TimeZone::UTC)).expect("date");
        let from_date = retry_after(&headers(&[("retry-after", &date)])).expect("a date");
        assert!(
            from_date <= Duration::from_secs(60) && from_date >= Duration::from_secs(50),
            "{from_date:?}"
        );
        let now = jiff::Timestamp::now().as_second();
        for name in ["ratelimit-reset", "x-ratelimit-reset"] {
            let wait = retry_after(&headers(&[(name, &(now + 30).to_string())])).map(|wait| wait.as_secs());
            assert!(matches!(wait, Some(29..=30)), "{name}: {wait:?}");
        }
        let past = retry_after(&headers(&[("ratelimit-reset", &(now - 30).to_string())]));
        assert_eq!(
            past,
            Some(Duration::from_secs(1)),
            "a passed reset still waits a second"
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")])), None);
        assert_eq!(retry_after(&headers(&[("retry-after", "-3")])), None);
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }

    #[test]
    fn statuses_map_onto_the_shared_variants() {
        let map = |status: u16| {
            status_error(ErrorAnswer {
                provider: "p",
                status: StatusCode::from_u16(status).expect("status"),
                retry_after: Some(Duration::from_secs(7)),
                what: "agent `5`",
                message: "`GET /x` answered",
                credential_hint: "hint: check the token",
            })
        };
        assert!(
            matches!(map(401), Error::Unauthenticated { message, .. } if message == "`GET /x` answered\nhint: check the token")
        );
        assert!(matches!(map(403), Error::Unauthenticated { .. }));
        assert!(matches!(map(404), Error::NotFound { what } if what == "agent `5`"));
        assert!(matches!(map(409), Error::AlreadyExists { what } if what == "agent `5`"));
        assert!(
            matches!(map(429), Error::RateLimited { retry_after: Some(wait), .. } if wait == Duration::from_secs(7))
        );
        assert!(matches!(map(502), Error::Unavailable { message, .. } if message == "`GET /x` answered"));
        assert!(matches!(map(400), Error::Invalid { .. }));
        assert!(matches!(map(422), Error::Invalid { .. }));
    }
}
