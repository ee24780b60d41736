//! Encoded blocks seen as grids: element `i` of a block decodes to `scale[i] · levels[code[i]] + offset[i]`,
//! where `levels` is the format's sorted level table and the scales and offsets are what the block stores
//! (a block scale, sub-block scales and mins, ...). Quantizers that choose each element's level themselves
//! (GPTQ's error feedback) fit a block with the format's encoder, read its grid, pick codes and write them
//! back; the block then decodes exactly to what they picked.

/// One block format as a grid. Each format module defines its `GRID`; the type table points to it.
#[derive(Debug)]
pub struct BlockGrid {
    /// The values codes index, ascending: code `c` means `levels[c]`.
    pub levels: &'static [f32],
    /// Each element's scale and offset (`block_size` of each) as the block stores them.
    pub affine: fn(block: &[u8], scale: &mut [f32], offset: &mut [f32]),
    /// The block's `block_size` codes.
    pub read_codes: fn(block: &[u8], codes: &mut [u8]),
    /// Replaces the block's codes (each below `levels.len()`), keeping its scales and offsets.
    pub write_codes: fn(block: &mut [u8], codes: &[u8]),
}

/// `N` consecutive integer levels from `first`.
pub(crate) const fn uniform_levels<const N: usize>(first: i32) -> [f32; N] {
    let mut levels = [0f32; N];
    let mut i = 0;
    while i < N {
        levels[i] = (first + i as i32) as f32;
        i += 1;
    }
    levels
}

/// Inverse of [`super::pack_nibbles`]: 32 values from 16 bytes.
pub(crate) fn unpack_nibbles(qs: &[u8], codes: &mut [u8]) {
    for j in 0..16 {
        codes[j] = qs[j] & 0xF;
        codes[j + 16] = qs[j] >> 4;
    }
}

/// The 32 codes of a 32-element format as the array its packers take.
pub(crate) fn block_codes(codes: &[u8]) -> &[u8; 32] {
    codes.try_into().expect("a 32-element block has 32 codes")
}

/// The 256 codes of a super-block as the array its packers take.
pub(crate) fn super_block_codes(codes: &[u8]) -> &[u8; super::QK_K] {
    codes.try_into().expect("a super-block has 256 codes")
}

#[cfg(test)]
mod tests {
    use crate::blocks::test_data::Rng;
    use crate::ggml_type::GgmlType;

    /// Random blocks of every format with a grid, their codes rewritten at random: each element decodes
    /// to exactly `scale · level + offset`, and the codes read back are the ones written.
    #[test]
    fn rewritten_codes_decode_to_the_grid() {
        let mut rng = Rng::new(77);
        let with_grid: Vec<GgmlType> = GgmlType::all().filter(|t| t.traits().grid.is_some()).collect();
        assert!(with_grid.len() >= 12, "{with_grid:?}");
        for ty in with_grid {
            let grid = ty.traits().grid.unwrap();
            let (bs, ts) = (ty.block_size(), ty.type_size());
            assert!(grid.levels.windows(2).all(|p| p[0] < p[1]), "{ty} levels ascend");
            for trial in 0..20 {
                // Encode a random row so scales are realistic, then overwrite the codes.
                let x = rng.row(bs);
                let importance: Vec<f32> = (0..bs).map(|_| 1.0 + rng.unit()).collect();
                let mut block = vec![0u8; ts];
                (ty.traits().quantize.unwrap())(&x, &mut block, (trial % 2 == 0).then_some(&importance[..]));
                let codes: Vec<u8> = (0..bs).map(|_| (rng.next_u64() % grid.levels.len() as u64) as u8).collect();
                (grid.write_codes)(&mut block, &codes);
                let mut read = vec![0u8; bs];
                (grid.read_codes)(&block, &mut read);
                assert_eq!(read, codes, "{ty} codes read back");
                let (mut scale, mut offset) = (vec![0f32; bs], vec![0f32; bs]);
                (grid.affine)(&block, &mut scale, &mut offset);
                let mut y = vec![0f32; bs];
                ty.dequantize(&block, &mut y).unwrap();
                for i in 0..bs {
                    let expected = scale[i] * grid.levels[codes[i] as usize] + offset[i];
                    assert_eq!(y[i], expected, "{ty} trial {trial} element {i}");
                }
            }
        }
    }
}
