//! Which runners a queued job can go to, by GitHub's rule for `runs-on` label sets, and which labels a runner
//! ciscale registers carries. Pure functions: the planner's generic matcher uses them as this source's selector.
//!
//! GitHub's rule ("Choosing the runner for a job"): a job goes to a runner that has *every* label of its `runs-on`,
//! compared case-insensitively; the runner may have more. A runner configured by `config.sh` gets `self-hosted`,
//! its OS (`Linux`, `Windows`, `macOS`) and its architecture (`X64`, `ARM64`, `ARM`) without asking (unless
//! `--no-default-labels`). A just-in-time runner gets only the labels its `generate-jitconfig` call names, so
//! ciscale names these implicit ones itself ([`runner_labels`]) and jobs written for ordinary self-hosted runners
//! (`runs-on: [self-hosted, linux]`) still find ciscale's.

/// The label every self-hosted runner carries.
pub const SELF_HOSTED: &str = "self-hosted";

/// Operating system of a runner, as its implicit label names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RunnerOs {
    Linux,
    Windows,
    MacOs,
}

impl RunnerOs {
    /// The label the runner application gives itself (GitHub shows `Linux`, `Windows`, `macOS`).
    pub fn label(self) -> &'static str {
        match self {
            RunnerOs::Linux => "Linux",
            RunnerOs::Windows => "Windows",
            RunnerOs::MacOs => "macOS",
        }
    }
}

/// Processor architecture of a runner, as its implicit label names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RunnerArch {
    X64,
    Arm64,
    Arm,
}

impl RunnerArch {
    pub fn label(self) -> &'static str {
        match self {
            RunnerArch::X64 => "X64",
            RunnerArch::Arm64 => "ARM64",
            RunnerArch::Arm => "ARM",
        }
    }
}

/// The machine a runner runs on, for its implicit labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RunnerPlatform {
    pub os: RunnerOs,
    pub arch: RunnerArch,
}

impl Default for RunnerPlatform {
    /// What the clouds and containers ciscale creates run: 64-bit x86 Linux.
    fn default() -> Self {
        Self { os: RunnerOs::Linux, arch: RunnerArch::X64 }
    }
}

impl RunnerPlatform {
    /// `self-hosted`, the OS and the architecture label.
    pub fn implicit_labels(&self) -> [&'static str; 3] {
        [SELF_HOSTED, self.os.label(), self.arch.label()]
    }
}

/// GitHub labels compare case-insensitively (`linux` finds a runner labelled `Linux`).
pub fn same_label(a: &str, b: &str) -> bool {
    a.chars().flat_map(char::to_lowercase).eq(b.chars().flat_map(char::to_lowercase))
}

/// Whether a job whose `runs-on` names `runs_on` can run on a runner labelled `runner_labels`: every job label is
/// among the runner's, case-insensitively. A job that names no label at all is not a runner job (GitHub requires
/// `runs-on`; a job calling a reusable workflow has none) and matches nothing, so it never makes a runner.
pub fn job_matches<J: AsRef<str>, R: AsRef<str>>(runs_on: &[J], runner_labels: &[R]) -> bool {
    !runs_on.is_empty()
        && runs_on
            .iter()
            .all(|wanted| runner_labels.iter().any(|offered| same_label(wanted.as_ref(), offered.as_ref())))
}

/// The labels a runner ciscale registers is given: the implicit ones of `platform` first (none when `None`, as
/// with `--no-default-labels`), then `custom` in order, each label once (case-insensitively; the first spelling
/// wins).
pub fn runner_labels<I, S>(custom: I, platform: Option<RunnerPlatform>) -> Vec<String>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let implicit = platform.iter().flat_map(|platform| platform.implicit_labels()).map(str::to_owned);
    let mut labels: Vec<String> = Vec::new();
    for label in implicit.chain(custom.into_iter().map(Into::into)) {
        let label = label.trim().to_owned();
        if !label.is_empty() && !labels.iter().any(|seen| same_label(seen, &label)) {
            labels.push(label);
        }
    }
    labels
}

/// A runner label from a `key: value` pair of a registration request: `key` alone when the value is empty, else
/// `key:value` (the form of ciscale's ownership label, `ciscale-owner:<id>`).
pub fn label_from_pair(key: &str, value: &str) -> String {
    if value.is_empty() {
        key.to_owned()
    } else {
        format!("{key}:{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_job_label_must_be_offered_case_insensitively() {
        let runner = runner_labels(["gpu"], Some(RunnerPlatform::default()));
        assert_eq!(runner, ["self-hosted", "Linux", "X64", "gpu"]);
        assert!(job_matches(&["self-hosted"], &runner));
        assert!(job_matches(&["self-hosted", "linux", "x64"], &runner), "case-insensitive");
        assert!(job_matches(&["SELF-HOSTED", "GPU"], &runner));
        assert!(job_matches(&["gpu"], &runner), "the runner may offer more than the job asks");
        assert!(!job_matches(&["self-hosted", "arm64"], &runner), "a missing label");
        assert!(!job_matches(&["ubuntu-latest"], &runner), "a GitHub-hosted label");
        assert!(!job_matches::<&str, _>(&[], &runner), "a job without `runs-on` is not a runner job");
        assert!(!job_matches(&["self-hosted"], &[] as &[&str]));
    }

    #[test]
    fn non_ascii_labels_compare_case_insensitively() {
        assert!(same_label("Größe", "GRÖßE"));
        assert!(!same_label("gpu", "gpu2"));
    }

    #[test]
    fn implicit_labels_come_first_and_nothing_twice() {
        let platform = RunnerPlatform { os: RunnerOs::MacOs, arch: RunnerArch::Arm64 };
        assert_eq!(
            runner_labels(["macos", "xcode-16", " ", "Xcode-16", "self-hosted"], Some(platform)),
            ["self-hosted", "macOS", "ARM64", "xcode-16"]
        );
        assert_eq!(runner_labels(["gpu", "GPU"], None), ["gpu"], "no implicit labels without a platform");
        assert_eq!(runner_labels(Vec::<String>::new(), None), Vec::<String>::new());
    }

    #[test]
    fn pairs_become_labels() {
        assert_eq!(label_from_pair("gpu", ""), "gpu");
        assert_eq!(label_from_pair("ciscale-owner", "acme"), "ciscale-owner:acme");
    }
}
