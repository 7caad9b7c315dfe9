//! Latents files: float32 `.npy` arrays, as numpy writes and reads them.

use crate::error::{Error, Result};
use crate::output::{self, WriteError};
use crate::tensor::Tensor;
use npyz::WriterBuilder;
use std::path::Path;

/// Reads a float32 (little-endian, C order) `.npy` file into a tensor.
pub fn read_f32(path: &Path) -> Result<Tensor> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
    let npy = npyz::NpyFile::new(&bytes[..])
        .map_err(|e| Error::InvalidArgument(format!("{}: not a .npy file: {e}", path.display())))?;
    let bad = |what: String| Error::InvalidArgument(format!("{}: {what}", path.display()));
    if npy.order() != npyz::Order::C {
        return Err(bad("expected a C-order array, found Fortran order".into()));
    }
    let dtype = npy.dtype();
    let expected = npyz::DType::Plain("<f4".parse().map_err(|_| bad("dtype".into()))?);
    if dtype != expected {
        return Err(bad(format!(
            "expected float32 ('<f4') data, found {}",
            dtype.descr()
        )));
    }
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let data: Vec<f32> = npy
        .into_vec()
        .map_err(|e| bad(format!("could not read the data: {e}")))?;
    Ok(Tensor::new(shape, data)?)
}

/// Writes a tensor as a float32 `.npy` file, atomically (see [`crate::output::write_atomic`]).
pub fn write_f32(path: &Path, t: &Tensor) -> Result<(), WriteError> {
    let shape: Vec<u64> = t.shape().iter().map(|&d| d as u64).collect();
    output::write_atomic(path, |out| {
        let mut w = npyz::WriteOptions::<f32>::new()
            .default_dtype()
            .shape(&shape)
            .writer(out)
            .begin_nd()?;
        w.extend(t.data().iter().copied())?;
        w.finish()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_numpy_header() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.npy");
        let t = Tensor::new(
            vec![1, 4, 2, 3],
            (0..24).map(|i| i as f32 * 0.5 - 3.0).collect(),
        )
        .unwrap();
        write_f32(&p, &t).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[..6], b"\x93NUMPY");
        let header = String::from_utf8_lossy(&bytes[10..80]);
        assert!(
            header.contains("'descr': '<f4'") && header.contains("(1, 4, 2, 3"),
            "{header}"
        );
        assert!(read_f32(&p).unwrap() == t);
    }

    #[test]
    fn wrong_dtype_and_garbage_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.npy");
        let mut out = Vec::new();
        {
            let mut w = npyz::WriteOptions::<f64>::new()
                .default_dtype()
                .shape(&[3])
                .writer(&mut out)
                .begin_nd()
                .unwrap();
            w.extend([1.0f64, 2.0, 3.0]).unwrap();
            w.finish().unwrap();
        }
        std::fs::write(&p, out).unwrap();
        let e = read_f32(&p).unwrap_err().to_string();
        assert!(e.contains("float32") && e.contains("<f8"), "{e}");
        std::fs::write(&p, b"not numpy").unwrap();
        assert!(read_f32(&p).is_err());
    }
}
