//! RabbitMQ's list query parameters: `page`, `page_size`, `name`, `use_regex`, `sort`,
//! `sort_reverse`, `columns`.
//!
//! Without `page` a list is a plain JSON array; with it, an object
//! `{items, page, page_count, page_size, filtered_count, item_count, total_count}`.
//! Lists are sorted by (vhost, name) unless `sort` names a field. For the big lists
//! (queues, exchanges) the filter and the page are taken on the names first, and only the
//! page's items are rendered: listing 100k queues page by page costs a sort of names, not
//! 100k JSON objects per request.

use std::collections::HashMap;

use regex::Regex;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// RabbitMQ's upper bound on `page_size`.
pub const MAX_PAGE_SIZE: usize = 500;

/// Parsed list parameters.
#[derive(Debug, Default)]
pub struct ListParams {
    pub page: Option<usize>,
    pub page_size: usize,
    name: Option<NameFilter>,
    pub sort: Option<String>,
    pub sort_reverse: bool,
    pub columns: Option<Vec<String>>,
}

#[derive(Debug)]
enum NameFilter {
    Regex(Regex),
    /// Case-insensitive substring, as RabbitMQ's plain `name` filter.
    Contains(String),
}

impl ListParams {
    pub fn parse(q: &HashMap<String, String>) -> Result<Self, ApiError> {
        let int = |k: &str| -> Result<Option<usize>, ApiError> {
            match q.get(k) {
                None => Ok(None),
                Some(s) => s
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .map(Some)
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!("{k} must be a positive integer, got '{s}'"))
                    }),
            }
        };
        let page = int("page")?;
        let page_size = int("page_size")?.unwrap_or(100);
        // Without `page` RabbitMQ ignores the page size and the name filter.
        if page.is_some() && page_size > MAX_PAGE_SIZE {
            return Err(ApiError::BadRequest(format!(
                "Page size {page_size} must be no greater than {MAX_PAGE_SIZE}"
            )));
        }
        let use_regex = q.get("use_regex").is_some_and(|v| v == "true");
        let name = match q.get("name").filter(|n| !n.is_empty() && page.is_some()) {
            None => None,
            Some(n) if use_regex => {
                Some(NameFilter::Regex(Regex::new(n).map_err(|e| {
                    ApiError::BadRequest(format!("bad regex: {e}"))
                })?))
            }
            Some(n) => Some(NameFilter::Contains(n.to_lowercase())),
        };
        Ok(ListParams {
            page,
            page_size,
            name,
            sort: q.get("sort").filter(|s| !s.is_empty()).cloned(),
            sort_reverse: q.get("sort_reverse").is_some_and(|v| v == "true"),
            columns: q
                .get("columns")
                .filter(|c| !c.is_empty())
                .map(|c| c.split(',').map(|s| s.trim().to_owned()).collect()),
        })
    }

    pub fn name_matches(&self, name: &str) -> bool {
        match &self.name {
            None => true,
            Some(NameFilter::Regex(r)) => r.is_match(name),
            Some(NameFilter::Contains(s)) => name.to_lowercase().contains(s.as_str()),
        }
    }

    /// Whether the order is (vhost, name) (so items can be paged before rendering).
    pub fn sorted_by_name(&self) -> bool {
        matches!(self.sort.as_deref(), None | Some("name") | Some("vhost"))
    }

    /// Filters, sorts and pages keyed items of which only the page is rendered.
    /// `items` are (vhost, name, item) — the key the default order uses.
    pub fn page_by_name<T>(
        &self,
        mut items: Vec<(String, String, T)>,
        render: impl Fn(&T) -> Value,
    ) -> Result<Value, ApiError> {
        if !self.sorted_by_name() {
            // Equal sort keys stay in (vhost, name) order, as in RabbitMQ (a stable sort
            // follows).
            items.sort_unstable_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
            let rendered: Vec<Value> = items
                .iter()
                .filter(|(_, n, _)| self.name_matches(n))
                .map(|(_, _, t)| render(t))
                .collect();
            let total = items.len();
            return self.finish_rendered(rendered, total);
        }
        let total = items.len();
        items.retain(|(_, n, _)| self.name_matches(n));
        if self.sort.as_deref() == Some("name") {
            items.sort_unstable_by(|a, b| (&a.1, &a.0).cmp(&(&b.1, &b.0)));
        } else {
            items.sort_unstable_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        }
        if self.sort_reverse {
            items.reverse();
        }
        let filtered = items.len();
        let (start, end) = self.window(filtered)?;
        let page: Vec<Value> = items[start..end]
            .iter()
            .map(|(_, _, t)| self.project(render(t)))
            .collect();
        Ok(self.wrap(page, filtered, total))
    }

    /// Filters (on the `name` field), sorts and pages already-rendered items.
    pub fn apply(&self, items: Vec<Value>) -> Result<Value, ApiError> {
        let total = items.len();
        let items: Vec<Value> = items
            .into_iter()
            .filter(|v| self.name_matches(v.get("name").and_then(Value::as_str).unwrap_or("")))
            .collect();
        self.finish_rendered(items, total)
    }

    fn finish_rendered(&self, mut items: Vec<Value>, total: usize) -> Result<Value, ApiError> {
        if let Some(key) = &self.sort {
            items.sort_by(|a, b| compare(lookup(a, key), lookup(b, key)));
        }
        if self.sort_reverse {
            items.reverse();
        }
        let filtered = items.len();
        let (start, end) = self.window(filtered)?;
        let page: Vec<Value> = items
            .into_iter()
            .skip(start)
            .take(end - start)
            .map(|v| self.project(v))
            .collect();
        Ok(self.wrap(page, filtered, total))
    }

    /// The slice of the (filtered) list to return.
    fn window(&self, filtered: usize) -> Result<(usize, usize), ApiError> {
        match self.page {
            None => Ok((0, filtered)),
            Some(p) => {
                let page_count = filtered.div_ceil(self.page_size);
                if p > page_count.max(1) {
                    return Err(ApiError::BadRequest("page out of range".into()));
                }
                let start = ((p - 1) * self.page_size).min(filtered);
                Ok((start, (start + self.page_size).min(filtered)))
            }
        }
    }

    fn wrap(&self, page: Vec<Value>, filtered: usize, total: usize) -> Value {
        match self.page {
            None => Value::Array(page),
            Some(p) => serde_json::json!({
                "filtered_count": filtered,
                "item_count": page.len(),
                "items": page,
                "page": p,
                "page_count": filtered.div_ceil(self.page_size),
                "page_size": self.page_size,
                "total_count": total,
            }),
        }
    }

    /// `columns=name,message_stats.publish`: keeps only those fields.
    fn project(&self, v: Value) -> Value {
        match &self.columns {
            None => v,
            Some(cols) => project_columns(cols, &v),
        }
    }
}

/// Keeps the fields `cols` names (dotted paths reach into nested objects).
pub fn project_columns(cols: &[String], v: &Value) -> Value {
    let mut out = Map::new();
    for c in cols {
        let mut parts = c.split('.');
        let Some(first) = parts.next() else { continue };
        let rest: Vec<&str> = parts.collect();
        let Some(val) = v.get(first) else { continue };
        if rest.is_empty() {
            out.insert(first.to_owned(), val.clone());
        } else if let Some(inner) = rest.iter().try_fold(val, |acc, k| acc.get(*k)) {
            let mut cur = out
                .entry(first.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            for (i, k) in rest.iter().enumerate() {
                let Value::Object(m) = cur else { break };
                if i + 1 == rest.len() {
                    m.insert((*k).to_owned(), inner.clone());
                    break;
                }
                cur = m
                    .entry((*k).to_owned())
                    .or_insert_with(|| Value::Object(Map::new()));
            }
        }
    }
    Value::Object(out)
}

/// RabbitMQ applies `columns` to every GET reply, single objects too
/// (`rabbit_mgmt_util:reply/3` extracts the columns of whatever it sends): `GET
/// /api/queues/%2F/q?columns=name,messages` is `{"name":…,"messages":…}`. Lists project
/// their items themselves (paged or not), so only object replies are projected here.
pub async fn columns_on_objects(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::extract::Query;
    use axum::response::IntoResponse;
    let cols: Option<Vec<String>> = if req.method() == axum::http::Method::GET {
        Query::<HashMap<String, String>>::try_from_uri(req.uri())
            .ok()
            .filter(|q| !q.contains_key("page"))
            .and_then(|q| {
                q.get("columns")
                    .filter(|c| !c.is_empty())
                    .map(|c| c.split(',').map(|s| s.trim().to_owned()).collect())
            })
    } else {
        None
    };
    let resp = next.run(req).await;
    let Some(cols) = cols else { return resp };
    if resp.status() != axum::http::StatusCode::OK {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    // The API's replies are `Json`, already whole in memory: collecting them copies
    // nothing and needs no bound (a 100k-queue list can pass any small one).
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    // Lists (arrays) were projected by their handler: not parsed a second time.
    if bytes.first() != Some(&b'{') {
        return axum::response::Response::from_parts(parts, axum::body::Body::from(bytes));
    }
    let body = match serde_json::from_slice::<Value>(&bytes) {
        Ok(v @ Value::Object(_)) => {
            parts.headers.remove(axum::http::header::CONTENT_LENGTH);
            axum::body::Body::from(project_columns(&cols, &v).to_string())
        }
        _ => axum::body::Body::from(bytes),
    };
    axum::response::Response::from_parts(parts, body)
}

fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |acc, k| acc.get(k))
}

fn compare(a: Option<&Value>, b: Option<&Value>) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    match (a, b) {
        (Some(Value::Number(x)), Some(Value::Number(y))) => x
            .as_f64()
            .partial_cmp(&y.as_f64())
            .unwrap_or(Ordering::Equal),
        (Some(Value::String(x)), Some(Value::String(y))) => x.cmp(y),
        (Some(Value::Bool(x)), Some(Value::Bool(y))) => x.cmp(y),
        (None, Some(_)) => Ordering::Less,
        (Some(_), None) => Ordering::Greater,
        _ => Ordering::Equal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(kv: &[(&str, &str)]) -> ListParams {
        let q = kv
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ListParams::parse(&q).expect("valid params")
    }

    #[test]
    fn pages_like_rabbitmq() {
        let items: Vec<(String, String, u32)> = (0..250)
            .map(|i| ("/".into(), format!("q{i:03}"), i))
            .collect();
        let p = params(&[("page", "3"), ("page_size", "100")]);
        let v = p
            .page_by_name(items, |i| json!({"name": format!("q{i:03}")}))
            .expect("page");
        assert_eq!(v["page"], 3);
        assert_eq!(v["page_count"], 3);
        assert_eq!(v["item_count"], 50);
        assert_eq!(v["filtered_count"], 250);
        assert_eq!(v["total_count"], 250);
        assert_eq!(v["items"][0]["name"], "q200");
    }

    #[test]
    fn filters_and_columns() {
        let items = vec![
            json!({"name": "alpha", "n": 2, "m": {"x": 1, "y": 2}}),
            json!({"name": "beta", "n": 1}),
        ];
        let p = params(&[
            ("name", "^al"),
            ("use_regex", "true"),
            ("page", "1"),
            ("columns", "name,m.x"),
        ]);
        let v = p.apply(items.clone()).expect("list");
        assert_eq!(v["items"], json!([{"name": "alpha", "m": {"x": 1}}]));
        assert_eq!(v["filtered_count"], 1);
        assert_eq!(v["total_count"], 2);
        let p = params(&[("sort", "n")]);
        assert_eq!(p.apply(items).expect("list")[0]["name"], "beta");
    }

    #[test]
    fn bad_params() {
        let q = [("page_size".to_string(), "501".to_string())]
            .into_iter()
            .collect();
        // Without `page` the size is ignored, as RabbitMQ does.
        assert!(ListParams::parse(&q).is_ok());
        let q = [
            ("page".to_string(), "1".to_string()),
            ("page_size".to_string(), "501".to_string()),
        ]
        .into_iter()
        .collect();
        assert!(ListParams::parse(&q).is_err());
        let q = [("page".to_string(), "0".to_string())]
            .into_iter()
            .collect();
        assert!(ListParams::parse(&q).is_err());
        let p = params(&[("page", "2")]);
        assert!(p.apply(vec![json!({"name": "a"})]).is_err());
    }
}
