//! The handle registry: a C handle is a token (never an address) naming an entry here. Tokens
//! are never reused, so a freed handle is refused on every later use, including a second free.

use crate::error::{FerryStatus, FfiError, FfiResult};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Which kind of object a handle names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Device,
    Model,
    Scheduler,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Device => "FerryDevice",
            Kind::Model => "FerryModel",
            Kind::Scheduler => "FerryScheduler",
        }
    }
}

/// Tokens step by this, so they look like aligned pointers and the low bits stay free.
const STEP: u64 = 16;

struct Registry {
    next: u64,
    live: BTreeMap<u64, (Kind, Arc<dyn std::any::Any + Send + Sync>)>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    next: STEP,
    live: BTreeMap::new(),
});

fn lock() -> MutexGuard<'static, Registry> {
    // Nothing panics while holding the lock; a poisoned registry is still consistent.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Registers `obj` and returns its token.
pub fn insert<T: Send + Sync + 'static>(kind: Kind, obj: Arc<T>) -> u64 {
    let mut r = lock();
    let token = r.next;
    r.next += STEP;
    r.live.insert(token, (kind, obj));
    token
}

fn bad(kind: Kind, token: u64, issued: u64) -> FfiError {
    let message = if token == 0 {
        format!("{} handle is null", kind.name())
    } else if token & (STEP - 1) == 0 && token < issued {
        format!(
            "{} handle {token:#x} was already freed (or names another kind of object)",
            kind.name()
        )
    } else {
        format!(
            "{} handle {token:#x} was never returned by Ferry",
            kind.name()
        )
    };
    let status = if token == 0 {
        FerryStatus::NullPointer
    } else {
        FerryStatus::InvalidHandle
    };
    FfiError::new(status, message)
}

/// The live object of kind `kind` named by `token`.
pub fn get<T: Send + Sync + 'static>(kind: Kind, token: u64) -> FfiResult<Arc<T>> {
    let r = lock();
    match r.live.get(&token) {
        Some((k, obj)) if *k == kind => obj
            .clone()
            .downcast::<T>()
            .map_err(|_| bad(kind, token, r.next)),
        Some((k, _)) => Err(FfiError::new(
            FerryStatus::InvalidHandle,
            format!("handle {token:#x} is a {}, not a {}", k.name(), kind.name()),
        )),
        None => Err(bad(kind, token, r.next)),
    }
}

/// Unregisters `token`; the object is dropped once no call in flight holds it.
pub fn remove(kind: Kind, token: u64) -> FfiResult<Arc<dyn std::any::Any + Send + Sync>> {
    let mut r = lock();
    match r.live.get(&token) {
        Some((k, _)) if *k == kind => {
            let (_, obj) = r.live.remove(&token).ok_or_else(|| bad(kind, token, 0))?;
            Ok(obj)
        }
        Some((k, _)) => Err(FfiError::new(
            FerryStatus::InvalidHandle,
            format!("handle {token:#x} is a {}, not a {}", k.name(), kind.name()),
        )),
        None => {
            let issued = r.next;
            Err(bad(kind, token, issued))
        }
    }
}

/// Live handles of each kind (device, model, scheduler).
pub fn live_counts() -> [usize; 3] {
    let r = lock();
    let mut n = [0; 3];
    for (k, _) in r.live.values() {
        n[*k as usize] += 1;
    }
    n
}
