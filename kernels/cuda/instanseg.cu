/* InstanSeg's post-processing, the parts that grow with the field and the seed count
 * (kernels/src/instanseg: the embedding fields, the seeds, the pixel classifier over every
 * window, the cleanup of each window); the merge of windows into labels stays on the host.
 * Each kernel repeats the CPU's float operations in its order (contraction is off), so under the
 * host emulation the scores are the CPU's bit for bit; on a device expf may differ from the
 * host's libm by an ulp (see docs/GPU.md). */

typedef struct {
    const float *emb; /* one target's five channels, each width * height */
    const float *xx;  /* the embedding grid along x (width values) */
    const float *yy;  /* ... and along y (height values) */
    float *x;
    float *y;
    float *seed;
    unsigned int width;
    unsigned int height;
} InstansegFieldsArgs;

DEVICE float instanseg_sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

/* Where each pixel's embedding lands, and the seed map. One thread per pixel. */
KERNEL void instanseg_fields(InstansegFieldsArgs a) {
    unsigned long long n = (unsigned long long)a.width * a.height;
    unsigned long long i = gid_x();
    if (i >= n) return;
    a.x[i] = (instanseg_sigmoid(a.emb[i]) - 0.5f) * 8.0f + a.xx[i % a.width];
    a.y[i] = (instanseg_sigmoid(a.emb[n + i]) - 0.5f) * 8.0f + a.yy[i / a.width];
    a.seed[i] = a.emb[4 * n + i] / 15.0f + 0.5f;
}

typedef struct {
    const float *map;
    unsigned char *flag;
    unsigned int width;
    unsigned int height;
    unsigned int distance;
    float threshold;
} InstansegPeaksArgs;

/* A seed: above the threshold and the first maximum, in row-major order, of its
 * (2d+1)^2 window; NaN anywhere in the window rules it out. One thread per pixel. */
KERNEL void instanseg_peaks(InstansegPeaksArgs a) {
    unsigned int x = gid_x(), y = gid_y();
    if (x >= a.width || y >= a.height) return;
    unsigned int w = a.width, d = a.distance;
    float v = a.map[(unsigned long long)y * w + x];
    unsigned char first = v > a.threshold;
    if (first) {
        unsigned int y0 = y > d ? y - d : 0, x0 = x > d ? x - d : 0;
        unsigned int y1 = y + d + 1 < a.height ? y + d + 1 : a.height;
        unsigned int x1 = x + d + 1 < w ? x + d + 1 : w;
        for (unsigned int qy = y0; qy < y1 && first; qy++) {
            for (unsigned int qx = x0; qx < x1; qx++) {
                float q = a.map[(unsigned long long)qy * w + qx];
                int before = qy < y || (qy == y && qx < x);
                if (q != q || (before ? !(q < v) : !(q <= v))) {
                    first = 0;
                    break;
                }
            }
        }
    }
    a.flag[(unsigned long long)y * w + x] = first;
}

/* The widest layer of the pixel classifier (kernels/src/instanseg: MAX_WIDTH). */
#define INSTANSEG_MAX_WIDTH 64

typedef struct {
    const float *x;
    const float *y;
    const float *sigma0;
    const float *sigma1;
    const unsigned int *windows; /* per window: seed y, seed x, top, left */
    const float *layers;         /* per layer: weight (outputs x inputs, row-major), then bias */
    const unsigned int *shapes;  /* per layer: inputs, outputs */
    float *score;                /* per window: side x side */
    unsigned int width;
    unsigned int side;
    unsigned int count;
    unsigned int layer_count;
} InstansegScoreArgs;

/* The classifier's score of every pixel of every window against its seed's embedding. One
 * thread per (window, pixel). */
KERNEL void instanseg_score(InstansegScoreArgs a) {
    unsigned long long ss = (unsigned long long)a.side * a.side;
    unsigned long long i = gid_x();
    if (i >= ss * a.count) return;
    unsigned long long k = i / ss, r = i % ss;
    const unsigned int *win = a.windows + 4 * k;
    unsigned long long c = (unsigned long long)win[0] * a.width + win[1];
    unsigned long long q = (unsigned long long)(win[2] + r / a.side) * a.width + win[3] + r % a.side;
    float act[2][INSTANSEG_MAX_WIDTH];
    act[0][0] = a.x[q] - a.x[c];
    act[0][1] = a.y[q] - a.y[c];
    act[0][2] = a.sigma0[q];
    act[0][3] = a.sigma1[q];
    const float *p = a.layers;
    unsigned int cur = 0;
    for (unsigned int l = 0; l < a.layer_count; l++) {
        unsigned int in = a.shapes[2 * l], out = a.shapes[2 * l + 1];
        const float *bias = p + (unsigned long long)in * out;
        for (unsigned int o = 0; o < out; o++) {
            float acc = 0.0f;
            for (unsigned int j = 0; j < in; j++) acc += p[(unsigned long long)o * in + j] * act[cur][j];
            float v = acc + bias[o];
            act[1 - cur][o] = l + 1 < a.layer_count ? fmaxf(v, 0.0f) : v;
        }
        p = bias + out;
        cur = 1 - cur;
    }
    a.score[i] = instanseg_sigmoid(act[cur][0]);
}

typedef struct {
    float *score;
    const unsigned int *windows;
    unsigned char *scratch; /* per window: 3 x side x side */
    unsigned int *queue;    /* per window: side x side + 1 */
    unsigned int side;
    unsigned int count;
    float threshold;
} InstansegCleanupArgs;

/* Marks in `reached` the pixels of `mask` (or of its complement, with `invert`) within `limit`
 * 8-connected steps of the `seeds` pixels already in `queue` (a seed outside the mask starts the
 * walk but is not reached): the CPU's level-by-level flood. */
DEVICE void instanseg_flood(const unsigned char *mask, int invert, unsigned char *reached, unsigned int *queue,
                            unsigned int seeds, unsigned int side, unsigned int limit) {
    unsigned int head = 0, tail = seeds;
    for (unsigned int s = 0; s < seeds; s++) reached[queue[s]] = (mask[queue[s]] != 0) != invert;
    for (unsigned int step = 0; step < limit && head < tail; step++) {
        unsigned int end = tail;
        for (; head < end; head++) {
            unsigned int q = queue[head], y = q / side, x = q % side;
            unsigned int y0 = y > 0 ? y - 1 : 0, y1 = y + 2 < side ? y + 2 : side;
            unsigned int x0 = x > 0 ? x - 1 : 0, x1 = x + 2 < side ? x + 2 : side;
            for (unsigned int ny = y0; ny < y1; ny++) {
                for (unsigned int nx = x0; nx < x1; nx++) {
                    unsigned int r = ny * side + nx;
                    if (((mask[r] != 0) != invert) && !reached[r]) {
                        reached[r] = 1;
                        queue[tail++] = r;
                    }
                }
            }
        }
    }
}

/* Keeps the object connected to the seed and gives its holes the threshold score (the CPU's
 * Window::cleanup). One thread per window; the windows are small and independent. */
KERNEL void instanseg_cleanup(InstansegCleanupArgs a) {
    unsigned long long k = gid_x();
    if (k >= a.count) return;
    unsigned int s = a.side, ss = s * s;
    float *score = a.score + k * ss;
    unsigned char *mask = a.scratch + k * 3ull * ss, *filled = mask + ss, *near = filled + ss;
    unsigned int *queue = a.queue + k * (ss + 1ull);
    const unsigned int *win = a.windows + 4 * k;
    for (unsigned int i = 0; i < ss; i++) {
        mask[i] = score[i] >= a.threshold;
        filled[i] = 0;
    }
    queue[0] = (win[0] - win[2]) * s + (win[1] - win[3]);
    instanseg_flood(mask, 0, filled, queue, 1, s, s);
    /* Chessboard dilation by 3, clipped to the window. */
    for (unsigned int y = 0; y < s; y++) {
        unsigned int y0 = y > 3 ? y - 3 : 0, y1 = y + 4 < s ? y + 4 : s;
        for (unsigned int x = 0; x < s; x++) {
            unsigned int x0 = x > 3 ? x - 3 : 0, x1 = x + 4 < s ? x + 4 : s;
            unsigned char any = 0;
            for (unsigned int yy = y0; yy < y1 && !any; yy++)
                for (unsigned int xx = x0; xx < x1; xx++) any |= filled[yy * s + xx];
            near[y * s + x] = any;
        }
    }
    /* The outside, flooded from every pixel far from the object: what it does not reach is a hole. */
    unsigned int far = 0;
    for (unsigned int i = 0; i < ss; i++) {
        mask[i] = 0;
        if (!near[i]) queue[far++] = i;
    }
    instanseg_flood(filled, 1, mask, queue, far, s, s);
    for (unsigned int i = 0; i < ss; i++)
        if (!filled[i]) score[i] = mask[i] ? 0.0f : a.threshold;
}
