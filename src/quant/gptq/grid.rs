//! The min-max integer grid GPTQ and RTN share: per output row and group of input columns a scale and a
//! zero point, codes `q = clamp(round(w / scale) + zero, 0, maxq)`, weights `scale * (q - zero)`.
//!
//! The parameters follow AutoGPTQ's `Quantizer.find_params` (weight mode, per channel): the range always
//! contains 0; symmetric grids widen it to `[-max|w|, max|w|]` and put the zero at `(maxq + 1) / 2`; an
//! all-zero range becomes `[-1, 1]`. Rounding is half to even, as `torch.round`. One deliberate change:
//! scales are rounded to f16 before use, because GPTQ/AWQ files and GGUF blocks store them as f16 and
//! GPTQ's error feedback should see the grid the file will hold. And an asymmetric zero point is never 0:
//! GPTQ v1 checkpoints store `zero - 1`, so a group whose range starts at 0 gets zero point 1 and the scale
//! that still reaches its maximum (`max / (maxq - 1)`).

use half::f16;

/// Bit widths GPTQ checkpoints (and their kernels) support.
pub const SUPPORTED_BITS: [u32; 4] = [2, 3, 4, 8];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    pub bits: u32,
    pub sym: bool,
}

/// One row's parameters for one group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupParams {
    pub scale: f32,
    pub zero: u8,
}

impl Grid {
    pub fn maxq(self) -> u32 {
        (1 << self.bits) - 1
    }

    /// Parameters for `values` (one row's slice of a group).
    pub fn params(self, values: impl IntoIterator<Item = f32>) -> GroupParams {
        let (mut lo, mut hi) = values.into_iter().fold((0f32, 0f32), |(lo, hi), v| (lo.min(v), hi.max(v)));
        if self.sym {
            hi = hi.max(-lo);
            if lo < 0.0 {
                lo = -hi;
            }
        }
        if lo == 0.0 && hi == 0.0 {
            (lo, hi) = (-1.0, 1.0);
        }
        let maxq = self.maxq() as f32;
        let to_scale = |step: f32| f16::from_f32(step).to_f32().max(f16::from_bits(1).to_f32());
        let scale = to_scale((hi - lo) / maxq);
        if self.sym {
            return GroupParams { scale, zero: 1 << (self.bits - 1) };
        }
        match (-lo / scale).round_ties_even().clamp(0.0, maxq) as u8 {
            0 => GroupParams { scale: to_scale(hi / (maxq - 1.0)), zero: 1 },
            zero => GroupParams { scale, zero },
        }
    }

    /// The code of `w` on the grid `p`.
    pub fn code(self, w: f32, p: GroupParams) -> u8 {
        ((w / p.scale).round_ties_even() + f32::from(p.zero)).clamp(0.0, self.maxq() as f32) as u8
    }
}

impl GroupParams {
    pub fn dequantize(self, code: u8) -> f32 {
        self.scale * (f32::from(code) - f32::from(self.zero))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asymmetric_zero_point_is_never_zero() {
        let grid = Grid { bits: 4, sym: false };
        let p = grid.params([0.0, 0.7, 1.4]);
        assert_eq!(p.zero, 1);
        assert_eq!(p.dequantize(grid.code(1.4, p)), p.scale * 14.0);
        assert!((p.scale * 14.0 - 1.4).abs() < 1e-3, "the maximum stays on the grid: {p:?}");
    }

    #[test]
    fn asymmetric_grid_spans_min_to_max() {
        let grid = Grid { bits: 4, sym: false };
        let p = grid.params([-1.5, 0.25, 6.0]);
        assert_eq!(p.scale, f16::from_f32(7.5 / 15.0).to_f32());
        assert_eq!(p.zero, 3);
        assert_eq!(grid.code(-1.5, p), 0);
        assert_eq!(grid.code(6.0, p), 15);
        assert_eq!(p.dequantize(grid.code(0.0, p)), 0.0);
    }

    #[test]
    fn symmetric_zero_is_the_middle_code() {
        for bits in SUPPORTED_BITS {
            let grid = Grid { bits, sym: true };
            let p = grid.params([-2.0, 1.0]);
            assert_eq!(u32::from(p.zero), 1 << (bits - 1));
            assert_eq!(grid.code(-2.0, p), 0);
            assert!((p.dequantize(grid.code(1.0, p)) - 1.0).abs() <= p.scale / 2.0);
        }
    }

    #[test]
    fn ranges_include_zero_and_all_zero_groups_stay_zero() {
        let grid = Grid { bits: 3, sym: false };
        let p = grid.params([2.0, 3.0]);
        assert_eq!(p.zero, 1);
        assert_eq!(p.dequantize(grid.code(0.0, p)), 0.0);
        assert_eq!(p.dequantize(grid.code(3.0, p)), 3.0);
        let p = grid.params([0.0; 4]);
        assert!(p.scale > 0.0);
        assert_eq!(p.dequantize(grid.code(0.0, p)), 0.0);
    }

    #[test]
    fn codes_clamp_and_round_half_to_even() {
        let grid = Grid { bits: 2, sym: false };
        let p = GroupParams { scale: 1.0, zero: 1 };
        assert_eq!(grid.code(-9.0, p), 0);
        assert_eq!(grid.code(9.0, p), 3);
        assert_eq!(grid.code(0.5, p), 1);
        assert_eq!(grid.code(1.5, p), 3);
    }
}
