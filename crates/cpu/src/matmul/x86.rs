//! x86-64 kernels (placeholder: detection reports no SIMD until the kernels land).

pub(super) fn has_avx2() -> bool {
    false
}

pub(super) fn has_avx512() -> bool {
    false
}

pub(super) mod avx2 {
    pub(crate) use super::super::scalar_row_dot as row_dot;
}

pub(super) mod avx512 {
    pub(crate) use super::super::scalar_row_dot as row_dot;
}
