//! A blocking HTTP/1.1 client for the management API: ureq without TLS or compression (the
//! API is plain HTTP on the management port, and a CLI needs no async runtime).

use std::time::Duration;

use base64::Engine;
use serde_json::Value;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The API answered with an error status; `reason` is its `reason` field when it has one.
    #[error("{method} {path}: HTTP {status}: {reason}")]
    Http {
        method: &'static str,
        path: String,
        status: u16,
        reason: String,
        body: Value,
    },
    /// No answer: connection refused, timeout, bad URL.
    #[error("{0}")]
    Transport(String),
    /// The answer was not what the API documents.
    #[error("unexpected answer: {0}")]
    Protocol(String),
    #[error("{0}")]
    Io(String),
}

impl CtlError {
    pub fn json(e: serde_json::Error) -> Self {
        CtlError::Protocol(e.to_string())
    }
}

pub struct Client {
    agent: ureq::Agent,
    base: String,
    auth: String,
}

impl Client {
    pub fn new(url: &str, user: &str, password: &str) -> Result<Self, CtlError> {
        let base = url.trim_end_matches('/').to_owned();
        if base.starts_with("https://") {
            return Err(CtlError::Transport(
                "https URLs need a TLS build of warrenctl; use the plain http listener".into(),
            ));
        }
        if !base.starts_with("http://") {
            return Err(CtlError::Transport(format!(
                "--url must start with http:// (got {url:?})"
            )));
        }
        let config = ureq::Agent::config_builder()
            // Error statuses carry RabbitMQ's `{"error","reason"}` body: read it ourselves.
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build();
        let cred = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        Ok(Client {
            agent: ureq::Agent::new_with_config(config),
            base,
            auth: format!("Basic {cred}"),
        })
    }

    pub fn get(&self, path: &str) -> Result<Value, CtlError> {
        self.call("GET", path, None)
    }

    pub fn put(&self, path: &str, body: &Value) -> Result<Value, CtlError> {
        self.call("PUT", path, Some(body))
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<Value, CtlError> {
        self.call("POST", path, Some(body))
    }

    pub fn delete(&self, path: &str) -> Result<Value, CtlError> {
        self.call("DELETE", path, None)
    }

    /// One request; the JSON body of a 2xx answer (`Null` when empty), else `Http`.
    fn call(
        &self,
        method: &'static str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, CtlError> {
        let url = format!("{}{path}", self.base);
        let transport = |e: ureq::Error| CtlError::Transport(format!("{method} {url}: {e}"));
        let result = match (method, body) {
            ("GET", _) => self
                .agent
                .get(&url)
                .header("Authorization", &self.auth)
                .call(),
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("Authorization", &self.auth)
                .call(),
            (_, body) => {
                let text = body.map(Value::to_string).unwrap_or_default();
                let req = if method == "PUT" {
                    self.agent.put(&url)
                } else {
                    self.agent.post(&url)
                };
                req.header("Authorization", &self.auth)
                    .header("Content-Type", "application/json")
                    .send(text.as_bytes())
            }
        };
        let mut resp = result.map_err(transport)?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            // Definitions of a large node are big; the default 10 MB cap is too small.
            .limit(1 << 30)
            .read_to_string()
            .map_err(transport)?;
        let json: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if (200..300).contains(&status) {
            return Ok(json);
        }
        let reason = json
            .get("reason")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| match &json {
                Value::String(s) => s.clone(),
                Value::Null => "(no body)".into(),
                v => v.to_string(),
            });
        Err(CtlError::Http {
            method,
            path: path.to_owned(),
            status,
            reason,
            body: json,
        })
    }
}

/// Percent-encodes one path segment: everything but RFC 3986's unreserved characters, so
/// the vhost `/` becomes `%2F` as the API expects.
pub fn enc(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::enc;

    #[test]
    fn encodes_vhost_and_names() {
        assert_eq!(enc("/"), "%2F");
        assert_eq!(enc("a b/c"), "a%20b%2Fc");
        assert_eq!(enc("amq.gen-x_1~"), "amq.gen-x_1~");
        assert_eq!(enc("é"), "%C3%A9");
    }
}
