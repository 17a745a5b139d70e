//! The EC2 backend (`kind: aws`) against moto's EC2 server (the real SDK client over HTTP), the API calls it
//! makes per idle cycle, its error mapping against a tiny stub speaking EC2's error format, and the `ciscale`
//! binary end to end against moto plus the fake CI, in create mode and in start/stop mode, with a kill -9.
//!
//! moto runs outside the test binary: `scripts/test` installs and starts it and exports `CISCALE_TEST_MOTO`.
//! moto is reset once per test binary run; every test uses its own owner id so they run concurrently.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_ec2::types::{Filter, InstanceStateName, InstanceType, ResourceType, Tag, TagSpecification};
use ciscale::model::{FakeSpec, InstanceId, InstanceState, PoolName, Secret, OWNER_LABEL, POOL_LABEL};
use ciscale::providers::aws::{Ec2, Ec2Settings};
use ciscale::providers::fake::FakeWorld;
use ciscale::providers::{Backend, CiSource, CreateInstance, Error, ListInstances, Providers, RegisterAgent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::conformance::{backend_conformance_on, Patience};

pub(crate) const AMI: &str = "ami-12c6146b";
/// moto's transitions are instant; a few looks are plenty, the interval only spares its CPU.
const MOTO_PATIENCE: Patience = Patience { attempts: 50, interval: Duration::from_millis(100) };
/// Upper bound for the end-to-end runs to reach a state; they take a few poll intervals.
const E2E_DEADLINE: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------------------------------------------
// moto access
// ---------------------------------------------------------------------------------------------------------------

/// moto's URL, after resetting it once per test binary run. `None` only when the run asked to skip explicitly.
pub(crate) fn moto() -> Option<String> {
    static RESET: OnceLock<()> = OnceLock::new();
    let Ok(url) = std::env::var("CISCALE_TEST_MOTO") else {
        if std::env::var("CISCALE_SKIP_MOTO").is_ok_and(|value| value == "1") {
            eprintln!(
                "!!!!! SKIPPED: moto test (CISCALE_SKIP_MOTO=1): the EC2 backend is NOT tested in this run !!!!!"
            );
            return None;
        }
        panic!(
            "CISCALE_TEST_MOTO is not set: the EC2 tests need moto's EC2 server\nhint: run the tests through \
             `scripts/test` (it installs and starts moto), or set CISCALE_SKIP_MOTO=1 to skip them explicitly"
        );
    };
    RESET.get_or_init(|| http_post(&url, "/moto-api/reset"));
    Some(url)
}

/// A minimal HTTP POST without a client library (moto's reset endpoint is all it is used for).
fn http_post(base: &str, path: &str) {
    let address = base.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = std::net::TcpStream::connect(address).unwrap_or_else(|error| panic!("moto at {base}: {error}"));
    let request = format!("POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).expect("write to moto");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read from moto");
    assert!(response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200"), "moto reset: {response}");
}

/// An owner id no other test (or earlier run against the same moto) uses.
fn fresh_owner(test: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("{test}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

fn test_credentials() -> Credentials {
    Credentials::new("testing", "testing", None, None, "ciscale-tests")
}

fn ec2_backend(endpoint: &str) -> Ec2 {
    Ec2::new(Ec2Settings {
        region: Some("us-east-1".to_owned()),
        endpoint: Some(endpoint.to_owned()),
        max_attempts: None,
        credentials: Some(test_credentials()),
    })
}

/// A plain SDK client, for what a test does behind ciscale's back (adopted instances, user data, states).
pub(crate) fn sdk_client(endpoint: &str) -> aws_sdk_ec2::Client {
    let config = aws_sdk_ec2::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(test_credentials())
        .build();
    aws_sdk_ec2::Client::from_conf(config)
}

fn machine() -> BTreeMap<String, String> {
    BTreeMap::from([("instanceType".to_owned(), "t3.micro".to_owned()), ("ami".to_owned(), AMI.to_owned())])
}

/// Every instance moto holds with `tag:ciscale.owner=owner`, terminated ones included: (id, Name, state).
pub(crate) async fn moto_instances(
    client: &aws_sdk_ec2::Client,
    owner: &str,
) -> Vec<(String, String, InstanceStateName)> {
    let output = client
        .describe_instances()
        .filters(Filter::builder().name(format!("tag:{OWNER_LABEL}")).values(owner).build())
        .send()
        .await
        .expect("describe instances at moto");
    output
        .reservations()
        .iter()
        .flat_map(|reservation| reservation.instances())
        .map(|instance| {
            let name = instance
                .tags()
                .iter()
                .find(|tag| tag.key() == Some("Name"))
                .and_then(|tag| tag.value())
                .unwrap_or_default()
                .to_owned();
            let state = instance.state().and_then(|state| state.name()).cloned().unwrap_or(InstanceStateName::Pending);
            (instance.instance_id().unwrap_or_default().to_owned(), name, state)
        })
        .collect()
}

pub(crate) async fn moto_state(client: &aws_sdk_ec2::Client, id: &str) -> InstanceStateName {
    let output = client.describe_instances().instance_ids(id).send().await.expect("describe instance at moto");
    output
        .reservations()
        .iter()
        .flat_map(|reservation| reservation.instances())
        .find_map(|instance| instance.state().and_then(|state| state.name()).cloned())
        .expect("instance has a state")
}

// ---------------------------------------------------------------------------------------------------------------
// The backend against moto
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn conformance_against_moto() {
    let Some(endpoint) = moto() else { return };
    let owner = fresh_owner("conformance");
    let backend = ec2_backend(&endpoint);
    backend_conformance_on(Arc::new(backend.clone()), &owner, MOTO_PATIENCE, &machine()).await;
    assert!(backend.calls().get("RunInstances").copied().unwrap_or(0) >= 2, "calls: {:?}", backend.calls());
}

#[tokio::test(flavor = "multi_thread")]
async fn create_tags_instance_and_volumes_and_sends_the_bootstrap_as_user_data() {
    let Some(endpoint) = moto() else { return };
    let owner = fresh_owner("tags");
    let backend = ec2_backend(&endpoint);
    let name = format!("{owner}-linux-1");
    let request = CreateInstance {
        name: name.clone(),
        pool: PoolName::new("linux"),
        labels: BTreeMap::from([
            (OWNER_LABEL.to_owned(), owner.clone()),
            (POOL_LABEL.to_owned(), "linux".to_owned()),
            ("ciscale.agent-hash".to_owned(), "abc123".to_owned()),
        ]),
        machine: machine(),
        user_data: Some(Secret::new("CISCALE_AGENT_ID=7\nCISCALE_AGENT_TOKEN=tok-123\n")),
        attempt: Some("7".to_owned()),
    };
    let created = backend.create(&request).await.expect("create");
    assert_eq!(created.name, name);
    assert_eq!(created.labels.get(OWNER_LABEL), Some(&owner));

    let observed = backend
        .observe(&ListInstances { owner: owner.clone(), adopted: Vec::new(), images: Vec::new() })
        .await
        .expect("observe");
    let seen = observed.instances.iter().find(|instance| instance.id == created.id).expect("listed");
    assert_eq!(seen.labels.get(POOL_LABEL).map(String::as_str), Some("linux"));
    assert_eq!(seen.labels.get("ciscale.agent-hash").map(String::as_str), Some("abc123"));
    assert_eq!(seen.labels.get("Name"), Some(&name));
    assert_eq!(seen.attributes.get("instanceType").map(String::as_str), Some("t3.micro"));
    assert_eq!(seen.attributes.get("imageId").map(String::as_str), Some(AMI));
    assert_eq!(seen.state, InstanceState::Running, "moto skips pending");

    let client = sdk_client(&endpoint);
    // The volumes carry the same tags: nothing ciscale launches is ever untagged.
    let volumes = client
        .describe_volumes()
        .filters(Filter::builder().name("attachment.instance-id").values(created.id.as_str()).build())
        .send()
        .await
        .expect("describe volumes");
    assert!(!volumes.volumes().is_empty(), "the instance has a root volume");
    for volume in volumes.volumes() {
        let owner_tag = volume.tags().iter().find(|tag| tag.key() == Some(OWNER_LABEL)).and_then(|tag| tag.value());
        assert_eq!(owner_tag, Some(owner.as_str()), "volume {:?} carries the owner tag", volume.volume_id());
    }

    // The user data is the payload as apply handed it over (apply sends a whole cloud-init document).
    let attribute = client
        .describe_instance_attribute()
        .instance_id(created.id.as_str())
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
        .send()
        .await
        .expect("describe user data");
    let encoded = attribute.user_data().and_then(|value| value.value()).expect("user data set");
    let sent = String::from_utf8(decode_base64(encoded)).expect("utf-8 user data");
    assert_eq!(sent, "CISCALE_AGENT_ID=7\nCISCALE_AGENT_TOKEN=tok-123\n");

    backend.delete(&created.id).await.expect("clean up");
}

#[tokio::test(flavor = "multi_thread")]
async fn machine_keys_are_checked_before_anything_is_launched() {
    let Some(endpoint) = moto() else { return };
    let owner = fresh_owner("machine");
    let backend = ec2_backend(&endpoint);
    let request = |machine: BTreeMap<String, String>| CreateInstance {
        machine,
        ..crate::conformance::owned_request(&owner, &format!("{owner}-x-1"))
    };
    let mut unknown = machine();
    unknown.insert("serverType".to_owned(), "cx22".to_owned());
    let refused = backend.create(&request(unknown)).await;
    assert!(
        matches!(&refused, Err(Error::Invalid { message, .. }) if message.contains("unknown machine key `serverType`") && message.contains("hint: known keys are")),
        "{refused:?}"
    );
    let refused = backend.create(&request(BTreeMap::from([("instanceType".to_owned(), "t3.micro".to_owned())]))).await;
    assert!(matches!(&refused, Err(Error::Invalid { message, .. }) if message.contains("needs `ami`")), "{refused:?}");
    assert_eq!(backend.calls().get("RunInstances"), None, "nothing was launched: {:?}", backend.calls());
}

#[tokio::test(flavor = "multi_thread")]
async fn one_describe_call_per_idle_cycle_whatever_the_number_of_pools() {
    let Some(endpoint) = moto() else { return };
    for pools in [1usize, 10] {
        let owner = fresh_owner("calls");
        let desired = calls_config(&owner, &endpoint, pools, None);
        let backend = ec2_backend(&endpoint);
        let providers = providers_with(&backend);
        let observed = ciscale::observe::observe(&desired, &providers, jiff::Timestamp::now()).await.expect("observe");
        let plan = ciscale::plan::plan(&desired, &observed, observed.observed_at);
        assert!(!plan.has_changes(), "an idle world needs no change: {:?}", plan.changes);
        assert_eq!(
            backend.calls(),
            BTreeMap::from([("DescribeInstances".to_owned(), 1)]),
            "EC2 calls for one idle cycle with {pools} pool(s)"
        );
    }

    // Adopted instances add exactly one (filters AND, so owner tag and instance ids cannot share a call).
    let client = sdk_client(&endpoint);
    let adopted = launch_plain_instance(&client, "adopted-calls").await;
    let owner = fresh_owner("calls-adopted");
    let desired = calls_config(&owner, &endpoint, 10, Some(&adopted));
    let backend = ec2_backend(&endpoint);
    let observed =
        ciscale::observe::observe(&desired, &providers_with(&backend), jiff::Timestamp::now()).await.expect("observe");
    assert_eq!(backend.calls(), BTreeMap::from([("DescribeInstances".to_owned(), 2)]));
    let instances = &observed.backends.values().next().expect("one backend").instances;
    assert!(instances.iter().any(|instance| instance.id.as_str() == adopted), "the adopted instance is observed");
}

/// `pools` create-mode pools on one EC2 account, plus a start/stop pool adopting `adopted`.
fn calls_config(owner: &str, endpoint: &str, pools: usize, adopted: Option<&str>) -> ciscale::model::Desired {
    let mut yaml = format!(
        "id: {owner}\nci:\n  sim: {{ kind: fake }}\nbackends:\n  ec2: {{ kind: aws, region: us-east-1, endpoint: \
         \"{endpoint}\" }}\npools:\n"
    );
    for index in 0..pools {
        yaml.push_str(&format!(
            "  - name: p{index}\n    ci: {{ source: sim, labels: {{ pool: p{index} }} }}\n    backend: {{ name: ec2, \
             machine: {{ instanceType: t3.micro, ami: {AMI} }} }}\n    scale: {{ max: 3 }}\n"
        ));
    }
    if let Some(id) = adopted {
        yaml.push_str(&format!(
            "  - name: adopted\n    ci: {{ source: sim, labels: {{ pool: adopted }} }}\n    backend: {{ name: ec2, \
             startStop: {{ instances: [ {{ id: {id} }} ] }} }}\n"
        ));
    }
    ciscale::config::load_str("calls.yaml", &yaml, &|_: &str| None::<String>)
        .unwrap_or_else(|error| panic!("{error:?}\n{yaml}"))
}

fn providers_with(backend: &Ec2) -> Providers {
    let mut providers = Providers::default();
    providers.backends.insert("ec2".into(), Arc::new(backend.clone()));
    providers.ci.insert("sim".into(), Arc::new(FakeWorld::new().ci()));
    providers
}

/// An instance without ciscale's tags (as a Picus user's existing builder is), stopped; returns its id.
pub(crate) async fn launch_plain_instance(client: &aws_sdk_ec2::Client, name: &str) -> String {
    let output = client
        .run_instances()
        .image_id(AMI)
        .instance_type(InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Instance)
                .tags(Tag::builder().key("Name").value(name).build())
                .build(),
        )
        .send()
        .await
        .expect("launch a plain instance");
    let id = output.instances().first().and_then(|instance| instance.instance_id()).expect("an id").to_owned();
    client.stop_instances().instance_ids(&id).send().await.expect("stop it");
    id
}

#[tokio::test(flavor = "multi_thread")]
async fn start_stop_of_an_adopted_instance_and_every_state_it_can_be_in() {
    let Some(endpoint) = moto() else { return };
    let client = sdk_client(&endpoint);
    let backend = ec2_backend(&endpoint);
    let id = InstanceId::new(launch_plain_instance(&client, "adopted-states").await);

    let adopted = ListInstances { owner: fresh_owner("adopted"), adopted: vec![id.clone()], images: Vec::new() };
    let observed = backend.observe(&adopted).await.expect("observe");
    let seen = observed.instances.iter().find(|instance| instance.id == id).expect("adopted instance listed");
    assert_eq!((seen.state, seen.name.as_str()), (InstanceState::Stopped, "adopted-states"));
    assert_eq!(seen.owner(), None, "an adopted instance carries no owner tag");

    backend.start(&id).await.expect("start");
    assert_eq!(moto_state(&client, id.as_str()).await, InstanceStateName::Running);
    backend.start(&id).await.expect("start of a running instance succeeds");
    backend.stop(&id).await.expect("stop");
    assert_eq!(moto_state(&client, id.as_str()).await, InstanceStateName::Stopped);
    backend.stop(&id).await.expect("stop of a stopped instance succeeds");

    // Terminated behind ciscale's back: observed as such, and start says clearly it can never work.
    client.terminate_instances().instance_ids(id.as_str()).send().await.expect("terminate");
    let observed = backend.observe(&adopted).await.expect("observe");
    let seen = observed.instances.iter().find(|instance| instance.id == id).expect("still listed");
    assert_eq!(seen.state, InstanceState::Terminated);
    let started = backend.start(&id).await;
    assert!(
        matches!(&started, Err(Error::Invalid { message, .. }) if message.contains("terminated") && message.contains("startStop.instances")),
        "{started:?}"
    );
}

// ---------------------------------------------------------------------------------------------------------------
// Error mapping, against a stub speaking EC2's wire format
// ---------------------------------------------------------------------------------------------------------------

type Responder = dyn Fn(&str) -> (u16, String) + Send + Sync;

/// An HTTP server on loopback answering every request with `respond(form body)`; it records the bodies.
struct Stub {
    url: String,
    bodies: Arc<Mutex<Vec<String>>>,
}

impl Stub {
    async fn start(respond: impl Fn(&str) -> (u16, String) + Send + Sync + 'static) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind stub");
        let url = format!("http://{}", listener.local_addr().expect("stub address"));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let respond: Arc<Responder> = Arc::new(respond);
        let recorded = bodies.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let (respond, recorded) = (respond.clone(), recorded.clone());
                tokio::spawn(async move {
                    let Some(body) = read_request(&mut socket).await else {
                        return;
                    };
                    let (status, payload) = respond(&body);
                    if let Ok(mut bodies) = recorded.lock() {
                        bodies.push(body);
                    }
                    let response = format!(
                        "HTTP/1.1 {status} Stub\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: \
                         close\r\n\r\n{payload}",
                        payload.len()
                    );
                    let _ = socket.write_all(response.as_bytes()).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        Self { url, bodies }
    }

    fn bodies(&self) -> Vec<String> {
        self.bodies.lock().map(|bodies| bodies.clone()).unwrap_or_default()
    }

    fn backend(&self, max_attempts: u32) -> Ec2 {
        Ec2::new(Ec2Settings {
            region: Some("us-east-1".to_owned()),
            endpoint: Some(self.url.clone()),
            max_attempts: Some(max_attempts),
            credentials: Some(test_credentials()),
        })
    }
}

async fn read_request(socket: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let read = socket.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..read]);
        let text = String::from_utf8_lossy(&buffer).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|line| {
                    let (key, value) = line.split_once(':')?;
                    key.eq_ignore_ascii_case("content-length").then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buffer.len() >= end + 4 + length {
                return Some(String::from_utf8_lossy(&buffer[end + 4..end + 4 + length]).into_owned());
            }
        }
    }
}

fn ec2_error(code: &str, message: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}\
         </Message></Error></Errors><RequestID>stub-request</RequestID></Response>"
    )
}

fn action_of(body: &str) -> &str {
    body.split('&').find_map(|pair| pair.strip_prefix("Action=")).unwrap_or("?")
}

/// The error one `get` (DescribeInstances by id) gets when EC2 answers `status` + `code`, and the requests sent.
async fn get_with_error(status: u16, code: &'static str, message: &'static str) -> (Error, usize) {
    let stub = Stub::start(move |_| (status, ec2_error(code, message))).await;
    let result = stub.backend(3).get(&InstanceId::new("i-0123456789abcdef0")).await;
    let error = result.expect_err("the stub only fails");
    (error, stub.bodies().len())
}

#[tokio::test]
async fn auth_errors_are_unauthenticated_with_a_hint() {
    for (status, code) in [(401, "AuthFailure"), (403, "UnauthorizedOperation")] {
        let (error, requests) = get_with_error(status, code, "You are not authorized to perform this operation.").await;
        let text = error.to_string();
        assert!(matches!(error, Error::Unauthenticated { .. }), "{code}: {error:?}");
        assert!(text.contains(code) && text.contains("DescribeInstances") && text.contains("hint:"), "{text}");
        assert_eq!(requests, 1, "{code} is not retried");
    }
}

#[tokio::test]
async fn throttling_is_rate_limited_after_a_bounded_number_of_sdk_retries() {
    let (error, requests) = get_with_error(503, "RequestLimitExceeded", "Request limit exceeded.").await;
    assert!(matches!(error, Error::RateLimited { .. }), "{error:?}");
    assert_eq!(error.to_string(), "rate limited by aws");
    assert!(error.is_transient(), "apply retries it too");
    assert_eq!(requests, 3, "the SDK retries throttling, at most `max_attempts` (3) requests in all");
}

#[tokio::test]
async fn unknown_and_malformed_instance_ids() {
    let (error, _) =
        get_with_error(400, "InvalidInstanceID.NotFound", "The instance ID 'i-0123456789abcdef0' does not exist").await;
    assert!(matches!(&error, Error::NotFound { what } if what.contains("i-0123456789abcdef0")), "{error:?}");
    let (error, _) = get_with_error(400, "InvalidInstanceID.Malformed", "Invalid id: \"x\"").await;
    assert!(
        matches!(&error, Error::Invalid { message, .. } if message.contains("is not an EC2 instance id") && message.contains("hint:")),
        "{error:?}"
    );
}

#[tokio::test]
async fn server_errors_and_unreachable_endpoints_are_unavailable() {
    let (error, requests) = get_with_error(500, "InternalError", "An internal error has occurred").await;
    assert!(matches!(error, Error::Unavailable { .. }), "{error:?}");
    assert_eq!(requests, 3, "5xx is retried by the SDK, boundedly");

    // Nothing listens on this port any more: a dispatch failure.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    drop(listener);
    let backend = Ec2::new(Ec2Settings {
        region: Some("us-east-1".to_owned()),
        endpoint: Some(url),
        max_attempts: Some(1),
        credentials: Some(test_credentials()),
    });
    let error = backend.get(&InstanceId::new("i-0123456789abcdef0")).await.expect_err("nothing listens");
    assert!(
        matches!(&error, Error::Unavailable { message, .. } if message.contains("could not reach EC2")),
        "{error:?}"
    );
}

fn run_instances_ok(instance_type: &str) -> String {
    format!(
        "<RunInstancesResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>r</requestId>\
         <reservationId>r-1</reservationId><ownerId>123456789012</ownerId><instancesSet><item>\
         <instanceId>i-0aaaaaaaaaaaaaaa1</instanceId><imageId>{AMI}</imageId><instanceState><code>0</code>\
         <name>pending</name></instanceState><instanceType>{instance_type}</instanceType>\
         <launchTime>2026-01-01T00:00:00.000Z</launchTime></item></instancesSet></RunInstancesResponse>"
    )
}

const EMPTY_DESCRIBE: &str = "<DescribeInstancesResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\">\
     <requestId>r</requestId><reservationSet/></DescribeInstancesResponse>";

fn form_value<'b>(body: &'b str, key: &str) -> Option<&'b str> {
    body.split('&').find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
}

/// (instance type, spot?) of every RunInstances the stub saw, in order.
fn launches(stub: &Stub) -> Vec<(String, bool)> {
    stub.bodies()
        .iter()
        .filter(|body| action_of(body) == "RunInstances")
        .map(|body| {
            let instance_type = form_value(body, "InstanceType").unwrap_or("-").to_owned();
            (instance_type, form_value(body, "InstanceMarketOptions.MarketType") == Some("spot"))
        })
        .collect()
}

fn spot_request(owner: &str) -> CreateInstance {
    CreateInstance {
        machine: BTreeMap::from([
            ("instanceType".to_owned(), "t3.large, t3.small".to_owned()),
            ("ami".to_owned(), AMI.to_owned()),
            ("spot".to_owned(), "true".to_owned()),
        ]),
        ..crate::conformance::owned_request(owner, &format!("{owner}-pool-1"))
    }
}

#[tokio::test]
async fn capacity_errors_fall_back_through_types_then_from_spot_to_on_demand() {
    // Spot is refused for every type (two different codes), on-demand t3.large has no capacity, t3.small does.
    let stub = Stub::start(|body| match action_of(body) {
        "DescribeInstances" => (200, EMPTY_DESCRIBE.to_owned()),
        "RunInstances" => {
            let spot = form_value(body, "InstanceMarketOptions.MarketType") == Some("spot");
            match (form_value(body, "InstanceType"), spot) {
                (Some("t3.large"), true) => (400, ec2_error("SpotMaxPriceTooLow", "Your max price is too low")),
                (_, true) => (400, ec2_error("MaxSpotInstanceCountExceeded", "Max spot instance count exceeded")),
                (Some("t3.large"), false) => {
                    (500, ec2_error("InsufficientInstanceCapacity", "We currently do not have sufficient capacity"))
                }
                (Some(other), false) => (200, run_instances_ok(other)),
                (None, false) => (400, ec2_error("MissingParameter", "no type")),
            }
        }
        other => (400, ec2_error("InvalidAction", other)),
    })
    .await;
    let created = stub.backend(1).create(&spot_request("fallback")).await.expect("the last candidate launches");
    assert_eq!(created.attributes.get("instanceType").map(String::as_str), Some("t3.small"));
    assert_eq!(created.name, "fallback-pool-1");
    assert_eq!(
        launches(&stub),
        vec![
            ("t3.large".to_owned(), true),
            ("t3.small".to_owned(), true),
            ("t3.large".to_owned(), false),
            ("t3.small".to_owned(), false)
        ]
    );
    // Every attempt has its own deterministic token, and the same request sends the same tokens again.
    let tokens: Vec<String> =
        stub.bodies().iter().filter_map(|body| form_value(body, "ClientToken").map(str::to_owned)).collect();
    assert_eq!(tokens.len(), 4);
    assert!(tokens.iter().all(|token| token.len() <= 64 && token.starts_with("ciscale-")), "{tokens:?}");
    assert_eq!(tokens.iter().collect::<std::collections::BTreeSet<_>>().len(), 4, "one token per candidate");
    let again = Stub::start(|body| match action_of(body) {
        "DescribeInstances" => (200, EMPTY_DESCRIBE.to_owned()),
        _ => (200, run_instances_ok("t3.large")),
    })
    .await;
    again.backend(1).create(&spot_request("fallback")).await.expect("create");
    assert_eq!(form_value(&again.bodies()[1], "ClientToken"), Some(tokens[0].as_str()), "the token is deterministic");
}

#[tokio::test]
async fn no_capacity_anywhere_is_a_capacity_error_naming_every_candidate() {
    let stub = Stub::start(|body| match action_of(body) {
        "DescribeInstances" => (200, EMPTY_DESCRIBE.to_owned()),
        _ => (400, ec2_error("Unsupported", "The requested configuration is currently not supported.")),
    })
    .await;
    let error = stub.backend(1).create(&spot_request("nocap")).await.expect_err("no capacity");
    let text = error.to_string();
    assert!(matches!(error, Error::Capacity { .. }), "{error:?}");
    for candidate in ["t3.large spot", "t3.small spot", "t3.large on-demand", "t3.small on-demand"] {
        assert!(text.contains(candidate), "{candidate} missing in: {text}");
    }
    assert_eq!(launches(&stub).len(), 4);
}

// ---------------------------------------------------------------------------------------------------------------
// Client-token idempotency: moto behind a proxy that answers tokens as EC2 does (moto itself ignores them)
// ---------------------------------------------------------------------------------------------------------------

/// A create of `name` for the agent record `attempt`, whose user data holds `token` (each registration may hand
/// out a fresh one).
fn life(owner: &str, name: &str, attempt: &str, token: &str) -> CreateInstance {
    CreateInstance {
        machine: machine(),
        user_data: Some(Secret::new(format!("CISCALE_AGENT_ID={attempt}\nCISCALE_AGENT_TOKEN={token}\n"))),
        attempt: Some(attempt.to_owned()),
        ..crate::conformance::owned_request(owner, name)
    }
}

/// Instances of `owner` named `name` at moto that are not terminated.
async fn live_named(client: &aws_sdk_ec2::Client, owner: &str, name: &str) -> Vec<String> {
    moto_instances(client, owner)
        .await
        .into_iter()
        .filter(|(_, n, state)| n == name && *state != InstanceStateName::Terminated)
        .map(|(id, _, _)| id)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_create_retried_unseen_gets_the_first_instance_even_with_a_fresh_credential() {
    let Some(endpoint) = moto() else { return };
    let proxy = crate::fakes::ec2::Ec2Proxy::start(&endpoint).await;
    // EC2's listing right after a launch, in slow motion: the retries below cannot find the first instance by its
    // `Name`, only by its client token.
    proxy.set_listing_lag(Duration::from_secs(600));
    let backend = ec2_backend(&proxy.url);
    let client = sdk_client(&endpoint);
    let owner = fresh_owner("token-retry");
    let name = format!("{owner}-linux-1");

    let first = backend.create(&life(&owner, &name, "7", "tok-a")).await.expect("first try");
    let launched = Instant::now();
    // The answer was "lost": the same request again (same agent record, same credential) replays the launch.
    let replayed = backend.create(&life(&owner, &name, "7", "tok-a")).await.expect("retry");
    assert_eq!(replayed.id, first.id);
    assert_eq!(proxy.replays_and_mismatches(), (1, 0));
    // The retry after a crash re-registered the agent, which got a fresh token: other user data, same token.
    // EC2 refuses it as mismatched; the instance that token launched is this create's. The listing shows it a
    // second from now: after the first look for it, before the last.
    proxy.set_listing_lag(launched.elapsed() + Duration::from_secs(1));
    let retaken = backend.create(&life(&owner, &name, "7", "tok-b")).await.expect("retry with a fresh credential");
    assert_eq!(retaken.id, first.id);
    assert_eq!(retaken.name, name);
    assert_eq!(proxy.replays_and_mismatches(), (1, 1));
    assert_eq!(live_named(&client, &owner, &name).await, vec![first.id.to_string()], "never a second instance");
    backend.delete(&first.id).await.expect("clean up");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_name_reused_after_its_instance_is_gone_launches_a_new_one() {
    let Some(endpoint) = moto() else { return };
    let proxy = crate::fakes::ec2::Ec2Proxy::start(&endpoint).await;
    let backend = ec2_backend(&proxy.url);
    let client = sdk_client(&endpoint);
    let owner = fresh_owner("token-reuse");
    let name = format!("{owner}-linux-1");

    let first = backend.create(&life(&owner, &name, "7", "tok-a")).await.expect("first life");
    backend.delete(&first.id).await.expect("terminate");
    // A later life registers a new agent record: new tokens, nothing to walk.
    let second = backend.create(&life(&owner, &name, "8", "tok-b")).await.expect("second life");
    assert_ne!(second.id, first.id);
    assert_eq!(proxy.replays_and_mismatches(), (0, 0));
    backend.delete(&second.id).await.expect("terminate");

    // A CI whose record stays the same from life to life (a pre-registered agent, an Azure agent before it first
    // registered itself): the first token is spent. Other user data: refused, its instance is terminated, so the
    // next token is tried. The same user data: EC2 replays the terminated instance, and the next token is tried.
    let third = backend.create(&life(&owner, &name, "7", "tok-c")).await.expect("third life");
    assert!(![first.id.clone(), second.id.clone()].contains(&third.id), "{third:?}");
    assert_eq!(proxy.replays_and_mismatches(), (0, 1));
    backend.delete(&third.id).await.expect("terminate");
    let fourth = backend.create(&life(&owner, &name, "7", "tok-a")).await.expect("fourth life");
    assert!(![first.id.clone(), third.id.clone()].contains(&fourth.id), "{fourth:?}");
    let (replays, mismatches) = proxy.replays_and_mismatches();
    assert_eq!((replays, mismatches), (1, 2), "generation 0 replayed, generation 1 (the third life's) refused");
    assert_eq!(live_named(&client, &owner, &name).await, vec![fourth.id.to_string()]);
    backend.delete(&fourth.id).await.expect("clean up");
}

#[tokio::test]
async fn idempotent_parameter_mismatch_is_not_a_failure_of_the_create() {
    // Without the proxy: a stub that refuses the first token (used by an earlier life, whose instance EC2 no longer
    // lists) and launches with the second. The create walks on instead of failing, and asks the listing three times
    // before it believes the first token's instance is gone (EC2's listing may lag behind a launch).
    static RUNS: AtomicU32 = AtomicU32::new(0);
    let stub = Stub::start(|body| match action_of(body) {
        "DescribeInstances" => (200, EMPTY_DESCRIBE.to_owned()),
        _ if body.contains("ClientToken=") && RUNS.fetch_add(1, Ordering::SeqCst) == 0 => (
            400,
            ec2_error(
                "IdempotentParameterMismatch",
                "Arguments on this idempotent request are inconsistent with arguments used in previous request(s).",
            ),
        ),
        _ => (200, run_instances_ok("t3.micro")),
    })
    .await;
    let created =
        stub.backend(1).create(&life("stub", "stub-linux-1", "7", "tok")).await.expect("created with the next token");
    assert_eq!(created.id.as_str(), "i-0aaaaaaaaaaaaaaa1");
    let actions: Vec<String> = stub.bodies().iter().map(|body| action_of(body).to_owned()).collect();
    assert_eq!(
        actions,
        [
            "DescribeInstances",
            "RunInstances",
            "DescribeInstances",
            "DescribeInstances",
            "DescribeInstances",
            "RunInstances"
        ],
        "find by name, refused, three looks for the token's instance, the next token"
    );
    let bodies = stub.bodies();
    let tokens: Vec<&str> = bodies.iter().filter_map(|body| form_value(body, "ClientToken")).collect();
    assert_eq!(tokens.len(), 2);
    assert_ne!(tokens[0], tokens[1]);
}

// ---------------------------------------------------------------------------------------------------------------
// End to end: the ciscale binary against moto and the fake CI
// ---------------------------------------------------------------------------------------------------------------

/// A scratch folder with a config on moto's EC2 and a file-backed fake CI that simulates.
struct E2e {
    /// Every plan of this test's `watch` processes is judged by the safety oracle (dropped before `dir`).
    trace: crate::safety::ledger::PlanTrace,
    dir: tempfile::TempDir,
    owner: String,
    client: aws_sdk_ec2::Client,
}

impl E2e {
    fn new(test: &str, endpoint: &str, backend_block: &str, scale: &str) -> Self {
        let owner = fresh_owner(test);
        let dir = tempfile::tempdir().expect("temp dir");
        let config = format!(
            r#"id: {owner}
pollInterval: 1s
ci:
  sim: {{ kind: fake, stateFile: world.json, simulate: true }}
backends:
  ec2: {{ kind: aws, region: us-east-1, endpoint: "{endpoint}" }}
pools:
  - name: linux
    ci: {{ source: sim, labels: {{ platform: linux }} }}
    backend: {backend_block}
    agent: {{ image: "agent:1" }}
    scale: {scale}
"#
        );
        std::fs::write(dir.path().join("ciscale.yaml"), config).expect("write config");
        Self {
            trace: crate::safety::ledger::PlanTrace::new(dir.path(), dir.path().join("ciscale.yaml")),
            dir,
            owner,
            client: sdk_client(endpoint),
        }
    }

    fn world(&self) -> FakeWorld {
        FakeWorld::open(&FakeSpec { state_file: Some(self.dir.path().join("world.json")), simulate: false, jobs: None })
            .expect("open world")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ciscale"));
        command
            .current_dir(self.dir.path())
            .args(args)
            .arg("-c")
            .arg(self.dir.path().join("ciscale.yaml"))
            .env_remove("CISCALE_LOG")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_ENDPOINT_URL")
            .env_remove("AWS_ENDPOINT_URL_EC2")
            .env("NO_COLOR", "1")
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            // No instance-metadata lookups from the test machine.
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", self.dir.path().join("no-aws-config"))
            .env("AWS_SHARED_CREDENTIALS_FILE", self.dir.path().join("no-aws-credentials"))
            .stdin(Stdio::null());
        self.trace.env(&mut command);
        command
    }

    fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.log()).expect("log file"))
            .spawn()
            .expect("start ciscale")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("ciscale.log")
    }

    fn push_linux_task(&self) {
        // A job that finishes as soon as an agent takes it keeps the life cycle within a few poll intervals.
        self.world().push_task_for(BTreeMap::from([("platform".to_owned(), "linux".to_owned())]), Duration::ZERO);
    }

    /// Plays the agents' machines: the fake CI lets an agent check in while moto runs its instance (the
    /// `Name` tag, or for adopted instances the agent named in `agent_of`).
    async fn sync_agents(&self, agent_of: &BTreeMap<String, String>) -> Vec<(String, String, InstanceStateName)> {
        let mut instances = moto_instances(&self.client, &self.owner).await;
        for (id, agent) in agent_of {
            instances.push((id.clone(), agent.clone(), moto_state(&self.client, id).await));
        }
        let running: Vec<String> = instances
            .iter()
            .filter(|(_, _, state)| *state == InstanceStateName::Running)
            .map(|(_, name, _)| name.clone())
            .collect();
        self.world().update(|state| state.external_running = running);
        instances
    }

    /// Keeps the agents in step with moto until `done` holds for moto's instances and the fake world.
    async fn run_until(
        &self,
        child: &mut Child,
        what: &str,
        agent_of: &BTreeMap<String, String>,
        mut done: impl FnMut(&[(String, String, InstanceStateName)], &ciscale::providers::fake::WorldState) -> bool,
    ) {
        let deadline = Instant::now() + E2E_DEADLINE;
        loop {
            let instances = self.sync_agents(agent_of).await;
            if done(&instances, &self.world().snapshot()) {
                return;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("ciscale exited ({status}) before {what}\n{}", self.log_text());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("never reached: {what}\nmoto: {instances:?}\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }
}

fn stop(mut child: Child) {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_creates_an_instance_for_a_job_and_terminates_it_when_idle() {
    let Some(endpoint) = moto() else { return };
    let machine = format!("{{ name: ec2, machine: {{ instanceType: t3.micro, ami: {AMI} }} }}");
    let e2e = E2e::new("e2e-create", &endpoint, &machine, "{ max: 2, idleTimeout: 1s }");
    let no_adopted = BTreeMap::new();
    e2e.push_linux_task();
    let mut watch = e2e.spawn(&["watch"]);

    let name = ciscale::plan::instance_name(&e2e.owner, &ciscale::model::PoolName::new("linux"), 1);
    e2e.run_until(&mut watch, "an instance runs and its agent took the job", &no_adopted, |instances, world| {
        instances.iter().any(|(_, n, state)| n == &name && *state == InstanceStateName::Running)
            && world.agents.iter().any(|agent| agent.name == name && agent.jobs_done >= 1)
    })
    .await;
    let instances = moto_instances(&e2e.client, &e2e.owner).await;
    assert_eq!(instances.len(), 1, "one job, one instance: {instances:?}");
    let tags = describe_tags(&e2e.client, &instances[0].0).await;
    assert_eq!(tags.get(POOL_LABEL).map(String::as_str), Some("linux"));
    assert_eq!(tags.get("Name"), Some(&name));
    assert!(tags.contains_key("ciscale.agent-hash"), "{tags:?}");

    e2e.run_until(
        &mut watch,
        "the idle instance is terminated and its agent removed",
        &no_adopted,
        |instances, world| {
            instances.iter().all(|(_, _, state)| *state == InstanceStateName::Terminated) && world.agents.is_empty()
        },
    )
    .await;
    stop(watch);
    assert_eq!(moto_instances(&e2e.client, &e2e.owner).await.len(), 1, "never a second instance");
    assert!(e2e.world().snapshot().tasks.is_empty(), "the job ran");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_user_data_ciscale_sends_is_the_cloud_init_that_runs_the_agent_image() {
    let Some(endpoint) = moto() else { return };
    let machine = format!("{{ name: ec2, machine: {{ instanceType: t3.micro, ami: {AMI} }} }}");
    let e2e = E2e::new("e2e-userdata", &endpoint, &machine, "{ max: 1 }");
    e2e.push_linux_task();
    let applied = e2e.command(&["apply", "--auto-approve"]).output().expect("apply");
    assert!(applied.status.success(), "{}", String::from_utf8_lossy(&applied.stderr));
    let instances = moto_instances(&e2e.client, &e2e.owner).await;
    assert_eq!(instances.len(), 1, "{instances:?}");

    let attribute = e2e
        .client
        .describe_instance_attribute()
        .instance_id(&instances[0].0)
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
        .send()
        .await
        .expect("describe user data");
    let encoded = attribute.user_data().and_then(|value| value.value()).expect("user data set");
    let user_data = String::from_utf8(decode_base64(encoded)).expect("utf-8 user data");
    // What the README promises: the cloud-init Hetzner servers get too. No wrapper script, no
    // `/usr/local/bin/ciscale-agent` (that one is the Incus images' wrapper, started by exec).
    assert!(user_data.starts_with("#cloud-config\n"), "{user_data}");
    assert!(!user_data.contains(ciscale::apply::AGENT_COMMAND), "{user_data}");
    let document: serde_json::Value = serde_yaml::from_str(&user_data).expect("cloud-config is YAML");
    let files = document["write_files"].as_array().expect("write_files");
    let file = |path: &str| {
        files.iter().find(|file| file["path"] == path).unwrap_or_else(|| panic!("no `{path}` in {user_data}"))
    };
    let env_file = file(ciscale::apply::AGENT_ENV_PATH);
    assert_eq!(env_file["permissions"], "0600");
    assert_eq!(env_file["owner"], "root:root");
    // The env file holds this agent's own, current credential.
    let env = env_file["content"].as_str().expect("env file text");
    let token = env.lines().find_map(|line| line.strip_prefix("CISCALE_AGENT_TOKEN=")).expect("the agent's token");
    let world = e2e.world().snapshot();
    assert_eq!(world.agents.len(), 1);
    assert_eq!(world.agents[0].token_sha256, ciscale::providers::fake::sha256_hex(token.as_bytes()));
    assert!(env.contains(&format!("CISCALE_AGENT_ID={}\n", world.agents[0].id)), "{env}");
    // The agent image of the pool runs with that env file, and build containers cannot read the user data back.
    let start = file("/usr/local/sbin/ciscale-agent-start")["content"].as_str().expect("start script");
    assert!(start.contains("docker run --detach --name ciscale-agent"), "{start}");
    assert!(start.contains(&format!("--env-file {}", ciscale::apply::AGENT_ENV_PATH)), "{start}");
    assert!(start.contains("'agent:1'"), "{start}");
    assert!(start.contains(&format!("rm -f {}", ciscale::apply::AGENT_ENV_PATH)), "{start}");
    let block = file("/usr/local/sbin/ciscale-metadata-block")["content"].as_str().expect("block script");
    assert!(block.contains(&format!("-d {}/32 -j REJECT", ciscale::apply::METADATA_ADDRESS)), "{block}");
    assert_eq!(document["runcmd"], serde_json::json!([["/usr/local/sbin/ciscale-agent-start"]]));

    for (id, _, _) in instances {
        drop(e2e.client.terminate_instances().instance_ids(id).send().await);
    }
}

async fn describe_tags(client: &aws_sdk_ec2::Client, id: &str) -> BTreeMap<String, String> {
    let output = client.describe_instances().instance_ids(id).send().await.expect("describe");
    output
        .reservations()
        .iter()
        .flat_map(|reservation| reservation.instances())
        .flat_map(|instance| instance.tags())
        .filter_map(|tag| Some((tag.key()?.to_owned(), tag.value()?.to_owned())))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_starts_an_adopted_instance_for_a_job_and_stops_it_when_idle() {
    let Some(endpoint) = moto() else { return };
    let client = sdk_client(&endpoint);
    let id = launch_plain_instance(&client, "picus-builder").await;
    let backend_block =
        format!("{{ name: ec2, startStop: {{ instances: [ {{ id: {id}, agentName: picus-agent }} ] }} }}");
    let e2e = E2e::new("e2e-startstop", &endpoint, &backend_block, "{ idleTimeout: 1s }");
    let agent_of = BTreeMap::from([(id.clone(), "picus-agent".to_owned())]);
    // The agent was registered once, by hand, as a Picus user's is.
    let registered = e2e
        .world()
        .ci()
        .register(&RegisterAgent {
            name: "picus-agent".to_owned(),
            pool: PoolName::new("linux"),
            labels: BTreeMap::from([("platform".to_owned(), "linux".to_owned())]),
            for_job: None,
        })
        .await
        .expect("register the adopted agent");
    e2e.push_linux_task();
    let mut watch = e2e.spawn(&["watch"]);

    e2e.run_until(&mut watch, "the adopted instance is started and its agent took the job", &agent_of, |_, world| {
        world.agents.iter().any(|agent| agent.id == registered.agent_id && agent.jobs_done >= 1)
    })
    .await;
    e2e.run_until(&mut watch, "the idle adopted instance is stopped", &agent_of, |instances, world| {
        instances.iter().any(|(i, _, state)| i == &id && *state == InstanceStateName::Stopped) && world.tasks.is_empty()
    })
    .await;
    stop(watch);
    assert_eq!(moto_state(&client, &id).await, InstanceStateName::Stopped, "stopped, never terminated");
    let world = e2e.world().snapshot();
    let agent = world.agents.iter().find(|agent| agent.id == registered.agent_id).expect("the agent record stays");
    assert!(agent.no_schedule, "it was drained before the stop");
    assert!(moto_instances(&client, &e2e.owner).await.is_empty(), "nothing was created in start/stop mode");
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_apply_then_watch_leaves_no_duplicate_and_no_orphan() {
    let Some(endpoint) = moto() else { return };
    let machine = format!("{{ name: ec2, machine: {{ instanceType: t3.micro, ami: {AMI} }} }}");
    let e2e = E2e::new("e2e-kill", &endpoint, &machine, "{ max: 1, idleTimeout: 1s }");
    let no_adopted = BTreeMap::new();
    e2e.push_linux_task();

    // Killed right after the agent is registered: before, during or just after RunInstances.
    let mut apply = e2e.spawn(&["apply", "--auto-approve"]);
    let deadline = Instant::now() + E2E_DEADLINE;
    while e2e.world().snapshot().agents.is_empty() && apply.try_wait().ok().flatten().is_none() {
        assert!(Instant::now() < deadline, "apply never registered an agent\n{}", e2e.log_text());
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = apply.kill();
    let _ = apply.wait();
    // The killed apply worked for this deployment (its owner id is fresh): what it made is ours, under the names it
    // registered (instances take their agent's name).
    e2e.trace.declare_ours(e2e.world().snapshot().agents.into_iter().map(|agent| agent.name));

    let mut watch = e2e.spawn(&["watch"]);
    e2e.run_until(&mut watch, "the job ran and everything was cleaned up", &no_adopted, |instances, world| {
        world.tasks.is_empty()
            && world.agents.is_empty()
            && !instances.is_empty()
            && instances.iter().all(|(_, _, state)| *state == InstanceStateName::Terminated)
    })
    .await;
    stop(watch);
    let instances = moto_instances(&e2e.client, &e2e.owner).await;
    assert_eq!(instances.len(), 1, "exactly one instance was ever launched: {instances:?}");
}

/// Standard base64 decoding, for reading user data back.
fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let digits: Vec<u32> = text.bytes().filter_map(value).collect();
    let mut out = Vec::new();
    for group in digits.chunks(4) {
        let n = group.iter().enumerate().fold(0u32, |n, (index, digit)| n | (digit << (18 - 6 * index)));
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..group.len().saturating_sub(1)]);
    }
    out
}
