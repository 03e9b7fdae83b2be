//! The layout's one rule, checked on every `cargo test`: dependencies
//! between modules point one way. Every `crate::` path in `src/` (code, doc
//! links and all) is an edge from the module whose file it is in to the
//! longest module its path names; a cycle among those edges fails the test
//! and is printed. (`../shared/tools/module-cycles src` draws the same
//! graph; this check needs nothing outside the repository.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`session::relay`) for each `.rs` file under `src/`, but the
/// crate roots.
fn modules(src: &Path) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path.strip_prefix(src).expect("under src");
            let mut parts: Vec<String> = relative
                .iter()
                .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
                .collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            let name = parts.join("::");
            if name == "lib" || name == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read a source file");
            found.insert(name, text);
        }
    }
    found
}

/// The modules each module's `crate::` paths name.
fn edges(modules: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph = BTreeMap::new();
    for (name, text) in modules {
        let mut targets = BTreeSet::new();
        for (at, _) in text.match_indices("crate::") {
            let rest = &text[at + "crate::".len()..];
            let mut path = Vec::new();
            for segment in rest.split("::") {
                let ident: String = segment
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if ident.is_empty() {
                    break;
                }
                let complete = ident.len() == segment.len();
                path.push(ident);
                if !complete {
                    break;
                }
            }
            // The longest prefix of the path that is a module.
            let target = (1..=path.len())
                .rev()
                .map(|n| path[..n].join("::"))
                .find(|candidate| modules.contains_key(candidate));
            if let Some(target) = target
                && target != *name
            {
                targets.insert(target);
            }
        }
        graph.insert(name.clone(), targets);
    }
    graph
}

/// A cycle in `graph`, if there is one, as the modules along it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let start = stack.iter().position(|n| n == node).expect("on the stack");
                let mut cycle = stack[start..].to_vec();
                cycle.push(node.to_string());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node.to_string(), Mark::Open);
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, marks, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        marks.insert(node.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, graph, &mut marks, &mut Vec::new()) {
            return Some(cycle);
        }
    }
    None
}

#[test]
fn dependencies_between_modules_point_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules = modules(&src);
    assert!(
        modules.contains_key("session::relay") && modules.contains_key("wire::frame"),
        "the module walk found {:?}",
        modules.keys().collect::<Vec<_>>()
    );
    let graph = edges(&modules);
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "an import cycle between modules: {} (ARCHITECTURE.md, \"Layers\")",
            cycle.join(" -> ")
        );
    }
}

#[test]
fn the_check_finds_a_cycle_when_there_is_one() {
    let mut modules = BTreeMap::new();
    modules.insert("app".to_string(), "use crate::admin::Thing;".to_string());
    modules.insert(
        "admin".to_string(),
        "/// See [`crate::app::run`].".to_string(),
    );
    modules.insert("leaf".to_string(), String::new());
    let cycle = find_cycle(&edges(&modules)).expect("a cycle");
    assert_eq!(cycle, ["admin", "app", "admin"]);
}
