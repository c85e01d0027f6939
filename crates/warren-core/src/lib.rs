//! Warren's routing core: vhosts, exchanges, queues, bindings, messages and consumers.
//!
//! No sockets and no protocol here: front-ends (AMQP, MQTT, STOMP) translate their frames
//! into calls on [`Broker`], [`VHost`] and [`Queue`], and receive deliveries through an
//! [`Outbox`]. Durable state goes through `warren-store`.

pub mod alarm;
pub mod auth;
pub mod broker;
pub mod connections;
pub mod consumer;
pub mod deadletter;
pub mod definitions;
pub mod error;
pub mod exchange;
pub mod fast_map;
pub mod global_parameters;
pub mod ids;
pub mod json;
pub mod limits;
pub mod message;
mod meta;
mod paging;
pub mod permissions;
pub mod policies;
pub mod queue;
pub mod read_room;
pub mod shutdown;
pub mod stream;
pub mod topic;
pub mod topic_permissions;
pub mod vhost;

pub use alarm::{AlarmState, Alarms};
pub use amq_protocol_types::{AMQPValue, FieldTable, LongString, ShortString};
pub use auth::ConnectionAuth;
pub use broker::{default_node_name, full_permission, Broker, BrokerConfig};
pub use connections::{
    ChannelCounts, ChannelRecord, ChannelSettings, ChannelStat, ChannelStats, ClientProperties,
    ConnectionEntry, ConnectionGuard, ConnectionInfo, Connections, TlsDetails, Tuning,
};
pub use consumer::{
    return_undelivered, ConsumerSpec, Credit, Deliveries, Delivery, Outbox, OutboxEvent,
};
pub use error::{CoreError, CoreResult, ErrorKind};
pub use exchange::{Binding, Exchange, ExchangeKind, Target};
pub use fast_map::{FastMap, FastSet};
pub use ids::{ConnectionId, ConsumerId, MsgSeq, RoutingKey};
pub use message::{Message, Properties};
pub use meta::UserRecord;
pub use permissions::{Access, PermissionRecord, ResourceKind};
pub use policies::{Policy, PolicyRecord};
pub use queue::{
    ConsumerActivity, ConsumerInfo, FollowUp, GetResult, Queue, QueueCounts, QueueFootprint,
};
pub use topic_permissions::{TopicPermissionRecord, TopicPermissions};
pub use vhost::{ExchangeDecl, PublishOutcome, QueueDecl, Unfinished, VHost, VHostMetadata};
pub use warren_store::{Store, StoreOptions, Ticket};

#[cfg(test)]
mod tests;

/// The RabbitMQ version Warren presents itself as (the management API's
/// `rabbitmq_version`, STOMP's `server` header): clients check it for features.
pub const RABBITMQ_COMPAT_VERSION: &str = "3.12.0";
