//! Link settings for the `ciscale` binary alone (they change only its final link: no dependency is rebuilt).
//!
//! **Packed relative relocations** (`DT_RELR`). ciscale is a position-independent executable, so the loader
//! relocates it at start-up. With classic `RELA` records that means reading 1.3 MiB of relocation entries, and
//! those pages stay resident for the daemon's whole life; `RELR` packs the same relocations into about 16 KiB.
//! Measured with `cargo bench --bench rss`: `watch` in Picus mode peaks at 15.3 MiB instead of 16.6 MiB, and the
//! 10-pool set-up at 15.9 instead of 16.9. (Linking without PIE would save 0.3 MiB more, but gives up address
//! randomisation of the binary, which a daemon holding cloud tokens should keep.)
//!
//! The loader must know `RELR`: glibc 2.36 or later, which a binary so linked names as `GLIBC_ABI_DT_RELR`, so an
//! older loader refuses it with a clear message instead of crashing. It is used only when the glibc we link
//! against has that version, i.e. a binary built on a system runs there; cross builds and musl are left alone.
//! `CISCALE_PACK_RELOCS=0` turns it off (for a binary meant for an older glibc than the build machine's).

use std::env;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CISCALE_PACK_RELOCS");
    if env::var("CISCALE_PACK_RELOCS").as_deref() == Ok("0") {
        return;
    }
    let var = |name: &str| env::var(name).unwrap_or_default();
    let (target, host) = (var("TARGET"), var("HOST"));
    if target != host || var("CARGO_CFG_TARGET_OS") != "linux" || var("CARGO_CFG_TARGET_ENV") != "gnu" {
        return;
    }
    if glibc_knows_relr(&var("CARGO_CFG_TARGET_ARCH")) {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

/// Whether the system's glibc (where Debian-family and most other distributions keep it) defines the version
/// `GLIBC_ABI_DT_RELR`.
fn glibc_knows_relr(arch: &str) -> bool {
    let candidates = [format!("/usr/lib/{arch}-linux-gnu/libc.so.6"), format!("/lib/{arch}-linux-gnu/libc.so.6")]
        .into_iter()
        .chain(["/usr/lib64/libc.so.6".to_owned(), "/lib64/libc.so.6".to_owned()]);
    for path in candidates {
        if let Ok(bytes) = std::fs::read(&path) {
            let needle = b"GLIBC_ABI_DT_RELR";
            return bytes.windows(needle.len()).any(|window| window == needle);
        }
    }
    false
}
