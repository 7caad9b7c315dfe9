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
    }
}
