//! Test: the crate's top-level modules import each other one way. Each module's references
//! to `crate::<module>` (in `use` lines and in paths; comments are skipped) are edges; the
//! graph must be a DAG, features must not reach other features or the facade, and the shared
//! helpers must not reach features or the facade.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

/// The facade.
const FACADE: &str = "datapath";
/// Feature modules: each may use helpers only.
const FEATURES: &[&str] = &["splice", "lb", "policy", "proxy_splice"];

type Graph = BTreeMap<String, BTreeSet<String>>;

/// The `crate::<module>` references in Rust source, comments skipped.
fn references(src: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in src.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `use crate::{a, b}` lists several modules.
            if name.is_empty() && after.starts_with('{') {
                let list = after[1..].split('}').next().unwrap_or("");
                for item in list.split(',') {
                    let m: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !m.is_empty() {
                        out.insert(m);
                    }
                }
            } else if !name.is_empty() {
                out.insert(name);
            }
            rest = after;
        }
    }
    out
}

/// Every `.rs` file of a module: `src/<m>.rs` or everything below `src/<m>/`.
fn module_sources(src: &Path, module: &str) -> Vec<String> {
    let file = src.join(format!("{module}.rs"));
    if file.is_file() {
        return vec![fs::read_to_string(file).unwrap()];
    }
    let mut out = Vec::new();
    let mut dirs = vec![src.join(module)];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(fs::read_to_string(p).unwrap());
            }
        }
    }
    out
}

/// The crate's module graph: top-level modules (files and folders under src/ but lib.rs and
/// this test) and the modules each one references.
fn crate_graph(src: &Path) -> Graph {
    let mut modules = BTreeSet::new();
    for e in fs::read_dir(src).unwrap().flatten() {
        let p = e.path();
        let name = p.file_stem().unwrap().to_string_lossy().into_owned();
        if p.is_dir() || p.extension().is_some_and(|x| x == "rs") {
            modules.insert(name);
        }
    }
    modules.remove("lib");
    modules.remove("module_graph");
    let mut g = Graph::new();
    for m in &modules {
        let mut deps = BTreeSet::new();
        for s in module_sources(src, m) {
            deps.extend(
                references(&s)
                    .into_iter()
                    .filter(|d| d != m && modules.contains(d)),
            );
        }
        g.insert(m.clone(), deps);
    }
    g
}

/// A cycle, if there is one (as the list of modules along it).
fn find_cycle(g: &Graph) -> Option<Vec<String>> {
    fn visit(
        g: &Graph,
        n: &str,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == n) {
            let mut c = stack[i..].to_vec();
            c.push(n.to_owned());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_owned());
        for d in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(g, d, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    g.keys()
        .find_map(|n| visit(g, n, &mut Vec::new(), &mut done))
}

/// Edges that break the layering: feature → feature or facade, helper → feature or facade.
fn layer_violations(g: &Graph) -> Vec<String> {
    let upper = |m: &str| m == FACADE || FEATURES.contains(&m);
    let mut out = Vec::new();
    for (m, deps) in g {
        if m == FACADE {
            continue;
        }
        for d in deps {
            if upper(d) {
                out.push(format!("{m} -> {d}"));
            }
        }
    }
    out
}

#[test]
fn modules_import_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let g = crate_graph(&src);
    // The graph is really read: the facade uses every feature.
    for f in FEATURES.iter().filter(|f| **f != "proxy_splice") {
        assert!(g[FACADE].contains(*f), "facade does not use {f}: {g:?}");
    }
    assert_eq!(find_cycle(&g), None, "import cycle in {g:?}");
    assert_eq!(layer_violations(&g), Vec::<String>::new(), "{g:?}");
}

#[test]
fn the_checks_can_fail() {
    let g: Graph = [
        ("datapath", vec!["splice"]),
        ("splice", vec!["pin", "lb"]),
        ("lb", vec!["splice"]),
        ("pin", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
    .collect();
    assert!(find_cycle(&g).is_some());
    assert_eq!(layer_violations(&g), ["lb -> splice", "splice -> lb"]);
    assert_eq!(
        references("use crate::{pin, sys};\nlet x = crate::abi::CombAddr::default(); // crate::lb"),
        ["abi", "pin", "sys"]
            .into_iter()
            .map(str::to_owned)
            .collect()
    );
}
