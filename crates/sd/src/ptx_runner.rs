//! The `ferry-ptx` kernel runner: launches one kernel of a PTX file on the PTX interpreter with
//! buffers read from and written to `.npy` files, checked by the interpreter's sanitizer.

use crate::output::{self, WriteError};
use ferry_pager::device::sim::ptx::{
    launch, LaunchConfig, LaunchReport, Limits, Module, ParamValue, VecMemory,
};
use std::path::{Path, PathBuf};

/// Element type of an `out:` buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutType {
    /// 32-bit float (`<f4`).
    F32,
    /// 64-bit float (`<f8`).
    F64,
    /// IEEE half (`<f2`).
    F16,
    /// bfloat16, written as its bits (`<u2`).
    Bf16,
    /// Unsigned 8-bit (`|u1`).
    U8,
    /// Unsigned 16-bit (`<u2`).
    U16,
    /// Unsigned 32-bit (`<u4`).
    U32,
    /// Unsigned 64-bit (`<u8`).
    U64,
    /// Signed 32-bit (`<i4`).
    I32,
    /// Signed 64-bit (`<i8`).
    I64,
}

impl OutType {
    /// Parses a dtype name (`f32`, `bf16`, `u8`, ...).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "f32" => Self::F32,
            "f64" => Self::F64,
            "f16" => Self::F16,
            "bf16" => Self::Bf16,
            "u8" => Self::U8,
            "u16" => Self::U16,
            "u32" => Self::U32,
            "u64" => Self::U64,
            "i32" => Self::I32,
            "i64" => Self::I64,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::U8 => 1,
            Self::F16 | Self::Bf16 | Self::U16 => 2,
            Self::F32 | Self::U32 | Self::I32 => 4,
            Self::F64 | Self::U64 | Self::I64 => 8,
        }
    }

    /// The numpy `descr` the buffer is written with.
    pub fn descr(self) -> &'static str {
        match self {
            Self::F32 => "<f4",
            Self::F64 => "<f8",
            Self::F16 => "<f2",
            Self::Bf16 | Self::U16 => "<u2",
            Self::U8 => "|u1",
            Self::U32 => "<u4",
            Self::U64 => "<u8",
            Self::I32 => "<i4",
            Self::I64 => "<i8",
        }
    }
}

/// One kernel argument as given on the command line.
#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    /// `in:FILE.npy`: a buffer holding the array's raw data bytes.
    In(PathBuf),
    /// `out:NAME:DTYPE:COUNT`: a poisoned buffer written to `NAME.npy` after the launch.
    Out {
        /// File stem of the output.
        name: String,
        /// Element type.
        dtype: OutType,
        /// Number of elements.
        count: usize,
    },
    /// `u32:V`, `i32:V`, `u64:V`, `f32:V`, `f64:V`: a scalar passed by value.
    Scalar(ParamValue),
}

impl Arg {
    /// Parses one `ARG` (see the binary's help); the error is one line.
    pub fn parse(s: &str) -> Result<Arg, String> {
        let bad = |why: &str| format!("bad argument `{s}`: {why}");
        let (kind, rest) = s
            .split_once(':')
            .ok_or_else(|| bad("expected KIND:VALUE"))?;
        let num = |what: &str| bad(&format!("`{rest}` is not a valid {what}"));
        Ok(match kind {
            "in" if !rest.is_empty() => Arg::In(PathBuf::from(rest)),
            "in" => return Err(bad("expected in:FILE.npy")),
            "out" => {
                let parts: Vec<&str> = rest.split(':').collect();
                let [name, dtype, count] = parts[..] else {
                    return Err(bad("expected out:NAME:DTYPE:COUNT"));
                };
                if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
                    return Err(bad("NAME must be a plain file name"));
                }
                let dtype = OutType::parse(dtype).ok_or_else(|| {
                    bad("DTYPE must be one of f32 f64 f16 bf16 u8 u16 u32 u64 i32 i64")
                })?;
                let count: usize = count
                    .parse()
                    .map_err(|_| bad("COUNT must be a non-negative integer"))?;
                if count.checked_mul(dtype.size()).is_none_or(|b| b > 1 << 34) {
                    return Err(bad("COUNT is too large"));
                }
                Arg::Out {
                    name: name.to_string(),
                    dtype,
                    count,
                }
            }
            "u32" => Arg::Scalar(ParamValue::U32(rest.parse().map_err(|_| num("u32"))?)),
            "i32" => Arg::Scalar(ParamValue::I32(rest.parse().map_err(|_| num("i32"))?)),
            "u64" => Arg::Scalar(ParamValue::U64(rest.parse().map_err(|_| num("u64"))?)),
            "f32" => Arg::Scalar(ParamValue::F32(rest.parse().map_err(|_| num("f32"))?)),
            "f64" => Arg::Scalar(ParamValue::F64(rest.parse().map_err(|_| num("f64"))?)),
            _ => return Err(bad("KIND must be one of in out u32 i32 u64 f32 f64")),
        })
    }

    /// Bytes this argument occupies in the kernel's parameter area.
    fn size(&self) -> usize {
        match self {
            Arg::In(_) | Arg::Out { .. } => 8,
            Arg::Scalar(ParamValue::U32(_) | ParamValue::I32(_) | ParamValue::F32(_)) => 4,
            Arg::Scalar(ParamValue::Bytes(b)) => b.len(),
            Arg::Scalar(_) => 8,
        }
    }
}

/// Parses `X[,Y[,Z]]` (missing dimensions are 1).
pub fn parse_dims(s: &str) -> Result<[u32; 3], String> {
    let mut d = [1u32; 3];
    let parts: Vec<&str> = s.split(',').collect();
    if parts.len() > 3 {
        return Err(format!("bad dimensions `{s}`: expected X[,Y[,Z]]"));
    }
    for (slot, p) in d.iter_mut().zip(&parts) {
        *slot = p
            .trim()
            .parse()
            .map_err(|_| format!("bad dimensions `{s}`: `{p}` is not a u32"))?;
    }
    Ok(d)
}

/// One launch to run.
#[derive(Debug, Clone)]
pub struct Job {
    /// The PTX file.
    pub ptx: PathBuf,
    /// Kernel entry name.
    pub kernel: String,
    /// Launch geometry.
    pub config: LaunchConfig,
    /// Directory the `out:` buffers are written to.
    pub out_dir: PathBuf,
    /// Arguments in parameter order.
    pub args: Vec<Arg>,
}

/// What a successful run did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The interpreter's report.
    pub report: LaunchReport,
    /// The files written.
    pub written: Vec<PathBuf>,
}

/// Raw data bytes of a `.npy` file (everything after the header).
pub fn npy_data(path: &Path) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let bad = |why: &str| format!("{}: not a .npy file: {why}", path.display());
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("missing the \\x93NUMPY magic"));
    }
    let (len, start): (usize, usize) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        _ => return Err(bad("unsupported format version")),
    };
    let end = start
        .checked_add(len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| bad("the header runs past the end of the file"))?;
    let header = String::from_utf8_lossy(&bytes[start..end]);
    if header.contains("'fortran_order': True") {
        return Err(bad("Fortran-order arrays are not supported"));
    }
    Ok(bytes[end..].to_vec())
}

/// The bytes of a version 1.0 `.npy` file holding `data` as a 1-D array of `dtype`.
pub fn npy_bytes(dtype: OutType, data: &[u8]) -> Vec<u8> {
    let count = data.len() / dtype.size();
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': ({count},), }}",
        dtype.descr()
    );
    // Magic (6) + version (2) + length (2) + header + '\n' is a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Writes `data` as a `.npy` file of `dtype` at `path`, atomically.
pub fn write_npy(path: &Path, dtype: OutType, data: &[u8]) -> Result<(), WriteError> {
    let bytes = npy_bytes(dtype, data);
    output::write_atomic(path, |w| w.write_all(&bytes))
}

/// Runs `job`: reads the PTX and inputs, checks the arguments against the kernel's parameters,
/// launches, and writes the outputs. The error is one line.
pub fn run(job: &Job, limits: Limits) -> Result<Outcome, String> {
    let src =
        std::fs::read_to_string(&job.ptx).map_err(|e| format!("{}: {e}", job.ptx.display()))?;
    let module = Module::parse(&src).map_err(|e| format!("{}: {e}", job.ptx.display()))?;
    let f = module.function(&job.kernel).ok_or_else(|| {
        format!(
            "{}: no kernel `{}` (kernels: {})",
            job.ptx.display(),
            job.kernel,
            module.kernels().join(", ")
        )
    })?;
    if !f.entry {
        return Err(format!("`{}` is a .func, not a kernel entry", job.kernel));
    }
    if f.params.len() != job.args.len() {
        return Err(format!(
            "kernel `{}` takes {} parameters, {} given",
            job.kernel,
            f.params.len(),
            job.args.len()
        ));
    }
    for (k, (decl, arg)) in f.params.iter().zip(&job.args).enumerate() {
        if decl.size as usize != arg.size() {
            return Err(format!(
                "kernel `{}` parameter {k} (`{}`) is {} bytes, argument {} gives {}",
                job.kernel,
                decl.name,
                decl.size,
                k + 1,
                arg.size()
            ));
        }
    }
    // Check the outputs can be written before running anything.
    let mut outs = Vec::new();
    for arg in &job.args {
        if let Arg::Out { name, .. } = arg {
            let path = job.out_dir.join(format!("{name}.npy"));
            if outs.contains(&path) {
                return Err(format!("output `{name}` is named twice"));
            }
            output::check_writable(&path).map_err(|e| e.to_string())?;
            outs.push(path);
        }
    }
    let mut mem = VecMemory::new();
    let mut params = Vec::with_capacity(job.args.len());
    let mut buffers = Vec::new();
    for arg in &job.args {
        params.push(match arg {
            Arg::In(p) => ParamValue::Ptr(mem.alloc_bytes(&npy_data(p)?)),
            Arg::Out { dtype, count, .. } => {
                let addr = mem.alloc_bytes(&vec![0xFF; count * dtype.size()]);
                buffers.push((addr, *dtype));
                ParamValue::Ptr(addr)
            }
            Arg::Scalar(v) => v.clone(),
        });
    }
    let report = launch(&module, &job.kernel, job.config, &params, &mut mem, limits)
        .map_err(|e| e.to_string())?;
    for (path, (addr, dtype)) in outs.iter().zip(&buffers) {
        let data = mem.bytes(*addr).unwrap_or_default();
        write_npy(path, *dtype, data).map_err(|e| e.to_string())?;
    }
    Ok(Outcome {
        report,
        written: outs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_args_and_dims() {
        assert_eq!(
            Arg::parse("out:y:bf16:7").unwrap(),
            Arg::Out {
                name: "y".into(),
                dtype: OutType::Bf16,
                count: 7
            }
        );
        assert_eq!(
            Arg::parse("i32:-3").unwrap(),
            Arg::Scalar(ParamValue::I32(-3))
        );
        assert!(Arg::parse("u32:-1").is_err());
        assert!(Arg::parse("out:y:f8:3").is_err());
        assert!(Arg::parse("out:../y:f32:3").is_err());
        assert!(Arg::parse("x").is_err());
        assert_eq!(parse_dims("4,2").unwrap(), [4, 2, 1]);
        assert!(parse_dims("1,2,3,4").is_err());
        assert!(parse_dims("a").is_err());
    }

    #[test]
    fn npy_round_trip() {
        let data: Vec<u8> = (0..12).collect();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.npy");
        write_npy(&p, OutType::U16, &data).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!((bytes.len() - data.len()) % 64, 0);
        assert!(String::from_utf8_lossy(&bytes).contains("'descr': '<u2'"));
        assert!(String::from_utf8_lossy(&bytes).contains("(6,)"));
        assert_eq!(npy_data(&p).unwrap(), data);
    }
}
