/* Pixelwise and separable image operations: the CUDA side of kernels/src/cpu/image.rs.
 *
 * Every kernel takes one argument struct by value, mirrored by a #[repr(C)] struct in
 * kernels/src/gpu/mod.rs (kernel_args!), and is written in the C subset of CUDA (no templates, no shared
 * memory, no barriers) so that the same source also runs serially on the host under
 * kernels/cuda/emu.h, which is how the parity tests check it where there is no GPU.
 * Floating-point expressions follow the CPU reference operation by operation, and the module is
 * compiled with --fmad=false, so results are bit-identical rather than merely close. */

DEVICE unsigned int gid_x(void) { return blockIdx.x * blockDim.x + threadIdx.x; }
DEVICE unsigned int gid_y(void) { return blockIdx.y * blockDim.y + threadIdx.y; }

/* Clamped to [0, 1], as Rust's f32::clamp(0.0, 1.0) for numbers. */
DEVICE float unit_clamp(float v) { return fminf(fmaxf(v, 0.0f), 1.0f); }

DEVICE int finite_f32(float v) { return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u; }

/* Float order as unsigned order, for atomicMin/atomicMax on floats. */
DEVICE unsigned int ordered_f32(float v) {
    unsigned int u = __float_as_uint(v);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

typedef struct {
    const unsigned short *src;
    unsigned int *hist; /* 65536 bins */
    unsigned long long n;
} HistU16Args;

KERNEL void hist_u16(HistU16Args a) {
    unsigned long long i = gid_x();
    if (i < a.n) atomicAdd(&a.hist[a.src[i]], 1u);
}

typedef struct {
    const unsigned short *src;
    float *dst;
    unsigned long long n;
    float lo;
    float scale;
} NormalizeArgs;

/* ((v - lo) * scale) clamped to [0, 1]: percentiles come from the histogram, on the host. */
KERNEL void normalize_u16(NormalizeArgs a) {
    unsigned long long i = gid_x();
    if (i >= a.n) return;
    float v = ((float)a.src[i] - a.lo) * a.scale;
    a.dst[i] = unit_clamp(v);
}

DEVICE int reflect_index(int i, int n) {
    if (n == 1) return 0;
    for (;;) {
        if (i < 0) i = -i - 1;
        else if (i >= n) i = 2 * n - i - 1;
        else return i;
    }
}

typedef struct {
    const float *src;
    float *dst;
    const float *taps; /* 2 * radius + 1 normalised weights */
    unsigned int width;
    unsigned int height;
    unsigned int radius;
} BlurArgs;

/* One output pixel per thread, taps summed in order from 0: the CPU's order. */
KERNEL void blur_rows(BlurArgs a) {
    unsigned int x = gid_x(), y = gid_y();
    if (x >= a.width || y >= a.height) return;
    const float *row = a.src + (unsigned long long)y * a.width;
    float acc = 0.0f;
    int r = (int)a.radius;
    for (int j = 0; j <= 2 * r; j++) acc += a.taps[j] * row[reflect_index((int)x + j - r, (int)a.width)];
    a.dst[(unsigned long long)y * a.width + x] = acc;
}

KERNEL void blur_cols(BlurArgs a) {
    unsigned int x = gid_x(), y = gid_y();
    if (x >= a.width || y >= a.height) return;
    float acc = 0.0f;
    int r = (int)a.radius;
    for (int j = 0; j <= 2 * r; j++) {
        int sy = reflect_index((int)y + j - r, (int)a.height);
        acc += a.taps[j] * a.src[(unsigned long long)sy * a.width + x];
    }
    a.dst[(unsigned long long)y * a.width + x] = acc;
}

typedef struct {
    const float *src;
    const unsigned char *mask; /* null: every pixel */
    unsigned int *range;       /* [ordered min, ordered max], initialised to [~0, 0] */
    unsigned long long n;
} MinMaxArgs;

KERNEL void minmax_f32(MinMaxArgs a) {
    unsigned long long i = gid_x();
    if (i >= a.n || (a.mask && !a.mask[i])) return;
    float v = a.src[i];
    if (!finite_f32(v)) return;
    unsigned int o = ordered_f32(v);
    atomicMin(&a.range[0], o);
    atomicMax(&a.range[1], o);
}

typedef struct {
    const float *src;
    unsigned int *hist; /* 256 bins */
    unsigned long long n;
    float lo;
    float scale; /* 255 / (hi - lo) */
} Hist256Args;

KERNEL void hist256_f32(Hist256Args a) {
    unsigned long long i = gid_x();
    if (i >= a.n) return;
    float v = a.src[i];
    if (!finite_f32(v)) return;
    atomicAdd(&a.hist[(unsigned int)((v - a.lo) * a.scale)], 1u);
}

typedef struct {
    const float *src;
    const unsigned int *labels; /* null: none; else every labelled pixel is foreground too */
    unsigned char *mask;
    unsigned long long n;
    float threshold;
} ThresholdArgs;

KERNEL void threshold_above(ThresholdArgs a) {
    unsigned long long i = gid_x();
    if (i < a.n) a.mask[i] = a.src[i] > a.threshold || (a.labels && a.labels[i] != 0);
}

typedef struct {
    const unsigned short *src;
    unsigned short *dst;
    unsigned int width;
    unsigned int height;
    unsigned int out_width;
    unsigned int out_height;
} DownsampleArgs;

/* 2x2 block mean, rounded; odd edges repeat the last row or column. */
KERNEL void downsample2x_mean(DownsampleArgs a) {
    unsigned int x = gid_x(), y = gid_y();
    if (x >= a.out_width || y >= a.out_height) return;
    unsigned int x0 = 2 * x, y0 = 2 * y;
    unsigned int x1 = x0 + 1 < a.width ? x0 + 1 : a.width - 1;
    unsigned int y1 = y0 + 1 < a.height ? y0 + 1 : a.height - 1;
    unsigned long long w = a.width;
    unsigned int s = (unsigned int)a.src[y0 * w + x0] + a.src[y0 * w + x1] + a.src[y1 * w + x0] + a.src[y1 * w + x1];
    a.dst[(unsigned long long)y * a.out_width + x] = (unsigned short)((s + 2) / 4);
}
