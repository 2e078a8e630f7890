//! Loops the verifier checks once, not once per iteration.
//!
//! An open-coded loop is walked by the verifier iteration by iteration, for every state the
//! program can reach it in; a bpf_loop step is checked until its states converge, a few times
//! in all (the step's `index` argument is unknown to the verifier, so a step that indexes by it
//! converges at once). The kernel inlines bpf_loop into a plain loop with a direct call per
//! step. Verification time is most of egressd's start-up, so the long loops run this way.

use core::ffi::c_void;

use aya_ebpf::helpers::generated::bpf_loop;

/// A step: called with the iteration's index and the walk's context; returns 1 to stop, 0 to
/// go on.
pub type Step = extern "C" fn(index: u32, context: *mut c_void) -> i64;

/// Runs `step` for index 0, 1, … until it returns 1 or `steps` have run.
#[inline(always)]
pub fn walk<C>(steps: u32, step: Step, context: &mut C) {
    // SAFETY: `step` is a static function of this object with bpf_loop's callback signature;
    // the context outlives the call, and each step casts it back to `C`.
    unsafe {
        bpf_loop(
            steps,
            step as *mut c_void,
            (context as *mut C).cast::<c_void>(),
            0,
        )
    };
}
