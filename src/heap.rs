//! Returning freed heap memory to the OS (glibc; a no-op elsewhere).
//!
//! The calibrated quantizers are meant to hold little more than their activations. Building the tokenizer
//! and tokenizing the corpus leave tens of MB of freed small allocations that glibc keeps, and the blocks'
//! buffers (Hessians, factors, weights) would stay in the heap after the first is freed under glibc's
//! adaptive mmap threshold.

/// Hands the heap pages freed so far back to the OS, and has every later allocation of 1 MiB or more
/// mapped on its own, so freeing it returns it at once.
pub fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt and malloc_trim only tune and release the allocator's own free memory.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::malloc_trim(0);
    }
}
