//! One integration test binary (heavy dependencies are linked once).

mod apply;
mod aws;
mod azure;
mod azure_incus;
mod cli;
mod config;
mod conformance;
mod converge;
mod daemon;
mod fake;
mod fakes;
mod hcloud;
mod incus;
mod metrics;
mod picus;
mod plan_props;
mod scenarios;
mod simulate;
mod woodpecker;
