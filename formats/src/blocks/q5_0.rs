//! Q5_0 blocks (to be written).

pub fn dequantize(_src: &[u8], _dst: &mut [f32]) {
    unimplemented!("Q5_0 decoder")
}
