/* Exact Euclidean distance transform and the maximum filter that finds watershed seeds
 * (kernels/src/cpu/distance.rs: distance_transform, max_filter, peak_markers). One thread per column or
 * row: the 1-D passes are sequential along their line, parallel across lines. */

typedef struct {
    const unsigned char *mask;
    double *sq; /* squared distance to background along the column, +inf where none */
    unsigned int width;
    unsigned int height;
} EdtColsArgs;

/* Down and up sweeps along a column; outside the image counts as foreground. Integer distances
 * are kept in the f64 buffer (exact below 2^53) until they are squared. */
KERNEL void edt_cols(EdtColsArgs a) {
    unsigned int x = gid_x();
    if (x >= a.width || a.height == 0) return;
    unsigned long long w = a.width;
    const unsigned int none = 0xffffffffu;
    unsigned int prev = none;
    for (unsigned int y = 0; y < a.height; y++) {
        unsigned int d;
        if (!a.mask[y * w + x]) d = 0;
        else if (y == 0 || prev == none) d = none;
        else d = prev + 1;
        a.sq[y * w + x] = (double)d;
        prev = d;
    }
    for (int y = (int)a.height - 2; y >= 0; y--) {
        unsigned int d = (unsigned int)a.sq[y * w + x];
        unsigned int b = (unsigned int)a.sq[(y + 1) * w + x];
        unsigned int b1 = b == none ? none : b + 1;
        if (b1 < d) a.sq[y * w + x] = (double)b1;
    }
    for (unsigned int y = 0; y < a.height; y++) {
        double d = a.sq[y * w + x];
        a.sq[y * w + x] = d == 4294967295.0 ? F64_INF : d * d;
    }
}

typedef struct {
    const double *sq;
    float *dst;
    unsigned int *v; /* scratch: width per row */
    double *z;       /* scratch: width + 1 per row */
    unsigned int width;
    unsigned int height;
} EdtRowsArgs;

/* Felzenszwalb & Huttenlocher's lower envelope of parabolas along one row, in f64. */
KERNEL void edt_rows(EdtRowsArgs a) {
    unsigned int y = gid_x();
    if (y >= a.height) return;
    unsigned long long w = a.width;
    const double *f = a.sq + y * w;
    unsigned int *v = a.v + y * w;
    double *z = a.z + y * (w + 1);
    int k = -1;
    for (unsigned int q = 0; q < a.width; q++) {
        if (f[q] == F64_INF) continue;
        double qf = (double)q;
        for (;;) {
            if (k < 0) {
                k = 0;
                v[0] = q;
                z[0] = -F64_INF;
                z[1] = F64_INF;
                break;
            }
            unsigned int p = v[k];
            double pf = (double)p;
            double s = ((f[q] + qf * qf) - (f[p] + pf * pf)) / (2.0 * (qf - pf));
            if (s <= z[k]) {
                k -= 1;
                if (k < 0) {
                    k = 0;
                    v[0] = q;
                    z[1] = F64_INF;
                    break;
                }
                continue;
            }
            k += 1;
            v[k] = q;
            z[k] = s;
            z[k + 1] = F64_INF;
            break;
        }
    }
    float *out = a.dst + y * w;
    if (k < 0) {
        for (unsigned int q = 0; q < a.width; q++) out[q] = F32_INF;
        return;
    }
    k = 0;
    for (unsigned int q = 0; q < a.width; q++) {
        double qf = (double)q;
        while (z[k + 1] < qf) k++;
        double d = qf - (double)v[k];
        out[q] = (float)sqrt(d * d + f[v[k]]);
    }
}

typedef struct {
    const float *src;
    float *dst;
    unsigned int width;
    unsigned int height;
    unsigned int radius;
} MaxFilterArgs;

KERNEL void max_rows(MaxFilterArgs a) {
    unsigned int x = gid_x(), y = gid_y();
    if (x >= a.width || y >= a.height) return;
    unsigned int x0 = x > a.radius ? x - a.radius : 0;
    unsigned int x1 = x + a.radius + 1 < a.width ? x + a.radius + 1 : a.width;
    const float *row = a.src + (unsigned long long)y * a.width;
    float m = -F32_INF;
    for (unsigned int i = x0; i < x1; i++) m = fmaxf(m, row[i]);
    a.dst[(unsigned long long)y * a.width + x] = m;
}

KERNEL void max_cols(MaxFilterArgs a) {
    unsigned int x = gid_x(), y = gid_y();
    if (x >= a.width || y >= a.height) return;
    unsigned int y0 = y > a.radius ? y - a.radius : 0;
    unsigned int y1 = y + a.radius + 1 < a.height ? y + a.radius + 1 : a.height;
    float m = -F32_INF;
    for (unsigned int i = y0; i < y1; i++) m = fmaxf(m, a.src[(unsigned long long)i * a.width + x]);
    a.dst[(unsigned long long)y * a.width + x] = m;
}

typedef struct {
    const float *src;
    const float *maxed;
    const unsigned char *mask;
    unsigned char *peak;
    unsigned long long n;
    float min_value;
} PeaksArgs;

KERNEL void peaks(PeaksArgs a) {
    unsigned long long i = gid_x();
    if (i >= a.n) return;
    float v = a.src[i];
    a.peak[i] = a.mask[i] && v >= a.min_value && v >= a.maxed[i];
}
