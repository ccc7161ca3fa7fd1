//! The forwarding threads: a fixed set of workers that serve every peer's
//! lanes.
//!
//! A worker is one thread (`fwd<n>`) with one `epoll` set holding the
//! sources (TUN queue, path sockets) of every lane it serves; lane `k` of
//! each peer goes to worker `k mod workers`, so the threads do not grow
//! with the number of peers, a peer's lanes still run side by side, and
//! both directions of a flow stay on one thread (they are on one lane).
//! A worker wakes when a source is ready or the earliest timer of its
//! lanes (probes, flow sweeps, reordering and FEC deadlines) is due, and
//! looks only at the lanes that have something to do: a quiet peer costs
//! nothing but its timers.
//!
//! Lanes come and go by orders in the worker's inbox (a mutex-guarded
//! list and an `eventfd`): `Add` starts serving a lane, `Remove` gives it
//! back (with its sequence numbers, windows and flows) to whoever parks the
//! peer. A lane whose TUN fails is set aside and given back on `Remove`.

use super::recv::{RxState, RX_BATCH};
use super::send::TxState;
use super::{clock, Lane, PathIn, BUF_LEN, POLL_EVERY, SWEEP_EVERY};
use crate::io::sys::{Doorbell, Epoll, RecvBatch};
use parking_lot::Mutex;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tracing::{error, warn};

/// The token of a worker's inbox; a lane's sources are
/// `slot << SOURCE_BITS | source`.
const INBOX: u64 = u64::MAX;
const SOURCE_BITS: u32 = 16;
/// Events taken per wait.
const EVENTS: usize = 256;
/// Longest sleep with no timer due (the lanes' own timers are shorter).
const IDLE: Duration = Duration::from_secs(1);

enum Order {
    Add(u64, Box<Lane>),
    Remove(u64, mpsc::Sender<Lane>),
    Stop,
}

struct Inbox {
    bell: Doorbell,
    orders: Mutex<Vec<Order>>,
}

impl Inbox {
    fn send(&self, order: Order) -> io::Result<()> {
        self.orders.lock().push(order);
        self.bell.ring()
    }
}

/// The forwarding workers of a gateway.
pub struct Workers {
    inboxes: Vec<Arc<Inbox>>,
    threads: Vec<JoinHandle<()>>,
    next_id: AtomicU64,
}

/// A lane being served by a worker: what takes it back.
pub struct Serving {
    id: u64,
    inbox: Arc<Inbox>,
}

/// A lane asked back from its worker ([`Serving::stop`]).
pub struct Stopping(mpsc::Receiver<Lane>);

impl Stopping {
    /// The lane, once its worker let go of it (`None`: the worker is gone,
    /// and the lane with it).
    pub fn wait(self) -> Option<Lane> {
        self.0.recv().ok()
    }
}

impl Serving {
    /// Asks the worker to give the lane back; it does so between rounds.
    pub fn stop(self) -> Stopping {
        let (tx, rx) = mpsc::channel();
        if let Err(e) = self.inbox.send(Order::Remove(self.id, tx)) {
            error!(error = %e, "could not ask a forwarding worker for a lane back");
        }
        Stopping(rx)
    }
}

impl Workers {
    /// Starts `n` workers (at least one).
    pub fn start(n: usize) -> io::Result<Workers> {
        let mut w = Workers {
            inboxes: Vec::new(),
            threads: Vec::new(),
            next_id: AtomicU64::new(0),
        };
        for k in 0..n.max(1) {
            let inbox = Arc::new(Inbox {
                bell: Doorbell::new()?,
                orders: Mutex::new(Vec::new()),
            });
            let mine = inbox.clone();
            let thread = std::thread::Builder::new()
                .name(format!("fwd{k}"))
                .spawn(move || {
                    Worker::new(mine).and_then(Worker::run).unwrap_or_else(|e| {
                        error!(error = %e, "forwarding worker could not start");
                    })
                })?;
            w.inboxes.push(inbox);
            w.threads.push(thread);
        }
        Ok(w)
    }

    /// Hands `lane` to its worker (lane `k` to worker `k mod count`).
    pub fn serve(&self, lane: Lane) -> io::Result<Serving> {
        let k = lane.out.lane % self.inboxes.len().max(1);
        let inbox = self
            .inboxes
            .get(k)
            .cloned()
            .ok_or_else(|| io::Error::other("no forwarding worker"))?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        inbox.send(Order::Add(id, Box::new(lane)))?;
        Ok(Serving { id, inbox })
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for inbox in &self.inboxes {
            let _ = inbox.send(Order::Stop);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A lane as a worker runs it: the lane and its running state.
struct Running {
    id: u64,
    lane: Lane,
    tx: TxState,
    /// The receiving state of each of the lane's path ends (`lane.ins`).
    rx: Vec<RxState>,
    /// Sources (0: the TUN queue, 1 + k: socket of `lane.ins[k]`) that gave
    /// something in the last round, or that the last wait found ready.
    hot: Vec<bool>,
    /// Their descriptors, as registered.
    fds: Vec<RawFd>,
    next_sweep: Instant,
    /// When its timers are next due.
    due: Instant,
}

impl Running {
    fn new(id: u64, lane: Lane) -> Running {
        let tx = lane.out.start();
        let rx: Vec<RxState> = lane.ins.iter().map(PathIn::start).collect();
        let fds: Vec<RawFd> = std::iter::once(lane.out.tun.as_raw_fd())
            .chain(lane.ins.iter().map(|p| p.socket.as_raw_fd()))
            .collect();
        let now = clock::now();
        Running {
            id,
            lane,
            tx,
            rx,
            // Everything is looked at once: what queued while the lane was
            // parked is not announced again by a wait.
            hot: vec![true; fds.len()],
            fds,
            next_sweep: now + SWEEP_EVERY,
            due: now,
        }
    }

    fn busy(&self) -> bool {
        self.hot.contains(&true)
    }

    /// Runs what is due (flow sweep, probes, given-up gaps, FEC blocks
    /// closed) and says when the next timer is.
    fn timers(&mut self, now: Instant) -> Instant {
        let lane = &mut self.lane;
        if now >= self.next_sweep {
            self.next_sweep = now + SWEEP_EVERY;
            lane.out.flows.sweep(now, &mut lane.out.paths);
        }
        let mut next = self.next_sweep;
        // The peer's traffic, both ways over all its paths, for the
        // probers' idle interval (read only when a probe may be due).
        let traffic = || {
            lane.out
                .paths
                .iter()
                .map(|o| {
                    o.counters.tx_packets.load(Ordering::Relaxed)
                        + o.counters.rx_packets.load(Ordering::Relaxed)
                })
                .fold(0u64, u64::wrapping_add)
        };
        for (p, r) in lane.ins.iter_mut().zip(self.rx.iter_mut()) {
            next = next.min(p.tick(r, now, traffic));
        }
        // A gap that waited its bound: what it held goes out through the
        // first end of a path (any writes to the lane's queue).
        let due = lane.reorder.lock().r.poll_timeout();
        if let Some(due) = due {
            if due <= now {
                if let Some((p, r)) = lane.ins.iter_mut().zip(self.rx.iter_mut()).next() {
                    p.give_up_gaps(r, now);
                }
                if let Some(d) = lane.reorder.lock().r.poll_timeout() {
                    next = next.min(d);
                }
            } else {
                next = next.min(due);
            }
        }
        // Held datagrams whose paced path takes them now.
        if let Some(due) = lane.out.pace_deadline() {
            if due <= now {
                lane.out.pace_tick(&mut self.tx, now);
            }
            if let Some(d) = lane.out.pace_deadline() {
                next = next.min(d);
            }
        }
        // A FEC block open for its whole hold: closed, its parity sent.
        if let Some(due) = lane.out.fec_deadline() {
            if due <= now {
                lane.out.fec_tick(&mut self.tx, now);
            }
            if let Some(d) = lane.out.fec_deadline() {
                next = next.min(d);
            }
        }
        next
    }

    /// One burst from each hot source: the sockets first (what a write to
    /// the TUN makes the local stack send back, a TCP acknowledgement or
    /// the data a sender held for one, is in the TUN queue when the write
    /// returns, and leaves in the same round), then the TUN queue. Only a
    /// failing TUN is an error.
    fn round(&mut self, batch: &mut RecvBatch) -> io::Result<()> {
        let mut wrote = false;
        let lane = &mut self.lane;
        for (k, (p, r)) in lane.ins.iter_mut().zip(self.rx.iter_mut()).enumerate() {
            let Some(h) = self.hot.get_mut(1 + k).filter(|h| **h) else {
                continue;
            };
            *h = p.turn(r, batch) > 0;
            wrote |= *h;
        }
        if wrote || self.hot.first().copied().unwrap_or(false) {
            let n = lane.out.turn(&mut self.tx)?;
            if let Some(h) = self.hot.first_mut() {
                *h = n > 0;
            }
        }
        Ok(())
    }
}

struct Worker {
    inbox: Arc<Inbox>,
    poll: Epoll,
    /// Lanes by slot (the slot is in their sources' tokens).
    slots: Vec<Option<Running>>,
    /// Lanes whose TUN failed, kept to be given back.
    failed: Vec<(u64, Lane)>,
    /// Where every lane's sockets are read into, one after the other (a
    /// megabyte: one per lane would grow memory with the peers).
    batch: RecvBatch,
}

impl Worker {
    fn new(inbox: Arc<Inbox>) -> io::Result<Worker> {
        let poll = Epoll::new(EVENTS)?;
        poll.add(inbox.bell.as_raw_fd(), INBOX)?;
        Ok(Worker {
            inbox,
            poll,
            slots: Vec::new(),
            failed: Vec::new(),
            batch: RecvBatch::new(RX_BATCH, BUF_LEN),
        })
    }

    fn run(mut self) -> io::Result<()> {
        // Rounds since the last wait.
        let mut unpolled = 0;
        loop {
            let now = clock::now();
            let mut next = now + IDLE;
            let mut busy = false;
            for r in self.slots.iter_mut().flatten() {
                let hot = r.busy();
                if hot || r.due <= now {
                    r.due = r.timers(now);
                }
                busy |= hot;
                next = next.min(r.due);
            }
            if !busy || unpolled >= POLL_EVERY {
                // Idle: sleep until something is ready. Busy: look (without
                // waiting) at the sources that gave nothing last round too.
                let wait = match busy {
                    true => Duration::ZERO,
                    false => next.saturating_duration_since(now),
                };
                if let Err(e) = self.poll.wait(wait) {
                    error!(error = %e, "forwarding worker: wait failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
                let mut orders = false;
                for token in self.poll.ready() {
                    if token == INBOX {
                        orders = true;
                        continue;
                    }
                    let slot = (token >> SOURCE_BITS) as usize;
                    let source = (token & ((1 << SOURCE_BITS) - 1)) as usize;
                    if let Some(Some(r)) = self.slots.get_mut(slot) {
                        if let Some(h) = r.hot.get_mut(source) {
                            *h = true;
                        }
                    }
                }
                if orders && !self.take_orders() {
                    return Ok(());
                }
                unpolled = 0;
            } else {
                unpolled += 1;
            }
            for slot in 0..self.slots.len() {
                let Some(Some(r)) = self.slots.get_mut(slot) else {
                    continue;
                };
                if !r.busy() {
                    continue;
                }
                // Its timers (a gap to give up, a probe) may have moved:
                // looked at in the next round.
                r.due = now;
                if let Err(e) = r.round(&mut self.batch) {
                    error!(error = %e, peer = r.lane.out.peer.0, lane = r.lane.out.lane,
                        "TUN read failed; forwarding for this lane stopped");
                    if let Some(r) = self.unslot(slot) {
                        self.failed.push((r.id, r.lane));
                    }
                }
            }
        }
    }

    /// Carries out the inbox's orders; `false` once told to stop.
    fn take_orders(&mut self) -> bool {
        self.inbox.bell.clear();
        let orders = std::mem::take(&mut *self.inbox.orders.lock());
        for order in orders {
            match order {
                Order::Stop => return false,
                Order::Add(id, lane) => self.add(id, *lane),
                Order::Remove(id, back) => {
                    let at = self
                        .slots
                        .iter()
                        .position(|r| r.as_ref().is_some_and(|r| r.id == id));
                    let lane = match at {
                        Some(slot) => self.unslot(slot).map(|r| r.lane),
                        None => self
                            .failed
                            .iter()
                            .position(|(i, _)| *i == id)
                            .map(|k| self.failed.swap_remove(k).1),
                    };
                    if let Some(lane) = lane {
                        let _ = back.send(lane);
                    }
                }
            }
        }
        true
    }

    fn add(&mut self, id: u64, lane: Lane) {
        let slot = match self.slots.iter().position(Option::is_none) {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let r = Running::new(id, lane);
        for (source, &fd) in r.fds.iter().enumerate() {
            let token = (slot as u64) << SOURCE_BITS | source as u64;
            if let Err(e) = self.poll.add(fd, token) {
                warn!(error = %e, fd, "forwarding worker: could not watch a lane's descriptor");
            }
        }
        if let Some(s) = self.slots.get_mut(slot) {
            *s = Some(r);
        }
    }

    fn unslot(&mut self, slot: usize) -> Option<Running> {
        let r = self.slots.get_mut(slot)?.take()?;
        for &fd in &r.fds {
            let _ = self.poll.remove(fd);
        }
        Some(r)
    }
}
