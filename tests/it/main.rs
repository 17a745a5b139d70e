//! One integration test binary (heavy dependencies are linked once).

mod cli;
mod config;
mod converge;
