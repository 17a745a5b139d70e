//! In-repo HTTP fakes of the services ciscale talks to, and the spec checker they share.
// Helpers are shared by several test modules; not every one uses all of them.
#![allow(dead_code)]

pub mod spec;
pub mod woodpecker;
