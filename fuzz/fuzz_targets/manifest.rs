//! Arbitrary text must never panic the manifests source: the agent hot-reloads whatever an
//! operator saves. Whatever parses must also survive a write/parse round trip unchanged, since
//! the lab writes manifests with `to_yaml_documents` that agents then read.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
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
});
