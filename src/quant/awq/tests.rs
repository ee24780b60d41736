use formats::GgmlType;

use super::block::{BlockWeights, Matrix, Tie, GROUPS};
use super::*;
use crate::model::{Architecture, ModelSource};
use crate::quant::gptq::Grid;
use crate::runtime::attention::Heads;
use crate::runtime::model::{Layer, QkvBias};
use crate::runtime::synthetic::{self, Rng};
use crate::runtime::GgmlLinear;

const GRID: Grid = Grid { bits: 4, sym: false };

fn uniform(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed);
    (0..n).map(|_| rng.f32()).collect()
}

fn f32_bytes(block: &BlockWeights) -> Vec<Vec<u8>> {
    BlockLinear::ALL.iter().map(|&l| block.linear(l).values.iter().flat_map(|v| v.to_le_bytes()).collect()).collect()
}

/// A layer over `block`'s weights (`bytes` from [`f32_bytes`]).
fn layer_of<'b>(block: &BlockWeights, bytes: &'b [Vec<u8>], bias: Option<&QkvBias>) -> Layer<'b> {
    let linear = |i: usize| {
        let w = block.linear(BlockLinear::ALL[i]);
        GgmlLinear::new(GgmlType::F32, w.rows, w.cols, &bytes[i]).unwrap().into()
    };
    Layer {
        attn_norm: block.attn_norm.clone(),
        wq: linear(0),
        wk: linear(1),
        wv: linear(2),
        bias: bias.map(|b| QkvBias { q: b.q.clone(), k: b.k.clone(), v: b.v.clone() }),
        wo: linear(3),
        ffn_norm: block.ffn_norm.clone(),
        w_gate: linear(4),
        w_up: linear(5),
        w_down: linear(6),
    }
}

fn block_output(model: &Model, block: &BlockWeights, x: &[f32]) -> Vec<f32> {
    let bytes = f32_bytes(block);
    let layer = layer_of(block, &bytes, model.layers[0].bias.as_ref());
    let mut y = x.to_vec();
    let _ = model.block_forward(&layer, 0, &mut y, &mut ());
    y
}

#[test]
fn folding_scales_keeps_the_float_block_function() {
    let m = synthetic::write(synthetic::config(Architecture::Llama, true, false), GgmlType::F32, 21);
    let source = ModelSource::open(&m.gguf).unwrap();
    let model = Model::load(&source).unwrap();
    let original = BlockWeights::decode(&model.layers[0]);
    let x = uniform(24 * model.config.hidden_size, 22);
    let before = block_output(&model, &original, &x);

    let mut folded = original.clone();
    let mut rng = Rng(23);
    for group in &GROUPS {
        let tie = Tie::of(group, model.heads);
        assert_eq!(tie.heads, if group.linears == [BlockLinear::AttnOutput] { 2 } else { 1 });
        let width = folded.linear(group.observed()).cols / tie.heads;
        let s: Vec<f32> = (0..width).map(|_| 4f32.powf(rng.f32())).collect();
        folded.fold(group, &tie, &s);
    }
    for linear in BlockLinear::ALL {
        assert_ne!(folded.linear(linear), original.linear(linear), "{linear:?} was not scaled");
    }
    let after = block_output(&model, &folded, &x);
    let scale = before.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = before.iter().zip(&after).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff <= 1e-5 * scale, "folded block differs by {diff} (scale {scale})");
}

#[test]
fn tied_scales_follow_the_kv_head_of_each_query_head() {
    let tie = Tie::of(&GROUPS[1], Heads { query: 9, kv: 3, dim: 2 });
    let s = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let expanded = tie.expand(&s);
    assert_eq!(expanded.len(), 18);
    for h in 0..9 {
        assert_eq!(expanded[2 * h..2 * h + 2], s[2 * (h / 3)..2 * (h / 3) + 2], "query head {h}");
    }
    let means: Vec<f64> = (0..18).map(|c| c as f64).collect();
    // Channel 0 of KV head 0 is channel 0 of query heads 0, 1 and 2: inputs 0, 2 and 4.
    assert_eq!(tie.reduce(&means)[0], 2.0);
    assert_eq!(tie.reduce(&means)[5], 15.0);
}

/// `rows` weight rows and `n` activation rows of width `cols` where `loud` channels are 30 times the rest.
fn search_case(rows: usize, cols: usize, n: usize, loud: &[usize]) -> (Matrix, Vec<f32>, Vec<f64>, Vec<f32>) {
    let w = Matrix { rows, cols, values: uniform(rows * cols, 31) };
    let mut x = uniform(n * cols, 32);
    for row in x.chunks_exact_mut(cols) {
        loud.iter().for_each(|&c| row[c] *= 30.0);
    }
    let mut acc = HessianAccumulator::new(cols);
    acc.add(&x);
    let h = acc.finish().unwrap();
    let h: Vec<f32> = (0..cols * cols).map(|i| h.get(i / cols, i % cols) as f32).collect();
    let x_mean =
        (0..cols).map(|c| x.chunks_exact(cols).map(|r| f64::from(r[c].abs())).sum::<f64>() / n as f64).collect();
    (w, x, x_mean, h)
}

#[test]
fn uniform_activations_need_no_scaling() {
    let (w, _, _, h) = search_case(16, 64, 200, &[]);
    let choice = search::scales(&[0.7; 64], &Tie { heads: 1, dim: 1 }, &[&w], &h, GRID, 32, 20);
    assert_eq!(choice.alpha, 0.0);
    assert!(choice.scales.iter().all(|&s| s == 1.0));
    assert_eq!(choice.loss, choice.rounding_loss);
}

#[test]
fn loud_channels_are_scaled_up_and_the_loss_is_the_output_error() {
    let (rows, cols, n) = (16, 64, 300);
    let (w, x, x_mean, h) = search_case(rows, cols, n, &[5, 40]);
    let choice = search::scales(&x_mean, &Tie { heads: 1, dim: 1 }, &[&w], &h, GRID, 32, 20);
    assert!(choice.alpha > 0.0, "{choice:?}");
    assert!(choice.loss < 0.8 * choice.rounding_loss, "{choice:?}");
    assert!(choice.scales[5] > 1.0 && choice.scales[40] > 1.0 && choice.scales[0] < 1.0);

    // The loss is 2/n ‖X ΔWᵀ‖² for ΔW = Q(W·diag(s))·diag(s)⁻¹ − W.
    let mut scaled = w.clone();
    scaled.values.chunks_exact_mut(cols).for_each(|r| r.iter_mut().zip(&choice.scales).for_each(|(v, s)| *v *= s));
    let q =
        gptq::rtn(&scaled.values, rows, cols, &AwqConfig { group_size: 32, ..Default::default() }.rounding()).unwrap();
    let dequantized = q.dequantize();
    let mut error = 0f64;
    for xr in x.chunks_exact(cols) {
        for (o, wr) in w.values.chunks_exact(cols).enumerate() {
            let d: f64 = (0..cols)
                .map(|c| {
                    f64::from(xr[c]) * (f64::from(dequantized[o * cols + c] / choice.scales[c]) - f64::from(wr[c]))
                })
                .sum();
            error += d * d;
        }
    }
    let error = 2.0 * error / n as f64;
    assert!((error - choice.loss).abs() <= 1e-3 * error, "direct {error} vs search {}", choice.loss);
}

#[test]
fn clipping_trims_an_outlier_whose_input_is_quiet() {
    let cols = 32;
    let mut values: Vec<f32> = uniform(cols, 41).iter().map(|v| 0.1 * v).collect();
    values[0] = 1.0;
    let mut w = Matrix { rows: 1, cols, values: values.clone() };
    let mut h = vec![0f32; cols * cols];
    (0..cols).for_each(|i| h[i * cols + i] = if i == 0 { 1e-4 } else { 1.0 });
    search::clip(&mut w, &h, GRID, cols, 20);
    assert!(w.values[0] < 0.6, "outlier kept at {}", w.values[0]);
    assert_eq!(w.values[1..], values[1..]);

    // With a loud outlier channel the full range is kept.
    let mut w = Matrix { rows: 1, cols, values: values.clone() };
    h[0] = 1e4;
    search::clip(&mut w, &h, GRID, cols, 20);
    assert_eq!(w.values, values);
}

fn synthetic_model(arch: Architecture, seed: u64) -> synthetic::Synthetic {
    synthetic::write(synthetic::config(arch, true, false), GgmlType::F32, seed)
}

fn calibration(n: usize, seqlen: usize) -> CalibrationSet {
    let mut rng = Rng(51);
    CalibrationSet { seqlen, tokens: (0..n * seqlen).map(|_| (rng.next_u64() % 256) as u32).collect() }
}

const CONFIG: AwqConfig = AwqConfig { bits: 4, group_size: 32, zero_point: true, grid_points: 20, clip: true };

/// Every item `quantize` emits: name, values (norm values or scaled weights) and the quantized linear.
type Items = Vec<(String, Vec<f32>, Option<GroupQuantized>)>;

fn run(model: &Model, calib: &CalibrationSet, config: &AwqConfig) -> (Items, AwqReport) {
    let mut items = Vec::new();
    let report = quantize(model, calib, config, Progress { quiet: true }, |item| {
        items.push(match item {
            AwqItem::Norm { name, values } => (name.to_string(), values.to_vec(), None),
            AwqItem::Linear { name, rows, cols, scaled, quantized } => {
                assert_eq!((rows, cols), (quantized.rows, quantized.cols));
                (name.to_string(), scaled.to_vec(), Some(quantized.clone()))
            }
        });
        Ok(())
    })
    .unwrap();
    (items, report)
}

#[test]
fn quantize_emits_each_block_in_order_on_the_f16_grid_at_any_thread_count() {
    let m = synthetic_model(Architecture::Llama, 52);
    let source = ModelSource::open(&m.gguf).unwrap();
    let model = Model::load(&source).unwrap();
    let calib = calibration(3, 24);
    let at = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| run(&model, &calib, &CONFIG))
    };
    let ((items, report), (again, _)) = (at(1), at(2));
    assert!(items == again, "1 and 2 threads differ");
    let names: Vec<&str> = items.iter().map(|(n, _, _)| n.as_str()).collect();
    let block = |l: usize| {
        ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
            .map(|t| format!("blk.{l}.{t}.weight"))
    };
    assert_eq!(names, [block(0), block(1)].concat());
    assert_eq!((report.layers, report.linears, report.alphas.len()), (2, 14, 2));
    assert!(report.alphas.iter().flatten().all(|a| a.is_some_and(|a| (0.0..1.0).contains(&a))));
    assert!(report.scaled_loss <= report.rounding_loss && report.scaled_loss > 0.0);
    for (name, scaled, quantized) in &items {
        let Some(q) = quantized else { continue };
        assert_eq!((q.bits, q.sym, q.group_size), (4, false, Some(32)), "{name}");
        assert!(q.scales.iter().all(|&s| half::f16::from_f32(s).to_f32() == s), "{name}: scales are f16 values");
        for (i, (&d, &w)) in q.dequantize().iter().zip(scaled).enumerate() {
            let scale = q.scales[i % q.cols / 32 * q.rows + i / q.cols];
            assert!(
                (d - w).abs() <= 0.51 * scale,
                "{name}[{i}]: {d} vs {w}, scale {scale}, code {} zero {}",
                q.codes[i],
                q.zeros[i % q.cols / 32 * q.rows + i / q.cols]
            );
        }
    }
}

#[test]
fn o_proj_is_not_scaled_when_v_has_a_bias() {
    let m = synthetic_model(Architecture::Qwen2, 53);
    let source = ModelSource::open(&m.gguf).unwrap();
    let model = Model::load(&source).unwrap();
    let (_, report) = run(&model, &calibration(2, 16), &CONFIG);
    assert!(report.alphas.iter().all(|a| a[1].is_none() && a[0].is_some() && a[2].is_some() && a[3].is_some()));
}

#[test]
fn unsupported_configurations_are_refused() {
    let m = synthetic_model(Architecture::Llama, 54);
    let source = ModelSource::open(&m.gguf).unwrap();
    let model = Model::load(&source).unwrap();
    let calib = calibration(1, 8);
    let fails = |config: AwqConfig| {
        quantize(&model, &calib, &config, Progress { quiet: true }, |_| panic!("nothing is emitted"))
            .unwrap_err()
            .to_string()
    };
    assert!(fails(AwqConfig { bits: 3, ..CONFIG }).contains("4 bits only"));
    assert!(fails(AwqConfig { group_size: 48, ..CONFIG }).contains("group size 48"));
    let not_dividing = fails(AwqConfig { group_size: 64, ..CONFIG });
    assert!(
        not_dividing.contains("group size 64 does not divide 96, the input width of ffn_down.weight"),
        "{not_dividing}"
    );
    assert!(fails(AwqConfig { grid_points: 0, ..CONFIG }).contains("at least one point"));
    let empty = CalibrationSet { seqlen: 8, tokens: Vec::new() };
    let error = quantize(&model, &empty, &CONFIG, Progress { quiet: true }, |_| Ok(())).unwrap_err();
    assert!(error.to_string().contains("calibration tokens"), "{error}");
}
