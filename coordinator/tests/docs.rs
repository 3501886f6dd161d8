//! The documentation cannot drift from the code: docs/CONFIG.md and docs/config.schema.json
//! are generated from the config types (their doc comments and serde defaults, read by
//! schemars), docs/CLI.md from the binaries' own `--help`, and every relative link in the
//! Markdown pages must resolve, anchors included.
//!
//! Regenerate after changing a config type or a flag:
//! `cargo build --profile ci --bin worker && CCQ_BLESS=1 cargo test --profile ci -p ccq-coordinator --test docs`
//! (without `CCQ_BLESS` a stale page fails the test and says so).

mod support;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use ccq_coordinator::config::RunConfig;
use serde_json::Value;
use support::{coordinator, repo, worker};

const BLESS: &str =
    "cargo build --profile ci --bin worker && CCQ_BLESS=1 cargo test --profile ci -p ccq-coordinator --test docs";

/// Compares `path` (relative to the repository) with `generated`; rewrites it under
/// `CCQ_BLESS=1`, otherwise fails naming the command that does.
fn check_generated(path: &str, generated: &str) {
    let file = repo().join(path);
    let current = std::fs::read_to_string(&file).unwrap_or_default();
    if current == generated {
        return;
    }
    if std::env::var_os("CCQ_BLESS").is_some() && std::env::var("CI").as_deref() != Ok("true") {
        std::fs::write(&file, generated).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        return;
    }
    let first = current
        .lines()
        .zip(generated.lines())
        .position(|(a, b)| a != b)
        .unwrap_or_else(|| current.lines().count().min(generated.lines().count()));
    panic!(
        "{path} is stale (first difference at line {}): regenerate it with `{BLESS}`",
        first + 1
    );
}

// ---------------------------------------------------------------------------------------
// docs/CONFIG.md

fn config_schema() -> Value {
    serde_json::to_value(schemars::schema_for!(RunConfig)).expect("schema as JSON")
}

/// The definition a property refers to (`$ref: #/$defs/NAME`), if any.
fn target<'a>(schema: &'a Value, prop: &'a Value) -> Option<&'a Value> {
    let name = prop["$ref"].as_str()?.strip_prefix("#/$defs/")?;
    schema["$defs"].get(name)
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn type_name(schema: &Value, prop: &Value) -> String {
    if let Some(def) = target(schema, prop) {
        if def.get("oneOf").is_some() {
            return "string, one of the values below".into();
        }
    }
    let base = |t: &str, prop: &Value| -> String {
        match t {
            "array" => format!(
                "array of {}s",
                prop["items"]["type"].as_str().unwrap_or("value")
            ),
            other => other.to_string(),
        }
    };
    match &prop["type"] {
        Value::String(t) => base(t, prop),
        Value::Array(ts) => {
            let mut names: Vec<String> = ts
                .iter()
                .filter_map(Value::as_str)
                .filter(|t| *t != "null")
                .map(|t| base(t, prop))
                .collect();
            if ts.iter().any(|t| t == "null") {
                names.push("optional".into());
            }
            names.join(", ")
        }
        _ => "value".into(),
    }
}

/// A default in the TOML spelling a user would write.
fn toml_value(v: &Value) -> String {
    match v {
        Value::Null => "not set".into(),
        Value::String(s) => format!("`\"{s}\"`"),
        other => format!("`{other}`"),
    }
}

fn field_table(schema: &Value, section: &str, def: &Value, out: &mut String) {
    let required: BTreeSet<&str> = def["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let props = def["properties"].as_object().expect("a section has fields");
    out.push_str("| field | type | default | meaning |\n|---|---|---|---|\n");
    let mut enums = Vec::new();
    for (name, prop) in props {
        if target(schema, prop).is_some_and(|d| d.get("properties").is_some()) {
            continue; // a section of its own
        }
        let key = if section.is_empty() {
            name.clone()
        } else {
            format!("{section}.{name}")
        };
        let default = match prop.get("default") {
            Some(v) => toml_value(v),
            None if required.contains(name.as_str()) => "**required**".into(),
            None => "—".into(),
        };
        let meaning = one_line(prop["description"].as_str().unwrap_or(""));
        assert!(
            !meaning.is_empty(),
            "config field `{key}` has no doc comment: say what it means"
        );
        writeln!(
            out,
            "| `{key}` | {} | {default} | {} |",
            type_name(schema, prop),
            meaning.replace('|', "\\|")
        )
        .unwrap();
        if let Some(values) = target(schema, prop).and_then(|d| d["oneOf"].as_array()) {
            enums.push((key, values.clone()));
        }
    }
    for (key, values) in enums {
        writeln!(out, "\n`{key}` is one of:\n").unwrap();
        for v in values {
            let name = v["const"].as_str().expect("enum values are strings");
            let about = one_line(v["description"].as_str().unwrap_or(""));
            writeln!(out, "- `\"{name}\"`: {about}").unwrap();
        }
    }
}

fn render_config_md(schema: &Value) -> String {
    let mut out = String::new();
    out.push_str(
        "# Configuration reference\n\n\
         <!-- Generated from the config types by coordinator/tests/docs.rs; do not edit by hand.\n     \
         Regenerate: cargo build --profile ci --bin worker &&
     CCQ_BLESS=1 cargo test --profile ci -p ccq-coordinator --test docs -->\n\n\
         `coordinator run --config FILE.toml` reads one TOML file. Every field has a default \
         except `[model]` and `data.source`; a field the run does not know is an error (a typo \
         never silently does nothing), and a value out of range is an error naming the file and \
         the field, before anything is loaded. Relative paths are relative to the current \
         directory. On the command line `--seed`, `--out`, `--listen` and `--metrics` override \
         `seed`, `out`, `cluster.listen` and `cluster.metrics_listen`.\n\n\
         Editors that read JSON Schema for TOML (Taplo, Even Better TOML) can check a config \
         against [`config.schema.json`](config.schema.json), generated with this page: put \
         `#:schema ./docs/config.schema.json` (the path from your file) on the file's first line.\n\n",
    );
    writeln!(
        out,
        "{}\n",
        one_line(schema["description"].as_str().unwrap_or(""))
    )
    .unwrap();
    out.push_str(
        "An example, the offline quickstart (`examples/mnist-quickstart.toml`):\n\n```toml\n",
    );
    let example = std::fs::read_to_string(repo().join("examples/mnist-quickstart.toml"))
        .expect("examples/mnist-quickstart.toml");
    out.push_str(&example);
    out.push_str("```\n\n");

    let props = schema["properties"].as_object().expect("top-level fields");
    let sections: Vec<(&String, &Value)> = props
        .iter()
        .filter_map(|(name, prop)| Some((name, target(schema, prop)?)))
        .filter(|(_, def)| def.get("properties").is_some())
        .collect();
    out.push_str("Sections: ");
    out.push_str(
        &sections
            .iter()
            .map(|(name, _)| format!("[`[{name}]`](#{name})"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    out.push_str(".\n\n## Top level\n\n");
    field_table(schema, "", schema, &mut out);
    for (name, def) in sections {
        writeln!(out, "\n## `[{name}]`\n").unwrap();
        // The section type's own doc says the most; the field's doc is the fallback.
        let about = def["description"]
            .as_str()
            .or(props[name.as_str()]["description"].as_str())
            .unwrap_or("");
        writeln!(out, "{}\n", one_line(about)).unwrap();
        field_table(schema, name, def, &mut out);
    }
    out
}

#[test]
fn config_reference_is_generated_from_the_config_types() {
    let schema = config_schema();
    let md = render_config_md(&schema);
    // Every field that deserializes is documented: the page is built from the same schema,
    // so a new field appears on it (and must have a doc comment, asserted while rendering).
    for def in schema["$defs"].as_object().unwrap().values() {
        for name in def["properties"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|p| p.0)
        {
            assert!(
                md.contains(&format!(".{name}`")),
                "{name} missing from CONFIG.md"
            );
        }
    }
    check_generated("docs/CONFIG.md", &md);
    let mut json = serde_json::to_string_pretty(&schema).unwrap();
    json.push('\n');
    check_generated("docs/config.schema.json", &json);
}

/// The defaults the page states are the ones a config without the field gets.
#[test]
fn stated_defaults_are_the_loaded_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("min.toml");
    std::fs::write(
        &file,
        "[model]\nonnx = \"m.onnx\"\nmean = [0.5]\nstd = [0.5]\n\
         [data]\nsource = \"mnist:d\"\n[budget]\nevaluations = 1\n",
    )
    .unwrap();
    let loaded = RunConfig::load(&file).expect("a minimal config loads");
    let loaded = serde_json::to_value(&loaded).unwrap();
    let schema = config_schema();
    let mut checked = 0;
    for (name, prop) in schema["properties"].as_object().unwrap() {
        let Some(def) = target(&schema, prop).filter(|d| d.get("properties").is_some()) else {
            if let Some(d) = prop.get("default") {
                assert_eq!(&loaded[name], d, "{name}");
                checked += 1;
            }
            continue;
        };
        for (field, fprop) in def["properties"].as_object().unwrap() {
            if let Some(d) = fprop.get("default") {
                if name == "budget" && field == "evaluations" {
                    continue; // set above: a run needs one limit
                }
                assert_eq!(&loaded[name][field], d, "{name}.{field}");
                checked += 1;
            }
        }
    }
    assert!(checked > 30, "only {checked} defaults compared");
}

// ---------------------------------------------------------------------------------------
// docs/CLI.md

fn help(bin: &Path, args: &[&str]) -> String {
    let out = Command::new(bin)
        .args(args)
        // clap prints the values of set environment variables (`[env: HOSTNAME=pod-7]`):
        // the page must not depend on the machine that generated it.
        .env_clear()
        .output()
        .unwrap_or_else(|e| panic!("{} {args:?}: {e}", bin.display()));
    assert!(out.status.success(), "{} {args:?} failed", bin.display());
    String::from_utf8(out.stdout).expect("help is UTF-8")
}

/// Subcommand names listed under `Commands:` in a clap help text (`help` excluded).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

fn render_cli_md() -> String {
    let coordinator = PathBuf::from(coordinator());
    let worker = worker();
    assert!(
        worker.exists(),
        "{} not built: run the workspace's tests (cargo test --workspace --profile ci)",
        worker.display()
    );
    let mut out = String::from(
        "# Command-line reference\n\n\
         <!-- Generated from the binaries' --help by coordinator/tests/docs.rs; do not edit by hand.\n     \
         Regenerate: cargo build --profile ci --bin worker &&
     CCQ_BLESS=1 cargo test --profile ci -p ccq-coordinator --test docs -->\n\n\
         Two binaries: `coordinator` (train, evaluate, watch, export, benchmark) and `worker` \
         (evaluates fitness jobs for a coordinator). The run's settings live in its config file \
         ([CONFIG.md](CONFIG.md)); flags cover what differs between invocations of the same run.\n\n",
    );
    let top = help(&coordinator, &["--help"]);
    let subs = subcommands(&top);
    assert!(subs.len() >= 5, "coordinator subcommands: {subs:?}");
    out.push_str("- [`coordinator`](#coordinator)\n");
    for s in &subs {
        writeln!(out, "  - [`coordinator {s}`](#coordinator-{s})").unwrap();
    }
    out.push_str("- [`worker`](#worker)\n\n## coordinator\n\n```text\n");
    out.push_str(&top);
    out.push_str("```\n");
    for s in &subs {
        writeln!(out, "\n### coordinator {s}\n\n```text").unwrap();
        out.push_str(&help(&coordinator, &[s, "--help"]));
        out.push_str("```\n");
    }
    out.push_str("\n## worker\n\n```text\n");
    out.push_str(&help(&worker, &["--help"]));
    out.push_str("```\n");
    out
}

/// Options whose help says nothing (no text, or only clap's `[default: ...]`).
fn undocumented_options(help: &str) -> Vec<String> {
    let lines: Vec<&str> = help.lines().collect();
    let mut missing = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        // An option line: "--long ..." or "-s, --long ...", indented.
        let flag =
            t.starts_with("--") || t.as_bytes().get(1).is_some_and(u8::is_ascii_alphanumeric);
        if !t.starts_with('-') || !flag || line.len() - t.len() < 2 {
            continue;
        }
        // Two columns ("--flag <V>   text") or long help (text on the next, deeper line).
        let same_line = t.split_once("  ").map(|(_, d)| d.trim()).unwrap_or("");
        let next_line = lines
            .get(i + 1)
            .map(|n| n.trim())
            .filter(|n| !n.is_empty() && !n.starts_with('-'))
            .unwrap_or("");
        let text = if same_line.is_empty() {
            next_line
        } else {
            same_line
        };
        if text.is_empty() || text.starts_with('[') {
            missing.push(t.split_whitespace().next().unwrap_or(t).to_string());
        }
    }
    missing
}

#[test]
fn cli_reference_is_generated_from_the_binaries() {
    let md = render_cli_md();
    let missing = undocumented_options(&md);
    assert!(missing.is_empty(), "flags without help text: {missing:?}");
    check_generated("docs/CLI.md", &md);
}

// ---------------------------------------------------------------------------------------
// Links and wording

/// The Markdown pages a reader of the repository sees.
fn pages() -> Vec<PathBuf> {
    let root = repo();
    let mut pages: Vec<PathBuf> = [
        "README.md",
        "ARCHITECTURE.md",
        "CHANGELOG.md",
        "deploy/README.md",
    ]
    .iter()
    .map(|p| root.join(p))
    .collect();
    for dir in ["docs", "examples"] {
        let mut stack = vec![root.join(dir)];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).unwrap().flatten() {
                let p = entry.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|e| e == "md") {
                    pages.push(p);
                }
            }
        }
    }
    pages.sort();
    pages
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut in_code = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        }
        if in_code {
            continue;
        }
        if let Some(h) = line.strip_prefix('#') {
            let base = slug(h.trim_start_matches('#'));
            // GitHub numbers repeated headings: name, name-1, name-2, ...
            let mut name = base.clone();
            let mut n = 0;
            while seen.contains(&name) {
                n += 1;
                name = format!("{base}-{n}");
            }
            seen.insert(name);
        }
    }
    seen
}

/// Targets of inline Markdown links `[text](target)` outside code blocks and code spans.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let mut in_code = false;
    for (no, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        // Drop code spans: a `[x](y)` inside backticks is not a link.
        let plain: String = line.split('`').step_by(2).collect::<Vec<_>>().join(" ");
        let mut rest = plain.as_str();
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let Some(end) = after.find(')') else { break };
            found.push((no + 1, after[..end].trim().to_string()));
            rest = &after[end..];
        }
    }
    found
}

#[test]
fn every_relative_link_in_the_docs_resolves() {
    let pages = pages();
    assert!(pages.len() >= 8, "{pages:?}");
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        for (line, target) in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue; // no network here; external links are not checked
            }
            let (path, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            let file = if path.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(path)
            };
            let at = format!(
                "{}:{line}: {target}",
                page.strip_prefix(repo()).unwrap().display()
            );
            checked += 1;
            if !file.exists() {
                broken.push(format!("{at} (no such file)"));
                continue;
            }
            if let Some(anchor) = anchor {
                let text = std::fs::read_to_string(&file).unwrap_or_default();
                if !anchors(&text).contains(anchor) {
                    broken.push(format!("{at} (no such heading)"));
                }
            }
        }
    }
    assert!(checked > 20, "only {checked} links found");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// Figures name their machine by hardware and builds by commit, never by who measured
/// them or when in the project's history.
#[test]
fn docs_speak_product_language() {
    let mut found = Vec::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        for (no, line) in text.lines().enumerate() {
            let lower = line.to_lowercase();
            if lower.contains("session") || lower.contains("the team's") {
                found.push(format!(
                    "{}:{}: {line}",
                    page.strip_prefix(repo()).unwrap().display(),
                    no + 1
                ));
            }
        }
    }
    assert!(found.is_empty(), "history wording:\n{}", found.join("\n"));
}

#[test]
fn slugs_and_links_parse_like_github() {
    assert_eq!(
        slug(" Training: `coordinator run`"),
        "training-coordinator-run"
    );
    assert_eq!(slug(" What it does, measured"), "what-it-does-measured");
    let a = anchors("# A\n## A\n```\n# not a heading\n```\n### B c\n");
    assert_eq!(
        a,
        ["a", "a-1", "b-c"].iter().map(|s| s.to_string()).collect()
    );
    let help = "Options:\n      --split <SPLIT>  [default: test]\n      --json  Print JSON\n      \
                --config <FILE>\n          The run configuration\n  -h, --help  Print help\n\
                - [a list item](#x)\n      --bare\n";
    assert_eq!(undocumented_options(help), vec!["--split", "--bare"]);
    let l = links("see [x](a.md#b) and `[y](not.md)`\n```\n[z](code.md)\n```\n[w](c/)");
    assert_eq!(l, vec![(1, "a.md#b".to_string()), (5, "c/".to_string())]);
}
