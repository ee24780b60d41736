//! Q3_K blocks (to be written).

pub fn dequantize(_src: &[u8], _dst: &mut [f32]) {
    unimplemented!("Q3_K decoder")
}
