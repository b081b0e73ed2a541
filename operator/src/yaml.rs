//! A small YAML writer for generated manifests (the CRD): block style, every
//! string double-quoted the JSON way, which YAML reads the same.

use serde_json::Value;

/// Renders `value` as a YAML document.
pub fn to_yaml(value: &Value) -> String {
    let mut out = String::from("---\n");
    write(&mut out, value, 0, false);
    out
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => serde_json::to_string(s).unwrap_or_default(),
        other => other.to_string(),
    }
}

fn is_block(v: &Value) -> bool {
    matches!(v, Value::Object(m) if !m.is_empty()) || matches!(v, Value::Array(a) if !a.is_empty())
}

fn write(out: &mut String, v: &Value, indent: usize, in_list: bool) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(map) if !map.is_empty() => {
            for (i, (k, val)) in map.iter().enumerate() {
                // The first key of a list item shares the "- " line.
                if !(in_list && i == 0) {
                    out.push_str(&pad);
                }
                let key = if k.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && !k.is_empty() {
                    k.clone()
                } else {
                    scalar(&Value::String(k.clone()))
                };
                if is_block(val) {
                    out.push_str(&format!("{key}:\n"));
                    write(out, val, indent + 2, false);
                } else {
                    out.push_str(&format!("{key}: {}\n", inline(val)));
                }
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for item in items {
                out.push_str(&pad);
                out.push_str("- ");
                if is_block(item) {
                    if item.is_array() {
                        out.push('\n');
                        write(out, item, indent + 2, false);
                    } else {
                        write(out, item, indent + 2, true);
                    }
                } else {
                    out.push_str(&format!("{}\n", inline(item)));
                }
            }
        }
        other => out.push_str(&format!("{pad}{}\n", inline(other))),
    }
}

fn inline(v: &Value) -> String {
    match v {
        Value::Object(_) => "{}".into(),
        Value::Array(_) => "[]".into(),
        other => scalar(other),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn renders_nested_maps_and_lists() {
        let v = json!({"a": {"b": [1, {"c": "x: y", "d": []}, ["n"]], "e": {}}, "f g": true});
        let y = to_yaml(&v);
        assert_eq!(
            y,
            "---\na:\n  b:\n    - 1\n    - c: \"x: y\"\n      d: []\n    - \n      - \"n\"\n  e: {}\n\"f g\": true\n"
        );
    }
}
