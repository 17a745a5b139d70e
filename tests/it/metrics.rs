//! `/metrics` and `/healthz` of the daemon after scripted scenarios on the fake providers.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use ciscale::apply::ApplyOptions;
use ciscale::model::{BackendName, CiName, Desired};
use ciscale::providers::fake::{FakeWorld, Fault, FaultKind, Op};
use ciscale::providers::Providers;
use ciscale::watch::metrics::{self, Metrics};
use ciscale::watch::{self, WatchOptions};

const CONFIG: &str = r#"
id: metrics
pollInterval: 1s
ci:
  sim: { kind: fake }
backends:
  sim: { kind: fake }
metrics: { listen: "127.0.0.1:0" }
pools:
  - name: linux
    ci: { source: sim, labels: { platform: linux } }
    backend: { name: sim, machine: { serverType: small } }
    scale: { max: 3 }
"#;

fn desired() -> Desired {
    ciscale::config::load_str("metrics.yaml", CONFIG, &|_| None).expect("valid config")
}

fn providers(world: &FakeWorld) -> Providers {
    let mut providers = Providers::default();
    providers.backends.insert(BackendName::new("sim"), Arc::new(world.backend()));
    providers.ci.insert(CiName::new("sim"), Arc::new(world.ci()));
    providers
}

/// A plain HTTP/1.1 GET: the test needs no client library.
fn get(address: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(address).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let status = response.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
    (status, body)
}

fn value(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|number| number.parse().ok())
}

async fn run_cycles(desired: &Desired, providers: &Providers, metrics: &Arc<Metrics>, cycles: u64) {
    // Every plan of the run is judged by the safety oracle.
    let (inspect, ledger) = crate::safety::ledger::inspector();
    let options = WatchOptions {
        cycles: Some(cycles),
        apply: ApplyOptions { poll: Duration::from_millis(1), ..ApplyOptions::default() },
        inspect: Some(inspect),
        ..WatchOptions::default()
    };
    let (_keep, cancel) = tokio::sync::watch::channel(false);
    let mut desired = desired.clone();
    // Long enough for the fake's creates (milliseconds) to finish before the next cycle observes.
    desired.poll_interval = ciscale::model::GoDuration(Duration::from_millis(200));
    watch::run(&desired, providers, &options, &cancel, |report| metrics.record_cycle(report)).await;
    ledger.lock().expect("ledger").assert_safe();
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_describe_what_the_cycles_did() {
    let desired = desired();
    let world = FakeWorld::new();
    world.set_price("small", ciscale::model::Price { hourly: 0.5, currency: "EUR".to_owned() });
    for _ in 0..2 {
        world.push_task(BTreeMap::from([("platform".to_owned(), "linux".to_owned())]));
    }
    let shared = Arc::new(Metrics::new(Duration::from_secs(60)));
    let address = metrics::serve(desired.metrics.as_ref().expect("metrics configured").listen, shared.clone())
        .await
        .expect("listen");
    let providers = metrics::instrument(&providers(&world), &shared);
    run_cycles(&desired, &providers, &shared, 2).await;

    let (status, text) = tokio::task::spawn_blocking(move || get(address, "/metrics")).await.expect("scrape");
    assert_eq!(status, 200, "{text}");
    assert_eq!(value(&text, "ciscale_cycles_total"), Some(2.0), "{text}");
    assert_eq!(value(&text, r#"ciscale_actions_applied_total{action="create"}"#), Some(2.0), "{text}");
    assert_eq!(value(&text, r#"ciscale_desired_agents{pool="linux"}"#), Some(2.0), "{text}");
    assert_eq!(value(&text, r#"ciscale_pending_jobs{pool="linux"}"#), Some(2.0), "{text}");
    assert_eq!(value(&text, r#"ciscale_agents{pool="linux",state="idle"}"#), Some(2.0), "{text}");
    assert_eq!(value(&text, r#"ciscale_hourly_cost{currency="EUR"}"#), Some(1.0), "{text}");
    assert_eq!(
        value(&text, r#"ciscale_api_calls_total{provider="sim",kind="fake",operation="create",result="ok"}"#),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        value(&text, r#"ciscale_api_calls_total{provider="sim",kind="fake",operation="observe",result="ok"}"#),
        Some(4.0),
        "one backend and one CI observation per cycle: {text}"
    );
    assert_eq!(value(&text, "ciscale_create_to_ready_seconds_count"), Some(2.0), "{text}");
    assert_eq!(value(&text, "ciscale_cycle_duration_seconds_count"), Some(2.0), "{text}");

    let (status, body) = tokio::task::spawn_blocking(move || get(address, "/healthz")).await.expect("health");
    assert_eq!((status, body.trim()), (200, "ok"));
}

#[tokio::test(flavor = "multi_thread")]
async fn healthz_goes_bad_when_the_ci_server_is_down() {
    let desired = desired();
    let world = FakeWorld::new();
    let shared = Arc::new(Metrics::new(Duration::from_millis(300)));
    let address = metrics::serve("127.0.0.1:0".parse().expect("address"), shared.clone()).await.expect("listen");
    let providers = metrics::instrument(&providers(&world), &shared);

    run_cycles(&desired, &providers, &shared, 1).await;
    let (status, _) = tokio::task::spawn_blocking(move || get(address, "/healthz")).await.expect("health");
    assert_eq!(status, 200, "healthy after a good cycle");

    world.inject(Fault::new(Op::CiObserve, FaultKind::Unavailable5xx, 1_000));
    tokio::time::sleep(Duration::from_millis(350)).await;
    run_cycles(&desired, &providers, &shared, 1).await;
    let (status, body) = tokio::task::spawn_blocking(move || get(address, "/healthz")).await.expect("health");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no successful cycle"), "{body}");
    assert!(body.contains("could not observe ci source `sim`"), "says why: {body}");

    let (_, text) = tokio::task::spawn_blocking(move || get(address, "/metrics")).await.expect("scrape");
    assert_eq!(value(&text, "ciscale_cycle_failures_total"), Some(1.0), "{text}");
    assert_eq!(
        value(&text, r#"ciscale_api_calls_total{provider="sim",kind="fake",operation="observe",result="unavailable"}"#),
        Some(f64::from(ciscale::observe::OBSERVE_ATTEMPTS)),
        "{text}"
    );
}

/// A client that never finishes its request head is disconnected (after `HEADER_READ_TIMEOUT`) rather than held
/// for ever; the listener keeps answering others meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_never_finishes_its_request_head_is_disconnected() {
    let shared = Arc::new(Metrics::new(Duration::from_secs(60)));
    let address = metrics::serve("127.0.0.1:0".parse().expect("address"), shared).await.expect("listen");
    let slow = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(address).expect("connect");
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").expect("write a partial head");
        // Far longer than the timeout, so a listener without one fails this read with a timeout error.
        stream.set_read_timeout(Some(metrics::HEADER_READ_TIMEOUT * 3)).expect("read timeout");
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).map(|_| answer)
    });
    let (status, _) = tokio::task::spawn_blocking(move || get(address, "/healthz")).await.expect("health");
    assert_ne!(status, 0, "the listener answers others while one client stalls");
    let answer = slow.await.expect("slow client").expect("the connection is closed by the server, not timed out");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "{answer}");
}
