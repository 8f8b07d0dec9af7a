//! Acks, batched: deliveries settled close together are acked with one `multiple` ack.
//!
//! A handler's outcome is confirmed first (the result, retry or dead letter); only then does the
//! worker hand the delivery tag here. One task per channel takes every tag handed in since its
//! last ack and covers the settled run at the bottom of the window with a single
//! `basic.ack(multiple)`: no delivery still running is ever covered, because a multiple ack is
//! sent only up to a tag below which every tag of the channel is known and settled. Settled tags
//! above a delivery still running (a slow task) are acked one by one, so a slow task never holds
//! the prefetch window of the others.
//!
//! A settled tag waits up to [`LINGER`] for others to share its ack, unless more than `hold`
//! tags already wait. Every ack is a command the quorum queue writes to its log; at a few hundred
//! tasks a second each task's ack would otherwise go alone, and the broker, on the same cores as
//! the workers, spends the CPU the workers need (docs/BENCHMARKS.md, session 13). The wait costs
//! no latency: the task's result is already confirmed when its tag comes here. It only holds a
//! place in the prefetch window a little longer, which `hold` bounds, and on a crash the broker
//! redelivers those tasks, as it would any unacked one (the collector keeps the first result).

use lapin::Channel;
use lapin::options::BasicAckOptions;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// How long a settled tag may wait for others to share its ack.
pub const LINGER: Duration = Duration::from_millis(20);

/// What the acker hears about a delivery tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    /// Delivered to us and being handled.
    Received(u64),
    /// Its outcome is confirmed: ack it.
    Settled(u64),
    /// Settled without an ack (nacked back to the queue): only leave the window.
    Returned(u64),
}

/// The sending side, one per channel; cloned into every in-flight delivery.
#[derive(Clone)]
pub struct Acks {
    events: mpsc::UnboundedSender<Event>,
}

/// The acking task of a channel; ends after every [`Acks`] is dropped and the last tag is acked.
pub struct Acker {
    task: tokio::task::JoinHandle<()>,
}

impl Acks {
    /// Starts the acker of `channel`: up to `hold` settled tags may wait [`LINGER`] for company;
    /// with `hold` 0 every tag is acked as soon as it is handed in.
    pub fn start(channel: Channel, hold: usize) -> (Self, Acker) {
        let (events, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(channel, rx, hold));
        (Self { events }, Acker { task })
    }

    /// A delivery arrived; call before anything can settle it, in arrival order.
    pub fn received(&self, tag: u64) {
        let _ = self.events.send(Event::Received(tag));
    }

    /// The delivery's outcome is confirmed: ack it. (If the channel is gone the broker
    /// redelivers it; the session notices the loss on its own.)
    pub fn ack(&self, tag: u64) {
        let _ = self.events.send(Event::Settled(tag));
    }

    /// The delivery was nacked or rejected by its handler: it leaves the window unacked.
    pub fn returned(&self, tag: u64) {
        let _ = self.events.send(Event::Returned(tag));
    }
}

impl Acker {
    /// Waits until every tag handed in has been acked (the senders must be dropped first).
    pub async fn flushed(self) {
        let _ = self.task.await;
    }
}

async fn run(channel: Channel, mut events: mpsc::UnboundedReceiver<Event>, hold: usize) {
    let mut window = Window::default();
    // Armed while settled tags wait: when the first of them must go.
    let linger = tokio::time::sleep(LINGER);
    tokio::pin!(linger);
    let mut lingering = false;
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            () = &mut linger, if lingering => {
                lingering = false;
                if send(&channel, window.take_acks()).await {
                    continue;
                }
                return;
            }
        };
        let Some(event) = event else { break };
        window.apply(event);
        // Everything already waiting goes into the same round.
        while let Ok(event) = events.try_recv() {
            window.apply(event);
        }
        if window.settled > hold {
            lingering = false;
            if !send(&channel, window.take_acks()).await {
                return;
            }
        } else if window.settled > 0 && !lingering {
            linger.as_mut().reset(Instant::now() + LINGER);
            lingering = true;
        }
    }
    // Every sender is gone (the session is draining): what is settled goes now.
    send(&channel, window.take_acks()).await;
}

/// Sends `acks`; false if the channel is gone.
async fn send(channel: &Channel, acks: Vec<Ack>) -> bool {
    for ack in acks {
        let options = BasicAckOptions {
            multiple: ack.multiple,
        };
        if let Err(error) = channel.basic_ack(ack.tag, options).await {
            tracing::debug!(%error, "ack failed; the broker redelivers what it did not get");
            return false;
        }
    }
    true
}

/// One ack to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ack {
    tag: u64,
    multiple: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    /// Settled, not acked yet.
    Settled,
    /// Acked on its own, or returned: out of the window, nothing left to send.
    Done,
}

/// The channel's window: every tag above `floor` that we have heard of. Delivery tags of a
/// channel are 1, 2, 3, ..., so a gap in the map is a delivery not handed in yet.
#[derive(Debug, Default)]
struct Window {
    /// Every tag up to here is acked or out of the window.
    floor: u64,
    tags: BTreeMap<u64, State>,
    /// Tags settled and not acked yet.
    settled: usize,
}

impl Window {
    fn apply(&mut self, event: Event) {
        match event {
            Event::Received(tag) => {
                self.tags.insert(tag, State::Running);
            }
            Event::Settled(tag) => {
                self.tags.insert(tag, State::Settled);
                self.settled += 1;
            }
            Event::Returned(tag) => {
                self.tags.insert(tag, State::Done);
            }
        }
    }

    /// The acks that cover what is settled: one multiple ack for the settled run above the
    /// floor, then single acks for settled tags above a delivery still running.
    fn take_acks(&mut self) -> Vec<Ack> {
        let mut acks = Vec::new();
        // The run: contiguous tags above the floor, each settled or done.
        let mut top = None;
        let mut next = self.floor + 1;
        while let Some(&state) = self.tags.get(&next) {
            match state {
                State::Running => break,
                State::Settled => top = Some(next),
                State::Done => {}
            }
            next += 1;
        }
        let new_floor = next - 1;
        if let Some(tag) = top {
            // A multiple ack of a single delivery is the same frame; say what it is.
            let alone = self
                .tags
                .range(self.floor + 1..=tag)
                .filter(|(_, s)| **s == State::Settled)
                .count()
                == 1;
            acks.push(Ack {
                tag,
                multiple: !alone,
            });
        }
        self.tags = self.tags.split_off(&(new_floor + 1));
        self.floor = new_floor;
        // Above the first running delivery: ack each settled one now.
        for (tag, state) in &mut self.tags {
            if *state == State::Settled {
                acks.push(Ack {
                    tag: *tag,
                    multiple: false,
                });
                *state = State::Done;
            }
        }
        self.settled = 0;
        acks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(events: &[Event]) -> Window {
        let mut w = Window::default();
        for e in events {
            w.apply(*e);
        }
        w
    }

    use Event::{Received as R, Returned as N, Settled as S};

    const fn multiple(tag: u64) -> Ack {
        Ack {
            tag,
            multiple: true,
        }
    }

    const fn single(tag: u64) -> Ack {
        Ack {
            tag,
            multiple: false,
        }
    }

    #[test]
    fn a_settled_run_is_one_multiple_ack() {
        let mut w = window(&[R(1), R(2), R(3), S(2), S(1), S(3)]);
        assert_eq!(w.take_acks(), vec![multiple(3)]);
        assert_eq!(w.floor, 3);
        assert!(w.tags.is_empty());
        assert_eq!(w.take_acks(), vec![]);
    }

    #[test]
    fn a_running_delivery_is_never_covered() {
        // 2 still runs: 1 alone, 3 and 4 one by one, nothing multiple across 2.
        let mut w = window(&[R(1), R(2), R(3), R(4), S(1), S(3), S(4)]);
        assert_eq!(w.take_acks(), vec![single(1), single(3), single(4)]);
        assert_eq!(w.floor, 1);
        // 2 settles: the floor passes the ones acked already; only 2 is acked.
        w.apply(S(2));
        assert_eq!(w.take_acks(), vec![single(2)]);
        assert_eq!(w.floor, 4);
    }

    #[test]
    fn the_window_counts_what_waits_for_an_ack() {
        let mut w = window(&[R(1), R(2), R(3), R(4), S(1), S(3), N(4)]);
        assert_eq!(w.settled, 2, "returned tags wait for nothing");
        let _ = w.take_acks();
        assert_eq!(w.settled, 0);
        w.apply(S(2));
        assert_eq!(w.settled, 1);
        assert_eq!(w.take_acks(), vec![single(2)]);
        assert_eq!(w.settled, 0);
    }

    #[test]
    fn an_unknown_tag_stops_the_run() {
        // 2 was delivered but not handed in yet (another consumer's stream on the channel).
        let mut w = window(&[R(1), R(3), S(1), S(3)]);
        assert_eq!(w.take_acks(), vec![single(1), single(3)]);
        assert_eq!(w.floor, 1);
        w.apply(R(2));
        w.apply(S(2));
        w.apply(R(4));
        w.apply(R(5));
        w.apply(S(5));
        w.apply(S(4));
        assert_eq!(w.take_acks(), vec![multiple(5)]);
        assert_eq!(w.floor, 5);
    }

    #[test]
    fn returned_deliveries_leave_the_window_without_an_ack() {
        let mut w = window(&[R(1), R(2), R(3), N(1), S(2)]);
        assert_eq!(w.take_acks(), vec![single(2)]);
        assert_eq!(w.floor, 2);
        w.apply(N(3));
        assert_eq!(w.take_acks(), vec![]);
        assert_eq!(w.floor, 3);
    }
}
