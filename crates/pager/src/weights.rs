//! Reading `.safetensors` weight files (memory-mapped, fully validated) and converting between the
//! floating-point dtypes the runtime uses.
//!
//! The header is parsed here rather than with `safetensors::SafeTensors` so that every defect is
//! reported with the file and the tensor it concerns, and so that unsupported dtypes are named.

use crate::error::{Error, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Largest header accepted (the `safetensors` crate uses the same limit).
const MAX_HEADER: u64 = 100_000_000;

/// Element types of stored tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE 754 single precision.
    F32,
    /// IEEE 754 half precision.
    F16,
    /// bfloat16.
    BF16,
    /// 64-bit signed integer (readable, not convertible).
    I64,
    /// 32-bit signed integer (readable, not convertible).
    I32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I64 => 8,
        }
    }

    /// The name used in safetensors headers (`"F32"`, `"BF16"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I64 => "I64",
            DType::I32 => "I32",
        }
    }

    /// Parses a safetensors dtype name; `None` for dtypes Ferry does not support.
    pub fn from_name(name: &str) -> Option<DType> {
        match name {
            "F32" => Some(DType::F32),
            "F16" => Some(DType::F16),
            "BF16" => Some(DType::BF16),
            "I64" => Some(DType::I64),
            "I32" => Some(DType::I32),
            _ => None,
        }
    }

    /// Whether values of this dtype can be converted to other float dtypes.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Number of elements of `shape`, or `None` on overflow.
pub fn num_elements(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Byte length of a tensor of `dtype` and `shape`, or `None` on overflow.
pub fn byte_len(dtype: DType, shape: &[usize]) -> Option<usize> {
    num_elements(shape)?.checked_mul(dtype.size())
}

/// Converts `src` (little-endian elements of `from`) into `dst` (elements of `to`).
///
/// Float dtypes (F32, F16, BF16) convert into each other with round-to-nearest-even; integer dtypes
/// only "convert" to themselves. `dst` must hold exactly as many elements as `src`.
pub fn convert_into(src: &[u8], from: DType, to: DType, dst: &mut [u8]) -> Result<()> {
    // (`is_multiple_of` would need Rust 1.87; the workspace supports 1.80.)
    let rem = src.len() % from.size();
    if rem != 0 {
        return Err(Error::InvalidArgument(format!(
            "convert {from}->{to}: source length {} is not a multiple of {}",
            src.len(),
            from.size()
        )));
    }
    let n = src.len() / from.size();
    if dst.len() != n * to.size() {
        return Err(Error::InvalidArgument(format!(
            "convert {from}->{to}: {n} elements need {} destination bytes, found {}",
            n * to.size(),
            dst.len()
        )));
    }
    if from == to {
        dst.copy_from_slice(src);
        return Ok(());
    }
    if !from.is_float() || !to.is_float() {
        return Err(Error::InvalidArgument(format!(
            "cannot convert {from} to {to}: only F32, F16 and BF16 convert"
        )));
    }
    // Element-wise through f32; `chunks_exact` copes with unaligned (mmapped) sources.
    let read = |c: &[u8]| -> f32 {
        match from {
            DType::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            DType::F16 => f16::from_le_bytes([c[0], c[1]]).to_f32(),
            _ => bf16::from_le_bytes([c[0], c[1]]).to_f32(),
        }
    };
    let s = src.chunks_exact(from.size());
    let d = dst.chunks_exact_mut(to.size());
    match to {
        DType::F32 => s
            .zip(d)
            .for_each(|(s, d)| d.copy_from_slice(&read(s).to_le_bytes())),
        DType::F16 => s
            .zip(d)
            .for_each(|(s, d)| d.copy_from_slice(&f16::from_f32(read(s)).to_le_bytes())),
        _ => s
            .zip(d)
            .for_each(|(s, d)| d.copy_from_slice(&bf16::from_f32(read(s)).to_le_bytes())),
    }
    Ok(())
}

/// Converts `src` from `from` to `to` into a new buffer (see [`convert_into`]).
pub fn convert(src: &[u8], from: DType, to: DType) -> Result<Vec<u8>> {
    let n = src.len() / from.size().max(1);
    let mut out = vec![0u8; n * to.size()];
    convert_into(src, from, to, &mut out)?;
    Ok(out)
}

/// One tensor's entry in a weights file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// Name as stored in the file.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Offset of the first byte within the data area.
    pub offset: usize,
    /// Length in bytes.
    pub len: usize,
}

/// A memory-mapped, validated `.safetensors` file.
#[derive(Debug)]
pub struct WeightsFile {
    path: PathBuf,
    /// Shared so that a device can keep it mapped while it is registered in place.
    mmap: Arc<Mmap>,
    data_start: usize,
    /// Sorted by offset in the file.
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    metadata: HashMap<String, String>,
}

fn bad(path: &Path, message: impl Into<String>) -> Error {
    Error::BadFile {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

impl WeightsFile {
    /// Opens and validates a safetensors file. Any defect is an [`Error::BadFile`] naming the
    /// file and, where it applies, the tensor.
    pub fn open(path: impl AsRef<Path>) -> Result<WeightsFile> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: the map is read-only; like every mmap it assumes nobody truncates or rewrites
        // the file while it is open, which weight files (written once) satisfy.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let (data_start, tensors, metadata) = parse(path, &mmap)?;
        let index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(WeightsFile {
            path: path.to_path_buf(),
            mmap: Arc::new(mmap),
            data_start,
            tensors,
            index,
            metadata,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All tensors, in the order of their data in the file.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor called `name`, if present.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The `__metadata__` string map of the header (empty if absent).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.len as u64).sum()
    }

    /// The whole file as mapped (header included), for registering it in place.
    pub fn mmap(&self) -> &Arc<Mmap> {
        &self.mmap
    }

    /// Where the data area starts in the file (8 + header length); a tensor's bytes start at
    /// `data_start() + info.offset`. Not aligned to anything in general.
    pub fn data_start(&self) -> u64 {
        self.data_start as u64
    }

    /// The raw little-endian bytes of `info` (which must come from this file).
    pub fn bytes_of(&self, info: &TensorInfo) -> &[u8] {
        // Offsets were validated against the data area in `parse`.
        &self.mmap[self.data_start + info.offset..self.data_start + info.offset + info.len]
    }

    /// The raw bytes of the tensor called `name`.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self.info(name).ok_or_else(|| {
            bad(
                &self.path,
                format!("no tensor named '{name}' ({} tensors)", self.tensors.len()),
            )
        })?;
        Ok(self.bytes_of(info))
    }

    /// The tensor called `name` converted to `to` (a copy; see [`convert`]).
    pub fn read_as(&self, name: &str, to: DType) -> Result<Vec<u8>> {
        let info = self.info(name).ok_or_else(|| {
            bad(
                &self.path,
                format!("no tensor named '{name}' ({} tensors)", self.tensors.len()),
            )
        })?;
        convert(self.bytes_of(info), info.dtype, to).map_err(|e| {
            bad(
                &self.path,
                format!("tensor '{name}': {}", error_message(&e)),
            )
        })
    }
}

/// Validates a whole safetensors file given as bytes, with the checks of [`WeightsFile::open`];
/// returns where its data area starts and its tensors sorted by offset. Errors name `path`.
pub fn parse_bytes(path: &Path, bytes: &[u8]) -> Result<(u64, Vec<TensorInfo>)> {
    let (data_start, tensors, _) = parse(path, bytes)?;
    Ok((data_start as u64, tensors))
}

fn error_message(e: &Error) -> String {
    match e {
        Error::InvalidArgument(m) => m.clone(),
        other => other.to_string(),
    }
}

type Parsed = (usize, Vec<TensorInfo>, HashMap<String, String>);

/// Validates the header and the layout; returns the data area's start, the tensors sorted by
/// offset, and the metadata.
fn parse(path: &Path, buf: &[u8]) -> Result<Parsed> {
    let file_len = buf.len() as u64;
    if file_len < 8 {
        return Err(bad(
            path,
            format!("truncated: expected an 8-byte header length, file has {file_len} bytes"),
        ));
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&buf[..8]);
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER {
        return Err(bad(
            path,
            format!("header length {header_len} exceeds the limit of {MAX_HEADER} bytes"),
        ));
    }
    if header_len > file_len - 8 {
        return Err(bad(
            path,
            format!(
                "header length {header_len} runs past the end of the file ({} bytes after the length field)",
                file_len - 8
            ),
        ));
    }
    let data_start = 8 + header_len as usize;
    let header = std::str::from_utf8(&buf[8..data_start])
        .map_err(|e| bad(path, format!("header is not UTF-8: {e}")))?;
    let json: serde_json::Value = serde_json::from_str(header)
        .map_err(|e| bad(path, format!("header is not valid JSON: {e}")))?;
    let obj = json.as_object().ok_or_else(|| {
        bad(
            path,
            format!("header must be a JSON object, found {}", json_kind(&json)),
        )
    })?;
    let data_len = buf.len() - data_start;
    let mut metadata = HashMap::new();
    let mut tensors = Vec::with_capacity(obj.len());
    for (name, entry) in obj {
        if name == "__metadata__" {
            let m = entry.as_object().ok_or_else(|| {
                bad(
                    path,
                    "__metadata__ must be an object of strings".to_string(),
                )
            })?;
            for (k, v) in m {
                let v = v.as_str().ok_or_else(|| {
                    bad(
                        path,
                        format!(
                            "__metadata__ entry '{k}' must be a string, found {}",
                            json_kind(v)
                        ),
                    )
                })?;
                metadata.insert(k.clone(), v.to_string());
            }
            continue;
        }
        tensors.push(parse_entry(path, name, entry, data_len)?);
    }
    tensors.sort_by_key(|t| (t.offset, t.len));
    for pair in tensors.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if b.offset < a.offset + a.len {
            return Err(bad(
                path,
                format!(
                    "tensors '{}' [{}, {}) and '{}' [{}, {}) overlap",
                    a.name,
                    a.offset,
                    a.offset + a.len,
                    b.name,
                    b.offset,
                    b.offset + b.len
                ),
            ));
        }
    }
    Ok((data_start, tensors, metadata))
}

fn parse_entry(
    path: &Path,
    name: &str,
    entry: &serde_json::Value,
    data_len: usize,
) -> Result<TensorInfo> {
    let what = |m: String| bad(path, format!("tensor '{name}': {m}"));
    let obj = entry.as_object().ok_or_else(|| {
        what(format!(
            "entry must be an object, found {}",
            json_kind(entry)
        ))
    })?;
    let dtype_name = obj
        .get("dtype")
        .and_then(|v| v.as_str())
        .ok_or_else(|| what("missing string field 'dtype'".to_string()))?;
    let dtype = DType::from_name(dtype_name).ok_or_else(|| {
        what(format!(
            "unsupported dtype '{dtype_name}' (supported: F32, F16, BF16, I64, I32)"
        ))
    })?;
    let shape_json = obj
        .get("shape")
        .and_then(|v| v.as_array())
        .ok_or_else(|| what("missing array field 'shape'".to_string()))?;
    let mut shape = Vec::with_capacity(shape_json.len());
    for d in shape_json {
        let d = d
            .as_u64()
            .and_then(|d| usize::try_from(d).ok())
            .ok_or_else(|| {
                what(format!(
                    "shape entries must be non-negative integers, found {d}"
                ))
            })?;
        shape.push(d);
    }
    let offs = obj
        .get("data_offsets")
        .and_then(|v| v.as_array())
        .ok_or_else(|| what("missing array field 'data_offsets'".to_string()))?;
    let nums: Vec<u64> = offs.iter().filter_map(|v| v.as_u64()).collect();
    if offs.len() != 2 || nums.len() != 2 {
        return Err(what(format!(
            "data_offsets must be two non-negative integers, found {}",
            serde_json::Value::Array(offs.clone())
        )));
    }
    let (start, end) = (nums[0], nums[1]);
    if start > end {
        return Err(what(format!(
            "data_offsets [{start}, {end}] end before they start"
        )));
    }
    if end > data_len as u64 {
        return Err(what(format!(
            "data_offsets [{start}, {end}] lie outside the data area of {data_len} bytes"
        )));
    }
    let len = (end - start) as usize;
    // Every partial product must fit too (strides are suffix products), so the non-zero
    // dimensions are multiplied even when another one is zero.
    let overflows = shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .is_none();
    let expected = byte_len(dtype, &shape)
        .filter(|_| !overflows)
        .ok_or_else(|| what(format!("shape {shape:?} overflows")))?;
    if expected != len {
        return Err(what(format!(
            "dtype {dtype} x shape {shape:?} needs {expected} bytes but data_offsets [{start}, {end}] span {len}"
        )));
    }
    Ok(TensorInfo {
        name: name.to_string(),
        dtype,
        shape,
        offset: start as usize,
        len,
    })
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_trip_exact_values() {
        let vals = [0.0f32, 1.0, -2.5, 0.099975586, 65504.0];
        let src: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let h = convert(&src, DType::F32, DType::F16).unwrap();
        let back = convert(&h, DType::F16, DType::F32).unwrap();
        assert_eq!(
            back, src,
            "values exactly representable in f16 must survive"
        );
        let b = convert(&src[..8], DType::F32, DType::BF16).unwrap();
        assert_eq!(b, [0x00, 0x00, 0x80, 0x3f]);
        let h2 = convert(&b, DType::BF16, DType::F16).unwrap();
        assert_eq!(h2, [0x00, 0x00, 0x00, 0x3c]);
    }

    #[test]
    fn f32_to_f16_rounds_to_nearest_even() {
        // 1 + 2^-11 is halfway between 1 and the next f16; ties go to even (1.0).
        let x = 1.0f32 + f32::powi(2.0, -11);
        let h = convert(&x.to_le_bytes(), DType::F32, DType::F16).unwrap();
        assert_eq!(h, [0x00, 0x3c]);
        let big = convert(&1.0e6f32.to_le_bytes(), DType::F32, DType::F16).unwrap();
        assert_eq!(big, f16::INFINITY.to_le_bytes());
    }

    #[test]
    fn integers_do_not_convert() {
        let src = 7i64.to_le_bytes();
        assert_eq!(convert(&src, DType::I64, DType::I64).unwrap(), src);
        let e = convert(&src, DType::I64, DType::F32).unwrap_err();
        assert!(e.to_string().contains("cannot convert I64 to F32"), "{e}");
        assert!(convert(&[0u8; 3], DType::F16, DType::F32).is_err());
    }

    #[test]
    fn dtype_names_round_trip() {
        for d in [DType::F32, DType::F16, DType::BF16, DType::I64, DType::I32] {
            assert_eq!(DType::from_name(d.name()), Some(d));
        }
        assert_eq!(DType::from_name("F8_E4M3"), None);
        assert_eq!(byte_len(DType::F16, &[usize::MAX, 2]), None);
    }
}
