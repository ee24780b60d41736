//! IQ4_NL blocks (to be written).

pub fn dequantize(_src: &[u8], _dst: &mut [f32]) {
    unimplemented!("IQ4_NL decoder")
}
