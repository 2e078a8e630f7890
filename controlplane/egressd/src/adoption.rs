//! When to compare the learned addresses in the kernel with the daemon's FQDN table.
//!
//! The kernel allows the addresses of an answer to an allowed name before the daemon sees
//! it; the daemon adopts them (or takes them back) when it reads the answer. An address stays
//! unadopted only when its answer never reached the daemon whole: lost on the way (the
//! kernel counts those), cut after the part of it the daemon gets, or unparsable. Finding
//! such addresses means walking the whole `fqdn_addresses` map, a system call per entry,
//! under the daemon's lock: done every half second regardless, that walk was 7% of the
//! daemon's CPU time with 4,096 names answered 20,000 times a second, and it grows with every
//! learned address. So it runs when one of those causes may have struck, while addresses it
//! found wait for their second sighting, and otherwise every [`BACKSTOP`] in case a cause
//! nobody foresaw left some behind.

use std::time::{Duration, Instant};

/// The longest time between two walks.
pub const BACKSTOP: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct AdoptionCheck {
    /// The last walk; `None` before the first.
    last_walk: Option<Instant>,
    /// The kernel's count of lost answers when last read.
    answer_drops: Option<u64>,
    /// An answer was lost, or arrived that the daemon could not read whole, since the last
    /// walk.
    answer_missed: bool,
}

impl Default for AdoptionCheck {
    fn default() -> Self {
        Self::new()
    }
}

impl AdoptionCheck {
    /// The first check walks: a previous daemon may have left addresses behind.
    pub fn new() -> Self {
        AdoptionCheck {
            last_walk: None,
            answer_drops: None,
            answer_missed: false,
        }
    }

    /// An answer arrived cut, or did not parse: the kernel may hold addresses of it that the
    /// daemon cannot know.
    pub fn answer_unread(&mut self) {
        self.answer_missed = true;
    }

    /// The kernel's count of lost answers, read at each check (`None` when it could not be
    /// read: then every check walks). Whether answers may have been lost since it was last
    /// read: then the next check walks.
    pub fn note_answer_drops(&mut self, answer_drops: Option<u64>) -> bool {
        let lost = answer_drops.is_none() || answer_drops != self.answer_drops;
        self.answer_drops = answer_drops;
        self.answer_missed |= lost;
        lost
    }

    /// Whether to walk now, and if so it counts as done. `awaiting_second_sighting` says the
    /// last walk found unadopted addresses.
    pub fn due(&mut self, now: Instant, awaiting_second_sighting: bool) -> bool {
        let due = self.answer_missed
            || awaiting_second_sighting
            || self
                .last_walk
                .is_none_or(|last| now.saturating_duration_since(last) >= BACKSTOP);
        if due {
            self.last_walk = Some(now);
            self.answer_missed = false;
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(500);

    /// One check as the daemon makes it: the count of lost answers, then whether to walk.
    fn tick(
        check: &mut AdoptionCheck,
        now: Instant,
        answer_drops: Option<u64>,
        awaiting_second_sighting: bool,
    ) -> bool {
        check.note_answer_drops(answer_drops);
        check.due(now, awaiting_second_sighting)
    }

    /// A check that has walked once, at `start`, with no answer lost.
    fn walked_once(start: Instant) -> AdoptionCheck {
        let mut check = AdoptionCheck::new();
        assert!(
            tick(&mut check, start, Some(0), false),
            "the first check walks"
        );
        check
    }

    #[test]
    fn quiet_ticks_do_not_walk_until_the_backstop() {
        let start = Instant::now();
        let mut check = walked_once(start);
        let mut walks = Vec::new();
        for n in 1..=70u32 {
            if tick(&mut check, start + TICK * n, Some(0), false) {
                walks.push(n);
            }
        }
        // 30 s of 0.5 s ticks: the 60th, then the 120th (outside the range).
        assert_eq!(walks, [60]);
    }

    #[test]
    fn a_lost_answer_brings_the_walk_forward_once() {
        let start = Instant::now();
        let mut check = walked_once(start);
        assert!(!tick(&mut check, start + TICK, Some(0), false));
        assert!(
            tick(&mut check, start + TICK * 2, Some(3), false),
            "3 answers lost"
        );
        assert!(
            !tick(&mut check, start + TICK * 3, Some(3), false),
            "no new loss"
        );
    }

    #[test]
    fn an_unread_answer_brings_the_walk_forward_once() {
        let start = Instant::now();
        let mut check = walked_once(start);
        check.answer_unread();
        assert!(tick(&mut check, start + TICK, Some(0), false));
        assert!(!tick(&mut check, start + TICK * 2, Some(0), false));
    }

    #[test]
    fn found_addresses_are_looked_at_again_at_the_next_tick() {
        let start = Instant::now();
        let mut check = walked_once(start);
        assert!(tick(&mut check, start + TICK, Some(0), true));
        assert!(tick(&mut check, start + TICK * 2, Some(0), true));
        assert!(!tick(&mut check, start + TICK * 3, Some(0), false));
    }

    #[test]
    fn an_unreadable_counter_walks_every_time() {
        let start = Instant::now();
        let mut check = walked_once(start);
        assert!(tick(&mut check, start + TICK, None, false));
        assert!(tick(&mut check, start + TICK * 2, None, false));
        assert!(
            tick(&mut check, start + TICK * 3, Some(0), false),
            "the count is known again: compared with the last known one"
        );
        assert!(!tick(&mut check, start + TICK * 4, Some(0), false));
    }
}
