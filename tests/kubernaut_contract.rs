//! Our CRD against Kubernaut's schema facts (tests/fixtures/kubernaut/rr-schema.json): every
//! spec and status path Kubernaut's controllers write exists in ours with the same type and
//! constraints, and ours has no path Kubernaut's lacks — so installing either CRD over the other
//! prunes nothing and validates the same. Also: the orchestrator status the tests write covers
//! every orchestrator-owned path, so "unchanged" in those tests means every field.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

fn facts() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/kubernaut/rr-schema.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn our_version() -> Value {
    let crd = serde_json::to_value(signal_gateway::crd::crd()).unwrap();
    crd["spec"]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "v1alpha1")
        .expect("a v1alpha1 version")
        .clone()
}

/// Every schema of ours by path, in the facts' notation (`[]` array items, `{}` map values).
fn our_paths() -> BTreeMap<String, Value> {
    fn walk(schema: &Value, path: String, out: &mut BTreeMap<String, Value>) {
        if let Some(props) = schema["properties"].as_object() {
            for (k, v) in props {
                walk(v, format!("{path}.{k}"), out);
            }
        }
        if schema["items"].is_object() {
            walk(&schema["items"], format!("{path}[]"), out);
        }
        if schema["additionalProperties"].is_object() {
            walk(&schema["additionalProperties"], format!("{path}{{}}"), out);
        }
        out.insert(path, schema.clone());
    }
    let root = &our_version()["schema"]["openAPIV3Schema"]["properties"];
    let mut out = BTreeMap::new();
    for top in ["spec", "status"] {
        walk(&root[top], format!(".{top}"), &mut out);
    }
    out
}

fn rules(schema: &Value) -> BTreeSet<String> {
    schema["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["rule"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn every_kubernaut_path_is_ours_with_the_same_type_and_constraints() {
    let facts = facts();
    let ours = our_paths();
    let mut findings = Vec::new();
    for (path, want) in facts["paths"].as_object().unwrap() {
        let Some(have) = ours.get(path) else {
            findings.push(format!("missing {path}"));
            continue;
        };
        for key in ["type", "format", "maxLength", "minLength", "pattern", "enum"] {
            if want.get(key) != have.get(key) {
                findings.push(format!(
                    "{path}: {key} is {:?}, Kubernaut's {:?}",
                    have.get(key),
                    want.get(key)
                ));
            }
        }
        if want.get("minimum").and_then(Value::as_f64) != have.get("minimum").and_then(Value::as_f64) {
            findings.push(format!("{path}: minimum differs"));
        }
        let required = |s: &Value| -> BTreeSet<String> {
            s["required"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r.as_str().map(str::to_owned))
                .collect()
        };
        if required(want) != required(have) {
            findings.push(format!(
                "{path}: required {:?}, Kubernaut's {:?}",
                required(have),
                required(want)
            ));
        }
        let want_rules: BTreeSet<String> = want["cel"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r.as_str().map(str::to_owned))
            .collect();
        if want_rules != rules(have) {
            findings.push(format!(
                "{path}: CEL rules {:?}, Kubernaut's {want_rules:?}",
                rules(have)
            ));
        }
        if have.get("x-kubernetes-preserve-unknown-fields").is_some() {
            findings.push(format!("{path}: preserves unknown fields (Kubernaut's does not)"));
        }
        if have.get("nullable").is_some() || have.get("default").is_some() {
            findings.push(format!("{path}: nullable/default Kubernaut's schema does not have"));
        }
    }
    for path in ours.keys() {
        if !facts["paths"].as_object().unwrap().contains_key(path) {
            findings.push(format!("extra {path}: Kubernaut's CRD would prune it"));
        }
    }
    assert!(
        findings.is_empty(),
        "{} findings:\n{}",
        findings.len(),
        findings.join("\n")
    );
}

#[test]
fn kubernauts_selectable_fields_and_printer_columns_are_ours() {
    let facts = facts();
    let version = our_version();
    let selectable: BTreeSet<&str> = version["selectableFields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["jsonPath"].as_str().unwrap())
        .collect();
    for f in facts["selectableFields"].as_array().unwrap() {
        assert!(selectable.contains(f.as_str().unwrap()), "selectableFields lacks {f}");
    }
    let columns: BTreeSet<(String, String, String)> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].to_string(), c["type"].to_string(), c["jsonPath"].to_string()))
        .collect();
    for c in facts["printerColumns"].as_array().unwrap() {
        let want = (c["name"].to_string(), c["type"].to_string(), c["jsonPath"].to_string());
        assert!(columns.contains(&want), "printer column {c} missing");
    }
}

#[test]
fn the_tests_orchestrator_status_sets_every_orchestrator_owned_path() {
    fn walk(v: &Value, path: String, out: &mut BTreeSet<String>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    walk(v, format!("{path}.{k}"), out);
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, format!("{path}[]"), out)),
            _ => {}
        }
        out.insert(path);
    }
    let mut set = BTreeSet::new();
    walk(&common::orchestrator_status(), ".status".into(), &mut set);
    let facts = facts();
    let missing: Vec<&String> = facts["paths"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|p| p.starts_with(".status") && !p.starts_with(".status.deduplication"))
        .filter(|p| !set.contains(*p))
        .collect();
    assert!(missing.is_empty(), "orchestrator_status() leaves unset: {missing:?}");
}
