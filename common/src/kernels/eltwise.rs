//! The fast elementwise add: the same arithmetic as [`super::reference::add`] in i32
//! instead of i64, when the parameters guarantee that the exact result fits, which holds
//! for everything [`super::AddParams::new`] produces with 8-bit zero points. A plain loop
//! that the compiler vectorises; the x86 paths compile it with their target features.

use super::AddParams;

/// [`AddParams`] with the zero points and the rounding term folded into one offset:
/// `out = clamp(((a * a_mult + b * b_mult + offset) >> shift) + out_zp, min, max)`.
/// Also the residual add fused into a convolution's store ([`super::blocked`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct NarrowAdd {
    pub a_mult: i32,
    pub b_mult: i32,
    pub offset: i32,
    pub shift: u32,
    pub out_zp: i32,
    pub min: i32,
    pub max: i32,
}

impl NarrowAdd {
    /// `None` unless, for every pair of u8 inputs, both the sum and the shifted sum plus
    /// `out_zp` fit in i32. The sum is computed with wrapping i32 operations: they are exact
    /// modulo 2^32, so a final value inside the i32 range is the true one even if `offset`
    /// or a product wrapped on the way.
    pub(super) fn new(p: &AddParams) -> Option<NarrowAdd> {
        let (a_mult, b_mult) = (i64::from(p.a_mult), i64::from(p.b_mult));
        let offset =
            (1i64 << (p.shift - 1)) - i64::from(p.a_zp) * a_mult - i64::from(p.b_zp) * b_mult;
        let lo = offset + (255 * a_mult).min(0) + (255 * b_mult).min(0);
        let hi = offset + (255 * a_mult).max(0) + (255 * b_mult).max(0);
        let out_zp = i64::from(p.out_zp);
        let fits = |v: i64| i32::try_from(v).is_ok();
        let fits_all = [lo, hi, (lo >> p.shift) + out_zp, (hi >> p.shift) + out_zp];
        if !fits_all.into_iter().all(fits) {
            return None;
        }
        Some(NarrowAdd {
            a_mult: p.a_mult,
            b_mult: p.b_mult,
            offset: offset as i32,
            // For |v| < 2^31, v >> s is the sign (-1 or 0) for every s >= 31.
            shift: u32::from(p.shift).min(31),
            out_zp: p.out_zp,
            min: i32::from(p.min),
            max: i32::from(p.max),
        })
    }

    #[inline(always)]
    pub(super) fn apply(&self, a: u8, b: u8) -> u8 {
        let v = i32::from(a)
            .wrapping_mul(self.a_mult)
            .wrapping_add(i32::from(b).wrapping_mul(self.b_mult))
            .wrapping_add(self.offset);
        (v >> self.shift)
            .wrapping_add(self.out_zp)
            .max(self.min)
            .min(self.max) as u8
    }
}

/// [`super::add`] without its checks (the caller made them).
#[inline(always)]
pub(super) fn add(p: &AddParams, a: &[u8], b: &[u8], out: &mut [u8]) {
    match NarrowAdd::new(p) {
        Some(k) => {
            for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
                *o = k.apply(x, y);
            }
        }
        None => super::reference::add(p, a, b, out),
    }
}

/// [`add`] over its first operand: `a[i] = add(a[i], b[i])`.
#[inline(always)]
pub(super) fn add_in_place(p: &AddParams, a: &mut [u8], b: &[u8]) {
    match NarrowAdd::new(p) {
        Some(k) => {
            for (x, &y) in a.iter_mut().zip(b) {
                *x = k.apply(*x, y);
            }
        }
        None => {
            for (x, &y) in a.iter_mut().zip(b) {
                *x = p.apply(*x, y);
            }
        }
    }
}

/// Whether `p` takes the i32 route (for tests that must cover both).
#[cfg(test)]
pub(super) fn is_narrow(p: &AddParams) -> bool {
    NarrowAdd::new(p).is_some()
}
