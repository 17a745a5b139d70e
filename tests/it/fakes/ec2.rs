//! What moto does not emulate of EC2, as a proxy in front of it: client-token idempotency of `RunInstances` and
//! eventually consistent listings. moto launches a new instance for every `RunInstances` whatever its
//! `ClientToken`, and lists an instance the moment it exists. Real EC2 ("Ensuring idempotency in Amazon EC2 API
//! requests", EC2 user guide and API reference):
//! - a `RunInstances` whose token EC2 has seen, with the same parameters, launches nothing and answers with the
//!   instance that token launched, in its current state (a terminated one included; EC2 keeps the token at least a
//!   day after the termination);
//! - the same token with any other parameter is refused: HTTP 400, `IdempotentParameterMismatch`;
//! - `DescribeInstances` is eventually consistent: a new instance may be missing from listings for a while.
//!
//! Every other request goes to moto unchanged, and moto's answers come back unchanged (the replay is moto's own
//! `DescribeInstances` answer for that instance, re-wrapped as the `RunInstancesResponse` it would have been).
//!
//! For crash tests it also journals what reaches EC2 (launches and terminations, with the live instances per pool
//! after each launch), calls a hook before each terminate and stop (to check that no busy agent loses its
//! machine), and can hold a launch's answer back: EC2 launched, ciscale has not heard yet — where a kill -9 hurts.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::query::url_pairs;

/// The error EC2 answers a reused token with (its message, as EC2 words it).
const MISMATCH_BODY: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>\
    IdempotentParameterMismatch</Code><Message>Arguments on this idempotent request are inconsistent with arguments \
    used in previous request(s).</Message></Error></Errors><RequestID>ec2-proxy</RequestID></Response>";

/// Called before a `TerminateInstances`, `StopInstances` or `StartInstances` reaches moto, with the action and one
/// instance id.
pub type Hook = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// One thing that reached EC2 through the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ec2Event {
    /// A fresh launch (not a replay): the instance, its `Name` and `ciscale.pool` tags, and the names of the live
    /// launched instances of that pool right after it (terminations requested count as gone).
    Launch {
        id: String,
        name: String,
        pool: String,
        live_in_pool: Vec<String>,
    },
    /// A terminate of an instance launched here (it no longer counts as live).
    Terminate {
        id: String,
    },
    /// Any stop or start.
    Stop {
        id: String,
    },
    Start {
        id: String,
    },
}

#[derive(Default)]
struct State {
    /// token → (digest of the other parameters, the instance it launched)
    tokens: HashMap<String, (String, String)>,
    launched_at: HashMap<String, Instant>,
    /// instance → (`Name`, pool) of what was launched here
    launched: HashMap<String, (String, String)>,
    /// Launched here and not asked to terminate: instance → pool.
    live: BTreeMap<String, String>,
    listing_lag: Duration,
    hold: Option<Duration>,
    held: u64,
    replays: u64,
    mismatches: u64,
    journal: Vec<Ec2Event>,
    hook: Option<Hook>,
}

/// The proxy; cheap to clone (clones share the state).
#[derive(Clone)]
pub struct Ec2Proxy {
    pub url: String,
    state: Arc<Mutex<State>>,
}

impl Ec2Proxy {
    /// Listens on a loopback port and forwards to moto at `moto`.
    pub async fn start(moto: &str) -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let upstream = Upstream {
            url: moto.trim_end_matches('/').to_owned(),
            http: reqwest::Client::builder().no_proxy().build().expect("http client"),
            // Launches and terminations one at a time, as EC2 would see a token: a retry from a restarted ciscale
            // cannot slip past the first try's launch still on its way to moto.
            launches: Arc::new(tokio::sync::Mutex::new(())),
        };
        let app = axum::Router::new().fallback({
            let state = state.clone();
            move |headers: HeaderMap, body: Bytes| {
                let (state, upstream) = (state.clone(), upstream.clone());
                async move { handle(&state, &upstream, headers, body).await }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind ec2 proxy");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, state }
    }

    fn with<T>(&self, body: impl FnOnce(&mut State) -> T) -> T {
        body(&mut self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// Instances younger than `lag` are left out of filtered listings (a `DescribeInstances` by instance id still
    /// finds them).
    pub fn set_listing_lag(&self, lag: Duration) {
        self.with(|state| state.listing_lag = lag);
    }

    /// Holds the answer of every fresh launch back for `hold` (`None`: answer at once).
    pub fn set_hold(&self, hold: Option<Duration>) {
        self.with(|state| state.hold = hold);
    }

    /// Launch answers held back so far (the count goes up when the hold starts).
    pub fn held(&self) -> u64 {
        self.with(|state| state.held)
    }

    pub fn set_hook(&self, hook: Hook) {
        self.with(|state| state.hook = Some(hook));
    }

    /// `RunInstances` answered from the token memory, and refused as mismatched.
    pub fn replays_and_mismatches(&self) -> (u64, u64) {
        self.with(|state| (state.replays, state.mismatches))
    }

    pub fn journal(&self) -> Vec<Ec2Event> {
        self.with(|state| state.journal.clone())
    }

    /// The `Name` tag of an instance launched through the proxy.
    pub fn name_of(&self, id: &str) -> Option<String> {
        self.with(|state| state.launched.get(id).map(|(name, _)| name.clone()))
    }
}

#[derive(Clone)]
struct Upstream {
    url: String,
    http: reqwest::Client,
    launches: Arc<tokio::sync::Mutex<()>>,
}

impl Upstream {
    async fn send(&self, headers: &HeaderMap, body: Vec<u8>) -> (StatusCode, String) {
        let mut request = self.http.post(&self.url).body(body);
        for (name, value) in headers {
            if name != "host" && name != "content-length" {
                request = request.header(name, value);
            }
        }
        match request.send().await {
            Ok(answer) => {
                let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
                (status, answer.text().await.unwrap_or_default())
            }
            Err(error) => (StatusCode::BAD_GATEWAY, format!("ec2 proxy: moto: {error}")),
        }
    }
}

async fn handle(state: &Arc<Mutex<State>>, upstream: &Upstream, headers: HeaderMap, body: Bytes) -> Response {
    let text = String::from_utf8_lossy(&body).into_owned();
    let pairs = url_pairs(&text);
    let value = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    match value("Action").as_deref() {
        Some("RunInstances") => {
            let _one_at_a_time = upstream.launches.lock().await;
            let token = value("ClientToken");
            let digest = params_digest(&pairs);
            let remembered = token.as_ref().and_then(|token| lock(state).tokens.get(token).cloned());
            if let Some((known_digest, id)) = remembered {
                if known_digest != digest {
                    lock(state).mismatches += 1;
                    return xml(StatusCode::BAD_REQUEST, MISMATCH_BODY.to_owned());
                }
                lock(state).replays += 1;
                let describe = format!("Action=DescribeInstances&Version=2016-11-15&InstanceId.1={id}");
                let (status, described) = upstream.send(&headers, describe.into_bytes()).await;
                return match replay_of(&described) {
                    Some(replay) if status.is_success() => xml(StatusCode::OK, replay),
                    _ => xml(status, described),
                };
            }
            let (status, answer) = upstream.send(&headers, body.to_vec()).await;
            let Some(id) = status.is_success().then(|| between(&answer, "<instanceId>", "</instanceId>")).flatten()
            else {
                return xml(status, answer);
            };
            let hold = {
                let mut state = lock(state);
                let tag = |key: &str| tag_value(&pairs, key).unwrap_or_default();
                let (name, pool) = (tag("Name"), tag("ciscale.pool"));
                if let Some(token) = token {
                    state.tokens.insert(token, (digest, id.clone()));
                }
                state.launched_at.insert(id.clone(), Instant::now());
                state.launched.insert(id.clone(), (name.clone(), pool.clone()));
                state.live.insert(id.clone(), pool.clone());
                let live_in_pool = state
                    .live
                    .iter()
                    .filter(|(_, p)| **p == pool)
                    .map(|(id, _)| state.launched.get(id).map_or_else(|| id.clone(), |(name, _)| name.clone()))
                    .collect();
                state.journal.push(Ec2Event::Launch { id, name, pool, live_in_pool });
                if state.hold.is_some() {
                    state.held += 1;
                }
                state.hold
            };
            drop(_one_at_a_time);
            if let Some(hold) = hold {
                tokio::time::sleep(hold).await;
            }
            xml(status, answer)
        }
        Some(action @ ("TerminateInstances" | "StopInstances" | "StartInstances")) => {
            let ids: Vec<String> =
                pairs.iter().filter(|(key, _)| key.starts_with("InstanceId.")).map(|(_, id)| id.clone()).collect();
            let _one_at_a_time = upstream.launches.lock().await;
            let hook = lock(state).hook.clone();
            for id in &ids {
                if let Some(hook) = &hook {
                    hook(action, id);
                }
                let mut state = lock(state);
                match action {
                    "TerminateInstances" => {
                        if state.live.remove(id).is_some() {
                            state.journal.push(Ec2Event::Terminate { id: id.clone() });
                        }
                    }
                    "StopInstances" => state.journal.push(Ec2Event::Stop { id: id.clone() }),
                    _ => state.journal.push(Ec2Event::Start { id: id.clone() }),
                }
            }
            let (status, answer) = upstream.send(&headers, body.to_vec()).await;
            xml(status, answer)
        }
        Some("DescribeInstances") => {
            let (status, answer) = upstream.send(&headers, body.to_vec()).await;
            let by_id = pairs.iter().any(|(key, _)| key.starts_with("InstanceId."));
            let hidden: Vec<String> = {
                let state = lock(state);
                state
                    .launched_at
                    .iter()
                    .filter(|(_, at)| at.elapsed() < state.listing_lag)
                    .map(|(id, _)| id.clone())
                    .collect()
            };
            if by_id || hidden.is_empty() || !status.is_success() {
                return xml(status, answer);
            }
            xml(status, without_reservations_of(&answer, &hidden))
        }
        _ => {
            let (status, answer) = upstream.send(&headers, body.to_vec()).await;
            xml(status, answer)
        }
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn xml(status: StatusCode, body: String) -> Response {
    (status, [("content-type", "text/xml;charset=UTF-8")], body).into_response()
}

/// Digest of every request parameter but the token: what EC2 compares a reused token's request by.
fn params_digest(pairs: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = pairs.iter().filter(|(key, _)| key != "ClientToken").collect();
    sorted.sort();
    let mut hasher = Sha256::new();
    for (key, value) in sorted {
        hasher.update(key.as_bytes());
        hasher.update([0]);
        hasher.update(value.as_bytes());
        hasher.update([0]);
    }
    hasher.finalize().iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The value of instance tag `key` in a `RunInstances` form (`TagSpecification.N.Tag.M.Key` / `.Value`).
fn tag_value(pairs: &[(String, String)], key: &str) -> Option<String> {
    let prefix = pairs
        .iter()
        .find(|(name, value)| name.starts_with("TagSpecification.") && name.ends_with(".Key") && value == key)
        .map(|(name, _)| name.trim_end_matches(".Key").to_owned())?;
    let value_key = format!("{prefix}.Value");
    pairs.iter().find(|(name, _)| *name == value_key).map(|(_, value)| value.clone())
}

fn between(text: &str, open: &str, close: &str) -> Option<String> {
    let start = text.find(open)? + open.len();
    let end = start + text[start..].find(close)?;
    Some(text[start..end].to_owned())
}

/// The top-level `<item>` elements of the first `<tag>…</tag>` list: (start, end) byte ranges, end exclusive.
fn top_level_items(text: &str, tag: &str) -> Option<(usize, usize, Vec<(usize, usize)>)> {
    let open = format!("<{tag}>");
    let list_start = text.find(&open)? + open.len();
    let mut items = Vec::new();
    let (mut depth, mut at, mut item_start) = (0usize, list_start, 0usize);
    loop {
        let next_open = text[at..].find("<item>").map(|offset| at + offset);
        let next_close = text[at..].find("</item>").map(|offset| at + offset);
        let list_end = text[at..].find(&format!("</{tag}>")).map(|offset| at + offset);
        match (next_open, next_close) {
            (Some(o), Some(c)) if o < c && (depth > 0 || list_end.is_none_or(|end| o < end)) => {
                if depth == 0 {
                    item_start = o;
                }
                depth += 1;
                at = o + "<item>".len();
            }
            (_, Some(c)) if depth > 0 => {
                depth -= 1;
                at = c + "</item>".len();
                if depth == 0 {
                    items.push((item_start, at));
                }
            }
            _ => return Some((list_start, list_end?, items)),
        }
    }
}

/// A `DescribeInstances` answer without the reservations of `hidden` instances.
fn without_reservations_of(answer: &str, hidden: &[String]) -> String {
    let Some((_, _, items)) = top_level_items(answer, "reservationSet") else {
        return answer.to_owned();
    };
    let mut kept = String::with_capacity(answer.len());
    let mut copied_to = 0;
    for (start, end) in items {
        let item = &answer[start..end];
        let hide = between(item, "<instanceId>", "</instanceId>").is_some_and(|id| hidden.contains(&id));
        if hide {
            kept.push_str(&answer[copied_to..start]);
            copied_to = end;
        }
    }
    kept.push_str(&answer[copied_to..]);
    kept
}

/// moto's `DescribeInstances` answer for one instance, as the `RunInstancesResponse` that launched it.
fn replay_of(described: &str) -> Option<String> {
    let (_, _, items) = top_level_items(described, "reservationSet")?;
    let (start, end) = *items.first()?;
    let reservation = &described[start + "<item>".len()..end - "</item>".len()];
    Some(format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<RunInstancesResponse \
         xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>ec2-proxy-replay</requestId>{reservation}\
         </RunInstancesResponse>"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANSWER: &str = "<DescribeInstancesResponse><reservationSet><item><reservationId>r-1</reservationId>\
        <instancesSet><item><instanceId>i-1</instanceId><groupSet><item><groupId>g</groupId></item></groupSet></item>\
        </instancesSet></item><item><reservationId>r-2</reservationId><instancesSet><item><instanceId>i-2</instanceId>\
        </item></instancesSet></item></reservationSet></DescribeInstancesResponse>";

    #[test]
    fn hidden_reservations_are_cut_out_whole() {
        let kept = without_reservations_of(ANSWER, &["i-1".to_owned()]);
        assert!(!kept.contains("i-1") && !kept.contains("r-1"), "{kept}");
        assert!(kept.contains("<item><reservationId>r-2</reservationId>"), "{kept}");
        assert!(kept.ends_with("</reservationSet></DescribeInstancesResponse>"), "{kept}");
        assert_eq!(without_reservations_of(ANSWER, &[]), ANSWER);
    }

    #[test]
    fn a_replay_is_the_first_reservation_as_a_run_instances_answer() {
        let replay = replay_of(ANSWER).expect("replay");
        assert!(replay.contains("<RunInstancesResponse"), "{replay}");
        assert!(replay.contains("<reservationId>r-1</reservationId>") && !replay.contains("r-2"), "{replay}");
        assert!(replay.contains("<groupSet><item><groupId>g</groupId></item></groupSet>"), "{replay}");
    }
}
