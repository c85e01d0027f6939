//! Shared subscriptions (`$share/<group>/<filter>`, MQTT 5 §4.8.2; also accepted from
//! 3.1.1 clients, as Mosquitto does): one queue per vhost, group and filter, bound on
//! `amq.topic`, from which every member session consumes (competing consumers).
//!
//! MQTT 5 §4.8.2: "A Shared Subscription's lifetime exists as long as there is at least
//! one Session subscribed to that Shared Subscription", connected or not. So the queue
//! is not auto-delete: it goes when its last member session leaves (UNSUBSCRIBE, or the
//! session ends or expires), and a persistent member's record lists its shared
//! subscriptions so that a resumed session, or a restart, restores them.
//!
//! # Invariants
//! * [`Groups::members`] holds every session, connected or parked, subscribed to a group;
//!   a group's queue exists while its member set is not empty (re-declared when a member
//!   joins or resumes if it is missing).
//! * Joins and leaves are serialised by [`Groups::changing`], so a leave that deletes a
//!   queue never races a join that has just found it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;
use warren_core::{Broker, ConnectionId, FieldTable, Queue, QueueDecl, Target, VHost};

use crate::{topic, MAX_SHORT};

/// The prefix of shared-subscription queue names (Warren's own, beside RabbitMQ's
/// `mqtt-subscription-` of session queues).
const PREFIX: &str = "mqtt-shared-";

/// `$share/<group>/<filter>` split into group and filter (MQTT-4.8.2-1/2: a non-empty
/// group without wildcards, then a non-empty filter); `None` if it is not one.
pub(crate) fn split(full: &str) -> Option<(&str, &str)> {
    let (group, filter) = full.strip_prefix("$share/")?.split_once('/')?;
    if group.is_empty() || group.contains(['+', '#']) || filter.is_empty() {
        return None;
    }
    Some((group, filter))
}

/// The group queue's name; `None` if it would not fit a short string.
pub(crate) fn queue_name(group: &str, filter: &str) -> Option<String> {
    let name = format!("{PREFIX}{group}-{filter}");
    (name.len() <= MAX_SHORT).then_some(name)
}

/// One group queue's members.
struct Group {
    /// The AMQP binding key of the group's filter (to re-declare the queue).
    key: String,
    /// Client ids of the member sessions.
    clients: BTreeSet<String>,
}

/// Shared-subscription membership of every session, by `vhost \0 queue name`.
#[derive(Default)]
pub(crate) struct Groups {
    members: Mutex<HashMap<String, Group>>,
    changing: tokio::sync::Mutex<()>,
}

impl Groups {
    /// Counts a parked session's shared subscription at start-up (from its record).
    pub fn recovered(&self, vhost: &str, client_id: &str, full: &str) {
        let Some((group, filter)) = split(full) else {
            return;
        };
        let Some(name) = queue_name(group, filter) else {
            return;
        };
        self.members
            .lock()
            .entry(format!("{vhost}\0{name}"))
            .or_insert_with(|| Group {
                key: topic::to_amqp(filter),
                clients: BTreeSet::new(),
            })
            .clients
            .insert(client_id.to_owned());
    }

    /// Makes `client_id` a member of the group of `full` and returns its queue, declared
    /// (durable for a persistent session) and bound if it is missing.
    pub async fn join(
        &self,
        vhost: &VHost,
        owner: ConnectionId,
        client_id: &str,
        full: &str,
        durable: bool,
    ) -> Option<Arc<Queue>> {
        let (group, filter) = split(full)?;
        let name = queue_name(group, filter)?;
        let key = format!("{}\0{name}", vhost.name);
        let _changing = self.changing.lock().await;
        let amqp_key = topic::to_amqp(filter);
        let queue = ensure_queue(vhost, owner, &name, &amqp_key, durable).await;
        let mut members = self.members.lock();
        let group = members.entry(key.clone()).or_insert_with(|| Group {
            key: amqp_key,
            clients: BTreeSet::new(),
        });
        if queue.is_some() {
            group.clients.insert(client_id.to_owned());
        } else if group.clients.is_empty() {
            members.remove(&key);
        }
        queue
    }

    /// Ends `client_id`'s membership of the groups of `fulls`; a group left without
    /// members loses its queue (and the messages in it), as the subscription ends.
    pub async fn leave(&self, vhost: &VHost, client_id: &str, fulls: &[&str]) {
        let _changing = self.changing.lock().await;
        for full in fulls.iter().copied() {
            let Some(name) = split(full).and_then(|(g, f)| queue_name(g, f)) else {
                continue;
            };
            let key = format!("{}\0{name}", vhost.name);
            let emptied = {
                let mut members = self.members.lock();
                match members.get_mut(&key) {
                    Some(g) => {
                        g.clients.remove(client_id);
                        let emptied = g.clients.is_empty();
                        if emptied {
                            members.remove(&key);
                        }
                        emptied
                    }
                    // Not a member (a join that failed): a queue of that name is not
                    // this group's to delete (start-up removes orphaned ones).
                    None => false,
                }
            };
            if emptied {
                let _ = vhost.delete_queue(&name, None, false, false).await;
            }
        }
    }

    /// At start-up, after [`Groups::recovered`]: deletes the group queues no session is
    /// subscribed to any more (members whose sessions ended with a crash) and re-declares,
    /// durable, those of parked members that did not survive (declared non-durable by a
    /// session that has ended since).
    pub async fn reconcile(&self, broker: &Broker) {
        let _changing = self.changing.lock().await;
        let groups: Vec<(String, String)> = self
            .members
            .lock()
            .iter()
            .map(|(k, g)| (k.clone(), g.key.clone()))
            .collect();
        for vhost in broker.vhosts() {
            for q in vhost.queues() {
                let name = q.name.as_str();
                let key = format!("{}\0{name}", vhost.name);
                if name.starts_with(PREFIX) && !groups.iter().any(|(k, _)| *k == key) {
                    tracing::info!(vhost = %vhost.name, queue = name, "mqtt shared subscription without members removed");
                    let _ = vhost.delete_queue(name, None, false, false).await;
                }
            }
        }
        for (key, amqp_key) in groups {
            let Some((vhost, name)) = key.split_once('\0') else {
                continue;
            };
            if let Some(vh) = broker.vhost(vhost) {
                let owner = ConnectionId::next();
                ensure_queue(&vh, owner, name, &amqp_key, true).await;
            }
        }
    }
}

/// The group queue, declared and bound if it is missing.
async fn ensure_queue(
    vhost: &VHost,
    owner: ConnectionId,
    name: &str,
    key: &str,
    durable: bool,
) -> Option<Arc<Queue>> {
    if let Some(q) = vhost.queue(name).ok().filter(|q| !q.is_deleted()) {
        return Some(q);
    }
    let declared = vhost
        .declare_queue(
            QueueDecl {
                name: name.into(),
                passive: false,
                durable,
                exclusive: false,
                auto_delete: false,
                arguments: FieldTable::default(),
            },
            owner,
        )
        .await;
    let q = match declared {
        Ok((q, _)) => q,
        Err(e) => {
            tracing::warn!(queue = name, error = %e, "mqtt shared subscription queue unavailable");
            return None;
        }
    };
    let bound = vhost
        .bind(
            "amq.topic",
            Target::Queue(q.clone()),
            key.into(),
            FieldTable::default(),
        )
        .await;
    if let Err(e) = bound {
        tracing::warn!(queue = name, error = %e, "mqtt shared subscription not bound");
        return None;
    }
    Some(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_filters_split_as_the_spec_says() {
        assert_eq!(split("$share/g/a/b"), Some(("g", "a/b")));
        assert_eq!(split("$share/g/#"), Some(("g", "#")));
        // MQTT-4.8.2-1/2: no empty group, no wildcard in it, a filter after it.
        assert_eq!(split("$share//a"), None);
        assert_eq!(split("$share/g+/a"), None);
        assert_eq!(split("$share/#/a"), None);
        assert_eq!(split("$share/g/"), None);
        assert_eq!(split("$share/g"), None);
        assert_eq!(split("a/b"), None);
    }

    #[test]
    fn names_stay_short_strings() {
        assert_eq!(queue_name("g", "a/b").as_deref(), Some("mqtt-shared-g-a/b"));
        assert_eq!(queue_name("g", &"x".repeat(300)), None);
    }
}
