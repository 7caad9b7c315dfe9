//! The thin layer over the driver: status codes become [`Error::Cuda`] values that name the call.

use crate::error::{Error, Result};
use cudarc::driver::{result::DriverError, sys};

/// Turns a driver error from `call` into our error, with the code's name and the driver's text.
pub(crate) fn driver_error(call: &'static str, err: DriverError) -> Error {
    let text = err
        .error_string()
        .ok()
        .and_then(|s| s.to_str().ok())
        .unwrap_or("no description from the driver");
    Error::Cuda {
        call,
        message: format!("{:?}: {text}", err.0),
    }
}

/// Attaches the name of the driver call to a cudarc result.
pub(crate) trait Call<T> {
    /// Maps the error to [`Error::Cuda`] naming `call`.
    fn call(self, call: &'static str) -> Result<T>;
}

impl<T> Call<T> for std::result::Result<T, DriverError> {
    fn call(self, call: &'static str) -> Result<T> {
        self.map_err(|e| driver_error(call, e))
    }
}

/// Checks the status of a raw `sys` call.
pub(crate) fn check(status: sys::CUresult, call: &'static str) -> Result<()> {
    status.result().call(call)
}
