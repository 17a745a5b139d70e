//! A pass-through proxy for the Incus unix socket, for crash tests: ciscale talks to the real incusd through it, and
//! the proxy sees every request on its way. ciscale opens one connection per request (see the Incus client), so
//! each connection is one request: its head and body are read, looked at, sent on, and from then on the bytes are
//! copied both ways unchanged (the events websocket included).
//!
//! What it sees of an owner's containers: a create (`POST /1.0/instances`) accepted by incusd counts the container
//! as live from then on, a delete or a stop (an ephemeral container deletes itself when stopped) as gone; the live
//! count per pool after each create is journalled. A hook runs before each delete and stop reaches incusd (to check
//! that no busy agent loses its container), and a create can be held, before incusd sees it or before its answer
//! reaches ciscale — where a kill -9 hurts.
//!
//! It also remembers when each create of the owner's containers reached it (the moment ciscale made the call) and
//! every file pushed into a container (path, mode, owner and content), so a test can tell what a launch carried.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// Called before a delete or stop reaches incusd, with the action (`delete`, `stop`, `start`) and the instance.
pub type Hook = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// One thing that reached incusd through the proxy for the owner's containers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IncusEvent {
    /// A create incusd accepted, and the owner's live containers of that pool right after it (names).
    Create {
        name: String,
        pool: String,
        live_in_pool: Vec<String>,
    },
    /// A container of the owner deleted or stopped (an ephemeral one deletes itself when stopped).
    Gone {
        name: String,
    },
    /// Any other container stopped or started (an adopted one).
    Stop {
        name: String,
    },
    Start {
        name: String,
    },
}

/// A file pushed into a container (`POST /1.0/instances/{name}/files`), as the request carried it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    pub instance: String,
    pub path: String,
    /// `X-Incus-Mode`, as sent (`0400`).
    pub mode: String,
    pub uid: String,
    pub gid: String,
    /// `X-Incus-Type`: `file`, `directory`.
    pub kind: String,
    pub content: Vec<u8>,
}

#[derive(Default)]
struct State {
    owner: String,
    /// Created through the proxy and not deleted or stopped since: name → pool.
    live: BTreeMap<String, String>,
    journal: Vec<IncusEvent>,
    hold: Option<Duration>,
    /// Hold a create before incusd sees it, rather than its answer.
    hold_request: bool,
    held: u64,
    hook: Option<Hook>,
    /// Creates of the owner's containers as they reached the proxy: name, when.
    create_calls: Vec<(String, std::time::Instant)>,
    pushed: Vec<Pushed>,
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The proxy; cheap to clone (clones share the state).
#[derive(Clone)]
pub struct IncusProxy {
    pub socket: PathBuf,
    state: Arc<Mutex<State>>,
}

impl IncusProxy {
    /// Listens on `socket` (created; it must not exist) and forwards to incusd on `upstream`; journals the
    /// containers labelled `ciscale.owner=owner`.
    pub fn start(socket: &Path, upstream: &Path, owner: &str) -> Self {
        let listener = UnixListener::bind(socket).expect("bind the proxy socket");
        let state = Arc::new(Mutex::new(State { owner: owner.to_owned(), ..State::default() }));
        let (shared, upstream) = (state.clone(), upstream.to_owned());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (state, upstream) = (shared.clone(), upstream.clone());
                tokio::spawn(async move {
                    drop(relay(client, &upstream, &state).await);
                });
            }
        });
        Self { socket: socket.to_owned(), state }
    }

    fn with<T>(&self, body: impl FnOnce(&mut State) -> T) -> T {
        body(&mut lock(&self.state))
    }

    /// Holds the answer of every accepted create back for `hold` (`None`: answer at once).
    pub fn set_hold(&self, hold: Option<Duration>) {
        self.with(|state| {
            state.hold = hold;
            state.hold_request = false;
        });
    }

    /// Holds every create for `hold` before it reaches incusd, which then creates after the hold whether or not
    /// the caller is still there: a killed ciscale's create that incusd acts on late, while the next ciscale
    /// already looks (incusd accepts a create at once and creates in a background operation; under load, its
    /// container shows up in listings well after the request).
    pub fn set_hold_request(&self, hold: Option<Duration>) {
        self.with(|state| {
            state.hold = hold;
            state.hold_request = hold.is_some();
        });
    }

    /// Create answers held back so far (the count goes up when the hold starts).
    pub fn held(&self) -> u64 {
        self.with(|state| state.held)
    }

    pub fn set_hook(&self, hook: Hook) {
        self.with(|state| state.hook = Some(hook));
    }

    pub fn journal(&self) -> Vec<IncusEvent> {
        self.with(|state| state.journal.clone())
    }

    /// The owner's creates as they reached the proxy (before incusd saw them): name and when.
    pub fn create_calls(&self) -> Vec<(String, std::time::Instant)> {
        self.with(|state| state.create_calls.clone())
    }

    /// Every file pushed into a container through the proxy, in order.
    pub fn pushed(&self) -> Vec<Pushed> {
        self.with(|state| state.pushed.clone())
    }
}

/// Reads one request head (up to the blank line) and its body (`Content-Length`).
async fn read_request(client: &mut UnixStream) -> std::io::Result<(String, Vec<u8>)> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end + 4]).into_owned();
            let length = head
                .lines()
                .find_map(|line| {
                    let (key, value) = line.split_once(':')?;
                    key.eq_ignore_ascii_case("content-length").then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            let mut body = buffer[end + 4..].to_vec();
            while body.len() < length {
                let read = client.read(&mut chunk).await?;
                if read == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..read]);
            }
            return Ok((head, body));
        }
        let read = client.read(&mut chunk).await?;
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
}

/// What a request does to a container, as far as the journal cares.
enum Seen {
    Create { name: String, pool: String },
    Gone { action: &'static str, name: String },
    Start { name: String },
    Push(Pushed),
    Other,
}

fn classify(state: &Mutex<State>, head: &str, body: &[u8]) -> Seen {
    let mut words = head.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let json = || serde_json::from_slice::<serde_json::Value>(body).unwrap_or_default();
    let instance = path.strip_prefix("/1.0/instances/").map(|rest| {
        let (name, rest) = rest.split_once('/').unwrap_or((rest, ""));
        (super::query::percent_decode(name), rest.to_owned())
    });
    match (method, path, instance) {
        ("POST", "/1.0/instances", _) => {
            let body = json();
            let config = &body["config"];
            let owner = lock(state).owner.clone();
            if config["user.ciscale.owner"].as_str() != Some(owner.as_str()) {
                return Seen::Other;
            }
            Seen::Create {
                name: body["name"].as_str().unwrap_or_default().to_owned(),
                pool: config["user.ciscale.pool"].as_str().unwrap_or_default().to_owned(),
            }
        }
        ("DELETE", _, Some((name, rest))) if rest.is_empty() => Seen::Gone { action: "delete", name },
        ("POST", _, Some((instance, rest))) if rest == "files" => {
            let header = |wanted: &str| {
                head.lines()
                    .find_map(|line| {
                        let (key, value) = line.split_once(':')?;
                        key.trim().eq_ignore_ascii_case(wanted).then(|| value.trim().to_owned())
                    })
                    .unwrap_or_default()
            };
            let query = target.split_once('?').map_or("", |(_, query)| query);
            let path = query
                .split('&')
                .find_map(|pair| pair.strip_prefix("path="))
                .map(super::query::percent_decode)
                .unwrap_or_default();
            Seen::Push(Pushed {
                instance,
                path,
                mode: header("x-incus-mode"),
                uid: header("x-incus-uid"),
                gid: header("x-incus-gid"),
                kind: header("x-incus-type"),
                content: body.to_vec(),
            })
        }
        ("PUT", _, Some((name, rest))) if rest == "state" => match json()["action"].as_str() {
            Some("stop") => Seen::Gone { action: "stop", name },
            Some("start") => Seen::Start { name },
            _ => Seen::Other,
        },
        _ => Seen::Other,
    }
}

async fn relay(mut client: UnixStream, upstream: &Path, state: &Mutex<State>) -> std::io::Result<()> {
    let (head, body) = read_request(&mut client).await?;
    let seen = classify(state, &head, &body);
    match &seen {
        Seen::Gone { action, name } => {
            let hook = lock(state).hook.clone();
            if let Some(hook) = hook {
                hook(action, name);
            }
            let mut state = lock(state);
            if state.live.remove(name).is_some() {
                state.journal.push(IncusEvent::Gone { name: name.clone() });
            } else if *action == "stop" {
                state.journal.push(IncusEvent::Stop { name: name.clone() });
            }
        }
        Seen::Start { name } => {
            let hook = lock(state).hook.clone();
            if let Some(hook) = hook {
                hook("start", name);
            }
            lock(state).journal.push(IncusEvent::Start { name: name.clone() });
        }
        Seen::Push(pushed) => lock(state).pushed.push(pushed.clone()),
        Seen::Create { name, .. } => lock(state).create_calls.push((name.clone(), std::time::Instant::now())),
        Seen::Other => {}
    }
    if matches!(seen, Seen::Create { .. }) {
        let hold = {
            let mut state = lock(state);
            let hold = state.hold.filter(|_| state.hold_request);
            if hold.is_some() {
                state.held += 1;
            }
            hold
        };
        if let Some(hold) = hold {
            tokio::time::sleep(hold).await;
        }
    }
    let mut server = UnixStream::connect(upstream).await?;
    server.write_all(head.as_bytes()).await?;
    server.write_all(&body).await?;
    if let Seen::Create { name, pool } = seen {
        // The first bytes of the answer carry its status: an accepted create counts from here.
        let mut chunk = vec![0u8; 8192];
        let read = server.read(&mut chunk).await?;
        chunk.truncate(read);
        let status_line = String::from_utf8_lossy(&chunk).lines().next().unwrap_or_default().to_owned();
        let accepted = status_line.split_whitespace().nth(1).is_some_and(|code| code.starts_with('2'));
        let hold = {
            let mut state = lock(state);
            if accepted {
                state.live.insert(name.clone(), pool.clone());
                let live_in_pool = state.live.iter().filter(|(_, p)| **p == pool).map(|(n, _)| n.clone()).collect();
                state.journal.push(IncusEvent::Create { name, pool, live_in_pool });
                let hold = state.hold.filter(|_| !state.hold_request);
                if hold.is_some() {
                    state.held += 1;
                }
                hold
            } else {
                None
            }
        };
        if let Some(hold) = hold {
            tokio::time::sleep(hold).await;
        }
        client.write_all(&chunk).await?;
    }
    tokio::io::copy_bidirectional(&mut client, &mut server).await?;
    Ok(())
}
