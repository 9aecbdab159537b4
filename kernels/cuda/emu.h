/* Host emulation of the CUDA dialect that the kernels in kernels/cuda are written in: it lets the parity
 * tests run every kernel, serially, on a machine without a GPU (kernels/src/gpu/emu.rs compiles
 * the sources as C with this header and launches each thread of a grid in turn).
 *
 * A serial schedule is one of the schedules a GPU may run, so it checks indexing, borders and
 * the algorithms, but not races: the kernels use no shared memory or barriers, and their only
 * inter-thread communication is through the atomics below. */
#include <math.h>
#include <string.h>

typedef struct {
    unsigned int x, y, z;
} emu_dim3;

emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

void liveomics_emu_index(unsigned int bx, unsigned int by, unsigned int tx, unsigned int ty, unsigned int bdx,
                         unsigned int bdy, unsigned int gdx, unsigned int gdy) {
    blockIdx.x = bx;
    blockIdx.y = by;
    threadIdx.x = tx;
    threadIdx.y = ty;
    blockDim.x = bdx;
    blockDim.y = bdy;
    gridDim.x = gdx;
    gridDim.y = gdy;
}

#define KERNEL
#define DEVICE static inline
#define F32_INF ((float)INFINITY)
#define F64_INF ((double)INFINITY)

static inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float __uint_as_float(unsigned int u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline unsigned int emu_add_u32(unsigned int *p, unsigned int v) {
    unsigned int o = *p;
    *p = o + v;
    return o;
}
static inline unsigned long long emu_add_u64(unsigned long long *p, unsigned long long v) {
    unsigned long long o = *p;
    *p = o + v;
    return o;
}
static inline float emu_add_f32(float *p, float v) {
    float o = *p;
    *p = o + v;
    return o;
}
static inline double emu_add_f64(double *p, double v) {
    double o = *p;
    *p = o + v;
    return o;
}
static inline unsigned int emu_min_u32(unsigned int *p, unsigned int v) {
    unsigned int o = *p;
    if (v < o) *p = v;
    return o;
}
static inline unsigned int emu_max_u32(unsigned int *p, unsigned int v) {
    unsigned int o = *p;
    if (v > o) *p = v;
    return o;
}

#define atomicAdd(p, v)                                                                                \
    _Generic((p), unsigned int *: emu_add_u32, unsigned long long *: emu_add_u64, float *: emu_add_f32, \
             double *: emu_add_f64)(p, v)
#define atomicMin(p, v) emu_min_u32(p, v)
#define atomicMax(p, v) emu_max_u32(p, v)
