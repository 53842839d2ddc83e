//! The State container and its single mutator.

use std::sync::Arc;

use crate::objects::Pod;
use crate::snapshot::Snapshot;

/// Monotonic stamp of a State change; reconcilers report the generation they applied.
pub type Generation = u64;

#[derive(Clone, Debug, Default)]
pub struct State {
    generation: Generation,
    /// Shared so readers (the admin API) can hold the State in force without copying it.
    snapshot: Arc<Snapshot>,
}

impl State {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn generation(&self) -> Generation {
        self.generation
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The snapshot in force, to be read elsewhere while State moves on.
    pub fn shared_snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.clone()
    }

    /// The only mutator: swap in a validated snapshot and stamp a new generation.
    /// Returns false (and keeps the generation) when nothing changed.
    pub fn replace(&mut self, snapshot: Snapshot) -> bool {
        if snapshot == *self.snapshot {
            return false;
        }
        self.snapshot = Arc::new(snapshot);
        self.generation += 1;
        true
    }

    /// Pods scheduled on `node` that have at least one address.
    pub fn local_pods<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        self.snapshot
            .pods
            .values()
            .filter(move |p| p.node_name.as_deref() == Some(node) && !p.ips.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::ObjKey;
    use std::collections::BTreeMap;

    fn pod(name: &str, node: Option<&str>, ips: &[&str]) -> Pod {
        Pod {
            key: ObjKey::new("default", name),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            node_name: node.map(Into::into),
            service_account: "default".into(),
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            cgroup: None,
            splice: true,
            interface: None,
            ports: Vec::new(),
            owner: None,
        }
    }

    fn snapshot(pods: Vec<Pod>) -> Snapshot {
        let mut s = Snapshot::default();
        for p in pods {
            s.pods.insert(p.key.clone(), p);
        }
        s
    }

    #[test]
    fn replace_stamps_a_generation_only_on_change() {
        let mut st = State::new();
        assert_eq!(st.generation(), 0);
        assert!(st.replace(snapshot(vec![pod("a", Some("n1"), &["198.18.1.2"])])));
        assert_eq!(st.generation(), 1);
        assert!(
            !st.replace(snapshot(vec![pod("a", Some("n1"), &["198.18.1.2"])])),
            "same content"
        );
        assert_eq!(st.generation(), 1);
        assert!(st.replace(Snapshot::default()));
        assert_eq!(st.generation(), 2);
    }

    #[test]
    fn local_pods_are_this_nodes_pods_with_addresses() {
        let mut st = State::new();
        st.replace(snapshot(vec![
            pod("a", Some("n1"), &["198.18.1.2"]),
            pod("b", Some("n2"), &["198.18.2.2"]),
            pod("c", Some("n1"), &[]),
            pod("d", None, &["198.18.1.9"]),
        ]));
        let names: Vec<_> = st.local_pods("n1").map(|p| p.key.name.as_str()).collect();
        assert_eq!(names, ["a"]);
    }
}
