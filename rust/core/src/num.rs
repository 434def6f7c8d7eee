//! Integer conversions that say what they mean: the raw-bits views between
//! signed and unsigned values of the same width (what the C APIs and our
//! stored arguments exchange), and the checked conversions of results.
//! (`cast_signed`/`cast_unsigned` are newer than our minimum Rust.)

/// The same 32 bits, read as signed (an fd given as `2**32 - 1` is `-1`).
#[inline]
#[allow(clippy::cast_possible_wrap)] // the wrap is the point: raw bits
pub const fn i32_bits(v: u32) -> i32 {
    v as i32
}

/// The same 64 bits, read as signed (an offset stored as `u64`).
#[inline]
#[allow(clippy::cast_possible_wrap)] // the wrap is the point: raw bits
pub const fn i64_bits(v: u64) -> i64 {
    v as i64
}

/// The same 64 bits, read as unsigned (a signed offset argument stored raw).
#[inline]
#[allow(clippy::cast_sign_loss)] // the sign loss is the point: raw bits
pub const fn u64_bits(v: i64) -> u64 {
    v as u64
}

/// The same bits, read as unsigned: a vectorcall `nargsf` carries a flag in
/// its top bit (`PY_VECTORCALL_ARGUMENTS_OFFSET`), which this keeps.
#[inline]
#[allow(clippy::cast_sign_loss)] // the sign bit is a flag here: raw bits
pub const fn usize_bits(v: isize) -> usize {
    v as usize
}

/// The low 64 bits of a range-checked argument (−2⁶³ … 2⁶⁴−1): negative
/// values keep their two's-complement bits, as the C API stores them.
#[inline]
#[allow(clippy::cast_sign_loss, clippy::cast_possible_truncation)] // raw low bits, by design
pub const fn low_u64(v: i128) -> u64 {
    v as u64
}

/// The low 16 bits of a range-checked argument (−2¹⁵ … 2¹⁶−1), e.g. a
/// priority given as `-1` is stored as `0xffff`.
#[inline]
#[allow(clippy::cast_sign_loss, clippy::cast_possible_truncation)] // raw low bits, by design
pub const fn low_u16(v: i128) -> u16 {
    v as u16
}

/// A non-negative result (bytes moved) as `usize`; negative becomes 0.
#[inline]
pub fn count_usize(v: i64) -> usize {
    usize::try_from(v).unwrap_or(0)
}

/// A length as an `i64` result (lengths never exceed `isize::MAX`).
#[inline]
pub fn len_i64(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A length as `u64` (lossless on every supported target).
#[inline]
pub fn len_u64(v: usize) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// A `u64` length or offset difference as `usize`, saturating (only ever
/// used for values bounded by a buffer's length).
#[inline]
pub fn usize_sat(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_bits_round_trip() {
        assert_eq!(i32_bits(u32::MAX), -1);
        assert_eq!(i64_bits(u64::MAX), -1);
        assert_eq!(u64_bits(-1), u64::MAX);
        assert_eq!(i64_bits(u64_bits(i64::MIN)), i64::MIN);
        assert_eq!(count_usize(-5), 0);
        assert_eq!(count_usize(5), 5);
        assert_eq!(len_i64(7), 7);
        assert_eq!(usize_sat(9), 9);
        assert_eq!(low_u64(-1), u64::MAX);
        assert_eq!(low_u64(i128::from(u64::MAX)), u64::MAX);
        assert_eq!(low_u16(-1), u16::MAX);
        assert_eq!(low_u16(7), 7);
        assert_eq!(usize_bits(isize::MIN), 1 << (usize::BITS - 1));
    }
}
