//! What the Kubernetes source knows: the newest version of every watched object (parsed
//! once per change), the last version of each that Comb accepted, and building State from
//! them. Pure (no I/O), so the per-object rejection rules are unit-tested without a server.
//!
//! Rules: an object whose newest version fails to parse or convert is left at its last good
//! version (or out of State, if it never had one) and its errors are reported; every other
//! object is in State as the server has it. A deleted object leaves State at once.
//!
//! Cost: a change is noticed by its `resourceVersion` (as informers do) and the object is
//! parsed on arrival and its JSON dropped, so a build over thousands of objects re-reads
//! nothing and memory holds one typed copy of each; what the server adds for its own
//! bookkeeping (managedFields, kubectl's last-applied copy) is dropped before parsing.

use std::collections::BTreeMap;
use std::path::PathBuf;

use comb_config::api::{api_origin, build_objects, parse_api_object};
use comb_config::{ConfigError, ConfigErrors, Document};
use comb_model::Snapshot;
use serde_json::Value;

use super::cni_spool::Sandbox;
use super::kube_kinds::WatchedKind;

/// kubectl's copy of the whole object as last applied: server-side bookkeeping, often the
/// largest part of an object.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// One object.
struct Entry {
    /// `metadata.resourceVersion` of the newest version (empty if the server gave none:
    /// then every version counts as a change).
    version: String,
    /// `apiVersion` and `metadata.uid` of the newest version: what an Event names.
    api_version: String,
    uid: String,
    /// The newest version, parsed on arrival (its JSON is not kept). Boxed, as is `kept`:
    /// a typed object is kilobytes even when small, and the map holds thousands of entries.
    parsed: Result<Box<Document>, ConfigErrors>,
    /// The newest version is the one in force.
    accepted: bool,
    /// The last accepted version while the newest one is not in force.
    kept: Option<Box<Document>>,
}

impl Entry {
    fn new(kind: &str, key: &(String, String), obj: Value) -> Entry {
        let version = resource_version(&obj);
        let origin = api_origin(kind, Some(&key.0), &key.1);
        let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("").to_owned();
        Entry {
            version,
            api_version: text(obj.get("apiVersion")),
            uid: text(obj.pointer("/metadata/uid")),
            parsed: parse_api_object(&origin, obj).map(Box::new),
            accepted: false,
            kept: None,
        }
    }

    /// Whether `obj` is the version this entry holds already.
    fn holds(&self, obj: &Value) -> bool {
        !self.version.is_empty() && resource_version(obj) == self.version
    }

    /// `newer` replaces this entry's version; the version in force until the next build
    /// becomes the one kept.
    fn replaced_by(self, mut newer: Entry) -> Entry {
        newer.kept = if self.accepted {
            self.parsed.ok()
        } else {
            self.kept
        };
        newer
    }
}

fn resource_version(obj: &Value) -> String {
    obj.pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned()
}

/// Drop what only the API server and kubectl read.
fn strip_bookkeeping(obj: &mut Value) {
    if let Some(Value::Object(meta)) = obj.get_mut("metadata") {
        meta.remove("managedFields");
        if let Some(Value::Object(ann)) = meta.get_mut("annotations") {
            ann.remove(LAST_APPLIED);
            if ann.is_empty() {
                meta.remove("annotations");
            }
        }
    }
}

#[derive(Default)]
struct KindState {
    /// Objects as listed and watched, by (namespace, name).
    objects: BTreeMap<(String, String), Entry>,
    /// Objects of a relist in progress (watcher Init..InitDone); replace `objects` at the end
    /// so an object deleted while the watch was down disappears. `None` for a version the
    /// kind's objects hold already.
    relist: Option<BTreeMap<(String, String), Option<Entry>>>,
    /// A complete list has been seen since the source started.
    synced: bool,
    /// Why the kind is not (fully) watched right now.
    problem: Option<String>,
}

#[derive(Default)]
pub struct Store {
    kinds: BTreeMap<&'static str, (WatchedKind, KindState)>,
    /// What comb-cni reported: each pod's node-side interface and cgroup.
    sandboxes: Vec<Sandbox>,
    sandbox_problems: Vec<String>,
    /// The objects the last build did not put in force at their newest version.
    rejections: Vec<Rejection>,
}

fn name_of(kind: &WatchedKind, obj: &Value) -> Option<(String, String)> {
    let meta = obj.get("metadata")?;
    let name = meta.get("name")?.as_str()?.to_owned();
    let ns = if kind.namespaced {
        meta.get("namespace")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    } else {
        String::new()
    };
    Some((ns, name))
}

/// An object whose newest version Comb did not put in force, for a Kubernetes Event on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub api_version: String,
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub resource_version: String,
    /// The located errors, as `comb status` shows them.
    pub message: String,
}

impl Rejection {
    fn of(kind: &'static str, key: &(String, String), e: &Entry, errors: &[ConfigError]) -> Self {
        Rejection {
            api_version: e.api_version.clone(),
            kind,
            namespace: key.0.clone(),
            name: key.1.clone(),
            uid: e.uid.clone(),
            resource_version: e.version.clone(),
            message: errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        }
    }
}

/// One object's candidate for State in a build.
struct Chosen<'s> {
    kind: &'static str,
    key: &'s (String, String),
    doc: &'s Document,
    /// A version not accepted before: it gives way in checks between objects.
    new: bool,
}

impl Store {
    pub fn new(kinds: &[WatchedKind]) -> Self {
        Store {
            kinds: kinds
                .iter()
                .map(|k| (k.kind, (*k, KindState::default())))
                .collect(),
            ..Store::default()
        }
    }

    fn kind(&mut self, kind: &str) -> &mut KindState {
        &mut self.kinds.get_mut(kind).expect("a watched kind").1
    }

    /// A relist starts (the watcher's `Init`).
    pub fn relist_start(&mut self, kind: &str) {
        self.kind(kind).relist = Some(BTreeMap::new());
    }

    /// The relist is complete (`InitDone`): the listed objects are the kind's objects now.
    pub fn relist_done(&mut self, kind: &str) {
        let k = self.kind(kind);
        if let Some(listed) = k.relist.take() {
            let mut old = std::mem::take(&mut k.objects);
            for (key, newer) in listed {
                let entry = match (old.remove(&key), newer) {
                    (Some(e), None) => e,
                    (Some(e), Some(n)) => e.replaced_by(n),
                    (None, Some(n)) => n,
                    (None, None) => continue,
                };
                k.objects.insert(key, entry);
            }
        }
        k.synced = true;
        k.problem = None;
    }

    /// An object was listed (during a relist) or added or changed (while watching).
    pub fn apply(&mut self, kind: &str, mut obj: Value) {
        let (wk, k) = self.kinds.get_mut(kind).expect("a watched kind");
        let Some(key) = name_of(wk, &obj) else {
            return;
        };
        let current = k.objects.get(&key);
        if current.is_some_and(|e| e.holds(&obj)) {
            if let Some(listed) = &mut k.relist {
                listed.insert(key, None);
            }
            return;
        }
        strip_bookkeeping(&mut obj);
        let newer = Entry::new(wk.kind, &key, obj);
        match &mut k.relist {
            Some(listed) => {
                listed.insert(key, Some(newer));
            }
            None => {
                k.problem = None;
                let entry = match k.objects.remove(&key) {
                    Some(e) => e.replaced_by(newer),
                    None => newer,
                };
                k.objects.insert(key, entry);
            }
        };
    }

    pub fn delete(&mut self, kind: &str, obj: &Value) {
        let (wk, k) = self.kinds.get_mut(kind).expect("a watched kind");
        if let Some(key) = name_of(wk, obj) {
            k.objects.remove(&key);
            if let Some(listed) = &mut k.relist {
                listed.remove(&key);
            }
        }
    }

    /// The objects the last build left out or kept at an older version.
    pub fn rejections(&self) -> &[Rejection] {
        &self.rejections
    }

    /// The sandboxes comb-cni reported, replacing the previous report.
    pub fn set_sandboxes(&mut self, sandboxes: Vec<Sandbox>, problems: Vec<String>) {
        self.sandboxes = sandboxes;
        self.sandbox_problems = problems;
    }

    /// The UID of the Pod `namespace/name` as the source has it.
    fn pod_uid(&self, namespace: &str, name: &str) -> Option<&str> {
        let (_, k) = self.kinds.get("Pod")?;
        let e = k.objects.get(&(namespace.to_owned(), name.to_owned()))?;
        Some(e.uid.as_str()).filter(|u| !u.is_empty())
    }

    /// A Pod's interface and cgroup from its sandbox, unless its annotations set them. The
    /// sandbox must be of this Pod, not of an earlier one of the same name (UID).
    fn overlay_sandboxes(&self, snapshot: &mut Snapshot) {
        for sb in &self.sandboxes {
            if self.pod_uid(&sb.namespace, &sb.name) != Some(sb.uid.as_str()) {
                continue;
            }
            let key = comb_model::ObjKey::new(sb.namespace.as_str(), sb.name.as_str());
            if let Some(pod) = snapshot.pods.get_mut(&key) {
                if pod.interface.is_none() {
                    pod.interface.clone_from(&sb.interface);
                }
                if pod.cgroup.is_none() {
                    pod.cgroup.clone_from(&sb.cgroup);
                }
            }
        }
    }

    /// Why `kind` is not watched right now (`None`: it is, again).
    pub fn set_problem(&mut self, kind: &str, problem: Option<String>) {
        self.kind(kind).problem = problem;
    }

    /// Every built-in kind has been listed once: State may be built without looking empty
    /// for kinds not read yet. Optional (CRD) kinds never hold it back.
    pub fn ready(&self) -> bool {
        self.kinds.values().all(|(wk, k)| k.synced || wk.optional)
    }

    /// Kinds that cannot be watched right now, and why.
    pub fn problems(&self) -> ConfigErrors {
        let spool = PathBuf::from("cni spool");
        ConfigErrors(
            self.kinds
                .values()
                .filter_map(|(wk, k)| {
                    let p = k.problem.as_ref()?;
                    let origin = PathBuf::from(format!("kubernetes {}", wk.resource_name()));
                    Some(ConfigError::new(&origin, 0, None, p.clone()))
                })
                .chain(
                    self.sandbox_problems
                        .iter()
                        .map(|p| ConfigError::new(&spool, 0, None, p.clone())),
                )
                .collect(),
        )
    }

    /// State from every object's newest version that Comb accepts, the last good version of
    /// the others, and the errors to show.
    pub fn build(&mut self) -> (Snapshot, ConfigErrors) {
        let mut errors = self.problems().0;
        let mut rejections = Vec::new();
        let mut chosen: Vec<Chosen<'_>> = Vec::new();
        for (kind, (_, k)) in &self.kinds {
            for (key, e) in &k.objects {
                match &e.parsed {
                    Ok(doc) => chosen.push(Chosen {
                        kind,
                        key,
                        doc,
                        new: !e.accepted,
                    }),
                    Err(errs) => {
                        let own = note_kept(errs.0.clone(), e.kept.is_some());
                        rejections.push(Rejection::of(kind, key, e, &own));
                        errors.extend(own);
                        if let Some(doc) = &e.kept {
                            chosen.push(Chosen {
                                kind,
                                key,
                                doc,
                                new: false,
                            });
                        }
                    }
                }
            }
        }

        // A new version that conversion or a cross-object check refuses falls back to the
        // last good one; build again until no new version is refused (each round removes at
        // least one, so this ends).
        let (mut snapshot, build_errors) = loop {
            // Accepted versions first: checks between objects (one cluster IP per Service)
            // are first come, first served, and the object already in force must win.
            let old = chosen.iter().filter(|c| !c.new);
            let new = chosen.iter().filter(|c| c.new);
            let (snapshot, build_errors) = build_objects(old.chain(new).map(|c| c.doc));
            let refused: Vec<usize> = chosen
                .iter()
                .enumerate()
                .filter(|(_, c)| c.new && build_errors.iter().any(|e| e.file == c.doc.file))
                .map(|(i, _)| i)
                .collect();
            if refused.is_empty() {
                break (snapshot, build_errors);
            }
            for i in refused.into_iter().rev() {
                let c = chosen.swap_remove(i);
                let e = &self.kinds[c.kind].1.objects[c.key];
                let own = build_errors
                    .iter()
                    .filter(|e| e.file == c.doc.file)
                    .cloned();
                let own = note_kept(own.collect(), e.kept.is_some());
                rejections.push(Rejection::of(c.kind, c.key, e, &own));
                errors.extend(own);
                if let Some(doc) = &e.kept {
                    chosen.push(Chosen {
                        kind: c.kind,
                        key: c.key,
                        doc,
                        new: false,
                    });
                }
            }
        };
        errors.extend(build_errors);
        let accepted: Vec<(&'static str, (String, String))> = chosen
            .iter()
            .filter(|c| c.new)
            .map(|c| (c.kind, c.key.clone()))
            .collect();
        for (kind, key) in accepted {
            if let Some(e) = self.kind(kind).objects.get_mut(&key) {
                e.accepted = true;
                e.kept = None;
            }
        }
        self.overlay_sandboxes(&mut snapshot);
        self.rejections = rejections;
        (snapshot, ConfigErrors(errors))
    }
}

/// Says in the message that the object's previous version is still the one in force.
fn note_kept(errors: Vec<ConfigError>, kept: bool) -> Vec<ConfigError> {
    errors
        .into_iter()
        .map(|mut e| {
            e.message.push_str(if kept {
                " (the last good version stays in force)"
            } else {
                " (left out)"
            });
            e
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::kube_kinds::KINDS;
    use comb_model::ObjKey;
    use serde_json::json;

    /// A Service as the server sends it: every version with a resourceVersion of its own.
    fn service(name: &str, ip: &str, port: i64) -> Value {
        static VERSION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let rv = VERSION
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_string();
        json!({"apiVersion": "v1", "kind": "Service",
          "metadata": {"name": name, "namespace": "apps", "resourceVersion": rv},
          "spec": {"clusterIP": ip, "ports": [{"port": port, "protocol": "TCP"}]}})
    }

    fn synced_store() -> Store {
        let mut s = Store::new(KINDS);
        for k in KINDS {
            s.relist_start(k.kind);
            s.relist_done(k.kind);
        }
        s
    }

    #[test]
    fn waits_for_built_in_kinds_only() {
        let mut s = Store::new(KINDS);
        assert!(!s.ready());
        for k in KINDS.iter().filter(|k| !k.optional) {
            s.relist_start(k.kind);
            assert!(!s.ready());
            s.relist_done(k.kind);
        }
        assert!(s.ready(), "CRD kinds do not hold State back");
    }

    #[test]
    fn bad_new_version_keeps_the_last_good_one_others_apply() {
        let mut s = synced_store();
        s.apply("Service", service("a", "198.19.0.10", 80));
        s.apply("Service", service("b", "198.19.0.11", 80));
        let (snap, errs) = s.build();
        assert!(errs.is_empty(), "{errs}");
        assert_eq!(snap.services.len(), 2);

        // a: port out of range (conversion refuses it); b: changed and fine.
        s.apply("Service", service("a", "198.19.0.10", 70000));
        s.apply("Service", service("b", "198.19.0.11", 81));
        let (snap, errs) = s.build();
        assert_eq!(snap.services[&ObjKey::new("apps", "a")].ports[0].port, 80);
        assert_eq!(snap.services[&ObjKey::new("apps", "b")].ports[0].port, 81);
        assert_eq!(errs.len(), 1, "{errs}");
        let shown = errs.to_string();
        assert!(
            shown.starts_with("Service apps/a: spec.ports[0].port"),
            "{shown}"
        );
        assert!(
            shown.ends_with("(the last good version stays in force)"),
            "{shown}"
        );

        let r = s.rejections();
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].api_version.as_str(), r[0].kind, r[0].name.as_str()),
            ("v1", "Service", "a")
        );
        assert_eq!(r[0].message, shown);

        // Fixed: the error goes away and the new version applies.
        s.apply("Service", service("a", "198.19.0.10", 90));
        let (snap, errs) = s.build();
        assert!(errs.is_empty(), "{errs}");
        assert_eq!(snap.services[&ObjKey::new("apps", "a")].ports[0].port, 90);
        assert!(s.rejections().is_empty());
    }

    #[test]
    fn never_good_object_is_left_out_and_parse_errors_too() {
        let mut s = synced_store();
        let mut bad = service("c", "198.19.0.12", 80);
        bad["spec"]["clusterIPz"] = json!("x");
        s.apply("Service", bad);
        s.apply("Service", service("d", "198.19.0.13", 80));
        let (snap, errs) = s.build();
        assert_eq!(snap.services.len(), 1);
        assert_eq!(
            errs.to_string(),
            "Service apps/c: spec.clusterIPz: unknown field (left out)"
        );
    }

    #[test]
    fn cross_object_conflict_refuses_the_newcomer() {
        let mut s = synced_store();
        s.apply("Service", service("a", "198.19.0.10", 80));
        s.build();
        // b claims a's cluster IP: b is refused, a stays.
        s.apply("Service", service("b", "198.19.0.10", 80));
        let (snap, errs) = s.build();
        assert!(snap.services.contains_key(&ObjKey::new("apps", "a")));
        assert!(!snap.services.contains_key(&ObjKey::new("apps", "b")));
        assert!(
            errs.to_string()
                .starts_with("Service apps/b: spec.clusterIP"),
            "{errs}"
        );
    }

    #[test]
    fn the_object_in_force_wins_whatever_the_names() {
        let mut s = synced_store();
        s.apply("Service", service("z", "198.19.0.10", 80));
        s.build();
        // "a" sorts first but came later: it is the one refused.
        s.apply("Service", service("a", "198.19.0.10", 80));
        let (snap, errs) = s.build();
        assert!(snap.services.contains_key(&ObjKey::new("apps", "z")));
        assert!(!snap.services.contains_key(&ObjKey::new("apps", "a")));
        assert!(
            errs.to_string()
                .starts_with("Service apps/a: spec.clusterIP"),
            "{errs}"
        );
        assert_eq!(errs.len(), 1, "{errs}");
    }

    #[test]
    fn relist_drops_objects_deleted_meanwhile_and_delete_removes() {
        let mut s = synced_store();
        s.apply("Service", service("a", "198.19.0.10", 80));
        s.apply("Service", service("b", "198.19.0.11", 80));
        s.build();
        // The watch broke; the relist no longer has a.
        s.relist_start("Service");
        s.apply("Service", service("b", "198.19.0.11", 80));
        let (snap, _) = s.build();
        assert_eq!(
            snap.services.len(),
            2,
            "the old objects stay until the list is complete"
        );
        s.relist_done("Service");
        let (snap, _) = s.build();
        assert_eq!(snap.services.len(), 1);
        s.delete("Service", &service("b", "", 0));
        let (snap, _) = s.build();
        assert!(snap.services.is_empty());
        assert!(s.kinds["Service"].1.objects.is_empty());
    }

    #[test]
    fn a_version_seen_before_is_not_read_again() {
        let mut s = synced_store();
        let mut a = service("a", "198.19.0.10", 80);
        a["metadata"]["resourceVersion"] = json!("5");
        s.apply("Service", a.clone());
        s.build();
        // The same resourceVersion again (a relist, a resent event): not read again, even
        // if it differed (it cannot, from a real server).
        a["spec"]["ports"][0]["port"] = json!(81);
        s.apply("Service", a.clone());
        s.relist_start("Service");
        s.apply("Service", a);
        s.relist_done("Service");
        let (snap, errs) = s.build();
        assert!(errs.is_empty(), "{errs}");
        assert_eq!(snap.services[&ObjKey::new("apps", "a")].ports[0].port, 80);
    }

    #[test]
    fn bookkeeping_is_dropped_on_arrival() {
        let mut v = json!({"metadata": {"name": "a",
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
            "annotations": {LAST_APPLIED: "{...}", "comb.dev/l7": "true"}}});
        strip_bookkeeping(&mut v);
        assert_eq!(
            v,
            json!({"metadata": {"name": "a", "annotations": {"comb.dev/l7": "true"}}})
        );
        let mut only = json!({"metadata": {"name": "a", "annotations": {LAST_APPLIED: "{}"}}});
        strip_bookkeeping(&mut only);
        assert_eq!(only, json!({"metadata": {"name": "a"}}));
    }

    #[test]
    fn a_pod_gets_interface_and_cgroup_from_its_own_sandbox() {
        let pod = |name: &str, uid: &str, annotations: Value| {
            json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "apps", "uid": uid,
                             "resourceVersion": "1", "annotations": annotations},
                "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "x"}]},
                "status": {"podIP": "10.0.0.5"}})
        };
        let sandbox = |name: &str, uid: &str| Sandbox {
            namespace: "apps".into(),
            name: name.into(),
            uid: uid.into(),
            interface: Some(format!("veth-{name}")),
            cgroup: Some(format!("kubepods/pod{uid}")),
        };
        let mut s = synced_store();
        s.apply("Pod", pod("a", "u1", json!({})));
        s.apply("Pod", pod("b", "u2", json!({})));
        s.apply(
            "Pod",
            pod("c", "u3", json!({"comb.dev/interface": "lxc-own"})),
        );
        s.set_sandboxes(
            vec![
                sandbox("a", "u1"),
                // An earlier pod of the same name: not this one's sandbox.
                sandbox("b", "old-uid"),
                sandbox("c", "u3"),
            ],
            vec!["skipping a sandbox record: x.json: EOF".into()],
        );
        let (snap, errs) = s.build();
        let get = |n: &str| &snap.pods[&ObjKey::new("apps", n)];
        assert_eq!(get("a").interface.as_deref(), Some("veth-a"));
        assert_eq!(get("a").cgroup.as_deref(), Some("kubepods/podu1"));
        assert_eq!(get("b").interface, None);
        assert_eq!(
            get("c").interface.as_deref(),
            Some("lxc-own"),
            "annotations win"
        );
        assert_eq!(get("c").cgroup.as_deref(), Some("kubepods/podu3"));
        assert_eq!(
            errs.to_string(),
            "cni spool: skipping a sandbox record: x.json: EOF"
        );
    }

    #[test]
    fn problems_are_reported_per_kind() {
        let mut s = synced_store();
        s.set_problem(
            "AuthorizationPolicy",
            Some("not served (CRD not installed?)".into()),
        );
        let (_, errs) = s.build();
        assert_eq!(
            errs.to_string(),
            "kubernetes authorizationpolicies.security.istio.io: not served (CRD not installed?)"
        );
        s.relist_start("AuthorizationPolicy");
        s.relist_done("AuthorizationPolicy");
        assert!(s.build().1.is_empty());
    }
}
