//! Helpers of the sanitizer checks the executor runs on every access.

/// Index of the first byte never written, if any.
pub fn first_unset(init: &[bool]) -> Option<usize> {
    init.iter().position(|b| !b)
}

/// One recorded shared-memory access: thread (linear id in the block), barrier epoch, PTX line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Access {
    /// Linear thread id in the block ([`MANY`] for several readers).
    pub thread: u32,
    /// Barrier interval it happened in (0: never).
    pub epoch: u32,
    /// PTX line of the access.
    pub line: u32,
}

/// Marks a byte read by several threads in one barrier interval.
pub const MANY: u32 = u32::MAX;

/// A race found: the byte, the earlier access and whether it was a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Race {
    /// Shared offset of the first conflicting byte.
    pub offset: usize,
    /// The earlier access.
    pub other: Access,
    /// Whether the earlier access wrote.
    pub other_wrote: bool,
    /// Whether the earlier access was an atomic (`atom`/`red`).
    pub other_atomic: bool,
}

/// Shared-memory race detection between barriers: two threads touch the same byte in one
/// barrier interval, at least one writing, unless both are atomics (`atom`/`red` on one
/// address never race with each other; an atomic does race a plain load or store).
#[derive(Debug, Clone, Default)]
pub struct SharedRaces {
    writes: Vec<Access>,
    reads: Vec<Access>,
    atomics: Vec<Access>,
    epoch: u32,
}

impl SharedRaces {
    /// A detector for `size` bytes of shared memory.
    pub fn new(size: usize) -> Self {
        Self {
            writes: vec![Access::default(); size],
            reads: vec![Access::default(); size],
            atomics: vec![Access::default(); size],
            epoch: 1,
        }
    }

    /// A CTA-wide barrier completed: earlier accesses are ordered before later ones.
    pub fn barrier(&mut self) {
        self.epoch += 1;
    }

    /// Records an access of `range` by `thread`; returns the first race it makes, if any.
    pub fn access(
        &mut self,
        thread: u32,
        range: std::ops::Range<usize>,
        store: bool,
        line: u32,
    ) -> Option<Race> {
        let e = self.epoch;
        for i in range.clone() {
            let w = self.writes[i];
            if w.epoch == e && w.thread != thread {
                return Some(Race {
                    offset: i,
                    other: w,
                    other_wrote: true,
                    other_atomic: false,
                });
            }
            let a = self.atomics[i];
            if a.epoch == e && a.thread != thread {
                return Some(Race {
                    offset: i,
                    other: a,
                    other_wrote: true,
                    other_atomic: true,
                });
            }
            let r = self.reads[i];
            if store && r.epoch == e && r.thread != thread {
                return Some(Race {
                    offset: i,
                    other: r,
                    other_wrote: false,
                    other_atomic: false,
                });
            }
        }
        let me = Access {
            thread,
            epoch: e,
            line,
        };
        for i in range {
            if store {
                self.writes[i] = me;
            } else {
                let r = &mut self.reads[i];
                if r.epoch == e && r.thread != thread {
                    r.thread = MANY;
                } else {
                    *r = me;
                }
            }
        }
        None
    }
}

impl SharedRaces {
    /// Records an atomic read-modify-write of `range` by `thread`; returns the first race it
    /// makes with a plain load or store of another thread in this barrier interval, if any.
    pub fn atomic(
        &mut self,
        thread: u32,
        range: std::ops::Range<usize>,
        line: u32,
    ) -> Option<Race> {
        let e = self.epoch;
        for i in range.clone() {
            for (acc, wrote) in [(self.writes[i], true), (self.reads[i], false)] {
                if acc.epoch == e && acc.thread != thread {
                    return Some(Race {
                        offset: i,
                        other: acc,
                        other_wrote: wrote,
                        other_atomic: false,
                    });
                }
            }
        }
        for i in range {
            let a = &mut self.atomics[i];
            if a.epoch == e && a.thread != thread {
                a.thread = MANY;
            } else {
                *a = Access {
                    thread,
                    epoch: e,
                    line,
                };
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn races_need_two_threads_one_writing_and_no_barrier() {
        let mut s = SharedRaces::new(8);
        assert_eq!(s.access(0, 0..4, true, 1), None);
        assert_eq!(s.access(0, 0..4, false, 2), None);
        assert_eq!(s.access(1, 4..8, false, 3), None);
        assert_eq!(s.access(2, 4..8, false, 3), None);
        let r = s.access(1, 2..6, false, 4).unwrap();
        assert_eq!(
            (r.offset, r.other.thread, r.other.line, r.other_wrote),
            (2, 0, 1, true)
        );
        let r = s.access(3, 6..7, true, 5).unwrap();
        assert_eq!((r.other.thread, r.other_wrote), (MANY, false));
        s.barrier();
        assert_eq!(s.access(1, 0..8, true, 6), None);
    }

    #[test]
    fn atomics_race_plain_accesses_but_not_each_other() {
        let mut s = SharedRaces::new(8);
        assert_eq!(s.atomic(0, 0..4, 1), None);
        assert_eq!(s.atomic(1, 0..4, 1), None);
        assert_eq!(s.atomic(2, 2..6, 2), None);
        let r = s.access(3, 0..4, false, 3).unwrap();
        assert_eq!((r.other.thread, r.other_atomic), (MANY, true));
        s.barrier();
        assert_eq!(s.access(3, 0..4, true, 4), None);
        let r = s.atomic(4, 0..4, 5).unwrap();
        assert_eq!(
            (r.other.thread, r.other_wrote, r.other_atomic),
            (3, true, false)
        );
        s.barrier();
        assert_eq!(s.access(5, 4..8, false, 6), None);
        let r = s.atomic(6, 4..8, 7).unwrap();
        assert_eq!((r.other.thread, r.other_wrote), (5, false));
    }
}
