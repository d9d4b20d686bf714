//! Documentation that must match the code: every configuration key is documented and the
//! documented file is valid; every exported metric is in docs/metrics.md and vice versa.

mod common;

use std::collections::BTreeSet;

use signal_gateway::config::Config;

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn first_yaml_block(markdown: &str) -> String {
    let start = markdown.find("```yaml\n").expect("a yaml block") + "```yaml\n".len();
    let end = start + markdown[start..].find("```").expect("closed block");
    markdown[start..end].to_owned()
}

fn key_paths(prefix: &str, v: &serde_json::Value, out: &mut BTreeSet<String>) {
    if let serde_json::Value::Object(map) = v {
        for (k, child) in map {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if child.is_object() {
                key_paths(&path, child, out);
            } else {
                out.insert(path);
            }
        }
    }
}

#[test]
fn every_configuration_key_is_documented_and_the_documented_file_is_valid() {
    let doc = read("docs/configuration.md");
    let documented = Config::from_yaml(&first_yaml_block(&doc)).expect("the documented file parses strictly");
    let mut keys = BTreeSet::new();
    key_paths("", &serde_json::to_value(Config::default()).unwrap(), &mut keys);
    assert!(keys.len() > 15, "{keys:?}");
    for key in &keys {
        assert!(
            doc.contains(&format!("`{key}`")),
            "docs/configuration.md lacks a row for `{key}`"
        );
    }
    let (a, b) = (
        serde_json::to_value(&documented).unwrap(),
        serde_json::to_value(Config::default()).unwrap(),
    );
    for key in keys.iter().filter(|k| *k != "backend.namespace") {
        let pick = |v: &serde_json::Value| key.split('.').fold(v.clone(), |v, k| v[k].clone());
        assert_eq!(
            pick(&a),
            pick(&b),
            "the documented default of {key} is not the code's default"
        );
    }
}

fn documented_metrics() -> Vec<(String, String)> {
    read("docs/metrics.md")
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            name.starts_with("gateway_")
                .then(|| (name.to_owned(), cells[2].to_owned()))
        })
        .collect()
}

#[test]
fn docs_metrics_lists_exactly_the_registered_metrics_with_their_types() {
    let (_, catalogue) =
        signal_gateway::metrics::Metrics::register_with_catalogue(&prometheus::Registry::new()).unwrap();
    let mut registered: Vec<(String, String)> = catalogue.into_iter().map(|(n, k)| (n, k.to_owned())).collect();
    let mut documented = documented_metrics();
    registered.sort();
    documented.sort();
    assert_eq!(
        documented, registered,
        "docs/metrics.md and the registered metrics differ"
    );
}

#[tokio::test]
async fn every_metric_served_on_metrics_is_documented() {
    let gw = common::Gateway::embedded(common::test_config()).await;
    let body = common::webhook(vec![common::pod_alert("shop", "a"), common::pod_alert("shop", "a")]);
    gw.alerts(&body).await;
    gw.alerts(&body).await;
    let text = gw.metrics().await;
    let documented = documented_metrics();
    let mut served = 0;
    for line in text.lines().filter(|l| l.starts_with("# TYPE gateway_")) {
        let mut parts = line.split_whitespace().skip(2);
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        assert!(
            documented.iter().any(|(n, k)| n == name && k == kind),
            "{name} ({kind}) is served but not documented"
        );
        served += 1;
    }
    assert!(served >= 15, "only {served} gateway metrics served:\n{text}");
    gw.stop().await.unwrap();
}

/// Markdown files of the repository (not build output or dependencies).
fn markdown_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if !name.starts_with('.') && !["target", "results", "node_modules"].contains(&name.as_str()) {
                markdown_files(&path, out);
            }
        } else if name.ends_with(".md") {
            out.push(path);
        }
    }
}

/// Targets of inline links `[text](target)` outside code blocks and code spans.
fn link_targets(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_block = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block {
            continue;
        }
        // Drop code spans so `a[i](x)`-like code is not read as a link.
        let text: String = line.split('`').step_by(2).collect::<Vec<_>>().join(" ");
        let mut rest = text.as_str();
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let Some(end) = after.find(')') else { break };
            out.push(after[..end].trim().to_owned());
            rest = &after[end..];
        }
    }
    out
}

#[test]
fn every_relative_link_in_docs_runbooks_and_readmes_resolves() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    markdown_files(&root, &mut files);
    assert!(files.len() > 20, "markdown files found: {}", files.len());
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for target in link_targets(&text) {
            if target.contains("://") || target.starts_with('#') || target.starts_with("mailto:") {
                continue;
            }
            let path = target.split('#').next().unwrap();
            checked += 1;
            if !file.parent().unwrap().join(path).exists() {
                broken.push(format!("{}: {target}", file.strip_prefix(&root).unwrap().display()));
            }
        }
    }
    assert!(checked > 30, "relative links checked: {checked}");
    assert!(broken.is_empty(), "broken relative links:\n{}", broken.join("\n"));
}
