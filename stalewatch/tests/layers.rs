//! The crate's layers point one way, read from the code itself: every
//! `crate::`, `super::` and `self::` path in `src/` is an edge from the file
//! that names it to the module it names. The test fails on an import
//! against the layers (see `lib.rs`) and on any circle of imports between
//! files. No kernel, no root.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

/// Top-level modules by layer: a module may import its own layer's
/// modules only inside itself, and lower layers freely.
const LAYERS: &[(&str, u8)] = &[
    ("domain", 0),
    ("linux", 0),
    ("error", 0),
    ("source", 1),
    ("correlate", 2),
    ("sink", 3),
    ("command", 4),
];

/// A module path, `["command", "watch", "view"]`; the crate root is `[]`.
type Module = Vec<String>;

#[test]
fn imports_point_down_the_layers_and_never_in_a_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules = modules_in(&src);
    assert!(modules.len() > 20, "the crate's files: {modules:?}");
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (module, file) in &modules {
        let code = strip_comments(&fs::read_to_string(file).unwrap());
        for path in paths_in(&code, module) {
            let Some(target) = longest_module(&modules, &path) else {
                continue;
            };
            // A module owns its children: declaring or re-exporting them
            // is no import.
            if target != *module && !target.starts_with(module) {
                edges.entry(module.clone()).or_default().insert(target);
            }
        }
    }

    let mut wrong = Vec::new();
    for (from, tos) in &edges {
        for to in tos {
            if let Some(why) = against_layers(from, to) {
                wrong.push(format!("{} -> {}: {why}", from.join("::"), to.join("::")));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );

    if let Some(circle) = find_circle(&edges) {
        let names: Vec<String> = circle.iter().map(|m| m.join("::")).collect();
        panic!("a circle of imports: {}", names.join(" -> "));
    }
    // The test sees the edges it should: the correlator imports the domain.
    assert!(edges[&vec!["correlate".to_owned()]].contains(&vec!["domain".to_owned()]));
}

#[test]
fn a_circle_and_an_upward_import_are_caught() {
    let m = |s: &str| s.split("::").map(str::to_owned).collect::<Module>();
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    edges
        .entry(m("sink::fix"))
        .or_default()
        .insert(m("sink::record"));
    edges
        .entry(m("sink::record"))
        .or_default()
        .insert(m("sink::fix"));
    assert!(find_circle(&edges).is_some());
    assert!(against_layers(&m("domain::flow"), &m("linux")).is_some());
    assert!(against_layers(&m("source::engine"), &m("correlate")).is_some());
    assert!(against_layers(&m("source::conntrack"), &m("source::netns")).is_none());
    assert!(against_layers(&m("source::engine"), &m("source::kernel")).is_some());
    assert!(against_layers(&m("command::watch"), &m("sink::record")).is_none());
}

/// Why an import from `from` to `to` goes against the layers, if it does.
fn against_layers(from: &Module, to: &Module) -> Option<String> {
    let rank = |m: &Module| {
        LAYERS
            .iter()
            .find(|(name, _)| m.first().is_some_and(|f| f == name))
            .map(|(_, rank)| *rank)
    };
    let (Some(a), Some(b)) = (rank(from), rank(to)) else {
        return None;
    };
    if b > a {
        return Some("up a layer".into());
    }
    if b == a && from[0] != to[0] {
        return Some("across a layer".into());
    }
    // Sources stand side by side: each enters namespaces through
    // `source::netns`, and imports no other source.
    if from[0] == "source"
        && to[0] == "source"
        && from.get(1) != to.get(1)
        && to.get(1).map(String::as_str) != Some("netns")
    {
        return Some("from one source to another".into());
    }
    None
}

/// Every file of the crate under `src` by module path (`main.rs` is the
/// binary, no module of the library).
fn modules_in(src: &Path) -> BTreeMap<Module, std::path::PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap();
            let mut module: Module = rel
                .with_extension("")
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            match module.last().map(String::as_str) {
                Some("main") if module.len() == 1 => continue,
                Some("lib") | Some("mod") => {
                    module.pop();
                }
                _ => {}
            }
            out.insert(module, path);
        }
    }
    out
}

/// The code without comments, so that doc links and prose name nothing,
/// and without its unit tests (an inline `mod tests`, where `super` means
/// the file itself, at the end of the file by custom).
fn strip_comments(code: &str) -> String {
    let code = code.split("#[cfg(test)]\nmod ").next().unwrap_or(code);
    code.lines()
        .map(|l| match l.find("//") {
            Some(at) => &l[..at],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The paths that `code` (of `module`) names through `crate::`, `super::`
/// or `self::`, absolute, with `use` groups expanded.
fn paths_in(code: &str, module: &Module) -> Vec<Module> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    for start in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(at) = code[from..].find(start) {
            let at = from + at;
            from = at + start.len();
            // A whole word only: not `my_crate::` or `Self::`.
            if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_') {
                continue;
            }
            let mut base: Module = match start {
                "crate::" => Vec::new(),
                "super::" => module[..module.len().saturating_sub(1)].to_vec(),
                _ => module.clone(),
            };
            let mut rest = &code[at + start.len()..];
            while let Some(more) = rest.strip_prefix("super::") {
                base.pop();
                rest = more;
            }
            for tail in expand(rest) {
                let mut path = base.clone();
                path.extend(tail);
                out.push(path);
            }
        }
    }
    out
}

/// The paths at the start of `text`: `a::b::c`, or a group `a::{b, c::d}`.
fn expand(text: &str) -> Vec<Vec<String>> {
    let mut prefix = Vec::new();
    let mut rest = text;
    loop {
        let word: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if word.is_empty() {
            break;
        }
        rest = &rest[word.len()..];
        prefix.push(word);
        match rest.strip_prefix("::") {
            Some(more) => rest = more,
            None => return vec![prefix],
        }
    }
    let Some(group) = rest.strip_prefix('{') else {
        return vec![prefix];
    };
    let mut out = Vec::new();
    let mut depth = 0;
    let mut item = String::new();
    for c in group.chars() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.extend(
                    expand(item.trim())
                        .into_iter()
                        .map(|t| [prefix.clone(), t].concat()),
                );
                item.clear();
                continue;
            }
            _ => {}
        }
        item.push(c);
    }
    out.extend(
        expand(item.trim())
            .into_iter()
            .map(|t| [prefix.clone(), t].concat()),
    );
    out
}

/// The module a path names: its longest prefix that is a module.
fn longest_module(modules: &BTreeMap<Module, std::path::PathBuf>, path: &Module) -> Option<Module> {
    (0..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|m| modules.contains_key(m))
}

/// A circle in the graph, if it has one (depth-first, colouring nodes).
fn find_circle(edges: &BTreeMap<Module, BTreeSet<Module>>) -> Option<Vec<Module>> {
    fn visit(
        node: &Module,
        edges: &BTreeMap<Module, BTreeSet<Module>>,
        done: &mut BTreeSet<Module>,
        stack: &mut Vec<Module>,
    ) -> Option<Vec<Module>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut circle = stack[at..].to_vec();
            circle.push(node.clone());
            return Some(circle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.clone());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(circle) = visit(next, edges, done, stack) {
                return Some(circle);
            }
        }
        stack.pop();
        done.insert(node.clone());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|node| visit(node, edges, &mut done, &mut Vec::new()))
}
