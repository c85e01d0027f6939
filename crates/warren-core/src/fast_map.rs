//! The hash maps of per-message lookups.

use std::collections::{HashMap, HashSet};

/// A `HashMap` hashed with foldhash rather than std's SipHash. Every publish looks up its
/// exchange, its routing key's words or queue, and its channel or subscription; SipHash
/// was a quarter of a topic match and an eighth of an AMQP message's broker instructions
/// (callgrind). foldhash is seeded per process, as std's map is, so a peer cannot pick
/// names that collide.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A `HashSet` hashed as [`FastMap`].
pub type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;
