//! Topic-exchange matching with a trie of binding-key words.
//!
//! Matching walks the routing key's words down the trie, so its cost grows with the key's
//! length and the number of `*`/`#` branches on the way, not with the number of bindings
//! (IoT brokers carry 100k+ subscriptions on `amq.topic`).

use smallvec::SmallVec;

use crate::fast_map::FastMap;

type Children<T> = FastMap<Box<str>, TopicTrie<T>>;

/// A trie node; `T` is what a binding points at.
///
/// Most nodes are leaves with one target (an MQTT device's `cmd/<id>` subscription), so
/// the children map is boxed (8 bytes, not 48, where there are none) and the target list
/// starts with room for one.
#[derive(Debug)]
#[allow(clippy::box_collection)] // the point: 8 bytes in every leaf, not 48
pub struct TopicTrie<T> {
    children: Option<Box<Children<T>>>,
    star: Option<Box<TopicTrie<T>>>,
    hash: Option<Box<TopicTrie<T>>>,
    targets: Vec<T>,
}

impl<T> Default for TopicTrie<T> {
    fn default() -> Self {
        Self {
            children: None,
            star: None,
            hash: None,
            targets: Vec::new(),
        }
    }
}

/// Splits a key into words as RabbitMQ does: `""` has no words, `"a..b"` has an empty one.
pub fn words(key: &str) -> impl Iterator<Item = &str> + Clone {
    let mut it = key.split('.');
    if key.is_empty() {
        it.next();
    }
    it
}

impl<T: PartialEq + Clone> TopicTrie<T> {
    pub fn insert(&mut self, binding_key: &str, target: T) {
        let mut node = self;
        for w in words(binding_key) {
            node = match w {
                "*" => node.star.get_or_insert_with(Default::default),
                "#" => node.hash.get_or_insert_with(Default::default),
                _ => node
                    .children
                    .get_or_insert_with(Default::default)
                    .entry(w.into())
                    .or_default(),
            };
        }
        if !node.targets.contains(&target) {
            if node.targets.capacity() == 0 {
                node.targets.reserve_exact(1);
            }
            node.targets.push(target);
        }
    }

    /// Removes one binding; prunes nodes left empty. Returns whether it was present.
    pub fn remove(&mut self, binding_key: &str, target: &T) -> bool {
        let ws: Vec<&str> = words(binding_key).collect();
        self.remove_at(&ws, target)
    }

    fn remove_at(&mut self, ws: &[&str], target: &T) -> bool {
        let Some((first, rest)) = ws.split_first() else {
            let before = self.targets.len();
            self.targets.retain(|t| t != target);
            return self.targets.len() != before;
        };
        let removed = match *first {
            "*" => prune_box(&mut self.star, rest, target),
            "#" => prune_box(&mut self.hash, rest, target),
            w => {
                let Some(children) = self.children.as_mut() else {
                    return false;
                };
                let Some(child) = children.get_mut(w) else {
                    return false;
                };
                let r = child.remove_at(rest, target);
                if child.is_empty() {
                    children.remove(w);
                    if children.is_empty() {
                        self.children = None;
                    }
                }
                r
            }
        };
        removed
    }

    fn is_empty(&self) -> bool {
        self.targets.is_empty()
            && self.children.is_none()
            && self.star.is_none()
            && self.hash.is_none()
    }

    /// Appends every target whose binding key matches `routing_key` (possibly more than
    /// once; callers dedup).
    pub fn matches(&self, routing_key: &str, out: &mut Vec<T>) {
        // On the stack for keys of up to 16 words; a longer one spills to the heap.
        let ws: SmallVec<[&str; 16]> = words(routing_key).collect();
        self.match_at(&ws, out);
    }

    fn match_at(&self, ws: &[&str], out: &mut Vec<T>) {
        if let Some(h) = &self.hash {
            // `#` takes zero or more words.
            for skip in 0..=ws.len() {
                h.match_at(&ws[skip..], out);
            }
        }
        let Some((first, rest)) = ws.split_first() else {
            out.extend(self.targets.iter().cloned());
            return;
        };
        if let Some(c) = self.children.as_ref().and_then(|c| c.get(*first)) {
            c.match_at(rest, out);
        }
        if let Some(s) = &self.star {
            s.match_at(rest, out);
        }
    }
}

fn prune_box<T: PartialEq + Clone>(
    slot: &mut Option<Box<TopicTrie<T>>>,
    rest: &[&str],
    target: &T,
) -> bool {
    let Some(node) = slot.as_mut() else {
        return false;
    };
    let r = node.remove_at(rest, target);
    if node.is_empty() {
        *slot = None;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(t: &TopicTrie<u32>, key: &str) -> Vec<u32> {
        let mut v = Vec::new();
        t.matches(key, &mut v);
        v.sort();
        v.dedup();
        v
    }

    #[test]
    fn rabbitmq_topic_semantics() {
        let mut t = TopicTrie::default();
        t.insert("a.b.c", 1);
        t.insert("a.*.c", 2);
        t.insert("a.#", 3);
        t.insert("#", 4);
        t.insert("*.b.*", 5);
        t.insert("a.#.c", 6);
        t.insert("", 7);
        t.insert("#.c", 8);
        assert_eq!(m(&t, "a.b.c"), vec![1, 2, 3, 4, 5, 6, 8]);
        assert_eq!(m(&t, "a"), vec![3, 4]);
        assert_eq!(m(&t, "a.c"), vec![3, 4, 6, 8]);
        assert_eq!(m(&t, "a.x.y.c"), vec![3, 4, 6, 8]);
        assert_eq!(m(&t, ""), vec![4, 7]);
        assert_eq!(m(&t, "b.b.b"), vec![4, 5]);
        assert_eq!(m(&t, "c"), vec![4, 8]);
        assert!(t.remove("a.#", &3));
        assert!(!t.remove("a.#", &3));
        assert_eq!(m(&t, "a"), vec![4]);
        for (k, v) in [
            ("a.b.c", 1),
            ("a.*.c", 2),
            ("#", 4),
            ("*.b.*", 5),
            ("a.#.c", 6),
            ("", 7),
            ("#.c", 8),
        ] {
            assert!(t.remove(k, &v));
        }
        assert!(t.is_empty());
    }

    #[test]
    fn many_bindings_match_by_words() {
        let mut t = TopicTrie::default();
        for i in 0..100_000u32 {
            t.insert(&format!("devices.{i}.temp"), i);
        }
        t.insert("devices.*.temp", 1_000_000);
        assert_eq!(m(&t, "devices.42.temp"), vec![42, 1_000_000]);
    }
}
