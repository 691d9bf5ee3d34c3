//! The worker's modules form a layering, not a web: no circle of imports
//! among them, and none imports back up into `lib.rs` (whose items are the
//! crate's entry points). lib.rs's `# Layout` names the order; this test keeps
//! it true when someone adds a `use`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every module of `src/` (a file `x.rs`, or `x/*.rs` counted as `x`) and the
/// sibling modules it names through `crate::`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            let module = path.file_name().unwrap().to_str().unwrap().to_string();
            for inner in std::fs::read_dir(&path).unwrap() {
                files.push((module.clone(), inner.unwrap().path()));
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            let module = path.file_stem().unwrap().to_str().unwrap().to_string();
            // main.rs is the binary, lib.rs the layout, mime.rs is include!d.
            if !["main", "lib", "mime"].contains(&module.as_str()) {
                files.push((module, path));
            }
        }
    }
    let modules: BTreeSet<String> = files.iter().map(|(m, _)| m.clone()).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, path) in files {
        let uses = graph.entry(module.clone()).or_default();
        for name in crate_paths(&std::fs::read_to_string(&path).unwrap()) {
            if name != module {
                assert!(
                    modules.contains(&name),
                    "{}: `crate::{name}` is not a module: an import from lib.rs",
                    path.display()
                );
                uses.insert(name);
            }
        }
    }
    graph
}

/// The first segment of every `crate::` path in `code` (comments skipped),
/// including each name of a `crate::{a, b::c}` group.
fn crate_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap();
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    let name = item.trim().split("::").next().unwrap().trim();
                    if !name.is_empty() {
                        out.push(name.to_string());
                    }
                }
            } else {
                let name: String =
                    rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                out.push(name);
            }
        }
    }
    out
}

#[test]
fn the_worker_s_modules_import_no_circle_and_nothing_from_lib_rs() {
    let graph = imports();
    assert!(graph.len() > 10, "found the modules: {:?}", graph.keys());
    // Peel off modules that import nothing left; a circle is what remains.
    let mut left = graph.clone();
    loop {
        let ready: Vec<String> = left
            .iter()
            .filter(|(_, uses)| uses.iter().all(|u| !left.contains_key(u)))
            .map(|(m, _)| m.clone())
            .collect();
        if ready.is_empty() {
            break;
        }
        for m in ready {
            left.remove(&m);
        }
    }
    assert!(left.is_empty(), "a circle of imports among: {left:?}");
}

#[test]
fn crate_paths_reads_groups_and_skips_comments() {
    // The checker itself: `crate::` paths, groups and comments.
    let code = "use crate::{hub::Hub, sink};\n// crate::config\nlet x = crate::frames::frame();";
    assert_eq!(crate_paths(code), ["hub", "sink", "frames"]);
}
