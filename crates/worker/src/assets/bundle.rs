//! `/app.js` as the browser gets it: web/app.js with the modules it imports
//! statically (`import { a } from './x.js';`, recursively) in the same
//! response, each in its own function scope, so a first visit costs one
//! response instead of five, and one gzip stream shares its words across the
//! modules (about 2 KB less: docs/BENCHMARKS.md, "Bytes per page load").
//! The files in web/ stay plain ES modules (the node tests import them, and
//! any of them is still served on its own path); dynamic `import()` (the
//! sunset) loads its module from its own path as before.
//!
//! Only the forms the page uses are understood: one-line named imports of a
//! relative `./*.js` file, and `export` before a `function`, `class`, `const`
//! or `let` declaration at the start of a line. Anything else is an error, and
//! the worker then serves app.js as it is (see `Assets`).

/// The bundle of `entry` (e.g. "app.js"), reading modules with `read`.
pub fn bundle(entry: &str, read: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut order = Vec::new();
    visit(entry, read, &mut Vec::new(), &mut order)?;
    let mut out = String::new();
    for (name, module) in order {
        if name == entry {
            out.push_str(&module.body);
        } else {
            out.push_str(&format!(
                "const {} = (() => {{\n{}\nreturn {{ {} }};\n}})();\n",
                var(&name),
                module.body,
                module.exports.join(", ")
            ));
        }
    }
    Ok(out)
}

struct Module {
    body: String,
    exports: Vec<String>,
}

/// Depth first: a module comes after every module it imports.
fn visit(
    name: &str,
    read: &dyn Fn(&str) -> Option<String>,
    path: &mut Vec<String>,
    order: &mut Vec<(String, Module)>,
) -> Result<(), String> {
    if path.iter().any(|p| p == name) {
        return Err(format!("import cycle through {name}"));
    }
    if order.iter().any(|(n, _)| n == name) {
        return Ok(());
    }
    let src = read(name).ok_or_else(|| format!("{name}: no such file"))?;
    path.push(name.to_owned());
    let mut body = String::with_capacity(src.len());
    let mut exports = Vec::new();
    for line in src.lines() {
        if let Some(rest) = line.strip_prefix("import ") {
            let (names, from) = parse_import(rest).ok_or_else(|| format!("{name}: {line}"))?;
            visit(&from, read, path, order)?;
            body.push_str(&format!(
                "const {{ {} }} = {};\n",
                names.replace(" as ", ": "),
                var(&from)
            ));
        } else if let Some(rest) = line.strip_prefix("export ") {
            exports.push(declared_name(rest).ok_or_else(|| format!("{name}: {line}"))?);
            body.push_str(rest);
            body.push('\n');
        } else {
            body.push_str(line);
            body.push('\n');
        }
    }
    path.pop();
    order.push((name.to_owned(), Module { body, exports }));
    Ok(())
}

/// `{ a, b as c } from './x.js';` -> ("a, b as c", "x.js").
fn parse_import(rest: &str) -> Option<(String, String)> {
    let rest = rest.trim().strip_prefix('{')?;
    let (names, rest) = rest.split_once('}')?;
    let from = rest.trim().strip_prefix("from")?.trim().strip_suffix(';')?;
    let from = from.strip_prefix('\'').and_then(|f| f.strip_suffix('\''))?;
    let file = from.strip_prefix("./")?;
    let plain = file.ends_with(".js")
        && file.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || c == b'-');
    plain.then(|| (names.trim().to_owned(), file.to_owned()))
}

/// The name `export` makes public in `rest` (what follows `export `).
fn declared_name(rest: &str) -> Option<String> {
    let rest = rest.strip_prefix("async ").unwrap_or(rest);
    let rest = ["function* ", "function ", "class ", "const ", "let "]
        .iter()
        .find_map(|k| rest.strip_prefix(k))?;
    let name: String =
        rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '$').collect();
    (!name.is_empty()).then_some(name)
}

/// The variable holding module `file`'s exports: `proto.js` -> `$m_proto`.
fn var(file: &str) -> String {
    let stem = file.strip_suffix(".js").unwrap_or(file);
    format!("$m_{}", stem.replace(|c: char| !c.is_ascii_alphanumeric(), "_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| list.iter().find(|(n, _)| *n == name).map(|(_, s)| (*s).to_owned())
    }

    #[test]
    fn modules_come_once_before_their_importers_each_in_its_own_scope() {
        let read = files(&[
            (
                "app.js",
                "import { A } from './a.js';\nimport { B as Bee } from './b.js';\nA(Bee);\n",
            ),
            ("a.js", "import { B } from './b.js';\nexport function A(x) { return B + x; }\n"),
            ("b.js", "const secret = 1;\nexport const B = secret;\n"),
        ]);
        assert_eq!(
            bundle("app.js", &read).unwrap(),
            "const $m_b = (() => {\nconst secret = 1;\nconst B = secret;\n\nreturn { B };\n})();\n\
             const $m_a = (() => {\nconst { B } = $m_b;\nfunction A(x) { return B + x; }\n\nreturn { A };\n})();\n\
             const { A } = $m_a;\nconst { B: Bee } = $m_b;\nA(Bee);\n"
        );
    }

    #[test]
    fn forms_it_does_not_know_and_cycles_are_errors() {
        let read = files(&[("app.js", "import * as x from './x.js';\n")]);
        assert!(bundle("app.js", &read).is_err());
        let read = files(&[("app.js", "export default 1;\n")]);
        assert!(bundle("app.js", &read).is_err());
        let read = files(&[
            ("app.js", "import { a } from './a.js';\n"),
            ("a.js", "import { b } from './app.js';\n"),
        ]);
        assert!(bundle("app.js", &read).unwrap_err().contains("cycle"));
    }

    #[test]
    fn the_page_bundles() {
        let web = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../web");
        let read = |name: &str| std::fs::read_to_string(web.join(name)).ok();
        let out = bundle("app.js", &read).unwrap();
        for module in ["proto", "board", "conn", "grid"] {
            assert_eq!(out.matches(&format!("const $m_{module} = ")).count(), 1, "{module}");
        }
        assert!(!out.contains("\nimport "), "no static import left");
    }
}
