//! Runs a DAG of jobs on a fixed number of threads: a job starts as soon as all its parents
//! are done. With keep-going, a failure fails only its descendants; without, nothing new
//! starts after the first failure.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Condvar, Mutex, MutexGuard};

/// How one job ended.
#[derive(Debug)]
pub enum Outcome<T, E> {
    Done(T),
    Failed(E),
    /// Not run; the reason names the failure that stopped it.
    Skipped(String),
}

/// A job: its name, its parents (which must be jobs too), and a priority (lower first among
/// the ready ones, e.g. the level, so the critical path starts early).
pub struct Job {
    pub name: String,
    pub parents: Vec<String>,
    pub priority: usize,
}

struct State<T, E> {
    ready: BTreeSet<(usize, String)>,
    /// Jobs not ready yet, with how many parents are still to finish.
    waiting: BTreeMap<String, usize>,
    running: usize,
    /// Set when a job failed without keep-going: nothing new starts.
    stopped_by: Option<String>,
    outcomes: BTreeMap<String, Outcome<T, E>>,
}

/// Run `work` for every job, at most `threads` at once. `work` gets the job name and the
/// results of its parents.
pub fn run<T, E, F>(
    jobs: &[Job],
    threads: usize,
    keep_going: bool,
    work: F,
) -> BTreeMap<String, Outcome<T, E>>
where
    T: Clone + Send,
    E: Send,
    F: Fn(&str, &BTreeMap<String, T>) -> Result<T, E> + Sync,
{
    let priority: BTreeMap<&str, usize> =
        jobs.iter().map(|j| (j.name.as_str(), j.priority)).collect();
    let parents: BTreeMap<&str, &[String]> =
        jobs.iter().map(|j| (j.name.as_str(), j.parents.as_slice())).collect();
    let mut children: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for j in jobs {
        for p in &j.parents {
            children.entry(p.as_str()).or_default().push(j.name.as_str());
        }
    }
    let state = Mutex::new(State {
        ready: jobs
            .iter()
            .filter(|j| j.parents.is_empty())
            .map(|j| (j.priority, j.name.clone()))
            .collect(),
        waiting: jobs
            .iter()
            .filter(|j| !j.parents.is_empty())
            .map(|j| (j.name.clone(), j.parents.len()))
            .collect(),
        running: 0,
        stopped_by: None,
        outcomes: BTreeMap::new(),
    });
    let wake = Condvar::new();
    let lock =
        || -> MutexGuard<'_, State<T, E>> { state.lock().unwrap_or_else(|e| e.into_inner()) };

    // Mark every descendant of `failed` as skipped, recursively.
    fn skip_descendants<T, E>(
        st: &mut State<T, E>,
        children: &BTreeMap<&str, Vec<&str>>,
        failed: &str,
        root: &str,
    ) {
        for child in children.get(failed).into_iter().flatten() {
            if st.waiting.remove(*child).is_some() {
                st.outcomes.insert(
                    child.to_string(),
                    Outcome::Skipped(format!("its ancestor `{root}` failed")),
                );
                skip_descendants(st, children, child, root);
            }
        }
    }

    let worker = || loop {
        let (name, inputs) = {
            let mut st = lock();
            loop {
                if st.stopped_by.is_none() {
                    if let Some((_, name)) = st.ready.pop_first() {
                        st.running += 1;
                        let inputs: BTreeMap<String, T> = parents
                            .get(name.as_str())
                            .into_iter()
                            .flat_map(|ps| ps.iter())
                            .filter_map(|p| match st.outcomes.get(p) {
                                Some(Outcome::Done(t)) => Some((p.clone(), t.clone())),
                                _ => None,
                            })
                            .collect();
                        break (name, inputs);
                    }
                }
                if st.running == 0 {
                    wake.notify_all();
                    return;
                }
                st = wake.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        };
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&name, &inputs)));
        let mut st = lock();
        st.running -= 1;
        let result = match result {
            Ok(result) => result,
            Err(panic) => {
                // A bug, not a failure: stop everything, let the other workers see this job
                // end (or they would wait for it forever), and let the panic go on through
                // the scope to the caller.
                st.stopped_by.get_or_insert_with(|| name.clone());
                drop(st);
                wake.notify_all();
                std::panic::resume_unwind(panic);
            }
        };
        match result {
            Ok(t) => {
                st.outcomes.insert(name.clone(), Outcome::Done(t));
                for child in children.get(name.as_str()).into_iter().flatten() {
                    if let Some(n) = st.waiting.get_mut(*child) {
                        *n -= 1;
                        if *n == 0 {
                            st.waiting.remove(*child);
                            let p = priority.get(child).copied().unwrap_or(0);
                            st.ready.insert((p, child.to_string()));
                        }
                    }
                }
            }
            Err(e) => {
                st.outcomes.insert(name.clone(), Outcome::Failed(e));
                skip_descendants(&mut st, &children, &name, &name);
                if !keep_going && st.stopped_by.is_none() {
                    st.stopped_by = Some(name.clone());
                }
            }
        }
        wake.notify_all();
    };

    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(worker);
        }
    });

    let mut st = state.into_inner().unwrap_or_else(|e| e.into_inner());
    // Without keep-going, whatever never started was stopped by the first failure.
    let reason = st.stopped_by.clone().map(|f| format!("the build stopped after `{f}` failed"));
    let leftover: Vec<String> =
        st.ready.iter().map(|(_, n)| n.clone()).chain(st.waiting.keys().cloned()).collect();
    for name in leftover {
        let why = reason.clone().unwrap_or_else(|| "its parents did not finish".to_string());
        st.outcomes.entry(name).or_insert(Outcome::Skipped(why));
    }
    st.outcomes
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn job(name: &str, parents: &[&str]) -> Job {
        Job {
            name: name.into(),
            parents: parents.iter().map(|p| p.to_string()).collect(),
            priority: 0,
        }
    }

    #[test]
    fn a_panicking_job_stops_the_run_and_reaches_the_caller() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let started = AtomicUsize::new(0);
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run(&fleet(), 2, true, |name, _: &BTreeMap<String, ()>| -> Result<(), ()> {
                    started.fetch_add(1, Ordering::SeqCst);
                    if name == "base" {
                        panic!("a bug in a step");
                    }
                    Ok(())
                })
            }));
            tx.send((r.is_err(), started.load(Ordering::SeqCst))).unwrap();
        });
        // Before, the other worker waited for the panicked job forever.
        let (panicked, started) = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the run hung after a job panicked");
        assert!(panicked, "the panic must reach the caller");
        // base and tools at most; nothing after base.
        assert!(started <= 2, "{started} jobs started");
    }

    fn fleet() -> Vec<Job> {
        vec![
            job("base", &[]),
            job("tools", &[]),
            job("rt", &["base"]),
            job("api", &["rt", "tools"]),
            job("web", &["rt"]),
        ]
    }

    #[test]
    fn parents_finish_before_children_and_inputs_are_passed() {
        let order = Mutex::new(Vec::new());
        let out = run(
            &fleet(),
            3,
            false,
            |name, inputs: &BTreeMap<String, String>| -> Result<String, String> {
                order.lock().unwrap().push(name.to_string());
                let mut ins: Vec<&String> = inputs.keys().collect();
                ins.sort();
                Ok(format!(
                    "{name}({})",
                    ins.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",")
                ))
            },
        );
        let order = order.into_inner().unwrap();
        let pos = |n: &str| order.iter().position(|x| x == n).unwrap();
        assert!(pos("base") < pos("rt") && pos("rt") < pos("api") && pos("tools") < pos("api"));
        match &out["api"] {
            Outcome::Done(s) => assert_eq!(s, "api(rt,tools)"),
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn keep_going_fails_only_descendants() {
        let out = run(
            &fleet(),
            2,
            true,
            |name, _: &BTreeMap<String, ()>| if name == "rt" { Err("boom") } else { Ok(()) },
        );
        assert!(matches!(out["base"], Outcome::Done(_)));
        assert!(matches!(out["tools"], Outcome::Done(_)));
        assert!(matches!(out["rt"], Outcome::Failed("boom")));
        assert!(matches!(&out["api"], Outcome::Skipped(r) if r.contains("`rt` failed")));
        assert!(matches!(&out["web"], Outcome::Skipped(_)));
    }

    #[test]
    fn without_keep_going_nothing_new_starts() {
        let started = AtomicUsize::new(0);
        let jobs = vec![job("a", &[]), job("b", &["a"]), job("c", &["b"])];
        let out = run(&jobs, 1, false, |name, _: &BTreeMap<String, ()>| {
            started.fetch_add(1, Ordering::SeqCst);
            if name == "a" {
                Err("x")
            } else {
                Ok(())
            }
        });
        assert_eq!(started.load(Ordering::SeqCst), 1);
        assert!(matches!(out["b"], Outcome::Skipped(_)));
        assert!(matches!(out["c"], Outcome::Skipped(_)));
    }

    #[test]
    fn runs_in_parallel_up_to_the_limit() {
        let running = AtomicUsize::new(0);
        let peak = AtomicUsize::new(0);
        let jobs: Vec<Job> = (0..8).map(|i| job(&format!("j{i}"), &[])).collect();
        run(&jobs, 3, false, |_, _: &BTreeMap<String, ()>| -> Result<(), ()> {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(50));
            running.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        });
        assert_eq!(peak.load(Ordering::SeqCst), 3);
    }
}
