//! Runs the CUDA kernel sources on the host, one thread after another, so that the parity tests
//! check the GPU code path (kernels, launch geometry and the host-side steps around them) on
//! machines without a GPU. The sources are compiled once per test process as C with
//! `kernels/cuda/emu.h` by the system C compiler (`$CC`, else `cc`).

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use libloading::Library;

use super::device::{Grid, KernelArgs, SOURCES};
use super::GpuError;

/// The compiled host library; launches are serialised because the emulated thread index is
/// process-global state inside it.
#[derive(Debug)]
pub struct Emu {
    lib: &'static Library,
}

static LIB: OnceLock<Result<Library, String>> = OnceLock::new();
static LAUNCH: Mutex<()> = Mutex::new(());

fn build() -> Result<Library, String> {
    let dir = std::env::temp_dir().join(format!("liveomics-emu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut src = String::from(include_str!("../../cuda/emu.h"));
    for (name, body) in SOURCES {
        src.push_str(&format!("#line 1 \"{name}\"\n{body}"));
    }
    let c = dir.join("kernels.c");
    std::fs::write(&c, src).map_err(|e| e.to_string())?;
    let so: PathBuf = dir.join("kernels.so");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = std::process::Command::new(&cc)
        .args([
            "-std=c11",
            "-O2",
            "-Wall",
            "-Werror",
            "-fPIC",
            "-shared",
            "-ffp-contract=off",
        ])
        .arg(&c)
        .arg("-o")
        .arg(&so)
        .arg("-lm")
        .output()
        .map_err(|e| format!("{cc}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cc} failed:\n{}", String::from_utf8_lossy(&out.stderr)));
    }
    // SAFETY: the library is the kernels compiled just above; its initialisers do nothing.
    let lib = unsafe { Library::new(&so) }.map_err(|e| e.to_string());
    // A loaded library stays mapped after its file is gone.
    let _ = std::fs::remove_dir_all(&dir);
    lib
}

impl Emu {
    pub fn new() -> Result<Self, GpuError> {
        match LIB.get_or_init(build) {
            Ok(lib) => Ok(Self { lib }),
            Err(e) => Err(GpuError::Unavailable(format!("host emulation: {e}"))),
        }
    }

    pub fn launch<A: KernelArgs>(&self, name: &'static str, grid: Grid, args: A) -> Result<(), GpuError> {
        type SetIndex = unsafe extern "C" fn(u32, u32, u32, u32, u32, u32, u32, u32);
        let _guard = LAUNCH.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the symbols are the emulation's index setter and a kernel whose C signature
        // takes exactly one struct that `A` mirrors (KernelArgs).
        unsafe {
            let set: libloading::Symbol<SetIndex> = self
                .lib
                .get(b"liveomics_emu_index\0")
                .map_err(|e| GpuError::Internal(e.to_string()))?;
            let kernel: libloading::Symbol<unsafe extern "C" fn(A)> = self
                .lib
                .get(format!("{name}\0").as_bytes())
                .map_err(|e| GpuError::Internal(format!("{name}: {e}")))?;
            let ((gx, gy), (tx, ty)) = (grid.blocks, grid.threads);
            for by in 0..gy {
                for bx in 0..gx {
                    for y in 0..ty {
                        for x in 0..tx {
                            set(bx, by, x, y, tx, ty, gx, gy);
                            kernel(args);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
