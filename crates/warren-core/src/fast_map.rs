//! The hash map of the routing path's name lookups.

use std::collections::HashMap;

/// A `HashMap` hashed with foldhash rather than std's SipHash. Every publish looks up its
/// exchange, and its routing key's words or queue, by name; SipHash was a quarter of a
/// topic match (callgrind) and the criterion match bench halved without it. foldhash is
/// seeded per process, as std's map is, so a peer cannot pick names that collide.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
