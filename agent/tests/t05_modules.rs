//! The agent's modules import each other without a cycle: read from the source, the modules
//! (top-level ones, and one level down inside each folder) that a module names through
//! `crate::` or `super::` paths form an acyclic graph. A `mod tests` at the end of a file and a
//! folder's `tests.rs` do not count (tests may reach anywhere).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module a file defines, as its path below `src` cut to `depth` segments (`None` for the
/// crate roots and test files).
fn module_of(rel: &[String], depth: usize) -> Option<Vec<String>> {
    let mut m: Vec<String> = rel.to_vec();
    let last = m.pop()?;
    let stem = last.trim_end_matches(".rs").to_string();
    if stem == "tests" || (m.is_empty() && (stem == "lib" || stem == "main")) {
        return None;
    }
    if stem != "mod" {
        m.push(stem);
    }
    m.truncate(depth);
    Some(m)
}

/// Paths named after `prefix` (`crate::` or `super::`), as module segments.
fn named(text: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().last();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let path: Vec<String> = rest
            .split("::")
            .map(|s| {
                s.chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect::<String>()
            })
            .take_while(|s| !s.is_empty())
            .collect();
        if !path.is_empty() {
            out.push(path);
        }
    }
    out
}

fn graph(depth: usize) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut deps: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    let mut parents: BTreeMap<Vec<String>, Vec<String>> = BTreeMap::new();
    for f in &files {
        let rel: Vec<String> = f
            .strip_prefix(&src)
            .unwrap()
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        let Some(m) = module_of(&rel, depth) else {
            continue;
        };
        let text = std::fs::read_to_string(f).unwrap();
        let text = text.split("#[cfg(test)]\nmod tests").next().unwrap();
        let mut full = rel.clone();
        let last = full.pop().unwrap();
        let is_mod = last == "mod.rs";
        if !is_mod {
            full.push(last.trim_end_matches(".rs").to_string());
        }
        // `super::` from a file is its parent module (from a `mod.rs`, the folder's parent).
        let parent: Vec<String> = if is_mod {
            full[..full.len().saturating_sub(1)].to_vec()
        } else {
            full[..full.len() - 1].to_vec()
        };
        parents.insert(m.clone(), parent.clone());
        let entry = deps.entry(m.clone()).or_default();
        for p in named(text, "crate::") {
            let mut t = p;
            t.truncate(depth);
            entry.insert(t);
        }
        for p in named(text, "super::") {
            let mut t = parent.clone();
            t.extend(p);
            t.truncate(depth);
            entry.insert(t);
        }
    }
    let known: BTreeSet<Vec<String>> = deps.keys().cloned().collect();
    for (m, d) in deps.iter_mut() {
        // A module's own items, and its parent's (a child reaching up into the module it
        // belongs to is how Rust splits one module over files), are not edges.
        let parent = parents.get(m).cloned().unwrap_or_default();
        d.retain(|t| known.contains(t) && t != m && *t != parent);
    }
    deps
}

/// A cycle in the graph, if there is one.
fn cycle(deps: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Option<Vec<Vec<String>>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        m: &Vec<String>,
        deps: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        marks: &mut BTreeMap<Vec<String>, Mark>,
        stack: &mut Vec<Vec<String>>,
    ) -> Option<Vec<Vec<String>>> {
        match marks.get(m) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let from = stack.iter().position(|s| s == m).unwrap_or(0);
                return Some(stack[from..].to_vec());
            }
            None => {}
        }
        marks.insert(m.clone(), Mark::Open);
        stack.push(m.clone());
        for d in deps.get(m).into_iter().flatten() {
            if let Some(c) = visit(d, deps, marks, stack) {
                return Some(c);
            }
        }
        stack.pop();
        marks.insert(m.clone(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for m in deps.keys() {
        if let Some(c) = visit(m, deps, &mut marks, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

#[test]
fn the_agents_modules_import_each_other_without_a_cycle() {
    for depth in [1, 2] {
        let deps = graph(depth);
        assert!(deps.len() > 15, "too few modules found: {:?}", deps.keys());
        if let Some(c) = cycle(&deps) {
            let names: Vec<String> = c.iter().map(|m| m.join("::")).collect();
            panic!("import cycle: {}", names.join(" -> "));
        }
    }
    // The bottom of the agent imports nothing of it.
    let deps = graph(1);
    for bottom in ["util", "wire"] {
        let d = &deps[&vec![bottom.to_string()]];
        assert!(
            d.is_empty(),
            "{bottom} must import nothing of the agent: {d:?}"
        );
    }
}

/// The check itself finds a cycle where there is one.
#[test]
fn a_cycle_is_found() {
    let m = |s: &str| vec![s.to_string()];
    let deps = BTreeMap::from([
        (m("a"), BTreeSet::from([m("b")])),
        (m("b"), BTreeSet::from([m("c")])),
        (m("c"), BTreeSet::from([m("a")])),
        (m("d"), BTreeSet::new()),
    ]);
    let c = cycle(&deps).expect("a cycle");
    assert_eq!(c.len(), 3);
    let acyclic = BTreeMap::from([
        (m("a"), BTreeSet::from([m("b")])),
        (m("b"), BTreeSet::new()),
    ]);
    assert!(cycle(&acyclic).is_none());
    assert_eq!(
        named(
            "use crate::wire::{A, B}; let x = super::legs::Leg;",
            "crate::"
        ),
        vec![vec!["wire".to_string()]]
    );
}
