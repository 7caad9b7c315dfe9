//! The executor's error type.
//!
//! Every variant displays as one line that says what failed; where another error caused it, that
//! error is also returned by [`std::error::Error::source`], so callers can walk the whole chain
//! (e.g. for a `--verbose` report) or match on the underlying kind (an [`std::io::Error`]'s
//! `kind()`, a [`LoadError`] variant).

use crate::json::JsonError;
use crate::loader::LoadError;
use crate::schedulers::SchedulerError;
use crate::tensor::OpError;
use crate::tokenizer::TokenizerError;
use std::path::PathBuf;

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What loading and running a model can report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A CPU op rejected its operands.
    #[error(transparent)]
    Op(#[from] OpError),
    /// The pager or device failed.
    #[error(transparent)]
    Pager(#[from] ferry_pager::Error),
    /// The scheduler failed (including a budget below the minimum).
    #[error(transparent)]
    Sched(#[from] ferry_sched::Error),
    /// The CUDA backend's activation arena (reserve too small, or a stale mark).
    #[error(transparent)]
    Arena(#[from] crate::backend::ArenaError),
    /// A weight the model needs is not in the checkpoint.
    #[error("weight '{0}' is missing from the checkpoint")]
    MissingWeight(String),
    /// A weight whose shape disagrees with the config.
    #[error("weight '{name}' has shape {found:?}, but the config implies {expected:?}")]
    WeightShape {
        /// Full weight name.
        name: String,
        /// Shape the config implies.
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
    /// A config field that is missing, malformed or unsupported.
    #[error("config: {0}")]
    Config(String),
    /// Anything else wrong with the arguments.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What the operating system reported.
        #[source]
        source: std::io::Error,
    },
    /// Opening the model (its folder, configs or weight files) failed.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A JSON text (a config) that does not parse, or does not fit what is expected.
    #[error("{what} does not parse: {source}")]
    Json {
        /// Which text (e.g. `UNet config.json`).
        what: String,
        /// Where and why parsing failed.
        #[source]
        source: JsonError,
    },
    /// A tokenizer could not be loaded.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The scheduler's config, name or options were refused, or it was misused.
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    /// Loading one component of the pipeline (`unet`, `text_encoder_2`, ...) failed.
    #[error("{name}: {source}")]
    Component {
        /// The component.
        name: String,
        /// Why.
        #[source]
        source: Box<Error>,
    },
    /// A CUDA device could not be opened.
    #[error("CUDA device {ordinal} is not usable: {source}")]
    Device {
        /// The device number asked for.
        ordinal: usize,
        /// What the driver layer reported.
        #[source]
        source: ferry_pager::Error,
    },
    /// The simulated device's race checker found unordered conflicting accesses: paging is
    /// wrong, and the results cannot be trusted.
    #[error("the simulated device reported {count} data race(s); the first: {first}")]
    Races {
        /// How many races were reported.
        count: usize,
        /// The first report.
        first: String,
    },
    /// A NaN or an infinity appeared in the latents or the decoded images.
    #[error(
        "{stage} produced {value}{} ({count} of {total} values are not finite)",
        at_step(*step, *steps)
    )]
    NonFinite {
        /// What produced it (e.g. `the UNet`, `the VAE decoder`).
        stage: &'static str,
        /// The 1-based denoising step, for the denoising loop.
        step: Option<usize>,
        /// Steps in the loop.
        steps: usize,
        /// The first non-finite value: `NaN`, `inf` or `-inf`.
        value: f32,
        /// How many values are not finite.
        count: usize,
        /// Values checked.
        total: usize,
    },
}

/// " at step 3 of 30" for an error in the denoising loop, else nothing.
fn at_step(step: Option<usize>, steps: usize) -> String {
    step.map(|s| format!(" at step {s} of {steps}"))
        .unwrap_or_default()
}

impl Error {
    /// Wraps `source` with the name of the pipeline component it concerns.
    pub fn in_component(name: impl Into<String>, source: impl Into<Error>) -> Error {
        Error::Component {
            name: name.into(),
            source: Box::new(source.into()),
        }
    }

    /// The innermost error of the chain (`self` when nothing caused it).
    pub fn root_cause(&self) -> &(dyn std::error::Error + 'static) {
        let mut e: &(dyn std::error::Error + 'static) = self;
        while let Some(next) = e.source() {
            e = next;
        }
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;
    use std::io;

    /// Every level of `e`'s chain, outermost first.
    fn chain(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
        std::iter::successors(Some(e), |&e| e.source())
            .map(|e| e.to_string())
            .collect()
    }

    #[test]
    fn errors_are_send_sync_and_static() {
        fn check<T: Send + Sync + 'static>() {}
        check::<Error>();
    }

    #[test]
    fn io_errors_keep_the_path_and_the_os_error() {
        let e = Error::Io {
            path: PathBuf::from("models/x/unet/config.json"),
            source: io::Error::new(io::ErrorKind::PermissionDenied, "permission denied"),
        };
        assert_eq!(
            e.to_string(),
            "models/x/unet/config.json: permission denied"
        );
        let src = e.source().and_then(|s| s.downcast_ref::<io::Error>());
        assert_eq!(
            src.map(io::Error::kind),
            Some(io::ErrorKind::PermissionDenied)
        );
    }

    #[test]
    fn component_context_keeps_the_chain_down_to_the_io_error() {
        let load = LoadError::Io {
            path: PathBuf::from("m/vae/config.json"),
            what: "cannot read",
            source: io::Error::new(io::ErrorKind::NotFound, "not found"),
        };
        let e = Error::in_component("vae", load);
        assert_eq!(
            e.to_string(),
            "vae: m/vae/config.json: cannot read: not found"
        );
        assert_eq!(
            chain(&e),
            [
                "vae: m/vae/config.json: cannot read: not found",
                "m/vae/config.json: cannot read: not found",
                "not found"
            ]
        );
        let root = e
            .root_cause()
            .downcast_ref::<io::Error>()
            .map(io::Error::kind);
        assert_eq!(root, Some(io::ErrorKind::NotFound));
        assert!(matches!(
            e,
            Error::Component { ref name, ref source }
                if name == "vae" && matches!(**source, Error::Load(LoadError::Io { .. }))
        ));
    }

    #[test]
    fn a_cuda_device_error_has_the_driver_error_as_source() {
        let e = Error::Device {
            ordinal: 1,
            source: ferry_pager::Error::NoDriver,
        };
        let line = e.to_string();
        assert!(
            line.starts_with("CUDA device 1 is not usable: no CUDA driver"),
            "{line}"
        );
        assert!(!line.contains('\n'), "{line}");
        let src = e
            .source()
            .and_then(|s| s.downcast_ref::<ferry_pager::Error>());
        assert!(matches!(src, Some(ferry_pager::Error::NoDriver)));
    }
}
