//! Prometheus metrics and the health check of the daemon, served on `metrics.listen` (`/metrics`, `/healthz`), the
//! daemon's one HTTP listener, which also takes webhook deliveries (`POST /webhooks/{source}`, [`super::webhooks`]).
//!
//! Everything is derived from what a cycle reports ([`CycleReport`]) and from an instrumenting decorator around the
//! providers ([`instrument`]), which counts API calls by provider, operation and result and times create → ready.
//! Names follow Prometheus conventions: `ciscale_` prefix, `_total` counters, `_seconds` durations.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::CycleReport;
use crate::model::{AgentId, BackendObservation, CiObservation, Instance, InstanceId, InstanceState};
use crate::providers::{
    AgentCredential, Backend, Capabilities, CiCapabilities, CiSource, CreateInstance, Error, Exec, ExecOutput,
    ListInstances, Providers, PushFile, RegisterAgent, Result,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolStateLabels {
    pool: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabels {
    provider: String,
    kind: String,
    operation: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WebhookLabels {
    /// The CI source's config name; empty for a name the config does not have.
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WebhookRefusalLabels {
    source: String,
    /// The HTTP status answered (401 bad or missing signature, 400 bad payload, 404, 413, ...).
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CurrencyLabels {
    currency: String,
}

/// The daemon's metrics and health. Cheap to share behind an `Arc`.
pub struct Metrics {
    registry: Registry,
    agents: Family<PoolStateLabels, Gauge>,
    desired_agents: Family<PoolLabels, Gauge>,
    pending_jobs: Family<PoolLabels, Gauge>,
    actions: Family<ActionLabels, Counter>,
    action_failures: Family<ActionLabels, Counter>,
    api_calls: Family<ApiLabels, Counter>,
    create_to_ready: Histogram,
    cycle_seconds: Histogram,
    cycles: Counter,
    cycle_failures: Counter,
    hourly_cost: Family<CurrencyLabels, Gauge<f64, AtomicU64>>,
    circuit_open: Family<PoolLabels, Gauge>,
    held_back: Counter,
    in_flight: Gauge,
    abandoned: Counter,
    unobserved: Gauge,
    webhook_deliveries: Family<WebhookLabels, Counter>,
    webhook_refusals: Family<WebhookRefusalLabels, Counter>,
    health: Mutex<Health>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Health {
    started: Instant,
    last_success: Option<Instant>,
    last_error: Option<String>,
    /// Unhealthy once no cycle has succeeded for this long.
    allowed_silence: Duration,
}

impl Metrics {
    /// `allowed_silence`: `/healthz` fails once no cycle has succeeded for this long (e.g. 3 poll intervals).
    pub fn new(allowed_silence: Duration) -> Self {
        let mut registry = Registry::with_prefix("ciscale");
        let agents = Family::<PoolStateLabels, Gauge>::default();
        registry.register("agents", "Observed agents per pool by state (busy, idle)", agents.clone());
        let desired_agents = Family::<PoolLabels, Gauge>::default();
        registry.register("desired_agents", "Agents the plan wants per pool", desired_agents.clone());
        let pending_jobs = Family::<PoolLabels, Gauge>::default();
        registry.register("pending_jobs", "Waiting jobs this pool can take", pending_jobs.clone());
        let actions = Family::<ActionLabels, Counter>::default();
        registry.register("actions_applied", "Changes carried out, by action", actions.clone());
        let action_failures = Family::<ActionLabels, Counter>::default();
        registry.register("actions_failed", "Changes that failed, by action", action_failures.clone());
        let api_calls = Family::<ApiLabels, Counter>::default();
        registry.register("api_calls", "Provider API calls by provider, operation and result", api_calls.clone());
        // Cloud servers take tens of seconds, containers well under one: buckets cover both.
        let create_to_ready = Histogram::new([0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]);
        registry.register(
            "create_to_ready_seconds",
            "Time from a create call to the instance running",
            create_to_ready.clone(),
        );
        let cycle_seconds = Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]);
        registry.register("cycle_duration_seconds", "Duration of one observe-plan-apply cycle", cycle_seconds.clone());
        let cycles = Counter::default();
        registry.register("cycles", "Cycles run", cycles.clone());
        let cycle_failures = Counter::default();
        registry.register("cycle_failures", "Cycles that could not observe or plan", cycle_failures.clone());
        let hourly_cost = Family::<CurrencyLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "hourly_cost",
            "Hourly cost of the instances after the last plan, per currency",
            hourly_cost.clone(),
        );
        let circuit_open = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "circuit_open",
            "1 while a pool's create circuit breaker is open or half-open",
            circuit_open.clone(),
        );
        let held_back = Counter::default();
        registry.register(
            "creates_held_back",
            "Creates held back for a later cycle by a create rate or a circuit breaker",
            held_back.clone(),
        );
        let in_flight = Gauge::default();
        registry.register("changes_in_flight", "Changes started and not yet finished", in_flight.clone());
        let abandoned = Counter::default();
        registry.register(
            "changes_abandoned",
            "Changes abandoned at their deadline (counted as failed too)",
            abandoned.clone(),
        );
        let unobserved = Gauge::default();
        registry.register(
            "sources_unobserved",
            "Backend accounts and CI sources the last cycle could not observe",
            unobserved.clone(),
        );
        let webhook_deliveries = Family::<WebhookLabels, Counter>::default();
        registry.register(
            "webhook_deliveries",
            "Webhook deliveries accepted (verified), by CI source",
            webhook_deliveries.clone(),
        );
        let webhook_refusals = Family::<WebhookRefusalLabels, Counter>::default();
        registry.register(
            "webhook_refusals",
            "Webhook deliveries refused, by CI source and HTTP status",
            webhook_refusals.clone(),
        );
        Self {
            registry,
            agents,
            desired_agents,
            pending_jobs,
            actions,
            action_failures,
            api_calls,
            create_to_ready,
            cycle_seconds,
            cycles,
            cycle_failures,
            hourly_cost,
            circuit_open,
            held_back,
            in_flight,
            abandoned,
            unobserved,
            webhook_deliveries,
            webhook_refusals,
            health: Mutex::new(Health {
                started: Instant::now(),
                last_success: None,
                last_error: None,
                allowed_silence,
            }),
        }
    }

    /// Takes in what one cycle did.
    pub fn record_cycle(&self, report: &CycleReport) {
        self.cycles.inc();
        self.cycle_seconds.observe(report.duration_ms as f64 / 1000.0);
        if let Ok(mut health) = self.health.lock() {
            match &report.error {
                Some(error) => health.last_error = Some(error.clone()),
                None => {
                    health.last_success = Some(Instant::now());
                    health.last_error = None;
                }
            }
        }
        if report.error.is_some() {
            self.cycle_failures.inc();
        }
        self.in_flight.set(i64::try_from(report.in_flight).unwrap_or(i64::MAX));
        self.unobserved.set(i64::try_from(report.unobserved.len()).unwrap_or(i64::MAX));
        self.abandoned.inc_by(u64::try_from(report.abandoned).unwrap_or(u64::MAX));
        // A cycle that could not observe some sources still planned (and reports) the pools that did not need them;
        // the others keep their last values rather than dropping to zero.
        for status in &report.pools {
            let pool = status.pool.to_string();
            self.agents
                .get_or_create(&PoolStateLabels { pool: pool.clone(), state: "busy".into() })
                .set(status.busy.into());
            self.agents
                .get_or_create(&PoolStateLabels { pool: pool.clone(), state: "idle".into() })
                .set(status.idle.into());
            self.desired_agents.get_or_create(&PoolLabels { pool: pool.clone() }).set(status.desired.into());
            let open = report.circuits_open.contains(&status.pool);
            self.circuit_open.get_or_create(&PoolLabels { pool: pool.clone() }).set(i64::from(open));
            self.pending_jobs.get_or_create(&PoolLabels { pool }).set(status.pending_jobs.into());
        }
        self.held_back.inc_by(u64::try_from(report.held_back).unwrap_or(u64::MAX));
        for (action, count) in &report.applied_by_action {
            self.actions.get_or_create(&ActionLabels { action: action.clone() }).inc_by((*count).into());
        }
        for (action, count) in &report.failed_by_action {
            self.action_failures.get_or_create(&ActionLabels { action: action.clone() }).inc_by((*count).into());
        }
        // A partial view prices only what it saw: keep the last full figure instead.
        for (currency, hourly) in report.hourly_cost.iter().filter(|_| report.unobserved.is_empty()) {
            self.hourly_cost.get_or_create(&CurrencyLabels { currency: currency.clone() }).set(*hourly);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }

    /// `Ok` while a cycle succeeded within the allowed silence (or the daemon is younger than that).
    pub fn health(&self) -> std::result::Result<(), String> {
        let Ok(health) = self.health.lock() else {
            return Err("health state unavailable".to_owned());
        };
        let since = health.last_success.unwrap_or(health.started);
        if since.elapsed() <= health.allowed_silence {
            return Ok(());
        }
        let why = health.last_error.as_deref().unwrap_or("no cycle finished");
        Err(format!("no successful cycle for {}s: {why}", since.elapsed().as_secs()))
    }

    /// One webhook delivery for `source` (empty: not a configured name): accepted, or refused with `status`.
    pub(crate) fn count_webhook(&self, source: &str, refused: Option<u16>) {
        let source = source.to_owned();
        match refused {
            None => self.webhook_deliveries.get_or_create(&WebhookLabels { source }).inc(),
            Some(status) => {
                self.webhook_refusals.get_or_create(&WebhookRefusalLabels { source, status: status.to_string() }).inc()
            }
        };
    }

    fn count_call(&self, provider: &str, kind: &str, operation: &str, result: &str) {
        let labels = ApiLabels {
            provider: provider.to_owned(),
            kind: kind.to_owned(),
            operation: operation.to_owned(),
            result: result.to_owned(),
        };
        self.api_calls.get_or_create(&labels).inc();
    }
}

/// How long a client may take to send a request's head before its connection is closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `/metrics` and `/healthz` until the process ends. Binding errors are returned; a failed connection is
/// only logged.
pub async fn serve(listen: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    serve_with(listen, metrics, None).await
}

/// [`serve`], and `POST /webhooks/{source}` when `webhooks` is given.
pub async fn serve_with(
    listen: SocketAddr,
    metrics: Arc<Metrics>,
    webhooks: Option<Arc<super::webhooks::Webhooks>>,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let (metrics, webhooks) = (metrics.clone(), webhooks.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    respond(request, peer, metrics.clone(), webhooks.clone())
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    // A client that never finishes its request head (slowloris) would hold a task and a socket
                    // for ever; webhooks may face the internet through a proxy, so heads get a deadline.
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "metrics connection failed");
                }
            });
        }
    });
    Ok(bound)
}

async fn respond(
    request: Request<hyper::body::Incoming>,
    peer: SocketAddr,
    metrics: Arc<Metrics>,
    webhooks: Option<Arc<super::webhooks::Webhooks>>,
) -> std::result::Result<Response<Full<Bytes>>, Infallible> {
    if let Some(webhooks) = webhooks.filter(|_| request.uri().path().starts_with(super::webhooks::PATH_PREFIX)) {
        return Ok(webhooks.respond(request, peer).await);
    }
    let (status, content_type, body) = match request.uri().path() {
        "/metrics" => (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", metrics.encode()),
        "/healthz" => match metrics.health() {
            Ok(()) => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
            Err(why) => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("{why}\n")),
        },
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found: try /metrics or /healthz\n".to_owned()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
    }
    Ok(response)
}

/// Wraps every provider so its calls are counted (and creates timed until ready) in `metrics`.
pub fn instrument(providers: &Providers, metrics: &Arc<Metrics>) -> Providers {
    Providers {
        backends: providers
            .backends
            .iter()
            .map(|(name, backend)| {
                let counted: Arc<dyn Backend> = Arc::new(CountedBackend {
                    name: name.to_string(),
                    inner: backend.clone(),
                    metrics: metrics.clone(),
                    creating: Mutex::default(),
                });
                (name.clone(), counted)
            })
            .collect(),
        ci: providers
            .ci
            .iter()
            .map(|(name, source)| {
                let counted: Arc<dyn CiSource> =
                    Arc::new(CountedCi { name: name.to_string(), inner: source.clone(), metrics: metrics.clone() });
                (name.clone(), counted)
            })
            .collect(),
    }
}

/// The label value of a call's result: `ok` or the error's kind, never its message (which may be unbounded).
fn result_label<T>(result: &Result<T>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(Error::NotFound { .. }) => "not_found",
        Err(Error::AlreadyExists { .. }) => "already_exists",
        Err(Error::RateLimited { .. }) => "rate_limited",
        Err(Error::Unauthenticated { .. }) => "unauthenticated",
        Err(Error::Capacity { .. }) => "capacity",
        Err(Error::Unavailable { .. }) => "unavailable",
        Err(Error::Invalid { .. }) => "invalid",
        Err(Error::Unsupported { .. }) => "unsupported",
        Err(_) => "other",
    }
}

struct CountedBackend {
    name: String,
    inner: Arc<dyn Backend>,
    metrics: Arc<Metrics>,
    /// Instances created by this process and not yet seen running: id → when the create call started.
    creating: Mutex<BTreeMap<InstanceId, Instant>>,
}

impl std::fmt::Debug for CountedBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountedBackend").field("name", &self.name).field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl CountedBackend {
    fn count<T>(&self, operation: &str, result: &Result<T>) {
        self.metrics.count_call(&self.name, self.inner.kind(), operation, result_label(result));
    }

    fn seen(&self, instances: &[&Instance]) {
        let Ok(mut creating) = self.creating.lock() else {
            return;
        };
        for instance in instances.iter().filter(|instance| instance.state == InstanceState::Running) {
            if let Some(started) = creating.remove(&instance.id) {
                self.metrics.create_to_ready.observe(started.elapsed().as_secs_f64());
            }
        }
    }
}

#[async_trait]
impl Backend for CountedBackend {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn observe(&self, request: &ListInstances) -> Result<BackendObservation> {
        let result = self.inner.observe(request).await;
        self.count("observe", &result);
        if let Ok(observation) = &result {
            self.seen(&observation.instances.iter().collect::<Vec<_>>());
        }
        result
    }
    async fn create(&self, request: &CreateInstance) -> Result<Instance> {
        let started = Instant::now();
        let result = self.inner.create(request).await;
        self.count("create", &result);
        if let Ok(instance) = &result {
            if let Ok(mut creating) = self.creating.lock() {
                creating.insert(instance.id.clone(), started);
            }
            self.seen(&[instance]);
        }
        result
    }
    async fn get(&self, id: &InstanceId) -> Result<Instance> {
        let result = self.inner.get(id).await;
        self.count("get", &result);
        if let Ok(instance) = &result {
            self.seen(&[instance]);
        }
        result
    }
    async fn start(&self, id: &InstanceId) -> Result<()> {
        let result = self.inner.start(id).await;
        self.count("start", &result);
        result
    }
    async fn stop(&self, id: &InstanceId) -> Result<()> {
        let result = self.inner.stop(id).await;
        self.count("stop", &result);
        result
    }
    async fn delete(&self, id: &InstanceId) -> Result<()> {
        let result = self.inner.delete(id).await;
        self.count("delete", &result);
        result
    }
    async fn push_file(&self, id: &InstanceId, file: &PushFile) -> Result<()> {
        let result = self.inner.push_file(id, file).await;
        self.count("push_file", &result);
        result
    }
    async fn exec(&self, id: &InstanceId, exec: &Exec) -> Result<ExecOutput> {
        let result = self.inner.exec(id, exec).await;
        self.count("exec", &result);
        result
    }
}

#[derive(Debug)]
struct CountedCi {
    name: String,
    inner: Arc<dyn CiSource>,
    metrics: Arc<Metrics>,
}

impl CountedCi {
    fn count<T>(&self, operation: &str, result: &Result<T>) {
        self.metrics.count_call(&self.name, self.inner.kind(), operation, result_label(result));
    }
}

#[async_trait]
impl CiSource for CountedCi {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn capabilities(&self) -> CiCapabilities {
        self.inner.capabilities()
    }
    fn cloud_user_data(&self, env_file: &crate::model::Secret) -> Result<crate::model::Secret> {
        self.inner.cloud_user_data(env_file)
    }
    fn webhook_max_body(&self) -> Option<usize> {
        self.inner.webhook_max_body()
    }
    fn receive_webhook(
        &self,
        headers: &reqwest::header::HeaderMap,
        body: &[u8],
    ) -> std::result::Result<crate::providers::WebhookNotice, crate::providers::WebhookRefusal> {
        self.inner.receive_webhook(headers, body)
    }
    async fn observe(&self) -> Result<CiObservation> {
        let result = self.inner.observe().await;
        self.count("observe", &result);
        result
    }
    async fn register(&self, request: &RegisterAgent) -> Result<AgentCredential> {
        let result = self.inner.register(request).await;
        self.count("register", &result);
        result
    }
    async fn drain(&self, id: &AgentId) -> Result<()> {
        let result = self.inner.drain(id).await;
        self.count("drain", &result);
        result
    }
    async fn undrain(&self, id: &AgentId) -> Result<()> {
        let result = self.inner.undrain(id).await;
        self.count("undrain", &result);
        result
    }
    async fn deregister(&self, id: &AgentId) -> Result<()> {
        let result = self.inner.deregister(id).await;
        self.count("deregister", &result);
        result
    }
}
