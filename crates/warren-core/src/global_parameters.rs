//! Global runtime parameters: RabbitMQ's runtime parameters without a vhost. Two are set
//! on first boot, as RabbitMQ sets them: `cluster_name` (the node name until changed; the
//! AMQP server properties and the management API show it) and `internal_cluster_id`.
//! Others are whatever an operator puts through the management API or definitions; Warren
//! only keeps them. Values are JSON, stored under `g\0<name>` in the meta column family.

use std::collections::BTreeMap;

use serde_json::Value;
use warren_store::Op;

use crate::broker::Broker;
use crate::error::CoreResult;
use crate::meta;

pub const CLUSTER_NAME: &str = "cluster_name";
pub const INTERNAL_CLUSTER_ID: &str = "internal_cluster_id";

/// The parameters by name.
pub(crate) type GlobalParameterMap = BTreeMap<String, Value>;

/// Loads the stored parameters and adds the two RabbitMQ sets on first boot; the store
/// writes for those go into `ops`.
pub(crate) fn recover(
    stored: Vec<(Vec<u8>, Vec<u8>)>,
    node_name: &str,
    ops: &mut Vec<Op>,
) -> GlobalParameterMap {
    let mut map = GlobalParameterMap::new();
    for (k, v) in stored {
        let Some(name) = meta::global_parameter_name(&k) else {
            continue;
        };
        match serde_json::from_slice(&v) {
            Ok(value) => {
                map.insert(name, value);
            }
            Err(e) => {
                tracing::warn!(parameter = %name, error = %e, "skipping unreadable global parameter")
            }
        }
    }
    let defaults = [
        (CLUSTER_NAME, Value::from(node_name)),
        (
            INTERNAL_CLUSTER_ID,
            Value::from(crate::vhost::generated_name("rabbitmq-cluster-id-")),
        ),
    ];
    for (name, value) in defaults {
        if !map.contains_key(name) {
            ops.push(meta::global_parameter_put(name, &value));
            map.insert(name.to_owned(), value);
        }
    }
    map
}

impl Broker {
    /// Every global parameter, sorted by name.
    pub fn global_parameters(&self) -> Vec<(String, Value)> {
        let map = self.global_parameters.read();
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    pub fn global_parameter(&self, name: &str) -> Option<Value> {
        self.global_parameters.read().get(name).cloned()
    }

    /// Sets a parameter durably; true if it was new.
    pub async fn set_global_parameter(&self, name: &str, value: Value) -> CoreResult<bool> {
        let op = meta::global_parameter_put(name, &value);
        let created = self
            .global_parameters
            .write()
            .insert(name.to_owned(), value)
            .is_none();
        self.persist(vec![op]).await?;
        Ok(created)
    }

    /// Removes a parameter durably; false if it was not set.
    pub async fn clear_global_parameter(&self, name: &str) -> CoreResult<bool> {
        if self.global_parameters.write().remove(name).is_none() {
            return Ok(false);
        }
        self.persist(vec![meta::global_parameter_delete(name)])
            .await?;
        Ok(true)
    }

    /// The `cluster_name` parameter as text (RabbitMQ's `rabbit_nodes:cluster_name/0`);
    /// the node name if it was cleared or is not a string.
    pub fn cluster_name(&self) -> String {
        match self.global_parameter(CLUSTER_NAME) {
            Some(Value::String(s)) => s,
            _ => self.config.node_name.clone(),
        }
    }
}
