mod plan_props;
