mod config;
mod plan_props;
