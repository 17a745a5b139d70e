//! GitHub webhook deliveries: the signature check and the `workflow_job` event.
//!
//! GitHub signs every delivery with the webhook's secret: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the
//! raw body>`. [`WebhookVerifier::receive`] refuses a delivery larger than its limit before reading anything into
//! it, then checks the signature in constant time (`hmac`'s `verify_slice`), and only then parses the body; a
//! delivery without a valid signature is never parsed. The listener (`watch`'s HTTP server, `POST
//! /webhooks/{source}` in [`crate::watch::webhooks`]) stops reading a body past [`WebhookVerifier::max_body`] and
//! answers [`WebhookError::status`].
//!
//! A `workflow_job` delivery (`queued`, `waiting`, `in_progress`, `completed`) wakes the loop when it changes what
//! is needed ([`WorkflowJobEvent::wakes_loop`]), tells the source which repository to poll next
//! ([`GithubActions::note_workflow_job`](super::GithubActions::note_workflow_job)), and carries the job as a queue
//! task ([`WorkflowJobEvent::task`]). Polling stays the safety net: GitHub does not retry failed deliveries.

use hmac::{Hmac, Mac};
use reqwest::header::HeaderMap;
use serde::Deserialize;
use sha2::Sha256;

use super::wire::REPOSITORY_LABEL;
use crate::model::{AgentId, Secret, Task, TaskId};

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";
/// The event name header (`workflow_job`, `ping`, ...).
pub const EVENT_HEADER: &str = "x-github-event";
/// The delivery's unique id (GitHub's redelivery keeps it).
pub const DELIVERY_HEADER: &str = "x-github-delivery";
/// The largest body accepted by default. A `workflow_job` payload is a few kilobytes (its steps and the
/// repository); GitHub caps any payload at 25 MB, which no event ciscale reads comes near.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;

/// Why a delivery was refused. Never holds the secret, a signature or the body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("the webhook secret is empty\nhint: set the same secret here and in the webhook's settings on GitHub")]
    EmptySecret,
    #[error("delivery of {size} bytes is larger than the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("delivery has no `X-Hub-Signature-256` header\nhint: set a secret in the webhook's settings on GitHub")]
    MissingSignature,
    #[error("`X-Hub-Signature-256` is not `sha256=` and 64 hex digits")]
    MalformedSignature,
    #[error(
        "`X-Hub-Signature-256` does not match the body\nhint: the webhook's secret on GitHub differs from ciscale's"
    )]
    BadSignature,
    #[error("delivery has no `X-GitHub-Event` header")]
    MissingEvent,
    #[error("`{event}` delivery is not what GitHub sends: {detail}")]
    Payload { event: String, detail: String },
}

impl WebhookError {
    /// The HTTP status the listener answers with.
    pub fn status(&self) -> u16 {
        match self {
            WebhookError::EmptySecret => 500,
            WebhookError::TooLarge { .. } => 413,
            WebhookError::MissingSignature | WebhookError::MalformedSignature | WebhookError::BadSignature => 401,
            WebhookError::MissingEvent | WebhookError::Payload { .. } => 400,
        }
    }
}

/// Checks and reads deliveries signed with one secret.
#[derive(Clone)]
pub struct WebhookVerifier {
    secret: Secret,
    max_body: usize,
}

impl std::fmt::Debug for WebhookVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookVerifier").field("secret", &self.secret).field("max_body", &self.max_body).finish()
    }
}

/// One verified delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// `X-GitHub-Delivery`, when sent.
    pub id: Option<String>,
    pub event: Event,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    WorkflowJob(WorkflowJobEvent),
    /// Sent once when the webhook is created.
    Ping,
    /// Any other event the webhook is subscribed to; ignored.
    Other(String),
}

/// What a `workflow_job` delivery says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkflowJobEvent {
    pub action: JobAction,
    pub job_id: u64,
    pub run_id: u64,
    /// `owner/name`.
    pub repository: String,
    /// The job's `runs-on`.
    pub labels: Vec<String>,
    /// The runner that took it (`in_progress`, `completed`).
    pub runner_id: Option<u64>,
    pub runner_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobAction {
    Queued,
    /// Waiting for an environment's approval: wants no runner yet.
    Waiting,
    InProgress,
    Completed,
    /// An action this version does not know.
    Other(String),
}

impl std::fmt::Display for JobAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            JobAction::Queued => "queued",
            JobAction::Waiting => "waiting",
            JobAction::InProgress => "in_progress",
            JobAction::Completed => "completed",
            JobAction::Other(other) => other,
        })
    }
}

impl WorkflowJobEvent {
    /// Whether the delivery changes what the loop should do now: a queued job may need a runner, a completed one
    /// leaves a runner (and its instance) to clean up. `in_progress` moves demand from pending to running and
    /// `waiting` wants nothing yet; the next poll sees those.
    pub fn wakes_loop(&self) -> bool {
        matches!(self.action, JobAction::Queued | JobAction::Completed)
    }

    /// The job as a queue task, labelled like the polled ones (`repository`, demands = `runs-on`).
    pub fn task(&self) -> Task {
        Task {
            id: TaskId::new(self.job_id.to_string()),
            labels: [(REPOSITORY_LABEL.to_owned(), self.repository.clone())].into(),
            demands: self.labels.clone(),
            agent_id: self.runner_id.filter(|id| *id > 0).map(|id| AgentId::new(id.to_string())),
        }
    }
}

impl WebhookVerifier {
    pub fn new(secret: Secret) -> Result<Self, WebhookError> {
        if secret.expose().is_empty() {
            return Err(WebhookError::EmptySecret);
        }
        Ok(Self { secret, max_body: DEFAULT_MAX_BODY })
    }

    pub fn with_max_body(mut self, max_body: usize) -> Self {
        self.max_body = max_body;
        self
    }

    /// The largest body accepted: the listener stops reading past it.
    pub fn max_body(&self) -> usize {
        self.max_body
    }

    /// Checks `signature` (the `X-Hub-Signature-256` value) against `body`, in constant time.
    pub fn verify(&self, signature: Option<&str>, body: &[u8]) -> Result<(), WebhookError> {
        if body.len() > self.max_body {
            return Err(WebhookError::TooLarge { size: body.len(), limit: self.max_body });
        }
        let signature = signature.ok_or(WebhookError::MissingSignature)?.trim();
        let digest = signature
            .strip_prefix("sha256=")
            .filter(|hex| hex.len() == 64)
            .and_then(|hex| hex::decode(hex).ok())
            .ok_or(WebhookError::MalformedSignature)?;
        let mut mac =
            Hmac::<Sha256>::new_from_slice(self.secret.expose().as_bytes()).map_err(|_| WebhookError::EmptySecret)?;
        mac.update(body);
        mac.verify_slice(&digest).map_err(|_| WebhookError::BadSignature)
    }

    /// Verifies a delivery and reads it: size, then signature, then the event.
    pub fn receive(&self, headers: &HeaderMap, body: &[u8]) -> Result<Delivery, WebhookError> {
        let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
        self.verify(header(SIGNATURE_HEADER), body)?;
        let event = header(EVENT_HEADER).ok_or(WebhookError::MissingEvent)?.trim().to_owned();
        let id = header(DELIVERY_HEADER).map(str::to_owned);
        let event = match event.as_str() {
            "workflow_job" => Event::WorkflowJob(parse_workflow_job(body)?),
            "ping" => Event::Ping,
            _ => Event::Other(event),
        };
        Ok(Delivery { id, event })
    }
}

/// Signs `body` as GitHub does: the `X-Hub-Signature-256` value for `secret`.
pub fn sign(secret: &Secret, body: &[u8]) -> String {
    // HMAC takes a key of any length: this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()).expect("hmac accepts any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The parts of the payload ciscale reads. Required by the spec and needed: `action`, `workflow_job.id`,
/// `repository.full_name`; `run_id` may be missing in an older server's payload (it is only informational);
/// `labels` missing reads as none (such a job makes no runner).
#[derive(Deserialize)]
struct Payload {
    action: String,
    workflow_job: PayloadJob,
    repository: PayloadRepository,
}

#[derive(Deserialize)]
struct PayloadJob {
    id: u64,
    /// `number` in the webhook schema.
    #[serde(default)]
    run_id: Option<serde_json::Number>,
    #[serde(default)]
    labels: Option<Vec<String>>,
    #[serde(default)]
    runner_id: Option<u64>,
    #[serde(default)]
    runner_name: Option<String>,
}

#[derive(Deserialize)]
struct PayloadRepository {
    full_name: String,
}

fn parse_workflow_job(body: &[u8]) -> Result<WorkflowJobEvent, WebhookError> {
    let payload: Payload = serde_json::from_slice(body)
        .map_err(|error| WebhookError::Payload { event: "workflow_job".to_owned(), detail: error.to_string() })?;
    let action = match payload.action.as_str() {
        "queued" => JobAction::Queued,
        "waiting" => JobAction::Waiting,
        "in_progress" => JobAction::InProgress,
        "completed" => JobAction::Completed,
        other => JobAction::Other(other.to_owned()),
    };
    let run_id = payload
        .workflow_job
        .run_id
        .and_then(|number| number.as_u64().or_else(|| number.as_f64().map(|f| f as u64)))
        .unwrap_or_default();
    Ok(WorkflowJobEvent {
        action,
        job_id: payload.workflow_job.id,
        run_id,
        repository: payload.repository.full_name,
        labels: payload.workflow_job.labels.unwrap_or_default(),
        runner_id: payload.workflow_job.runner_id,
        runner_name: payload.workflow_job.runner_name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 4231 test case 2: HMAC-SHA256 of "what do ya want for nothing?" with key "Jefe".
    const RFC4231_DIGEST: &str = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";

    #[test]
    fn signatures_follow_hmac_sha256() {
        let secret = Secret::new("Jefe");
        let body = b"what do ya want for nothing?";
        assert_eq!(sign(&secret, body), format!("sha256={RFC4231_DIGEST}"));
        let verifier = WebhookVerifier::new(secret).expect("verifier");
        verifier.verify(Some(&format!("sha256={RFC4231_DIGEST}")), body).expect("good");
        verifier
            .verify(Some(&format!("sha256={}", RFC4231_DIGEST.to_uppercase())), body)
            .expect("hex in capitals is the same digest");
        assert_eq!(
            verifier.verify(Some(&format!("sha256={RFC4231_DIGEST}")), b"what do ya want for nothing!"),
            Err(WebhookError::BadSignature)
        );
        let flipped = format!("sha256={}4", &RFC4231_DIGEST[..63]);
        assert_eq!(verifier.verify(Some(&flipped), body), Err(WebhookError::BadSignature));
        assert_eq!(verifier.verify(None, body), Err(WebhookError::MissingSignature));
        for malformed in [RFC4231_DIGEST, "sha1=abc", "sha256=xyz", "sha256=", &format!("sha256={RFC4231_DIGEST}00")] {
            assert_eq!(verifier.verify(Some(malformed), body), Err(WebhookError::MalformedSignature), "{malformed}");
        }
    }

    #[test]
    fn size_is_checked_before_the_signature() {
        let verifier = WebhookVerifier::new(Secret::new("s")).expect("verifier").with_max_body(8);
        assert_eq!(verifier.verify(None, b"123456789"), Err(WebhookError::TooLarge { size: 9, limit: 8 }));
        assert_eq!(WebhookError::TooLarge { size: 9, limit: 8 }.status(), 413);
        assert_eq!(WebhookError::BadSignature.status(), 401);
        assert!(WebhookVerifier::new(Secret::new("")).is_err());
    }
}
