//! Page-aligned byte buffers: slot memory must be aligned for O_DIRECT reads, and SIMD loads prefer it.
//!
//! Buffers of at least one huge page are aligned to 2 MiB and marked `MADV_HUGEPAGE` before first touch: the
//! weights are streamed once per token, and with 4 KiB pages every 4 KiB of a 1.7 GB token walk costs a TLB miss
//! (this kernel's transparent huge pages are `madvise`-only, so nothing else asks for them).

use std::alloc::{Layout, alloc_zeroed, dealloc};

use crate::StoreError;

const ALIGN: usize = 4096;
const HUGE: usize = 2 << 20;

pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is uniquely owned heap memory with no interior sharing; moving it across threads is safe and
// shared references only permit reads.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above; `&AlignedBuf` only gives `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> Result<Self, StoreError> {
        if len == 0 {
            return Ok(AlignedBuf { ptr: std::ptr::NonNull::<u8>::dangling().as_ptr(), len: 0 });
        }
        #[cfg(target_os = "linux")]
        if len >= HUGE {
            return huge_zeroed(len);
        }
        let layout = Layout::from_size_align(len, ALIGN).map_err(|_| StoreError::Alloc { bytes: len })?;
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(StoreError::Alloc { bytes: len });
        }
        Ok(AlignedBuf { ptr, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes (or dangling with len 0), initialised by alloc_zeroed.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Bytes `r` of the buffer, without creating a reference to the rest: other parts may be written meanwhile
    /// through [`AlignedBuf::as_mut_ptr`] (the expert reader fills victim slots while resident slots are read).
    /// Panics if `r` is out of bounds, as slice indexing does.
    pub fn range(&self, r: std::ops::Range<usize>) -> &[u8] {
        assert!(r.start <= r.end && r.end <= self.len, "range {r:?} of a {}-byte buffer", self.len);
        // SAFETY: in bounds (checked); the memory is initialised (zeroed at allocation) and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.add(r.start), r.len()) }
    }

    /// The start of the buffer as a raw pointer, without creating a reference: pointers derived from it stay valid
    /// side by side (the expert reader writes disjoint parts of one buffer from several threads).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

/// Anonymous memory straight from `mmap` (zeroed by the kernel, untouched), 2 MiB-aligned by over-mapping and
/// trimming, marked `MADV_HUGEPAGE` before any fault. Not through the global allocator: `alloc_zeroed` with an
/// alignment above 16 bytes memsets the whole buffer, faulting in 4 KiB pages before the advice could apply.
#[cfg(target_os = "linux")]
fn huge_zeroed(len: usize) -> Result<AlignedBuf, StoreError> {
    let err = || StoreError::Alloc { bytes: len };
    // Whole 4 KiB pages, so the trimmed tail starts on a page boundary (munmap rounds the length up itself).
    let pages = len.checked_next_multiple_of(ALIGN).ok_or_else(err)?;
    let map_len = pages.checked_add(HUGE).ok_or_else(err)?;
    // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(err());
    }
    let start = (base as usize).next_multiple_of(HUGE);
    let head = start - base as usize;
    let tail = map_len - head - pages;
    // SAFETY: both ranges lie inside the mapping just made and outside [start, start + pages); `head` and `tail`
    // are multiples of the 4 KiB page size because `base`, `pages` and HUGE are. Advice failure (no THP) leaves
    // ordinary pages: correct, only slower.
    unsafe {
        if head > 0 {
            libc::munmap(base, head);
        }
        if tail > 0 {
            libc::munmap((start + pages) as *mut libc::c_void, tail);
        }
        libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
    Ok(AlignedBuf { ptr: start as *mut u8, len })
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if self.len >= HUGE {
            // SAFETY: mapped by `huge_zeroed` with exactly this start and length.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
            return;
        }
        if self.len > 0 {
            // SAFETY: allocated in `zeroed` with exactly this layout.
            unsafe { dealloc(self.ptr, Layout::from_size_align_unchecked(self.len, ALIGN)) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small and huge-page buffers alike: zeroed, aligned, writable end to end, and freed with the right call
    /// (a wrong layout or length in `drop` aborts or is reported by the allocator).
    #[test]
    fn buffers_of_every_size_class_are_zeroed_aligned_and_writable() {
        for len in [1, 4095, 4096, HUGE - 1, HUGE, HUGE + 1, 3 * HUGE + 12_345] {
            let mut b = AlignedBuf::zeroed(len).expect("allocates");
            assert_eq!(b.len(), len);
            let align = if len >= HUGE { HUGE } else { ALIGN };
            assert_eq!(b.as_slice().as_ptr() as usize % align, 0, "alignment of {len}");
            assert!(b.as_slice().iter().all(|&v| v == 0), "zeroed {len}");
            b.as_mut_slice().fill(0xa5);
            assert_eq!(b.as_slice()[len - 1], 0xa5);
        }
    }
}
