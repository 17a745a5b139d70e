//! One integration test binary (heavy dependencies are linked once).

mod apply;
mod azure;
mod cli;
mod config;
mod conformance;
mod converge;
mod fake;
mod fakes;
mod plan_props;
mod scenarios;
