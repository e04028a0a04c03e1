//! Who gets one of the `max_running_agents` slots, and which running agent gives its slot
//! up for a waiting session: the whole policy in one place, as pure logic. The caller
//! passes the time in and does the I/O (reading mailboxes, stopping agents), so the policy
//! can be tested by simulation.
//!
//! The rules:
//! - **First come, first served.** A session that needs a slot gets a free one at once when
//!   nobody waits; otherwise it joins the back of one FIFO queue, and every slot that is
//!   given back goes to the head of that queue. Nobody overtakes.
//! - **One yield per waiter.** While sessions wait, the book asks exactly as many running
//!   agents to give their slot back as there are waiters not yet provided for by an
//!   earlier request; every other agent stays warm.
//! - **Longest idle first, and only once idle for [`MIN_IDLE`]** (process agents; containers:
//!   [`MIN_IDLE_CONTAINER`]). The agent asked first is the one whose session has had
//!   nothing due for the longest time, counted from its last reply, and only after that
//!   lasted the minimum, stretched to twice the session's own recent pace (at most
//!   [`MAX_IDLE`]): a chatty conversation keeps its warm agent between messages.
//! - **Turns end.** When no agent is idle long enough, an agent that has held its slot for
//!   [`MAX_TURN`] while others wait is asked to finish its batch and give the slot back;
//!   its session, if it still has work, queues again at the back. So no session holds a
//!   slot for ever, and a waiting session waits for at most the turns of the sessions
//!   queued ahead of it: **N = (sessions with work) − (slots)** other sessions' turns.
//! - **New work keeps the slot.** An agent that gets new work after it was asked, before
//!   the request took effect ([`SlotBook::confirm_yield`]), keeps its slot, and the waiter
//!   is provided for by another agent.
//!
//! Batching grows by itself under load: an agent that starts claims everything due in its
//! session as one batch (the agent's `due()` reads all due rows), so a session that waited
//! for a slot is answered in one batch however many messages queued up meanwhile.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How long a local process agent must have had nothing due before it may be asked to
/// give its slot up. The rule of thumb of ski rental: keep paying for the idle slot (the
/// waiters wait) for about as long as the alternative, a cold start if the session comes
/// back, would cost; that is never more than twice the cost of the best choice made with
/// hindsight. A process agent's cold start (spawn, runtime, opening the mailbox) costs tens
/// of milliseconds. It is also above the round trip of a machine-speed client: a reply
/// reaches it and its next message comes back in 10–20 ms, about 60 ms at the 90th
/// percentile with 100 busy conversations on this 2-core machine, so a conversation in
/// full flow keeps its warm agent. (Human follow-ups take seconds: no threshold below
/// that keeps those warm under contention, nor should it.)
pub const MIN_IDLE: Duration = Duration::from_millis(100);

/// The same for container agents (the docker backend), whose cold start costs 0.5–1 s.
pub const MIN_IDLE_CONTAINER: Duration = Duration::from_millis(500);

/// The most a session's own pace can stretch its minimum idle age to. A session whose next
/// message came back `g` after the agent's last reply gets `2 × g` (its recent gaps, see
/// [`SlotBook::note_work`]), so a client that is slower than usual (a loaded machine)
/// still keeps its warm agent; a person typing (seconds) does not hold a slot for longer
/// than this while others wait.
pub const MAX_IDLE: Duration = Duration::from_secs(1);

/// How long an agent with work may hold its slot while others wait before it is asked to
/// finish its batch and queue again. It amortises a cold start (≤ 1 s for a container)
/// at least five times over, and bounds the wait of a queued session to N turns of this
/// length (plus the batch each agent is finishing).
pub const MAX_TURN: Duration = Duration::from_secs(5);

/// One session holding a slot.
#[derive(Debug, Clone)]
struct Holder {
    /// When its turn began (the slot was granted).
    since: Instant,
    /// The last time work arrived for it or its agent wrote something.
    last_activity: Instant,
    /// Since when it has had nothing due, as observed; `None` while it has work.
    idle_since: Option<Instant>,
    /// Bumped with each piece of new work: an observation of "nothing due" made before
    /// the bump is stale.
    epoch: u64,
    /// Asked to give its slot up, at this epoch.
    asked: Option<u64>,
    /// Whether the last thing that happened was the agent writing (its answer), so that
    /// the next work measures the session's gap between an answer and its next message.
    answered: bool,
    /// The session's recent gap between an answer and the next message.
    gap: Duration,
}

impl Holder {
    /// How long this agent must have been idle before it may be asked to go.
    fn min_idle(&self, floor: Duration) -> Duration {
        (self.gap * 2).clamp(floor, MAX_IDLE.max(floor))
    }
}

/// The slots, their holders and the queue of waiting sessions.
#[derive(Debug)]
pub struct SlotBook {
    capacity: usize,
    min_idle: Duration,
    holders: HashMap<String, Holder>,
    queue: VecDeque<String>,
}

impl SlotBook {
    pub fn new(capacity: usize) -> Self {
        Self::with_min_idle(capacity, MIN_IDLE)
    }

    pub fn with_min_idle(capacity: usize, min_idle: Duration) -> Self {
        Self {
            capacity: capacity.max(1),
            min_idle,
            holders: HashMap::new(),
            queue: VecDeque::new(),
        }
    }

    /// A session asks for a slot: `true` when it holds one now (a free slot and nobody
    /// waiting, or it holds one already), `false` when it was queued (at the back).
    pub fn request(&mut self, session: &str, now: Instant) -> bool {
        if self.holders.contains_key(session) {
            return true;
        }
        if self.holders.len() < self.capacity && self.queue.is_empty() {
            self.grant(session.to_string(), now);
            return true;
        }
        if !self.queue.iter().any(|s| s == session) {
            self.queue.push_back(session.to_string());
        }
        false
    }

    fn grant(&mut self, session: String, now: Instant) {
        self.holders.insert(
            session,
            Holder {
                since: now,
                last_activity: now,
                idle_since: None,
                epoch: 0,
                asked: None,
                answered: false,
                gap: Duration::ZERO,
            },
        );
    }

    /// A session gives its slot back (its agent is gone); returns the waiting session the
    /// slot goes to, which holds it from now on.
    pub fn release(&mut self, session: &str, now: Instant) -> Option<String> {
        self.holders.remove(session)?;
        self.fill(now)
    }

    /// Hands free slots to the head of the queue; returns who got the (last) one.
    fn fill(&mut self, now: Instant) -> Option<String> {
        let mut granted = None;
        while self.holders.len() < self.capacity {
            let Some(next) = self.queue.pop_front() else {
                break;
            };
            self.grant(next.clone(), now);
            granted = Some(next);
        }
        granted
    }

    /// A waiting session gives up (shutdown). Returns who its slot went to, when it had
    /// been granted one in the meantime.
    pub fn cancel(&mut self, session: &str, now: Instant) -> Option<String> {
        self.queue.retain(|s| s != session);
        self.release(session, now)
    }

    /// New work arrived for a session: if it holds a slot, it is busy now. Work that
    /// follows an answer measures the session's pace: the larger of the new gap and half
    /// the previous estimate (a slow reply counts at once, a fast one halves the estimate).
    pub fn note_work(&mut self, session: &str, now: Instant) {
        if let Some(h) = self.holders.get_mut(session) {
            if h.answered {
                let gap = now.saturating_duration_since(h.last_activity);
                h.gap = gap.max(h.gap / 2);
                h.answered = false;
            }
            h.epoch += 1;
            h.idle_since = None;
            h.last_activity = now;
        }
    }

    /// The session's agent wrote something (finished a batch, sent a message).
    pub fn note_output(&mut self, session: &str, now: Instant) {
        if let Some(h) = self.holders.get_mut(session) {
            h.last_activity = h.last_activity.max(now);
            h.answered = true;
        }
    }

    /// The epoch to pass to [`Self::note_idle`] for an observation that starts now.
    pub fn epoch(&self, session: &str) -> Option<u64> {
        self.holders.get(session).map(|h| h.epoch)
    }

    /// An observation that began at `epoch` found nothing due: the agent has been idle
    /// since its last activity. Ignored when work arrived since the observation began.
    pub fn note_idle(&mut self, session: &str, epoch: u64) {
        if let Some(h) = self.holders.get_mut(session)
            && h.epoch == epoch
            && h.idle_since.is_none()
        {
            h.idle_since = Some(h.last_activity);
        }
    }

    /// An observation found work due (say, a deferred message came due).
    pub fn note_busy(&mut self, session: &str) {
        if let Some(h) = self.holders.get_mut(session) {
            h.idle_since = None;
        }
    }

    /// Sessions waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.queue.len()
    }

    /// Whether the session waits for a slot.
    pub fn is_waiting(&self, session: &str) -> bool {
        self.queue.iter().any(|s| s == session)
    }

    /// Holders not asked to yield yet: those worth observing.
    pub fn unasked(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .holders
            .iter()
            .filter(|(_, h)| h.asked.is_none())
            .map(|(s, _)| s.clone())
            .collect();
        v.sort();
        v
    }

    /// Which agents to ask to give their slot up now (they are marked as asked): one per
    /// waiter not yet provided for, longest idle first (idle at least [`MIN_IDLE`]), then
    /// those whose turn passed [`MAX_TURN`], longest turn first.
    pub fn to_yield(&mut self, now: Instant) -> Vec<String> {
        let asked = self.holders.values().filter(|h| h.asked.is_some()).count();
        let need = self.queue.len().saturating_sub(asked);
        if need == 0 {
            return Vec::new();
        }
        let mut idle: Vec<(Instant, &String)> = self
            .holders
            .iter()
            .filter(|(_, h)| h.asked.is_none())
            .filter_map(|(s, h)| {
                h.idle_since
                    .filter(|t| now.saturating_duration_since(*t) >= h.min_idle(self.min_idle))
                    .map(|t| (t, s))
            })
            .collect();
        idle.sort();
        let mut turn_over: Vec<(Instant, &String)> = self
            .holders
            .iter()
            .filter(|(_, h)| h.asked.is_none())
            .filter(|(_, h)| now.saturating_duration_since(h.since) >= MAX_TURN)
            .map(|(s, h)| (h.since, s))
            .collect();
        turn_over.sort();
        let mut chosen: Vec<String> = Vec::with_capacity(need);
        for (_, s) in idle.into_iter().chain(turn_over) {
            if chosen.len() == need {
                break;
            }
            if !chosen.contains(s) {
                chosen.push(s.clone());
            }
        }
        for s in &chosen {
            if let Some(h) = self.holders.get_mut(s) {
                h.asked = Some(h.epoch);
            }
        }
        chosen
    }

    /// When [`Self::to_yield`] may next choose someone without any new observation: an
    /// idle agent reaching the minimum idle age, or a turn passing [`MAX_TURN`]. `None`
    /// while every waiter is provided for.
    pub fn next_deadline(&self) -> Option<Instant> {
        let asked = self.holders.values().filter(|h| h.asked.is_some()).count();
        if self.queue.len() <= asked {
            return None;
        }
        self.holders
            .values()
            .filter(|h| h.asked.is_none())
            .flat_map(|h| {
                [
                    h.idle_since.map(|t| t + h.min_idle(self.min_idle)),
                    Some(h.since + MAX_TURN),
                ]
            })
            .flatten()
            .min()
    }

    /// The agent is about to act on a request to give its slot up: `true` when it should
    /// (still idle, or its turn is over), `false` when new work arrived for an idle agent
    /// since it was asked; it then keeps its slot and the request is withdrawn.
    pub fn confirm_yield(&mut self, session: &str, now: Instant) -> bool {
        let Some(h) = self.holders.get_mut(session) else {
            return true;
        };
        match h.asked {
            Some(epoch)
                if h.epoch != epoch && now.saturating_duration_since(h.since) < MAX_TURN =>
            {
                h.asked = None;
                false
            }
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A book with `holders` sessions s0.. holding slots, all granted at `t0`.
    fn full(capacity: usize, t0: Instant) -> SlotBook {
        let mut book = SlotBook::new(capacity);
        for i in 0..capacity {
            assert!(book.request(&format!("s{i}"), t0));
        }
        book
    }

    fn idle(book: &mut SlotBook, session: &str) {
        let epoch = book.epoch(session).unwrap();
        book.note_idle(session, epoch);
    }

    #[test]
    fn free_slots_are_granted_then_sessions_queue_first_come_first_served() {
        let t0 = Instant::now();
        let mut book = full(2, t0);
        assert!(!book.request("a", t0));
        assert!(!book.request("b", t0));
        assert!(!book.request("a", t0), "asking twice keeps one place");
        assert_eq!(book.waiting(), 2);
        assert_eq!(book.release("s1", t0), Some("a".into()));
        assert_eq!(book.release("s0", t0), Some("b".into()));
        assert_eq!(book.release("a", t0), None);
        // With a slot free and nobody waiting, a request is granted at once.
        assert!(book.request("c", t0));
    }

    #[test]
    fn a_waiter_that_gives_up_leaves_the_queue() {
        let t0 = Instant::now();
        let mut book = full(1, t0);
        book.request("a", t0);
        book.request("b", t0);
        assert_eq!(book.cancel("a", t0), None);
        assert_eq!(book.release("s0", t0), Some("b".into()));
    }

    #[test]
    fn nobody_is_asked_while_nobody_waits() {
        let t0 = Instant::now();
        let mut book = full(3, t0);
        for s in ["s0", "s1", "s2"] {
            idle(&mut book, s);
        }
        assert!(book.to_yield(t0 + Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn the_agent_idle_the_longest_is_chosen() {
        let t0 = Instant::now();
        let mut book = full(3, t0);
        // s1 went quiet first, then s2, then s0.
        book.note_work("s1", t0 + ms(10));
        book.note_work("s2", t0 + ms(20));
        book.note_work("s0", t0 + ms(30));
        for s in ["s0", "s1", "s2"] {
            idle(&mut book, s);
        }
        book.request("w", t0 + ms(40));
        assert_eq!(book.to_yield(t0 + ms(1000)), vec!["s1".to_string()]);
    }

    #[test]
    fn the_idle_age_counts_from_the_agents_last_output() {
        let t0 = Instant::now();
        let mut book = full(2, t0);
        book.note_work("s0", t0);
        book.note_work("s1", t0);
        // s0 answered (wrote) late: it has been idle for less time than s1.
        book.note_output("s0", t0 + ms(500));
        book.note_output("s1", t0 + ms(100));
        idle(&mut book, "s0");
        idle(&mut book, "s1");
        book.request("w", t0 + ms(600));
        assert_eq!(book.to_yield(t0 + ms(600)), vec!["s1".to_string()]);
    }

    #[test]
    fn the_next_deadline_is_the_first_idle_age_or_turn_end_to_be_reached() {
        let t0 = Instant::now();
        let mut book = full(2, t0);
        assert_eq!(book.next_deadline(), None, "nobody waits");
        book.request("w", t0);
        assert_eq!(book.next_deadline(), Some(t0 + MAX_TURN));
        book.note_output("s1", t0 + ms(100));
        idle(&mut book, "s1");
        assert_eq!(book.next_deadline(), Some(t0 + ms(100) + MIN_IDLE));
        assert_eq!(
            book.to_yield(t0 + ms(100) + MIN_IDLE),
            vec!["s1".to_string()]
        );
        assert_eq!(book.next_deadline(), None, "the waiter is provided for");
    }

    #[test]
    fn one_yield_per_waiter() {
        let t0 = Instant::now();
        let mut book = full(4, t0);
        for s in ["s0", "s1", "s2", "s3"] {
            idle(&mut book, s);
        }
        let later = t0 + Duration::from_secs(1);
        book.request("w1", later);
        assert_eq!(book.to_yield(later).len(), 1);
        // Asked again before the first agent is gone: nothing more is asked.
        assert!(book.to_yield(later + ms(100)).is_empty());
        book.request("w2", later);
        book.request("w3", later);
        assert_eq!(book.to_yield(later + ms(100)).len(), 2);
        assert!(book.to_yield(later + ms(200)).is_empty());
        // Three asked, three waiters: the fourth agent stays warm.
        assert_eq!(book.unasked().len(), 1);
    }

    #[test]
    fn no_yield_before_the_minimum_idle_age() {
        let t0 = Instant::now();
        let mut book = full(1, t0);
        idle(&mut book, "s0");
        book.request("w", t0);
        assert!(book.to_yield(t0 + MIN_IDLE - ms(1)).is_empty());
        assert_eq!(book.to_yield(t0 + MIN_IDLE), vec!["s0".to_string()]);
    }

    #[test]
    fn a_slower_client_stretches_its_minimum_idle_age_up_to_a_limit() {
        let t0 = Instant::now();
        let mut book = full(1, t0);
        book.request("w", t0);
        // Answered at 100 ms; the next message came 150 ms later; answered again.
        book.note_output("s0", t0 + ms(100));
        book.note_work("s0", t0 + ms(250));
        book.note_output("s0", t0 + ms(260));
        idle(&mut book, "s0");
        assert!(book.to_yield(t0 + ms(260) + ms(299)).is_empty());
        assert_eq!(book.next_deadline(), Some(t0 + ms(260) + ms(300)));
        assert_eq!(book.to_yield(t0 + ms(560)), vec!["s0".to_string()]);

        // A person's pace (seconds between messages) holds the slot for MAX_IDLE at most.
        let mut book = full(1, t0);
        book.request("w", t0);
        book.note_output("s0", t0);
        book.note_work("s0", t0 + ms(2000));
        book.note_output("s0", t0 + ms(2100));
        idle(&mut book, "s0");
        let answered = t0 + ms(2100);
        assert!(book.to_yield(answered + MAX_IDLE - ms(1)).is_empty());
        assert_eq!(book.to_yield(answered + MAX_IDLE), vec!["s0".to_string()]);
    }

    #[test]
    fn an_agent_with_new_work_is_not_chosen() {
        let t0 = Instant::now();
        let mut book = full(2, t0);
        idle(&mut book, "s0");
        idle(&mut book, "s1");
        book.note_work("s0", t0 + ms(100));
        book.request("w", t0 + ms(100));
        assert_eq!(book.to_yield(t0 + ms(1000)), vec!["s1".to_string()]);

        // An observation of "idle" that began before the work arrived does not count.
        let mut book = full(1, t0);
        let epoch = book.epoch("s0").unwrap();
        book.note_work("s0", t0 + ms(10));
        book.note_idle("s0", epoch);
        book.request("w", t0);
        assert!(book.to_yield(t0 + ms(1000)).is_empty());
    }

    #[test]
    fn an_asked_agent_that_gets_new_work_keeps_its_slot() {
        let t0 = Instant::now();
        let mut book = full(2, t0);
        idle(&mut book, "s0");
        book.request("w", t0);
        let now = t0 + ms(300);
        assert_eq!(book.to_yield(now), vec!["s0".to_string()]);
        book.note_work("s0", now);
        assert!(!book.confirm_yield("s0", now), "it keeps its slot");
        // The waiter is provided for by the next agent to go idle.
        idle(&mut book, "s1");
        assert_eq!(book.to_yield(now + MIN_IDLE), vec!["s1".to_string()]);
        assert!(book.confirm_yield("s1", now + MIN_IDLE));
    }

    #[test]
    fn a_busy_agent_yields_only_when_its_turn_is_over_longest_turn_first() {
        let t0 = Instant::now();
        let mut book = SlotBook::new(2);
        book.request("old", t0);
        book.request("new", t0 + Duration::from_secs(1));
        book.request("w", t0 + Duration::from_secs(1));
        assert!(book.to_yield(t0 + MAX_TURN - ms(1)).is_empty());
        assert_eq!(book.to_yield(t0 + MAX_TURN), vec!["old".to_string()]);
        // A busy agent asked at the end of its turn yields even with new work.
        book.note_work("old", t0 + MAX_TURN);
        assert!(book.confirm_yield("old", t0 + MAX_TURN));
    }

    #[test]
    fn an_idle_agent_is_preferred_to_one_whose_turn_is_over() {
        let t0 = Instant::now();
        let mut book = SlotBook::new(2);
        book.request("busy", t0);
        book.request("quiet", t0 + Duration::from_secs(4));
        idle(&mut book, "quiet");
        book.request("w", t0);
        assert_eq!(
            book.to_yield(t0 + Duration::from_secs(10)),
            vec!["quiet".to_string()]
        );
    }

    /// A small deterministic simulation: `sessions` sessions share `slots` slots; each
    /// session gets work at pseudo-random times, its agent takes a few ticks per batch and
    /// goes idle when it has answered everything. The supervisor's side is played here: it
    /// observes holders, asks the chosen agents to yield, and they release after finishing.
    /// Returns, for each completed wait, how many other sessions' turns began during it,
    /// and the number of queued sessions ahead of it when it started waiting.
    fn simulate(
        sessions: usize,
        slots: usize,
        ticks: u64,
        busy_forever: bool,
    ) -> Vec<(usize, usize)> {
        let t0 = Instant::now();
        let tick = ms(50);
        let mut book = SlotBook::new(slots);
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        // Per session: work due (messages), remaining ticks of the current batch, and
        // whether its agent is asked to stop after the batch.
        let mut work = vec![0u32; sessions];
        let mut batch_left = vec![0u32; sessions];
        let mut stopping = vec![false; sessions];
        let mut running = vec![false; sessions];
        // Per waiting session: turns begun (grants to others) since it queued, and the
        // number of sessions ahead of it then.
        let mut waits: HashMap<usize, (usize, usize)> = HashMap::new();
        let mut done_waits = Vec::new();
        let name = |i: usize| format!("s{i}");
        let index = |s: &str| s[1..].parse::<usize>().unwrap();
        let grant = |who: usize,
                     waits: &mut HashMap<usize, (usize, usize)>,
                     running: &mut [bool],
                     done: &mut Vec<(usize, usize)>| {
            running[who] = true;
            if let Some(w) = waits.remove(&who) {
                done.push(w);
            }
            for (other, w) in waits.iter_mut() {
                if *other != who {
                    w.0 += 1;
                }
            }
        };
        for step in 0..ticks {
            let now = t0 + tick * step as u32;
            // New work arrives.
            for i in 0..sessions {
                let arrives = busy_forever || rand() % 40 == 0;
                if arrives && (step < ticks - 200) {
                    work[i] += 1;
                    book.note_work(&name(i), now);
                    if !running[i] && !waits.contains_key(&i) {
                        let ahead = book.waiting();
                        if book.request(&name(i), now) {
                            grant(i, &mut waits, &mut running, &mut done_waits);
                        } else {
                            waits.insert(i, (0, ahead));
                        }
                    }
                }
            }
            // Agents work: a batch takes everything due and 1–3 ticks.
            for i in 0..sessions {
                if !running[i] {
                    continue;
                }
                if batch_left[i] == 0 && work[i] > 0 {
                    work[i] = 0;
                    batch_left[i] = 1 + (rand() % 3) as u32;
                }
                if batch_left[i] > 0 {
                    batch_left[i] -= 1;
                    if batch_left[i] == 0 {
                        book.note_output(&name(i), now);
                    }
                }
                if batch_left[i] == 0 && stopping[i] {
                    // The agent exits; with work left, its session queues again.
                    stopping[i] = false;
                    running[i] = false;
                    if let Some(next) = book.release(&name(i), now) {
                        grant(index(&next), &mut waits, &mut running, &mut done_waits);
                    }
                    if work[i] > 0 {
                        let ahead = book.waiting();
                        if book.request(&name(i), now) {
                            grant(i, &mut waits, &mut running, &mut done_waits);
                        } else {
                            waits.insert(i, (0, ahead));
                        }
                    }
                }
            }
            // The supervisor observes and asks.
            for s in book.unasked() {
                let i = index(&s);
                let epoch = book.epoch(&s).unwrap();
                if work[i] == 0 && batch_left[i] == 0 {
                    book.note_idle(&s, epoch);
                } else {
                    book.note_busy(&s);
                }
            }
            for s in book.to_yield(now) {
                let i = index(&s);
                if book.confirm_yield(&s, now) {
                    stopping[i] = true;
                }
            }
            assert!(running.iter().filter(|r| **r).count() <= slots);
        }
        assert!(
            waits.is_empty(),
            "sessions still waiting at the end: {waits:?}"
        );
        done_waits
    }

    #[test]
    fn no_session_waits_longer_than_the_turns_of_the_sessions_ahead_of_it() {
        for (sessions, slots, busy) in
            [(30, 4, false), (100, 8, false), (12, 4, true), (5, 5, true)]
        {
            let waits = simulate(sessions, slots, 4000, busy);
            assert!(!waits.is_empty() || sessions <= slots);
            for (turns, ahead) in &waits {
                // FIFO: exactly the sessions ahead of it were served first...
                assert!(
                    turns <= ahead,
                    "{turns} turns began during a wait with {ahead} ahead"
                );
                // ...and there are never more of them than sessions without a slot.
                assert!(*ahead <= sessions - slots);
            }
        }
    }

    #[test]
    fn always_busy_sessions_take_turns_round_robin() {
        // Every session always has work: turns end after MAX_TURN and each waiter is
        // served after exactly the sessions queued ahead of it.
        let waits = simulate(12, 4, 4000, true);
        assert!(waits.len() > 12, "turns went round: {}", waits.len());
        assert!(waits.iter().all(|(turns, _)| *turns <= 12 - 4));
    }
}
