//! One integration test binary (heavy dependencies are linked once).

mod apply;
mod cli;
mod config;
mod conformance;
mod converge;
mod fake;
mod incus;
mod plan_props;
mod scenarios;
