//! A sending lane's datagrams waiting for their paced path's time
//! (`aggregate` with a configured `rate`, see
//! [`crate::core::aggregate::BoardPath::pace_rate`]): framed, copied out of the
//! reader's slots (which the next turn reuses), and sent by
//! [`TunOut::pace_tick`](super::TunOut) when their time comes, in order per
//! path.

use super::send::SEND_RUN;
use super::*;
use std::collections::VecDeque;

/// The most datagrams a lane holds for its paced paths (about 12 MB of
/// 1500-byte datagrams; 50 ms of 2 Gbit/s): past it a datagram is dropped
/// as `pace_queue`, as one that would wait too long is.
pub(super) const HELD_MAX: usize = 8192;
/// Buffers kept for reuse once their datagram is sent.
const SPARE_MAX: usize = 512;
/// A datagram due this soon is sent now: a wait shorter than the lane's
/// wake-up latency would only be late.
pub(super) const PACE_SLACK: Duration = Duration::from_micros(100);

/// One held datagram.
struct Waiting {
    due: Instant,
    data: Vec<u8>,
    inner_len: usize,
    tos: u8,
}

/// The held datagrams, per path in the order they leave (their times only
/// grow: a path's pace is taken in order).
#[derive(Default)]
pub struct Paced {
    queues: Vec<(PathId, VecDeque<Waiting>)>,
    spare: Vec<Vec<u8>>,
    count: usize,
}

impl Paced {
    /// Holds a copy of `head` + `body` for path `path` until `due`; `false`
    /// when the lane holds [`HELD_MAX`] already (not held).
    pub(super) fn hold(
        &mut self,
        path: PathId,
        due: Instant,
        (head, body): (&[u8], &[u8]),
        inner_len: usize,
        tos: u8,
    ) -> bool {
        if self.count >= HELD_MAX {
            return false;
        }
        let mut data = self.spare.pop().unwrap_or_default();
        data.clear();
        data.extend_from_slice(head);
        data.extend_from_slice(body);
        let waiting = Waiting {
            due,
            data,
            inner_len,
            tos,
        };
        match self.queues.iter_mut().find(|(id, _)| *id == path) {
            Some((_, q)) => q.push_back(waiting),
            None => self.queues.push((path, VecDeque::from([waiting]))),
        }
        self.count += 1;
        true
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Datagrams held.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Per path, when its last held datagram is due: until then its pace
    /// is taken.
    pub(super) fn backlog(&self) -> impl Iterator<Item = (PathId, Instant)> + '_ {
        self.queues
            .iter()
            .filter_map(|(id, q)| q.back().map(|w| (*id, w.due)))
    }

    /// When the first held datagram is due.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.queues
            .iter()
            .filter_map(|(_, q)| q.front().map(|w| w.due))
            .min()
    }

    /// Hands each path's datagrams due by `now` to `send` (path, datagrams,
    /// their inner lengths), at most [`SEND_RUN`] at a time.
    pub(super) fn release(
        &mut self,
        now: Instant,
        mut send: impl FnMut(PathId, &[sys::Datagram<'_>], &[usize]),
    ) {
        let by = now + PACE_SLACK;
        for (id, queue) in &mut self.queues {
            loop {
                let run = queue
                    .iter()
                    .take(SEND_RUN)
                    .take_while(|w| w.due <= by)
                    .count();
                if run == 0 {
                    break;
                }
                let mut datagrams = [sys::Datagram::default(); SEND_RUN];
                let mut lens = [0usize; SEND_RUN];
                for (k, w) in queue.iter().take(run).enumerate() {
                    datagrams[k] = sys::Datagram {
                        head: &w.data,
                        body: &[],
                        tos: w.tos,
                    };
                    lens[k] = w.inner_len;
                }
                send(*id, &datagrams[..run], &lens[..run]);
                for w in queue.drain(..run) {
                    if self.spare.len() < SPARE_MAX {
                        self.spare.push(w.data);
                    }
                }
                self.count -= run;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(p: &mut Paced, now: Instant) -> Vec<(PathId, Vec<u8>)> {
        let mut out = Vec::new();
        p.release(now, |id, d, _| {
            out.extend(d.iter().map(|d| (id, d.head.to_vec())));
        });
        out
    }

    #[test]
    fn held_datagrams_leave_in_order_when_due() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut p = Paced::default();
        let (a, b) = (PathId(0), PathId(1));
        assert!(p.hold(a, t0 + ms(1), (&[1], &[2]), 2, 0));
        assert!(p.hold(b, t0 + ms(2), (&[3], &[]), 1, 0));
        assert!(p.hold(a, t0 + ms(3), (&[4], &[]), 1, 0));
        assert_eq!(p.next_due(), Some(t0 + ms(1)));
        assert_eq!(p.len(), 3);
        // What an upgrade hands over: each path's last time.
        let mut backlog: Vec<_> = p.backlog().collect();
        backlog.sort_by_key(|(id, _)| id.0);
        assert_eq!(backlog, vec![(a, t0 + ms(3)), (b, t0 + ms(2))]);
        assert!(drain(&mut p, t0).is_empty());
        assert_eq!(
            drain(&mut p, t0 + ms(2)),
            vec![(a, vec![1, 2]), (b, vec![3])]
        );
        assert_eq!(p.next_due(), Some(t0 + ms(3)));
        assert_eq!(drain(&mut p, t0 + ms(3)), vec![(a, vec![4])]);
        assert!(p.is_empty());
        assert_eq!(p.next_due(), None);
    }

    #[test]
    fn a_full_lane_holds_no_more() {
        let t0 = Instant::now();
        let mut p = Paced::default();
        for _ in 0..HELD_MAX {
            assert!(p.hold(PathId(0), t0, (&[0], &[]), 1, 0));
        }
        assert!(!p.hold(PathId(1), t0, (&[0], &[]), 1, 0));
        assert_eq!(drain(&mut p, t0).len(), HELD_MAX);
        assert!(p.is_empty());
        assert!(p.hold(PathId(1), t0, (&[0], &[]), 1, 0));
    }
}
