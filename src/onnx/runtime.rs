//! Loading ONNX Runtime from the configured shared library, refusing any version but the one we build against.

use std::ffi::CStr;
use std::path::{Path, PathBuf};

/// ort 2.0.0-rc.15 speaks the C API of ONNX Runtime 1.31.
pub const REQUIRED_MINOR: u32 = 31;
const SETUP_HINT: &str = "run `make ort` to install onnxruntime==1.31.1 into .ort/, or set CAMSERVE_ORT_LIBRARY to \
                          the path of libonnxruntime.so.1.31.x";

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("ONNX Runtime library not found at {path}: {SETUP_HINT}")]
    Missing { path: PathBuf },
    #[error("cannot load ONNX Runtime from {path} ({reason}): {SETUP_HINT}")]
    Unloadable { path: PathBuf, reason: String },
    #[error(
        "ONNX Runtime at {path} is version {version}, camserve needs 1.{REQUIRED_MINOR}.x: {SETUP_HINT}"
    )]
    WrongVersion { path: PathBuf, version: String },
    #[error("cannot create the ONNX Runtime environment: {0}")]
    Environment(#[from] ort::Error),
}

/// The loaded library: one per process, shared by every session.
#[derive(Clone)]
pub struct OnnxRuntime {
    pub environment: ort::environment::Environment,
    pub version: String,
}

/// Loads the library once for the whole process.
pub fn init(library: &Path) -> Result<OnnxRuntime, RuntimeError> {
    if !library.is_file() {
        return Err(RuntimeError::Missing {
            path: library.to_owned(),
        });
    }
    let version = library_version(library)?;
    let minor = version
        .split('.')
        .nth(1)
        .and_then(|m| m.parse::<u32>().ok());
    if !version.starts_with("1.") || minor != Some(REQUIRED_MINOR) {
        return Err(RuntimeError::WrongVersion {
            path: library.to_owned(),
            version,
        });
    }
    let environment = ort::init_from(library)
        .map_err(|e| RuntimeError::Unloadable {
            path: library.to_owned(),
            reason: e.to_string(),
        })?
        .with_name("camserve")
        .with_telemetry(false)
        .build()?;
    Ok(OnnxRuntime {
        environment,
        version,
    })
}

/// Asks the library itself for its version, before ort binds to it (ort accepts any newer minor version).
fn library_version(library: &Path) -> Result<String, RuntimeError> {
    let unloadable = |reason: String| RuntimeError::Unloadable {
        path: library.to_owned(),
        reason,
    };
    // SAFETY: loading ONNX Runtime runs no initialisers with preconditions; OrtGetApiBase takes no arguments
    // and returns a pointer to a static struct whose GetVersionString returns a static C string.
    unsafe {
        let lib = libloading::Library::new(library).map_err(|e| unloadable(e.to_string()))?;
        let get_api_base = lib
            .get::<unsafe extern "C" fn() -> *const ort::sys::OrtApiBase>(b"OrtGetApiBase")
            .map_err(|_| {
                unloadable("it does not export OrtGetApiBase; is it ONNX Runtime?".into())
            })?;
        let base = get_api_base();
        if base.is_null() {
            return Err(unloadable("OrtGetApiBase returned null".into()));
        }
        let version = CStr::from_ptr(((*base).GetVersionString)())
            .to_string_lossy()
            .into_owned();
        // Keep the library mapped: ort opens the same file next and must find the same image.
        std::mem::forget(lib);
        Ok(version)
    }
}
