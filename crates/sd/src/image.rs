//! Decoded images: the VAE's output turned into 8-bit RGB, written as PNG with the generation
//! parameters in a `parameters` text chunk (as the popular web UIs do).

use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::path::Path;

/// Converts one image of a `[batch, 3, H, W]` tensor in [-1, 1] to RGB8, as diffusers does:
/// `(x / 2 + 0.5).clamp(0, 1)`, then `round(x * 255)`.
pub fn to_rgb8(images: &Tensor, index: usize) -> Result<(u32, u32, Vec<u8>)> {
    let s = images.shape();
    if s.len() != 4 || s[1] != 3 || index >= s[0] {
        return Err(Error::InvalidArgument(format!(
            "expected images of shape [batch, 3, H, W] with batch > {index}, found {s:?}"
        )));
    }
    let (h, w) = (s[2], s[3]);
    let plane = h * w;
    let base = index * 3 * plane;
    let data = images.data();
    let mut rgb = Vec::with_capacity(3 * plane);
    for p in 0..plane {
        for c in 0..3 {
            let x = (data[base + c * plane + p] / 2.0 + 0.5).clamp(0.0, 1.0);
            rgb.push((x * 255.0).round() as u8);
        }
    }
    Ok((w as u32, h as u32, rgb))
}

/// Writes RGB8 pixels as a PNG with a `parameters` text chunk.
pub fn write_png(path: &Path, width: u32, height: u32, rgb: &[u8], parameters: &str) -> Result<()> {
    let err = |e: String| Error::InvalidArgument(format!("{}: {e}", path.display()));
    let file = std::fs::File::create(path).map_err(|e| err(e.to_string()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.add_text_chunk("parameters".into(), parameters.into())
        .map_err(|e| err(e.to_string()))?;
    let mut w = enc.write_header().map_err(|e| err(e.to_string()))?;
    w.write_image_data(rgb).map_err(|e| err(e.to_string()))?;
    w.finish().map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_carries_pixels_and_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.png");
        // 1 image, 3 channels, 2x3: values spanning the clamp range.
        let vals: Vec<f32> = (0..18).map(|i| i as f32 / 4.0 - 2.0).collect();
        let t = Tensor::new(vec![1, 3, 2, 3], vals.clone()).unwrap();
        let (w, h, rgb) = to_rgb8(&t, 0).unwrap();
        assert_eq!((w, h), (3, 2));
        assert_eq!(rgb[0], 0, "clamped below");
        assert_eq!(rgb[3 * 5 + 2], 255, "clamped above");
        let mid = ((vals[7] / 2.0 + 0.5) * 255.0).round() as u8;
        assert_eq!(rgb[3 + 1], mid, "pixel 1 green = channel 1 plane index 1");
        write_png(&p, w, h, &rgb, "a cat\nSteps: 4, Seed: 1").unwrap();
        let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&p).unwrap()));
        let mut r = dec.read_info().unwrap();
        let text = r.info().uncompressed_latin1_text.clone();
        assert!(text
            .iter()
            .any(|t| t.keyword == "parameters" && t.text.contains("Seed: 1")));
        let mut buf = vec![0; r.output_buffer_size().unwrap()];
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!(&buf[..info.buffer_size()], &rgb[..]);
    }

    #[test]
    fn bad_shape_is_an_error() {
        let t = Tensor::new(vec![1, 4, 2, 2], vec![0.0; 16]).unwrap();
        assert!(to_rgb8(&t, 0).is_err());
    }
}
