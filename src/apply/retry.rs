//! Retrying one provider call. Only transient failures are retried, and only a few times: apply runs again
//! on the next cycle anyway, so a long retry here would only delay the rest of the plan.

use std::future::Future;
use std::time::Duration;

use crate::providers::{Error, Result};

/// Retries after the first attempt. Three, with doubling delays, rides out a provider's blip of a few poll
/// intervals without holding a change for long.
pub const MAX_RETRIES: u32 = 3;

/// A `Retry-After` longer than this is not waited for here: the next cycle will try again anyway.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// The longest first pause [100ms]: a provider's blip (one 5xx, one dropped connection) costs a tenth of a
/// second, so a job's agent is not late by a cycle's worth for it; the doubling (0.1 s, 0.2 s, 0.4 s) then rides
/// out a blip of most of a second, and the next cycle a longer outage.
pub const MAX_RETRY_BASE: Duration = Duration::from_millis(100);

/// The shortest pause after a rate limit that named no `Retry-After` [1s]: a quick retry would only be refused
/// again, and count against the same limit.
pub const RATE_LIMITED_MIN: Duration = Duration::from_secs(1);

/// Worth retrying within this apply. Capacity errors are transient in general, but retrying the same machine
/// type in the same place rarely helps: they are left to fallbacks (other types/locations) and the next cycle.
pub fn is_retryable(error: &Error) -> bool {
    error.is_transient() && !matches!(error, Error::Capacity { .. })
}

/// The wait before retry number `retry` (0-based): `base` doubled each time, or the provider's `Retry-After`
/// (capped at [`MAX_RETRY_AFTER`]) when it gave one; a rate limit without one waits at least
/// [`RATE_LIMITED_MIN`].
pub fn backoff(base: Duration, retry: u32, error: &Error) -> Duration {
    let doubled = base.saturating_mul(2u32.saturating_pow(retry)).min(MAX_RETRY_AFTER);
    match error {
        Error::RateLimited { retry_after: Some(after), .. } => (*after).min(MAX_RETRY_AFTER),
        Error::RateLimited { retry_after: None, .. } => doubled.max(RATE_LIMITED_MIN),
        _ => doubled,
    }
}

/// Runs `call`, retrying retryable failures up to [`MAX_RETRIES`] times. `describe` turns an error into loggable
/// text (the caller redacts secrets there).
pub async fn with_retries<T, Call, Fut>(
    step: &str,
    base: Duration,
    describe: impl Fn(&Error) -> String,
    mut call: Call,
) -> Result<T>
where
    Call: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut retry = 0;
    loop {
        match call().await {
            Ok(value) => return Ok(value),
            Err(error) if retry < MAX_RETRIES && is_retryable(&error) => {
                let delay = backoff(base, retry, &error);
                tracing::warn!(
                    step,
                    retry = retry + 1,
                    delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    error = %describe(&error),
                    "transient failure, retrying"
                );
                tokio::time::sleep(delay).await;
                retry += 1;
            }
            Err(error) => return Err(error),
        }
    }
}
