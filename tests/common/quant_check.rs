//! Error bounds that follow from the block formats' definitions, for checking quantized output.
#![allow(dead_code)]

use formats::gguf::GgufFile;
use formats::GgmlType;

/// f16 keeps 11 significant bits: a stored scale is off by at most this fraction of itself.
const F16_REL: f32 = 1.0 / 2048.0;
/// Slack for scales small enough to be f16 subnormals (absolute error up to 2^-25 each).
const ABS: f32 = 1e-6;

/// The largest error a correct encoder may make on an element of a 32-value block.
fn bound(ty: GgmlType, block: &[f32], x: f32) -> f32 {
    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let (lo, hi) = block.iter().fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    match ty {
        GgmlType::F32 => 0.0,
        GgmlType::F16 => x.abs() * F16_REL + ABS,
        // d = amax / 127, q = round(x / d): half a step, plus the scale's rounding times |q| <= 127.
        GgmlType::Q8_0 => amax / 127.0 * (0.5 + 127.0 * F16_REL) + ABS,
        // d = max / -2^(b-1): one side reaches level -2^(b-1) exactly, the other clamps one step short.
        GgmlType::Q4_0 => amax / 8.0 * (1.0 + 8.0 * F16_REL) + ABS,
        GgmlType::Q5_0 => amax / 16.0 * (1.0 + 16.0 * F16_REL) + ABS,
        // d = (max - min) / (2^b - 1) with min as offset: half a step, plus both f16 roundings.
        GgmlType::Q4_1 => (hi - lo) / 15.0 * (0.5 + 15.0 * F16_REL) + lo.abs() * F16_REL + ABS,
        GgmlType::Q5_1 => (hi - lo) / 31.0 * (0.5 + 31.0 * F16_REL) + lo.abs() * F16_REL + ABS,
        other => panic!("no error bound for {other}"),
    }
}

/// Asserts every decoded value is within its format's bound of the original.
pub fn assert_within_bounds(name: &str, ty: GgmlType, original: &[f32], decoded: &[f32]) {
    assert_eq!(original.len(), decoded.len(), "{name}");
    for (b, (x, y)) in original.chunks(32).zip(decoded.chunks(32)).enumerate() {
        for (i, (&a, &d)) in x.iter().zip(y).enumerate() {
            let limit = bound(ty, x, a);
            assert!((a - d).abs() <= limit, "{name} ({ty}) block {b} element {i}: {a} decoded as {d} (bound {limit})");
        }
    }
}

/// Checks every tensor of `quantized` against the same tensor of `reference` (a float file).
pub fn assert_file_within_bounds(reference: &GgufFile, quantized: &GgufFile) {
    for t in quantized.tensors() {
        let r = reference.tensor(&t.name).unwrap_or_else(|| panic!("{} is not in the reference", t.name));
        assert_eq!(r.dims, t.dims, "{}", t.name);
        let original = reference.dequantize(r).unwrap();
        assert_within_bounds(&t.name, t.ggml_type, &original, &quantized.dequantize(t).unwrap());
    }
}
