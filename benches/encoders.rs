//! Throughput of each GGML block encoder, one thread, on a 4096 × 1536 matrix of weight-like values
//! (MB/s of f32 input), without and (for the encoders that use it) with an importance vector.
//!
//! `cargo bench --bench encoders` runs them all; add a filter (`-- Q4_K`) to run some. Measurement
//! times are short so the whole set fits a small machine; criterion's confidence intervals say how
//! much to trust a number.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use formats::GgmlType;

const ROWS: usize = 4096;
const ROW_LEN: usize = 1536;

/// xorshift64*: reproducible values without a `rand` dependency.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 + 1.0) / (1u64 << 24) as f32
    }

    /// Roughly normal (Box–Muller), as trained weights are.
    fn normal(&mut self) -> f32 {
        let (a, b) = (self.unit(), self.unit());
        (-2.0 * a.ln()).sqrt() * (std::f32::consts::TAU * b).cos()
    }
}

/// Rows of normal values whose scale varies from row to row, with an occasional outlier.
fn matrix() -> Vec<f32> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut values = Vec::with_capacity(ROWS * ROW_LEN);
    for _ in 0..ROWS {
        let scale = 0.01 + 0.05 * rng.unit();
        for _ in 0..ROW_LEN {
            let outlier = if rng.next_u64().is_multiple_of(512) { 20.0 } else { 1.0 };
            values.push(rng.normal() * scale * outlier);
        }
    }
    values
}

fn encoders(c: &mut Criterion) {
    let values = matrix();
    let mut rng = Rng(7);
    let importance: Vec<f32> = (0..ROW_LEN).map(|_| rng.unit() * rng.unit() * 4.0).collect();
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Bytes((values.len() * 4) as u64));
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(300));
    group.measurement_time(Duration::from_secs(2));
    for ty in GgmlType::all() {
        let (Some(encode), Some(row_bytes)) = (ty.traits().quantize, ty.row_bytes(ROW_LEN as u64)) else {
            continue;
        };
        let mut out = vec![0u8; ROWS * row_bytes as usize];
        let modes: &[(&str, Option<&[f32]>)] = if ty.is_quantized() && ty != GgmlType::Q8_0 {
            &[("plain", None), ("importance", Some(&importance))]
        } else {
            &[("plain", None)]
        };
        for &(mode, importance) in modes {
            group.bench_function(BenchmarkId::new(ty.name(), mode), |b| {
                b.iter(|| {
                    for (src, dst) in values.chunks_exact(ROW_LEN).zip(out.chunks_exact_mut(row_bytes as usize)) {
                        encode(src, dst, importance);
                    }
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, encoders);
criterion_main!(benches);
