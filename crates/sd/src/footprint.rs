//! An up-front estimate of the host and device memory a generation needs, from the model's
//! configs and safetensors headers only (no weight bytes are read), so that a request the machine
//! cannot hold is refused with a clear message instead of being killed by the kernel.
//!
//! What is counted, per the way the executor materialises tensors:
//! - **weights**: their stored bytes in host memory; on the CPU path the simulated device holds a
//!   second copy (all of it, or up to `--vram-budget`); on CUDA they are converted to the compute
//!   dtype on the device (or limited to the budget when paging).
//! - **UNet** at latent size, with classifier-free guidance doubling the batch: the skip
//!   connections every down level keeps for the up path, plus the largest level's working set
//!   (a transformer block's GEGLU projection is 8× its channels; a resnet level a few tensors).
//! - **attention scores**: the CPU op works in bands of at most 16 MiB of scores; the CUDA kernel
//!   is fused (no score matrix).
//! - **VAE decoder** at full resolution, the whole batch at once: the upsampled input of the last
//!   level and the resnet tensors around it, plus the banded im2col buffer of its convolutions.
//! - a fixed allowance for the process itself (code, thread pools, tokenizers, small buffers).
//!
//! The estimate is meant to be within a factor of 2 of the measured peak (see the `txt2img`
//! tests, which compare it with the peak resident set reported by `--stats`).

use crate::loader::{LoadError, ModelSource};
use serde_json::Value;
use std::fmt;

/// Bytes in a GiB.
const GIB: f64 = (1u64 << 30) as f64;
/// The process's own memory: binary, thread stacks, tokenizer vocabularies, small buffers
/// (measured: 27 MiB peak for a 64×32 image of the 1.6 MiB test model).
const BASE_BYTES: u64 = 24 << 20;
/// The CPU attention op's score band cap, in f32 elements (see `ops::attention`).
const SCORE_BAND_ELEMS: u64 = 4 << 20;
/// The CPU convolution's im2col band cap, in f32 elements (see `ops::conv`).
const IM2COL_BAND_ELEMS: u64 = 4 << 20;

/// The dimensions of a model that decide its memory use, read from its configs and headers.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelDims {
    /// Stored bytes of every weight (text encoders, UNet, VAE).
    pub weight_bytes: u64,
    /// Number of weight elements (for conversion to another dtype).
    pub weight_elements: u64,
    /// UNet channels per level.
    pub unet_channels: Vec<usize>,
    /// Whether each UNet level has attention (cross-attention blocks).
    pub unet_attention: Vec<bool>,
    /// Resnets per UNet down level.
    pub unet_layers: usize,
    /// Latent channels.
    pub latent_channels: usize,
    /// VAE channels per level.
    pub vae_channels: Vec<usize>,
    /// Pixels per latent along each side (8 for SD).
    pub vae_scale: usize,
    /// The default image size `(width, height)` in pixels.
    pub default_size: (usize, usize),
}

/// What is generated, and where.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Request {
    /// Image width in pixels.
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Images.
    pub batch: usize,
    /// Classifier-free guidance (the UNet runs on twice the batch).
    pub cfg: bool,
    /// Where the compute runs.
    pub target: Target,
    /// The device budget (`--vram-budget`), if any.
    pub budget: Option<u64>,
}

/// Where a generation computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The CPU path: f32 activations in host memory, weights on a simulated device in host memory.
    Cpu,
    /// CUDA, computing with elements of this many bytes (2 for f16 / bf16, 4 for f32).
    Cuda {
        /// Bytes per element of the compute dtype.
        elem_bytes: u64,
    },
}

/// The estimate, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footprint {
    /// Host memory at the peak.
    pub host: u64,
    /// Device memory at the peak (0 on the CPU path).
    pub device: u64,
    /// Of `host`: the weights (both copies on the CPU path).
    pub host_weights: u64,
    /// The activations' peak (host on the CPU path, device on CUDA).
    pub activations: u64,
}

/// Formats bytes as GiB with one decimal (two below 1 GiB), for messages.
pub struct Gib(pub u64);

impl fmt::Display for Gib {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = self.0 as f64 / GIB;
        if g < 1.0 {
            write!(f, "{g:.2} GiB")
        } else {
            write!(f, "{g:.1} GiB")
        }
    }
}

fn usize_list(v: &Value) -> Option<Vec<usize>> {
    v.as_array()?
        .iter()
        .map(|x| x.as_u64().and_then(|n| usize::try_from(n).ok()))
        .collect()
}

/// An integer, or the largest of a list of integers (diffusers' per-block values).
fn usize_or_max(v: &Value) -> Option<usize> {
    match v {
        Value::Array(_) => usize_list(v)?.into_iter().max(),
        _ => v.as_u64().and_then(|n| usize::try_from(n).ok()),
    }
}

impl ModelDims {
    /// Reads the dimensions of an opened model: component configs and safetensors headers only.
    pub fn of(source: &ModelSource) -> Result<ModelDims, LoadError> {
        let mut weight_bytes = 0u64;
        let mut weight_elements = 0u64;
        for name in ["text_encoder", "text_encoder_2", "unet", "vae"] {
            if !source.has_component(name) {
                continue;
            }
            let c = source.component(name)?;
            weight_bytes += c.stored_bytes();
            weight_elements += c
                .tensors
                .iter()
                .map(|t| t.num_elements() as u64)
                .sum::<u64>();
        }
        let unet = source.component("unet")?.config()?;
        let vae = source.component("vae")?.config()?;
        let unet_channels = usize_list(&unet["block_out_channels"])
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| vec![320, 640, 1280, 1280]);
        let unet_attention = match unet["down_block_types"].as_array() {
            Some(types) => types
                .iter()
                .map(|t| t.as_str().is_some_and(|s| s.contains("Attn")))
                .collect(),
            None => vec![true; unet_channels.len()],
        };
        let vae_channels = usize_list(&vae["block_out_channels"])
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| vec![128, 256, 512, 512]);
        let vae_scale = 1usize << (vae_channels.len() - 1).min(6);
        let (sw, sh) = match &unet["sample_size"] {
            Value::Array(v) if v.len() == 2 => (
                v[1].as_u64().unwrap_or(64) as usize,
                v[0].as_u64().unwrap_or(64) as usize,
            ),
            v => {
                let s = v.as_u64().unwrap_or(64) as usize;
                (s, s)
            }
        };
        Ok(ModelDims {
            weight_bytes,
            weight_elements,
            unet_channels,
            unet_attention,
            unet_layers: usize_or_max(&unet["layers_per_block"]).unwrap_or(2),
            latent_channels: unet["in_channels"].as_u64().unwrap_or(4) as usize,
            vae_channels,
            vae_scale,
            default_size: (sw * vae_scale, sh * vae_scale),
        })
    }

    /// The estimated peak memory of generating `req` with this model.
    pub fn estimate(&self, req: &Request) -> Footprint {
        // Computed in f64 so that no input can overflow; `as u64` saturates.
        let elem = match req.target {
            Target::Cpu => 4.0,
            Target::Cuda { elem_bytes } => elem_bytes.max(1) as f64,
        };
        let (w, h) = (req.width as f64, req.height as f64);
        let f = self.vae_scale.max(1) as f64;
        let latent = (w / f).floor().max(1.0) * (h / f).floor().max(1.0);
        let b = req.batch.max(1) as f64;
        let unet_b = if req.cfg { 2.0 * b } else { b };

        // UNet: skips kept for the up path, and the largest level's working set.
        let layers = self.unet_layers as f64;
        let levels = self.unet_channels.len();
        let mut skips = self.unet_channels.first().copied().unwrap_or(0) as f64 * latent;
        let mut working = 0f64;
        let mut n = latent;
        for (i, &c) in self.unet_channels.iter().enumerate() {
            let c = c as f64;
            skips += layers * c * n;
            if i + 1 < levels {
                skips += c * (n / 4.0);
            }
            let attn = self.unet_attention.get(i).copied().unwrap_or(true);
            // Attention levels: the residual stream, norm, q/k/v, attention output, GEGLU's 8C
            // projection and its 4C product; the up path's concatenation is twice the channels.
            let per_pixel = if attn { 20.0 } else { 8.0 };
            working = working.max(per_pixel * c * n);
            n /= 4.0;
        }
        let unet = unet_b * (skips + working) * elem;

        // VAE decoder at full resolution: the last level's upsampled input and the upsampler's
        // convolution, the resnet's norm and convolutions, and its shortcut.
        let pixels = w * h;
        let c0 = self.vae_channels.first().copied().unwrap_or(128) as f64;
        let c1 = self.vae_channels.get(1).map_or(c0, |&c| c as f64);
        // The CPU VAE computes in f32; on CUDA, in the compute dtype.
        let vae = b * pixels * (4.0 * c1 + 3.0 * c0) * elem;
        // Images out: f32 [batch, 3, H, W] and one RGB8 image at a time.
        let images = b * pixels * 3.0 * 4.0 + pixels * 3.0;
        let latents = b * self.latent_channels as f64 * latent * 4.0 * 4.0;
        let base = BASE_BYTES as f64;
        let weights = self.weight_bytes as f64;
        let bytes = |x: f64| x as u64;

        match req.target {
            Target::Cpu => {
                // Banded buffers: at least one output row (im2col) or one query row (scores),
                // at most the whole image.
                let ckk = 9.0 * c1;
                let im2col = (IM2COL_BAND_ELEMS as f64).max(ckk * w).min(ckk * pixels) * 4.0;
                let scores = (SCORE_BAND_ELEMS as f64).max(latent).min(latent * latent) * 4.0;
                let activations = unet.max(vae + im2col) + scores + images + latents;
                let device_copy = match req.budget {
                    Some(budget) => (budget as f64).min(weights),
                    None => weights,
                };
                let host_weights = weights + device_copy;
                Footprint {
                    host: bytes(base + host_weights + activations),
                    device: 0,
                    host_weights: bytes(host_weights),
                    activations: bytes(activations),
                }
            }
            Target::Cuda { .. } => {
                let activations = unet.max(vae);
                let weights_on_device = self.weight_elements as f64 * elem;
                let device = match req.budget {
                    Some(budget) => (budget as f64).max(activations),
                    None => weights_on_device + activations,
                };
                // Host: the weights in pinned memory (converted to the compute dtype), the
                // decoded images and latents.
                Footprint {
                    host: bytes(base + weights_on_device + images + latents),
                    device: bytes(device),
                    host_weights: bytes(weights_on_device),
                    activations: bytes(activations),
                }
            }
        }
    }
}

/// `MemAvailable` of `/proc/meminfo`, in bytes (`None` where there is no such file).
pub fn host_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo_available(&text)
}

fn parse_meminfo_available(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut parts = line.split_whitespace().skip(1);
    let kib: u64 = parts.next()?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// The peak resident set of this process so far (`VmHWM` of `/proc/self/status`), in bytes.
pub fn peak_rss() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// Refuses a request whose estimate exceeds what is available: `None` when it fits, else the
/// one-line reason, e.g. "needs ~80.2 GiB of host memory for 4096×4096 (batch 1), 12.3 GiB
/// available".
pub fn check(
    fp: &Footprint,
    req: &Request,
    host_avail: Option<u64>,
    device_avail: Option<u64>,
) -> Option<String> {
    let what = format!("{}×{} (batch {})", req.width, req.height, req.batch);
    if let Some(avail) = host_avail {
        if fp.host > avail {
            return Some(format!(
                "needs ~{} of host memory for {what}, {} available",
                Gib(fp.host),
                Gib(avail)
            ));
        }
    }
    if let Some(avail) = device_avail {
        if fp.device > avail {
            return Some(format!(
                "needs ~{} of device memory for {what}, {} available",
                Gib(fp.device),
                Gib(avail)
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims() -> ModelDims {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models/sd15");
        ModelDims::of(&ModelSource::open(path).unwrap()).unwrap()
    }

    fn req(width: usize, height: usize, batch: usize) -> Request {
        Request {
            width,
            height,
            batch,
            cfg: true,
            target: Target::Cpu,
            budget: None,
        }
    }

    #[test]
    fn reads_the_fixture_dims() {
        let d = dims();
        assert_eq!(d.unet_channels, [16, 32]);
        assert_eq!(d.unet_attention, [true, false]);
        assert_eq!(d.vae_channels, [8, 16, 16, 16]);
        assert_eq!((d.vae_scale, d.default_size), (8, (32, 32)));
        assert!(d.weight_bytes > 100_000 && d.weight_elements > 0);
    }

    #[test]
    fn grows_with_size_and_batch() {
        let d = dims();
        let small = d.estimate(&req(64, 64, 1));
        let wide = d.estimate(&req(512, 64, 1));
        let big = d.estimate(&req(512, 512, 1));
        let batch = d.estimate(&req(512, 512, 4));
        assert!(small.host < wide.host && wide.host < big.host && big.host < batch.host);
        assert!(small.activations < big.activations && big.activations < batch.activations);
        // Without guidance the UNet runs on half the batch.
        let nocfg = d.estimate(&Request {
            cfg: false,
            ..req(512, 512, 4)
        });
        assert!(nocfg.host <= batch.host);
        // The VAE's full-resolution maps dominate at large sizes: ~4× the pixels, ~4× the bytes.
        let huge = d.estimate(&req(8192, 8192, 1)).activations as f64;
        let huge4 = d.estimate(&req(16384, 16384, 1)).activations as f64;
        assert!((3.5..4.5).contains(&(huge4 / huge)), "{}", huge4 / huge);
    }

    #[test]
    fn cuda_counts_weights_on_the_device_and_respects_a_budget() {
        let d = dims();
        let cuda = |budget| Request {
            target: Target::Cuda { elem_bytes: 2 },
            budget,
            ..req(64, 64, 1)
        };
        let full = d.estimate(&cuda(None));
        assert!(full.device >= d.weight_elements * 2);
        let paged = d.estimate(&cuda(Some(1 << 20)));
        assert!(paged.device < full.device.max(1 << 20) + 1);
        assert!(paged.device >= paged.activations);
    }

    #[test]
    fn the_check_names_the_need_and_what_is_available() {
        let d = dims();
        let r = req(16384, 16384, 1);
        let fp = d.estimate(&r);
        let msg = check(&fp, &r, Some(8 << 30), None).unwrap();
        assert!(
            msg.starts_with("needs ~")
                && msg.contains("of host memory for 16384×16384 (batch 1), 8.0 GiB available"),
            "{msg}"
        );
        assert!(check(&fp, &r, Some(u64::MAX), None).is_none());
        assert!(check(&fp, &r, None, None).is_none());
        let fp = Footprint {
            device: 10 << 30,
            ..fp
        };
        let msg = check(&fp, &r, None, Some(4 << 30)).unwrap();
        assert!(msg.contains("of device memory") && msg.contains("4.0 GiB available"));
    }

    #[test]
    fn absurd_inputs_saturate_instead_of_overflowing() {
        let mut d = dims();
        d.vae_channels = vec![usize::MAX; 2];
        let fp = d.estimate(&req(usize::MAX, usize::MAX, usize::MAX));
        assert_eq!(fp.host, u64::MAX);
        assert!(check(&fp, &req(1, 1, 1), Some(u64::MAX - 1), None).is_some());
    }

    #[test]
    fn meminfo_is_parsed() {
        let text = "MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:   12000000 kB\n";
        assert_eq!(parse_meminfo_available(text), Some(12_000_000 * 1024));
        assert_eq!(parse_meminfo_available("MemTotal: 1 kB\n"), None);
        assert!(format!("{}", Gib(3 << 29)).starts_with("1.5 GiB"));
        assert_eq!(format!("{}", Gib(1 << 29)), "0.50 GiB");
    }
}
