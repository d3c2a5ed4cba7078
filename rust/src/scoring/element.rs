//! Storage element types the kernels read directly: `f32`, `half::bf16`, `half::f16`.
//! Every value is widened to `f32` before any arithmetic.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// A tensor element type that can be widened to `f32` in chunks.
pub trait Element: Copy + Send + Sync + 'static {
    /// Name used in error messages ("float32", "bfloat16", "float16").
    const NAME: &'static str;

    /// `Some(src)` when the storage already is `f32` (no widening needed).
    fn as_f32(src: &[Self]) -> Option<&[f32]>;

    /// Widen `src` into `dst` (same length).
    fn widen_into(src: &[Self], dst: &mut [f32]);

    /// Whether `get` is cheap enough (and vectorisable) to read elements in the inner loop
    /// directly, skipping the widening buffer.
    const DIRECT: bool;

    /// One element as f32.
    fn get(self) -> f32;

    /// The raw bits when the type is bfloat16 (the upper half of an f32), else `None`. Row
    /// reductions read bfloat16 two at a time as `u32` words (`kernels::reduce_bf16_words`).
    #[inline(always)]
    fn bf16_bits(_src: &[Self]) -> Option<&[u16]> {
        None
    }
}

impl Element for f32 {
    const NAME: &'static str = "float32";
    const DIRECT: bool = true;

    #[inline(always)]
    fn get(self) -> f32 {
        self
    }

    #[inline]
    fn as_f32(src: &[f32]) -> Option<&[f32]> {
        Some(src)
    }

    #[inline]
    fn widen_into(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl Element for bf16 {
    const NAME: &'static str = "bfloat16";
    const DIRECT: bool = true;

    /// bfloat16 is the upper half of an f32: a 16-bit shift.
    #[inline(always)]
    fn get(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }

    #[inline]
    fn as_f32(_src: &[bf16]) -> Option<&[f32]> {
        None
    }

    #[inline(always)]
    fn bf16_bits(src: &[bf16]) -> Option<&[u16]> {
        Some(src.reinterpret_cast())
    }

    /// bfloat16 is the upper half of an f32: widening is a 16-bit shift, which vectorises.
    #[inline]
    fn widen_into(src: &[bf16], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }
}

impl Element for f16 {
    const NAME: &'static str = "float16";
    const DIRECT: bool = false;

    #[inline(always)]
    fn get(self) -> f32 {
        self.to_f32()
    }

    #[inline]
    fn as_f32(_src: &[f16]) -> Option<&[f32]> {
        None
    }

    /// Uses `half`'s slice conversion (F16C / NEON when the CPU has it).
    #[inline]
    fn widen_into(src: &[f16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
}

/// Returns an `f32` view of `src`: the slice itself for `f32`, else `src` widened into `buf`.
#[inline]
pub(crate) fn load<'a, T: Element>(src: &'a [T], buf: &'a mut [f32]) -> &'a [f32] {
    match T::as_f32(src) {
        Some(s) => s,
        None => {
            let dst = &mut buf[..src.len()];
            T::widen_into(src, dst);
            dst
        }
    }
}
