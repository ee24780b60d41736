//! Q6_K blocks (to be written).

pub fn dequantize(_src: &[u8], _dst: &mut [f32]) {
    unimplemented!("Q6_K decoder")
}
