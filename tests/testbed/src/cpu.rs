//! CPU placement for benches.

/// Pins the calling thread, and every thread and process it starts while
/// the guard lives, to CPU 0; dropping the guard gives the thread its
/// previous CPUs back. Latency benches compare two paths interleaved; on
/// several CPUs the cost of cross-CPU wake-ups varies run to run and makes
/// both distributions bimodal, which drowns a few-percent difference.
pub fn pin_to_cpu0() -> std::io::Result<CpuPin> {
    let this_thread = nix::unistd::Pid::from_raw(0);
    let previous = nix::sched::sched_getaffinity(this_thread)?;
    let mut one_cpu = nix::sched::CpuSet::new();
    one_cpu.set(0)?;
    nix::sched::sched_setaffinity(this_thread, &one_cpu)?;
    Ok(CpuPin { previous })
}

/// See [`pin_to_cpu0`].
#[must_use = "the pin ends when this guard is dropped"]
pub struct CpuPin {
    previous: nix::sched::CpuSet,
}

impl Drop for CpuPin {
    fn drop(&mut self) {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &self.previous);
    }
}
