//! Exchanges and their bindings: direct, fanout, topic (trie) and headers.

use crate::RoutingKey;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use amq_protocol_types::{AMQPValue, FieldTable, ShortString};
use arc_swap::ArcSwapOption;
use parking_lot::RwLock;

use crate::error::{CoreError, CoreResult};
use crate::fast_map::FastMap;
use crate::policies::Policy;
use crate::queue::Queue;
use crate::topic::TopicTrie;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeKind {
    Direct,
    Fanout,
    Topic,
    Headers,
}

/// Names RabbitMQ answers with "invalid exchange type" (atoms of a running node), checked
/// against RabbitMQ 3.10.
const ERLANG_ATOMS: &[&str] = &[
    "none",
    "undefined",
    "true",
    "false",
    "ok",
    "error",
    "classic",
    "quorum",
    "stream",
    "queue",
    "exchange",
    "all",
    "local",
    "global",
];

impl ExchangeKind {
    pub fn parse(s: &str) -> CoreResult<Self> {
        match s {
            "direct" => Ok(Self::Direct),
            "fanout" => Ok(Self::Fanout),
            "topic" => Ok(Self::Topic),
            "headers" => Ok(Self::Headers),
            other => {
                // RabbitMQ says "invalid" for a name that is an atom its node already has
                // and "unknown" for any other (rabbit_exchange:check_type); clients' tests
                // match the words, so the usual atoms get RabbitMQ's.
                let word = if ERLANG_ATOMS.contains(&other) {
                    "invalid"
                } else {
                    "unknown"
                };
                Err(CoreError::new(
                    crate::ErrorKind::CommandInvalid,
                    format!("{word} exchange type '{other}'"),
                ))
            }
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Fanout => "fanout",
            Self::Topic => "topic",
            Self::Headers => "headers",
        }
    }
}

/// Where a binding leads.
#[derive(Clone, Debug)]
pub enum Target {
    Queue(Arc<Queue>),
    /// Exchange-to-exchange binding, resolved by name at routing time (names, not `Arc`s,
    /// so cycles of exchanges cannot leak).
    Exchange(ShortString),
}

impl PartialEq for Target {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Target::Queue(a), Target::Queue(b)) => Arc::ptr_eq(a, b),
            (Target::Exchange(a), Target::Exchange(b)) => a == b,
            _ => false,
        }
    }
}

impl Target {
    pub fn name(&self) -> &str {
        match self {
            Target::Queue(q) => q.name.as_str(),
            Target::Exchange(e) => e.as_str(),
        }
    }
    pub fn is_queue(&self) -> bool {
        matches!(self, Target::Queue(_))
    }
}

/// One binding as declared.
#[derive(Clone, Debug)]
pub struct Binding {
    pub target: Target,
    pub routing_key: RoutingKey,
    pub arguments: FieldTable,
}

#[derive(Default)]
struct Bindings {
    list: Vec<Binding>,
    direct: FastMap<RoutingKey, Vec<Target>>,
    topic: TopicTrie<Target>,
}

/// An exchange. Immutable apart from its bindings.
pub struct Exchange {
    pub name: ShortString,
    pub kind: ExchangeKind,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
    bindings: RwLock<Bindings>,
    /// Set when deleted: a front-end that keeps the `Arc` (a publisher's last exchange)
    /// must look the name up again.
    deleted: AtomicBool,
    /// The policy in force (crate::policies), if any.
    policy: ArcSwapOption<Policy>,
    /// Messages published to this exchange, and queue deliveries they made (RabbitMQ's
    /// `publish_in` / `publish_out`); relaxed counters, read by the management API.
    publish_in: AtomicU64,
    publish_out: AtomicU64,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish()
    }
}

impl Exchange {
    pub fn new(
        name: ShortString,
        kind: ExchangeKind,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: FieldTable,
    ) -> Self {
        Self {
            name,
            kind,
            durable,
            auto_delete,
            internal,
            arguments,
            bindings: RwLock::new(Bindings::default()),
            deleted: AtomicBool::new(false),
            policy: ArcSwapOption::empty(),
            publish_in: AtomicU64::new(0),
            publish_out: AtomicU64::new(0),
        }
    }

    /// Counts one message published here that reached `routed` queues.
    pub(crate) fn count_publish(&self, routed: usize) {
        self.publish_in.fetch_add(1, Ordering::Relaxed);
        if routed > 0 {
            self.publish_out.fetch_add(routed as u64, Ordering::Relaxed);
        }
    }

    /// (publish_in, publish_out) so far.
    pub fn publish_counts(&self) -> (u64, u64) {
        (
            self.publish_in.load(Ordering::Relaxed),
            self.publish_out.load(Ordering::Relaxed),
        )
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    pub(crate) fn mark_deleted(&self) {
        self.deleted.store(true, Ordering::Release);
    }

    /// Where unroutable messages go: the `alternate-exchange` argument, else the policy's
    /// (the argument wins, as `rabbit_policy:get_arg`).
    pub fn alternate_exchange(&self) -> Option<String> {
        match self.arguments.inner().get("alternate-exchange") {
            Some(AMQPValue::LongString(s)) => {
                std::str::from_utf8(s.as_bytes()).ok().map(str::to_owned)
            }
            Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_owned()),
            _ => self
                .policy
                .load()
                .as_ref()
                .and_then(|p| p.text("alternate-exchange").map(str::to_owned)),
        }
    }

    /// The policy in force, if any.
    pub fn policy(&self) -> Option<Arc<Policy>> {
        self.policy.load_full()
    }

    pub(crate) fn set_policy(&self, p: Option<Arc<Policy>>) {
        self.policy.store(p);
    }

    /// Adds a binding; returns false if an identical one existed.
    pub fn bind(&self, b: Binding) -> bool {
        let mut g = self.bindings.write();
        if g.list.iter().any(|x| same_binding(x, &b)) {
            return false;
        }
        match self.kind {
            ExchangeKind::Direct => g
                .direct
                .entry(b.routing_key.clone())
                .or_default()
                .push(b.target.clone()),
            ExchangeKind::Topic => g.topic.insert(b.routing_key.as_str(), b.target.clone()),
            ExchangeKind::Fanout | ExchangeKind::Headers => {}
        }
        g.list.push(b);
        true
    }

    /// Removes a binding; returns whether it existed.
    pub fn unbind(&self, target: &Target, routing_key: &str, arguments: &FieldTable) -> bool {
        let mut g = self.bindings.write();
        let probe = Binding {
            target: target.clone(),
            routing_key: routing_key.into(),
            arguments: arguments.clone(),
        };
        let Some(pos) = g.list.iter().position(|x| same_binding(x, &probe)) else {
            return false;
        };
        let b = g.list.remove(pos);
        self.unindex(&mut g, &b);
        true
    }

    fn unindex(&self, g: &mut Bindings, b: &Binding) {
        match self.kind {
            ExchangeKind::Direct => {
                if let Some(v) = g.direct.get_mut(&b.routing_key) {
                    if let Some(i) = v.iter().position(|t| *t == b.target) {
                        v.remove(i);
                    }
                    if v.is_empty() {
                        g.direct.remove(&b.routing_key);
                    }
                }
            }
            ExchangeKind::Topic => {
                // Another binding with the same key and target but other arguments keeps
                // the trie entry alive.
                if !g
                    .list
                    .iter()
                    .any(|x| x.target == b.target && x.routing_key == b.routing_key)
                {
                    g.topic.remove(b.routing_key.as_str(), &b.target);
                }
            }
            ExchangeKind::Fanout | ExchangeKind::Headers => {}
        }
    }

    /// Removes every binding to `target` (its queue or exchange was deleted).
    pub fn unbind_target(&self, target: &Target) -> usize {
        let mut g = self.bindings.write();
        let (gone, keep): (Vec<Binding>, Vec<Binding>) = std::mem::take(&mut g.list)
            .into_iter()
            .partition(|b| b.target == *target);
        g.list = keep;
        for b in &gone {
            self.unindex(&mut g, b);
        }
        gone.len()
    }

    pub fn bindings(&self) -> Vec<Binding> {
        self.bindings.read().list.clone()
    }

    pub fn has_bindings(&self) -> bool {
        !self.bindings.read().list.is_empty()
    }

    /// Appends the direct targets of a message with `routing_key` and `headers`.
    pub fn route(&self, routing_key: &str, headers: Option<&FieldTable>, out: &mut Vec<Target>) {
        let g = self.bindings.read();
        match self.kind {
            ExchangeKind::Direct => {
                if let Some(v) = g.direct.get(routing_key) {
                    out.extend(v.iter().cloned());
                }
            }
            ExchangeKind::Fanout => out.extend(g.list.iter().map(|b| b.target.clone())),
            ExchangeKind::Topic => g.topic.matches(routing_key, out),
            ExchangeKind::Headers => {
                for b in &g.list {
                    if headers_match(&b.arguments, headers) {
                        out.push(b.target.clone());
                    }
                }
            }
        }
    }
}

fn same_binding(a: &Binding, b: &Binding) -> bool {
    a.target == b.target && a.routing_key == b.routing_key && a.arguments == b.arguments
}

/// Headers-exchange match as RabbitMQ: `x-match` `all` (default) or `any`, and the
/// `-with-x` variants that also compare `x-` headers; a void binding value only asks for
/// presence.
pub fn headers_match(binding: &FieldTable, headers: Option<&FieldTable>) -> bool {
    let mode = match binding.inner().get("x-match") {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(s)) => s.as_str().to_owned(),
        _ => "all".to_owned(),
    };
    let (any, with_x) = match mode.as_str() {
        "any" => (true, false),
        "any-with-x" => (true, true),
        "all-with-x" => (false, true),
        _ => (false, false),
    };
    let empty = FieldTable::default();
    let headers = headers.unwrap_or(&empty).inner();
    for (k, v) in binding.inner() {
        if k.as_str() == "x-match" || (!with_x && k.as_str().starts_with("x-")) {
            continue;
        }
        let hit = match headers.get(k) {
            None => false,
            Some(h) => matches!(v, AMQPValue::Void) || values_equal(v, h),
        };
        if any && hit {
            return true;
        }
        if !any && !hit {
            return false;
        }
    }
    !any
}

/// Equality across the string and integer encodings different clients choose.
fn values_equal(a: &AMQPValue, b: &AMQPValue) -> bool {
    if a == b {
        return true;
    }
    match (as_text(a), as_text(b)) {
        (Some(x), Some(y)) => return x == y,
        (None, None) => {}
        _ => return false,
    }
    match (as_int(a), as_int(b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

fn as_text(v: &AMQPValue) -> Option<&[u8]> {
    match v {
        AMQPValue::LongString(s) => Some(s.as_bytes()),
        AMQPValue::ShortString(s) => Some(s.as_str().as_bytes()),
        _ => None,
    }
}

fn as_int(v: &AMQPValue) -> Option<i128> {
    Some(match v {
        AMQPValue::ShortShortInt(i) => *i as i128,
        AMQPValue::ShortShortUInt(i) => *i as i128,
        AMQPValue::ShortInt(i) => *i as i128,
        AMQPValue::ShortUInt(i) => *i as i128,
        AMQPValue::LongInt(i) => *i as i128,
        AMQPValue::LongUInt(i) => *i as i128,
        AMQPValue::LongLongInt(i) => *i as i128,
        AMQPValue::Timestamp(i) => *i as i128,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol_types::LongString;

    fn table(kv: &[(&str, &str)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in kv {
            t.insert(
                (*k).into(),
                AMQPValue::LongString(LongString::from(v.as_bytes())),
            );
        }
        t
    }

    #[test]
    fn headers_all_and_any() {
        let all = table(&[("x-match", "all"), ("a", "1"), ("b", "2")]);
        let any = table(&[("x-match", "any"), ("a", "1"), ("b", "2")]);
        let both = table(&[("a", "1"), ("b", "2"), ("c", "3")]);
        let one = table(&[("a", "1")]);
        let wrong = table(&[("a", "2")]);
        assert!(headers_match(&all, Some(&both)));
        assert!(!headers_match(&all, Some(&one)));
        assert!(headers_match(&any, Some(&one)));
        assert!(!headers_match(&any, Some(&wrong)));
        assert!(!headers_match(&any, None));
        assert!(
            headers_match(&table(&[]), None),
            "all with no conditions matches"
        );
    }

    #[test]
    fn short_and_long_strings_compare_equal() {
        let mut b = FieldTable::default();
        b.insert("k".into(), AMQPValue::ShortString("v".into()));
        assert!(headers_match(&b, Some(&table(&[("k", "v")]))));
    }
}
