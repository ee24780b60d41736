//! Every kernel path against the f64 reference, for every format the type table decodes.

use formats::GgmlType;

use super::reference::matmul_f64;
use super::{gemm, gemv, GgmlLinear, Linear};

/// A small deterministic generator (SplitMix64), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Random weights of `ty`: encoded from random floats where qforge has an encoder, otherwise random
/// block bytes, redrawn per block until the block decodes to moderate values (random float bits are
/// often NaN, huge or subnormal).
fn random_weights(ty: GgmlType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
    let row_bytes = ty.row_bytes(cols as u64).unwrap() as usize;
    let mut data = vec![0u8; rows * row_bytes];
    if let Some(quantize) = ty.traits().quantize {
        let values: Vec<f32> = (0..rows * cols).map(|_| rng.f32()).collect();
        for (src, dst) in values.chunks_exact(cols).zip(data.chunks_exact_mut(row_bytes)) {
            quantize(src, dst, None);
        }
        return data;
    }
    let mut decoded = vec![0f32; ty.block_size()];
    for block in data.chunks_exact_mut(ty.type_size()) {
        loop {
            block.iter_mut().for_each(|b| *b = rng.next_u64() as u8);
            ty.dequantize(block, &mut decoded).unwrap();
            if decoded.iter().all(|v| *v == 0.0 || (1e-6..1e3).contains(&v.abs())) {
                break;
            }
        }
    }
    data
}

fn decodable_types() -> Vec<GgmlType> {
    GgmlType::all().filter(|t| t.traits().dequantize.is_some()).collect()
}

/// Asserts `y` equals the f64 reference within the worst-case rounding of an f32 sum of `cols`
/// products in any order (`cols · ε · Σ|w·x|`); the decoded weights themselves are exact.
fn assert_close(w: &GgmlLinear, x: &[f32], y: &[f32], what: &str) {
    for (i, (&got, (want, magnitude))) in y.iter().zip(matmul_f64(w, x)).enumerate() {
        let bound = w.cols() as f64 * f32::EPSILON as f64 * magnitude;
        assert!(
            (got as f64 - want).abs() <= bound,
            "{what} {} {}x{} output {i}: {got} vs {want} (bound {bound})",
            w.ty(),
            w.rows(),
            w.cols()
        );
    }
}

/// Odd row counts and a few column counts per block size, including a single block.
fn shapes(ty: GgmlType) -> Vec<(usize, usize)> {
    let bs = ty.block_size();
    let cols = if bs == 1 { vec![1, 13, 64, 77] } else { vec![bs, 3 * bs] };
    cols.into_iter().flat_map(|c| [(1, c), (7, c), (37, c), (71, c)]).collect()
}

#[test]
fn every_format_and_path_matches_the_f64_reference() {
    let mut rng = Rng(7);
    for ty in decodable_types() {
        for (rows, cols) in shapes(ty) {
            let data = random_weights(ty, rows, cols, &mut rng);
            let w = GgmlLinear::new(ty, rows, cols, &data).unwrap();
            for n in [1, 2, 3, 4, 5, 19, 30] {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.f32()).collect();
                let mut y = vec![f32::NAN; n * rows];
                w.forward(&x, &mut y);
                assert_close(&w, &x, &y, &format!("forward n={n}"));
                if n < super::GEMM_MIN_ROWS {
                    for kernel in gemv::Kernel::available(&w) {
                        y.fill(f32::NAN);
                        gemv::gemv_with(&w, &x, n, &mut y, kernel);
                        assert_close(&w, &x, &y, &format!("gemv {kernel:?} n={n}"));
                    }
                }
                // Blocks of one and two panels and of all rows: the last block and its last panel
                // are partial for the odd row counts.
                for kernel in gemm::Kernel::available() {
                    for block_rows in [32, 64, rows] {
                        y.fill(f32::NAN);
                        gemm::gemm_with(&w, &x, n, &mut y, kernel, block_rows);
                        assert_close(&w, &x, &y, &format!("gemm {kernel:?} n={n} block={block_rows}"));
                    }
                }
            }
        }
    }
}

#[test]
fn construction_rejects_mismatched_data() {
    let data = vec![0u8; 2 * 18];
    assert!(GgmlLinear::new(GgmlType::Q4_0, 2, 32, &data).is_ok());
    let err = GgmlLinear::new(GgmlType::Q4_0, 3, 32, &data).unwrap_err();
    assert!(err.contains("do not hold 3 rows"), "{err}");
    let err = GgmlLinear::new(GgmlType::Q4_0, 2, 48, &data).unwrap_err();
    assert!(err.contains("not whole Q4_0 blocks"), "{err}");
    let err = GgmlLinear::new(GgmlType::IQ2_XXS, 1, 256, &[0; 66]).unwrap_err();
    assert!(err.contains("not supported"), "{err}");
}

#[test]
fn an_empty_batch_multiplies_to_nothing() {
    let data = random_weights(GgmlType::Q4_0, 4, 64, &mut Rng(5));
    let w = GgmlLinear::new(GgmlType::Q4_0, 4, 64, &data).unwrap();
    let mut y: Vec<f32> = Vec::new();
    w.forward(&[], &mut y);
    assert!(y.is_empty());
}
