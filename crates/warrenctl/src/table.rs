//! Plain aligned tables: a header row and left-aligned columns separated by two spaces,
//! easy to read and to `grep`/`awk` (no box drawing).

use serde_json::Value;

/// (header, field) pairs shown for each kind of listing; `--format json` shows every field.
pub fn columns(kind: &str) -> &'static [(&'static str, &'static str)] {
    match kind {
        "queues" => &[
            ("vhost", "vhost"),
            ("name", "name"),
            ("messages", "messages"),
            ("ready", "messages_ready"),
            ("unacked", "messages_unacknowledged"),
            ("consumers", "consumers"),
            ("durable", "durable"),
            ("type", "type"),
        ],
        "exchanges" => &[
            ("vhost", "vhost"),
            ("name", "name"),
            ("type", "type"),
            ("durable", "durable"),
            ("auto_delete", "auto_delete"),
            ("internal", "internal"),
        ],
        "bindings" => &[
            ("vhost", "vhost"),
            ("source", "source"),
            ("destination", "destination"),
            ("destination_type", "destination_type"),
            ("routing_key", "routing_key"),
        ],
        "connections" => &[
            ("name", "name"),
            ("protocol", "protocol"),
            ("user", "user"),
            ("vhost", "vhost"),
            ("channels", "channels"),
            ("state", "state"),
        ],
        "users" => &[("name", "name"), ("tags", "tags")],
        "topic-permissions" => &[
            ("vhost", "vhost"),
            ("user", "user"),
            ("exchange", "exchange"),
            ("write", "write"),
            ("read", "read"),
        ],
        "policies" => &[
            ("vhost", "vhost"),
            ("name", "name"),
            ("pattern", "pattern"),
            ("apply-to", "apply-to"),
            ("definition", "definition"),
            ("priority", "priority"),
        ],
        "vhost-limits" => &[("vhost", "vhost"), ("limits", "value")],
        "user-limits" => &[("user", "user"), ("limits", "value")],
        "vhosts" => &[
            ("name", "name"),
            ("messages", "messages"),
            ("description", "description"),
        ],
        _ => &[("name", "name")],
    }
}

/// One value as text: strings bare, lists comma-separated (RabbitMQ 3.12 gives user tags
/// as a list, older versions as a string), null empty.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

pub fn render(cols: &[(&str, &str)], rows: &[Value]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            cols.iter()
                .map(|(_, k)| cell(r.get(*k).unwrap_or(&Value::Null)))
                .collect()
        })
        .collect();
    let mut widths: Vec<usize> = cols.iter().map(|(h, _)| h.chars().count()).collect();
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |items: Vec<&str>| {
        let mut s = String::new();
        for (i, (item, w)) in items.iter().zip(&widths).enumerate() {
            if i + 1 == items.len() {
                s.push_str(item);
            } else {
                s.push_str(item);
                s.push_str(&" ".repeat(w - item.chars().count() + 2));
            }
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(cols.iter().map(|(h, _)| *h).collect());
    for row in &cells {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn aligns_columns() {
        let rows = vec![
            json!({"name": "a", "tags": ["administrator", "monitoring"]}),
            json!({"name": "longer-name", "tags": ""}),
        ];
        let t = render(columns("users"), &rows);
        assert_eq!(
            t,
            "name         tags\na            administrator,monitoring\nlonger-name\n"
        );
    }
}
