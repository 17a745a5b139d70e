//! Which runner Forgejo gives a job to, re-implemented as a pure function so demand can be counted per pool
//! exactly as Forgejo hands jobs out.

/// Forgejo's rule (`ActionRunJob.ItRunsOn` in `models/actions/run_job.go`, applied by `CreateTaskForRunner` in
/// `models/actions/task.go` to the runner's declared label names): a runner takes a job iff
/// - the job's `runs-on` names at least one label and the runner has at least one label (either empty: never),
/// - and every label of the job's `runs-on` is one of the runner's label names.
///
/// Labels are compared as Go compares strings in a map (`container.Set[string].IsSubset`): exactly, so case and
/// spaces matter (`Debian` is not `debian`). Labels the runner has beyond the job's do not matter, nor does
/// their order. The runner's label *names* are meant: see [`label_name`] for a label as the runner is given it
/// (`debian:docker://node:22`). A runner bound to a job handle must match this way too: Forgejo checks
/// `IsRequestedByRunner(handle) && ItRunsOn(runner labels)`.
pub fn runs_on_matches<J, R>(runs_on: &[J], runner_labels: &[R]) -> bool
where
    J: AsRef<str>,
    R: AsRef<str>,
{
    if runs_on.is_empty() || runner_labels.is_empty() {
        return false;
    }
    runs_on.iter().all(|wanted| runner_labels.iter().any(|offered| offered.as_ref() == wanted.as_ref()))
}

/// The name of a runner label as `forgejo-runner --label` takes it (`name[:schema[:argument]]`, e.g.
/// `debian:docker://node:22-bookworm`, `linux:host`): the part before the first `:` (the runner's
/// `labels.Parse` splits with `strings.SplitN(label, ":", 3)`). It is what the runner declares to Forgejo and what
/// `runs-on` is matched against.
pub fn label_name(spec: &str) -> &str {
    spec.split_once(':').map_or(spec, |(name, _)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_runs_on_label_must_be_offered_exactly() {
        let runner = ["debian", "gpu", "linux-amd64"];
        assert!(runs_on_matches(&["debian"], &runner));
        assert!(runs_on_matches(&["gpu", "debian"], &runner), "order does not matter");
        assert!(!runs_on_matches(&["debian", "arm64"], &runner), "one missing label is enough to refuse");
        assert!(!runs_on_matches(&["Debian"], &runner), "case matters");
        assert!(!runs_on_matches(&["debian "], &runner), "spaces matter");
        assert!(runs_on_matches(&["debian", "debian"], &runner), "a repeated label is one label");
    }

    #[test]
    fn empty_sides_never_match() {
        let none: [&str; 0] = [];
        assert!(!runs_on_matches(&none, &["debian"]), "a job without runs-on runs nowhere");
        assert!(!runs_on_matches(&["debian"], &none), "a runner without labels runs nothing");
        assert!(!runs_on_matches(&none, &none));
    }

    #[test]
    fn label_names_are_what_comes_before_the_first_colon() {
        assert_eq!(label_name("debian"), "debian");
        assert_eq!(label_name("linux:host"), "linux");
        assert_eq!(label_name("debian:docker://node:22-bookworm"), "debian");
        assert_eq!(label_name("lxc:lxc://debian:bookworm"), "lxc");
    }
}
