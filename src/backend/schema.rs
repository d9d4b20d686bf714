//! The CRD's OpenAPI schema applied to what the embedded store admits, as the API server applies
//! it: types, required fields, enums, string lengths (in characters), patterns, `date-time` and
//! integer formats, minimums. So a spec the API server would refuse (an empty severity, a
//! missing firingTime, a label value of the wrong type) is refused by the embedded store too, and
//! a unit test on it catches what a test on the real API server would.
//!
//! CEL rules are not evaluated: the only ones in the schema guard updates of the spec (which the
//! gateway never updates) and the orchestrator's `preRemediationSpecHash`.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde_json::Value;

struct Schemas {
    spec: Value,
    status: Value,
    patterns: HashMap<String, regex::Regex>,
}

fn schemas() -> &'static Schemas {
    static SCHEMAS: OnceLock<Schemas> = OnceLock::new();
    SCHEMAS.get_or_init(|| {
        let crd = serde_json::to_value(crate::crd::crd()).expect("the CRD serialises");
        let root = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"];
        let mut patterns = HashMap::new();
        collect_patterns(root, &mut patterns);
        Schemas {
            spec: root["spec"].clone(),
            status: root["status"].clone(),
            patterns,
        }
    })
}

fn collect_patterns(schema: &Value, into: &mut HashMap<String, regex::Regex>) {
    match schema {
        Value::Object(map) => {
            if let Some(Value::String(p)) = map.get("pattern") {
                let re = regex::Regex::new(p).expect("the CRD's patterns are valid regular expressions");
                into.insert(p.clone(), re);
            }
            map.values().for_each(|v| collect_patterns(v, into));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_patterns(v, into)),
        _ => {}
    }
}

/// Checks a spec as the API server would on create; the error reads like its answer.
pub fn validate_spec(spec: &Value) -> Result<(), String> {
    let s = schemas();
    validate(&s.spec, spec, "spec", &s.patterns)
}

/// Checks a status as the API server would on a status write.
pub fn validate_status(status: &Value) -> Result<(), String> {
    let s = schemas();
    validate(&s.status, status, "status", &s.patterns)
}

fn validate(schema: &Value, value: &Value, path: &str, patterns: &HashMap<String, regex::Regex>) -> Result<(), String> {
    let invalid = |why: String| Err(format!("{path}: Invalid value: {why}"));
    match (schema["type"].as_str(), value) {
        (Some("object"), Value::Object(map)) => {
            for required in schema["required"].as_array().into_iter().flatten() {
                let key = required.as_str().unwrap_or_default();
                if !map.contains_key(key) {
                    return Err(format!("{path}.{key}: Required value"));
                }
            }
            for (key, v) in map {
                let inner = format!("{path}.{key}");
                if let Some(s) = schema["properties"].get(key) {
                    validate(s, v, &inner, patterns)?;
                } else if let Some(s) = schema.get("additionalProperties").filter(|s| s.is_object()) {
                    validate(s, v, &inner, patterns)?;
                }
                // Anything else is pruned, not refused (read back through the typed status).
            }
            Ok(())
        }
        (Some("array"), Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                validate(&schema["items"], item, &format!("{path}[{i}]"), patterns)?;
            }
            Ok(())
        }
        (Some("string"), Value::String(s)) => {
            let chars = s.chars().count();
            if let Some(max) = schema["maxLength"].as_u64()
                && chars as u64 > max
            {
                return invalid(format!("may not be more than {max} characters"));
            }
            if let Some(min) = schema["minLength"].as_u64()
                && (chars as u64) < min
            {
                return invalid(format!("should be at least {min} chars long"));
            }
            if let Some(p) = schema["pattern"].as_str()
                && !patterns.get(p).is_some_and(|re| re.is_match(s))
            {
                return invalid(format!("{s:?}: should match '{p}'"));
            }
            if let Some(allowed) = schema["enum"].as_array()
                && !allowed.iter().any(|a| a.as_str() == Some(s))
            {
                return invalid(format!("{s:?}: supported values: {allowed:?}"));
            }
            if schema["format"].as_str() == Some("date-time") && s.parse::<jiff::Timestamp>().is_err() {
                return invalid(format!("{s:?}: must be a date-time"));
            }
            Ok(())
        }
        (Some("integer"), Value::Number(n)) => {
            let Some(i) = n.as_i64() else {
                return invalid(format!("{n}: must be an integer"));
            };
            if schema["format"].as_str() == Some("int32") && i32::try_from(i).is_err() {
                return invalid(format!("{i}: must fit in int32"));
            }
            if let Some(min) = schema["minimum"].as_f64()
                && (i as f64) < min
            {
                return invalid(format!("{i}: should be greater than or equal to {min}"));
            }
            Ok(())
        }
        (Some("boolean"), Value::Bool(_)) => Ok(()),
        (Some(want), got) => invalid(format!("{got}: must be of type {want}")),
        (None, _) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec() -> Value {
        json!({
            "signalFingerprint": "a".repeat(64), "signalName": "A", "severity": "critical",
            "signalType": "alert", "targetType": "kubernetes",
            "targetResource": {"kind": "Pod", "name": "p", "namespace": "n"},
            "firingTime": "2026-11-24T10:00:00Z", "receivedTime": "2026-11-24T10:00:01Z",
        })
    }

    #[test]
    fn a_spec_the_api_server_would_refuse_is_refused() {
        assert_eq!(validate_spec(&spec()), Ok(()));
        let cases = [
            ("severity", json!(""), "spec.severity"),
            ("severity", json!("s".repeat(51)), "spec.severity"),
            ("signalFingerprint", json!("XYZ"), "spec.signalFingerprint"),
            ("targetType", json!("vmware"), "spec.targetType"),
            ("firingTime", json!("yesterday"), "spec.firingTime"),
            ("signalLabels", json!({"a": 1}), "spec.signalLabels.a"),
            ("signalSource", json!("s".repeat(64)), "spec.signalSource"),
        ];
        for (field, value, path) in cases {
            let mut s = spec();
            s[field] = value;
            let err = validate_spec(&s).unwrap_err();
            assert!(err.starts_with(path), "{field}: {err}");
        }
        let mut s = spec();
        s.as_object_mut().unwrap().remove("firingTime");
        assert_eq!(validate_spec(&s).unwrap_err(), "spec.firingTime: Required value");
    }

    #[test]
    fn a_status_is_held_to_the_orchestrators_schema() {
        assert_eq!(
            validate_status(&json!({"overallPhase": "Executing", "deduplication": {"occurrenceCount": 3}})),
            Ok(())
        );
        assert!(validate_status(&json!({"overallPhase": "Dancing"})).is_err());
        assert!(validate_status(&json!({"deduplication": {"occurrenceCount": 5_000_000_000_i64}})).is_err());
        assert!(
            validate_status(&json!({"conditions": [{"type": "Ready"}]})).is_err(),
            "required fields"
        );
        assert_eq!(
            validate_status(&json!({"somethingElse": 1})),
            Ok(()),
            "unknown fields are pruned, not refused"
        );
    }
}
