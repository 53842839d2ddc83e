//! What the Kubernetes source knows: the newest version of every watched object, the last
//! version of each that Comb accepted, and building State from them. Pure (no I/O), so the
//! per-object rejection rules are unit-tested without a server.
//!
//! Rules: an object whose newest version fails to parse or convert is left at its last good
//! version (or out of State, if it never had one) and its errors are reported; every other
//! object is in State as the server has it. A deleted object leaves State at once.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use comb_config::api::{api_origin, build_objects, parse_api_object};
use comb_config::{ConfigError, ConfigErrors, Document};
use comb_model::Snapshot;
use serde_json::Value;

use super::kube_kinds::WatchedKind;

/// (kind, namespace, name); namespace is empty for cluster-scoped kinds.
pub type ObjectKey = (&'static str, String, String);

#[derive(Default)]
struct KindState {
    /// Objects as listed and watched, by (namespace, name).
    objects: BTreeMap<(String, String), Value>,
    /// Objects of a relist in progress (watcher Init..InitDone); replace `objects` at the end
    /// so an object deleted while the watch was down disappears.
    relist: Option<BTreeMap<(String, String), Value>>,
    /// A complete list has been seen since the source started.
    synced: bool,
    /// Why the kind is not (fully) watched right now.
    problem: Option<String>,
}

#[derive(Default)]
pub struct Store {
    kinds: BTreeMap<&'static str, (WatchedKind, KindState)>,
    /// Parse results by key, valid while the object's JSON is unchanged.
    parsed: HashMap<ObjectKey, (Value, Result<Document, ConfigErrors>)>,
    /// The version of each object last accepted into State.
    good: HashMap<ObjectKey, Document>,
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
        if let Some(objects) = k.relist.take() {
            k.objects = objects;
        }
        k.synced = true;
        k.problem = None;
    }

    /// An object was listed (during a relist) or added or changed (while watching).
    pub fn apply(&mut self, kind: &str, obj: Value) {
        let (wk, k) = self.kinds.get_mut(kind).expect("a watched kind");
        let Some(key) = name_of(wk, &obj) else {
            return;
        };
        match &mut k.relist {
            Some(listed) => listed.insert(key, obj),
            None => {
                k.problem = None;
                k.objects.insert(key, obj)
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
        ConfigErrors(
            self.kinds
                .values()
                .filter_map(|(wk, k)| {
                    let p = k.problem.as_ref()?;
                    let origin = PathBuf::from(format!("kubernetes {}", wk.resource_name()));
                    Some(ConfigError::new(&origin, 0, None, p.clone()))
                })
                .collect(),
        )
    }

    /// State from every object's newest version that Comb accepts, the last good version of
    /// the others, and the errors to show.
    pub fn build(&mut self) -> (Snapshot, ConfigErrors) {
        let mut errors = self.problems().0;
        let mut current: HashMap<ObjectKey, ()> = HashMap::new();
        // key → (document, whether it is a version not accepted before)
        let mut chosen: BTreeMap<ObjectKey, (Document, bool)> = BTreeMap::new();
        for (kind, (_, k)) in &self.kinds {
            for ((ns, name), obj) in &k.objects {
                let key: ObjectKey = (kind, ns.clone(), name.clone());
                current.insert(key.clone(), ());
                let fresh = match self.parsed.get(&key) {
                    Some((seen, result)) if seen == obj => result.clone(),
                    _ => {
                        let origin = api_origin(kind, Some(ns), name);
                        let result = parse_api_object(&origin, obj.clone());
                        self.parsed
                            .insert(key.clone(), (obj.clone(), result.clone()));
                        result
                    }
                };
                match fresh {
                    Ok(doc) => {
                        let new = self.good.get(&key) != Some(&doc);
                        chosen.insert(key, (doc, new));
                    }
                    Err(e) => {
                        let kept = self.good.get(&key).cloned();
                        errors.extend(note_kept(e.0, kept.is_some()));
                        if let Some(doc) = kept {
                            chosen.insert(key, (doc, false));
                        }
                    }
                }
            }
        }
        self.parsed.retain(|k, _| current.contains_key(k));
        self.good.retain(|k, _| current.contains_key(k));

        // A new version that conversion or a cross-object check refuses falls back to the
        // last good one; build again until no new version is refused (each round removes at
        // least one, so this ends).
        let (snapshot, build_errors) = loop {
            // Accepted versions first: checks between objects (one cluster IP per Service)
            // are first come, first served, and the object already in force must win.
            let old = chosen.values().filter(|(_, new)| !new);
            let new = chosen.values().filter(|(_, new)| *new);
            let (snapshot, build_errors) = build_objects(old.chain(new).map(|(d, _)| d));
            let refused: Vec<ObjectKey> = chosen
                .iter()
                .filter(|(_, (doc, new))| *new && build_errors.iter().any(|e| e.file == doc.file))
                .map(|(k, _)| k.clone())
                .collect();
            if refused.is_empty() {
                break (snapshot, build_errors);
            }
            for key in refused {
                let (doc, _) = chosen.remove(&key).expect("chosen");
                let kept = self.good.get(&key).cloned();
                let own = build_errors.iter().filter(|e| e.file == doc.file).cloned();
                errors.extend(note_kept(own.collect(), kept.is_some()));
                if let Some(good) = kept {
                    chosen.insert(key, (good, false));
                }
            }
        };
        errors.extend(build_errors);
        for (key, (doc, new)) in chosen {
            if new {
                self.good.insert(key, doc);
            }
        }
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

    fn service(name: &str, ip: &str, port: i64) -> Value {
        json!({"apiVersion": "v1", "kind": "Service",
          "metadata": {"name": name, "namespace": "apps", "resourceVersion": "1"},
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

        // Fixed: the error goes away and the new version applies.
        s.apply("Service", service("a", "198.19.0.10", 90));
        let (snap, errs) = s.build();
        assert!(errs.is_empty(), "{errs}");
        assert_eq!(snap.services[&ObjKey::new("apps", "a")].ports[0].port, 90);
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
        assert!(s.good.is_empty() && s.parsed.is_empty());
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
