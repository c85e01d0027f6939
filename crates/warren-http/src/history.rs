//! `samples` in `*_details` (RabbitMQ's `lengths_age`/`lengths_incr` and
//! `msg_rates_age`/`msg_rates_incr` query parameters): what a queue, a vhost or the
//! broker looked like at each step of a window, from the sampler's past samples.
//!
//! RabbitMQ keeps such history for every object. Here the broker and each vhost keep an
//! hour of it; a queue keeps ten minutes, and only once someone has asked for its
//! samples (at most [`MAX_WATCHED`] queues), so 100k queues cost nothing when nobody
//! looks. A queue's first answer repeats its present counts.

use std::collections::{HashMap, VecDeque};

use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};
use crate::stats::{Totals, COUNTERS};

/// RabbitMQ refuses a window of more than 500 steps (`Invalid range parameters`).
const MAX_STEPS: u64 = 500;
/// Queues whose history is kept (the most recently asked for win).
pub const MAX_WATCHED: usize = 1000;

/// One `*_age` / `*_incr` pair, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    age: u64,
    incr: u64,
}

/// The windows a request asked for.
#[derive(Debug, Default, Clone, Copy)]
pub struct Windows {
    lengths: Option<Window>,
    msg_rates: Option<Window>,
}

impl Windows {
    /// Reads `lengths_*` and `msg_rates_*`. As in RabbitMQ, a window needs both of its
    /// numbers (one alone, or one that is not a number, asks for nothing), and one with
    /// a zero or negative value or over 500 steps is a 400.
    pub fn parse(params: &HashMap<String, String>) -> ApiResult<Windows> {
        Ok(Windows {
            lengths: window(params, "lengths")?,
            msg_rates: window(params, "msg_rates")?,
        })
    }

    pub fn any(&self) -> bool {
        self.lengths.is_some() || self.msg_rates.is_some()
    }

    /// Adds samples to `messages*_details` of `obj` (a queue, a vhost, the overview's
    /// `queue_totals`) and to the counters of `stats` (`message_stats`).
    /// `points` end with the present (see [`History::with_now`]).
    pub fn apply(&self, obj: &mut Value, points: &[(u64, Totals)]) {
        let now_ms = points.last().map_or(0, |p| p.0);
        if let Some(w) = self.lengths {
            for (key, of) in LENGTHS {
                if let Some(d) = obj.get_mut(key) {
                    w.fill(d, points, now_ms, of);
                }
            }
        }
        if let Some(w) = self.msg_rates {
            if let Some(stats) = obj.get_mut("message_stats") {
                for (i, name) in COUNTERS.iter().enumerate() {
                    if let Some(d) = stats.get_mut(format!("{name}_details")) {
                        w.fill(d, points, now_ms, |t| t.counters()[i]);
                    }
                }
            }
        }
    }

    /// The same for the overview, whose lengths are under `queue_totals`.
    pub fn apply_overview(&self, obj: &mut Value, points: &[(u64, Totals)]) {
        let lengths_only = Windows {
            msg_rates: None,
            ..*self
        };
        if let Some(totals) = obj.get_mut("queue_totals") {
            lengths_only.apply(totals, points);
        }
        Windows {
            lengths: None,
            ..*self
        }
        .apply(obj, points);
    }
}

type Of = fn(&Totals) -> u64;

const LENGTHS: [(&str, Of); 3] = [
    ("messages_details", |t| t.ready + t.unacked),
    ("messages_ready_details", |t| t.ready),
    ("messages_unacknowledged_details", |t| t.unacked),
];

fn window(params: &HashMap<String, String>, prefix: &str) -> ApiResult<Option<Window>> {
    let num = |k: &str| {
        params
            .get(&format!("{prefix}_{k}"))
            .and_then(|v| v.parse::<i64>().ok())
    };
    let (Some(age), Some(incr)) = (num("age"), num("incr")) else {
        return Ok(None);
    };
    if age <= 0 || incr <= 0 || age / incr > MAX_STEPS as i64 {
        return Err(ApiError::BadRequest(format!(
            "Invalid range parameters: age {age}, incr {incr}"
        )));
    }
    Ok(Some(Window {
        age: age as u64,
        incr: incr as u64,
    }))
}

impl Window {
    /// The sample times, newest first: every `incr` back from the first whole step at or
    /// after now (so the newest sample is the present, as in RabbitMQ's queue lengths),
    /// `age / incr + 1` of them.
    fn times(&self, now_ms: u64) -> impl Iterator<Item = u64> {
        let step = self.incr * 1000;
        let last = now_ms.div_ceil(step) * step;
        (0..=self.age / self.incr).map(move |i| last.saturating_sub(i * step))
    }

    /// Adds `samples`, `avg` and `avg_rate` to a `{"rate": r}` object, as RabbitMQ does:
    /// each sample is the value at that time, `avg` their mean, `avg_rate` the change
    /// from the oldest to the newest per second.
    fn fill(
        &self,
        details: &mut Value,
        points: &[(u64, Totals)],
        now_ms: u64,
        of: impl Fn(&Totals) -> u64,
    ) {
        let samples: Vec<(u64, u64)> = self
            .times(now_ms)
            .map(|t| (value_at(points, t, &of), t))
            .collect();
        let n = samples.len() as f64;
        let avg = samples.iter().map(|(v, _)| *v as f64).sum::<f64>() / n;
        let avg_rate = match (samples.first(), samples.last()) {
            (Some((newest, t1)), Some((oldest, t0))) if t1 > t0 => {
                (*newest as f64 - *oldest as f64) / ((t1 - t0) as f64 / 1000.0)
            }
            _ => 0.0,
        };
        details["samples"] = samples
            .iter()
            .map(|(v, t)| json!({"sample": v, "timestamp": t}))
            .collect();
        details["avg"] = json!(avg);
        details["avg_rate"] = json!(avg_rate);
    }
}

/// The value at time `t`: the latest point at or before it, else the oldest (history
/// does not go back that far).
fn value_at(points: &[(u64, Totals)], t: u64, of: &impl Fn(&Totals) -> u64) -> u64 {
    let i = points.partition_point(|(at, _)| *at <= t);
    let p = if i == 0 {
        points.first()
    } else {
        points.get(i - 1)
    };
    p.map_or(0, |(_, totals)| of(totals))
}

/// Past samples of one object, oldest first, at most `keep_ms` old.
#[derive(Debug, Default, Clone)]
pub struct History(VecDeque<(u64, Totals)>);

impl History {
    pub fn push(&mut self, at_ms: u64, t: Totals, keep_ms: u64) {
        self.0.push_back((at_ms, t));
        while self
            .0
            .front()
            .is_some_and(|(a, _)| a.saturating_add(keep_ms) < at_ms)
        {
            self.0.pop_front();
        }
    }

    /// The points, with `now` (the present counts) appended.
    pub fn with_now(&self, now_ms: u64, now: Totals) -> Vec<(u64, Totals)> {
        let mut v: Vec<(u64, Totals)> = self.0.iter().copied().collect();
        v.push((now_ms, now));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn windows_as_rabbitmq_reads_them() {
        let w = Windows::parse(&params(&[("lengths_age", "60"), ("lengths_incr", "5")])).unwrap();
        assert_eq!(w.lengths, Some(Window { age: 60, incr: 5 }));
        assert!(w.msg_rates.is_none());
        // One number alone, or not a number: no window.
        for p in [
            params(&[("lengths_age", "60")]),
            params(&[("msg_rates_incr", "5")]),
            params(&[("lengths_age", "x"), ("lengths_incr", "5")]),
        ] {
            assert!(!Windows::parse(&p).unwrap().any());
        }
        // Zero, negative, over 500 steps: 400 with RabbitMQ's reason.
        for (age, incr) in [("60", "0"), ("0", "5"), ("60", "-5"), ("501", "1")] {
            let e = Windows::parse(&params(&[("lengths_age", age), ("lengths_incr", incr)]));
            let Err(ApiError::BadRequest(why)) = e else {
                panic!("{age}/{incr}: {e:?}");
            };
            assert_eq!(
                why,
                format!("Invalid range parameters: age {age}, incr {incr}")
            );
        }
        assert!(Windows::parse(&params(&[("lengths_age", "500"), ("lengths_incr", "1")])).is_ok());
    }

    #[test]
    fn samples_avg_and_avg_rate() {
        let t = |ready: u64, publish: u64| Totals {
            ready,
            publish,
            ..Default::default()
        };
        // Samples every 5 s; 3 messages published at 12.5 s.
        let mut h = History::default();
        for at in [0, 5_000, 10_000] {
            h.push(at, t(0, 0), 600_000);
        }
        h.push(15_000, t(3, 3), 600_000);
        let points = h.with_now(21_000, t(3, 3));
        let w = Windows::parse(&params(&[
            ("lengths_age", "20"),
            ("lengths_incr", "5"),
            ("msg_rates_age", "20"),
            ("msg_rates_incr", "10"),
        ]))
        .unwrap();
        let mut q = json!({
            "messages_details": {"rate": 0.0},
            "messages_ready_details": {"rate": 0.0},
            "messages_unacknowledged_details": {"rate": 0.0},
            "message_stats": {"publish_details": {"rate": 0.0}},
        });
        w.apply(&mut q, &points);
        let d = &q["messages_details"];
        let samples: Vec<(u64, u64)> = d["samples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["sample"].as_u64().unwrap(),
                    s["timestamp"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            samples,
            vec![
                (3, 25_000),
                (3, 20_000),
                (3, 15_000),
                (0, 10_000),
                (0, 5_000)
            ]
        );
        assert_eq!(d["avg"], json!(9.0 / 5.0));
        assert_eq!(d["avg_rate"], json!(3.0 / 20.0));
        assert_eq!(d["rate"], json!(0.0), "the rate stays");
        let p = &q["message_stats"]["publish_details"];
        assert_eq!(p["samples"].as_array().unwrap().len(), 3);
        assert_eq!(p["avg_rate"], json!(3.0 / 20.0));
        // A point older than the window is dropped once past `keep`.
        h.push(700_000, t(1, 3), 600_000);
        assert_eq!(h.0.front().map(|p| p.0), Some(700_000));
    }

    #[test]
    fn without_history_the_present_repeats() {
        let now = Totals {
            unacked: 2,
            ..Default::default()
        };
        let points = History::default().with_now(99_999, now);
        let w = Window { age: 10, incr: 5 };
        let mut d = json!({"rate": 0.0});
        w.fill(&mut d, &points, 99_999, |t| t.unacked);
        let values: Vec<u64> = d["samples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["sample"].as_u64().unwrap())
            .collect();
        assert_eq!(values, vec![2, 2, 2]);
        assert_eq!(d["avg_rate"], json!(0.0));
    }
}
