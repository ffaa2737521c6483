//! A bound on the requests being answered at once. Past it a request gets a 503 with
//! `Retry-After` before any work is done for it, so under an overload the excess costs a few
//! microseconds each and the requests let in keep their latency: without it every connection's
//! request is let in, and all of them share the CPU until each takes seconds.
//!
//! A place is for work: a request holds it while its handler runs, and gives it back when its
//! answer is ready. An answer that then waits for the client (one that stops reading, an HTTP/2
//! window left at zero) holds no place; the listener bounds those answers' bytes per connection
//! and in total, and closes a connection whose answers stop moving
//! ([`bookstore_server::http_server`]).
//!
//! **One connection holds a fair share.** A connection already holding its share of the
//! places (all of them over the connections holding any, and never more than three quarters)
//! is let in past it only while a quarter of the places are free, so another client always
//! finds one; in the waiting room, a connection under its share goes first.
//!
//! **Clients that ask again at once wait instead of spinning.** An overload from arrivals that
//! do not wait for their answers (an open loop: new visitors) is refused at once, which is what
//! keeps its goodput: each refusal costs a few microseconds, while a request kept waiting keeps
//! its connection and its buffers, and the clients open more connections meanwhile (measured:
//! letting every request wait up to 250 ms turned 99 % of the peak at the peak into 76 %). But
//! a fixed set of clients that ask again the moment they are refused (a closed loop) would only
//! spin on refusals, each taking CPU from the pages: 256 such connections were served 0.47× of
//! what they got with every request let in. The two are told apart by a probe
//! ([`StormWatch`]): when refusals come several times as often as requests are let in, each
//! refusal is slowed by [`PROBE_DELAY`] for one window. Clients that ask again at once then
//! ask far less often; arrivals that do not wait come as often as before. For the first, a
//! room opens where a request that finds no place waits for one, first come first served (a
//! connection under its share first), for at most [`ROOM_WAIT`]. The room closes as soon as a
//! request waits it out or the listener nears its connection cap, the signs of arrivals that
//! outrun the places.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    extract::{Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use bookstore_common::metrics::Metrics;
use bookstore_server::http_server::Connection;
use metrics::Counter;
use tokio::sync::oneshot;

use crate::error::{AppError, HtmlError, JsonError};

/// How long a refusal waits during a storm, when the room is full.
pub const STORM_DELAY: Duration = Duration::from_millis(100);

/// How long a request may wait in the room for a place.
pub const ROOM_WAIT: Duration = Duration::from_millis(250);

/// Requests in the room at most.
const ROOM_SIZE: usize = 4096;

/// Past this share of its connection cap, the listener closes the room.
const ROOM_MAX_FILL: f64 = 0.75;

/// Requests being answered now, at most, and the room where others wait for a place during a
/// storm of refusals.
#[derive(Debug)]
pub struct InFlight {
    max: usize,
    in_use: AtomicUsize,
    room: Mutex<VecDeque<Waiter>>,
    /// Requests in the room now.
    waiting: AtomicUsize,
    /// Connections holding a place now.
    active: AtomicUsize,
    storm: StormWatch,
    /// `bookstore_requests_shed_total`.
    shed: Counter,
}

/// A request waiting for a place.
#[derive(Debug)]
struct Waiter {
    place: oneshot::Sender<Place>,
    connection: Option<Connection>,
}

/// A place of work, given back when dropped (to the next request waiting, if any).
#[derive(Debug)]
pub struct Place {
    limit: Arc<InFlight>,
    connection: Option<Connection>,
    /// Whether dropping it gives the place back (a place handed to a request that had just given
    /// up is passed on instead).
    armed: bool,
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(connection) = &self.connection
            && connection.places().fetch_sub(1, Ordering::Relaxed) == 1
        {
            self.limit.active.fetch_sub(1, Ordering::Relaxed);
        }
        if self.armed {
            self.limit.release();
        }
    }
}

impl InFlight {
    pub fn new(max: usize, metrics: &Metrics) -> Arc<Self> {
        let limit = Arc::new(InFlight {
            max: max.max(1),
            in_use: AtomicUsize::new(0),
            room: Mutex::default(),
            waiting: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            storm: StormWatch::new(Instant::now()),
            shed: metrics.counter("bookstore_requests_shed_total", &[]),
        });
        metrics
            .gauge("bookstore_requests_in_flight_max", &[])
            .set(limit.max as f64);
        let gauge = metrics.gauge("bookstore_requests_in_flight", &[]);
        let sampled = Arc::downgrade(&limit);
        metrics.on_scrape(move || {
            if let Some(limit) = sampled.upgrade() {
                gauge.set(limit.in_use.load(Ordering::Relaxed) as f64);
            }
        });
        limit
    }

    /// A connection's fair share of the places now: all of them over the connections holding
    /// any, and never the last quarter.
    fn share(&self) -> usize {
        let fair = self.max / self.active.load(Ordering::Relaxed).max(1);
        fair.min(self.max - self.max / 4).max(1)
    }

    fn under_share(&self, connection: Option<&Connection>) -> bool {
        connection.is_none_or(|c| c.places().load(Ordering::Relaxed) < self.share())
    }

    /// Takes a free place, if there is one this connection may have: within its share, or
    /// with a quarter of the places still free.
    fn take_free(&self, connection: Option<&Connection>) -> bool {
        let under_share = self.under_share(connection);
        let reserve = self.max / 4;
        self.in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max && (under_share || self.max - n > reserve)).then_some(n + 1)
            })
            .is_ok()
    }

    /// A place now, if one is free and nobody waits for one.
    fn try_place(self: &Arc<Self>, connection: Option<&Connection>) -> Option<Place> {
        if self.waiting.load(Ordering::Acquire) > 0 || !self.take_free(connection) {
            return None;
        }
        Some(self.grant(connection.cloned()))
    }

    fn grant(self: &Arc<Self>, connection: Option<Connection>) -> Place {
        if let Some(connection) = &connection
            && connection.places().fetch_add(1, Ordering::Relaxed) == 0
        {
            self.active.fetch_add(1, Ordering::Relaxed);
        }
        Place {
            limit: self.clone(),
            connection,
            armed: true,
        }
    }

    /// A place, after waiting in the room for at most [`ROOM_WAIT`]; None if the room is full
    /// or the wait ran out.
    async fn wait(self: &Arc<Self>, connection: Option<&Connection>) -> Option<Place> {
        let (mut placed, _in_room) = {
            let mut room = self.room.lock().unwrap_or_else(|p| p.into_inner());
            while room.front().is_some_and(|w| w.place.is_closed()) {
                room.pop_front();
            }
            if room.is_empty() && self.take_free(connection) {
                drop(room);
                return Some(self.grant(connection.cloned()));
            }
            if self.waiting.load(Ordering::Acquire) >= ROOM_SIZE {
                return None;
            }
            let (tx, rx) = oneshot::channel();
            room.push_back(Waiter {
                place: tx,
                connection: connection.cloned(),
            });
            (rx, InRoom::enter(&self.waiting))
        };
        tokio::select! {
            place = &mut placed => return place.ok(),
            () = tokio::time::sleep(ROOM_WAIT) => {}
        }
        // No place may come now; one that came meanwhile is taken.
        placed.close();
        if let Ok(place) = placed.try_recv() {
            return Some(place);
        }
        self.storm.waited_out(Instant::now());
        None
    }

    /// A place was given back: to the next request waiting (the first from a connection under
    /// its share, else the first), or to the pool.
    fn release(self: &Arc<Self>) {
        let mut room = self.room.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let pick = room
                .iter()
                .position(|w| self.under_share(w.connection.as_ref()))
                .or(if room.is_empty() { None } else { Some(0) });
            let Some(waiter) = pick.and_then(|at| room.remove(at)) else {
                self.in_use.fetch_sub(1, Ordering::AcqRel);
                return;
            };
            if waiter.place.is_closed() {
                continue;
            }
            match waiter.place.send(self.grant(waiter.connection)) {
                Ok(()) => {
                    self.storm.served_from_room(Instant::now());
                    return;
                }
                // Gave up meanwhile: the place goes to the next one.
                Err(mut place) => place.armed = false,
            }
        }
    }
}

/// A request counted in the room from when it joins until it leaves, however it leaves (with a
/// place, refused, or dropped because its client went away).
struct InRoom<'a>(&'a AtomicUsize);

impl<'a> InRoom<'a> {
    fn enter(waiting: &'a AtomicUsize) -> Self {
        waiting.fetch_add(1, Ordering::AcqRel);
        InRoom(waiting)
    }
}

impl Drop for InRoom<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Lets a request in if a place is free (or, during a storm of refusals, once one frees within
/// [`ROOM_WAIT`]); else answers 503, JSON on the API and a page elsewhere. The place is given
/// back when the answer is ready.
pub async fn limit(
    State(in_flight): State<Arc<InFlight>>,
    request: Request,
    next: Next,
) -> Response {
    let arrived = Instant::now();
    let connection = request.extensions().get::<Connection>();
    let place = match in_flight.try_place(connection) {
        Some(place) => Some(place),
        None if in_flight.storm.room_open(arrived) => {
            if connection.is_some_and(|c| c.listener_fill() > ROOM_MAX_FILL) {
                // Clients are opening connections: waiting would only make them open more.
                in_flight
                    .storm
                    .close_room_at(arrived, "the listener nears its connection cap");
                None
            } else {
                in_flight.wait(connection).await
            }
        }
        None => None,
    };
    let Some(place) = place else {
        in_flight.shed.increment(1);
        if let Some(delay) = in_flight.storm.refused(arrived) {
            // A probe of the clients, or clients asking again at once with no room for them:
            // the refusal waits, so they ask again a few times a second instead of thousands.
            tokio::time::sleep(delay).await;
        }
        return if request.uri().path().starts_with("/api/") {
            JsonError(AppError::Busy).into_response()
        } else {
            HtmlError(AppError::Busy).into_response()
        };
    };
    in_flight.storm.let_in(arrived);
    let response = next.run(request).await;
    drop(place);
    response
}

/// Counts, over windows of [`StormWatch::WINDOW`], the requests let in and refused, and tells
/// whether the refusals come from clients that ask again at once:
///
/// - **Stormy windows** ([`StormWatch::RATIO`] or more refused for each let in, at least
///   [`StormWatch::RATE`] a second, [`StormWatch::STORMY_WINDOWS`] in a row, or one violent
///   window, below) start a **probe**:
///   for one window each refusal waits [`PROBE_DELAY`]. Clients that ask again at once then ask
///   far less often (each waits for its answer); arrivals that do not wait for their answers
///   (an open loop) come as often as before.
/// - If the refusals a second fell to [`StormWatch::PROBE_DROP`] of what they were, the **room
///   opens**: it stays open [`StormWatch::HOLD`] after it last served a request, and closes at
///   once when a request waits it out or the listener nears its connection cap. Otherwise, and
///   after the room was closed at once, no probe starts for [`StormWatch::COOLDOWN`] (a room
///   that lapses after [`StormWatch::HOLD`] sets no such pause).
/// - **A violent storm** ([`StormWatch::VIOLENT_RATIO`] or more, and
///   [`StormWatch::VIOLENT_RATE`] a second, in one window) starts a probe at once; while no
///   probe may start (the cooldown, or the room full), each refusal waits [`STORM_DELAY`] for
///   [`StormWatch::HOLD`], so a client asking again at once asks a few times a second.
///
/// An open loop past the peak is refused about as often as it is let in, so it seldom looks
/// stormy; when a dip in the CPU makes it look so, the probe tells it apart, at the cost of
/// one window of slowed refusals.
#[derive(Debug)]
struct StormWatch {
    epoch: Instant,
    /// When the window began, in nanoseconds after `epoch`.
    window_start: AtomicU64,
    let_in: AtomicU64,
    refused: AtomicU64,
    /// Windows in a row that looked stormy.
    stormy_windows: AtomicU64,
    /// Until when refusals wait for the probe, in nanoseconds after `epoch`; 0 with none.
    probe_until: AtomicU64,
    /// Refusals a second before the probe.
    probe_baseline: AtomicU64,
    /// Until when the room is open, in nanoseconds after `epoch`.
    room_until: AtomicU64,
    /// No probe starts before this, in nanoseconds after `epoch`.
    calm_until: AtomicU64,
    /// Until when refusals wait, in nanoseconds after `epoch`.
    delay_until: AtomicU64,
}

/// How long a refusal waits during a probe.
pub const PROBE_DELAY: Duration = Duration::from_millis(100);

impl StormWatch {
    const WINDOW: Duration = Duration::from_millis(200);
    /// A few percent of a CPU at some 14 µs a refusal (docs/performance.md): the probe tells
    /// clients apart, so the bar need not be high.
    const RATE: u64 = 2_000;
    /// The violent storm's bar: about a seventh of a CPU.
    const VIOLENT_RATE: u64 = 10_000;
    /// Above an open loop's at up to twice the peak (about one refused for each let in), below
    /// a closed loop's (256 connections: 5.3; 8 h2c connections of 200 streams: 3.9).
    const RATIO: u64 = 3;
    const STORMY_WINDOWS: u64 = 2;
    /// Clients that ask again at once are refused this share of their former rate or less
    /// during a probe: each asks at most ten times a second then, so 1,472 h2c streams (8
    /// connections × 200, 128 of them let in) are refused 14,720 times a second at most,
    /// against some 70,000 (measured with h2load); an open loop's arrivals come as often as
    /// before.
    const PROBE_DROP: f64 = 0.5;
    /// After a probe found an open loop, or the room was closed at once, no probe starts for
    /// this long.
    const COOLDOWN: Duration = Duration::from_secs(10);
    /// Far above an open loop's, in any window.
    const VIOLENT_RATIO: u64 = 10;
    const HOLD: Duration = Duration::from_secs(2);

    fn new(epoch: Instant) -> Self {
        StormWatch {
            epoch,
            window_start: AtomicU64::new(0),
            let_in: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            stormy_windows: AtomicU64::new(0),
            probe_until: AtomicU64::new(0),
            probe_baseline: AtomicU64::new(0),
            room_until: AtomicU64::new(0),
            calm_until: AtomicU64::new(0),
            delay_until: AtomicU64::new(0),
        }
    }

    fn at(&self, at: Instant) -> u64 {
        nanos(at.saturating_duration_since(self.epoch))
    }

    fn room_open(&self, at: Instant) -> bool {
        self.at(at) < self.room_until.load(Ordering::Acquire)
    }

    fn let_in(&self, at: Instant) {
        self.let_in.fetch_add(1, Ordering::Relaxed);
        self.close_window(at);
    }

    /// Counts a refusal at `at`, and how long it must wait, if at all.
    fn refused(&self, at: Instant) -> Option<Duration> {
        self.refused.fetch_add(1, Ordering::Relaxed);
        self.close_window(at);
        let now = self.at(at);
        if now < self.probe_until.load(Ordering::Acquire) {
            Some(PROBE_DELAY)
        } else if now < self.delay_until.load(Ordering::Acquire) {
            Some(STORM_DELAY)
        } else {
            None
        }
    }

    /// The room served a request: it stays open.
    fn served_from_room(&self, at: Instant) {
        if self.room_open(at) {
            self.room_until
                .fetch_max(self.at(at) + nanos(Self::HOLD), Ordering::AcqRel);
        }
    }

    /// Closes the room, and starts no probe for [`StormWatch::COOLDOWN`] from `now` (ns after
    /// `epoch`), saying why.
    fn close_room(&self, now: u64, why: &str) {
        self.calm_until
            .store(now + nanos(Self::COOLDOWN), Ordering::Release);
        if self.room_until.swap(0, Ordering::AcqRel) > now {
            tracing::warn!("the waiting room closes: {why}; refusals are immediate again");
        }
    }

    /// A request waited the room's whole bound: arrivals outrun the places, and waiting only
    /// piles them up.
    fn waited_out(&self, at: Instant) {
        self.close_room(self.at(at), "a request waited the whole bound in it");
    }

    fn close_room_at(&self, at: Instant, why: &str) {
        self.close_room(self.at(at), why);
    }

    /// Ends the window if it has run its length (one caller does; the others go on), and
    /// judges from its counts.
    fn close_window(&self, at: Instant) {
        let now = self.at(at);
        let start = self.window_start.load(Ordering::Acquire);
        let length = now.saturating_sub(start);
        if length < nanos(Self::WINDOW)
            || self
                .window_start
                .compare_exchange(start, now, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return;
        }
        let let_in = self.let_in.swap(0, Ordering::AcqRel);
        let refused = self.refused.swap(0, Ordering::AcqRel);
        let per_second = refused as f64 / Duration::from_nanos(length).as_secs_f64();
        let violent =
            per_second >= Self::VIOLENT_RATE as f64 && refused >= Self::VIOLENT_RATIO * let_in;
        let stormy = per_second >= Self::RATE as f64 && refused >= Self::RATIO * let_in;
        let probe = self.probe_until.load(Ordering::Acquire);
        if probe > 0 && now >= probe {
            // The probe's window: did the clients slow down with the refusals?
            self.probe_until.store(0, Ordering::Release);
            let before = self.probe_baseline.load(Ordering::Acquire) as f64;
            if per_second <= before * Self::PROBE_DROP {
                self.room_until
                    .store(now + nanos(Self::HOLD), Ordering::Release);
                tracing::warn!(
                    refused_per_second_before = before.round(),
                    refused_per_second_slowed = per_second.round(),
                    "clients ask again the moment they are refused: requests now wait up to {} \
                     ms for a place",
                    ROOM_WAIT.as_millis()
                );
                return;
            }
            self.calm_until
                .store(now + nanos(Self::COOLDOWN), Ordering::Release);
        }
        let probing = now < self.probe_until.load(Ordering::Acquire);
        let room = self.room_until.load(Ordering::Acquire) > now;
        let in_a_row = if stormy {
            self.stormy_windows.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            self.stormy_windows.store(0, Ordering::Release);
            0
        };
        let calm = now < self.calm_until.load(Ordering::Acquire);
        if !probing && !room && !calm && (violent || in_a_row >= Self::STORMY_WINDOWS) {
            self.stormy_windows.store(0, Ordering::Release);
            self.probe_baseline
                .store(per_second as u64, Ordering::Release);
            self.probe_until
                .store(now + nanos(Self::WINDOW), Ordering::Release);
            return;
        }
        // No probe now (one found an open loop lately, or the room is full): a violent storm's
        // refusals wait.
        if violent && !probing {
            let was = self
                .delay_until
                .fetch_max(now + nanos(Self::HOLD), Ordering::AcqRel);
            if was <= now {
                tracing::warn!(
                    refused_per_second = per_second.round(),
                    let_in,
                    refused,
                    "a storm of refusals: each now waits {} ms",
                    STORM_DELAY.as_millis()
                );
            }
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
