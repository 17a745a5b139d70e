//! `POST /webhooks/{source}` on the daemon's HTTP listener (`metrics.listen`): webhook deliveries for the CI
//! sources that take them (GitHub's `workflow_job`), handed to their source and turned into a wake-up of the loop.
//!
//! The route owns only the HTTP side: which source a delivery is for (the path names it as the config does), how
//! much of its body is read (never more than the source's [`CiSource::webhook_max_body`]: a declared
//! `Content-Length` past it is refused before reading anything, a body that grows past it stops being read), and
//! what is answered. The source verifies and reads the delivery ([`CiSource::receive_webhook`]); when the notice
//! says so, a [`Trigger`] wakes the loop, exactly like an Incus event: a wake-up that comes while a cycle runs
//! starts the next one right after it, and a burst of them coalesces into one cycle. Nothing else is remembered
//! from a delivery here: the cycle it starts observes the CI afresh, and polling stays the safety net for
//! deliveries that never arrive (GitHub does not retry).
//!
//! A refusal is logged at warn with the source, status, reason, delivery id and peer, never the body or a
//! signature; deliveries and refusals are counted in the metrics.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::mpsc;

use super::metrics::Metrics;
use super::Trigger;
use crate::model::CiName;
use crate::providers::CiSource;

/// The path prefix; the rest of the path is the CI source's name in the config.
pub const PATH_PREFIX: &str = "/webhooks/";

/// The header GitHub (and Forgejo, Gitea) name a delivery by, for the log: it is not secret and lets an operator
/// find the delivery in the sender's "recent deliveries".
const DELIVERY_HEADERS: [&str; 3] = ["x-github-delivery", "x-forgejo-delivery", "x-gitea-delivery"];

/// How long a delivery's body may take to arrive. GitHub gives up on a delivery after 10 s; a sender that
/// trickles its body slower is holding a connection open, not delivering.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Wake-ups waiting for the loop's relay. One pending wake-up is as good as many (the loop coalesces them), so a
/// full channel drops the extra ones.
const WAKE_QUEUE: usize = 16;

/// The sources deliveries can be for, and where their wake-ups go. Shared by the listener's connections; a config
/// reload swaps both ([`Webhooks::replace`]).
pub struct Webhooks {
    routes: RwLock<Routes>,
    metrics: Arc<Metrics>,
}

struct Routes {
    sources: BTreeMap<CiName, Arc<dyn CiSource>>,
    wake: mpsc::Sender<Trigger>,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks").finish_non_exhaustive()
    }
}

/// What the route answers: the status and a one-line text for the sender's delivery log.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    status: StatusCode,
    text: String,
}

impl Answer {
    fn new(status: u16, text: impl Into<String>) -> Self {
        Self { status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), text: text.into() }
    }
}

impl Webhooks {
    /// Routes for `sources` (the loop's CI sources, by their config names) and the trigger stream to hand the loop
    /// with its other triggers.
    pub fn new(
        sources: &BTreeMap<CiName, Arc<dyn CiSource>>,
        metrics: Arc<Metrics>,
    ) -> (Arc<Self>, mpsc::Receiver<Trigger>) {
        let (wake, receiver) = mpsc::channel(WAKE_QUEUE);
        let routes = Routes { sources: sources.clone(), wake };
        (Arc::new(Self { routes: RwLock::new(routes), metrics }), receiver)
    }

    /// A reloaded config's sources take over, with a fresh trigger stream for the reload to hand the loop (the
    /// loop drops the old config's triggers when it switches). Deliveries from now on reach the new sources, so
    /// a repository a delivery names is noted in the source the next cycle observes through.
    pub fn replace(&self, sources: &BTreeMap<CiName, Arc<dyn CiSource>>) -> mpsc::Receiver<Trigger> {
        let (wake, receiver) = mpsc::channel(WAKE_QUEUE);
        let mut routes = self.routes.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        *routes = Routes { sources: sources.clone(), wake };
        receiver
    }

    /// The sources that take webhooks, for the startup log.
    pub fn receiving(&self) -> Vec<CiName> {
        let routes = self.routes.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        routes
            .sources
            .iter()
            .filter(|(_, source)| source.webhook_max_body().is_some())
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Answers one request whose path starts with [`PATH_PREFIX`].
    pub async fn respond(&self, request: Request<hyper::body::Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let name = request.uri().path().strip_prefix(PATH_PREFIX).unwrap_or_default().trim_end_matches('/').to_owned();
        let delivery = DELIVERY_HEADERS
            .iter()
            .find_map(|header| request.headers().get(*header))
            .and_then(|value| value.to_str().ok())
            .map(|id| id.chars().take(64).collect::<String>())
            .unwrap_or_default();
        let (known, answer) = self.receive(&name, request).await;
        // Only configured names become metric labels: an unknown name is whatever a stranger typed.
        let label = if known { name.as_str() } else { "" };
        if answer.status.is_success() {
            self.metrics.count_webhook(label, None);
        } else {
            self.metrics.count_webhook(label, Some(answer.status.as_u16()));
            // One line in the log (the answer keeps the refusal's `hint:` on a line of its own).
            let why = answer.text.lines().collect::<Vec<_>>().join("; ");
            tracing::warn!(
                source = %name.escape_debug(),
                status = answer.status.as_u16(),
                delivery,
                %peer,
                "webhook delivery refused: {why}"
            );
        }
        let mut text = answer.text;
        text.push('\n');
        let allow_post = answer.status == StatusCode::METHOD_NOT_ALLOWED;
        let mut response = Response::new(Full::new(Bytes::from(text)));
        *response.status_mut() = answer.status;
        let headers = response.headers_mut();
        headers
            .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"));
        if allow_post {
            headers.insert(hyper::header::ALLOW, hyper::header::HeaderValue::from_static("POST"));
        }
        response
    }

    /// Whether `name` is a configured source, and the answer.
    async fn receive(&self, name: &str, request: Request<hyper::body::Incoming>) -> (bool, Answer) {
        let source = {
            let routes = self.routes.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            routes.sources.iter().find(|(known, _)| known.as_str() == name).map(|(_, source)| source.clone())
        };
        let Some(source) = source else {
            let shown: String = name.chars().take(64).collect();
            return (false, Answer::new(404, format!("no ci source named `{}` in the config", shown.escape_debug())));
        };
        if request.method() != Method::POST {
            return (true, Answer::new(405, "webhook deliveries are `POST`ed"));
        }
        let (parts, body) = request.into_parts();
        let Some(limit) = source.webhook_max_body() else {
            // The source says why it takes none (and how to make it); it reads nothing of an empty body.
            let refusal = source.receive_webhook(&parts.headers, &[]).err();
            let text =
                refusal.map_or_else(|| format!("ci source `{name}` takes no webhooks"), |refusal| refusal.message);
            return (true, Answer::new(404, text));
        };
        let body = match read_body(body, &parts.headers, limit).await {
            Ok(body) => body,
            Err(answer) => return (true, answer),
        };
        match source.receive_webhook(&parts.headers, &body) {
            Ok(notice) => {
                if notice.wake {
                    tracing::info!(source = name, "webhook: {}; reconciling now", notice.reason);
                    // The stream of now: a reload while the body was read has handed the loop a new one.
                    let wake = self.routes.read().unwrap_or_else(std::sync::PoisonError::into_inner).wake.clone();
                    // Full: wake-ups are pending already, and one is as good as many. Closed: the loop is ending.
                    drop(wake.try_send(Trigger { source: format!("webhook {name}"), reason: notice.reason.clone() }));
                    (true, Answer::new(202, format!("{}; reconciling now", notice.reason)))
                } else {
                    tracing::debug!(source = name, "webhook: {}", notice.reason);
                    (true, Answer::new(202, notice.reason))
                }
            }
            Err(refusal) => (true, Answer::new(refusal.status, refusal.message)),
        }
    }
}

/// Reads at most `limit` bytes of a body: 413 as soon as it is known to be longer (its `Content-Length`, else
/// the first bytes past the limit), 408 when it does not arrive in time.
async fn read_body(body: hyper::body::Incoming, headers: &hyper::HeaderMap, limit: usize) -> Result<Bytes, Answer> {
    let too_large = || Answer::new(413, format!("the delivery is larger than the {limit}-byte limit"));
    let declared = headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok());
    if declared.is_some_and(|length| length > u64::try_from(limit).unwrap_or(u64::MAX)) {
        return Err(too_large());
    }
    match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, limit).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) if error.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Ok(Err(error)) => Err(Answer::new(400, format!("could not read the delivery: {error}"))),
        Err(_) => {
            Err(Answer::new(408, format!("the delivery's body did not arrive within {}s", BODY_TIMEOUT.as_secs())))
        }
    }
}
