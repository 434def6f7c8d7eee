//! Reads at a good copy distance. On x86-64 the kernel copies page-cache
//! data to user memory with `rep movsb`, which runs about 3.5× slower when
//! the destination sits 1–31 bytes past the source's position in its page
//! (`(dst - src) mod 4096`): measured 1.5k against 5.5k 1 MiB `preadv` per
//! second from the page cache into the same memory shifted by 16 bytes (AMD
//! EPYC, Linux 6.18; every other distance, 0 and 32–4095, is fast). glibc's
//! `malloc` puts every large block 16 bytes past a page boundary, so that
//! is exactly where a big `bytearray`, `array.array` or NumPy array starts,
//! and `readinto` of a page-aligned offset into it hit the slow case.
//!
//! [`read_at_good_distance`] sends such a read through a scratch buffer of
//! the calling thread instead, placed half a page from the file offset's
//! position, and copies each piece into the destination with `memcpy`.
//! Half a page, not 0: glibc's `memcpy` uses `rep movsb` too for pieces of
//! this size and pays the same penalty at the same distances (measured:
//! `memcpy` took 53 % of a 1 MiB `readinto` with the scratch at distance
//! 0), and distances add up — kernel copy at 2048, `memcpy` at `d + 2048`,
//! both fast. The scratch is allocated on first use and freed when the
//! thread ends: [`SCRATCH_LEN`] plus a page per thread that reads (the
//! pool's workers, the loop thread's inline reads). Elsewhere (other
//! architectures, other systems, small reads) the read goes straight to
//! the destination.

use std::alloc::{alloc, dealloc, Layout};
use std::cell::Cell;
use std::ptr;

use crate::num::len_u64;

/// Reads shorter than this go straight to the destination: the penalty is
/// a few hundred nanoseconds there, about what the extra copy costs.
const DISTANCE_MIN: usize = 16 * 1024;

/// The thread's scratch buffer: reads longer than this go through it in
/// pieces.
pub const SCRATCH_LEN: usize = 256 * 1024;

const PAGE: usize = 4096;

/// Whether the kernel's copy from file offset `offset` to `dst` runs at a
/// slow distance (module doc).
#[inline]
fn slow_distance(dst: *mut u8, offset: u64) -> bool {
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        return false;
    }
    #[allow(clippy::cast_possible_truncation)] // `% PAGE` fits any usize
    let src = (offset % PAGE as u64) as usize;
    let d = (dst as usize).wrapping_sub(src) % PAGE;
    (1..32).contains(&d)
}

/// Whether a read of `len` bytes at `offset` into `dst` takes the scratch
/// path of [`read_at_good_distance`]: an engine whose kernel copies into the
/// caller's memory itself (kernel AIO) may send such a read to the worker
/// pool instead.
#[inline]
pub fn needs_scratch(dst: *mut u8, len: usize, offset: u64) -> bool {
    len >= DISTANCE_MIN && slow_distance(dst, offset)
}

/// The calling thread's scratch block, freed at thread exit.
struct Scratch(Cell<*mut u8>);

impl Scratch {
    fn layout() -> Layout {
        // A valid layout: non-zero size, power-of-two alignment.
        Layout::from_size_align(SCRATCH_LEN + PAGE, PAGE).unwrap_or(Layout::new::<u8>())
    }

    /// The block, allocated on first use; null if the allocation failed.
    fn get(&self) -> *mut u8 {
        let p = self.0.get();
        if !p.is_null() {
            return p;
        }
        // SAFETY: a layout of non-zero size.
        let p = unsafe { alloc(Self::layout()) };
        self.0.set(p);
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let p = self.0.get();
        if !p.is_null() {
            // SAFETY: allocated by `get` with the same layout, freed once.
            unsafe { dealloc(p, Self::layout()) };
        }
    }
}

thread_local! {
    static SCRATCH: Scratch = const { Scratch(Cell::new(ptr::null_mut())) };
}

/// Reads `len` bytes at `offset` into `dst` with `read(buf, len, offset)`
/// (a positional read returning bytes read or `-errno`, such as
/// [`super::pread`]): directly, or through the thread's scratch buffer when
/// `dst` sits at a slow copy distance (module doc). The result is what one
/// `read` of the whole range would give: the bytes read (short only at end
/// of file, or where `read` itself stopped short, e.g. a non-blocking read
/// reaching uncached data), or `-errno` if nothing was read.
///
/// # Safety
/// `dst` is valid for `len` bytes of writes, and `read` writes at most the
/// `len` bytes it is given at the pointer it is given.
pub unsafe fn read_at_good_distance(
    dst: *mut u8,
    len: usize,
    offset: u64,
    mut read: impl FnMut(*mut u8, usize, u64) -> i64,
) -> i64 {
    if !needs_scratch(dst, len, offset) {
        return read(dst, len, offset);
    }
    let scratch = SCRATCH.try_with(Scratch::get).unwrap_or(ptr::null_mut());
    if scratch.is_null() {
        return read(dst, len, offset);
    }
    let mut done = 0usize;
    while done < len {
        let at = offset.wrapping_add(len_u64(done));
        #[allow(clippy::cast_possible_truncation)] // `% PAGE` fits any usize
        let lead = ((at % PAGE as u64) as usize + PAGE / 2) % PAGE;
        let want = (len - done).min(SCRATCH_LEN);
        // SAFETY: `lead < PAGE` and `want <= SCRATCH_LEN`: the piece lies
        // within the block of `SCRATCH_LEN + PAGE` bytes.
        let piece = unsafe { scratch.add(lead) };
        let r = read(piece, want, at);
        if r < 0 {
            return if done > 0 { len_i64(done) } else { r };
        }
        let got = usize::try_from(r).unwrap_or(0).min(want);
        // SAFETY: the scratch piece holds `got` bytes just read; `dst` is
        // valid for `len >= done + got` bytes (caller's contract); distinct
        // allocations.
        unsafe { ptr::copy_nonoverlapping(piece, dst.add(done), got) };
        done += got;
        if got < want {
            break; // end of file, or `read` stopped short
        }
    }
    len_i64(done)
}

fn len_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte `i` of the fake file.
    fn byte_at(i: u64) -> u8 {
        u8::try_from(i % 251).unwrap_or(0)
    }

    /// A fake positional read of a file of `file_len` bytes.
    fn fake(file_len: u64) -> impl FnMut(*mut u8, usize, u64) -> i64 {
        move |buf, len, off| {
            let n = usize::try_from(file_len.saturating_sub(off)).map_or(len, |n| n.min(len));
            // SAFETY: the helper hands out pieces valid for `len` bytes.
            let piece = unsafe { std::slice::from_raw_parts_mut(buf, n) };
            for (i, b) in piece.iter_mut().enumerate() {
                *b = byte_at(off + len_u64(i));
            }
            len_i64(n)
        }
    }

    /// A destination of `len` bytes 16 bytes past a page boundary in `v`.
    fn slow_dst(v: &mut [u8], len: usize) -> &mut [u8] {
        let shift = (16 + PAGE - (v.as_ptr() as usize % PAGE)) % PAGE;
        &mut v[shift..shift + len]
    }

    #[test]
    fn a_slow_distance_read_is_complete_and_in_place() {
        let mut v = vec![0u8; 1 << 20];
        let len = 600 * 1024;
        let dst = slow_dst(&mut v, len);
        for &(off, file_len) in &[
            (0u64, 1u64 << 30),
            (8192, 8192 + 300 * 1024),
            (100, 1 << 30),
        ] {
            // SAFETY: `dst` holds `len` writable bytes; `fake` writes within
            // the pieces it is given.
            let r = unsafe { read_at_good_distance(dst.as_mut_ptr(), len, off, fake(file_len)) };
            let want = usize::try_from(file_len - off).map_or(len, |n| n.min(len));
            assert_eq!(r, len_i64(want));
            for (i, b) in dst[..want].iter().enumerate() {
                assert_eq!(*b, byte_at(off + len_u64(i)), "byte {i}");
            }
        }
    }

    #[test]
    fn errors_pass_through_and_partial_reads_count() {
        let mut v = vec![0u8; 1 << 20];
        let len = 512 * 1024;
        let dst = slow_dst(&mut v, len).as_mut_ptr();
        // SAFETY: `dst` holds `len` writable bytes; the closure writes nothing.
        let r = unsafe { read_at_good_distance(dst, len, 0, |_, _, _| -9) };
        assert_eq!(r, -9);
        let mut calls = 0;
        let mut first = fake(1 << 30);
        // SAFETY: as above; `fake` writes within the pieces it is given.
        let r = unsafe {
            read_at_good_distance(dst, len, 0, |b, l, o| {
                calls += 1;
                if calls == 1 {
                    first(b, l, o)
                } else {
                    -11
                }
            })
        };
        assert_eq!(r, len_i64(SCRATCH_LEN));
    }

    #[test]
    fn the_slow_distances() {
        let on = cfg!(all(target_os = "linux", target_arch = "x86_64"));
        let page = 1usize << 20; // any page-aligned address
        for d in 0..PAGE {
            let slow = slow_distance(page.wrapping_add(d) as *mut u8, 0);
            assert_eq!(slow, on && (1..32).contains(&d), "distance {d}");
        }
        // The source's place in its page counts.
        assert_eq!(slow_distance((page + 116) as *mut u8, 4096 * 3 + 100), on);
    }
}
