//! Forgejo's JSON, as this source reads and writes it. No OpenAPI file of Forgejo is at hand, so every shape
//! here is taken from Forgejo's own sources (v15), named per type:
//! - the swagger document Forgejo generates from its structs, `templates/swagger/v1_json.tmpl` (read in the
//!   mirror `live-clones/forgejo` @ `18a4c49`): definitions `ActionRunJob`, `ActionRunner`,
//!   `RegisterRunnerOptions`, `RegisterRunnerResponse`, `APIError`; responses `RunJobList`, `ActionRunnerList`;
//! - the handlers behind it, `routers/api/v1/shared/runners.go` (read in `rezuscloud/forgejo` @ `1ae5887`), and
//!   the struct conversion `services/convert/action.go` (same commit);
//! - `modules/structs/runner.go` (`RegisterRunnerOptions`/`RegisterRunnerResponse`, read in
//!   `creator-signal/fork-forgejo-forgejo`).
//!
//! The swagger marks no property of these objects required; Go always writes every field of these structs (none
//! has `omitempty`), but a nil slice is written as `null`. Per field, what may be missing and why is said below.
//! Unknown fields are ignored: newer servers add some (`html_url`, `steps`).

use serde::{Deserialize, Deserializer, Serialize};

use crate::model::Secret;

/// One entry of `GET {scope}/actions/runners/jobs` (`ActionRunJob`, filled by `convert.ToActionRunJob`).
#[derive(Debug, Deserialize)]
pub(super) struct WireJob {
    /// Required here: a job without an id cannot be counted or named, so such an answer is refused as a whole
    /// (a cycle that fails is retried; a job silently dropped would be demand nobody serves).
    pub id: i64,
    /// `waiting` (the queue) or `running`; the handler lists no other (`StatusWaiting`, `StatusRunning`). A
    /// missing or other value is kept as it is and the job left out of the observation.
    #[serde(default)]
    pub status: String,
    /// The job's `runs-on` labels. A Go nil slice arrives as `null`; missing or `null` is no label, which no
    /// runner matches (`ActionRunJob.ItRunsOn` answers false for an empty `runs-on`).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub runs_on: Vec<String>,
    /// Identifies one attempt of the job; new in Forgejo 15 (`ActionRunJob.Handle`). Missing or empty on an
    /// older server: the job still counts as demand, but no runner can be bound to it.
    #[serde(default)]
    pub handle: Option<String>,
    /// Shown in messages only; missing is an empty name.
    #[serde(default)]
    pub name: String,
    // Also sent and not needed here: `run_id`, `attempt`, `task_id`, `owner_id`, `repo_id`, `needs` (always
    // satisfied: jobs still blocked on `needs` have the status `blocked` and are not listed), `html_url`.
}

/// One entry of `GET {scope}/actions/runners` (`ActionRunner`, filled by `convert.ToActionRunner`). It never
/// holds the runner's token: Forgejo keeps only its hash.
#[derive(Debug, Deserialize)]
pub(super) struct WireRunner {
    /// Required here, as for jobs: a runner without an id can be neither paired nor deleted.
    pub id: i64,
    /// Not unique (the swagger says so, and `POST` happily makes a second runner of the same name). Missing is
    /// an empty name, which pairs with nothing.
    #[serde(default)]
    pub name: String,
    /// Free text set at registration; ciscale writes its marker here ([`super::marker`]). Missing is empty.
    #[serde(default)]
    pub description: String,
    /// The label names the runner declared when it started (a fresh record has none). `null` for a nil slice.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub labels: Vec<String>,
    /// `offline`, `idle` or `active` (`ActionRunner.StatusName`). Missing or another value is
    /// [`RunnerStatus::Unknown`].
    #[serde(default, deserialize_with = "status")]
    pub status: RunnerStatus,
    /// 0 unless the runner belongs to a user or an organisation. Missing is read as 0.
    #[serde(default)]
    pub owner_id: i64,
    /// 0 unless the runner belongs to a repository. Missing is read as 0.
    #[serde(default)]
    pub repo_id: i64,
    // Also sent and not needed here: `uuid`, `version`, `ephemeral`.
}

/// Whether a runner talks to Forgejo (`ActionRunner.Status`, `models/actions/runner.go`): `offline` when its
/// last contact is over a minute old (`RunnerOfflineTime`), `active` when it reported on a task within the last
/// 10 s (`RunnerIdleTime`; `last_active` moves on `UpdateTask`/`UpdateLog`), `idle` otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum RunnerStatus {
    Offline,
    Idle,
    Active,
    #[default]
    Unknown,
}

impl RunnerStatus {
    /// In contact within the last minute.
    pub fn online(self) -> bool {
        matches!(self, RunnerStatus::Idle | RunnerStatus::Active)
    }
}

/// The body of `POST {scope}/actions/runners` (`RegisterRunnerOptions`: `name` required, the others not).
#[derive(Debug, Serialize)]
pub(super) struct RegisterRunner<'a> {
    pub name: &'a str,
    pub description: &'a str,
    /// Forgejo deletes an ephemeral runner once it has run one job, and its token can fetch no other.
    pub ephemeral: bool,
}

/// The answer to `POST {scope}/actions/runners`, 201 (`RegisterRunnerResponse`: the struct binds all three as
/// required and the handler always fills them). All three are required here: without the id the record cannot
/// be deleted, without the uuid and the token the runner cannot connect. Never `Debug`: it holds the token.
#[derive(Deserialize)]
pub(super) struct Registered {
    pub id: i64,
    pub uuid: String,
    #[serde(deserialize_with = "secret")]
    pub token: Secret,
}

/// The body of an error answer (`APIError`, and the same shape for `APINotFound`, `APIForbiddenError`,
/// `APIUnauthorizedError`, `APIValidationError`): `message` and `url`, both optional here (a proxy in front of
/// Forgejo answers with its own body, often not JSON at all).
#[derive(Debug, Deserialize)]
pub(super) struct ApiError {
    #[serde(default)]
    pub message: Option<String>,
}

fn null_as_empty<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(deserializer)?.unwrap_or_default())
}

fn status<'de, D: Deserializer<'de>>(deserializer: D) -> Result<RunnerStatus, D::Error> {
    Ok(match Option::<String>::deserialize(deserializer)?.as_deref() {
        Some("offline") => RunnerStatus::Offline,
        Some("idle") => RunnerStatus::Idle,
        Some("active") => RunnerStatus::Active,
        _ => RunnerStatus::Unknown,
    })
}

fn secret<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Secret, D::Error> {
    String::deserialize(deserializer).map(Secret::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_read_as_forgejo_15_writes_them_and_as_older_servers_leave_them() {
        // The answer of the blog post by Forgejo's Andreas Ahlenstorf ("Autoscaling Forgejo Runner", 2026).
        let current: Vec<WireJob> = serde_json::from_str(
            r#"[{"id":982,"attempt":1,"handle":"33ba7d51-59c6-44f8-9d2b-1b94f4033973","repo_id":1,"owner_id":1,
                "name":"build","needs":null,"runs_on":["debian"],"task_id":0,"status":"waiting"}]"#,
        )
        .expect("current shape");
        assert_eq!(current[0].id, 982);
        assert_eq!(current[0].runs_on, ["debian"]);
        assert_eq!(current[0].handle.as_deref(), Some("33ba7d51-59c6-44f8-9d2b-1b94f4033973"));
        assert_eq!(current[0].status, "waiting");
        // Before Forgejo 15: no handle; a nil `runs_on` as null.
        let older: Vec<WireJob> =
            serde_json::from_str(r#"[{"id":7,"name":"lint","runs_on":null,"status":"running"}]"#).expect("older");
        assert_eq!(older[0].handle, None);
        assert!(older[0].runs_on.is_empty());
        // No id: refused.
        assert!(serde_json::from_str::<Vec<WireJob>>(r#"[{"status":"waiting"}]"#).is_err());
    }

    #[test]
    fn runners_read_with_and_without_optional_fields() {
        let runners: Vec<WireRunner> = serde_json::from_str(
            r#"[{"id":71301,"uuid":"99fc4a58-a25e-4dbe-b6ea-3d55dddcd216","name":"runner-1-user","version":"dev",
                 "owner_id":2,"repo_id":0,"description":"A superb runner","labels":["debian","gpu"],
                 "status":"offline","ephemeral":false},
                {"id":5,"labels":null,"status":"busy-doing-something-new"},
                {"id":6}]"#,
        )
        .expect("runners");
        assert_eq!(runners[0].labels, ["debian", "gpu"]);
        assert_eq!(runners[0].status, RunnerStatus::Offline);
        assert_eq!(runners[0].owner_id, 2);
        assert!(runners[1].labels.is_empty());
        assert_eq!(runners[1].status, RunnerStatus::Unknown);
        assert_eq!(runners[2].status, RunnerStatus::Unknown);
        assert_eq!(runners[2].name, "");
    }

    #[test]
    fn a_registration_needs_id_uuid_and_token() {
        let registered: Registered = serde_json::from_str(
            r#"{"id":5,"uuid":"d4637a60-7fea-4075-a81c-7e4ae01bdf0d","token":"e1f3d26e034687a2b6856c4c6c3d87a469ff3bea"}"#,
        )
        .expect("registration");
        assert_eq!(registered.id, 5);
        assert_eq!(registered.token.expose(), "e1f3d26e034687a2b6856c4c6c3d87a469ff3bea");
        for incomplete in [r#"{"id":5,"uuid":"u"}"#, r#"{"id":5,"token":"t"}"#, r#"{"uuid":"u","token":"t"}"#] {
            assert!(serde_json::from_str::<Registered>(incomplete).is_err(), "{incomplete}");
        }
    }
}
