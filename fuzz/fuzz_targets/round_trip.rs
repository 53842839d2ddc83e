//! The property every target checks: parsing, building and the agent's pipeline never panic,
//! and whatever parses survives a write/parse round trip unchanged (the lab and `comb apply`
//! write manifests with `to_yaml_documents` that agents then read).

use std::path::Path;

pub fn check(text: &str) {
    let file = Path::new("fuzz.yaml");
    let Ok(docs) = comb_config::parse_file_text(file, text) else {
        return;
    };
    if let Ok(snapshot) = comb_config::build_snapshot(&docs) {
        pipeline(snapshot);
    }
    let objects: Vec<_> = docs.into_iter().map(|d| d.object).collect();
    let yaml = comb_config::to_yaml_documents(&objects);
    let back = comb_config::parse_file_text(file, &yaml)
        .unwrap_or_else(|e| panic!("written YAML does not parse: {e}\n{yaml}"));
    let back: Vec<_> = back.into_iter().map(|d| d.object).collect();
    assert_eq!(back, objects);
}

/// What an agent computes from an accepted snapshot, for every node a pod names (and one
/// that none does), with every local pod's interface present.
fn pipeline(snapshot: comb_model::Snapshot) {
    use comb_model::identity::IdentityAllocator;
    use comb_model::pipeline::{self, PipelineConfig};
    let mut nodes: Vec<String> = snapshot
        .pods
        .values()
        .filter_map(|p| p.node_name.clone())
        .take(3)
        .collect();
    nodes.push("fuzz-node".into());
    let mut state = comb_model::State::new();
    state.replace(snapshot);
    let config = PipelineConfig {
        policy: true,
        socket_lb: true,
        ..Default::default()
    };
    let mut identities = IdentityAllocator::default();
    for node in &nodes {
        let interfaces = pipeline::interface_names(&state, node)
            .zip(1u32..)
            .map(|(name, i)| (name.to_owned(), i))
            .collect();
        let desired = pipeline::compute(&state, node, &mut identities, &config, &interfaces);
        let _ = desired.warnings().count();
    }
}
