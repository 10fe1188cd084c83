//! A counting semaphore: at most N holders at once (requests in flight, streams).

use std::sync::{Condvar, Mutex};

pub struct Permits {
    free: Mutex<usize>,
    freed: Condvar,
}

impl Permits {
    pub fn new(n: usize) -> Permits {
        Permits { free: Mutex::new(n.max(1)), freed: Condvar::new() }
    }

    /// Run `f` holding one permit, waiting for one if none is free.
    pub fn with<R>(&self, f: impl FnOnce() -> R) -> R {
        {
            let mut free = lock(&self.free);
            while *free == 0 {
                free = self.freed.wait(free).unwrap_or_else(|p| p.into_inner());
            }
            *free -= 1;
        }
        // Given back on drop, so a panicking `f` does not leak it.
        let _permit = Permit(self);
        f()
    }
}

struct Permit<'a>(&'a Permits);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        *lock(&self.0.free) += 1;
        self.0.freed.notify_one();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded value is a plain counter; a panic elsewhere leaves it consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn never_more_holders_than_permits() {
        let permits = Permits::new(3);
        let now = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..12 {
                s.spawn(|| {
                    permits.with(|| {
                        let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(n, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(5));
                        now.fetch_sub(1, Ordering::SeqCst);
                    })
                });
            }
        });
        assert_eq!(most.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_panicking_holder_gives_its_permit_back() {
        let permits = Permits::new(1);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            permits.with(|| panic!("boom"));
        }));
        assert!(r.is_err());
        assert_eq!(permits.with(|| 7), 7);
    }
}
