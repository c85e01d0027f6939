//! A queue's paged-out tail: a long backlog of a durable queue stays in the store, not in
//! memory (RabbitMQ's lazy/CQv2 behaviour). Once a queue holds [`PAGE_AFTER_MESSAGES`]
//! ready messages (or [`PAGE_AFTER_BYTES`]) in memory, each further message is kept only
//! as a count in a [`Chunk`] — a range of sequence numbers whose bodies are in the store —
//! and chunks are read back in order when the in-memory head runs dry.
//!
//! A chunk names its messages exactly, as runs of consecutive sequence numbers: publishers
//! racing may enqueue slightly out of sequence order, and a sequence number between two
//! of a chunk's messages may belong to a message that is in memory, in flight, or deleted
//! but not yet applied — reading a whole `first..=last` range could return it twice.
//!
//! A chunk may only be read once everything it covers has been applied by the store's
//! writer: persistent messages were submitted before they were enqueued (their ticket is
//! known); transient messages are written by the enqueue itself ([`Op::PageOut`], ticket
//! known only after the submission, hence `pending`).
//!
//! [`Op::PageOut`]: warren_store::Op::PageOut

use std::collections::VecDeque;

/// In-memory ready messages above which a pageable queue pages out new arrivals.
pub(crate) const PAGE_AFTER_MESSAGES: usize = 16_384;
/// In-memory ready body bytes above which a pageable queue pages out new arrivals.
pub(crate) const PAGE_AFTER_BYTES: u64 = 64 << 20;
/// Messages per chunk: one store scan when the head runs dry.
pub(crate) const CHUNK_MESSAGES: usize = 4096;

/// A run of consecutive paged-out messages of one queue.
#[derive(Debug)]
pub(crate) struct Chunk {
    pub id: u64,
    /// Inclusive runs of sequence numbers, in arrival order (one run unless publishers
    /// raced or messages were rejected in between).
    pub runs: Vec<(u64, u64)>,
    pub count: usize,
    pub bytes: u64,
    /// Of those, persistent messages (RabbitMQ's `messages_persistent`).
    pub persistent: usize,
    pub persistent_bytes: u64,
    /// Highest store ticket among its writes (0: already on disk, e.g. recovered).
    pub ticket: u64,
    /// Writes submitted after the enqueue whose ticket is not known yet.
    pub pending: usize,
}

/// What the head needs before the next chunk can be read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Readiness {
    /// Nothing is paged out.
    Empty,
    /// The front chunk can be read now.
    Ready,
    /// The front chunk's writes are not all synced: wait for this ticket.
    WaitSync(u64),
    /// A write of the front chunk has not been submitted yet.
    WaitPending,
}

/// The paged-out tail of one queue (all of it behind the in-memory ready messages).
///
/// Boxed until the queue first pages out: most queues never do, and an idle MQTT session
/// queue should not carry the bookkeeping.
#[derive(Debug, Default)]
pub(crate) struct Paged {
    tail: Option<Box<Tail>>,
    /// Chunk ids never repeat in a queue's life (a purge can leave writes of an old chunk
    /// to be resolved by id).
    next_id: u64,
    /// A task is waiting for the store to sync the front chunk.
    pub waiter: bool,
    /// The head ran dry on a chunk with pending writes: whoever resolves them must wake it.
    pub stalled: bool,
}

#[derive(Debug, Default)]
struct Tail {
    chunks: VecDeque<Chunk>,
    /// Messages and body bytes in all chunks (also counted in the queue's ready totals).
    count: usize,
    bytes: u64,
    persistent: usize,
    persistent_bytes: u64,
}

impl Paged {
    pub fn is_empty(&self) -> bool {
        self.tail.as_ref().is_none_or(|t| t.chunks.is_empty())
    }

    /// Messages in all chunks (also counted in the queue's ready total).
    pub fn count(&self) -> usize {
        self.tail.as_ref().map_or(0, |t| t.count)
    }

    /// Body bytes in all chunks (also counted in the queue's ready bytes).
    pub fn bytes(&self) -> u64 {
        self.tail.as_ref().map_or(0, |t| t.bytes)
    }

    /// Persistent messages and their body bytes in all chunks.
    pub fn persistent(&self) -> (usize, u64) {
        self.tail
            .as_ref()
            .map_or((0, 0), |t| (t.persistent, t.persistent_bytes))
    }

    /// Pages out message `seq`; `ticket` is `None` while its write is still to be submitted
    /// (see [`Paged::resolve`]). `gaps_free`: every stored key between the previous
    /// message and this one is this chunk's too (true at recovery, which scans the store in
    /// order), so the run may skip over them. `persistent`: a persistent message (counted
    /// apart for the management API). Returns the chunk's id.
    pub fn push(
        &mut self,
        seq: u64,
        bytes: u64,
        ticket: Option<u64>,
        gaps_free: bool,
        persistent: bool,
    ) -> u64 {
        let t = self.tail.get_or_insert_with(Default::default);
        let fresh = t.chunks.back().is_none_or(|c| c.count >= CHUNK_MESSAGES);
        if fresh {
            self.next_id += 1;
            t.chunks.push_back(Chunk {
                id: self.next_id,
                runs: Vec::new(),
                count: 0,
                bytes: 0,
                persistent: 0,
                persistent_bytes: 0,
                ticket: 0,
                pending: 0,
            });
        }
        let Some(c) = t.chunks.back_mut() else {
            return 0;
        };
        match c.runs.last_mut() {
            Some((_, last)) if *last + 1 == seq || (gaps_free && *last < seq) => *last = seq,
            _ => c.runs.push((seq, seq)),
        }
        c.count += 1;
        c.bytes += bytes;
        if persistent {
            c.persistent += 1;
            c.persistent_bytes += bytes;
            t.persistent += 1;
            t.persistent_bytes += bytes;
        }
        match ticket {
            Some(t) => c.ticket = c.ticket.max(t),
            None => c.pending += 1,
        }
        t.count += 1;
        t.bytes += bytes;
        c.id
    }

    /// The write of one pending message of chunk `id` got `ticket`.
    pub fn resolve(&mut self, id: u64, ticket: u64) {
        let Some(t) = self.tail.as_mut() else {
            return;
        };
        if let Some(c) = t.chunks.iter_mut().rev().find(|c| c.id == id) {
            c.pending = c.pending.saturating_sub(1);
            c.ticket = c.ticket.max(ticket);
        }
    }

    pub fn readiness(&self, synced: u64) -> Readiness {
        match self.tail.as_ref().and_then(|t| t.chunks.front()) {
            None => Readiness::Empty,
            Some(c) if c.pending > 0 => Readiness::WaitPending,
            Some(c) if c.ticket > synced => Readiness::WaitSync(c.ticket),
            Some(_) => Readiness::Ready,
        }
    }

    /// Takes the front chunk out of the totals (its messages move to memory). The
    /// bookkeeping is freed with the last chunk.
    pub fn pop_front(&mut self) -> Option<Chunk> {
        let t = self.tail.as_mut()?;
        let c = t.chunks.pop_front()?;
        t.count -= c.count;
        t.bytes -= c.bytes;
        t.persistent -= c.persistent;
        t.persistent_bytes -= c.persistent_bytes;
        if t.chunks.is_empty() {
            self.tail = None;
        }
        Some(c)
    }

    /// Drops every chunk; returns their runs (for deleting them in the store).
    pub fn clear(&mut self) -> Vec<(u64, u64)> {
        self.stalled = false;
        match self.tail.take() {
            Some(t) => t.chunks.into_iter().flat_map(|c| c.runs).collect(),
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_fill_up_and_wait_for_their_writes() {
        let mut p = Paged::default();
        assert_eq!(p.readiness(0), Readiness::Empty);
        for seq in 1..=CHUNK_MESSAGES as u64 {
            p.push(seq, 10, Some(seq), false, true);
        }
        let second = p.push(CHUNK_MESSAGES as u64 + 1, 10, None, false, false);
        assert_eq!(p.count(), CHUNK_MESSAGES + 1);
        assert_eq!(p.bytes(), 10 * (CHUNK_MESSAGES as u64 + 1));
        assert_eq!(p.readiness(5), Readiness::WaitSync(CHUNK_MESSAGES as u64));
        assert_eq!(p.readiness(u64::MAX), Readiness::Ready);
        let c = p.pop_front().expect("front chunk");
        assert_eq!(c.runs, vec![(1, CHUNK_MESSAGES as u64)]);
        assert_eq!(c.count, CHUNK_MESSAGES);
        assert_eq!(p.readiness(u64::MAX), Readiness::WaitPending);
        p.resolve(second, 9_999);
        assert_eq!(p.readiness(9_998), Readiness::WaitSync(9_999));
        assert_eq!(p.readiness(9_999), Readiness::Ready);
        assert_eq!(
            p.clear(),
            vec![(CHUNK_MESSAGES as u64 + 1, CHUNK_MESSAGES as u64 + 1)]
        );
        assert_eq!((p.count(), p.bytes()), (0, 0));
    }

    #[test]
    fn runs_name_exactly_the_chunks_messages() {
        let mut p = Paged::default();
        for seq in [11, 12, 10, 13, 15, 16] {
            p.push(seq, 1, Some(seq), false, false);
        }
        let c = p.pop_front().expect("chunk");
        // 10 came late and 14 never came (rejected, or in memory): neither is read twice.
        assert_eq!(c.runs, vec![(11, 12), (10, 10), (13, 13), (15, 16)]);
        assert_eq!((c.count, c.ticket), (6, 16));
        // Recovery scans the store in order: gaps hold nothing else.
        p.push(20, 1, Some(0), true, false);
        p.push(25, 1, Some(0), true, false);
        assert_eq!(p.pop_front().expect("chunk").runs, vec![(20, 25)]);
    }
}
