//! The compute pool: exactly `workers` named threads taking jobs from one queue (flume, already
//! lapin's channel). An idle thread blocks on the queue; it never spins. rayon's pool, used
//! before, yields in a loop while it looks for work, and on a small machine those yields cost
//! more CPU than the tasks themselves (docs/BENCHMARKS.md).

/// A job: runs on a pool thread, given that thread's index.
type Job = Box<dyn FnOnce(usize) + Send>;

/// Exactly `n` threads; dropped, it lets them finish their jobs and exit.
pub struct ComputePool {
    jobs: flume::Sender<Job>,
}

impl ComputePool {
    /// Starts `n` threads named `fleet-worker-<i>`.
    ///
    /// Fails when a thread cannot be started.
    pub fn new(n: usize) -> std::io::Result<Self> {
        let (jobs, queue) = flume::unbounded::<Job>();
        for index in 0..n {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("fleet-worker-{index}"))
                .spawn(move || {
                    while let Ok(job) = queue.recv() {
                        job(index);
                    }
                })?;
        }
        Ok(Self { jobs })
    }

    /// Runs `job` on the first free thread.
    pub fn spawn(&self, job: impl FnOnce(usize) + Send + 'static) {
        // The threads hold the receiver as long as the pool lives, so this cannot fail.
        let _ = self.jobs.send(Box::new(job));
    }
}
