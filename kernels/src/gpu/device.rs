//! Device memory and kernel launches, for a CUDA device or (in tests) the host emulation of the
//! same kernel sources. Everything above this module is written once against [`Device`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{CompileOptions, Ptx};

use super::GpuError;

/// The kernel sources, in the order they are concatenated into one NVRTC program.
pub const SOURCES: [(&str, &str); 7] = [
    ("image.cu", include_str!("../../cuda/image.cu")),
    ("distance.cu", include_str!("../../cuda/distance.cu")),
    ("label.cu", include_str!("../../cuda/label.cu")),
    ("crop.cu", include_str!("../../cuda/crop.cu")),
    ("flood.cu", include_str!("../../cuda/flood.cu")),
    ("illumination.cu", include_str!("../../cuda/illumination.cu")),
    ("instanseg.cu", include_str!("../../cuda/instanseg.cu")),
];

/// What `kernels/cuda/emu.h` defines for the host, defined for NVRTC.
const CUDA_PRELUDE: &str = "#define KERNEL extern \"C\" __global__\n\
#define DEVICE static __device__ __forceinline__\n\
#define F32_INF __int_as_float(0x7f800000)\n\
#define F64_INF __longlong_as_double(0x7ff0000000000000LL)\n";

/// Every kernel the sources define; each is looked up once when the module is loaded.
pub const KERNELS: [&str; 39] = [
    "hist_u16",
    "normalize_u16",
    "blur_rows",
    "blur_cols",
    "minmax_f32",
    "hist256_f32",
    "threshold_above",
    "downsample2x_mean",
    "edt_cols",
    "edt_rows",
    "max_rows",
    "max_cols",
    "peaks",
    "cc_init",
    "cc_merge",
    "cc_flatten",
    "cc_count_roots",
    "cc_rank_roots",
    "cc_label",
    "region_props",
    "crop_gather",
    "negate_f32",
    "flood_init",
    "flood_keys",
    "flood_labels",
    "flood_finish",
    "add_blobs",
    "label_stats",
    "remap_labels",
    "subtract_offset",
    "tile_select",
    "surface_ratio",
    "surface_flatten",
    "radix_hist",
    "normalize_f32",
    "instanseg_fields",
    "instanseg_peaks",
    "instanseg_score",
    "instanseg_cleanup",
];

/// The full NVRTC program text.
pub fn cuda_program() -> String {
    let mut s = String::from(CUDA_PRELUDE);
    for (name, src) in SOURCES {
        s.push_str(&format!("#line 1 \"{name}\"\n"));
        s.push_str(src);
    }
    s
}

/// Plain numbers that cross the host/device boundary as bytes.
///
/// # Safety
/// Implementors must have no padding and be valid for every bit pattern.
pub unsafe trait Pod: Copy + Default + 'static {}
// SAFETY: primitive numbers have no padding and every bit pattern is a value.
unsafe impl Pod for u8 {}
// SAFETY: as above.
unsafe impl Pod for u16 {}
// SAFETY: as above.
unsafe impl Pod for u32 {}
// SAFETY: as above.
unsafe impl Pod for u64 {}
// SAFETY: as above.
unsafe impl Pod for f32 {}
// SAFETY: as above.
unsafe impl Pod for f64 {}

fn as_bytes<T: Pod>(v: &[T]) -> &[u8] {
    // SAFETY: T is Pod (no padding), so its bytes are initialised; the length is the slice's.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

fn as_bytes_mut<T: Pod>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: T is Pod, so any bytes written make valid values.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// A kernel's argument struct: `#[repr(C)]`, the mirror of the C struct of the same name, with
/// device pointers as `u64`.
///
/// # Safety
/// The layout must match the C struct field for field.
pub unsafe trait KernelArgs: DeviceRepr + Copy {}

/// One allocation on the device (or in host memory, under emulation). Freed on drop.
#[derive(Debug)]
pub struct Buf {
    ptr: u64,
    bytes: usize,
    owner: Owner,
}

#[derive(Debug)]
enum Owner {
    Cuda(Arc<CudaContext>),
    #[cfg(any(test, feature = "emulation"))]
    Host(#[allow(dead_code)] Vec<u64>),
}

impl Buf {
    /// The address a kernel argument carries.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for Buf {
    // Irrefutable outside tests, where the emulation's host-memory owner does not exist.
    #[allow(irrefutable_let_patterns)]
    fn drop(&mut self) {
        if let Owner::Cuda(ctx) = &self.owner {
            if ctx.bind_to_thread().is_ok() {
                // SAFETY: `ptr` came from malloc_sync in this context and is freed only here.
                // A failure leaks the allocation, which is all that can be done in drop.
                let _ = unsafe { cudarc::driver::result::free_sync(self.ptr) };
            }
        }
    }
}

/// 1-D or 2-D launch geometry.
#[derive(Debug, Clone, Copy)]
pub struct Grid {
    pub blocks: (u32, u32),
    pub threads: (u32, u32),
}

impl Grid {
    /// One thread per element of `n`.
    pub fn linear(n: usize) -> Self {
        Self {
            blocks: (n.div_ceil(256).max(1) as u32, 1),
            threads: (256, 1),
        }
    }

    /// One thread per pixel.
    pub fn image(width: usize, height: usize) -> Self {
        Self {
            blocks: (width.div_ceil(16).max(1) as u32, height.div_ceil(16).max(1) as u32),
            threads: (16, 16),
        }
    }
}

/// A CUDA device with the kernels loaded.
#[derive(Debug)]
pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: HashMap<&'static str, CudaFunction>,
    pub(super) description: String,
}

/// Where compiled kernels are kept between runs: `$LIVEOMICS_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/liveomics`, else `~/.cache/liveomics`.
fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("LIVEOMICS_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("liveomics"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("liveomics"))
}

/// FNV-1a: a cache key that is stable across builds and Rust versions.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Compiles the kernel program for `arch` (e.g. `compute_90`) with NVRTC. Contraction of
/// multiply-adds is off so that the float kernels round exactly as the CPU reference does.
pub fn compile(arch: &str) -> Result<String, GpuError> {
    // SAFETY: only probes whether the library can be opened.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(GpuError::Unavailable(
            "the NVRTC library (libnvrtc.so) was not found on the library path".into(),
        ));
    }
    let opts = CompileOptions {
        fmad: Some(false),
        options: vec![format!("--gpu-architecture={arch}")],
        name: Some("liveomics_kernels.cu".into()),
        ..Default::default()
    };
    let ptx =
        cudarc::nvrtc::compile_ptx_with_opts(cuda_program(), opts).map_err(|e| GpuError::Compile(e.to_string()))?;
    Ok(ptx.to_src())
}

/// [`compile`], or the PTX a previous run compiled from the same sources for the same `arch`.
/// Returns the PTX and whether it came from the cache.
fn compile_cached(arch: &str) -> Result<(String, bool), GpuError> {
    let program = cuda_program();
    let key = fnv1a(&[program.as_bytes(), arch.as_bytes()]);
    let path = cache_dir().map(|d| d.join(format!("kernels-{key:016x}-{arch}.ptx")));
    if let Some(p) = &path {
        if let Ok(ptx) = std::fs::read_to_string(p) {
            return Ok((ptx, true));
        }
    }
    let ptx = compile(arch)?;
    if let Some(p) = &path {
        // A cache that cannot be written only costs the next start a compile.
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &ptx).is_ok() {
            let _ = std::fs::rename(&tmp, p);
        }
    }
    Ok((ptx, false))
}

impl Cuda {
    /// Opens device `ordinal`, compiles (or loads from the cache) the kernels for its
    /// architecture and looks every kernel up, so that a broken install fails here, at startup.
    pub fn open(ordinal: usize) -> Result<Self, GpuError> {
        // SAFETY: only probes whether the library can be opened.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(GpuError::Unavailable(
                "the CUDA driver library (libcuda.so) was not found: no NVIDIA driver installed".into(),
            ));
        }
        let count = CudaContext::device_count().map_err(|e| GpuError::Unavailable(format!("CUDA driver: {e}")))?;
        if ordinal >= count.max(0) as usize {
            return Err(GpuError::Unavailable(format!(
                "cuda:{ordinal} requested but the driver reports {count} device(s)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| GpuError::Unavailable(format!("cuda:{ordinal}: {e}")))?;
        let (major, minor) = ctx.compute_capability().map_err(GpuError::driver)?;
        let arch = format!("compute_{major}{minor}");
        let (ptx, cached) = compile_cached(&arch)?;
        let module = ctx.load_module(Ptx::from_src(ptx)).map_err(GpuError::driver)?;
        let mut functions = HashMap::new();
        for k in KERNELS {
            functions.insert(k, module.load_function(k).map_err(GpuError::driver)?);
        }
        let name = ctx.name().unwrap_or_else(|_| "unknown device".into());
        let description = format!(
            "cuda:{ordinal} {name} (sm_{major}{minor}), kernels {}",
            if cached {
                "from the cache"
            } else {
                "compiled with NVRTC"
            }
        );
        let stream = ctx.default_stream();
        Ok(Self {
            ctx,
            stream,
            functions,
            description,
        })
    }
}

/// A back end the GPU operations run on.
#[derive(Debug)]
pub enum Device {
    Cuda(Cuda),
    #[cfg(any(test, feature = "emulation"))]
    Emu(super::emu::Emu),
}

impl Device {
    /// `n` zeroed elements.
    pub fn zeros<T: Pod>(&self, n: usize) -> Result<Buf, GpuError> {
        let bytes = n * std::mem::size_of::<T>();
        match self {
            Device::Cuda(c) => {
                c.ctx.bind_to_thread().map_err(GpuError::driver)?;
                // SAFETY: a fresh allocation of `bytes.max(1)` bytes, zeroed before use and freed
                // by Buf's drop.
                let ptr = unsafe {
                    let p = cudarc::driver::result::malloc_sync(bytes.max(1)).map_err(GpuError::driver)?;
                    cudarc::driver::result::memset_d8_sync(p, 0, bytes.max(1)).map_err(GpuError::driver)?;
                    p
                };
                Ok(Buf {
                    ptr,
                    bytes,
                    owner: Owner::Cuda(c.ctx.clone()),
                })
            }
            #[cfg(any(test, feature = "emulation"))]
            Device::Emu(_) => {
                let store = vec![0u64; bytes.div_ceil(8).max(1)];
                Ok(Buf {
                    ptr: store.as_ptr() as u64,
                    bytes,
                    owner: Owner::Host(store),
                })
            }
        }
    }

    /// A device copy of `data`.
    pub fn upload<T: Pod>(&self, data: &[T]) -> Result<Buf, GpuError> {
        let buf = self.zeros::<T>(data.len())?;
        self.write(&buf, data)?;
        Ok(buf)
    }

    /// Overwrites the start of `buf` with `data`.
    pub fn write<T: Pod>(&self, buf: &Buf, data: &[T]) -> Result<(), GpuError> {
        let src = as_bytes(data);
        if src.len() > buf.bytes {
            return Err(GpuError::Internal(format!(
                "write of {} bytes into {}",
                src.len(),
                buf.bytes
            )));
        }
        match self {
            Device::Cuda(c) => {
                c.ctx.bind_to_thread().map_err(GpuError::driver)?;
                // SAFETY: the destination holds at least `src.len()` bytes (checked above).
                unsafe { cudarc::driver::result::memcpy_htod_sync(buf.ptr, src) }.map_err(GpuError::driver)
            }
            #[cfg(any(test, feature = "emulation"))]
            Device::Emu(_) => {
                // SAFETY: host memory of at least `src.len()` bytes, owned by `buf`.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), buf.ptr as *mut u8, src.len()) };
                Ok(())
            }
        }
    }

    /// The first `n` elements of `buf`.
    pub fn read<T: Pod>(&self, buf: &Buf, n: usize) -> Result<Vec<T>, GpuError> {
        let mut out = vec![T::default(); n];
        let dst = as_bytes_mut(&mut out);
        if dst.len() > buf.bytes {
            return Err(GpuError::Internal(format!(
                "read of {} bytes from {}",
                dst.len(),
                buf.bytes
            )));
        }
        match self {
            Device::Cuda(c) => {
                c.ctx.bind_to_thread().map_err(GpuError::driver)?;
                // The default stream is synchronous with this copy, so every launch before it
                // has finished.
                // SAFETY: the source holds at least `dst.len()` bytes (checked above).
                unsafe { cudarc::driver::result::memcpy_dtoh_sync(dst, buf.ptr) }.map_err(GpuError::driver)?;
            }
            #[cfg(any(test, feature = "emulation"))]
            Device::Emu(_) => {
                // SAFETY: host memory of at least `dst.len()` bytes, owned by `buf`.
                unsafe { std::ptr::copy_nonoverlapping(buf.ptr as *const u8, dst.as_mut_ptr(), dst.len()) };
            }
        }
        Ok(out)
    }

    /// Runs kernel `name` over `grid` with its argument struct.
    pub fn launch<A: KernelArgs>(&self, name: &'static str, grid: Grid, args: A) -> Result<(), GpuError> {
        match self {
            Device::Cuda(c) => {
                let f = c
                    .functions
                    .get(name)
                    .ok_or_else(|| GpuError::Internal(format!("kernel {name} not loaded")))?;
                let cfg = LaunchConfig {
                    grid_dim: (grid.blocks.0, grid.blocks.1, 1),
                    block_dim: (grid.threads.0, grid.threads.1, 1),
                    shared_mem_bytes: 0,
                };
                let mut b = c.stream.launch_builder(f);
                b.arg(&args);
                // SAFETY: `A` mirrors the kernel's C argument struct (KernelArgs), and every
                // pointer in it is a live allocation of the size the kernel indexes (the callers
                // in ops.rs size each buffer from the same width/height they pass).
                unsafe { b.launch(cfg) }.map_err(GpuError::driver)?;
                Ok(())
            }
            #[cfg(any(test, feature = "emulation"))]
            Device::Emu(e) => e.launch(name, grid, args),
        }
    }

    /// Waits for every launched kernel and reports an asynchronous failure.
    pub fn sync(&self) -> Result<(), GpuError> {
        match self {
            Device::Cuda(c) => c.stream.synchronize().map_err(GpuError::driver),
            #[cfg(any(test, feature = "emulation"))]
            Device::Emu(_) => Ok(()),
        }
    }
}
