"""The reference networks, written once against a small set of operations with two back ends:
`J` computes with jax (training), `O` emits ONNX nodes (export). The exported graph is therefore
the trained function by construction; `train.py` still checks every export against jax with
onnxruntime before it writes a description.
"""

import jax
import jax.numpy as jnp
import numpy as np
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 9  # ONNX Runtime 1.31 reads IR <= 13
OPSET = 17


def init_conv(key, cin, cout, k):
    w = jax.random.normal(key, (cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))
    return {"w": w.astype(jnp.float32), "b": jnp.zeros((cout,), jnp.float32)}


def init_dense(key, cin, cout, scale=1.0):
    w = jax.random.normal(key, (cin, cout)) * np.sqrt(2.0 / cin) * scale
    return {"w": w.astype(jnp.float32), "b": jnp.zeros((cout,), jnp.float32)}


class J:
    """jax back end: values are arrays (NCHW)."""

    def __init__(self, params):
        self.p = params

    def conv(self, x, name, stride=1):
        w, b = self.p[name]["w"], self.p[name]["b"]
        pad = w.shape[-1] // 2
        y = jax.lax.conv_general_dilated(
            x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=("NCHW", "OIHW", "NCHW")
        )
        return y + b[None, :, None, None]

    def relu(self, x):
        return jax.nn.relu(x)

    def pool(self, x):
        n, c, h, w = x.shape
        return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))

    def up(self, x):
        return jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)

    def cat(self, *xs):
        return jnp.concatenate(xs, axis=1)

    def gap(self, x):
        return x.mean(axis=(2, 3))

    def dense(self, x, name):
        return x @ self.p[name]["w"] + self.p[name]["b"]

    def add(self, a, b):
        return a + b

    def sinh(self, x):
        return jnp.sinh(x)

    def asinh(self, x):
        return jnp.arcsinh(x)

    def affine_ch(self, x, gain, offset):
        # Fixed per-channel constants (not trained).
        g, o = jax.lax.stop_gradient(gain), jax.lax.stop_gradient(offset)
        return x * g[None, :, None, None] + o[None, :, None, None]

    def mul(self, a, b):
        return a * b

    def bias2d(self, x, v):
        return x + v[:, :, None, None]

    def edm(self, sigma, sigma_data):
        s = sigma.reshape(-1, 1, 1, 1)
        d = s * s + sigma_data**2
        c_in = 1.0 / jnp.sqrt(d)
        return c_in, sigma_data**2 / d, s * sigma_data * c_in, (jnp.log(sigma) / 4.0).reshape(-1, 1)

    def fourier(self, c_noise, freqs):
        a = c_noise * jnp.asarray(freqs)[None, :]
        return jnp.concatenate([jnp.sin(a), jnp.cos(a)], axis=1)

    def embed(self, ids, name):
        return self.p[name][ids.astype(jnp.int32)]

    def to_batch(self, x, groups):
        n, c, h, w = x.shape
        return x.reshape(n * c, 1, h, w) if groups else x

    def from_batch(self, x, groups):
        n, c, h, w = x.shape
        return x.reshape(n // groups, groups * c, h, w)


class O:  # noqa: E742 (the ONNX builder, named short as the jax one)
    """ONNX back end: values are tensor names; parameters become initializers."""

    def __init__(self, params):
        self.p = params
        self.nodes = []
        self.inits = []
        self.n = 0

    def _name(self, stem):
        self.n += 1
        return f"{stem}_{self.n}"

    def const(self, value, stem="c"):
        name = self._name(stem)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op, inputs, **attrs):
        out = self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def conv(self, x, name, stride=1):
        w = np.asarray(self.p[name]["w"], np.float32)
        b = np.asarray(self.p[name]["b"], np.float32)
        pad = w.shape[-1] // 2
        return self.node("Conv", [x, self.const(w, name + "_w"), self.const(b, name + "_b")],
                         pads=[pad] * 4, strides=[stride, stride])

    def relu(self, x):
        return self.node("Relu", [x])

    def pool(self, x):
        return self.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])

    def up(self, x):
        scales = self.const(np.array([1, 1, 2, 2], np.float32), "scales")
        return self.node("Resize", [x, "", scales], mode="nearest",
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor")

    def cat(self, *xs):
        return self.node("Concat", list(xs), axis=1)

    def gap(self, x):
        g = self.node("GlobalAveragePool", [x])
        return self.node("Flatten", [g], axis=1)

    def dense(self, x, name):
        w = np.asarray(self.p[name]["w"], np.float32)
        b = np.asarray(self.p[name]["b"], np.float32)
        return self.node("Gemm", [x, self.const(w, name + "_w"), self.const(b, name + "_b")])

    def add(self, a, b):
        return self.node("Add", [a, b])

    def sinh(self, x):
        return self.node("Sinh", [x])

    def asinh(self, x):
        return self.node("Asinh", [x])

    def affine_ch(self, x, gain, offset):
        g = self.const(np.asarray(gain, np.float32).reshape(1, -1, 1, 1), "gain")
        o = self.const(np.asarray(offset, np.float32).reshape(1, -1, 1, 1), "offset")
        return self.node("Add", [self.node("Mul", [x, g]), o])

    def mul(self, a, b):
        return self.node("Mul", [a, b])

    def bias2d(self, x, v):
        shape = self.const(np.array([0, -1, 1, 1], np.int64), "shape")
        return self.node("Add", [x, self.node("Reshape", [v, shape])])

    def edm(self, sigma, sigma_data):
        s = self.node("Reshape", [sigma, self.const(np.array([-1, 1, 1, 1], np.int64), "shape")])
        d = self.node("Add", [self.node("Mul", [s, s]), self.const(np.float32(sigma_data**2), "sd2")])
        c_in = self.node("Reciprocal", [self.node("Sqrt", [d])])
        c_skip = self.node("Div", [self.const(np.float32(sigma_data**2), "sd2"), d])
        c_out = self.node("Mul", [s, self.node("Mul", [c_in, self.const(np.float32(sigma_data), "sd")])])
        log = self.node("Div", [self.node("Log", [sigma]), self.const(np.float32(4.0), "four")])
        c_noise = self.node("Reshape", [log, self.const(np.array([-1, 1], np.int64), "shape")])
        return c_in, c_skip, c_out, c_noise

    def fourier(self, c_noise, freqs):
        a = self.node("Mul", [c_noise, self.const(np.asarray(freqs, np.float32)[None, :], "freqs")])
        return self.node("Concat", [self.node("Sin", [a]), self.node("Cos", [a])], axis=1)

    def embed(self, ids, name):
        table = self.const(np.asarray(self.p[name], np.float32), name)
        return self.node("Gather", [table, self.node("Cast", [ids], to=TensorProto.INT64)], axis=0)

    def to_batch(self, x, groups):
        return self.node("Reshape", [x, self.const(np.array([-1, 1, 0, 0], np.int64), "shape")]) if groups else x

    def from_batch(self, x, groups):
        shape = self.const(np.array([-1, groups * LATENT, 0, 0], np.int64), "shape")
        return self.node("Reshape", [x, shape])


def export(forward, params, inputs, outputs, doc):
    """forward(ops, *input_names) -> list of output names. inputs/outputs: (name, shape) with
    None for free dimensions; returns an onnx ModelProto at IR_VERSION/OPSET."""
    o = O(params)
    outs = forward(o, *[n for n, _ in inputs])
    for src, (name, _) in zip(outs, outputs):
        o.nodes.append(helper.make_node("Identity", [src], [name]))
    vi = lambda name, shape: helper.make_tensor_value_info(  # noqa: E731
        name, TensorProto.FLOAT, [d if d is not None else f"d{name}{i}" for i, d in enumerate(shape)])
    graph = helper.make_graph(o.nodes, doc, [vi(n, s) for n, s in inputs], [vi(n, s) for n, s in outputs], o.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="liveomics-train")
    model.ir_version = IR_VERSION
    model.doc_string = doc
    return model


# ---- the four reference networks -------------------------------------------------------------

def unet_init(key, cin, cout, w=8, levels=3, max_width=None):
    widths = [min(w * 2**i, max_width or w * 2**i) for i in range(levels)]
    spec = []
    for i, cw in enumerate(widths):
        spec += [(f"e{i + 1}a", widths[i - 1] if i else cin, cw), (f"e{i + 1}b", cw, cw)]
    spec.append(("mid", widths[-1], widths[-1]))
    for i in reversed(range(levels)):
        spec.append((f"u{i + 1}", (widths[i + 1] if i + 1 < levels else widths[-1]) + widths[i], widths[i]))
    ks = jax.random.split(key, len(spec) + 2)
    p = {n: init_conv(k, a, b, 3) for k, (n, a, b) in zip(ks, spec)}
    p["out"] = init_conv(ks[-1], w, cout, 1)
    return p


def unet(ops, x):
    """Direct virtual staining: `levels` levels (three or four, from the parameters) plus a
    bottleneck at 1/8 or 1/16; four levels see a whole cell (receptive field ~190 px) from any
    pixel in it, which is what predicting the cell's level needs. With `inlog` parameters the
    input is widened by asinh of each landmark (`unet_init` then takes twice the channels)."""
    r = ops.relu
    levels = sum(1 for name in ops.p if name.startswith("e") and name.endswith("a"))
    if "inlog" in ops.p:
        # Landmarks also in asinh (log-like) units: the stains are products (a cell's brightness
        # times a radial profile times a texture), which a log turns into sums a convolution
        # can separate; the linear channels are kept beside them.
        lg = ops.p["inlog"]
        x = ops.cat(x, ops.asinh(ops.affine_ch(x, lg["gain"], lg["offset"])))
    skips, h = [], x
    for i in range(levels):
        if i:
            h = ops.pool(h)
        h = r(ops.conv(r(ops.conv(h, f"e{i + 1}a")), f"e{i + 1}b"))
        skips.append(h)
    u = r(ops.conv(ops.pool(h), "mid"))
    for i in reversed(range(levels)):
        u = r(ops.conv(ops.cat(ops.up(u), skips[i]), f"u{i + 1}"))
    return [ops.conv(u, "out")]


LATENT = 4


def ae_init(key):
    ks = jax.random.split(key, 8)
    return {
        "enc1": init_conv(ks[0], 1, 16, 3), "enc2": init_conv(ks[1], 16, 32, 3), "enc3": init_conv(ks[2], 32, 32, 3),
        "enc4": init_conv(ks[3], 32, LATENT, 1),
        "dec1": init_conv(ks[4], LATENT, 32, 3), "dec2": init_conv(ks[5], 32, 32, 3), "dec3": init_conv(ks[6], 32, 16, 3),
        "dec4": init_conv(ks[7], 16, 1, 3),
    }


def encoder(ops, x, groups=0):
    """Image (one channel, or `groups` channels encoded one by one and stacked) -> latent at 1/4."""
    r = ops.relu
    h = ops.to_batch(x, groups)
    h = r(ops.conv(h, "enc1", 2))
    h = r(ops.conv(h, "enc2", 2))
    h = r(ops.conv(h, "enc3"))
    z = ops.conv(h, "enc4")
    return [ops.from_batch(z, groups) if groups else z]


def decoder(ops, z, sinh=False):
    """Latent -> image; with `sinh` the image is brought back from the asinh space the
    autoencoder was trained in (bright outliers compressed) to linear intensity."""
    r = ops.relu
    h = r(ops.conv(z, "dec1"))
    h = r(ops.conv(ops.up(h), "dec2"))
    h = r(ops.conv(ops.up(h), "dec3"))
    y = ops.conv(h, "dec4")
    return [ops.sinh(y) if sinh else y]


FREQS = np.array([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0], np.float32) / 8.0
WIDTH = 48


def denoiser_init(key, n_landmark_latent, n_proteins, n_lines):
    ks = jax.random.split(key, 10)
    w = WIDTH
    return {
        "in": init_conv(ks[0], LATENT + n_landmark_latent, w, 3),
        "t1": init_dense(ks[1], 2 * len(FREQS), w), "t2": init_dense(ks[2], w, w),
        "protein": jax.random.normal(ks[3], (n_proteins, w)) * 0.1,
        "line": jax.random.normal(ks[4], (n_lines, w)) * 0.1,
        "c1": init_conv(ks[5], w, w, 3), "down": init_conv(ks[6], w, w, 3), "c2": init_conv(ks[7], w, w, 3),
        "upc": init_conv(ks[8], 2 * w, w, 3),
        "out": {"w": jnp.zeros((LATENT, w, 3, 3), jnp.float32), "b": jnp.zeros((LATENT,), jnp.float32)},
    }


def denoiser(ops, x, sigma, landmarks, protein, line, sigma_data=0.5):
    """EDM-preconditioned denoiser D(x; sigma, landmarks, protein, cell line) -> denoised latent."""
    r = ops.relu
    c_in, c_skip, c_out, c_noise = ops.edm(sigma, sigma_data)
    emb = r(ops.dense(ops.fourier(c_noise, FREQS), "t1"))
    emb = ops.add(ops.dense(emb, "t2"), ops.add(ops.embed(protein, "protein"), ops.embed(line, "line")))
    h = ops.conv(ops.cat(ops.mul(x, c_in), landmarks), "in")
    h = r(ops.bias2d(h, emb))
    h1 = r(ops.conv(h, "c1"))
    d = r(ops.conv(h1, "down", 2))
    d = r(ops.conv(d, "c2"))
    u = r(ops.conv(ops.cat(ops.up(d), h1), "upc"))
    f = ops.conv(u, "out")
    return [ops.add(ops.mul(x, c_skip), ops.mul(f, c_out))]


def cellnet_init(key, cin, n_out):
    ks = jax.random.split(key, 7)
    return {
        "c1": init_conv(ks[0], cin, 16, 3), "c2": init_conv(ks[1], 16, 32, 3), "c3": init_conv(ks[2], 32, 32, 3),
        "c4": init_conv(ks[3], 32, 64, 3), "c5": init_conv(ks[4], 64, 64, 3),
        "d1": init_dense(ks[5], 64, 64), "d2": init_dense(ks[6], 64, n_out, 0.1),
    }


def cellnet(ops, x):
    """Per-cell crop (96 px) -> standardised abundances; stride-2 convolutions then global mean."""
    r = ops.relu
    h = r(ops.conv(x, "c1", 2))
    h = r(ops.conv(h, "c2", 2))
    h = r(ops.conv(h, "c3", 2))
    h = r(ops.conv(h, "c4", 2))
    h = r(ops.conv(h, "c5"))
    return [ops.dense(r(ops.dense(ops.gap(h), "d1")), "d2")]


def tablenet_init(key, n_in, n_out, hidden=32):
    ks = jax.random.split(key, 3)
    return {"d1": init_dense(ks[0], n_in, hidden), "d2": init_dense(ks[1], hidden, n_out, 0.1),
            "skip": init_dense(ks[2], n_in, n_out, 0.5)}


def tablenet(ops, x):
    """Per-cell columns (standardised) -> standardised values: a linear map plus a small ReLU
    correction (translation is linear in log space; the correction absorbs the input model's
    bias)."""
    return [ops.add(ops.dense(x, "skip"), ops.dense(ops.relu(ops.dense(x, "d1")), "d2"))]


FEATURES = 64


def tilenet_init(key, cin, n_out):
    ks = jax.random.split(key, 7)
    return {
        "c1": init_conv(ks[0], cin, 16, 3), "c2": init_conv(ks[1], 16, 32, 3), "c3": init_conv(ks[2], 32, 32, 3),
        "c4": init_conv(ks[3], 32, 64, 3), "c5": init_conv(ks[4], 64, FEATURES, 3),
        "h1": init_dense(ks[5], FEATURES, 64), "h2": init_dense(ks[6], 64, n_out, 0.1),
    }


def tile_encoder(ops, x):
    """Well-omics tile encoder: a 256 px tile -> FEATURES (mean of rectified feature maps)."""
    r = ops.relu
    h = r(ops.conv(x, "c1", 2))
    h = r(ops.conv(h, "c2", 2))
    h = r(ops.conv(h, "c3", 2))
    h = r(ops.conv(h, "c4", 2))
    return [ops.gap(r(ops.conv(h, "c5")))]


def well_head(ops, f):
    """Pooled features of a well -> standardised bulk abundances."""
    return [ops.dense(ops.relu(ops.dense(f, "h1")), "h2")]
