//! Who ciscale is to GitHub: a GitHub App installation or a plain token.
//!
//! A GitHub App signs a short JSON Web Token with its private key (RS256; `iss` = the app id or client id, `iat`
//! 60 s in the past against clock drift, `exp` ten minutes after `iat`, the longest GitHub accepts) and trades it
//! for an installation token (`POST /app/installations/{id}/access_tokens`), valid for an hour. That token is
//! cached and replaced [`DEFAULT_RENEW_MARGIN`] before it expires, so no call is ever made with a token about to
//! lapse; concurrent callers wait for one renewal instead of each minting their own. A `401` on a cached token
//! (revoked, or a clock far off) drops it and the call is tried once more with a fresh one.
//!
//! The private key, the JWT and the tokens are [`Secret`]s: no `Debug`, message or log line holds them.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use crate::model::Secret;
use crate::providers::{Error, Result};

use super::PROVIDER;

/// How long before its expiry an installation token is replaced: GitHub's tokens last an hour, so this renews
/// after 55 minutes and leaves a request in flight plenty of time.
pub const DEFAULT_RENEW_MARGIN: Duration = Duration::from_secs(5 * 60);
/// How far `iat` is set in the past (GitHub's own advice, against a server clock running behind ours).
pub const JWT_BACKDATE: Duration = Duration::from_secs(60);
/// `exp - iat`: the ten minutes GitHub allows at most.
pub const JWT_LIFETIME: Duration = Duration::from_secs(10 * 60);
/// How long an installation token lasts when the answer does not say (GitHub documents one hour).
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(60 * 60);

/// How ciscale authenticates to GitHub.
#[derive(Clone)]
pub enum Auth {
    /// A GitHub App installed on the organisation, repository or enterprise: the recommended way (its own rate
    /// limit that grows with the installation, tokens that expire by themselves, fine-grained permissions).
    App {
        /// The app's numeric id, or its client id (`Iv1.…`); either is accepted as the JWT's `iss`.
        app_id: String,
        installation_id: u64,
        /// The app's private key, PEM (PKCS#1 as GitHub hands it out, or PKCS#8).
        private_key: Secret,
    },
    /// A personal access token (fine-grained or classic) or any other bearer token.
    Token(Secret),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::App { app_id, installation_id, private_key } => f
                .debug_struct("App")
                .field("app_id", app_id)
                .field("installation_id", installation_id)
                .field("private_key", private_key)
                .finish(),
            Auth::Token(token) => f.debug_tuple("Token").field(token).finish(),
        }
    }
}

/// The claims of an app JWT.
#[derive(Debug, Serialize, PartialEq)]
pub struct AppClaims {
    /// A number for a numeric app id (as GitHub's own examples send it), else the client id string.
    pub iss: serde_json::Value,
    pub iat: i64,
    pub exp: i64,
}

impl AppClaims {
    /// The claims of a JWT made at `now`.
    pub fn at(app_id: &str, now: Timestamp) -> Self {
        let iss = match app_id.trim().parse::<u64>() {
            Ok(number) => serde_json::Value::from(number),
            Err(_) => serde_json::Value::from(app_id.trim()),
        };
        let iat = now.as_second() - secs(JWT_BACKDATE);
        Self { iss, iat, exp: iat + secs(JWT_LIFETIME) }
    }
}

fn secs(duration: Duration) -> i64 {
    i64::try_from(duration.as_secs()).unwrap_or(i64::MAX)
}

/// Whether a token expiring at `expires_at` must be replaced before use at `now`.
pub fn needs_renewal(expires_at: Timestamp, now: Timestamp, margin: Duration) -> bool {
    let margin = SignedDuration::try_from(margin).unwrap_or(SignedDuration::MAX);
    now.checked_add(margin).map_or(true, |deadline| deadline >= expires_at)
}

/// When a freshly minted token expires: the answer's `expires_at`, or [`TOKEN_LIFETIME`] from `now` when it is
/// missing or unreadable.
pub fn expiry(expires_at: Option<&str>, now: Timestamp) -> Timestamp {
    expires_at
        .and_then(|text| text.trim().parse::<Timestamp>().ok())
        .unwrap_or_else(|| now + SignedDuration::try_from(TOKEN_LIFETIME).unwrap_or(SignedDuration::ZERO))
}

/// An installation token and when it expires.
#[derive(Clone)]
pub(super) struct CachedToken {
    pub token: Secret,
    pub expires_at: Timestamp,
}

/// The credentials of one source, ready to use: a token as it is, or an app's parsed key and its cached
/// installation token.
pub(super) enum Credentials {
    Token(Secret),
    App {
        app_id: String,
        installation_id: u64,
        key: EncodingKey,
        cache: tokio::sync::Mutex<Option<CachedToken>>,
        renew_margin: Duration,
    },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Token(_) => f.write_str("Token(***)"),
            Credentials::App { app_id, installation_id, .. } => f
                .debug_struct("App")
                .field("app_id", app_id)
                .field("installation_id", installation_id)
                .finish_non_exhaustive(),
        }
    }
}

impl Credentials {
    /// Parses the app's key once, so a bad key is a config-time error and not one per cycle.
    pub(super) fn new(auth: &Auth, renew_margin: Duration) -> Result<Self> {
        match auth {
            Auth::Token(token) => {
                if token.expose().trim().is_empty() {
                    return Err(invalid("the GitHub token is empty\nhint: set `token` to a personal access token"));
                }
                Ok(Credentials::Token(token.clone()))
            }
            Auth::App { app_id, installation_id, private_key } => {
                if app_id.trim().is_empty() {
                    return Err(invalid("the GitHub App id is empty\nhint: set `appId` to the app's id or client id"));
                }
                // The error names the key's problem (its kind), never its content.
                let key = EncodingKey::from_rsa_pem(private_key.expose().as_bytes()).map_err(|error| {
                    invalid(&format!(
                        "the private key of GitHub App `{app_id}` is not an RSA private key in PEM form ({error})\nhint: \
                         use the `.pem` file GitHub generated for the app (Settings → Developer settings → GitHub \
                         Apps → Private keys)"
                    ))
                })?;
                Ok(Credentials::App {
                    app_id: app_id.trim().to_owned(),
                    installation_id: *installation_id,
                    key,
                    cache: tokio::sync::Mutex::new(None),
                    renew_margin,
                })
            }
        }
    }

    pub(super) fn is_app(&self) -> bool {
        matches!(self, Credentials::App { .. })
    }

    /// A JWT for the app, made at `now`. `None` for a token.
    pub(super) fn app_jwt(&self, now: Timestamp) -> Option<Result<Secret>> {
        let Credentials::App { app_id, key, .. } = self else {
            return None;
        };
        let claims = AppClaims::at(app_id, now);
        Some(
            jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, key)
                .map(Secret::new)
                .map_err(|error| invalid(&format!("cannot sign the JWT of GitHub App `{app_id}`: {error}"))),
        )
    }
}

fn invalid(message: &str) -> Error {
    Error::Invalid { provider: PROVIDER.to_owned(), message: message.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().expect("timestamp")
    }

    #[test]
    fn claims_are_backdated_and_last_ten_minutes() {
        let now = at("2026-01-01T12:00:00Z");
        let claims = AppClaims::at("12345", now);
        assert_eq!(claims.iss, serde_json::json!(12345), "a numeric id is sent as a number");
        assert_eq!(claims.iat, now.as_second() - 60);
        assert_eq!(claims.exp - claims.iat, 600);
        assert!(claims.exp <= now.as_second() + 600, "never more than ten minutes ahead");
        assert_eq!(AppClaims::at(" Iv1.abc ", now).iss, serde_json::json!("Iv1.abc"), "a client id as a string");
    }

    #[test]
    fn tokens_are_renewed_within_the_margin() {
        let expires = at("2026-01-01T13:00:00Z");
        let margin = Duration::from_secs(300);
        assert!(!needs_renewal(expires, at("2026-01-01T12:54:59Z"), margin));
        assert!(needs_renewal(expires, at("2026-01-01T12:55:00Z"), margin), "at the margin");
        assert!(needs_renewal(expires, at("2026-01-01T13:30:00Z"), margin), "expired");
        assert!(!needs_renewal(expires, at("2026-01-01T12:59:59Z"), Duration::ZERO));
    }

    #[test]
    fn expiry_defaults_to_an_hour() {
        let now = at("2026-01-01T12:00:00Z");
        assert_eq!(expiry(Some("2026-01-01T12:30:00Z"), now), at("2026-01-01T12:30:00Z"));
        assert_eq!(expiry(None, now), at("2026-01-01T13:00:00Z"));
        assert_eq!(expiry(Some("soon"), now), at("2026-01-01T13:00:00Z"));
    }

    #[test]
    fn a_bad_key_is_refused_without_echoing_it() {
        let auth = Auth::App {
            app_id: "1".to_owned(),
            installation_id: 2,
            private_key: Secret::new(
                "-----BEGIN RSA PRIVATE KEY-----\nc2VjcmV0LWtleS1ieXRlcw==\n-----END RSA PRIVATE KEY-----",
            ),
        };
        let error = Credentials::new(&auth, DEFAULT_RENEW_MARGIN).expect_err("not a key");
        let text = error.to_string();
        assert!(text.contains("not an RSA private key"), "{text}");
        assert!(!text.contains("c2VjcmV0"), "the key is not echoed: {text}");
        assert!(!format!("{auth:?}").contains("c2VjcmV0"), "nor in Debug");
        let empty = Credentials::new(&Auth::Token(Secret::new(" ")), DEFAULT_RENEW_MARGIN);
        assert!(matches!(empty, Err(Error::Invalid { .. })));
    }
}
