//! `POST /webhooks/{source}` on `watch`'s HTTP listener, in-process, with the in-repo GitHub fake as the source
//! (its payloads checked against GitHub's `workflow_job` webhook schema): each delivery is answered as its source
//! says (a verified one 202, a bad or missing signature 401, a bad payload 400, a source that takes none or a name
//! the config lacks 404), a body is read no further than the source's limit, refusals and deliveries are
//! counted, and a burst of deliveries wakes the loop once more, not once each. End to end with the real binary
//! and real Incus containers: `github_incus.rs`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ciscale::model::{Desired, GoDuration, Secret};
use ciscale::providers::github::webhook;
use ciscale::watch::metrics::{self, Metrics};
use ciscale::watch::webhooks::Webhooks;
use ciscale::watch::{self, CycleReport, Trigger, WatchOptions};
use tokio::sync::mpsc;

use crate::fakes::github::{FakeGithub, PAT};

const SECRET: &str = "It's a Secret to Everybody";

fn config(fake: &FakeGithub) -> String {
    format!(
        r#"id: hooks
pollInterval: 1h
ci:
  github: {{ kind: github, endpoint: "{}", repository: acme/app, token: "${{GITHUB_TOKEN}}", webhookSecret: "${{HOOK_SECRET}}" }}
  sim: {{ kind: fake }}
backends:
  sim: {{ kind: fake }}
metrics: {{ listen: "127.0.0.1:0" }}
pools:
  - {{ name: linux, ci: {{ source: github, labels: {{ docker: "" }} }}, backend: {{ name: sim }}, scale: {{ max: 2 }} }}
  - {{ name: other, ci: {{ source: sim, labels: {{ platform: linux }} }}, backend: {{ name: sim }}, scale: {{ max: 1 }} }}
"#,
        fake.url()
    )
}

fn load(fake: &FakeGithub) -> Desired {
    let env = |name: &str| match name {
        "GITHUB_TOKEN" => Some(PAT.to_owned()),
        "HOOK_SECRET" => Some(SECRET.to_owned()),
        _ => None,
    };
    ciscale::config::load_str("hooks.yaml", &config(fake), &env).expect("valid config")
}

/// One HTTP/1.1 exchange on a fresh connection: `head` (request line and headers, without the blank line) and
/// `body`; the status and the body of the answer.
pub(crate) fn exchange(address: SocketAddr, head: &str, body: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(address).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    write!(stream, "{head}\r\nHost: test\r\nConnection: close\r\n\r\n").expect("send head");
    stream.write_all(body).expect("send body");
    read_answer(&mut stream)
}

fn read_answer(stream: &mut TcpStream) -> (u16, String) {
    let mut response = Vec::new();
    // A server that answers before reading the whole body may reset the connection after its answer: what was
    // read until then is the answer.
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(read) => response.extend_from_slice(&chunk[..read]),
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(error) => panic!("reading the answer: {error}"),
        }
    }
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
    (status, body)
}

/// `POST /webhooks/{source}` of `body` with GitHub's headers; `signature`: the `X-Hub-Signature-256` value.
pub(crate) fn deliver(
    address: SocketAddr,
    source: &str,
    event: &str,
    signature: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    let signature = signature.map(|value| format!("\r\nX-Hub-Signature-256: {value}")).unwrap_or_default();
    let head = format!(
        "POST /webhooks/{source} HTTP/1.1\r\nContent-Type: application/json\r\nUser-Agent: GitHub-Hookshot/044aadd\r\n\
         X-GitHub-Event: {event}\r\nX-GitHub-Delivery: 72d3162e-cc78-11e3-81ab-4c9367dc0958{signature}\r\nContent-Length: {}",
        body.len()
    );
    exchange(address, &head, body)
}

fn signed(body: &[u8]) -> String {
    webhook::sign(&Secret::new(SECRET), body)
}

pub(crate) fn metric(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|number| number.parse().ok())
        .unwrap_or(0.0)
}

pub(crate) fn get(address: SocketAddr, path: &str) -> (u16, String) {
    exchange(address, &format!("GET {path} HTTP/1.1"), b"")
}

/// The listener with the config's sources, as `watch` serves it.
async fn listen(
    desired: &Desired,
) -> (SocketAddr, Arc<Webhooks>, mpsc::Receiver<Trigger>, ciscale::providers::Providers) {
    let shared = Arc::new(Metrics::new(Duration::from_secs(3600)));
    let providers = metrics::instrument(&ciscale::providers::connect(desired).expect("connect"), &shared);
    let (webhooks, triggers) = Webhooks::new(&providers.ci, shared.clone());
    let address = metrics::serve_with("127.0.0.1:0".parse().expect("address"), shared, Some(webhooks.clone()))
        .await
        .expect("listen");
    (address, webhooks, triggers, providers)
}

/// Off the runtime: the test's plain blocking HTTP client must not stall the server it talks to.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work).await.expect("blocking work")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_delivery_is_answered_as_its_source_says_and_only_verified_ones_wake_the_loop() {
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    let (_, jobs) = fake.queue_run("acme/app", &[&["self-hosted", "docker"]]);
    let desired = load(&fake);
    let (address, _webhooks, mut triggers, _providers) = listen(&desired).await;
    let queued = serde_json::to_vec(&fake.workflow_job_payload(jobs[0], "queued")).expect("json");

    // A verified `queued` delivery: 202 and one wake-up of the loop, naming the source and the job's repository.
    let body = queued.clone();
    let (status, text) =
        blocking(move || deliver(address, "github", "workflow_job", Some(&signed(&body)), &body)).await;
    assert_eq!(status, 202, "{text}");
    let trigger = triggers.try_recv().expect("a verified queued job wakes the loop");
    assert_eq!(trigger.source, "webhook github");
    assert!(trigger.reason.contains("queued") && trigger.reason.contains("acme/app"), "{}", trigger.reason);
    assert!(text.contains("reconciling now"), "{text}");

    // Verified, but nothing the loop must act on at once (the next poll sees a job start): 202, no wake-up.
    let runner = fake.add_runner("repos/acme/app", "someone-elses", &["self-hosted", "docker"]);
    fake.take_job(jobs[0], runner);
    let in_progress = serde_json::to_vec(&fake.workflow_job_payload(jobs[0], "in_progress")).expect("json");
    let body = in_progress.clone();
    let (status, _) = blocking(move || deliver(address, "github", "workflow_job", Some(&signed(&body)), &body)).await;
    assert_eq!(status, 202);
    assert!(triggers.try_recv().is_err(), "an in_progress delivery does not wake the loop");

    // Refused, and none of them wakes the loop: forged (another secret), unsigned, tampered, a signed body
    // that is not a workflow_job payload.
    let forged = webhook::sign(&Secret::new("guess"), &queued);
    let mut tampered = queued.clone();
    let at = tampered.len() / 2;
    tampered[at] ^= 1;
    let junk = br#"{"action": "queued"}"#.to_vec();
    let cases: Vec<(&str, Option<String>, Vec<u8>, u16)> = vec![
        ("forged", Some(forged.clone()), queued.clone(), 401),
        ("unsigned", None, queued.clone(), 401),
        ("tampered", Some(signed(&queued)), tampered, 401),
        ("malformed signature", Some("sha1=0123".to_owned()), queued.clone(), 401),
        ("not a workflow_job", Some(signed(&junk)), junk, 400),
    ];
    for (what, signature, body, expected) in cases {
        let (status, text) =
            blocking(move || deliver(address, "github", "workflow_job", signature.as_deref(), &body)).await;
        assert_eq!(status, expected, "{what}: {text}");
        assert!(!text.contains(SECRET) && !text.contains(&forged[7..]), "{what}: the answer holds no secret: {text}");
    }
    assert!(triggers.try_recv().is_err(), "no refused delivery woke the loop");

    // A source that takes no webhooks and a name the config lacks: 404, the first saying why; not `POST`: 405.
    let body = queued.clone();
    let (status, text) = blocking(move || deliver(address, "sim", "workflow_job", Some(&signed(&body)), &body)).await;
    assert_eq!(status, 404);
    assert!(text.contains("takes no webhooks"), "{text}");
    let body = queued.clone();
    let (status, text) =
        blocking(move || deliver(address, "gitlab", "workflow_job", Some(&signed(&body)), &body)).await;
    assert_eq!(status, 404);
    assert!(text.contains("no ci source named `gitlab`"), "{text}");
    let (status, _) = blocking(move || get(address, "/webhooks/github")).await;
    assert_eq!(status, 405);
    assert!(triggers.try_recv().is_err());

    let (_, exposition) = blocking(move || get(address, "/metrics")).await;
    assert_eq!(metric(&exposition, r#"ciscale_webhook_deliveries_total{source="github"}"#), 2.0, "{exposition}");
    for (labels, count) in [
        (r#"source="github",status="401""#, 4.0),
        (r#"source="github",status="400""#, 1.0),
        (r#"source="github",status="405""#, 1.0),
        (r#"source="sim",status="404""#, 1.0),
        // The unknown name is not a label value: whatever a stranger posts to cannot grow the metrics.
        (r#"source="",status="404""#, 1.0),
    ] {
        let series = format!("ciscale_webhook_refusals_total{{{labels}}}");
        assert_eq!(metric(&exposition, &series), count, "{series}:\n{exposition}");
    }
    assert!(!exposition.contains("gitlab"));
    assert_eq!(fake.spec_violations(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_is_read_no_further_than_the_sources_limit() {
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    let desired = load(&fake);
    let (address, _webhooks, mut triggers, providers) = listen(&desired).await;
    let limit = providers.ci[&ciscale::model::CiName::new("github")].webhook_max_body().expect("takes webhooks");

    // A declared length past the limit is refused before anything of the body is read: the answer comes though
    // not one byte of the body was sent.
    let head = format!(
        "POST /webhooks/github HTTP/1.1\r\nX-GitHub-Event: workflow_job\r\nX-Hub-Signature-256: sha256={}\r\n\
         Content-Length: {}",
        "0".repeat(64),
        limit + 1
    );
    let (status, text) = blocking(move || exchange(address, &head, b"")).await;
    assert_eq!(status, 413, "{text}");
    assert!(text.contains(&format!("{limit}-byte limit")), "{text}");

    // Without a length (chunked), reading stops at the first bytes past the limit: the answer comes while the
    // body is still unfinished (its last chunk never sent), so the rest was never waited for, let alone kept.
    let (status, text, elapsed) = blocking(move || {
        let mut stream = TcpStream::connect(address).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let started = Instant::now();
        write!(
            stream,
            "POST /webhooks/github HTTP/1.1\r\nHost: test\r\nX-GitHub-Event: workflow_job\r\nX-Hub-Signature-256: \
             sha256={}\r\nTransfer-Encoding: chunked\r\n\r\n",
            "0".repeat(64)
        )
        .expect("head");
        // One byte past the limit, in 64 KiB chunks, and no final chunk: a server that waited for the body's end
        // would wait until its timeout.
        let mut left = limit + 1;
        while left > 0 {
            let size = left.min(64 * 1024);
            let chunk = vec![b'x'; size];
            let sent = write!(stream, "{size:x}\r\n")
                .and_then(|()| stream.write_all(&chunk))
                .and_then(|()| stream.write_all(b"\r\n"));
            if sent.is_err() {
                break;
            }
            left -= size;
        }
        let (status, text) = read_answer(&mut stream);
        (status, text, started.elapsed())
    })
    .await;
    assert_eq!(status, 413, "{text}");
    eprintln!("MEASURED webhook route: 413 for an endless chunked body after {elapsed:?}");
    assert!(triggers.try_recv().is_err());

    // A body at the limit is read (and then refused for its signature, not its size).
    let body = vec![b' '; limit];
    let (status, text) = blocking(move || {
        deliver(address, "github", "workflow_job", Some(&format!("sha256={}", "0".repeat(64))), &body)
    })
    .await;
    assert_eq!(status, 401, "{text}");
}

/// The loop woken by the listener, in a task of its own; its reports as they come, with when.
struct Looping {
    reports: Arc<Mutex<Vec<(CycleReport, Instant)>>>,
    task: tokio::task::JoinHandle<()>,
    _cancel: tokio::sync::watch::Sender<bool>,
}

impl Looping {
    /// Starts the loop, polling an hour apart: after its first cycle only a wake-up starts one.
    async fn start(fake: &FakeGithub) -> (Self, SocketAddr) {
        let mut desired = load(fake);
        desired.poll_interval = GoDuration(Duration::from_secs(3600));
        let (address, _webhooks, triggers, providers) = listen(&desired).await;
        let reports: Arc<Mutex<Vec<(CycleReport, Instant)>>> = Arc::default();
        let seen = reports.clone();
        let (cancel_tx, cancel) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            watch::run_with_triggers(
                &desired,
                &providers,
                &WatchOptions::default(),
                &cancel,
                vec![triggers],
                |report| {
                    seen.lock().expect("reports").push((report.clone(), Instant::now()));
                },
            )
            .await;
        });
        let looping = Self { reports, task, _cancel: cancel_tx };
        looping.wait_for(1, "a first cycle").await;
        // Let the first cycle's report settle: nothing else may start a cycle for an hour.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(looping.cycles(), 1);
        (looping, address)
    }

    fn cycles(&self) -> usize {
        self.reports.lock().expect("reports").len()
    }

    async fn wait_for(&self, cycles: usize, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.cycles() < cycles {
            assert!(Instant::now() < deadline, "gave up waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for Looping {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A signed `queued` delivery of a new job that no pool takes (so no work, whose end starts a cycle of its own,
/// muddies the count).
fn untaken_job(fake: &FakeGithub) -> Vec<u8> {
    let (_, jobs) = fake.queue_run("acme/app", &[&["self-hosted", "gpu"]]);
    serde_json::to_vec(&fake.workflow_job_payload(jobs[0], "queued")).expect("json")
}

/// After the loop's first cycle, twenty verified deliveries at once start one more cycle (two if the burst
/// straddles that cycle's start), never twenty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_deliveries_wakes_the_loop_once_more_not_once_each() {
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    let (looping, address) = Looping::start(&fake).await;
    let body = untaken_job(&fake);
    let sent_at = Instant::now();
    let burst: Vec<_> = (0..20)
        .map(|_| {
            let body = body.clone();
            tokio::task::spawn_blocking(move || {
                deliver(address, "github", "workflow_job", Some(&signed(&body)), &body).0
            })
        })
        .collect();
    for delivery in burst {
        assert_eq!(delivery.await.expect("delivered"), 202);
    }
    looping.wait_for(2, "the burst's wake-up").await;
    let woke_after = looping.reports.lock().expect("reports")[1].1 - sent_at;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let total = looping.cycles();
    eprintln!(
        "MEASURED webhook burst: 20 deliveries → {} more cycle(s), the first reported {woke_after:?} after the burst began",
        total - 1
    );
    assert!((2..=3).contains(&total), "20 deliveries ran {} more cycles", total - 1);
    assert_eq!(fake.spec_violations(), Vec::<String>::new());
}

/// A delivery that comes while a cycle runs is not lost: that cycle may have read GitHub before the job was
/// queued, so another cycle follows it. The cycle woken by the first delivery is held in its first GitHub call
/// while the second delivery comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_while_a_cycle_runs_starts_another_after_it() {
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    let (looping, address) = Looping::start(&fake).await;
    fake.fail_next(crate::fakes::github::Fault::Delay(Duration::from_millis(1500)));
    let first = untaken_job(&fake);
    let (status, _) = blocking(move || deliver(address, "github", "workflow_job", Some(&signed(&first)), &first)).await;
    assert_eq!(status, 202);
    let deadline = Instant::now() + Duration::from_secs(30);
    while fake.faults_injected() < 1 {
        assert!(Instant::now() < deadline, "the woken cycle never called GitHub");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let second = untaken_job(&fake);
    let (status, _) =
        blocking(move || deliver(address, "github", "workflow_job", Some(&signed(&second)), &second)).await;
    assert_eq!(status, 202);
    assert_eq!(looping.cycles(), 1, "the woken cycle is still held in its GitHub call");
    looping.wait_for(3, "a cycle after the one the second delivery came during").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(looping.cycles(), 3, "one cycle per wake-up, nothing more");
}

/// Without `metrics.listen` nothing takes the deliveries a source expects: `watch` says so, and how to fix it.
#[test]
fn watch_warns_when_a_source_expects_webhooks_but_nothing_listens() {
    let fake = FakeGithub::start();
    fake.add_repo("acme/app");
    let dir = tempfile::tempdir().expect("temp dir");
    let text = config(&fake).replace("metrics: { listen: \"127.0.0.1:0\" }\n", "");
    assert!(!text.contains("metrics"));
    std::fs::write(dir.path().join("ciscale.yaml"), text).expect("write config");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ciscale"))
        .current_dir(dir.path())
        .args(["watch", "--cycles", "1", "-c", "ciscale.yaml"])
        .env_remove("CISCALE_LOG")
        .env("CISCALE_LOCK_DIR", dir.path())
        .env("NO_COLOR", "1")
        .env("GITHUB_TOKEN", PAT)
        .env("HOOK_SECRET", SECRET)
        .output()
        .expect("run watch");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let warning =
        stderr.lines().find(|line| line.contains("takes webhooks")).unwrap_or_else(|| panic!("no warning:\n{stderr}"));
    assert!(warning.contains("WARN") && warning.contains("`github`") && warning.contains("no listener"), "{warning}");
    assert!(
        stderr.contains("hint: set `metrics: { listen: ADDRESS:PORT }`") && stderr.contains("/webhooks/github"),
        "{stderr}"
    );
    assert!(!stderr.contains("`sim` takes webhooks"), "the fake CI takes none: {stderr}");
    assert!(!stderr.contains(SECRET) && !stderr.contains(PAT));
}
