//! Spare room for a connection's reads, adapted to its traffic (MQTT and STOMP).

use bytes::BytesMut;

/// An idle connection keeps the small buffer it connected with (no room asked). Once a
/// packet or frame straddles two reads (landing in the few bytes left at the end of the
/// buffer: a second syscall), reads get at least `MIN`, and each read that fills all the
/// room it had doubles it up to `MAX`: a busy publisher's packets then come in 16 KB
/// reads, not 128-byte ones. (A `BytesMut` whose frames were split off grows back only to
/// its first capacity, 64 bytes at a time when full.)
#[derive(Default)]
pub struct ReadRoom(usize);

impl ReadRoom {
    pub const MIN: usize = 256;
    pub const MAX: usize = 16 * 1024;

    /// The buffer holds the start of a packet whose rest is still to come.
    pub fn straddled(&mut self) {
        self.0 = self.0.max(Self::MIN);
    }

    /// After a read of `n` bytes into `spare` bytes of room.
    pub fn read(&mut self, n: usize, spare: usize) {
        if n == spare && self.0 != 0 {
            self.0 = (self.0 * 2).min(Self::MAX);
        }
    }

    /// Grows `buf` before a read when it has less than half the room wanted.
    pub fn make(&self, buf: &mut BytesMut) {
        if self.0 != 0 && buf.capacity() - buf.len() < self.0 / 2 {
            buf.reserve(self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ReadRoom;
    use bytes::BytesMut;

    #[test]
    fn read_room_grows_only_for_traffic_that_straddles_reads() {
        let mut room = ReadRoom::default();
        let mut buf = BytesMut::with_capacity(128);
        buf.extend_from_slice(&[0; 100]);
        let _ = buf.split_to(100);
        // Idle: the small buffer stays as it is.
        room.read(28, 28);
        room.make(&mut buf);
        assert_eq!(buf.capacity(), 28);
        // A packet straddled two reads: at least MIN from now on.
        room.straddled();
        room.make(&mut buf);
        assert!(buf.capacity() >= ReadRoom::MIN);
        // Reads that fill the room double it, up to MAX.
        for _ in 0..12 {
            room.read(room.0, room.0);
        }
        assert_eq!(room.0, ReadRoom::MAX);
        // A read that leaves room to spare keeps it.
        room.read(10, 100);
        assert_eq!(room.0, ReadRoom::MAX);
    }
}
