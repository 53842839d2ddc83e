//! Unknown-field detection.
//!
//! k8s-openapi silently ignores fields it does not know, so a typo such as `spec.nodeNme`
//! would be dropped without a word. We re-serialize the typed object and compare key sets with
//! the input. A key that vanished is either unknown or known-but-empty (`null`, and empty
//! values some types drop); to tell them apart we re-deserialize with the value replaced by a
//! `true` and then a string: an unknown key accepts both, while every field type Comb's kinds
//! use rejects at least one of them.

use std::collections::HashMap;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

#[derive(Clone, Debug)]
enum Seg {
    Key(String),
    Index(usize),
}

/// The first field path of `input` that `T` does not know, e.g. `spec.nodeNme`.
/// `typed` must be `input` deserialized as `T`.
pub(crate) fn first_unknown<T: DeserializeOwned + Serialize>(
    input: &Value,
    typed: &T,
) -> Option<String> {
    let output = serde_json::to_value(typed).ok()?;
    let mut walker = Walker::<T> {
        root: input,
        path: Vec::new(),
        known: HashMap::new(),
        ty: std::marker::PhantomData,
    };
    walker.walk(input, &output)
}

struct Walker<'a, T> {
    root: &'a Value,
    path: Vec<Seg>,
    /// Probe results by schema path (indices erased): every element of a list has one type.
    known: HashMap<String, bool>,
    ty: std::marker::PhantomData<T>,
}

impl<T: DeserializeOwned> Walker<'_, T> {
    fn walk(&mut self, input: &Value, output: &Value) -> Option<String> {
        match (input, output) {
            (Value::Object(i), Value::Object(o)) => {
                for (k, v) in i {
                    self.path.push(Seg::Key(k.clone()));
                    let found = match o.get(k) {
                        Some(ov) => self.walk(v, ov),
                        None if !self.is_known() => Some(render(&self.path, false)),
                        None => None,
                    };
                    if found.is_some() {
                        return found;
                    }
                    self.path.pop();
                }
            }
            (Value::Array(i), Value::Array(o)) => {
                for (n, (iv, ov)) in i.iter().zip(o).enumerate() {
                    self.path.push(Seg::Index(n));
                    let found = self.walk(iv, ov);
                    if found.is_some() {
                        return found;
                    }
                    self.path.pop();
                }
            }
            _ => {}
        }
        None
    }

    fn is_known(&mut self) -> bool {
        let schema = render(&self.path, true);
        if let Some(&k) = self.known.get(&schema) {
            return k;
        }
        let accepts = |probe: Value| {
            let mut doc = self.root.clone();
            set_at(&mut doc, &self.path, probe);
            serde_json::from_value::<T>(doc).is_ok()
        };
        let known = !(accepts(Value::Bool(true)) && accepts(Value::String("comb-probe".into())));
        self.known.insert(schema, known);
        known
    }
}

fn set_at(doc: &mut Value, path: &[Seg], value: Value) {
    let mut cur = doc;
    for seg in path {
        let next = match (seg, cur) {
            (Seg::Key(k), Value::Object(m)) => m.get_mut(k),
            (Seg::Index(n), Value::Array(a)) => a.get_mut(*n),
            _ => None,
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    *cur = value;
}

/// Renders like serde_path_to_error (`spec.ports[0].port`) so all our field paths look alike.
fn render(path: &[Seg], erase_indices: bool) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Index(_) if erase_indices => s.push_str("[]"),
            Seg::Index(n) => s.push_str(&format!("[{n}]")),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Pod, Service};
    use serde_json::json;

    fn check<T: DeserializeOwned + Serialize>(v: Value) -> Option<String> {
        let typed: T = serde_json::from_value(v.clone()).unwrap();
        first_unknown(&v, &typed)
    }

    #[test]
    fn known_fields_pass() {
        let v = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "labels": {"x": "y"}},
            "spec": {"nodeName": "n", "containers": [{"name": "c", "image": "i"}]},
            "status": {"podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}]}});
        assert_eq!(check::<Pod>(v), None);
    }

    #[test]
    fn typo_is_found() {
        let v = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"}, "spec": {"nodeNme": "n", "containers": []}});
        assert_eq!(check::<Pod>(v).as_deref(), Some("spec.nodeNme"));
    }

    #[test]
    fn nested_in_list() {
        let v = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"},
            "spec": {"ports": [{"port": 80}, {"port": 81, "prot": "TCP"}]}});
        assert_eq!(check::<Service>(v).as_deref(), Some("spec.ports[1].prot"));
    }

    #[test]
    fn null_and_empty_known_values_pass() {
        let v = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "labels": null, "annotations": {}},
            "spec": {"nodeName": null, "containers": [{"name": "c", "image": null, "ports": []}], "volumes": null},
            "status": null});
        assert_eq!(check::<Pod>(v), None);
    }

    #[test]
    fn null_unknown_value_is_found() {
        let v = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"}, "spec": {"containers": [], "bogus": null}});
        assert_eq!(check::<Pod>(v).as_deref(), Some("spec.bogus"));
        let v = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "extra": {}}});
        assert_eq!(check::<Pod>(v).as_deref(), Some("metadata.extra"));
    }
}
