//! One kind's list-then-watch loop (kube-runtime's watcher): it relists on `410 Gone` and
//! after any broken watch, asks for bookmarks so a quiet kind's resourceVersion stays fresh,
//! and backs off on errors (an API server restart, a forbidden kind). A kind the server does
//! not serve (a CRD not installed) is looked up again until it is.

use std::time::Duration;

use futures_util::StreamExt;
use kube::Client;
use kube::api::{Api, DynamicObject};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, utils::Backoff};
use serde_json::Value;
use tokio::sync::mpsc;

use super::kube_kinds::{Unserved, WatchedKind, discover};

/// What a kind's watcher tells the source.
#[derive(Debug)]
pub enum KindEvent {
    RelistStart(&'static str),
    RelistDone(&'static str),
    Apply(&'static str, Value),
    Delete(&'static str, Value),
    /// `None`: the kind is watched normally again.
    Problem(&'static str, Option<String>),
    /// The pod sandboxes comb-cni reported (all of them), and problems reading them.
    Sandboxes(Vec<super::cni_spool::Sandbox>, Vec<String>),
}

/// Exponential backoff capped low: after an API server restart the agent should be back
/// within seconds, and the servers it talks to are few (one agent per node).
pub struct WatchBackoff {
    next: Duration,
}

const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Longer than the backoff cap: a failing watch fails again within it.
const RECOVERED_AFTER: Duration = Duration::from_secs(2 * BACKOFF_MAX.as_secs());

impl WatchBackoff {
    pub fn new() -> Self {
        WatchBackoff {
            next: BACKOFF_FIRST,
        }
    }
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        Some(d)
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = BACKOFF_FIRST;
    }
}

/// How often a kind read at a version other than the one it prefers asks the server again.
const RECHECK_VERSION: Duration = Duration::from_secs(60);

/// Whether a kind read at `current` should move to `discovered` (the server now serves a
/// version it prefers, e.g. after an upgrade to EndpointSlice v1).
pub fn should_move(kind: &WatchedKind, current: &str, discovered: &str) -> bool {
    let rank = |api_version: &str| {
        let v = api_version.rsplit('/').next().unwrap_or(api_version);
        kind.versions.iter().position(|x| *x == v)
    };
    matches!((rank(current), rank(discovered)), (Some(c), Some(d)) if d < c)
}

/// Watch `kind` until `tx` closes.
pub async fn watch_kind(client: Client, kind: WatchedKind, tx: mpsc::Sender<KindEvent>) {
    // Each pass watches one version; a pass ends when the server serves a preferred one
    // (the next pass relists at that version and replaces what the previous one read).
    while let Some(resource) = discover_until_served(&client, &kind, &tx).await {
        if !watch_version(&client, &kind, &resource, &tx).await {
            return;
        }
    }
}

/// The kind's resource once the server serves it; `None` once `tx` is closed.
async fn discover_until_served(
    client: &Client,
    kind: &WatchedKind,
    tx: &mpsc::Sender<KindEvent>,
) -> Option<kube::core::ApiResource> {
    let mut backoff = WatchBackoff::new();
    loop {
        match discover(client, kind).await {
            Ok(r) => return Some(r),
            Err(why) => {
                let problem = match why {
                    Unserved::NotServed => format!(
                        "not served by the API server (versions {}; CRD not installed?); watching for it",
                        kind.versions.join(", ")
                    ),
                    Unserved::Failed(e) => format!("API discovery failed: {e}"),
                };
                if tx
                    .send(KindEvent::Problem(kind.kind, Some(problem)))
                    .await
                    .is_err()
                {
                    return None;
                }
                let wait = if kind.optional {
                    // A CRD appears when someone installs it: look again at the cap's pace.
                    BACKOFF_MAX
                } else {
                    backoff.next().unwrap_or(BACKOFF_MAX)
                };
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Watch one version of the kind. `false`: `tx` closed (stop); `true`: the server now
/// serves a version the kind prefers (watch again).
async fn watch_version(
    client: &Client,
    kind: &WatchedKind,
    resource: &kube::core::ApiResource,
    tx: &mpsc::Sender<KindEvent>,
) -> bool {
    tracing::info!(kind = kind.kind, api_version = %resource.api_version, "watching");
    let api: Api<DynamicObject> = Api::all_with(client.clone(), resource);
    let mut events = watcher::watcher(api, watcher::Config::default())
        .backoff(WatchBackoff::new())
        .boxed();
    let preferred = kind
        .versions
        .first()
        .is_some_and(|v| resource.api_version.ends_with(v));
    let mut recheck = tokio::time::interval(RECHECK_VERSION);
    recheck.tick().await; // the first tick is immediate
    // A watch that resumes after a failure emits nothing until something changes; a kind
    // with no failure for this long after its last one is watched again.
    let mut failing = false;
    loop {
        let event = tokio::select! {
            e = events.next() => e,
            _ = tokio::time::sleep(RECOVERED_AFTER), if failing => {
                failing = false;
                if tx.send(KindEvent::Problem(kind.kind, None)).await.is_err() {
                    return false;
                }
                continue;
            }
            _ = recheck.tick(), if !preferred => {
                if let Ok(r) = discover(client, kind).await
                    && should_move(kind, &resource.api_version, &r.api_version)
                {
                    tracing::info!(kind = kind.kind, from = %resource.api_version, to = %r.api_version, "the API server now serves a preferred version; relisting at it");
                    return true;
                }
                continue;
            }
        };
        let Some(event) = event else {
            return false;
        };
        let msg = match event {
            Ok(Event::Init) => KindEvent::RelistStart(kind.kind),
            Ok(Event::InitDone) => KindEvent::RelistDone(kind.kind),
            Ok(Event::InitApply(o) | Event::Apply(o)) => {
                KindEvent::Apply(kind.kind, json(resource, o))
            }
            Ok(Event::Delete(o)) => KindEvent::Delete(kind.kind, json(resource, o)),
            Err(e) => {
                failing = true;
                // 410 Gone (resourceVersion compacted away) is routine: the watcher relists.
                tracing::warn!(kind = kind.kind, error = %e, "watch failed; retrying after backoff (a relist on 410 Gone)");
                KindEvent::Problem(kind.kind, Some(format!("watch failed, retrying: {e}")))
            }
        };
        if tx.send(msg).await.is_err() {
            return false;
        }
    }
}

/// The object as the manifests parser reads it: list items come without apiVersion/kind.
fn json(resource: &kube::core::ApiResource, o: DynamicObject) -> Value {
    let mut v = serde_json::to_value(o).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut v {
        map.insert("apiVersion".into(), resource.api_version.clone().into());
        map.insert("kind".into(), resource.kind.clone().into());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = WatchBackoff::new();
        let first: Vec<_> = b.by_ref().take(7).collect();
        assert_eq!(first[0], BACKOFF_FIRST);
        assert_eq!(first[1], BACKOFF_FIRST * 2);
        assert_eq!(*first.last().unwrap(), BACKOFF_MAX);
        b.reset();
        assert_eq!(b.next(), Some(BACKOFF_FIRST));
    }

    #[test]
    fn a_kind_moves_only_to_a_version_it_prefers() {
        let slice = super::super::kube_kinds::KINDS
            .iter()
            .find(|k| k.kind == "EndpointSlice")
            .unwrap();
        let (v1, beta) = ("discovery.k8s.io/v1", "discovery.k8s.io/v1beta1");
        assert!(should_move(slice, beta, v1));
        assert!(!should_move(slice, v1, beta));
        assert!(!should_move(slice, beta, beta));
        assert!(!should_move(slice, beta, "discovery.k8s.io/v2"));
    }

    #[test]
    fn json_carries_api_version_and_kind() {
        let slice = super::super::kube_kinds::KINDS
            .iter()
            .find(|k| k.kind == "EndpointSlice")
            .unwrap();
        let r = slice.api_resource("v1beta1");
        let o = DynamicObject::new("s", &r).within("apps");
        let mut o = o;
        o.types = None;
        let v = json(&r, o);
        assert_eq!(v["apiVersion"], "discovery.k8s.io/v1beta1");
        assert_eq!(v["kind"], "EndpointSlice");
        assert_eq!(v["metadata"]["namespace"], "apps");
    }
}
