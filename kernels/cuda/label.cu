/* Connected components and per-label reductions (kernels/src/cpu/label.rs: connected_components;
 * kernels/src/measure.rs: region_props).
 *
 * Components: union-find over pixel indices in which a root is only ever linked under a smaller
 * index (atomicMin), so each component's root ends as its first pixel in raster order. Ranking
 * the roots row by row then numbers the components exactly as the CPU's two-pass labelling
 * does, not merely up to renumbering. */

#define NO_PARENT 0xffffffffu

typedef struct {
    const unsigned char *mask;
    unsigned int *parent;
    unsigned int width;
    unsigned int height;
    unsigned int eight;
} CcArgs;

KERNEL void cc_init(CcArgs a) {
    unsigned long long i = gid_x();
    if (i >= (unsigned long long)a.width * a.height) return;
    a.parent[i] = a.mask[i] ? (unsigned int)i : NO_PARENT;
}

DEVICE unsigned int cc_root(const unsigned int *parent, unsigned int x) {
    while (parent[x] != x) x = parent[x];
    return x;
}

DEVICE void cc_unite(unsigned int *parent, unsigned int a, unsigned int b) {
    for (;;) {
        a = cc_root(parent, a);
        b = cc_root(parent, b);
        if (a == b) return;
        if (a < b) {
            unsigned int t = a;
            a = b;
            b = t;
        }
        /* Link the larger root under the smaller; if another thread linked it first, carry on
         * from where it now points. */
        unsigned int old = atomicMin(&parent[a], b);
        if (old == a) return;
        a = old;
    }
}

/* Each foreground pixel unites with its already-scanned neighbours (left, up, and the upper
 * diagonals with 8-connectivity): every adjacency is visited once. */
KERNEL void cc_merge(CcArgs a) {
    unsigned int x = gid_x(), y = gid_y();
    if (x >= a.width || y >= a.height) return;
    unsigned int i = y * a.width + x;
    if (!a.mask[i]) return;
    if (x > 0 && a.mask[i - 1]) cc_unite(a.parent, i, i - 1);
    if (y > 0) {
        unsigned int up = i - a.width;
        if (a.mask[up]) cc_unite(a.parent, i, up);
        if (a.eight) {
            if (x > 0 && a.mask[up - 1]) cc_unite(a.parent, i, up - 1);
            if (x + 1 < a.width && a.mask[up + 1]) cc_unite(a.parent, i, up + 1);
        }
    }
}

KERNEL void cc_flatten(CcArgs a) {
    unsigned long long i = gid_x();
    if (i >= (unsigned long long)a.width * a.height) return;
    if (a.parent[i] != NO_PARENT) a.parent[i] = cc_root(a.parent, (unsigned int)i);
}

typedef struct {
    const unsigned int *parent;
    unsigned int *row_roots; /* per row: the number of roots in it, then (after the host's
                                exclusive scan) the label before the row's first root */
    unsigned int *labels;
    unsigned int width;
    unsigned int height;
} RankArgs;

KERNEL void cc_count_roots(RankArgs a) {
    unsigned int y = gid_x();
    if (y >= a.height) return;
    unsigned int n = 0;
    unsigned long long base = (unsigned long long)y * a.width;
    for (unsigned int x = 0; x < a.width; x++) n += a.parent[base + x] == base + x;
    a.row_roots[y] = n;
}

KERNEL void cc_rank_roots(RankArgs a) {
    unsigned int y = gid_x();
    if (y >= a.height) return;
    unsigned int next = a.row_roots[y];
    unsigned long long base = (unsigned long long)y * a.width;
    for (unsigned int x = 0; x < a.width; x++)
        if (a.parent[base + x] == base + x) a.labels[base + x] = ++next;
}

/* Roots were labelled by cc_rank_roots and are only read here; every other pixel is written. */
KERNEL void cc_label(RankArgs a) {
    unsigned long long i = gid_x();
    if (i >= (unsigned long long)a.width * a.height) return;
    unsigned int p = a.parent[i];
    if (p == NO_PARENT) a.labels[i] = 0;
    else if (p != i) a.labels[i] = a.labels[p];
}

typedef struct {
    const unsigned int *labels;
    const unsigned short *channels; /* channel-major, each width * height */
    unsigned long long *area;       /* per label */
    double *sum_x;
    double *sum_y;
    unsigned int *bbox;    /* per label: min x, min y, max x + 1, max y + 1 */
    double *sums;          /* per label and channel */
    unsigned int *maxima;  /* per label and channel */
    unsigned int width;
    unsigned int height;
    unsigned int channel_count;
} PropsArgs;

/* Sums of integers in f64 are exact whatever the order of the atomic additions, so the result
 * equals the CPU's sequential one exactly. */
KERNEL void region_props(PropsArgs a) {
    unsigned int x = gid_x(), y = gid_y();
    if (x >= a.width || y >= a.height) return;
    unsigned long long plane = (unsigned long long)a.width * a.height;
    unsigned long long i = (unsigned long long)y * a.width + x;
    unsigned int l = a.labels[i];
    if (l == 0) return;
    atomicAdd(&a.area[l], 1ull);
    atomicAdd(&a.sum_x[l], (double)x);
    atomicAdd(&a.sum_y[l], (double)y);
    atomicMin(&a.bbox[4 * l], x);
    atomicMin(&a.bbox[4 * l + 1], y);
    atomicMax(&a.bbox[4 * l + 2], x + 1);
    atomicMax(&a.bbox[4 * l + 3], y + 1);
    for (unsigned int c = 0; c < a.channel_count; c++) {
        unsigned short v = a.channels[c * plane + i];
        atomicAdd(&a.sums[(unsigned long long)l * a.channel_count + c], (double)v);
        atomicMax(&a.maxima[(unsigned long long)l * a.channel_count + c], (unsigned int)v);
    }
}
