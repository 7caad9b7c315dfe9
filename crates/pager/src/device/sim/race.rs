//! The race checker: every device access is recorded per byte segment with its virtual start and
//! end; a new access that overlaps an unfinished conflicting one (a read of bytes still being
//! written, a write of bytes still being read or written) is a [`RaceReport`].

use super::State;
use crate::device::{DevicePtr, DeviceRange, StreamId};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// A conflict the race checker found: two operations touching the same bytes, unordered.
#[derive(Clone, Debug, PartialEq)]
pub struct RaceReport {
    /// What the later-issued operation does to the range ("read" or "write").
    pub access: &'static str,
    /// The overlapping device bytes.
    pub range: DeviceRange,
    /// The later-issued operation.
    pub op: AccessInfo,
    /// The earlier-issued operation it conflicts with.
    pub other: AccessInfo,
    /// What the earlier operation does to the range.
    pub other_access: &'static str,
}

/// One side of a [`RaceReport`].
#[derive(Clone, Debug, PartialEq)]
pub struct AccessInfo {
    /// Issue order.
    pub seq: u64,
    /// Operation name.
    pub name: String,
    /// Its stream.
    pub stream: StreamId,
    /// Virtual start time.
    pub start: Duration,
    /// Virtual end time.
    pub end: Duration,
}

impl fmt::Display for AccessInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "op #{} '{}' on stream {} at [{:?}, {:?}]",
            self.seq, self.name, self.stream.0, self.start, self.end
        )
    }
}

impl fmt::Display for RaceReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = match (self.access, self.other_access) {
            ("read", _) => "starts before the earlier write completes",
            (_, "read") => "starts while the earlier read is still running",
            _ => "starts before the earlier write completes",
        };
        write!(
            f,
            "{} of {} by {} {}: {} of it by {}",
            self.access, self.range, self.op, why, self.other_access, self.other
        )
    }
}

/// One recorded access: who, and when in virtual time.
#[derive(Clone)]
pub(super) struct Access {
    pub(super) info: AccessInfo,
    pub(super) start: u64,
    pub(super) end: u64,
}

/// A byte range with its latest write and the reads since.
#[derive(Clone, Default)]
pub(super) struct Segment {
    end: u64,
    last_write: Option<Access>,
    reads: Vec<Access>,
}

impl State {
    /// Splits segments so that `[a, b)` is covered exactly by whole segments (creating empty ones).
    fn split_segments(&mut self, a: u64, b: u64) {
        // Split a segment that straddles `at`.
        let split_at = |segs: &mut BTreeMap<u64, Segment>, at: u64| {
            if let Some((&s, seg)) = segs.range(..at).next_back() {
                if seg.end > at {
                    let mut right = seg.clone();
                    let left_end = at;
                    right.end = seg.end;
                    if let Some(x) = segs.get_mut(&s) {
                        x.end = left_end;
                    }
                    segs.insert(at, right);
                }
            }
        };
        split_at(&mut self.segments, a);
        split_at(&mut self.segments, b);
        // Fill gaps inside [a, b) with empty segments.
        let mut cursor = a;
        let existing: Vec<(u64, u64)> = self
            .segments
            .range(a..b)
            .map(|(&s, seg)| (s, seg.end))
            .collect();
        let mut gaps = Vec::new();
        for (s, e) in existing {
            if s > cursor {
                gaps.push((cursor, s));
            }
            cursor = e;
        }
        if cursor < b {
            gaps.push((cursor, b));
        }
        for (s, e) in gaps {
            self.segments.insert(
                s,
                Segment {
                    end: e,
                    ..Segment::default()
                },
            );
        }
    }

    pub(super) fn check_access(&mut self, r: &DeviceRange, acc: &Access, write: bool) {
        if r.len == 0 {
            return;
        }
        let (a, b) = (r.ptr.0, r.end());
        self.split_segments(a, b);
        let keys: Vec<u64> = self.segments.range(a..b).map(|(&k, _)| k).collect();
        for k in keys {
            let Some(seg) = self.segments.get_mut(&k) else {
                continue;
            };
            let range = DeviceRange::new(DevicePtr(k), seg.end - k);
            let mut found = Vec::new();
            if let Some(w) = &seg.last_write {
                if w.info.seq != acc.info.seq && w.end > acc.start {
                    found.push((w.info.clone(), "write"));
                }
            }
            if write {
                for rd in &seg.reads {
                    if rd.info.seq != acc.info.seq && rd.end > acc.start {
                        found.push((rd.info.clone(), "read"));
                    }
                }
                seg.reads.clear();
                seg.last_write = Some(acc.clone());
            } else {
                seg.reads.push(acc.clone());
            }
            for (other, other_access) in found {
                self.races.push(RaceReport {
                    access: if write { "write" } else { "read" },
                    range,
                    op: acc.info.clone(),
                    other,
                    other_access,
                });
            }
        }
    }

    /// Forgets accesses that can no longer conflict with anything issued from now on.
    pub(super) fn prune_segments(&mut self) {
        let horizon = self.host_time;
        self.segments.retain(|_, seg| {
            seg.reads.retain(|r| r.end > horizon);
            if seg.last_write.as_ref().is_some_and(|w| w.end <= horizon) {
                seg.last_write = None;
            }
            seg.last_write.is_some() || !seg.reads.is_empty()
        });
        self.prune_ptx_watches();
    }
}

/// Byte ranges an interpreted kernel really touched, coalesced (adjacent or overlapping accesses
/// merge), keyed by start with the end as value.
#[derive(Clone, Debug, Default)]
pub(super) struct RangeSet(BTreeMap<u64, u64>);

impl RangeSet {
    /// Adds `[a, b)`.
    pub(super) fn insert(&mut self, a: u64, b: u64) {
        if a >= b {
            return;
        }
        let (mut a, mut b) = (a, b);
        if let Some((&s, &e)) = self.0.range(..=a).next_back() {
            if e >= a {
                if e >= b {
                    return;
                }
                a = s;
                b = b.max(e);
            }
        }
        let absorbed: Vec<(u64, u64)> = self.0.range(a..=b).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in absorbed {
            self.0.remove(&s);
            b = b.max(e);
        }
        self.0.insert(a, b);
    }

    /// The ranges, in address order.
    pub(super) fn ranges(&self) -> Vec<DeviceRange> {
        self.0
            .iter()
            .map(|(&s, &e)| DeviceRange::new(DevicePtr(s), e - s))
            .collect()
    }
}

/// What an interpreted kernel read and wrote (its real footprint, known once it has run).
#[derive(Clone, Debug, Default)]
pub(super) struct Footprint {
    pub(super) reads: Vec<DeviceRange>,
    pub(super) writes: Vec<DeviceRange>,
}

/// An access of another operation that may conflict with an interpreted kernel whose footprint
/// is not known yet: its bytes inside the kernel's buffer arguments, and whether it was issued
/// before the kernel.
#[derive(Clone)]
struct Candidate {
    range: DeviceRange,
    info: AccessInfo,
    write: bool,
    earlier: bool,
}

/// An interpreted kernel the race checker follows until nothing issued later can overlap it.
///
/// Interpreted kernels are checked from their *real* footprint, which is known only once the
/// interpreter has run at the kernel's virtual start; the other operations are still checked at
/// enqueue from what they declare. So the kernel stays out of the byte segments: at its enqueue
/// the earlier accesses to its buffer arguments that it overlaps in time are collected, and so are
/// later-issued ones until it runs; when it runs, these candidates are compared with its
/// footprint; from then until its end, each new operation is compared with the footprint
/// directly. Two kernels never overlap in time (one compute engine), so only copies can race
/// with an interpreted kernel.
pub(super) struct PtxWatch {
    access: Access,
    bufs: Vec<DeviceRange>,
    candidates: Vec<Candidate>,
    ran: Option<Footprint>,
}

/// The bytes both ranges hold, if any.
fn intersect(a: &DeviceRange, b: &DeviceRange) -> Option<DeviceRange> {
    let s = a.ptr.0.max(b.ptr.0);
    let e = a.end().min(b.end());
    (s < e).then(|| DeviceRange::new(DevicePtr(s), e - s))
}

fn verb(write: bool) -> &'static str {
    if write {
        "write"
    } else {
        "read"
    }
}

impl State {
    /// Starts following interpreted kernel `access`, whose footprint will lie in `bufs`:
    /// collects the earlier-issued accesses to those bytes that it overlaps in time.
    pub(super) fn watch_ptx(&mut self, access: Access, bufs: Vec<DeviceRange>) {
        let mut candidates = Vec::new();
        for buf in &bufs {
            // From the segment that may straddle the buffer's start.
            let from = self
                .segments
                .range(..=buf.ptr.0)
                .next_back()
                .map_or(buf.ptr.0, |(&k, _)| k);
            for (&k, seg) in self.segments.range(from..buf.end()) {
                let seg_range = DeviceRange::new(DevicePtr(k), seg.end.saturating_sub(k));
                let Some(range) = intersect(&seg_range, buf) else {
                    continue;
                };
                let earlier = seg
                    .last_write
                    .iter()
                    .map(|w| (w, true))
                    .chain(seg.reads.iter().map(|r| (r, false)));
                for (other, write) in earlier {
                    if other.end > access.start {
                        candidates.push(Candidate {
                            range,
                            info: other.info.clone(),
                            write,
                            earlier: true,
                        });
                    }
                }
            }
        }
        self.ptx_watches.insert(
            access.info.seq,
            PtxWatch {
                access,
                bufs,
                candidates,
                ran: None,
            },
        );
    }

    /// Checks a newly issued operation's accesses against every followed interpreted kernel it
    /// overlaps in time: directly if the kernel has run, else as candidates for when it runs.
    pub(super) fn check_ptx_watches(
        &mut self,
        reads: &[DeviceRange],
        writes: &[DeviceRange],
        acc: &Access,
    ) {
        let mut found = Vec::new();
        for w in self.ptx_watches.values_mut() {
            if w.access.info.seq == acc.info.seq || w.access.end <= acc.start {
                continue;
            }
            let mine = reads
                .iter()
                .map(|r| (r, false))
                .chain(writes.iter().map(|r| (r, true)));
            for (r, write) in mine {
                match &w.ran {
                    None => {
                        for buf in &w.bufs {
                            if let Some(range) = intersect(r, buf) {
                                w.candidates.push(Candidate {
                                    range,
                                    info: acc.info.clone(),
                                    write,
                                    earlier: false,
                                });
                            }
                        }
                    }
                    Some(fp) => {
                        let theirs = fp
                            .writes
                            .iter()
                            .map(|x| (x, true))
                            .chain(fp.reads.iter().map(|x| (x, false)).filter(|_| write));
                        for (x, other_write) in theirs {
                            if let Some(range) = intersect(r, x) {
                                found.push(RaceReport {
                                    access: verb(write),
                                    range,
                                    op: acc.info.clone(),
                                    other: w.access.info.clone(),
                                    other_access: verb(other_write),
                                });
                            }
                        }
                    }
                }
            }
        }
        self.races.extend(found);
    }

    /// Interpreted kernel `seq` has run with footprint `fp`: reports its conflicts with the
    /// collected candidates and keeps the footprint for operations issued until its end.
    pub(super) fn ptx_ran(&mut self, seq: u64, fp: Footprint) {
        let Some(w) = self.ptx_watches.get_mut(&seq) else {
            return;
        };
        let mut found = Vec::new();
        for c in std::mem::take(&mut w.candidates) {
            // The kernel's accesses that conflict with this candidate.
            let mine = fp
                .writes
                .iter()
                .map(|x| (x, true))
                .chain(fp.reads.iter().map(|x| (x, false)).filter(|_| c.write));
            for (x, kernel_write) in mine {
                let Some(range) = intersect(&c.range, x) else {
                    continue;
                };
                // The report names the later-issued operation first, as for other races.
                found.push(if c.earlier {
                    RaceReport {
                        access: verb(kernel_write),
                        range,
                        op: w.access.info.clone(),
                        other: c.info.clone(),
                        other_access: verb(c.write),
                    }
                } else {
                    RaceReport {
                        access: verb(c.write),
                        range,
                        op: c.info.clone(),
                        other: w.access.info.clone(),
                        other_access: verb(kernel_write),
                    }
                });
            }
        }
        found.sort_by_key(|r| (r.op.seq, r.other.seq, r.range.ptr));
        w.ran = Some(fp);
        self.races.extend(found);
    }

    /// Forgets interpreted kernels that have run and ended before the host's current time.
    pub(super) fn prune_ptx_watches(&mut self) {
        let horizon = self.host_time;
        self.ptx_watches
            .retain(|_, w| w.ran.is_none() || w.access.end > horizon);
    }
}
