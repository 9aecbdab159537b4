/* Crop gather for per-cell models (kernels/src/cpu/crop.rs: crop_gather_u16_with without the fused
 * preprocessing): N crops of S x S around cell centres, C channels, into one N x C x S x S f32
 * batch; zero outside the field. One thread per output element. */

typedef struct {
    const unsigned short *channels; /* channel-major, each width * height */
    const float *centers;           /* x, y per crop */
    float *out;
    unsigned int width;
    unsigned int height;
    unsigned int channel_count;
    unsigned int crop_count;
    unsigned int size;
    float scale; /* field pixels per crop pixel; 1 copies */
} CropArgs;

DEVICE float crop_at(const unsigned short *plane, int x, int y, int w, int h) {
    if (x < 0 || y < 0 || x >= w || y >= h) return 0.0f;
    return (float)plane[(unsigned long long)y * w + x];
}

KERNEL void crop_gather(CropArgs a) {
    unsigned long long i = gid_x();
    unsigned long long ss = (unsigned long long)a.size * a.size;
    if (i >= (unsigned long long)a.crop_count * a.channel_count * ss) return;
    unsigned int dx = (unsigned int)(i % a.size);
    unsigned int dy = (unsigned int)((i / a.size) % a.size);
    unsigned int c = (unsigned int)((i / ss) % a.channel_count);
    unsigned int n = (unsigned int)(i / (ss * a.channel_count));
    const unsigned short *plane = a.channels + (unsigned long long)c * a.width * a.height;
    int w = (int)a.width, h = (int)a.height;
    /* The centre pixel sits at size / 2, as on the CPU; roundf rounds halves away from zero. */
    int rx = (int)roundf(a.centers[2 * n]);
    int ry = (int)roundf(a.centers[2 * n + 1]);
    if (a.scale == 1.0f) {
        a.out[i] = crop_at(plane, rx - (int)(a.size / 2) + (int)dx, ry - (int)(a.size / 2) + (int)dy, w, h);
        return;
    }
    float half = (float)a.size / 2.0f;
    float sy = (float)ry + ((float)dy - half + 0.5f) * a.scale - 0.5f;
    float sx = (float)rx + ((float)dx - half + 0.5f) * a.scale - 0.5f;
    int y0 = (int)floorf(sy), x0 = (int)floorf(sx);
    float fy = sy - floorf(sy), fx = sx - floorf(sx);
    float top = crop_at(plane, x0, y0, w, h) * (1.0f - fx) + crop_at(plane, x0 + 1, y0, w, h) * fx;
    float bottom = crop_at(plane, x0, y0 + 1, w, h) * (1.0f - fx) + crop_at(plane, x0 + 1, y0 + 1, w, h) * fx;
    a.out[i] = top * (1.0f - fy) + bottom * fy;
}
