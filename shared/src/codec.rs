//! Pieces the hand-written datagram codecs share: LEB128 varints (zigzag
//! for signed values) and smallest-three quaternions.

use crate::wire::DecodeError;

/// Appends `v` as a LEB128 varint.
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a LEB128 varint from the front of `bytes`; never allocates.
pub(crate) fn take_varint(bytes: &mut &[u8]) -> Result<u64, DecodeError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (b, rest) = bytes.split_first().ok_or(DecodeError::Truncated)?;
        *bytes = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(DecodeError::BadVarint)
}

pub(crate) fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

pub(crate) fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

const RANGE: f32 = std::f32::consts::FRAC_1_SQRT_2;

/// A rotation as smallest-three: the index of the largest component (2
/// bits), then the other three, sign-flipped so the largest is positive,
/// in `bits` bits each over ±1/√2. Not-a-number or zero: the identity.
pub(crate) fn smallest_three(r: [f32; 4], bits: u32) -> u64 {
    let max = ((1u64 << bits) - 1) as f32;
    let len = r.iter().map(|v| v * v).sum::<f32>().sqrt();
    let a = if len.is_finite() && len > 1e-6 { r.map(|v| v / len) } else { [0.0, 0.0, 0.0, 1.0] };
    let (big, _) = a.iter().enumerate().fold((0, -1.0f32), |m, (i, v)| if v.abs() > m.1 { (i, v.abs()) } else { m });
    let sign = if a[big] < 0.0 { -1.0 } else { 1.0 };
    let mut packed = big as u64;
    let mut shift = 2;
    for (i, v) in a.iter().enumerate() {
        if i != big {
            let unit = ((v * sign + RANGE) / (2.0 * RANGE)).clamp(0.0, 1.0);
            packed |= ((unit * max).round() as u64) << shift;
            shift += bits;
        }
    }
    packed
}

/// The rotation of [`smallest_three`] bits. Arbitrary bits may give a
/// quaternion that is not unit (the three small ones too large): callers
/// that must refuse those check the length.
pub(crate) fn from_smallest_three(packed: u64, bits: u32) -> [f32; 4] {
    let max = ((1u64 << bits) - 1) as f32;
    let big = (packed & 3) as usize;
    let (mut a, mut shift, mut sum) = ([0.0f32; 4], 2, 0.0);
    for (i, slot) in a.iter_mut().enumerate() {
        if i != big {
            *slot = ((packed >> shift) & ((1 << bits) - 1)) as f32 / max * 2.0 * RANGE - RANGE;
            sum += *slot * *slot;
            shift += bits;
        }
    }
    a[big] = (1.0 - sum).max(0.0).sqrt();
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_zigzag_round_trip_and_refuse_overlong() {
        for v in [0u64, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            let mut s = b.as_slice();
            assert_eq!(take_varint(&mut s), Ok(v));
            assert!(s.is_empty());
        }
        for v in [0i64, -1, 1, i64::MIN, i64::MAX] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
        assert_eq!(take_varint(&mut &[0x80u8; 11][..]), Err(DecodeError::BadVarint));
        assert_eq!(take_varint(&mut &[0x80u8][..]), Err(DecodeError::Truncated));
    }

    #[test]
    fn smallest_three_round_trips_at_both_widths() {
        use glam::Quat;
        for q in [
            Quat::IDENTITY,
            Quat::from_rotation_y(1.0),
            Quat::from_rotation_x(-2.5),
            Quat::from_rotation_z(3.1),
            Quat::from_xyzw(-0.5, 0.5, -0.5, -0.5),
        ] {
            for (bits, tolerance) in [(15, 1e-6), (10, 1e-3)] {
                let back = Quat::from_array(from_smallest_three(smallest_three(q.to_array(), bits), bits));
                assert!(q.dot(back).abs() > 1.0 - tolerance, "{q} -> {back} at {bits} bits");
            }
        }
        assert_eq!(smallest_three([f32::NAN, 0.0, 0.0, 1.0], 15), smallest_three([0.0, 0.0, 0.0, 1.0], 15));
    }
}
