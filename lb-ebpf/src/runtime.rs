//! What a program object needs besides its programs: a panic handler, and the
//! license the kernel reads (GPL-compatible, for the GPL-only helpers). Both objects
//! this crate builds, the datapath (`main.rs`) and the benchmark floor
//! (`bin/floor.rs`), include this one file.
#![cfg(target_arch = "bpf")]

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program with a reachable panic path, so a
    // program that loads never gets here.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
