//! rumqttc (MQTT 5) helpers shared by the MQTT tests.

#![allow(dead_code)]

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
use rumqttc::v5::{Event, EventLoop};

/// Polls until `f` picks a packet, or panics after 5 s without one.
pub async fn poll_until<T>(
    el: &mut EventLoop,
    what: &str,
    mut f: impl FnMut(Packet) -> Option<T>,
) -> T {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), el.poll())
            .await
            .unwrap_or_else(|_| panic!("{what} in time"))
        {
            Ok(Event::Incoming(p)) => {
                if let Some(t) = f(p) {
                    return t;
                }
            }
            Ok(_) => {}
            Err(e) => panic!("mqtt connection failed waiting for {what}: {e}"),
        }
    }
}

/// The reason codes of the next SUBACK.
pub async fn suback_codes(el: &mut EventLoop) -> Vec<SubscribeReasonCode> {
    poll_until(el, "suback", |p| match p {
        Packet::SubAck(s) => Some(s.return_codes),
        _ => None,
    })
    .await
}

/// The reason of the next PUBACK.
pub async fn puback_reason(el: &mut EventLoop) -> PubAckReason {
    poll_until(el, "puback", |p| match p {
        Packet::PubAck(a) => Some(a.reason),
        _ => None,
    })
    .await
}
