//! The property every target checks: parsing and building never panic, and whatever parses
//! survives a write/parse round trip unchanged (the lab and `comb apply` write manifests
//! with `to_yaml_documents` that agents then read).

use std::path::Path;

pub fn check(text: &str) {
    let file = Path::new("fuzz.yaml");
    let Ok(docs) = comb_config::parse_file_text(file, text) else {
        return;
    };
    let _ = comb_config::build_snapshot(&docs);
    let objects: Vec<_> = docs.into_iter().map(|d| d.object).collect();
    let yaml = comb_config::to_yaml_documents(&objects);
    let back = comb_config::parse_file_text(file, &yaml)
        .unwrap_or_else(|e| panic!("written YAML does not parse: {e}\n{yaml}"));
    let back: Vec<_> = back.into_iter().map(|d| d.object).collect();
    assert_eq!(back, objects);
}
