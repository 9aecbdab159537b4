/* Illumination correction and float percentiles (kernels/src/illumination.rs): the per-tile
 * percentiles and the surface evaluations run here, the small least-squares fits on the host.
 * Order statistics are exact (selection over the floats' total order), and the surfaces are
 * evaluated in f64 term by term as on the CPU, so the result is the CPU's bit for bit. */

DEVICE float unordered_f32(unsigned int e) {
    return __uint_as_float((e & 0x80000000u) ? (e & 0x7fffffffu) : ~e);
}

typedef struct {
    const unsigned short *src;
    float *dst;
    unsigned long long n;
    float offset;
} OffsetArgs;

KERNEL void subtract_offset(OffsetArgs a) {
    unsigned long long i = gid_x();
    if (i < a.n) a.dst[i] = (float)a.src[i] - a.offset;
}

typedef struct {
    const float *img;
    unsigned int *scratch; /* block * block per tile */
    float *out;            /* one value per tile */
    double percentile;
    unsigned int width;
    unsigned int height;
    unsigned int block;
    unsigned int grid_w;
    unsigned int grid_h;
} TileSelectArgs;

/* The k-th smallest of v[0..m) (ordered keys): quickselect with a three-way partition, since
 * camera data repeats values. */
DEVICE unsigned int select_kth(unsigned int *v, int m, int k) {
    int lo = 0, hi = m - 1;
    while (lo < hi) {
        unsigned int pivot = v[lo + (hi - lo) / 2];
        int lt = lo, i = lo, gt = hi;
        while (i <= gt) {
            unsigned int t = v[i];
            if (t < pivot) {
                v[i] = v[lt];
                v[lt] = t;
                lt++;
                i++;
            } else if (t > pivot) {
                v[i] = v[gt];
                v[gt] = t;
                gt--;
            } else {
                i++;
            }
        }
        /* v[lo, lt) < pivot == v[lt, gt] < v(gt, hi] */
        if (k < lt) hi = lt - 1;
        else if (k > gt) lo = gt + 1;
        else return pivot;
    }
    return v[k];
}

/* One thread per tile: its `percentile` (the background between cells). */
KERNEL void tile_select(TileSelectArgs a) {
    unsigned int g = gid_x();
    if (g >= a.grid_w * a.grid_h) return;
    unsigned int x0 = (g % a.grid_w) * a.block, y0 = (g / a.grid_w) * a.block;
    unsigned int x1 = x0 + a.block < a.width ? x0 + a.block : a.width;
    unsigned int y1 = y0 + a.block < a.height ? y0 + a.block : a.height;
    unsigned int *v = a.scratch + (unsigned long long)g * a.block * a.block;
    unsigned int m = 0;
    for (unsigned int y = y0; y < y1; y++)
        for (unsigned int x = x0; x < x1; x++) v[m++] = ordered_f32(a.img[(unsigned long long)y * a.width + x]);
    int k = (int)round((double)(m - 1) * a.percentile / 100.0);
    a.out[g] = unordered_f32(select_kth(v, (int)m, k));
}

DEVICE double unit_pos(double p, unsigned int n) { return 2.0 * p / (double)n - 1.0; }

DEVICE double quadratic(const double *c, double u, double v) {
    return c[0] + c[1] * u + c[2] * v + c[3] * u * u + c[4] * u * v + c[5] * v * v;
}

typedef struct {
    const unsigned short *src; /* flatten: the raw image */
    const float *first;        /* ratio: the image less the offset */
    float *dst;
    double b1[6];
    double b2[6];
    unsigned int width;
    unsigned int height;
    float offset;
} SurfaceArgs;

/* The image divided by the first surface, for the second fit. */
KERNEL void surface_ratio(SurfaceArgs a) {
    unsigned int x = gid_x(), y = gid_y();
    if (x >= a.width || y >= a.height) return;
    unsigned long long i = (unsigned long long)y * a.width + x;
    double u = unit_pos((double)x + 0.5, a.width), v = unit_pos((double)y + 0.5, a.height);
    a.dst[i] = a.first[i] / (float)fmax(quadratic(a.b1, u, v), 1.0);
}

/* (raw - offset) / background - 1, the background being both surfaces' product. */
KERNEL void surface_flatten(SurfaceArgs a) {
    unsigned int x = gid_x(), y = gid_y();
    if (x >= a.width || y >= a.height) return;
    unsigned long long i = (unsigned long long)y * a.width + x;
    double u = unit_pos((double)x + 0.5, a.width), v = unit_pos((double)y + 0.5, a.height);
    float bg = (float)fmax(fmax(quadratic(a.b1, u, v), 1.0) * quadratic(a.b2, u, v), 1.0);
    a.dst[i] = ((float)a.src[i] - a.offset) / bg - 1.0f;
}

typedef struct {
    const float *src;
    unsigned int *hist; /* 65536 bins */
    unsigned long long n;
    unsigned int high; /* pass 1: the high half of the keys counted */
    unsigned int pass;
} RadixArgs;

/* Radix selection over the floats' total order, NaN counted as 0: pass 0 histograms the high
 * 16 bits of the keys, pass 1 the low 16 bits of the keys whose high half is `high`. */
KERNEL void radix_hist(RadixArgs a) {
    unsigned long long i = gid_x();
    if (i >= a.n) return;
    float v = a.src[i];
    unsigned int key = ordered_f32(v != v ? 0.0f : v);
    if (a.pass == 0) atomicAdd(&a.hist[key >> 16], 1u);
    else if ((key >> 16) == a.high) atomicAdd(&a.hist[key & 0xffffu], 1u);
}

/* The layout of NormalizeArgs (image.cu) with a float source: the host fills both with one
 * struct. */
typedef struct {
    const float *src;
    float *dst;
    unsigned long long n;
    float lo;
    float scale;
} NormalizeF32Args;

KERNEL void normalize_f32(NormalizeF32Args a) {
    unsigned long long i = gid_x();
    if (i >= a.n) return;
    float x = a.src[i];
    a.dst[i] = x != x ? 0.0f : unit_clamp((x - a.lo) * a.scale);
}
