/* The two floods as parallel relaxations (kernels/src/cpu/flood.rs: watershed, propagate), and the
 * steps around the watershed (unflooded blobs, the size filter's statistics and renumbering).
 *
 * Each flood runs in two relaxations, each repeated until nothing changes:
 *  1. keys: every pixel takes the smallest key its neighbours hand it, (bucket, hops) for the
 *     watershed and the path cost for propagation. That is the order in which the CPU's queues
 *     pop pixels, so the keys end equal to the CPU's.
 *  2. labels: of the neighbours that hand a pixel exactly its key (its predecessors), it takes
 *     the label of the one with the smallest key, the smaller label between equal keys: the
 *     CPU's first pop and tie rule. Keys grow strictly along those links, so they form no cycle;
 *     a pixel is recomputed every sweep, and once a sweep changes nothing every pixel holds the
 *     label its final predecessors give it, which is the CPU's.
 * The two phases cannot be one: different paths can hand a pixel the same key, and a label
 * carried by a path that does not end up tight would otherwise stick. */

#define UNREACHED 0xffffffffffffffffull
#define NO_LABEL 0xffffffffu

typedef struct {
    float *data;
    unsigned long long n;
} NegateArgs;

KERNEL void negate_f32(NegateArgs a) {
    unsigned long long i = gid_x();
    if (i < a.n) a.data[i] = -a.data[i];
}

typedef struct {
    const float *elevation;
    const unsigned int *seeds;
    unsigned short *levels;
    unsigned long long *key;
    unsigned int *labels;
    unsigned long long n;
    float lo;
    float scale;
    unsigned int top;
} FloodInitArgs;

/* Quantised elevation (as the CPU's hierarchical queue sees it; unused by propagation) and the
 * starting keys: seeds at 0 with their label, everything else unreached. */
KERNEL void flood_init(FloodInitArgs a) {
    unsigned long long i = gid_x();
    if (i >= a.n) return;
    if (a.elevation) {
        float v = a.elevation[i];
        unsigned int lv = a.top;
        if (finite_f32(v)) {
            float q = (v - a.lo) * a.scale;
            lv = q <= 0.0f ? 0u : (q >= (float)a.top ? a.top : (unsigned int)q);
        }
        a.levels[i] = (unsigned short)lv;
    }
    a.key[i] = a.seeds[i] ? 0ull : UNREACHED;
    a.labels[i] = a.seeds[i] ? a.seeds[i] : NO_LABEL;
}

typedef struct {
    const unsigned char *mask;
    const unsigned int *seeds;
    const unsigned short *levels; /* watershed */
    const float *image;           /* propagation */
    unsigned long long *key;
    unsigned int *labels;
    unsigned int *changed;
    unsigned int width;
    unsigned int height;
    float spatial_weight;
} FloodArgs;

/* The key neighbour `s` hands pixel `i` (watershed: bucket << 32 | hops). */
DEVICE unsigned long long ws_step(FloodArgs a, unsigned long long i, unsigned long long s) {
    unsigned long long lv = a.levels[i], b = s >> 32, w = s & 0xffffffffull;
    return lv > b ? lv << 32 : (b << 32) | (w + 1);
}

/* The key neighbour `j` hands pixel `i` (propagation: the cost's bits; costs are >= 0, so the
 * bits order as the values). The expression is the CPU's, term by term. */
DEVICE unsigned long long pr_step(FloodArgs a, unsigned long long i, unsigned long long j, int diagonal) {
    float step = diagonal ? 1.41421356237309504880f : 1.0f;
    float c = __uint_as_float((unsigned int)a.key[j]) + fabsf(a.image[i] - a.image[j]) + a.spatial_weight * step;
    return (unsigned long long)__float_as_uint(c);
}

/* Phase 0 (keys) or phase 1 (labels) of either flood; propagation when `image` is set. */
DEVICE void flood_relax(FloodArgs a, int phase) {
    unsigned int x = gid_x(), y = gid_y();
    if (x >= a.width || y >= a.height) return;
    unsigned long long i = (unsigned long long)y * a.width + x;
    if (!a.mask[i] || a.seeds[i]) return;
    unsigned long long here = a.key[i];
    if (phase == 1 && here == UNREACHED) return;
    unsigned long long best = here;
    unsigned long long from = UNREACHED; /* phase 1: the key of the predecessor chosen so far */
    unsigned int label = NO_LABEL;
    for (int dy = -1; dy <= 1; dy++) {
        int ny = (int)y + dy;
        if (ny < 0 || ny >= (int)a.height) continue;
        for (int dx = -1; dx <= 1; dx++) {
            int nx = (int)x + dx;
            if ((dx == 0 && dy == 0) || nx < 0 || nx >= (int)a.width) continue;
            unsigned long long j = (unsigned long long)ny * a.width + nx;
            unsigned long long s = a.key[j];
            if (s == UNREACHED) continue;
            unsigned long long cand = a.image ? pr_step(a, i, j, dx != 0 && dy != 0) : ws_step(a, i, s);
            if (phase == 0) {
                if (cand < best) best = cand;
            } else if (cand == here) {
                unsigned int l = a.labels[j];
                if (l != NO_LABEL && (s < from || (s == from && l < label))) {
                    from = s;
                    label = l;
                }
            }
        }
    }
    if (phase == 0 && best < here) {
        a.key[i] = best;
        *a.changed = 1;
    }
    if (phase == 1 && label != NO_LABEL && label != a.labels[i]) {
        a.labels[i] = label;
        *a.changed = 1;
    }
}

KERNEL void flood_keys(FloodArgs a) { flood_relax(a, 0); }

KERNEL void flood_labels(FloodArgs a) { flood_relax(a, 1); }

typedef struct {
    const unsigned char *mask;
    unsigned int *labels;
    unsigned char *left; /* masked pixels the flood did not reach */
    unsigned long long n;
} FloodFinishArgs;

KERNEL void flood_finish(FloodFinishArgs a) {
    unsigned long long i = gid_x();
    if (i >= a.n) return;
    unsigned int l = a.labels[i] == NO_LABEL ? 0u : a.labels[i];
    a.labels[i] = l;
    a.left[i] = a.mask[i] && !l;
}

typedef struct {
    unsigned int *labels;
    const unsigned int *blobs;
    unsigned long long n;
    unsigned int offset;
} AddBlobsArgs;

KERNEL void add_blobs(AddBlobsArgs a) {
    unsigned long long i = gid_x();
    if (i < a.n && a.blobs[i]) a.labels[i] = a.offset + a.blobs[i];
}

typedef struct {
    const unsigned int *labels;
    unsigned int *area;
    unsigned int *first; /* smallest pixel index per label, initialised to ~0 */
    unsigned char *border;
    unsigned int width;
    unsigned int height;
} LabelStatsArgs;

KERNEL void label_stats(LabelStatsArgs a) {
    unsigned int x = gid_x(), y = gid_y();
    if (x >= a.width || y >= a.height) return;
    unsigned int i = y * a.width + x;
    unsigned int l = a.labels[i];
    if (!l) return;
    atomicAdd(&a.area[l], 1u);
    atomicMin(&a.first[l], i);
    if (x == 0 || y == 0 || x + 1 == a.width || y + 1 == a.height) a.border[l] = 1;
}

typedef struct {
    unsigned int *labels;
    const unsigned int *remap;
    unsigned long long n;
} RemapArgs;

KERNEL void remap_labels(RemapArgs a) {
    unsigned long long i = gid_x();
    if (i < a.n) a.labels[i] = a.remap[a.labels[i]];
}
