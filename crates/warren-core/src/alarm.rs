//! Resource alarms (memory high watermark, disk free limit). While one is raised,
//! front-ends stop reading from publishing connections (AMQP also sends
//! `connection.blocked`); consumers keep draining, which is what clears a memory alarm.

use tokio::sync::watch;

/// Which alarms are raised.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AlarmState {
    pub memory: bool,
    pub disk: bool,
}

impl AlarmState {
    /// Publishers must wait.
    pub fn blocked(&self) -> bool {
        self.memory || self.disk
    }

    /// RabbitMQ's reason text for `connection.blocked`.
    pub fn reason(&self) -> &'static str {
        match (self.memory, self.disk) {
            (true, true) => "low on memory and disk",
            (true, false) => "low on memory",
            (false, true) => "low on disk",
            (false, false) => "",
        }
    }
}

/// The broker's alarm state, observed by every connection.
#[derive(Debug)]
pub struct Alarms {
    tx: watch::Sender<AlarmState>,
}

impl Default for Alarms {
    fn default() -> Self {
        Self {
            tx: watch::Sender::new(AlarmState::default()),
        }
    }
}

impl Alarms {
    /// Replaces the state; returns whether it changed.
    pub fn set(&self, state: AlarmState) -> bool {
        self.tx.send_if_modified(|s| {
            let changed = *s != state;
            *s = state;
            changed
        })
    }

    pub fn get(&self) -> AlarmState {
        *self.tx.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<AlarmState> {
        self.tx.subscribe()
    }
}
