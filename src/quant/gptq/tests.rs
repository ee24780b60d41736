use super::*;

/// Deterministic pseudo-normal values (sum of four uniforms, centred).
pub(super) fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..n).map(|_| (0..4).map(|_| uniform()).sum::<f32>() - 2.0).collect()
}

/// `n` activation rows of width `dim` with strongly correlated channels of unequal size: each row mixes
/// a few shared factors into every channel, plus a little private noise.
pub(super) fn correlated_activations(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let factors = 8;
    let mixing = noise(factors * dim, seed + 1);
    let z = noise(n * factors, seed + 2);
    let private = noise(n * dim, seed + 3);
    let mut x = vec![0f32; n * dim];
    for r in 0..n {
        for c in 0..dim {
            let shared: f32 = (0..factors).map(|f| z[r * factors + f] * mixing[f * dim + c]).sum();
            let channel_scale = 0.2 + (c % 7) as f32 * 0.3;
            x[r * dim + c] = channel_scale * (shared + 0.5 * private[r * dim + c]);
        }
    }
    x
}

pub(super) fn hessian_of(x: &[f32], dim: usize) -> Hessian {
    let mut acc = HessianAccumulator::new(dim);
    acc.add(x);
    acc.finish().unwrap()
}

/// `‖X Wᵀ − X Ŵᵀ‖²`.
fn output_error(x: &[f32], w: &[f32], w_hat: &[f32], rows: usize, cols: usize) -> f64 {
    let n = x.len() / cols;
    let mut total = 0f64;
    for s in 0..n {
        let xs = &x[s * cols..][..cols];
        for o in 0..rows {
            let d: f64 = (0..cols).map(|c| f64::from(xs[c]) * f64::from(w[o * cols + c] - w_hat[o * cols + c])).sum();
            total += d * d;
        }
    }
    total
}

const ROWS: usize = 80;
const COLS: usize = 256;

struct Case {
    w: Vec<f32>,
    x: Vec<f32>,
    h: Hessian,
}

fn case() -> Case {
    let w = noise(ROWS * COLS, 11);
    let x = correlated_activations(600, COLS, 12);
    let h = hessian_of(&x, COLS);
    Case { w, x, h }
}

#[test]
fn gptq_output_error_is_lower_than_rtn_for_every_width() {
    let Case { w, x, h } = case();
    for bits in SUPPORTED_BITS {
        for (group_size, sym, act_order) in [(Some(32), true, false), (None, false, false), (Some(64), false, true)] {
            let config = GptqConfig { bits, group_size, sym, act_order, ..GptqConfig::default() };
            let rtn = rtn(&w, ROWS, COLS, &config).unwrap();
            let gptq = gptq(&w, ROWS, COLS, &h, &config).unwrap();
            let (e_rtn, e_gptq) = (
                output_error(&x, &w, &rtn.dequantize(), ROWS, COLS),
                output_error(&x, &w, &gptq.weight.dequantize(), ROWS, COLS),
            );
            assert!(e_gptq < 0.5 * e_rtn, "{config:?}: GPTQ {e_gptq} vs RTN {e_rtn}");
            assert!(gptq.loss.is_finite() && gptq.damp == config.damp);
        }
    }
}

#[test]
fn identity_hessian_gives_exactly_rtn() {
    let w = noise(ROWS * COLS, 3);
    for bits in SUPPORTED_BITS {
        for (group_size, sym, static_groups) in
            [(Some(32), true, false), (Some(128), false, true), (None, false, false)]
        {
            let config = GptqConfig { bits, group_size, sym, static_groups, ..GptqConfig::default() };
            let gptq = gptq(&w, ROWS, COLS, Hessian::identity(COLS), &config).unwrap();
            assert_eq!(gptq.weight, rtn(&w, ROWS, COLS, &config).unwrap(), "{config:?}");
        }
    }
}

#[test]
fn outputs_are_consistent_grids() {
    let Case { w, h, .. } = case();
    let config = GptqConfig { bits: 3, group_size: Some(64), sym: false, act_order: true, ..GptqConfig::default() };
    let q = gptq(&w, ROWS, COLS, &h, &config).unwrap().weight;
    assert_eq!((q.groups(), q.codes.len(), q.zeros.len()), (COLS / 64, ROWS * COLS, ROWS * COLS / 64));
    assert!(q.codes.iter().all(|&c| c < 8) && q.zeros.iter().all(|&z| z < 8));
    let dequantized = q.dequantize();
    for o in 0..ROWS {
        for c in 0..COLS {
            let g = q.g_idx[c] as usize * ROWS + o;
            let expected = q.scales[g] * (f32::from(q.codes[o * COLS + c]) - f32::from(q.zeros[g]));
            assert_eq!(dequantized[o * COLS + c], expected);
            assert_eq!(half::f16::from_f32(q.scales[g]).to_f32(), q.scales[g]);
        }
    }
}

#[test]
fn act_order_groups_runs_of_decreasing_hessian_diagonal() {
    let Case { w, h, .. } = case();
    let mut by_diag: Vec<usize> = (0..COLS).collect();
    by_diag.sort_by(|&a, &b| h.get(b, b).total_cmp(&h.get(a, a)));
    let config = GptqConfig { group_size: Some(32), act_order: true, ..GptqConfig::default() };
    let q = gptq(&w, ROWS, COLS, &h, &config).unwrap().weight;
    for (position, &c) in by_diag.iter().enumerate() {
        assert_eq!(q.g_idx[c] as usize, position / 32, "column {c}");
    }
    assert_ne!(q.g_idx, (0..COLS as u32).map(|c| c / 32).collect::<Vec<_>>(), "the test's diagonal must reorder");
    // Static groups keep the original columns' groups whatever the order.
    let q = gptq(&w, ROWS, COLS, &h, &GptqConfig { static_groups: true, ..config }).unwrap().weight;
    assert_eq!(q.g_idx, (0..COLS as u32).map(|c| c / 32).collect::<Vec<_>>());
}

#[test]
fn a_group_size_not_dividing_the_row_leaves_a_short_last_group() {
    let cols = 96;
    let w = noise(ROWS * cols, 5);
    let x = correlated_activations(300, cols, 6);
    let q = gptq(&w, ROWS, cols, hessian_of(&x, cols), &GptqConfig::default()).unwrap().weight;
    assert_eq!(q.groups(), 1);
    let config = GptqConfig { group_size: Some(64), ..GptqConfig::default() };
    let q = gptq(&w, ROWS, cols, hessian_of(&x, cols), &config).unwrap().weight;
    assert_eq!(q.groups(), 2);
    assert_eq!(q.g_idx.iter().filter(|&&g| g == 1).count(), 32);
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let Case { w, h, .. } = case();
    let config = GptqConfig { bits: 4, group_size: Some(32), act_order: true, ..GptqConfig::default() };
    let run = |threads| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| gptq(&w, ROWS, COLS, &h, &config).unwrap())
    };
    let one = run(1);
    assert_eq!(one, run(2));
    assert_eq!(one, run(3));
    let x = correlated_activations(700, COLS, 9);
    let accumulate = |threads| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| hessian_of(&x, COLS))
    };
    assert_eq!(accumulate(1), accumulate(2));
}

#[test]
fn dead_columns_are_zeroed_and_the_rest_still_quantizes() {
    let Case { w, mut x, .. } = case();
    let dead = [0, 17, 200];
    for row in x.chunks_mut(COLS) {
        dead.iter().for_each(|&c| row[c] = 0.0);
    }
    let h = hessian_of(&x, COLS);
    for act_order in [false, true] {
        let config = GptqConfig { act_order, ..GptqConfig::default() };
        let q = gptq(&w, ROWS, COLS, &h, &config).unwrap().weight.dequantize();
        for o in 0..ROWS {
            assert!(dead.iter().all(|&c| q[o * COLS + c] == 0.0));
        }
        let rtn = rtn(&w, ROWS, COLS, &config).unwrap();
        assert!(output_error(&x, &w, &q, ROWS, COLS) < output_error(&x, &w, &rtn.dequantize(), ROWS, COLS));
    }
}

#[test]
fn a_hessian_that_is_not_positive_definite_is_retried_with_more_damping() {
    // I − 1.5 v vᵀ / |v|² has eigenvalue −0.5 along v: it factors only once the damping adds more than 0.5.
    let n = 64;
    let v = noise(n, 21);
    let norm2: f64 = v.iter().map(|&a| f64::from(a) * f64::from(a)).sum();
    let values: Vec<f64> = (0..n * n)
        .map(|i| {
            let (r, c) = (i / n, i % n);
            f64::from(u8::from(r == c)) - 1.5 * f64::from(v[r]) * f64::from(v[c]) / norm2
        })
        .collect();
    let h = Hessian::from_matrix(n, values).unwrap();
    let w = noise(8 * n, 22);
    // Shrinking the off-diagonal terms would make this Hessian factor without any damping.
    let out = gptq(&w, 8, n, &h, &GptqConfig { shrink: 0.0, ..GptqConfig::default() }).unwrap();
    let mean_diag = (0..n).map(|i| h.get(i, i)).sum::<f64>() / n as f64;
    assert!(out.damp * mean_diag > 0.5 && out.damp < 1.0, "damp {}", out.damp);
    assert!(out.weight.dequantize().iter().all(|v| v.is_finite()));

    let negative = Hessian::from_matrix(2, vec![-1.0, 0.0, 0.0, -1.0]).unwrap();
    let err = gptq(&[1.0, 2.0], 1, 2, &negative, &GptqConfig { group_size: None, ..GptqConfig::default() });
    assert!(matches!(err, Err(GptqError::NotPositiveDefinite(_))), "{err:?}");
}

#[test]
fn bad_configurations_and_inputs_are_errors() {
    let w = noise(4 * 64, 1);
    let h = Hessian::identity(64);
    let bad = [
        (GptqConfig { bits: 5, ..GptqConfig::default() }, "5-bit"),
        (GptqConfig { bits: 1, ..GptqConfig::default() }, "1-bit"),
        (GptqConfig { group_size: Some(48), ..GptqConfig::default() }, "group size 48"),
        (GptqConfig { group_size: None, static_groups: true, ..GptqConfig::default() }, "needs a group size"),
        (GptqConfig { damp: 1.0, ..GptqConfig::default() }, "dampening 1 is outside [0, 1)"),
        (GptqConfig { shrink: -0.1, ..GptqConfig::default() }, "shrinkage -0.1 is outside [0, 1)"),
        (GptqConfig { shrink: 1.0, ..GptqConfig::default() }, "shrinkage 1 is outside [0, 1)"),
    ];
    for (config, expected) in bad {
        let err = gptq(&w, 4, 64, &h, &config).unwrap_err().to_string();
        assert!(err.contains(expected), "{err}");
        assert!(rtn(&w, 4, 64, &config).unwrap_err().to_string().contains(expected));
    }
    let config = GptqConfig::default();
    assert!(matches!(gptq(&w, 4, 64, Hessian::identity(32), &config), Err(GptqError::Shape(_))));
    assert!(matches!(gptq(&w[1..], 4, 64, &h, &config), Err(GptqError::Shape(_))));
    let mut nan = w.clone();
    nan[70] = f32::NAN;
    let err = gptq(&nan, 4, 64, &h, &config).unwrap_err();
    assert!(matches!(err, GptqError::NonFiniteWeight { row: 1, column: 6, .. }), "{err:?}");
    assert!(matches!(Hessian::from_matrix(1, vec![f64::INFINITY]), Err(GptqError::NonFiniteHessian(_))));
    assert!(matches!(Hessian::from_matrix(2, vec![1.0]), Err(GptqError::Shape(_))));
}

#[test]
fn shrinkage_is_gptq_on_the_hessian_with_scaled_off_diagonal_terms() {
    let Case { w, h, .. } = case();
    let n = h.dim();
    // 1 − s a power of two, so the explicitly shrunk Hessian stores exactly the values GPTQ shrinks to.
    let shrink = 0.5;
    let shrunk = (0..n * n).map(|i| if i / n == i % n { h.get(i / n, i % n) } else { 0.5 * h.get(i / n, i % n) });
    let shrunk = Hessian::from_matrix(n, shrunk).unwrap();
    for act_order in [false, true] {
        let config = GptqConfig { group_size: Some(32), act_order, damp: 0.01, shrink, ..GptqConfig::default() };
        let plain = GptqConfig { shrink: 0.0, ..config };
        assert_eq!(gptq(&w, ROWS, n, &h, &config).unwrap(), gptq(&w, ROWS, n, &shrunk, &plain).unwrap());
        assert_ne!(gptq(&w, ROWS, n, &h, &config).unwrap().weight, gptq(&w, ROWS, n, &h, &plain).unwrap().weight);
    }
}
