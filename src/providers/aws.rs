//! The AWS EC2 backend (`kind: aws`): instances ciscale creates and terminates (tagged `ciscale.owner` /
//! `ciscale.pool` at creation), and existing instances it only starts and stops (start/stop pools, Picus's model).
//!
//! Configuration is the standard AWS chain (`AWS_REGION`, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`,
//! `AWS_PROFILE`, `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_EC2`, instance roles, ...) with the backend's `region`
//! and `endpoint` taking precedence. The SDK client is built lazily on the first call, so connecting makes no
//! network call and a `plan --observed` needs no AWS set-up at all.
//!
//! # API calls
//! - observe: one paginated `DescribeInstances` filtered by `tag:ciscale.owner=<owner>`, plus, only when the
//!   config adopts instances on this account, one filtered by `instance-id` (EC2 filters AND with each other, so
//!   the two sets cannot be asked for in one call). Terminated instances stay listed while EC2 shows them; the
//!   planner ignores them, and seeing them keeps their names from being reused too soon.
//! - create: one `DescribeInstances` (create-if-absent by `Name` tag), then `RunInstances` per candidate until
//!   one has capacity. start/stop/delete: one call each (plus a `DescribeInstances` when EC2 answers
//!   `IncorrectInstanceState`, to say why).
//!
//! # Machine keys (`backend.machine` of a pool)
//! `instanceType` (comma list: fallback order), `ami` (or `imageId`), `subnetId`, `securityGroupIds` (comma
//! list), `keyName`, `launchTemplate` (an `lt-…` id or a name) with optional `launchTemplateVersion`, and `spot`
//! (`"true"`: spot first, over every instance type, then on-demand). Unknown keys are refused on create.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_ec2::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_ec2::config::retry::RetryConfig;
use aws_sdk_ec2::config::timeout::TimeoutConfig;
use aws_sdk_ec2::config::{ConfigBag, Credentials, Intercept, Region, RuntimeComponents};
use aws_sdk_ec2::error::{BoxError, DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    Filter, InstanceInterruptionBehavior, InstanceMarketOptionsRequest, InstanceStateName, InstanceType,
    LaunchTemplateSpecification, MarketType, ResourceType, SpotInstanceType, SpotMarketOptions, Tag, TagSpecification,
};
use aws_sdk_ec2::Client;
use jiff::Timestamp;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use super::{Backend, Capabilities, CreateInstance, Error, ListInstances, Result};
use crate::apply::{AGENT_COMMAND, CREDENTIAL_PATH};
use crate::model::{BackendObservation, Instance, InstanceId, InstanceState, OWNER_LABEL, POOL_LABEL};

const PROVIDER: &str = "aws";
/// The tag EC2's console shows as the instance's name; ciscale's deterministic instance name goes there.
pub const NAME_TAG: &str = "Name";
/// EC2 accepts at most 200 values per filter.
const MAX_FILTER_VALUES: usize = 200;
/// The machine keys an EC2 pool may set (see the module docs).
pub const MACHINE_KEYS: &[&str] = &[
    "instanceType",
    "ami",
    "imageId",
    "subnetId",
    "securityGroupIds",
    "keyName",
    "launchTemplate",
    "launchTemplateVersion",
    "spot",
];

/// How to reach EC2. Everything unset comes from the standard AWS configuration chain.
#[derive(Debug, Clone, Default)]
pub struct Ec2Settings {
    pub region: Option<String>,
    /// Endpoint URL (moto, LocalStack, a proxy); `AWS_ENDPOINT_URL_EC2` / `AWS_ENDPOINT_URL` otherwise.
    pub endpoint: Option<String>,
    /// Attempts per API call, the first included [3]. The SDK backs off between them (jittered, 1 s doubling,
    /// at most 5 s), so one call waits at most ~10 s on throttling before apply's own retries take over.
    pub max_attempts: Option<u32>,
    /// Static credentials instead of the chain (tests; `Credentials`' `Debug` redacts the secret).
    pub credentials: Option<Credentials>,
}

/// The EC2 backend. Cheap to clone: clones share the client and the call counter.
#[derive(Clone)]
pub struct Ec2 {
    settings: Arc<Ec2Settings>,
    client: Arc<OnceCell<Client>>,
    calls: CallCounter,
}

impl fmt::Debug for Ec2 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ec2")
            .field("region", &self.settings.region)
            .field("endpoint", &self.settings.endpoint)
            .finish_non_exhaustive()
    }
}

impl Ec2 {
    /// No network call and no configuration lookup happen here: both wait for the first API call.
    pub fn new(settings: Ec2Settings) -> Self {
        Self {
            settings: Arc::new(settings),
            client: Arc::new(OnceCell::new()),
            calls: CallCounter::default(),
        }
    }

    /// EC2 requests sent so far per API action (`DescribeInstances`, `RunInstances`, ...), SDK retries included:
    /// what EC2 counts against the account's request rate limit.
    pub fn calls(&self) -> BTreeMap<String, u64> {
        self.calls.snapshot()
    }

    async fn client(&self) -> Result<&Client> {
        self.client
            .get_or_try_init(|| build_client(&self.settings, self.calls.clone()))
            .await
    }

    /// Every instance matching `filters` (or with one of `ids`), all pages.
    async fn describe(&self, filters: Vec<Filter>) -> Result<Vec<Instance>> {
        let client = self.client().await?;
        let mut pages = client
            .describe_instances()
            .set_filters(Some(filters))
            .into_paginator()
            .send();
        let mut instances = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|error| classify(error, "DescribeInstances", None))?;
            for reservation in page.reservations() {
                instances.extend(reservation.instances().iter().filter_map(to_instance));
            }
        }
        Ok(instances)
    }

    /// The live (not terminated) instances of `owner` named `name`.
    async fn find_named(&self, owner: &str, name: &str) -> Result<Vec<Instance>> {
        let filters = vec![
            filter(&format!("tag:{OWNER_LABEL}"), [owner]),
            filter(&format!("tag:{NAME_TAG}"), [name]),
            filter("instance-state-name", ["pending", "running", "stopping", "stopped"]),
        ];
        self.describe(filters).await
    }

    /// One `RunInstances` attempt.
    async fn run_instance(
        &self,
        request: &CreateInstance,
        spec: &LaunchSpec,
        attempt: &Attempt<'_>,
    ) -> Result<Instance> {
        let client = self.client().await?;
        let tags: Vec<Tag> = request
            .labels
            .iter()
            .map(|(key, value)| Tag::builder().key(key).value(value).build())
            .chain(std::iter::once(
                Tag::builder().key(NAME_TAG).value(&request.name).build(),
            ))
            .collect();
        // Instance AND volumes are tagged in the same call: there is no moment an untagged instance exists.
        let tag_specs = [ResourceType::Instance, ResourceType::Volume]
            .into_iter()
            .map(|kind| {
                TagSpecification::builder()
                    .resource_type(kind)
                    .set_tags(Some(tags.clone()))
                    .build()
            })
            .collect();
        let mut call = client
            .run_instances()
            .min_count(1)
            .max_count(1)
            .client_token(client_token(request, attempt))
            .set_tag_specifications(Some(tag_specs))
            .set_image_id(spec.ami.clone())
            .set_subnet_id(spec.subnet_id.clone())
            .set_key_name(spec.key_name.clone());
        if let Some(instance_type) = attempt.instance_type {
            call = call.instance_type(InstanceType::from(instance_type));
        }
        if !spec.security_group_ids.is_empty() {
            call = call.set_security_group_ids(Some(spec.security_group_ids.clone()));
        }
        if let Some(template) = &spec.launch_template {
            let builder = LaunchTemplateSpecification::builder().set_version(spec.launch_template_version.clone());
            let builder = if template.starts_with("lt-") {
                builder.launch_template_id(template)
            } else {
                builder.launch_template_name(template)
            };
            call = call.launch_template(builder.build());
        }
        if attempt.spot {
            let spot = SpotMarketOptions::builder()
                .spot_instance_type(SpotInstanceType::OneTime)
                .instance_interruption_behavior(InstanceInterruptionBehavior::Terminate)
                .build();
            call = call.instance_market_options(
                InstanceMarketOptionsRequest::builder()
                    .market_type(MarketType::Spot)
                    .spot_options(spot)
                    .build(),
            );
        }
        if let Some(user_data) = &request.user_data {
            call = call.user_data(base64(user_data_script(user_data.expose()).as_bytes()));
        }
        let output = call
            .send()
            .await
            .map_err(|error| classify(error, "RunInstances", None))?;
        let created = output
            .instances()
            .first()
            .and_then(to_instance)
            .ok_or_else(|| Error::Other {
                provider: PROVIDER.to_owned(),
                source: format!("`RunInstances` for `{}` returned no instance", request.name).into(),
            })?;
        // Some EC2 answers (and emulators) leave the tags out of the RunInstances response: they were requested,
        // so report them.
        let mut created = created;
        for (key, value) in &request.labels {
            created.labels.entry(key.clone()).or_insert_with(|| value.clone());
        }
        created
            .labels
            .entry(NAME_TAG.to_owned())
            .or_insert_with(|| request.name.clone());
        created.name = request.name.clone();
        Ok(created)
    }

    /// After `IncorrectInstanceState`: what state the instance is in, to decide whether the call is done anyway.
    async fn state_after_refusal(&self, id: &InstanceId, refusal: Error) -> Result<InstanceState> {
        match self.get(id).await {
            Ok(instance) => Ok(instance.state),
            Err(Error::NotFound { what }) => Err(Error::NotFound { what }),
            Err(_) => Err(refusal),
        }
    }
}

#[async_trait]
impl Backend for Ec2 {
    fn kind(&self) -> &'static str {
        PROVIDER
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            exec: false,
            keeps_stopped: true,
        }
    }

    async fn observe(&self, request: &ListInstances) -> Result<BackendObservation> {
        let mut by_id: BTreeMap<InstanceId, Instance> = BTreeMap::new();
        for instance in self
            .describe(vec![filter(&format!("tag:{OWNER_LABEL}"), [request.owner.as_str()])])
            .await?
        {
            by_id.insert(instance.id.clone(), instance);
        }
        let adopted: BTreeSet<&str> = request.adopted.iter().map(InstanceId::as_str).collect();
        let adopted: Vec<&str> = adopted.into_iter().collect();
        for chunk in adopted.chunks(MAX_FILTER_VALUES) {
            // A filter (unlike `InstanceIds`) leaves an unknown id out instead of failing the whole call.
            for instance in self
                .describe(vec![filter("instance-id", chunk.iter().copied())])
                .await?
            {
                by_id.insert(instance.id.clone(), instance);
            }
        }
        Ok(BackendObservation {
            instances: by_id.into_values().collect(),
            prices: BTreeMap::new(),
            missing_images: Vec::new(),
        })
    }

    async fn create(&self, request: &CreateInstance) -> Result<Instance> {
        let owner = request.labels.get(OWNER_LABEL).ok_or_else(|| Error::Invalid {
            provider: PROVIDER.to_owned(),
            message: format!("refusing to create `{}` without a `{OWNER_LABEL}` tag", request.name),
        })?;
        if !request.labels.contains_key(POOL_LABEL) {
            return Err(Error::Invalid {
                provider: PROVIDER.to_owned(),
                message: format!("refusing to create `{}` without a `{POOL_LABEL}` tag", request.name),
            });
        }
        let spec = LaunchSpec::parse(&request.machine)?;
        if !self.find_named(owner, &request.name).await?.is_empty() {
            return Err(Error::AlreadyExists {
                what: format!("EC2 instance `{}`", request.name),
            });
        }

        let mut refusals = Vec::new();
        for attempt in spec.attempts() {
            // A ClientToken EC2 remembers from an earlier life of this name (since terminated) replays that dead
            // instance: the next generation's token creates a fresh one.
            for generation in 0..3u32 {
                let attempt = Attempt { generation, ..attempt };
                match self.run_instance(request, &spec, &attempt).await {
                    Ok(instance) if matches!(instance.state, InstanceState::Terminated | InstanceState::Deleting) => {
                        tracing::debug!(instance = %instance.id, "client token replayed a terminated instance");
                    }
                    Ok(instance) => return Ok(instance),
                    Err(Error::Capacity { message, .. }) => {
                        tracing::info!(candidate = %attempt, %message, "no capacity, trying the next candidate");
                        refusals.push(format!("{attempt}: {message}"));
                        break;
                    }
                    Err(error) => return Err(error),
                }
            }
        }
        Err(Error::Capacity {
            provider: PROVIDER.to_owned(),
            message: if refusals.is_empty() {
                format!(
                    "every `RunInstances` for `{}` replayed a terminated instance",
                    request.name
                )
            } else {
                format!(
                    "no candidate for `{}` could be launched: {}",
                    request.name,
                    refusals.join("; ")
                )
            },
        })
    }

    async fn get(&self, id: &InstanceId) -> Result<Instance> {
        let client = self.client().await?;
        let output = client
            .describe_instances()
            .instance_ids(id.as_str())
            .send()
            .await
            .map_err(|error| classify(error, "DescribeInstances", Some(id)))?;
        output
            .reservations()
            .iter()
            .flat_map(|reservation| reservation.instances())
            .filter_map(to_instance)
            .find(|instance| &instance.id == id)
            .ok_or_else(|| not_found(id))
    }

    async fn start(&self, id: &InstanceId) -> Result<()> {
        let client = self.client().await?;
        let refused_state = match client.start_instances().instance_ids(id.as_str()).send().await {
            Ok(output) => {
                // EC2 refuses to start a terminated instance; emulators may "start" it: refuse it the same way.
                let previous = output
                    .starting_instances()
                    .iter()
                    .find(|change| change.instance_id() == Some(id.as_str()))
                    .and_then(|change| change.previous_state())
                    .map(|state| map_state(state.name()));
                match previous {
                    Some(state @ (InstanceState::Terminated | InstanceState::Deleting)) => state,
                    _ => return Ok(()),
                }
            }
            Err(error) => {
                let refusal = classify(error, "StartInstances", Some(id));
                if !is_incorrect_state(&refusal) {
                    return Err(refusal);
                }
                self.state_after_refusal(id, refusal).await?
            }
        };
        match refused_state {
            InstanceState::Pending | InstanceState::Running => Ok(()),
            // Seen on the next cycle as stopped and started then; apply's retries may catch it sooner.
            InstanceState::Stopping => Err(Error::Unavailable {
                provider: PROVIDER.to_owned(),
                message: format!("instance `{id}` is still stopping; it can be started once it has stopped"),
            }),
            state @ (InstanceState::Deleting | InstanceState::Terminated) => Err(Error::Invalid {
                provider: PROVIDER.to_owned(),
                message: format!(
                    "instance `{id}` is {state} and can never be started again\nhint: remove it from the pool's \
                     `startStop.instances`"
                ),
            }),
            state => Err(Error::Unavailable {
                provider: PROVIDER.to_owned(),
                message: format!("instance `{id}` cannot be started while {state}"),
            }),
        }
    }

    async fn stop(&self, id: &InstanceId) -> Result<()> {
        let client = self.client().await?;
        let Err(error) = client.stop_instances().instance_ids(id.as_str()).send().await else {
            return Ok(());
        };
        let refusal = classify(error, "StopInstances", Some(id));
        if !is_incorrect_state(&refusal) {
            return Err(refusal);
        }
        match self.state_after_refusal(id, refusal).await? {
            InstanceState::Stopping | InstanceState::Stopped => Ok(()),
            state @ (InstanceState::Deleting | InstanceState::Terminated) => Err(Error::Invalid {
                provider: PROVIDER.to_owned(),
                message: format!("instance `{id}` is {state}; there is nothing to stop"),
            }),
            state => Err(Error::Unavailable {
                provider: PROVIDER.to_owned(),
                message: format!("instance `{id}` cannot be stopped while {state}"),
            }),
        }
    }

    async fn delete(&self, id: &InstanceId) -> Result<()> {
        let client = self.client().await?;
        let output = client
            .terminate_instances()
            .instance_ids(id.as_str())
            .send()
            .await
            .map_err(|error| classify(error, "TerminateInstances", Some(id)))?;
        // EC2 accepts terminating a terminated instance; the contract wants "already gone" told apart.
        let previous = output
            .terminating_instances()
            .iter()
            .find(|change| change.instance_id() == Some(id.as_str()))
            .and_then(|change| change.previous_state())
            .and_then(|state| state.name());
        if previous == Some(&InstanceStateName::Terminated) {
            return Err(not_found(id));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Client set-up and call counting
// ---------------------------------------------------------------------------------------------------------------

async fn build_client(settings: &Ec2Settings, calls: CallCounter) -> Result<Client> {
    let attempts = settings.max_attempts.unwrap_or(3).max(1);
    let retry = RetryConfig::standard()
        .with_max_attempts(attempts)
        .with_initial_backoff(Duration::from_secs(1))
        .with_max_backoff(Duration::from_secs(5));
    // Every request has a deadline: a hung EC2 endpoint must not hang a cycle.
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(5))
        .read_timeout(Duration::from_secs(30))
        .operation_attempt_timeout(Duration::from_secs(30))
        .operation_timeout(Duration::from_secs(90))
        .build();
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .retry_config(retry)
        .timeout_config(timeouts);
    if let Some(region) = &settings.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(endpoint) = &settings.endpoint {
        loader = loader.endpoint_url(endpoint.clone());
    }
    if let Some(credentials) = &settings.credentials {
        loader = loader.credentials_provider(credentials.clone());
    }
    let shared = loader.load().await;
    if shared.region().is_none() {
        return Err(Error::Invalid {
            provider: PROVIDER.to_owned(),
            message: "no AWS region is configured\nhint: set `region` on the backend, or `AWS_REGION`".to_owned(),
        });
    }
    let config = aws_sdk_ec2::config::Builder::from(&shared).interceptor(calls).build();
    Ok(Client::from_conf(config))
}

/// Counts every request the SDK transmits (retries included), by EC2 action.
#[derive(Debug, Clone, Default)]
struct CallCounter {
    counts: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl CallCounter {
    fn snapshot(&self) -> BTreeMap<String, u64> {
        self.counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

impl Intercept for CallCounter {
    fn name(&self) -> &'static str {
        "ciscale-call-counter"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        // EC2 speaks the query protocol: the action is the form body's `Action` field.
        let body = context.request().body().bytes().unwrap_or_default();
        let action = String::from_utf8_lossy(body)
            .split('&')
            .find_map(|pair| pair.strip_prefix("Action=").map(str::to_owned))
            .unwrap_or_else(|| "unknown".to_owned());
        *self
            .counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(action)
            .or_default() += 1;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Launch specs and attempts
// ---------------------------------------------------------------------------------------------------------------

/// A pool's machine keys, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct LaunchSpec {
    instance_types: Vec<String>,
    ami: Option<String>,
    subnet_id: Option<String>,
    security_group_ids: Vec<String>,
    key_name: Option<String>,
    launch_template: Option<String>,
    launch_template_version: Option<String>,
    spot: bool,
}

fn comma_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect()
}

impl LaunchSpec {
    fn parse(machine: &BTreeMap<String, String>) -> Result<Self> {
        let invalid = |message: String| Error::Invalid {
            provider: PROVIDER.to_owned(),
            message,
        };
        let mut spec = LaunchSpec::default();
        for (key, value) in machine {
            let single = || Some(value.trim().to_owned()).filter(|value| !value.is_empty());
            match key.as_str() {
                "instanceType" => spec.instance_types = comma_list(value),
                "ami" | "imageId" => spec.ami = single(),
                "subnetId" => spec.subnet_id = single(),
                "securityGroupIds" => spec.security_group_ids = comma_list(value),
                "keyName" => spec.key_name = single(),
                "launchTemplate" => spec.launch_template = single(),
                "launchTemplateVersion" => spec.launch_template_version = single(),
                "spot" => {
                    spec.spot = match value.trim() {
                        "true" => true,
                        "false" | "" => false,
                        other => {
                            return Err(invalid(format!(
                                "machine key `spot` is `{other}`, not `true` or `false`"
                            )))
                        }
                    }
                }
                other => {
                    return Err(invalid(format!(
                        "unknown machine key `{other}` for an EC2 pool\nhint: known keys are {}",
                        MACHINE_KEYS
                            .iter()
                            .map(|key| format!("`{key}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )))
                }
            }
        }
        if machine.contains_key("ami") && machine.contains_key("imageId") {
            return Err(invalid(
                "machine keys `ami` and `imageId` are the same thing; set one".to_owned(),
            ));
        }
        if spec.launch_template.is_none() {
            if spec.ami.is_none() {
                return Err(invalid(
                    "an EC2 pool needs `ami` (or a `launchTemplate`)\nhint: set `machine.ami: ami-…`".to_owned(),
                ));
            }
            if spec.instance_types.is_empty() {
                return Err(invalid(
                    "an EC2 pool needs `instanceType` (or a `launchTemplate`)\nhint: set `machine.instanceType: \
                     t3.medium` (a comma list tries each in order)"
                        .to_owned(),
                ));
            }
        }
        Ok(spec)
    }

    /// The candidates in order: with `spot`, every instance type as spot first (spot is asked for to save
    /// money, so any spot type beats on-demand), then every type on-demand.
    fn attempts(&self) -> Vec<Attempt<'_>> {
        let types: Vec<Option<&str>> = if self.instance_types.is_empty() {
            vec![None] // the launch template's type
        } else {
            self.instance_types.iter().map(|t| Some(t.as_str())).collect()
        };
        let markets: &[bool] = if self.spot { &[true, false] } else { &[false] };
        markets
            .iter()
            .flat_map(|&spot| {
                types.iter().map(move |&instance_type| Attempt {
                    instance_type,
                    spot,
                    generation: 0,
                })
            })
            .collect()
    }
}

/// One `RunInstances` candidate.
#[derive(Debug, Clone, Copy)]
struct Attempt<'spec> {
    instance_type: Option<&'spec str>,
    spot: bool,
    generation: u32,
}

impl fmt::Display for Attempt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let market = if self.spot { "spot" } else { "on-demand" };
        write!(f, "{} {market}", self.instance_type.unwrap_or("launch template type"))
    }
}

/// A deterministic `ClientToken` (≤ 64 chars): a create retried after a lost response or a crash sends the same
/// token, and EC2 answers with the instance the first one launched instead of launching a second. Each candidate
/// gets its own token (EC2 refuses a token reused with other parameters).
fn client_token(request: &CreateInstance, attempt: &Attempt<'_>) -> String {
    let owner = request.labels.get(OWNER_LABEL).map(String::as_str).unwrap_or_default();
    let mut hasher = Sha256::new();
    for part in [
        owner,
        request.pool.as_str(),
        request.name.as_str(),
        attempt.instance_type.unwrap_or("-"),
        if attempt.spot { "spot" } else { "on-demand" },
        &attempt.generation.to_string(),
    ] {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    let digest: String = hasher.finalize().iter().map(|byte| format!("{byte:02x}")).collect();
    format!("ciscale-{}", &digest[..48])
}

/// The user data EC2 runs at first boot. A payload that is already a script or cloud-config goes as it is;
/// ciscale's env file (the agent's credential and settings) is wrapped in a script that writes it root-only to
/// the credential path and starts the agent wrapper the AMI provides.
fn user_data_script(payload: &str) -> String {
    if payload.starts_with("#!") || payload.starts_with("#cloud-config") {
        return payload.to_owned();
    }
    let dir = CREDENTIAL_PATH.rsplit_once('/').map_or("/run", |(dir, _)| dir);
    format!(
        "#!/bin/sh\n# written by ciscale: the agent's environment, readable by root only\nset -eu\numask 077\nmkdir -p \
         {dir}\ncat > {CREDENTIAL_PATH} <<'CISCALE_AGENT_ENV_EOF'\n{payload}CISCALE_AGENT_ENV_EOF\nchmod 0400 \
         {CREDENTIAL_PATH}\nif [ -x {AGENT_COMMAND} ]; then {AGENT_COMMAND} & fi\n"
    )
}

/// Standard base64 with padding (what EC2 wants for `UserData`).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (index, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if index <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------------------------
// Mapping EC2's answers
// ---------------------------------------------------------------------------------------------------------------

fn filter<'v>(name: &str, values: impl IntoIterator<Item = &'v str>) -> Filter {
    Filter::builder()
        .name(name)
        .set_values(Some(values.into_iter().map(str::to_owned).collect()))
        .build()
}

fn map_state(state: Option<&InstanceStateName>) -> InstanceState {
    match state {
        Some(InstanceStateName::Pending) => InstanceState::Pending,
        Some(InstanceStateName::Running) => InstanceState::Running,
        Some(InstanceStateName::Stopping) => InstanceState::Stopping,
        Some(InstanceStateName::Stopped) => InstanceState::Stopped,
        Some(InstanceStateName::ShuttingDown) => InstanceState::Deleting,
        Some(InstanceStateName::Terminated) => InstanceState::Terminated,
        _ => InstanceState::Unknown,
    }
}

fn to_instance(ec2: &aws_sdk_ec2::types::Instance) -> Option<Instance> {
    let id = ec2.instance_id()?;
    let labels: BTreeMap<String, String> = ec2
        .tags()
        .iter()
        .filter_map(|tag| Some((tag.key()?.to_owned(), tag.value().unwrap_or_default().to_owned())))
        .collect();
    let name = labels.get(NAME_TAG).cloned().unwrap_or_else(|| id.to_owned());
    // LaunchTime is reset by every start: exactly the "up since" the planner's idle logic wants. Without one
    // (never seen in practice), "now" keeps the instance from looking long idle.
    let created_at = ec2
        .launch_time()
        .and_then(|time| Timestamp::new(time.secs(), i32::try_from(time.subsec_nanos()).unwrap_or(0)).ok())
        .unwrap_or_else(Timestamp::now);
    let mut attributes = BTreeMap::new();
    if let Some(instance_type) = ec2.instance_type() {
        attributes.insert("instanceType".to_owned(), instance_type.as_str().to_owned());
    }
    if let Some(image) = ec2.image_id() {
        attributes.insert("imageId".to_owned(), image.to_owned());
        attributes.insert("ami".to_owned(), image.to_owned());
    }
    if let Some(subnet) = ec2.subnet_id() {
        attributes.insert("subnetId".to_owned(), subnet.to_owned());
    }
    Some(Instance {
        id: InstanceId::new(id),
        name,
        state: map_state(ec2.state().and_then(|state| state.name())),
        created_at,
        labels,
        attributes,
    })
}

fn not_found(id: &InstanceId) -> Error {
    Error::NotFound {
        what: format!("EC2 instance `{id}`"),
    }
}

fn is_incorrect_state(error: &Error) -> bool {
    matches!(error, Error::Unavailable { message, .. } if message.starts_with("`IncorrectInstanceState`"))
}

/// Error codes meaning "not here, not now": the next instance type, market or cycle may succeed.
const CAPACITY_CODES: &[&str] = &[
    "InsufficientInstanceCapacity",
    "InsufficientHostCapacity",
    "InsufficientReservedInstanceCapacity",
    "InsufficientCapacity",
    "InsufficientFreeAddressesInSubnet",
    "SpotMaxPriceTooLow",
    "MaxSpotInstanceCountExceeded",
    "InstanceLimitExceeded",
    "VcpuLimitExceeded",
    // "The requested configuration is currently not supported": e.g. the instance type in this AZ.
    "Unsupported",
];

const AUTH_CODES: &[&str] = &[
    "AuthFailure",
    "UnauthorizedOperation",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "MissingAuthenticationToken",
    "ExpiredToken",
    "RequestExpired",
    "OptInRequired",
    "Blocked",
];

const THROTTLING_CODES: &[&str] = &["RequestLimitExceeded", "Throttling", "ThrottlingException"];

const SERVER_CODES: &[&str] = &["InternalError", "InternalFailure", "ServiceUnavailable", "Unavailable"];

/// Maps an SDK error onto the provider error retries and fallbacks decide on. `action` names the EC2 call,
/// `instance` the instance it was about (for `NotFound`).
fn classify<E>(error: SdkError<E>, action: &str, instance: Option<&InstanceId>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = error.raw_response().map(|response| response.status().as_u16());
    match &error {
        SdkError::ServiceError(_) | SdkError::ResponseError(_) => {}
        SdkError::TimeoutError(_) => {
            return Error::Unavailable {
                provider: PROVIDER.to_owned(),
                message: format!("`{action}` timed out"),
            };
        }
        _ => {
            let detail = DisplayErrorContext(&error).to_string();
            // A missing or broken credential chain fails before anything is sent.
            if detail.to_ascii_lowercase().contains("credential") {
                return Error::Unauthenticated {
                    provider: PROVIDER.to_owned(),
                    message: format!(
                        "no usable AWS credentials for `{action}`: {detail}\nhint: set `AWS_ACCESS_KEY_ID` and \
                         `AWS_SECRET_ACCESS_KEY`, or `AWS_PROFILE`, or run on an instance with a role"
                    ),
                };
            }
            if matches!(error, SdkError::ConstructionFailure(_)) {
                return Error::Invalid {
                    provider: PROVIDER.to_owned(),
                    message: format!("`{action}`: {detail}"),
                };
            }
            return Error::Unavailable {
                provider: PROVIDER.to_owned(),
                message: format!("`{action}` could not reach EC2: {detail}"),
            };
        }
    }
    classify_code(error.code(), error.message(), status, action, instance)
}

/// The pure part of [`classify`]: an EC2 error code (and message, HTTP status) to a provider error.
fn classify_code(
    code: Option<&str>,
    message: Option<&str>,
    status: Option<u16>,
    action: &str,
    instance: Option<&InstanceId>,
) -> Error {
    let provider = PROVIDER.to_owned();
    let said = message.unwrap_or("no message");
    let Some(code) = code else {
        let shown = status.map_or_else(|| "no status".to_owned(), |status| format!("HTTP {status}"));
        return if matches!(status, Some(500..=599)) {
            Error::Unavailable {
                provider,
                message: format!("`{action}` failed with {shown}"),
            }
        } else {
            Error::Other {
                provider,
                source: format!("`{action}` failed with {shown}: {said}").into(),
            }
        };
    };
    let text = format!("`{code}`: {said} (`{action}`)");
    if AUTH_CODES.contains(&code) {
        return Error::Unauthenticated {
            provider,
            message: format!(
                "{text}\nhint: check the credentials (`AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, ...) and that their \
                 policy allows ec2:{action}"
            ),
        };
    }
    if THROTTLING_CODES.contains(&code) {
        return Error::RateLimited {
            provider,
            retry_after: None,
        };
    }
    if CAPACITY_CODES.contains(&code) {
        return Error::Capacity {
            provider,
            message: text,
        };
    }
    if code == "InvalidInstanceID.NotFound" {
        return match instance {
            Some(id) => not_found(id),
            None => Error::NotFound {
                what: format!("EC2 instance ({said})"),
            },
        };
    }
    if code == "InvalidInstanceID.Malformed" {
        let what = instance.map_or_else(|| said.to_owned(), |id| format!("`{id}`"));
        return Error::Invalid {
            provider,
            message: format!(
                "{what} is not an EC2 instance id (`{code}`)\nhint: EC2 instance ids look like `i-0123456789abcdef0`"
            ),
        };
    }
    if code == "IncorrectInstanceState" {
        // Start/stop look at the instance's state to decide; anything else may simply try again later.
        return Error::Unavailable {
            provider,
            message: text,
        };
    }
    if SERVER_CODES.contains(&code) || matches!(status, Some(500..=599)) {
        return Error::Unavailable {
            provider,
            message: text,
        };
    }
    Error::Invalid {
        provider,
        message: text,
    }
}
