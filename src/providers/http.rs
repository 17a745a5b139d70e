//! HTTP plumbing shared by the reqwest-based providers (`woodpecker`, `hcloud`, `azure_pipelines`, `github`): an
//! API root as a base URL, how long a refusal asks to wait, and the default reading of an error status in the
//! shared [`Error`] vocabulary. Each provider keeps its own messages and handles its special cases before falling
//! back on [`status_error`] (Hetzner's error codes, Azure's sign-in pages, Woodpecker's admin-token and agent
//! answers).

use std::time::Duration;

use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::StatusCode;

use super::Error;

/// The client settings every provider's HTTP client shares: both deadlines and ciscale's `User-Agent` (GitHub
/// refuses requests without one; the others log it).
pub(crate) fn client_builder(connect: Duration, total: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(connect)
        .timeout(total)
        .user_agent(concat!("ciscale/", env!("CARGO_PKG_VERSION")))
}

/// [`client_builder`] built, a failure reported as `provider`'s.
pub(crate) fn client(provider: &str, connect: Duration, total: Duration) -> Result<reqwest::Client, Error> {
    client_builder(connect, total)
        .build()
        .map_err(|error| Error::Other { provider: provider.to_owned(), source: Box::new(error) })
}

/// An API root as a base to join relative paths onto: an http(s) URL without query or fragment, its path ending
/// in `/` (so `https://HOST/api/v3` keeps its `api/v3`). `None`: not such a URL.
pub(crate) fn base_url(text: &str) -> Option<reqwest::Url> {
    let mut base = reqwest::Url::parse(text.trim()).ok()?;
    if base.cannot_be_a_base() || !matches!(base.scheme(), "http" | "https") {
        return None;
    }
    base.set_query(None);
    base.set_fragment(None);
    if !base.path().ends_with('/') {
        let path = format!("{}/", base.path());
        base.set_path(&path);
    }
    Some(base)
}

/// How long a 429 (or a throttled answer) asks to wait: `Retry-After` in seconds (fractions allowed) or as an
/// HTTP date; else a rate-limit reset time in UNIX seconds (Hetzner's `RateLimit-Reset`, Azure's
/// `X-RateLimit-Reset`). A reset time already past still asks for a second: the server's clock may run ahead.
///
/// The wait is capped at [`MAX_RETRY_AFTER`]: a server asking for `1e30` seconds (which would overflow a
/// `Duration`) or a reset time years ahead gets a day, after which ciscale asks again.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok()).map(str::trim);
    let now = jiff::Timestamp::now();
    if let Some(value) = header(RETRY_AFTER.as_str()) {
        if let Ok(seconds) = value.parse::<f64>() {
            if seconds.is_finite() && seconds >= 0.0 {
                // `try_from_secs_f64` refuses what a `Duration` cannot hold; that is more than the cap anyway.
                let wait = Duration::try_from_secs_f64(seconds).unwrap_or(MAX_RETRY_AFTER);
                return Some(wait.min(MAX_RETRY_AFTER));
            }
        }
        if let Ok(date) = jiff::fmt::rfc2822::parse(value) {
            let wait = Duration::try_from(date.timestamp().duration_since(now)).unwrap_or(Duration::ZERO);
            return Some(wait.min(MAX_RETRY_AFTER));
        }
    }
    let reset: i64 = header("ratelimit-reset").or_else(|| header("x-ratelimit-reset"))?.parse().ok()?;
    let wait = reset.saturating_sub(now.as_second()).max(1);
    Some(Duration::from_secs(wait.unsigned_abs()).min(MAX_RETRY_AFTER))
}

/// The longest wait a provider's answer can ask for: a day. Longer asks are a server's bug or an attack on the
/// daemon's liveness; after a day ciscale asks again (and is refused again, if the server meant it).
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

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
        401 | 403 => Error::Unauthenticated { provider, message: format!("{message}\n{}", answer.credential_hint) },
        404 => Error::NotFound { what: answer.what.to_owned() },
        409 => Error::AlreadyExists { what: answer.what.to_owned() },
        429 => Error::RateLimited { provider, retry_after: answer.retry_after },
        500..=599 => Error::Unavailable { provider, message },
        _ => Error::Invalid { provider, message },
    }
}

/// Why a request got no answer, in words a user can act on: `connection refused`, `DNS lookup of `host`
/// failed`, `TLS failed: ...`, `timed out`, else the innermost cause reqwest reports.
pub(crate) fn transport_reason(error: &reqwest::Error) -> String {
    let causes = || std::iter::successors(Some(error as &dyn std::error::Error), |cause| cause.source());
    let chain = error_chain(error).to_lowercase();
    // The I/O kind is the surest sign; texts are the fallback for what hyper and rustls only describe.
    let io_kind = causes().find_map(|cause| cause.downcast_ref::<std::io::Error>()).map(std::io::Error::kind);
    let host = error.url().and_then(|url| url.host_str().map(str::to_owned)).unwrap_or_default();
    let innermost = causes().last().map(ToString::to_string).unwrap_or_default();
    let innermost = innermost.split(" (os error").next().unwrap_or_default().to_owned();
    match io_kind {
        _ if error.is_timeout() => "timed out".to_owned(),
        Some(std::io::ErrorKind::ConnectionRefused) => {
            "connection refused (is the server running, and is the port right?)".to_owned()
        }
        Some(std::io::ErrorKind::ConnectionReset) => "the connection was reset".to_owned(),
        Some(std::io::ErrorKind::TimedOut) => "timed out".to_owned(),
        _ if chain.contains("dns error") || chain.contains("lookup address") => {
            format!("DNS lookup of `{host}` failed ({innermost})")
        }
        _ if ["certificate", "tls", "handshake", "corrupt message", "invalid peer", "alert"]
            .iter()
            .any(|word| chain.contains(word)) =>
        {
            format!("TLS failed: {innermost}")
        }
        _ => innermost,
    }
}

/// `` `GET /api/queue/info` to `https://ci.example.com/api/queue/info`: connection refused ``: the request, the URL
/// it went to (without its query; no credential is ever in a URL here, they travel in headers) and why it failed.
pub(crate) fn transport_message(request: &str, error: &reqwest::Error) -> String {
    let url = shown_url(error).map(|url| format!(" to `{url}`")).unwrap_or_default();
    format!("`{request}`{url}: {}", transport_reason(error))
}

/// The URL a failed request went to, without its query and fragment.
pub(crate) fn shown_url(error: &reqwest::Error) -> Option<String> {
    error.url().map(|url| {
        let mut shown = url.clone();
        shown.set_query(None);
        shown.set_fragment(None);
        shown.to_string()
    })
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
        assert_eq!(retry_after(&headers(&[("retry-after", "12")])), Some(Duration::from_secs(12)));
        assert_eq!(retry_after(&headers(&[("retry-after", "1.5")])), Some(Duration::from_millis(1500)));
        let in_a_minute = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(60);
        let date = jiff::fmt::rfc2822::to_string(&in_a_minute.to_zoned(jiff::tz::TimeZone::UTC)).expect("date");
        let from_date = retry_after(&headers(&[("retry-after", &date)])).expect("a date");
        assert!(from_date <= Duration::from_secs(60) && from_date >= Duration::from_secs(50), "{from_date:?}");
        let now = jiff::Timestamp::now().as_second();
        for name in ["ratelimit-reset", "x-ratelimit-reset"] {
            let wait = retry_after(&headers(&[(name, &(now + 30).to_string())])).map(|wait| wait.as_secs());
            assert!(matches!(wait, Some(29..=30)), "{name}: {wait:?}");
        }
        let past = retry_after(&headers(&[("ratelimit-reset", &(now - 30).to_string())]));
        assert_eq!(past, Some(Duration::from_secs(1)), "a passed reset still waits a second");
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")])), None);
        assert_eq!(retry_after(&headers(&[("retry-after", "-3")])), None);
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }

    /// One request to `url` with a 300 ms timeout and, when `fail_dns`, a resolver that finds nothing: real
    /// reqwest errors for every kind of transport failure, without leaving this machine.
    async fn failing_request(url: &str, fail_dns: bool) -> reqwest::Error {
        struct NoDns;
        impl reqwest::dns::Resolve for NoDns {
            fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
                let host = name.as_str().to_owned();
                Box::pin(async move {
                    Err(Box::new(std::io::Error::new(std::io::ErrorKind::NotFound, format!("no address for {host}")))
                        as Box<dyn std::error::Error + Send + Sync>)
                })
            }
        }
        let mut builder = reqwest::Client::builder().timeout(Duration::from_millis(300));
        if fail_dns {
            builder = builder.dns_resolver(std::sync::Arc::new(NoDns));
        }
        let client = builder.build().expect("client");
        client.get(url).send().await.expect_err("the request must fail")
    }

    #[tokio::test]
    async fn transport_failures_name_the_url_and_the_reason() {
        // Refused: a port that was free a moment ago.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = closed.local_addr().expect("addr").port();
        drop(closed);
        let refused = failing_request(&format!("http://127.0.0.1:{port}/api/queue/info?x=1"), false).await;
        assert_eq!(
            transport_message("GET /api/queue/info", &refused),
            format!("`GET /api/queue/info` to `http://127.0.0.1:{port}/api/queue/info`: connection refused (is the server running, and is the port right?)")
        );

        // DNS: the resolver finds nothing.
        let dns = failing_request("http://ci.example.invalid/x", true).await;
        let text = transport_message("GET /x", &dns);
        assert!(text.contains("DNS lookup of `ci.example.invalid` failed"), "{text}");

        // TLS: `https` to a server that speaks plain text.
        let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = plain.local_addr().expect("addr").port();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt as _;
            while let Ok((mut socket, _)) = plain.accept().await {
                drop(socket.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await);
            }
        });
        let tls = failing_request(&format!("https://127.0.0.1:{port}/"), false).await;
        let text = transport_message("GET /", &tls);
        assert!(text.contains("TLS failed: "), "{text}");

        // Timeout: a server that accepts and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = silent.local_addr().expect("addr").port();
        tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                open.push(socket);
            }
        });
        let slow = failing_request(&format!("http://127.0.0.1:{port}/"), false).await;
        assert_eq!(transport_reason(&slow), "timed out");
    }

    #[test]
    fn huge_or_odd_retry_after_values_never_panic() {
        for value in ["1e30", "1e308", "18446744073709551616", "inf", "NaN", "1e-30", "-0"] {
            let wait = retry_after(&headers(&[("retry-after", value)]));
            assert!(wait.is_none_or(|wait| wait <= MAX_RETRY_AFTER), "{value}: {wait:?}");
        }
        assert_eq!(retry_after(&headers(&[("retry-after", "1e30")])), Some(MAX_RETRY_AFTER));
        let far = (jiff::Timestamp::now().as_second() + 10_i64.pow(12)).to_string();
        assert_eq!(retry_after(&headers(&[("ratelimit-reset", &far)])), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after(&headers(&[("ratelimit-reset", &i64::MAX.to_string())])), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after(&headers(&[("ratelimit-reset", &i64::MIN.to_string())])), Some(Duration::from_secs(1)));
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
