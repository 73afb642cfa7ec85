//! The worker's CPU pool: decoding, preprocessing, k-means and PNG encoding of every class run on
//! one rayon pool, sized by `--cpu-threads`. ONNX Runtime keeps its own threads (`--threads`);
//! on a GPU they are mostly idle, on the CPU device the two take turns stage by stage.

use std::sync::Arc;

/// How many CPUs this process may use: the affinity mask and cgroup quota (through
/// [`std::thread::available_parallelism`]) and, under Slurm, `SLURM_CPUS_PER_TASK`, whichever is
/// smallest. At least 1.
pub fn available_cpus() -> usize {
    let process = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let slurm = std::env::var("SLURM_CPUS_PER_TASK").ok().and_then(|v| v.trim().parse::<usize>().ok());
    slurm.filter(|n| *n > 0).map_or(process, |n| n.min(process)).max(1)
}

/// A shared pool of `threads` CPU threads (cheap to clone).
#[derive(Clone)]
pub struct CpuPool {
    pool: Arc<rayon::ThreadPool>,
}

impl std::fmt::Debug for CpuPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuPool").field("threads", &self.threads()).finish()
    }
}

impl CpuPool {
    /// A pool of `threads` threads (`None`: [`available_cpus`]), named `mgd3-cpu-<i>`.
    ///
    /// # Panics
    /// If the operating system refuses to start the threads.
    pub fn new(threads: Option<usize>) -> Self {
        let threads = threads.unwrap_or_else(available_cpus).max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("mgd3-cpu-{i}"))
            .build()
            .expect("starting the CPU pool");
        CpuPool { pool: Arc::new(pool) }
    }

    /// Threads in the pool.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Runs `f` inside the pool: rayon parallel iterators in it (including linfa's) use these
    /// threads only.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }
}

impl Default for CpuPool {
    fn default() -> Self {
        CpuPool::new(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_has_the_threads_asked_for_and_runs_parallel_iterators_on_them() {
        use rayon::prelude::*;
        let pool = CpuPool::new(Some(3));
        assert_eq!(pool.threads(), 3);
        let names: std::collections::HashSet<String> = pool.install(|| {
            (0..64)
                .into_par_iter()
                .map(|_| {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    std::thread::current().name().unwrap_or("").to_owned()
                })
                .collect()
        });
        assert!(names.iter().all(|n| n.starts_with("mgd3-cpu-")), "{names:?}");
        assert!(available_cpus() >= 1);
    }
}
