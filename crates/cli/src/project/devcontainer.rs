//! The part of `devcontainer.json` (JSON with comments and trailing commas) that maps cleanly
//! onto a wick VM: `image`, `postCreateCommand` (the setup, baked into an image once),
//! `forwardPorts` (published on 127.0.0.1), `containerEnv`/`remoteEnv` (the environment of what
//! `vm run` runs) and `remoteUser`. Every other field is named in [`Project::notes`], with its
//! line and column, and ignored; a supported field of the wrong shape is an error.

use anyhow::Result;
use jsonc_parser::ast::{Object, ObjectProp, Value};
use jsonc_parser::common::Ranged;
use jsonc_parser::{CollectOptions, ParseOptions};

use super::{at, check_env_name, line_col, Project};

/// Parses `text`; errors are `LINE:COL: message`.
pub(super) fn parse(text: &str) -> Result<Project> {
    let parsed =
        jsonc_parser::parse_to_ast(text, &CollectOptions::default(), &strict()).map_err(|e| {
            anyhow::anyhow!("{}:{}: {}", e.line_display(), e.column_display(), e.kind())
        })?;
    let Some(Value::Object(root)) = parsed.value else {
        return Err(at(text, 0, "devcontainer.json must hold one JSON object"));
    };
    let mut project = Project::default();
    for prop in &root.properties {
        apply(text, prop, &mut project)?;
    }
    Ok(project)
}

/// JSONC as editors write it (comments, trailing commas), nothing looser.
fn strict() -> ParseOptions {
    ParseOptions {
        allow_comments: true,
        allow_trailing_commas: true,
        allow_loose_object_property_names: false,
        allow_missing_commas: false,
        allow_single_quoted_strings: false,
        allow_hexadecimal_numbers: false,
        ..ParseOptions::default()
    }
}

fn apply(text: &str, prop: &ObjectProp, p: &mut Project) -> Result<()> {
    let key = prop.name.as_str();
    let v = &prop.value;
    match key {
        "image" => p.image = Some(string(text, key, v)?),
        "remoteUser" => p.user = Some(string(text, key, v)?),
        "postCreateCommand" => p.setup.commands = commands(text, key, v)?,
        "forwardPorts" => p.ports = ports(text, v, &mut p.notes)?,
        "containerEnv" | "remoteEnv" => env(text, key, v, p)?,
        other => {
            let (line, col) = line_col(text, prop.range().start);
            p.notes.push(format!(
                "{line}:{col}: `{other}` is not supported by wick; ignored"
            ));
        }
    }
    Ok(())
}

fn string(text: &str, key: &str, v: &Value) -> Result<String> {
    match v {
        Value::StringLit(s) if !s.value.trim().is_empty() => Ok(s.value.to_string()),
        _ => Err(at(
            text,
            v.range().start,
            format!("{key} must be a non-empty string"),
        )),
    }
}

/// A lifecycle command: a shell string, an argv array (quoted for the shell), or an object of
/// named commands (each one, in order).
fn commands(text: &str, key: &str, v: &Value) -> Result<Vec<String>> {
    match v {
        Value::Object(obj) => obj
            .properties
            .iter()
            .map(|prop| command(text, key, &prop.value))
            .collect(),
        v => Ok(vec![command(text, key, v)?]),
    }
}

fn command(text: &str, key: &str, v: &Value) -> Result<String> {
    match v {
        Value::StringLit(s) => Ok(s.value.to_string()),
        Value::Array(a) if !a.elements.is_empty() => {
            let words: Result<Vec<String>> = a
                .elements
                .iter()
                .map(|e| string(text, key, e).map(|s| quote(&s)))
                .collect();
            Ok(words?.join(" "))
        }
        _ => Err(at(
            text,
            v.range().start,
            format!("{key} must be a string, an array of strings or an object of them"),
        )),
    }
}

/// `word` as one POSIX shell word.
fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    match plain {
        true => word.to_string(),
        false => format!("'{}'", word.replace('\'', r"'\''")),
    }
}

/// `forwardPorts`: numbers become `N:N` on 127.0.0.1; `"host:port"` entries name a service host,
/// which wick has no use for: noted and skipped.
fn ports(text: &str, v: &Value, notes: &mut Vec<String>) -> Result<Vec<String>> {
    let Value::Array(a) = v else {
        return Err(at(text, v.range().start, "forwardPorts must be an array"));
    };
    let mut out = Vec::new();
    for e in &a.elements {
        let port = match e {
            Value::NumberLit(n) => n.value.parse::<u16>().ok().filter(|p| *p > 0),
            Value::StringLit(s) => {
                let (line, col) = line_col(text, e.range().start);
                notes.push(format!(
                    "{line}:{col}: forwardPorts entry \"{}\" (host:port) is not supported; ignored",
                    s.value
                ));
                continue;
            }
            _ => None,
        };
        let Some(port) = port else {
            return Err(at(
                text,
                e.range().start,
                "forwardPorts: not a port (1-65535)",
            ));
        };
        out.push(format!("{port}:{port}"));
    }
    Ok(out)
}

/// `containerEnv`/`remoteEnv`: string values; `${...}` substitutions are not expanded by wick,
/// so such a variable is noted and skipped rather than passed on half-done.
fn env(text: &str, key: &str, v: &Value, p: &mut Project) -> Result<()> {
    let Value::Object(Object { properties, .. }) = v else {
        return Err(at(
            text,
            v.range().start,
            format!("{key} must be an object"),
        ));
    };
    for prop in properties {
        let name = prop.name.as_str();
        check_env_name(text, prop.range().start, key, name)?;
        let value = match &prop.value {
            Value::StringLit(s) => s.value.to_string(),
            other => {
                return Err(at(
                    text,
                    other.range().start,
                    format!("{key}.{name} must be a string"),
                ))
            }
        };
        if value.contains("${") {
            let (line, col) = line_col(text, prop.range().start);
            p.notes.push(format!(
                "{line}:{col}: {key}.{name} uses a ${{...}} substitution, which wick does not \
                 expand; ignored"
            ));
            continue;
        }
        p.env.retain(|(k, _)| k != name);
        p.env.push((name.to_string(), value));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{
  // A typical file.
  "name": "py",
  "image": "python:3.12-slim",
  "features": { "ghcr.io/devcontainers/features/node:1": {} },
  "forwardPorts": [8000, "db:5432"],
  "postCreateCommand": ["pip", "install", "it's"],
  "containerEnv": { "A": "1", "B": "${localEnv:HOME}" },
  "remoteEnv": { "A": "2" },
  "remoteUser": "vscode",
}"#;

    #[test]
    fn maps_what_it_can_and_names_the_rest() {
        let p = parse(SAMPLE).unwrap();
        assert_eq!(p.image.as_deref(), Some("python:3.12-slim"));
        assert_eq!(p.ports, ["8000:8000"]);
        assert_eq!(p.setup.commands, [r"pip install 'it'\''s'"]);
        assert_eq!(p.env, [("A".to_string(), "2".to_string())]);
        assert_eq!(p.user.as_deref(), Some("vscode"));
        let notes = p.notes.join("\n");
        for want in [
            "3:3: `name` is not supported",
            "5:3: `features` is not supported",
            "6:26: forwardPorts entry \"db:5432\"",
            "8:31: containerEnv.B uses a ${...} substitution",
        ] {
            assert!(notes.contains(want), "{want} in:\n{notes}");
        }
        assert_eq!(p.notes.len(), 4, "{notes}");
    }

    #[test]
    fn command_forms() {
        let p = parse(r#"{"postCreateCommand": {"a": "make", "b": ["echo", "x y"]}}"#).unwrap();
        assert_eq!(p.setup.commands, ["make", "echo 'x y'"]);
    }

    #[test]
    fn errors_carry_line_and_column() {
        for (text, want) in [
            ("{\n  \"image\": 3\n}", "2:12: image must be"),
            (
                "{\"forwardPorts\": [70000]}",
                "1:19: forwardPorts: not a port",
            ),
            (
                "{\"forwardPorts\": 80}",
                "1:18: forwardPorts must be an array",
            ),
            (
                "{\"remoteEnv\": {\"A-B\": \"x\"}}",
                "1:16: remoteEnv: `A-B`",
            ),
            (
                "{\"postCreateCommand\": 1}",
                "1:23: postCreateCommand must be",
            ),
            ("{\n\"image\": \"x\"\n\"name\": 1}", "2:13: Expected comma"),
            ("[1]", "1:1: devcontainer.json must hold one JSON object"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.starts_with(want), "{text:?}: {err}");
        }
    }
}
