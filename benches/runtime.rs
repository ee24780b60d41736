//! Throughput of the runtime's kernels on SmolLM2-135M's shapes, in GFLOP/s (criterion's "elem/s"
//! counts floating-point operations here):
//! - `linear/<type>/<shape>/n<tokens>`: `GgmlLinear::forward`, a 512-token prompt batch (the GEMM
//!   path) and one token (the GEMV path), for the storage types perplexity runs meet;
//! - `f32_gemm/<shape>`: faer's f32 GEMM on the same shapes with every thread, the ceiling the batch
//!   path is compared with;
//! - `attention/ctx512`: causal attention of a whole 512-token chunk (9 query heads, 3 KV heads).
//!
//! `cargo bench --bench runtime` runs them all with the global rayon pool (set `RAYON_NUM_THREADS=2`
//! to match the perplexity benchmark); add a filter (`-- linear/Q4_0`) to run some.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use formats::GgmlType;
use qforge::runtime::attention::{attention, Heads};
use qforge::runtime::{GgmlLinear, Linear};

/// `(name, out_features, in_features)` of the model's matrices.
const SHAPES: [(&str, usize, usize); 4] = [
    ("qo_576x576", 576, 576),
    ("up_1536x576", 1536, 576),
    ("down_576x1536", 576, 1536),
    ("head_49152x576", 49152, 576),
];
const PROMPT: usize = 512;

/// xorshift64*: reproducible values without a `rand` dependency.
struct Rng(u64);

impl Rng {
    fn f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}

fn encode(ty: GgmlType, values: &[f32], cols: usize) -> Vec<u8> {
    let quantize = ty.traits().quantize.expect("benchmarked types have encoders");
    let row_bytes = ty.row_bytes(cols as u64).unwrap() as usize;
    let mut data = vec![0u8; values.len() / cols * row_bytes];
    for (src, dst) in values.chunks_exact(cols).zip(data.chunks_exact_mut(row_bytes)) {
        quantize(src, dst, None);
    }
    data
}

fn configure(c: &mut Criterion) -> criterion::BenchmarkGroup<'_, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group("runtime");
    group.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    group
}

fn linear(c: &mut Criterion) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut group = configure(c);
    let types = [GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q6_K];
    for ty in types {
        for (name, rows, cols) in SHAPES {
            if cols % ty.block_size() != 0 {
                continue;
            }
            let data = encode(ty, &rng.vec(rows * cols), cols);
            let w = GgmlLinear::new(ty, rows, cols, &data).unwrap();
            for n in [PROMPT, 1] {
                let x = rng.vec(n * cols);
                let mut y = vec![0f32; n * rows];
                group.throughput(Throughput::Elements((2 * n * rows * cols) as u64));
                let id = BenchmarkId::new(format!("linear/{ty}/{name}"), format!("n{n}"));
                group.bench_function(id, |b| b.iter(|| w.forward(&x, &mut y)));
            }
        }
    }
}

fn f32_gemm(c: &mut Criterion) {
    let mut rng = Rng(3);
    let mut group = configure(c);
    let par = Par::rayon(rayon::current_num_threads());
    for (name, rows, cols) in SHAPES {
        let (x, w) = (rng.vec(PROMPT * cols), rng.vec(rows * cols));
        let mut y = vec![0f32; PROMPT * rows];
        group.throughput(Throughput::Elements((2 * PROMPT * rows * cols) as u64));
        group.bench_function(format!("f32_gemm/{name}"), |b| {
            b.iter(|| {
                let lhs = MatRef::from_row_major_slice(&x, PROMPT, cols);
                let rhs = MatRef::from_row_major_slice(&w, rows, cols).transpose();
                let dst = MatMut::from_column_major_slice_mut(&mut y, PROMPT, rows);
                matmul(dst, Accum::Replace, lhs, rhs, 1.0, par);
            })
        });
    }
}

fn attention_chunk(c: &mut Criterion) {
    let mut rng = Rng(5);
    let mut group = configure(c);
    let heads = Heads { query: 9, kv: 3, dim: 64 };
    let q = rng.vec(PROMPT * heads.q_width());
    let (k, v) = (rng.vec(PROMPT * heads.kv_width()), rng.vec(PROMPT * heads.kv_width()));
    let mut out = vec![0f32; q.len()];
    // QKᵀ and PV over the causal triangle.
    let flops = 2 * 2 * heads.query * heads.dim * PROMPT * (PROMPT + 1) / 2;
    group.throughput(Throughput::Elements(flops as u64));
    group.bench_function("attention/ctx512", |b| b.iter(|| attention(&q, &k, &v, heads, 0, &mut out)));
}

criterion_group!(benches, linear, f32_gemm, attention_chunk);
criterion_main!(benches);
