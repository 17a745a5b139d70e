//! One integration test binary (heavy dependencies are linked once).

mod apply;
mod aws;
mod azure;
mod azure_incus;
mod cli;
mod config;
mod conformance;
mod converge;
mod crash;
mod daemon;
mod deploy;
mod fake;
mod fakes;
mod forgejo;
mod hcloud;
mod incus;
mod metrics;
mod newcomer;
mod picus;
mod readme;
mod plan_props;
mod saved_plan;
mod scenarios;
mod simulate;
mod woodpecker;
