//! Page-aligned byte buffers: slot memory must be aligned for O_DIRECT reads, and SIMD loads prefer it.

use std::alloc::{Layout, alloc_zeroed, dealloc};

use crate::StoreError;

const ALIGN: usize = 4096;

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

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: allocated in `zeroed` with exactly this layout.
            unsafe { dealloc(self.ptr, Layout::from_size_align_unchecked(self.len, ALIGN)) }
        }
    }
}
