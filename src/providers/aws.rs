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
//!   one has capacity, each with a deterministic client token (see [`client_token`]): a retry after a crash or a
//!   lost answer gets the instance the first try launched. A token that EC2 remembers from an earlier life of the
//!   name costs one more `RunInstances` (and, when EC2 answers `IdempotentParameterMismatch`, a
//!   `DescribeInstances`). start/stop/delete: one call each (plus a `DescribeInstances` when EC2 answers
//!   `IncorrectInstanceState`, to say why).
//!
//! # User data
//! The bootstrap payload apply hands over (the cloud-init document of `apply::cloud_init`, which holds the agent's
//! env file) is sent as it is, base64-encoded. It stays readable through the instance metadata service for as
//! long as the instance lives; the cloud-init blocks that address for the build containers.
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
        Self { settings: Arc::new(settings), client: Arc::new(OnceCell::new()), calls: CallCounter::default() }
    }

    /// EC2 requests sent so far per API action (`DescribeInstances`, `RunInstances`, ...), SDK retries included:
    /// what EC2 counts against the account's request rate limit.
    pub fn calls(&self) -> BTreeMap<String, u64> {
        self.calls.snapshot()
    }

    async fn client(&self) -> Result<&Client> {
        self.client.get_or_try_init(|| build_client(&self.settings, self.calls.clone())).await
    }

    /// Every instance matching `filters`, all pages, as EC2 describes them.
    async fn describe_raw(&self, filters: Vec<Filter>) -> Result<Vec<aws_sdk_ec2::types::Instance>> {
        let client = self.client().await?;
        let mut pages = client.describe_instances().set_filters(Some(filters)).into_paginator().send();
        let mut instances = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|error| classify(error, "DescribeInstances", None))?;
            for reservation in page.reservations() {
                instances.extend(reservation.instances().iter().cloned());
            }
        }
        Ok(instances)
    }

    /// Every instance matching `filters`, all pages.
    async fn describe(&self, filters: Vec<Filter>) -> Result<Vec<Instance>> {
        Ok(self.describe_raw(filters).await?.iter().filter_map(to_instance).collect())
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

    /// The instance of `owner` named `name` that was launched with `token`, in any state; `None` when EC2 lists
    /// none. EC2's listings are eventually consistent: an instance launched a moment ago (by a try that crashed
    /// before it heard the answer) may be missing from the first look, so an empty answer is asked again a few
    /// times before it counts. The owner and `Name` tags filter rather than EC2's `client-token` filter: the tags
    /// are set in the launch call itself, so they find the same instances, and emulators (moto) lack that filter.
    async fn instance_of_token(&self, owner: &str, name: &str, token: &str) -> Result<Option<Instance>> {
        for look in 1..=TOKEN_LOOKS {
            let filters =
                vec![filter(&format!("tag:{OWNER_LABEL}"), [owner]), filter(&format!("tag:{NAME_TAG}"), [name])];
            let found = self
                .describe_raw(filters)
                .await?
                .iter()
                .filter(|instance| instance.client_token() == Some(token))
                .find_map(to_instance);
            if found.is_some() || look == TOKEN_LOOKS {
                return Ok(found);
            }
            tokio::time::sleep(TOKEN_LOOK_INTERVAL).await;
        }
        Ok(None)
    }

    /// Launches `request` as `candidate`, or finds the instance an earlier try of the same create launched.
    ///
    /// The client tokens of a candidate are tried in order (see [`client_token`]) until one launches or answers
    /// with a live instance. A token answers in one of three ways:
    /// - a launch, or a replay of the instance an earlier try launched with the same parameters: live, so it is
    ///   this create's instance;
    /// - a replay of a terminated instance: an earlier life of this name used the token; the next one is tried;
    /// - `IdempotentParameterMismatch`: the token was used with other parameters, typically other user data (a
    ///   retry re-registers the agent, which may get a fresh credential). The instance launched with it decides:
    ///   live, it is this create's (the planner never creates a name that is live); terminated or gone, the next
    ///   token is tried.
    async fn launch(
        &self,
        request: &CreateInstance,
        owner: &str,
        spec: &LaunchSpec,
        candidate: &Attempt<'_>,
        day: i64,
    ) -> Result<Instance> {
        for generation in 0..=MAX_GENERATIONS {
            let token = client_token(request, candidate, generation, day);
            match self.run_instance(request, spec, candidate, &token).await? {
                RunAnswer::Instance(instance) if !is_gone(instance.state) => return Ok(instance),
                RunAnswer::Instance(instance) => {
                    tracing::debug!(instance = %instance.id, generation, "client token replayed a terminated instance");
                }
                RunAnswer::TokenMismatch => match self.instance_of_token(owner, &request.name, &token).await? {
                    Some(instance) if !is_gone(instance.state) => {
                        tracing::info!(
                            instance = %instance.id,
                            "an earlier try of this create launched the instance (with other user data): taking it over"
                        );
                        return Ok(labelled(instance, request));
                    }
                    _ => tracing::debug!(generation, "client token belongs to an earlier life of this name"),
                },
            }
        }
        // Not worth retrying today: every further try would walk the same spent tokens.
        Err(Error::Other {
            provider: PROVIDER.to_owned(),
            source: format!(
                "`{}` was launched {} times today already: EC2 still remembers every client token this create could \
                 use\nhint: it can be created again tomorrow (UTC); a pool that replaces its instances this often may \
                 need a larger `max` or a longer `idleTimeout`",
                request.name,
                MAX_GENERATIONS + 1
            )
            .into(),
        })
    }

    /// One `RunInstances` call with `token`.
    async fn run_instance(
        &self,
        request: &CreateInstance,
        spec: &LaunchSpec,
        attempt: &Attempt<'_>,
        token: &str,
    ) -> Result<RunAnswer> {
        let client = self.client().await?;
        let tags: Vec<Tag> = request
            .labels
            .iter()
            .map(|(key, value)| Tag::builder().key(key).value(value).build())
            .chain(std::iter::once(Tag::builder().key(NAME_TAG).value(&request.name).build()))
            .collect();
        // Instance AND volumes are tagged in the same call: there is no moment an untagged instance exists.
        let tag_specs = [ResourceType::Instance, ResourceType::Volume]
            .into_iter()
            .map(|kind| TagSpecification::builder().resource_type(kind).set_tags(Some(tags.clone())).build())
            .collect();
        let mut call = client
            .run_instances()
            .min_count(1)
            .max_count(1)
            .client_token(token)
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
                InstanceMarketOptionsRequest::builder().market_type(MarketType::Spot).spot_options(spot).build(),
            );
        }
        if let Some(user_data) = &request.user_data {
            // Sent as it is: apply hands over the whole cloud-init document (see `apply::cloud_init`).
            call = call.user_data(aws_smithy_types::base64::encode(user_data.expose()));
        }
        let output = match call.send().await {
            Ok(output) => output,
            Err(error) if error.code() == Some(IDEMPOTENT_PARAMETER_MISMATCH) => return Ok(RunAnswer::TokenMismatch),
            Err(error) => return Err(classify(error, "RunInstances", None)),
        };
        let created = output.instances().first().and_then(to_instance).ok_or_else(|| Error::Other {
            provider: PROVIDER.to_owned(),
            source: format!("`RunInstances` for `{}` returned no instance", request.name).into(),
        })?;
        Ok(RunAnswer::Instance(labelled(created, request)))
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
        Capabilities { exec: false, keeps_stopped: true }
    }

    async fn observe(&self, request: &ListInstances) -> Result<BackendObservation> {
        let mut by_id: BTreeMap<InstanceId, Instance> = BTreeMap::new();
        for instance in self.describe(vec![filter(&format!("tag:{OWNER_LABEL}"), [request.owner.as_str()])]).await? {
            by_id.insert(instance.id.clone(), instance);
        }
        let adopted: BTreeSet<&str> = request.adopted.iter().map(InstanceId::as_str).collect();
        let adopted: Vec<&str> = adopted.into_iter().collect();
        for chunk in adopted.chunks(MAX_FILTER_VALUES) {
            // A filter (unlike `InstanceIds`) leaves an unknown id out instead of failing the whole call.
            for instance in self.describe(vec![filter("instance-id", chunk.iter().copied())]).await? {
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
            return Err(Error::AlreadyExists { what: format!("EC2 instance `{}`", request.name) });
        }

        // The UTC day scopes the client tokens after the first (see `client_token`); read once, so a create that
        // runs over midnight keeps one sequence.
        let day = Timestamp::now().as_second().div_euclid(SECONDS_PER_DAY);
        let mut refusals = Vec::new();
        for candidate in spec.attempts() {
            match self.launch(request, owner, &spec, &candidate, day).await {
                Ok(instance) => return Ok(instance),
                Err(Error::Capacity { message, .. }) => {
                    tracing::info!(%candidate, %message, "no capacity, trying the next candidate");
                    refusals.push(format!("{candidate}: {message}"));
                }
                Err(error) => return Err(error),
            }
        }
        Err(Error::Capacity {
            provider: PROVIDER.to_owned(),
            message: format!("no candidate for `{}` could be launched: {}", request.name, refusals.join("; ")),
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
    let mut loader =
        aws_config::defaults(aws_config::BehaviorVersion::latest()).retry_config(retry).timeout_config(timeouts);
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
        self.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
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
        *self.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).entry(action).or_default() += 1;
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
    value.split(',').map(str::trim).filter(|item| !item.is_empty()).map(str::to_owned).collect()
}

impl LaunchSpec {
    fn parse(machine: &BTreeMap<String, String>) -> Result<Self> {
        let invalid = |message: String| Error::Invalid { provider: PROVIDER.to_owned(), message };
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
                            return Err(invalid(format!("machine key `spot` is `{other}`, not `true` or `false`")))
                        }
                    }
                }
                other => {
                    return Err(invalid(format!(
                        "unknown machine key `{other}` for an EC2 pool\nhint: known keys are {}",
                        MACHINE_KEYS.iter().map(|key| format!("`{key}`")).collect::<Vec<_>>().join(", ")
                    )))
                }
            }
        }
        if machine.contains_key("ami") && machine.contains_key("imageId") {
            return Err(invalid("machine keys `ami` and `imageId` are the same thing; set one".to_owned()));
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
            .flat_map(|&spot| types.iter().map(move |&instance_type| Attempt { instance_type, spot }))
            .collect()
    }
}

/// One `RunInstances` candidate.
#[derive(Debug, Clone, Copy)]
struct Attempt<'spec> {
    instance_type: Option<&'spec str>,
    spot: bool,
}

impl fmt::Display for Attempt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let market = if self.spot { "spot" } else { "on-demand" };
        write!(f, "{} {market}", self.instance_type.unwrap_or("launch template type"))
    }
}

/// What one `RunInstances` answered, as far as [`Ec2::launch`] cares.
enum RunAnswer {
    /// A fresh launch, or the replay of the instance this token launched before (in whatever state it is now).
    Instance(Instance),
    /// The token was used before with other parameters.
    TokenMismatch,
}

/// EC2's answer to a client token reused with other parameters.
const IDEMPOTENT_PARAMETER_MISMATCH: &str = "IdempotentParameterMismatch";
/// Client tokens a create may use per candidate and UTC day after the day-less first one (see [`client_token`]).
/// EC2 lists a terminated instance for about an hour and the planner does not reuse a name while it is listed, so
/// a name lives at most about 24 times a day.
const MAX_GENERATIONS: u32 = 48;
/// Looks at the listing for the instance of a mismatched token, and the pause between them: long enough for EC2's
/// eventually consistent listing to show an instance launched a moment ago, short for a path that is rare.
const TOKEN_LOOKS: u32 = 3;
const TOKEN_LOOK_INTERVAL: Duration = Duration::from_millis(1500);
const SECONDS_PER_DAY: i64 = 86_400;

/// Terminated or on its way there: no longer an instance of this name.
fn is_gone(state: InstanceState) -> bool {
    matches!(state, InstanceState::Terminated | InstanceState::Deleting)
}

/// `instance` named and labelled as `request` asked: some EC2 answers (and emulators) leave the tags out of the
/// `RunInstances` response, but they were set in the same call.
fn labelled(mut instance: Instance, request: &CreateInstance) -> Instance {
    for (key, value) in &request.labels {
        instance.labels.entry(key.clone()).or_insert_with(|| value.clone());
    }
    instance.labels.entry(NAME_TAG.to_owned()).or_insert_with(|| request.name.clone());
    instance.name = request.name.clone();
    instance
}

/// The `generation`-th `ClientToken` (≤ 64 chars) of a create as `candidate`: a create retried after a lost
/// response or a crash sends the same tokens in the same order, and EC2 answers with the instance the first try
/// launched instead of launching a second. EC2 remembers a token long after its instance is gone (at least a day
/// after termination), so a token must also tell a later life of the same name from a retry:
/// - every token covers owner, pool, name and candidate (EC2 refuses a token reused with other parameters, and
///   each candidate is a request of its own) and the create's [`CreateInstance::attempt`] (the agent record's id,
///   new for each life with most CIs);
/// - where the attempt does not change between lives (a pre-registered agent, an Azure agent before it first
///   registered), generation 0 belongs to an earlier life and the next ones are tried; those are scoped to the UTC
///   day, so a name reused all week walks at most the tokens of one day.
///
/// Generation 0 has no day in it: a retry of a create whose attempt is new is idempotent whenever it comes.
fn client_token(request: &CreateInstance, candidate: &Attempt<'_>, generation: u32, day: i64) -> String {
    let owner = request.labels.get(OWNER_LABEL).map(String::as_str).unwrap_or_default();
    let mut hasher = Sha256::new();
    let scope = if generation == 0 { String::new() } else { format!("{day}/{generation}") };
    for part in [
        owner,
        request.pool.as_str(),
        request.name.as_str(),
        candidate.instance_type.unwrap_or("-"),
        if candidate.spot { "spot" } else { "on-demand" },
        request.attempt.as_deref().unwrap_or("-"),
        &scope,
    ] {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    let digest: String = hasher.finalize().iter().map(|byte| format!("{byte:02x}")).collect();
    format!("ciscale-{}", &digest[..48])
}

// ---------------------------------------------------------------------------------------------------------------
// Mapping EC2's answers
// ---------------------------------------------------------------------------------------------------------------

fn filter<'v>(name: &str, values: impl IntoIterator<Item = &'v str>) -> Filter {
    Filter::builder().name(name).set_values(Some(values.into_iter().map(str::to_owned).collect())).build()
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
    Error::NotFound { what: format!("EC2 instance `{id}`") }
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
            return Error::Unavailable { provider: PROVIDER.to_owned(), message: format!("`{action}` timed out") };
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
                return Error::Invalid { provider: PROVIDER.to_owned(), message: format!("`{action}`: {detail}") };
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
            Error::Unavailable { provider, message: format!("`{action}` failed with {shown}") }
        } else {
            Error::Other { provider, source: format!("`{action}` failed with {shown}: {said}").into() }
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
        return Error::RateLimited { provider, retry_after: None };
    }
    if CAPACITY_CODES.contains(&code) {
        return Error::Capacity { provider, message: text };
    }
    if code == "InvalidInstanceID.NotFound" {
        return match instance {
            Some(id) => not_found(id),
            None => Error::NotFound { what: format!("EC2 instance ({said})") },
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
        return Error::Unavailable { provider, message: text };
    }
    if SERVER_CODES.contains(&code) || matches!(status, Some(500..=599)) {
        return Error::Unavailable { provider, message: text };
    }
    Error::Invalid { provider, message: text }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PoolName;

    fn request(attempt: Option<&str>) -> CreateInstance {
        CreateInstance {
            name: "acme-linux-1".to_owned(),
            pool: PoolName::new("linux"),
            labels: BTreeMap::from([(OWNER_LABEL.to_owned(), "acme".to_owned())]),
            machine: BTreeMap::new(),
            user_data: None,
            attempt: attempt.map(str::to_owned),
        }
    }

    const ON_DEMAND: Attempt<'static> = Attempt { instance_type: Some("t3.micro"), spot: false };
    const DAY: i64 = 20_000;

    #[test]
    fn a_retry_sends_the_same_tokens_in_the_same_order() {
        let first: Vec<String> = (0..4).map(|g| client_token(&request(Some("7")), &ON_DEMAND, g, DAY)).collect();
        let retry: Vec<String> = (0..4).map(|g| client_token(&request(Some("7")), &ON_DEMAND, g, DAY)).collect();
        assert_eq!(first, retry);
        let distinct: BTreeSet<&String> = first.iter().collect();
        assert_eq!(distinct.len(), 4, "each generation has its own token: {first:?}");
        assert!(first.iter().all(|token| token.len() <= 64 && token.is_ascii()), "{first:?}");
    }

    #[test]
    fn a_new_agent_record_or_candidate_gets_new_tokens() {
        let life_one = client_token(&request(Some("7")), &ON_DEMAND, 0, DAY);
        assert_ne!(life_one, client_token(&request(Some("8")), &ON_DEMAND, 0, DAY), "a later life of the name");
        assert_ne!(life_one, client_token(&request(None), &ON_DEMAND, 0, DAY));
        let spot = Attempt { spot: true, ..ON_DEMAND };
        assert_ne!(life_one, client_token(&request(Some("7")), &spot, 0, DAY), "another market");
        let other_type = Attempt { instance_type: Some("t3.large"), ..ON_DEMAND };
        assert_ne!(life_one, client_token(&request(Some("7")), &other_type, 0, DAY), "another type");
    }

    #[test]
    fn only_the_tokens_after_the_first_depend_on_the_day() {
        let today = |g| client_token(&request(Some("7")), &ON_DEMAND, g, DAY);
        let tomorrow = |g| client_token(&request(Some("7")), &ON_DEMAND, g, DAY + 1);
        assert_eq!(today(0), tomorrow(0), "a retry over midnight still finds its first token");
        assert_ne!(today(1), tomorrow(1));
        assert_ne!(today(2), tomorrow(2));
    }
}
