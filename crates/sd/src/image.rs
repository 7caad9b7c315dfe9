//! Decoded images: the VAE's output turned into 8-bit RGB, written as PNG with the generation
//! parameters in a `parameters` text chunk (as the popular web UIs do).

use crate::error::{Error, Result};
use crate::output::{self, WriteError};
use crate::tensor::Tensor;
use std::io;
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

/// The key of the generation-parameters text chunk, as AUTOMATIC1111's web UI writes and reads it.
pub const PARAMETERS_KEY: &str = "parameters";

/// Whether `text` can be stored in a PNG `tEXt` chunk (Latin-1, no NUL).
fn is_latin1(text: &str) -> bool {
    text.chars().all(|c| c != '\0' && (c as u32) < 256)
}

/// Writes RGB8 pixels as a PNG with the generation `parameters` in a text chunk: `tEXt` when the
/// text is Latin-1, else UTF-8 `iTXt`. The file is written atomically (see
/// [`crate::output::write_atomic`]): an existing file at `path` is replaced only by a complete PNG.
pub fn write_png(
    path: &Path,
    width: u32,
    height: u32,
    rgb: &[u8],
    parameters: &str,
) -> Result<(), WriteError> {
    output::write_atomic(path, |w| {
        let mut enc = png::Encoder::new(w, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let added = if is_latin1(parameters) {
            enc.add_text_chunk(PARAMETERS_KEY.into(), parameters.into())
        } else {
            enc.add_itxt_chunk(PARAMETERS_KEY.into(), parameters.into())
        };
        added.map_err(io::Error::other)?;
        let mut pw = enc.write_header().map_err(io::Error::other)?;
        pw.write_image_data(rgb).map_err(io::Error::other)?;
        pw.finish().map_err(io::Error::other)
    })
}

/// The `parameters` text of a PNG (from `tEXt`, `zTXt` or `iTXt`), if it has one.
pub fn read_parameters(png_bytes: &[u8]) -> Result<Option<String>> {
    let bad = |e: png::DecodingError| Error::InvalidArgument(format!("not a readable PNG: {e}"));
    let r = png::Decoder::new(std::io::Cursor::new(png_bytes))
        .read_info()
        .map_err(bad)?;
    let info = r.info();
    if let Some(t) = info
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == PARAMETERS_KEY)
    {
        return Ok(Some(t.text.clone()));
    }
    if let Some(t) = info
        .compressed_latin1_text
        .iter()
        .find(|t| t.keyword == PARAMETERS_KEY)
    {
        return t.get_text().map(Some).map_err(bad);
    }
    match info.utf8_text.iter().find(|t| t.keyword == PARAMETERS_KEY) {
        Some(t) => t.get_text().map(Some).map_err(bad),
        None => Ok(None),
    }
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
    fn unicode_parameters_round_trip_through_itxt() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("u.png");
        let text = "a lighthouse — at dusk, 灯台 🌅\nSteps: 2, Seed: 0";
        write_png(&p, 2, 1, &[0, 1, 2, 3, 4, 5], text).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(read_parameters(&bytes).unwrap().as_deref(), Some(text));
        let r = png::Decoder::new(std::io::Cursor::new(&bytes[..]))
            .read_info()
            .unwrap();
        assert!(r.info().uncompressed_latin1_text.is_empty());
        assert_eq!(r.info().utf8_text.len(), 1);
        assert_eq!(r.info().utf8_text[0].keyword, "parameters");
        // Latin-1 text (accents included) stays in tEXt, as the web UIs write it.
        write_png(&p, 2, 1, &[0; 6], "café, Steps: 2").unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let r = png::Decoder::new(std::io::Cursor::new(&bytes[..]))
            .read_info()
            .unwrap();
        assert_eq!(r.info().uncompressed_latin1_text[0].text, "café, Steps: 2");
        assert!(r.info().utf8_text.is_empty());
    }

    #[test]
    fn a_failing_png_write_keeps_the_earlier_image() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keep.png");
        write_png(&p, 2, 1, &[9; 6], "earlier").unwrap();
        let before = std::fs::read(&p).unwrap();
        // Too few pixels for the header: the encoder fails after the header is written.
        let e = write_png(&p, 64, 64, &[0; 6], "later — 灯台").unwrap_err();
        assert_eq!(e.path, p);
        assert_eq!(std::fs::read(&p).unwrap(), before);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
        // A directory in the way: an error, and the directory is untouched.
        let sub = dir.path().join("sub.png");
        std::fs::create_dir(&sub).unwrap();
        assert!(write_png(&sub, 2, 1, &[0; 6], "x").is_err());
        assert!(sub.is_dir());
    }

    #[test]
    fn bad_shape_is_an_error() {
        let t = Tensor::new(vec![1, 4, 2, 2], vec![0.0; 16]).unwrap();
        assert!(to_rgb8(&t, 0).is_err());
    }
}
