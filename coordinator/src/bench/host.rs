//! What the benchmarks read off the host they run on (Linux `/proc`, glibc): the CPU,
//! the load, the resident set, and returning freed heap to the OS so that resident-set
//! deltas show what is live. Shared by `coordinator bench` and the checkpoint benchmark
//! (`benches/checkpoint.rs` includes this file).

/// A `/proc/self/status` field in bytes (Linux); `None` elsewhere.
pub fn proc_status_bytes(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Gives freed heap back to the OS where the allocator allows (glibc), so that resident
/// set deltas show what is live rather than what was once allocated.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: `malloc_trim(size_t pad) -> int` is glibc's (this block is compiled for
        // linux-gnu only), and the declaration above matches it. It takes no pointers and
        // only returns free pages of glibc's own heaps to the OS, under glibc's arena
        // locks, so no live allocation of this or any other thread is touched.
        unsafe {
            malloc_trim(0);
        }
    }
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default()
}
