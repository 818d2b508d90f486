//! Create and update forms generated from a kind's JSON Schema (the one ListKinds gives).
//!
//! Each top-level property of the schema becomes one input: an `enum` a select, a string a
//! text input (`format: email` an e-mail input), an integer or number a number input, a
//! boolean a checkbox, anything else (arrays, objects) a textarea holding JSON. The form
//! turns back into a spec with as little judgement as possible: a number that does not parse
//! is sent as the text it is, so that the API's schema check — the one every client meets —
//! names the problem. Only JSON that does not parse is refused here, because it cannot be sent
//! at all.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::client::FieldError;

/// Form field names of spec values start with this, so they never meet the form's own fields.
pub const SPEC_PREFIX: &str = "spec.";

/// What kind of input a property gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// One of these values.
    Select(Vec<String>),
    /// Text (`email` for e-mail addresses).
    Text {
        /// The input's type attribute: `text` or `email`.
        html_type: &'static str,
        /// `maxlength`, if the schema sets one.
        max_length: Option<u64>,
    },
    /// A whole number.
    Integer {
        /// `min`.
        min: Option<i64>,
        /// `max`.
        max: Option<i64>,
    },
    /// A number.
    Number,
    /// A checkbox.
    Boolean,
    /// JSON in a textarea.
    Json,
}

/// One input of a form.
#[derive(Debug, Clone)]
pub struct Field {
    /// The property's name.
    pub name: String,
    /// The form field's name (`spec.` + name).
    pub form_name: String,
    /// The input.
    pub input: Input,
    /// The schema requires it.
    pub required: bool,
    /// The schema's description.
    pub description: String,
    /// It cannot change once the resource exists (shown read-only on the update form).
    pub immutable: bool,
    /// The value shown (as text).
    pub value: String,
    /// Whether a checkbox is checked.
    pub checked: bool,
    /// What the API (or the form) said about it.
    pub errors: Vec<String>,
}

impl Field {
    /// The options of a select, each with whether it is chosen.
    pub fn options(&self) -> Vec<(String, bool)> {
        match &self.input {
            Input::Select(values) => values
                .iter()
                .map(|v| (v.clone(), *v == self.value))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The input's template name: `select`, `text`, `integer`, `number`, `boolean`, `json`.
    pub fn widget(&self) -> &'static str {
        match self.input {
            Input::Select(_) => "select",
            Input::Text { .. } => "text",
            Input::Integer { .. } => "integer",
            Input::Number => "number",
            Input::Boolean => "boolean",
            Input::Json => "json",
        }
    }

    /// The text input's type attribute.
    pub fn html_type(&self) -> &'static str {
        match self.input {
            Input::Text { html_type, .. } => html_type,
            _ => "text",
        }
    }

    /// `maxlength` as text, empty when unlimited.
    pub fn max_length(&self) -> String {
        match self.input {
            Input::Text {
                max_length: Some(n),
                ..
            } => n.to_string(),
            _ => String::new(),
        }
    }

    /// `min` as text, empty when unbounded.
    pub fn min(&self) -> String {
        match self.input {
            Input::Integer { min: Some(n), .. } => n.to_string(),
            _ => String::new(),
        }
    }

    /// `max` as text, empty when unbounded.
    pub fn max(&self) -> String {
        match self.input {
            Input::Integer { max: Some(n), .. } => n.to_string(),
            _ => String::new(),
        }
    }
}

/// The fields of `schema`'s top-level properties, in the schema's order (required first), with
/// the values of `spec` when given.
pub fn fields(schema: &Value, immutable: &[String], spec: Option<&Value>) -> Vec<Field> {
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let Some(props) = schema.get("properties").and_then(Value::as_object) else {
        return Vec::new();
    };
    let mut out: Vec<Field> = props
        .iter()
        .map(|(name, p)| {
            let input = input_of(p);
            let current = spec.and_then(|s| s.get(name));
            let (value, checked) = match (&input, current) {
                (Input::Boolean, v) => (String::new(), v.and_then(Value::as_bool).unwrap_or(false)),
                (Input::Json, Some(v)) => {
                    (serde_json::to_string_pretty(v).unwrap_or_default(), false)
                }
                (_, Some(Value::String(s))) => (s.clone(), false),
                (_, Some(v)) => (v.to_string(), false),
                (Input::Select(values), None) => (
                    p.get("default")
                        .and_then(Value::as_str)
                        .or(values.first().map(String::as_str))
                        .unwrap_or_default()
                        .to_owned(),
                    false,
                ),
                (_, None) => (p.get("default").map(text_of).unwrap_or_default(), false),
            };
            Field {
                name: name.clone(),
                form_name: format!("{SPEC_PREFIX}{name}"),
                input,
                required: required.contains(&name.as_str()),
                description: p
                    .get("description")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                immutable: immutable.iter().any(|f| f == name),
                value,
                checked,
                errors: Vec::new(),
            }
        })
        .collect();
    // Required first, each group in the schema's (alphabetical, as serde_json keeps it) order.
    out.sort_by_key(|f| !f.required);
    out
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn input_of(p: &Value) -> Input {
    if let Some(values) = p.get("enum").and_then(Value::as_array) {
        let values: Vec<String> = values
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect();
        if !values.is_empty() {
            return Input::Select(values);
        }
    }
    match p.get("type").and_then(Value::as_str) {
        Some("string") => Input::Text {
            html_type: if p.get("format").and_then(Value::as_str) == Some("email") {
                "email"
            } else {
                "text"
            },
            max_length: p.get("maxLength").and_then(Value::as_u64),
        },
        Some("integer") => Input::Integer {
            min: p.get("minimum").and_then(Value::as_i64),
            max: p.get("maximum").and_then(Value::as_i64),
        },
        Some("number") => Input::Number,
        Some("boolean") => Input::Boolean,
        _ => Input::Json,
    }
}

/// The spec a submitted form describes, and the fields whose JSON did not parse. `fields` get
/// the submitted values (to show the form again if the API refuses it).
pub fn spec_of(fields: &mut [Field], form: &HashMap<String, String>) -> (Value, Vec<FieldError>) {
    let mut spec = Map::new();
    let mut errors = Vec::new();
    for f in fields.iter_mut() {
        let raw = form
            .get(&f.form_name)
            .map(String::as_str)
            .unwrap_or_default();
        if f.input == Input::Boolean {
            f.checked = !raw.is_empty();
            spec.insert(f.name.clone(), Value::Bool(f.checked));
            continue;
        }
        f.value = raw.to_owned();
        let text = raw.trim();
        if text.is_empty() {
            // Left empty: not part of the spec (the schema says whether it must be).
            continue;
        }
        let value = match &f.input {
            Input::Select(_) | Input::Text { .. } => Value::String(raw.to_owned()),
            Input::Integer { .. } => text
                .parse::<i64>()
                .map(Value::from)
                .unwrap_or_else(|_| Value::String(text.to_owned())),
            Input::Number => text
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map(Value::Number)
                .unwrap_or_else(|| Value::String(text.to_owned())),
            Input::Json => match serde_json::from_str::<Value>(text) {
                Ok(v) => v,
                Err(e) => {
                    errors.push(FieldError {
                        field: format!("resource.spec.{}", f.name),
                        description: format!("is not valid JSON: {e}"),
                    });
                    continue;
                }
            },
            Input::Boolean => continue,
        };
        spec.insert(f.name.clone(), value);
    }
    (Value::Object(spec), errors)
}

/// Hands each error to its field (`resource.spec.records[0].ttl` belongs to `records`); the
/// ones that belong to no field are returned, to be shown above the form.
pub fn place_errors(fields: &mut [Field], errors: &[FieldError]) -> Vec<String> {
    let mut rest = Vec::new();
    for e in errors {
        let path = e.field.strip_prefix("resource.spec.");
        let target = path.and_then(|p| {
            let head = p.split(['.', '[']).next().unwrap_or(p);
            fields.iter_mut().find(|f| f.name == head)
        });
        match target {
            Some(f) => {
                let inner = path.unwrap_or_default();
                if inner == f.name {
                    f.errors.push(e.description.clone());
                } else {
                    f.errors.push(format!("{inner}: {}", e.description));
                }
            }
            None => rest.push(format!("{}: {}", e.field, e.description)),
        }
    }
    rest
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn schema() -> Value {
        json!({
            "type": "object",
            "required": ["plan", "size_gb"],
            "properties": {
                "plan": {"enum": ["kvx.small", "kvx.large"], "description": "size class"},
                "size_gb": {"type": "integer", "minimum": 1, "maximum": 100},
                "owner_email": {"type": "string", "format": "email", "maxLength": 254},
                "records": {"type": "array"},
                "public": {"type": "boolean"}
            }
        })
    }

    #[test]
    fn a_schema_becomes_inputs_and_a_form_becomes_a_spec() {
        let mut f = fields(&schema(), &["plan".into()], None);
        let names: Vec<_> = f.iter().map(|f| (f.name.as_str(), f.widget())).collect();
        assert_eq!(
            names,
            [
                ("plan", "select"),
                ("size_gb", "integer"),
                ("owner_email", "text"),
                ("public", "boolean"),
                ("records", "json")
            ]
        );
        assert_eq!(f[0].value, "kvx.small");
        assert!(f[0].immutable && f[0].required);
        assert_eq!((f[1].min(), f[1].max()), ("1".into(), "100".into()));
        assert_eq!(f[2].html_type(), "email");
        let form: HashMap<String, String> = [
            ("spec.plan", "kvx.large"),
            ("spec.size_gb", "12"),
            ("spec.owner_email", "<script>alert(1)</script>"),
            ("spec.public", "on"),
            ("spec.records", "[{\"name\": \"www\"}]"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let (spec, errors) = spec_of(&mut f, &form);
        assert!(errors.is_empty());
        assert_eq!(
            spec,
            json!({"plan": "kvx.large", "size_gb": 12, "owner_email": "<script>alert(1)</script>",
                   "public": true, "records": [{"name": "www"}]})
        );
    }

    #[test]
    fn bad_numbers_go_to_the_api_and_bad_json_stays_here() {
        let mut f = fields(&schema(), &[], None);
        let form: HashMap<String, String> = [("spec.size_gb", "ten"), ("spec.records", "[oops")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let (spec, errors) = spec_of(&mut f, &form);
        assert_eq!(spec["size_gb"], "ten");
        assert_eq!(errors.len(), 1);
        let rest = place_errors(
            &mut f,
            &[
                FieldError {
                    field: "resource.spec.size_gb".into(),
                    description: "\"ten\" is not of type \"integer\"".into(),
                },
                FieldError {
                    field: "resource_id".into(),
                    description: "must be a DNS label".into(),
                },
            ],
        );
        assert_eq!(rest, ["resource_id: must be a DNS label"]);
        let size = f.iter().find(|f| f.name == "size_gb").expect("size_gb");
        assert_eq!(size.errors, ["\"ten\" is not of type \"integer\""]);
    }
}
