mod config;
mod plan_props;
mod scenarios;
