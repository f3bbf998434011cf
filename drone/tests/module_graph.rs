//! Guards the drone's dependency order: its modules form a graph without a cycle, leaves
//! first (see the code map in `src/lib.rs`). A cycle is how "one job per file" rots: two
//! modules that need each other are one module in two files, and neither can be read,
//! tested or moved alone.
//!
//! The graph is read from the source text: every `crate::<module>` a file names in code
//! (in `use` statements, grouped `use crate::{a, b}` imports, and paths), comments left
//! out since a doc link is not a dependency. `lib.rs` and `main.rs` are the roots and not
//! part of the graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Graph = BTreeMap<String, BTreeSet<String>>;

/// The text of a source file without its `//` comments (doc comments included).
fn code_only(text: &str) -> String {
    text.lines()
        .map(|line| line.split_once("//").map_or(line, |(code, _)| code))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every module named right after `crate::` in `code`, including each top-level entry of
/// a `crate::{...}` group.
fn crate_refs(code: &str) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        // `crate::` inside a longer word (`my_crate::`) is someone else's path.
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(is_ident_char) {
            continue;
        }
        let after = rest.trim_start();
        if let Some(group) = after.strip_prefix('{') {
            // Top-level entries of the group: `a`, `b::c`, `d::{e, f}` give a, b, d.
            let mut depth = 0usize;
            let mut entry_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => entry_start = true,
                    c if entry_start && is_ident_char(c) => {
                        let name: String = group[i..]
                            .chars()
                            .take_while(|c| is_ident_char(*c))
                            .collect();
                        refs.insert(name);
                        entry_start = false;
                    }
                    c if c.is_whitespace() => {}
                    _ => entry_start = false,
                }
            }
        } else {
            let name: String = after.chars().take_while(|c| is_ident_char(*c)).collect();
            if !name.is_empty() {
                refs.insert(name);
            }
        }
    }
    refs
}

/// The modules of `src` and, for each, the other modules it names.
fn module_graph(src: &Path) -> Graph {
    let mut files = BTreeMap::new();
    let entries = std::fs::read_dir(src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if path.extension().is_some_and(|e| e == "rs") && stem != "lib" && stem != "main" {
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            files.insert(stem.to_owned(), code_only(&text));
        }
    }
    let modules: BTreeSet<String> = files.keys().cloned().collect();
    files
        .into_iter()
        .map(|(module, code)| {
            let uses = crate_refs(&code)
                .into_iter()
                .filter(|m| modules.contains(m) && *m != module)
                .collect();
            (module, uses)
        })
        .collect()
}

/// A cycle in `graph` as the path that closes it (`a -> b -> a`), if there is one.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        node: &str,
        graph: &Graph,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let start = path.iter().position(|n| n == node).unwrap_or(0);
                let mut cycle = path[start..].to_vec();
                cycle.push(node.to_owned());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node.to_owned(), Mark::Open);
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, marks, path) {
                return Some(cycle);
            }
        }
        path.pop();
        marks.insert(node.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut marks, &mut Vec::new()))
}

fn graph_of(edges: &[(&str, &str)]) -> Graph {
    let mut graph = Graph::new();
    for (from, to) in edges {
        graph
            .entry((*from).to_owned())
            .or_default()
            .insert((*to).to_owned());
        graph.entry((*to).to_owned()).or_default();
    }
    graph
}

#[test]
fn the_drone_modules_form_a_graph_without_a_cycle() {
    let graph = module_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    // Not vacuous: the files were found and their imports read.
    assert!(
        graph.len() >= 10,
        "only {} modules found: {graph:?}",
        graph.len()
    );
    assert!(
        graph["client"].contains("config") && graph["executor"].contains("policy"),
        "known edges missing: {graph:?}"
    );
    if let Some(cycle) = find_cycle(&graph) {
        let edges: Vec<String> = graph
            .iter()
            .map(|(m, uses)| format!("  {m} -> {uses:?}"))
            .collect();
        panic!(
            "the drone's modules have an import cycle: {}\nthe graph:\n{}",
            cycle.join(" -> "),
            edges.join("\n")
        );
    }
}

#[test]
fn the_cycle_finder_finds_cycles_and_only_cycles() {
    let dag = graph_of(&[
        ("client", "config"),
        ("config", "policy"),
        ("client", "policy"),
    ]);
    assert_eq!(find_cycle(&dag), None);
    let cyclic = graph_of(&[
        ("config", "policy"),
        ("policy", "executor"),
        ("executor", "config"),
        ("client", "config"),
    ]);
    let cycle = find_cycle(&cyclic).unwrap_or_default();
    assert_eq!(cycle.first(), cycle.last(), "{cycle:?}");
    assert_eq!(cycle.len(), 4, "{cycle:?}");
}

#[test]
fn imports_are_read_from_code_not_comments() {
    let code = code_only(
        "use crate::config::Config;\n\
         use crate::{kind::Kind, policy::{self, Policy}, env};\n\
         // use crate::client;\n\
         /// See [`crate::executor`].\n\
         let x = crate::checkpoint::MAX; let y = my_crate::outbox::X;\n",
    );
    let refs = crate_refs(&code);
    let want: BTreeSet<String> = ["config", "kind", "policy", "env", "checkpoint"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(refs, want);
}
