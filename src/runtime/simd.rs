//! Run-time dispatch to AVX2 builds of the hot loops.
//!
//! The crate is compiled for the baseline x86-64 target (SSE2), so it runs on any CPU. The loops that
//! matter are written as plain Rust the compiler vectorizes; [`avx2_dispatch!`] compiles such a loop a
//! second time with AVX2 enabled and picks that build when the CPU has it, which doubles the vector
//! width and keeps the code VEX-encoded like faer's kernels around it.

/// `avx2_dispatch!(pub fn name(a: A, b: B) -> R = body;)` defines `name`, which runs `body` (an
/// `#[inline(always)]` function with the same signature) compiled for AVX2 when the CPU supports it,
/// else compiled for the baseline target.
macro_rules! avx2_dispatch {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $body:ident;) => {
        $(#[$attr])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2, the only feature `avx2` is compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

pub(crate) use avx2_dispatch;
