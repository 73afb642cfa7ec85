#!/usr/bin/env python3
"""Export DiT and SD-VAE models to ONNX for mgd3 (see docs: ARCHITECTURE.md "Model contract").

Subcommands:

  export_onnx.py dit --checkpoint DiT-XL-2-256x256.pt --out dit.onnx [--fp16]
      Original facebookresearch/DiT checkpoint (plain state dict, or a training
      checkpoint with "ema"/"model").  The network is rebuilt by `DiT` below (same
      parameter names and maths as the original models.py); its config (hidden size,
      depth, patch, input size, classes, learn_sigma, mlp ratio) is inferred from the
      state dict, the head count from the hidden size (override with --num-heads).

  export_onnx.py dit --diffusers facebook/DiT-XL-2-256 --out dit.onnx [--fp16]
      diffusers DiTTransformer2DModel (subfolder "transformer" of a pipeline), hub id
      or local directory.  Note: the diffusers port is not bit-identical to the
      original code (its timestep embedding divides the frequency exponent by
      half-1 instead of half, and its block LayerNorms use eps 1e-5, not 1e-6).

  export_onnx.py vae --diffusers stabilityai/sd-vae-ft-mse --out-dir DIR [--fp16]
      diffusers AutoencoderKL -> DIR/vae_encoder.onnx (encoder + quant_conv ->
      `mean`, `logvar`) and DIR/vae_decoder.onnx (post_quant_conv + decoder).

  export_onnx.py fuse IN.onnx OUT.onnx
      Rewrite an existing mgd3 export (DiT or VAE, fp32 or fp16) into the fused graph
      below, without the checkpoint, and check it against IN on random inputs.

  export_onnx.py cuda-vae IN.onnx OUT.onnx [--fp16]
      Rewrite a plain fp32 VAE half into the CUDA-only graph (fp16 with --fp16): ONNX Runtime's own
      Stable Diffusion VAE optimizer fuses each GroupNorm (+ SiLU, + skip) into
      com.microsoft.GroupNorm / SkipGroupNorm in NHWC and turns every Conv into NhwcConv, then
      the attention is fused as `fuse` does. The CPU cannot run the result; it is checked on
      the CPU against IN with those operators spelt out in standard ONNX ops.

Graphs (--graph, default fused): `fused` rewrites the exported fp32 graph with onnxscript's
ONNX Runtime fusions (onnxscript.rewriter.ort_fusions.optimize_for_ort): every attention
becomes one com.microsoft.MultiHeadAttention / Attention node (ONNX Runtime runs them with
flash / memory-efficient kernels on CUDA, accumulating the softmax in fp32 also for fp16
models), the tanh GELU becomes com.microsoft.FastGelu, LayerNorm stays one
LayerNormalization.  The census after the rewrite must show as many fused attentions as the
plain graph had Softmax nodes, no Softmax and no unfused tanh-GELU left, else the export fails.
fp16 models are rewritten from the fp16 export (the timestep's sin/cos features stay fp32).
`plain` is the graph torch.onnx.export writes.

Every export uses torch.onnx.export(dynamo=True, opset 18) with a dynamic batch dim,
writes the mgd3.* metadata_props, checks that dim 0 of every input/output is
symbolic and the rest are concrete, and checks onnxruntime against torch on random
inputs (non-zero exit when the max abs error exceeds the tolerance).  Models whose
weights exceed ~1.8 GB are saved with external data (`X.onnx` + `X.onnx.data`).

The export functions are importable (scripts/make_test_models.py uses them).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import sys
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

OPSET = 18
GRAPHS = ("fused", "plain")
# The CLI's default graph. Measured on the CPU EP (real-size DiT-XL/2, ORT 1.31.1): the fused
# graph is no slower than the plain one (README "GPU"); on CUDA it is what dispatches flash
# attention. The export functions keep `plain` as their default for the fixtures' sake.
DEFAULT_GRAPH = "fused"
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of parameters
TRAIN_TIMESTEPS = 1000
BETA_SCHEDULE = "linear"
BETA_START = "0.0001"
BETA_END = "0.02"


# ---------------------------------------------------------------------------
# Original-DiT-compatible module (parameter names match facebookresearch/DiT)
# ---------------------------------------------------------------------------

def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """1-D sin-cos embedding, float64: [sin(pos*omega) | cos(pos*omega)]."""
    assert dim % 2 == 0
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / (10000.0 ** omega)
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos position table [grid*grid, dim] as in DiT/MAE.

    The coordinate grid is built with meshgrid(w, h) (xy indexing), so the first
    half of the channels encodes the column index and the second half the row.
    """
    assert dim % 2 == 0
    coords = np.arange(grid_size, dtype=np.float32)
    gw, gh = np.meshgrid(coords, coords)  # xy indexing: gw varies along axis 1
    first = sincos_1d(dim // 2, gw)
    second = sincos_1d(dim // 2, gh)
    return np.concatenate([first, second], axis=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_ch: int, hidden: int):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, hidden, kernel_size=patch, stride=patch, bias=True)

    def forward(self, x):
        x = self.proj(x)  # [B, D, H/p, W/p]
        return x.flatten(2).transpose(1, 2)  # [B, T, D]


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def frequencies(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        k = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(self.max_period) * k / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.freq_dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t):
        # sin/cos always in float32, then cast to the weights' dtype (fp16 export).
        emb = self.frequencies(t).to(self.mlp[0].weight.dtype)
        return self.mlp(emb)


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        # one extra row: the CFG null class (index num_classes)
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y):
        return self.embedding_table(y)


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        assert hidden % heads == 0
        self.heads = heads
        self.head_dim = hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=True)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * (self.head_dim ** -0.5)) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, inner)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(inner, hidden)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden, bias=True))

    def forward(self, x, c):
        sh_msa, sc_msa, g_msa, sh_mlp, sc_mlp, g_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), sh_msa, sc_msa))
        x = x + g_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sh_mlp, sc_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_ch: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_ch, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """DiT with the parameter names of facebookresearch/DiT models.py (inference only)."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, num_classes=1000, learn_sigma=True):
        super().__init__()
        assert input_size % patch_size == 0
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        grid = input_size // patch_size
        pos = torch.from_numpy(sincos_2d(hidden_size, grid)).float().unsqueeze(0)
        # a (frozen) Parameter, as in the original: it is part of the state dict
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def unpatchify(self, x):
        p = self.patch_size
        c = self.out_channels
        g = self.input_size // p
        x = x.reshape(x.shape[0], g, g, p, p, c)
        x = x.permute(0, 5, 1, 3, 2, 4)  # n c h p w q
        return x.reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x, t, y):
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for blk in self.blocks:
            h = blk(h, c)
        h = self.final_layer(h, c)
        return self.unpatchify(h)


KNOWN_HEADS = {1152: 16, 1024: 16, 768: 12, 384: 6}


def load_original_checkpoint(path: str, trust_pickle: bool = False) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise ExportError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # training checkpoints also pickle an argparse Namespace ("args")
        # Loading the whole pickle runs whatever code it names: only when asked, for a file the
        # user trusts.
        if not trust_pickle:
            raise ExportError(f"{path}: holds more than weights (pickled objects, which run code when loaded, so "
                              "torch's weights-only loader refused it); pass --trust-pickle if you trust where the "
                              "file came from") from e
        print("[dit] weights_only load refused; loading the full pickle (--trust-pickle)")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(ckpt, dict) and "ema" in ckpt:
        ckpt = ckpt["ema"]
    elif isinstance(ckpt, dict) and "model" in ckpt and isinstance(ckpt["model"], dict):
        ckpt = ckpt["model"]
    sd = {}
    for k, v in ckpt.items():
        if k.startswith("module."):
            k = k[len("module."):]
        sd[k] = v
    return sd


def dit_config_from_state_dict(sd: Dict[str, torch.Tensor], num_heads: Optional[int] = None,
                               input_size: Optional[int] = None) -> dict:
    w = sd["x_embedder.proj.weight"]  # [hidden, in_ch, p, p]
    hidden, in_ch, p = w.shape[0], w.shape[1], w.shape[2]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    num_classes = sd["y_embedder.embedding_table.weight"].shape[0] - 1
    out_ch = sd["final_layer.linear.weight"].shape[0] // (p * p)
    if out_ch not in (in_ch, 2 * in_ch):
        raise ValueError(f"final layer has {out_ch} channels for {in_ch} input channels")
    if "pos_embed" in sd:
        n_tok = sd["pos_embed"].shape[1]
        grid = int(round(math.sqrt(n_tok)))
        assert grid * grid == n_tok
        if input_size is not None and input_size != grid * p:
            raise ValueError(f"--input-size {input_size} but the checkpoint's pos_embed is for {grid * p}")
    elif input_size is None:
        raise ValueError("checkpoint has no pos_embed: pass --input-size (latent size, 32 for 256px)")
    else:
        grid = input_size // p
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden
    if num_heads is None:
        if hidden not in KNOWN_HEADS:
            raise ValueError(f"unknown head count for hidden size {hidden}: pass --num-heads")
        num_heads = KNOWN_HEADS[hidden]
    return dict(input_size=grid * p, patch_size=p, in_channels=in_ch, hidden_size=hidden, depth=depth,
                num_heads=num_heads, mlp_ratio=mlp_ratio, num_classes=num_classes,
                learn_sigma=(out_ch == 2 * in_ch))


def dit_from_checkpoint(path: str, num_heads: Optional[int] = None, input_size: Optional[int] = None,
                        trust_pickle: bool = False) -> DiT:
    sd = load_original_checkpoint(path, trust_pickle)
    cfg = dit_config_from_state_dict(sd, num_heads, input_size)
    print(f"[dit] config inferred from checkpoint: {cfg}")
    model = DiT(**cfg)
    res = model.load_state_dict(sd, strict=False)  # strict=False as the reference (extra keys ok)
    missing = [k for k in res.missing_keys if k != "pos_embed"]  # pos_embed: the fixed sin-cos table
    if missing:
        raise ValueError(f"checkpoint lacks parameters: {missing}")
    if res.unexpected_keys:
        print(f"[dit] ignoring {len(res.unexpected_keys)} unused checkpoint keys, e.g. {res.unexpected_keys[:4]}")
    # the checkpoint's pos_embed should be the fixed sin-cos table
    ref = torch.from_numpy(sincos_2d(cfg["hidden_size"], cfg["input_size"] // cfg["patch_size"])).float()
    d = (model.pos_embed[0] - ref).abs().max().item()
    if d > 1e-4:
        print(f"[dit] warning: checkpoint pos_embed differs from the sin-cos table by {d:.3g}")
    return model.eval()


# ---------------------------------------------------------------------------
# Wrappers giving the contract's I/O
# ---------------------------------------------------------------------------

class DiffusersDiTWrapper(nn.Module):
    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, x, t, y):
        return self.transformer(x, timestep=t, class_labels=y, return_dict=False)[0]


class VaeEncoderWrapper(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv  # None when config.use_quant_conv is False

    def forward(self, image):
        h = self.encoder(image)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = torch.chunk(h, 2, dim=1)
        # the same clamp as diffusers' DiagonalGaussianDistribution (its .logvar)
        logvar = torch.clamp(logvar, -30.0, 20.0)
        return mean, logvar


class VaeDecoderWrapper(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder

    def forward(self, latent):
        z = latent
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


# ---------------------------------------------------------------------------
# Generic export machinery
# ---------------------------------------------------------------------------

def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _np_dtype(t: torch.Tensor):
    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}[t.dtype]


def onnx_io_shapes(path: str) -> Dict[str, list]:
    """{name: [('in'|'out'), elem_type_name, [dim_param or dim_value ...]]} as onnx shows it."""
    import onnx
    m = onnx.load(path, load_external_data=False)
    res = {}
    for kind, vis in (("in", m.graph.input), ("out", m.graph.output)):
        for vi in vis:
            tt = vi.type.tensor_type
            dims = [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "?")
                    for d in tt.shape.dim]
            res[vi.name] = [kind, onnx.TensorProto.DataType.Name(tt.elem_type), dims]
    return res


def _check_shapes(path: str, input_names: Sequence[str], output_names: Sequence[str]):
    shapes = onnx_io_shapes(path)
    ins = [n for n, v in shapes.items() if v[0] == "in"]
    outs = [n for n, v in shapes.items() if v[0] == "out"]
    if ins != list(input_names) or outs != list(output_names):
        raise RuntimeError(f"{path}: I/O names {ins} -> {outs}, expected {list(input_names)} -> {list(output_names)}")
    for name, (kind, et, dims) in shapes.items():
        if not dims or not isinstance(dims[0], str) or dims[0] in ("", "?"):
            raise RuntimeError(f"{path}: {name} dim 0 is not symbolic: {dims}")
        if any(not isinstance(d, int) or d <= 0 for d in dims[1:]):
            raise RuntimeError(f"{path}: {name} has non-concrete trailing dims: {dims}")
        print(f"[onnx] {os.path.basename(path)} {kind:3s} {name}: {et} {dims}")
    return shapes


def onnx_metadata(path: str) -> Dict[str, str]:
    """The model's metadata_props (weights not loaded)."""
    import onnx
    return {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}


def _write_metadata(path: str, metadata: Dict[str, str]):
    import onnx
    m = onnx.load(path, load_external_data=False)  # external tensors keep pointing at X.onnx.data
    keep = [p for p in m.metadata_props if p.key not in metadata]
    del m.metadata_props[:]
    m.metadata_props.extend(keep)
    for k, v in metadata.items():
        p = m.metadata_props.add()
        p.key, p.value = k, str(v)
    onnx.save(m, path)


def _export(module: nn.Module, example: tuple, path: str, input_names, output_names, metadata,
            external_data: Optional[bool] = None, graph: str = "plain"):
    """torch.onnx.export `module` to `path` with `metadata`; `graph="fused"` exports to a
    temporary file first and writes its fused rewrite (`fuse_onnx`) to `path`."""
    if graph == "fused":
        import tempfile
        with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path)), prefix=".plain-") as tmp:
            plain = os.path.join(tmp, os.path.basename(path))
            _export(module, example, plain, input_names, output_names, metadata, external_data)
            fuse_onnx(plain, path, external_data=external_data)
        return _check_shapes(path, input_names, output_names)
    if graph != "plain":
        raise ValueError(f"graph {graph!r}: expected one of {GRAPHS}")
    from torch.export import Dim
    module = module.eval()
    if external_data is None:
        external_data = _param_bytes(module) > EXTERNAL_DATA_THRESHOLD
    import inspect
    argnames = list(inspect.signature(module.forward).parameters)[: len(example)]
    batch = Dim("batch", min=1, max=4096)
    dyn = {a: {0: batch} for a in argnames}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data_file = path + ".data"
    if os.path.exists(data_file):
        os.remove(data_file)
    with torch.no_grad():
        prog = torch.onnx.export(module, example, None, input_names=list(input_names),
                                 output_names=list(output_names), opset_version=OPSET, dynamo=True,
                                 dynamic_shapes=dyn, external_data=external_data, optimize=True)
    prog.save(path, external_data=external_data)
    _write_metadata(path, metadata)
    return _check_shapes(path, input_names, output_names)


ATTENTION_OPS = ("com.microsoft:MultiHeadAttention", "com.microsoft:Attention")


def census_of(nodes) -> Dict[str, int]:
    """{"domain:op" (ONNX ops as ":op"): count} of `nodes` (an onnx GraphProto's or an onnx_ir
    graph's top-level nodes: both have `domain` and `op_type`)."""
    import collections
    return dict(collections.Counter(f"{n.domain}:{n.op_type}" for n in nodes))


def graph_census(path: str) -> Dict[str, int]:
    """`census_of` the graph at `path` (weights not loaded)."""
    import onnx
    return census_of(onnx.load(path, load_external_data=False).graph.node)


def census_line(census: Dict[str, int]) -> str:
    """The numbers a reader checks: fused attentions, bare Softmax, FastGelu, LayerNormalization."""
    attention = sum(census.get(k, 0) for k in ATTENTION_OPS)
    return (f"{attention} fused attention{'' if attention == 1 else 's'}, {census.get(':Softmax', 0)} bare Softmax, "
            f"{census.get('com.microsoft:FastGelu', 0)} FastGelu, {census.get(':LayerNormalization', 0)} "
            f"LayerNormalization, {sum(census.values())} nodes")


def _gelu_tanh_low_precision_rules(rel_tol: float):
    """onnxscript's tanh-GELU -> com.microsoft.FastGelu rule with the tolerance fp16 (1e-3) or
    bf16 (1e-2) constants need (0.044715 and sqrt(2/pi) are 1e-4 off in fp16, 1e-3 in bf16; the
    library's rule asks 1e-5)."""
    from onnxscript.rewriter import pattern

    def c(v):
        return pattern.Constant(v, rel_tol=rel_tol)

    class GeluTanhLowPrecision(pattern.RewriteRuleClassBase):
        def pattern(self, op, x):
            inner = op.Mul(c(math.sqrt(2.0 / math.pi)), op.Add(x, op.Mul(c(0.044715), op.Pow(x, 3))))
            return op.Mul(x, op.Mul(c(0.5), op.Add(op.Tanh(inner), c(1.0))))

        def rewrite(self, op, x):
            return op.FastGelu(x, _domain="com.microsoft")

    return pattern.RewriteRuleSet([GeluTanhLowPrecision.rule()])


class ExportError(Exception):
    """A problem with the user's input, reported as one line (no traceback) by the CLI."""


MGD3_KINDS = ("dit", "vae_encoder", "vae_decoder")


def check_mgd3_model(path: str) -> Tuple[Dict[str, str], Dict[str, int]]:
    """The metadata and census of the mgd3 export at `path`, from one read of the file;
    ExportError when it is missing, empty, not ONNX, missing or short of its external data, or
    not an mgd3 export."""
    import onnx
    if not os.path.exists(path):
        raise ExportError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise ExportError(f"{path}: not a file (give the .onnx file itself)")
    if os.path.getsize(path) == 0:
        raise ExportError(f"{path}: empty file (0 bytes)")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise ExportError(f"{path}: not an ONNX model ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from e
    folder = os.path.dirname(os.path.abspath(path))
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        data = os.path.join(folder, info.get("location", ""))
        end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
        if not os.path.isfile(data):
            raise ExportError(f"{path}: its weights file {data} (external data of `{tensor.name}`) does not exist; "
                              "keep the .onnx and its data files together")
        if os.path.getsize(data) < end:
            raise ExportError(f"{path}: its weights file {data} holds {os.path.getsize(data)} bytes, `{tensor.name}` "
                              f"needs {end}: the file is cut short; copy it again")
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get("mgd3.kind") not in MGD3_KINDS:
        raise ExportError(f"{path}: not an mgd3 export (metadata mgd3.kind is {meta.get('mgd3.kind')!r}, expected one "
                          f"of {', '.join(MGD3_KINDS)}): export it with `export_onnx.py dit` or `vae`")
    return meta, census_of(model.graph.node)


def _sweep_staging(folder: str):
    """Removes the staging folders (`.fuse-<pid>-…`) of fuse runs that were killed: their process
    is gone. A full-size model copy must not stay hidden beside the output."""
    import shutil
    for name in os.listdir(folder):
        parts = name.split("-")
        if not (name.startswith(".fuse-") and len(parts) >= 3 and parts[1].isdigit()):
            continue
        pid = int(parts[1])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print(f"[fuse] removing {os.path.join(folder, name)}, left by a fuse run that did not finish")
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
        except PermissionError:
            pass  # another user's live process


def _staging_folder(dst: str, folder: str):
    """A temporary folder beside `dst` (in `folder`) where a result is written and checked before
    it is moved into place (`.fuse-<pid>-…`, swept by `_sweep_staging` if the run is killed);
    ExportError naming `dst` when `folder` takes no file."""
    import tempfile
    try:
        return tempfile.TemporaryDirectory(dir=folder, prefix=f".fuse-{os.getpid()}-")
    except OSError as e:
        raise ExportError(f"{dst}: cannot write in {folder} ({e.strerror})") from e


@contextlib.contextmanager
def _staged_output(dst: str):
    """A path to export `dst` to and check there: moved into place (with its `.data` file) only
    when the block ends without an error, so a failed export or check leaves `dst` as it was
    (a good model the export was to replace, or a checkpoint given as --out by mistake)."""
    folder = os.path.dirname(os.path.abspath(dst))
    os.makedirs(folder, exist_ok=True)
    _sweep_staging(folder)
    with _staging_folder(dst, folder) as staging:
        staged = os.path.join(staging, os.path.basename(dst))
        yield staged
        if os.path.exists(dst + ".data"):
            os.remove(dst + ".data")
        if os.path.exists(staged + ".data"):
            os.replace(staged + ".data", dst + ".data")
        os.replace(staged, dst)


def _refuse_overwriting_source(out: str, source: str):
    """ExportError when `out` is the source checkpoint or a file inside the source folder."""
    real_out, real_src = os.path.realpath(out), os.path.realpath(source)
    if real_out == real_src or (os.path.isdir(real_src) and real_out.startswith(real_src.rstrip(os.sep) + os.sep)):
        raise ExportError(f"--out {out} is the model being exported ({source}) or inside it: name another file")


def fuse_onnx(src: str, dst: str, *, external_data: Optional[bool] = None,
              check: Optional[Callable[[str], object]] = None,
              checked: Optional[Tuple[Dict[str, str], Dict[str, int]]] = None) -> Dict[str, int]:
    """Write the fused graph of the mgd3 export `src` (fp32, fp16 or bf16) to `dst` (see the module doc).

    The result is written to a staging folder beside `dst`, checked, and only then moved into
    place with its own external-data file (`dst` + ".data" when the weights exceed
    EXTERNAL_DATA_THRESHOLD or `external_data`): a failure leaves nothing at `dst`, and the fused
    model never refers to `src`'s data file. `check(staged_path)` runs on the staged model before
    it is moved (e.g. `compare_onnx` against `src`). `checked` is `check_mgd3_model(src)` when the
    caller already has it (the input is read once). Returns the census of `dst`.

    Raises ExportError when `src` is not a plain mgd3 export or `dst` is `src`; RuntimeError when
    the rewrite leaves a Softmax or an unfused tanh-GELU, or fuses fewer attentions than `src`
    had Softmax nodes."""
    import shutil
    import tempfile
    import onnx_ir as ir
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.ort_fusions import optimize_for_ort
    meta, before = checked or check_mgd3_model(src)
    if meta.get("mgd3.graph") == "fused":
        raise ExportError(f"{src} is already fused (metadata mgd3.graph = fused, "
                          f"{meta.get('mgd3.fused_attention', '?')} fused attentions): nothing to do")
    if os.path.abspath(dst) == os.path.abspath(src) or (
            os.path.exists(dst) and os.path.samefile(dst, src)):
        raise ExportError(f"{dst}: the output would replace the input; write the fused model to another file "
                          "(the check compares it with the plain one)")
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise ExportError(f"{dst}: the folder {folder} does not exist")
    if os.path.isdir(dst):
        raise ExportError(f"{dst}: is a folder; name the output .onnx file")
    if not os.access(folder, os.W_OK):
        raise ExportError(f"{dst}: cannot write in {folder}")
    if not before.get(":Softmax", 0):
        raise ExportError(f"{src} has no attention to fuse (no Softmax in its graph): use it as it is")
    _sweep_staging(folder)
    precision = meta.get("mgd3.precision", "fp32")
    model = ir.load(src)
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if external_data is None:
        external_data = weight_bytes > EXTERNAL_DATA_THRESHOLD
    model, counts = optimize_for_ort(model)
    fused = {k: v for k, v in counts.items() if v}
    if precision in ("fp16", "bf16"):
        model = rewrite(model, pattern_rewrite_rules=_gelu_tanh_low_precision_rules(
            1e-3 if precision == "fp16" else 1e-2))
    after = census_of(model.graph)
    attention = sum(after.get(k, 0) for k in ATTENTION_OPS)
    print(f"[fuse] {src} -> {dst}: {fused}; census: {census_line(after)}")
    if after.get(":Softmax", 0) or attention != before.get(":Softmax", 0):
        raise RuntimeError(f"{dst}: the fused graph has {attention} fused attentions and "
                           f"{after.get(':Softmax', 0)} Softmax for {before.get(':Softmax', 0)} attentions "
                           f"in {src}: onnxscript's fusions did not match this export; keep the plain graph "
                           "(export_onnx.py ... --graph plain)")
    if before.get(":Tanh", 0) and after.get(":Tanh", 0):
        raise RuntimeError(f"{dst}: {after[':Tanh']} tanh-GELUs were not fused into FastGelu; keep the plain graph")
    model.metadata_props.update({"mgd3.graph": "fused", "mgd3.fused_attention": str(attention)})
    name = os.path.basename(dst)
    with _staging_folder(dst, folder) as staging:
        staged = os.path.join(staging, name)
        if external_data:
            ir.save(model, staged, external_data=name + ".data")
        else:
            # every weight inside the file, also those `src` kept in its own data file
            ir.save(ir.external_data.load_to_model(model), staged)
        if check is not None:
            check(staged)
        if os.path.exists(dst + ".data"):
            os.remove(dst + ".data")
        if external_data:
            os.replace(staged + ".data", dst + ".data")
        os.replace(staged, dst)
    return after


CUDA_VAE_OPS = ("com.microsoft:GroupNorm", "com.microsoft:SkipGroupNorm", "com.microsoft:NhwcConv")


def cuda_vae_onnx(src: str, dst: str, *, fp16: bool = False,
                  check: Optional[Callable[[str], object]] = None) -> Dict[str, int]:
    """Write the CUDA-only graph of the plain fp32 mgd3 VAE half `src` to `dst` (fp16 weights, inputs
    and outputs with `fp16`, converted after the rewrite as ONNX Runtime's SD pipeline does):
    ONNX Runtime's own Stable Diffusion VAE optimizer (onnxruntime.transformers.optimizer,
    model_type="vae") turns each GroupNorm (InstanceNormalization between reshapes, with or
    without the SiLU after it) into one com.microsoft.GroupNorm or SkipGroupNorm in NHWC and every
    convolution into com.microsoft.NhwcConv. ONNX Runtime has these kernels on CUDA only, so the
    result does not run on the CPU; `check(staged)` runs on the staged file before it is moved
    into place (e.g. `expand_cuda_ops` + `compare_onnx`, which do run on the CPU). The metadata
    of `src` is kept, plus `mgd3.cuda_only=1` and `mgd3.group_norm` (fused GroupNorms); the attention
    is then fused as `fuse` does (`mgd3.graph=fused`). Returns the census of `dst`.

    Raises ExportError when `src` is not a plain mgd3 VAE half or `dst` is `src`; RuntimeError when
    no GroupNorm or not every attention was fused."""
    import shutil
    import tempfile
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions
    meta, before = check_mgd3_model(src)
    if meta.get("mgd3.kind") not in ("vae_encoder", "vae_decoder"):
        raise ExportError(f"{src} is a {meta.get('mgd3.kind')}, not a VAE half: the CUDA graph is for "
                          "vae_encoder.onnx and vae_decoder.onnx")
    if meta.get("mgd3.cuda_only") == "1":
        raise ExportError(f"{src} is already the CUDA graph: nothing to do")
    if meta.get("mgd3.precision", "fp32") != "fp32":
        raise ExportError(f"{src} is {meta.get('mgd3.precision')}: ONNX Runtime's VAE optimizer takes the fp32 export "
                          "(its GroupNorm rule reads fp32 weights); give the plain fp32 VAE, with --fp16 for an fp16 "
                          "CUDA graph")
    if meta.get("mgd3.graph") == "fused":
        raise ExportError(f"{src} is already the fused graph, whose GroupNorms ONNX Runtime's optimizer does not "
                          "match: give the plain export (export_onnx.py vae ... --graph plain); its attention is "
                          "fused here too")
    if os.path.abspath(dst) == os.path.abspath(src) or (os.path.exists(dst) and os.path.samefile(dst, src)):
        raise ExportError(f"{dst}: the output would replace the input; write it to another file")
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ExportError(f"{dst}: cannot write in {folder}")
    if os.path.isdir(dst):
        raise ExportError(f"{dst}: is a folder; name the output .onnx file")
    _sweep_staging(folder)
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort
    name = os.path.basename(dst)
    # The staging folder first: a folder that takes no file fails here, before minutes of work.
    with _staging_folder(dst, folder) as staging:
        staged = os.path.join(staging, name)
        options = FusionOptions("vae")
        options.enable_group_norm = True
        options.enable_skip_group_norm = True
        options.group_norm_channels_last = True
        options.enable_nhwc_conv = True
        # ONNX Runtime's optimizer and fp16 converter print shape-inference failures on the way
        # (their contrib ops have no ONNX shape rules) and carry on: shown only if they fail.
        failure = None
        with _quiet() as said:
            try:
                optimized = optimizer.optimize_model(src, model_type="vae", num_heads=0, hidden_size=0, opt_level=0,
                                                     optimization_options=options, use_gpu=True)
                if fp16:
                    optimized.convert_float_to_float16(keep_io_types=False)
                    _drop_repeated_nodes(optimized.model.graph, dst)
                optimized.save_model_to_file(staged, use_external_data_format=False)
                # Then the attention, as `fuse` does (onnxscript's rules match after the GroupNorm
                # rewrite, not before it).
                model, _ = optimize_for_ort(ir.load(staged))
            except Exception as e:  # noqa: BLE001 - shown with what the libraries said, then raised
                failure = e
        if failure is not None:
            sys.stderr.write(said.getvalue())
            raise failure
        after = census_of(model.graph)
        group_norm = after.get("com.microsoft:GroupNorm", 0) + after.get("com.microsoft:SkipGroupNorm", 0)
        attention = sum(after.get(k, 0) for k in ATTENTION_OPS)
        print(f"[cuda-vae] {src} -> {dst}: {group_norm} fused GroupNorms "
              f"({after.get(':InstanceNormalization', 0)} left as InstanceNormalization), "
              f"{after.get('com.microsoft:NhwcConv', 0)} NhwcConv of {before.get(':Conv', 0)} Conv; {census_line(after)}")
        if not group_norm:
            raise RuntimeError(f"{dst}: ONNX Runtime's VAE optimizer fused no GroupNorm in {src}; keep the model as it is")
        if after.get(":Softmax", 0) or attention != before.get(":Softmax", 0):
            raise RuntimeError(f"{dst}: {attention} fused attentions and {after.get(':Softmax', 0)} Softmax for "
                               f"{before.get(':Softmax', 0)} attentions in {src}; keep the model as it is")
        model.metadata_props.clear()
        model.metadata_props.update(meta)
        model.metadata_props["mgd3.precision"] = "fp16" if fp16 else "fp32"
        model.metadata_props.update({"mgd3.graph": "fused", "mgd3.fused_attention": str(attention),
                                     "mgd3.cuda_only": "1", "mgd3.group_norm": str(group_norm)})
        ir.save(ir.external_data.load_to_model(model), staged)
        if check is not None:
            check(staged)
        os.replace(staged, dst)
    return after


def _drop_repeated_nodes(graph, dst: str):
    """Removes nodes that repeat an earlier node exactly (op, inputs, attributes, outputs): ONNX
    Runtime's fp16 converter gives a value shared by several fp32-only consumers (the SD VAE
    decoder's upsample scales) one `Cast` per consumer under one output name, which ONNX forbids;
    the copies compute the same value. A name produced by two different nodes is an error."""
    seen = {}
    kept = []
    for node in graph.node:
        key = _unnamed(node)
        clash = [o for o in node.output if o and o in seen]
        if not clash:
            kept.append(node)
            seen.update({o: key for o in node.output if o})
            continue
        if all(seen[o] == key for o in clash):
            continue
        raise RuntimeError(f"{dst}: ONNX Runtime's fp16 converter made two different nodes for {clash}")
    if len(kept) != len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)


def _unnamed(node) -> bytes:
    copy = node.__class__()
    copy.CopyFrom(node)
    copy.name = ""
    return copy.SerializeToString()


class _quiet:
    """Captures what the libraries inside print to stdout and stderr or log below ERROR (returned
    by `with`, a StringIO), for steps whose chatter is no news unless they fail."""

    def __enter__(self):
        import contextlib
        import io
        import logging
        self.said = io.StringIO()
        self.stack = contextlib.ExitStack()
        self.stack.enter_context(contextlib.redirect_stdout(self.said))
        self.stack.enter_context(contextlib.redirect_stderr(self.said))
        self.level = logging.root.manager.disable
        logging.disable(logging.WARNING)
        return self.said

    def __exit__(self, *exc):
        import logging
        logging.disable(self.level)
        self.stack.close()
        return False


def check_cuda_vae(src: str, cuda: str, *, tol: float, name: Optional[str] = None) -> float:
    """`compare_onnx` of the plain VAE half `src` with its CUDA graph `cuda`, its CUDA-only
    operators spelt out (`expand_cuda_ops`), on the CPU."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        expanded = os.path.join(tmp, "expanded.onnx")
        expand_cuda_ops(cuda, expanded)
        return compare_onnx(src, expanded, tol=tol, b_name=f"{name or cuda} (CUDA-only operators spelt out)")


def expand_cuda_ops(src: str, dst: str):
    """Write `src` with its CUDA-only operators (CUDA_VAE_OPS) spelt out in standard ONNX ops, so
    that the CPU can check what they compute: NhwcConv as Transpose, Conv (the weight transposed
    back to OIHW), Transpose; GroupNorm as Transpose to NCHW, InstanceNormalization over
    [N, groups, -1], the per-channel gamma and beta, SiLU when `activation` = 1, Transpose to NHWC;
    SkipGroupNorm as the same on input + skip (+ bias), its optional second output being that sum.
    A wrong group count, epsilon, activation, weight layout or skip would show as a difference
    from the model it was made from."""
    import onnx
    from onnx import helper, numpy_helper
    model = onnx.load(src)
    graph = model.graph
    nodes = []
    counter = [0]

    def fresh(stem):
        counter[0] += 1
        return f"_expand_{stem}_{counter[0]}"

    def const(values, dtype=np.int64):
        name = fresh("const")
        graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def group_norm(x_nhwc, gamma, beta, attrs, out):
        groups, eps = attrs["groups"], attrs.get("epsilon", 1e-5)
        x = fresh("nchw")
        nodes.append(helper.make_node("Transpose", [x_nhwc], [x], perm=[0, 3, 1, 2]))
        grouped, shape = fresh("grouped"), fresh("shape")
        nodes.append(helper.make_node("Reshape", [x, const([0, groups, -1])], [grouped]))
        ones, zeros = fresh("ones"), fresh("zeros")
        nodes.append(helper.make_node("CastLike", [const(np.ones(groups), np.float32), x], [ones]))
        nodes.append(helper.make_node("CastLike", [const(np.zeros(groups), np.float32), x], [zeros]))
        normed = fresh("normed")
        nodes.append(helper.make_node("InstanceNormalization", [grouped, ones, zeros], [normed], epsilon=eps))
        nodes.append(helper.make_node("Shape", [x], [shape]))
        back = fresh("back")
        nodes.append(helper.make_node("Reshape", [normed, shape], [back]))
        g, b = fresh("gamma"), fresh("beta")
        for name, target in ((gamma, g), (beta, b)):
            column, cast = fresh("column"), fresh("cast")
            nodes.append(helper.make_node("Reshape", [name, const([-1, 1, 1])], [column]))
            nodes.append(helper.make_node("CastLike", [column, x], [cast]))
            nodes.append(helper.make_node("Identity", [cast], [target]))
        scaled, y = fresh("scaled"), fresh("y")
        nodes.append(helper.make_node("Mul", [back, g], [scaled]))
        nodes.append(helper.make_node("Add", [scaled, b], [y]))
        if attrs.get("activation", 0) == 1:
            sig, act = fresh("sigmoid"), fresh("silu")
            nodes.append(helper.make_node("Sigmoid", [y], [sig]))
            nodes.append(helper.make_node("Mul", [y, sig], [act]))
            y = act
        nodes.append(helper.make_node("Transpose", [y], [out], perm=[0, 2, 3, 1]))

    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.domain == "com.microsoft" and node.op_type == "NhwcConv":
            x, w = fresh("nchw"), fresh("oihw")
            nodes.append(helper.make_node("Transpose", [node.input[0]], [x], perm=[0, 3, 1, 2]))
            nodes.append(helper.make_node("Transpose", [node.input[1]], [w], perm=[0, 3, 1, 2]))
            y = fresh("conv")
            inputs = [x, w] + ([node.input[2]] if len(node.input) > 2 and node.input[2] else [])
            conv_attrs = {k: v for k, v in attrs.items() if k in
                          ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")}
            if isinstance(conv_attrs.get("auto_pad"), bytes):
                conv_attrs["auto_pad"] = conv_attrs["auto_pad"].decode()
            nodes.append(helper.make_node("Conv", inputs, [y], **conv_attrs))
            nodes.append(helper.make_node("Transpose", [y], [node.output[0]], perm=[0, 2, 3, 1]))
        elif node.domain == "com.microsoft" and node.op_type == "GroupNorm":
            if attrs.get("channels_last", 1) != 1:
                raise RuntimeError(f"{src}: GroupNorm {node.name} is not channels-last")
            group_norm(node.input[0], node.input[1], node.input[2], attrs, node.output[0])
        elif node.domain == "com.microsoft" and node.op_type == "SkipGroupNorm":
            total = fresh("sum")
            nodes.append(helper.make_node("Add", [node.input[0], node.input[3]], [total]))
            if len(node.input) > 4 and node.input[4]:
                with_bias = fresh("sum_bias")
                nodes.append(helper.make_node("Add", [total, node.input[4]], [with_bias]))
                total = with_bias
            group_norm(total, node.input[1], node.input[2], attrs, node.output[0])
            if len(node.output) > 1 and node.output[1]:
                nodes.append(helper.make_node("Identity", [total], [node.output[1]]))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    onnx.save(model, dst)


def compare_onnx(a: str, b: str, *, batch: int = 3, tol: float = 1e-4, seed: int = 0,
                 b_name: Optional[str] = None) -> float:
    """Run the models `a` and `b` (same contract) on one seeded random batch and return the
    largest |a - b| relative to max(1, max|a|); RuntimeError beyond `tol`. `b_name` names `b` in
    messages (a staged file's final name)."""
    b_name = b_name or b
    sa, sb = ort_session(a), ort_session(b)
    rng = np.random.default_rng(seed)
    feed = {}
    for i in sa.get_inputs():
        shape = [d if isinstance(d, int) else batch for d in i.shape]
        if "int64" in i.type:  # t in [0, 1000), y over the first 10 labels
            feed[i.name] = rng.integers(0, 10 if i.name == "y" else 1000, shape)
        else:
            feed[i.name] = rng.standard_normal(shape).astype(np.float32)
    def typed(session):
        return {i.name: feed[i.name].astype(np.float16) if "float16" in i.type else feed[i.name]
                for i in session.get_inputs()}
    outs_a, outs_b = sa.run(None, typed(sa)), sb.run(None, typed(sb))
    worst = 0.0
    for name, x, y in zip([o.name for o in sa.get_outputs()], outs_a, outs_b):
        x, y = x.astype(np.float32), y.astype(np.float32)
        rel = float(np.max(np.abs(x - y))) / max(1.0, float(np.max(np.abs(x))))
        print(f"[compare] {a} vs {b_name} {name}: max rel diff {rel:.3e} (tol {tol:.0e})")
        if not rel <= tol:
            raise RuntimeError(f"{b_name}: output {name} differs from {a} by {rel:.3e} relative > {tol}")
        worst = max(worst, rel)
    return worst


def ort_session(path: str, threads: int = 1):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])


def _verify(path: str, ref_module: nn.Module, inputs: Sequence[torch.Tensor], input_names, output_names,
            dtype: torch.dtype, tol: float, shown: Optional[str] = None) -> float:
    """Run ORT on `inputs` (float ones cast to `dtype`) and compare with ref_module (fp32) outputs.

    Fails when max|ort - torch| > tol * max(1, max|torch|). Messages name `shown` (the file the
    export is for) rather than `path` (where it was staged)."""
    shown = shown or path
    with torch.no_grad():
        ref = ref_module(*inputs)
    if isinstance(ref, torch.Tensor):
        ref = (ref,)
    sess = ort_session(path)
    feed = {}
    for name, x in zip(input_names, inputs):
        if x.is_floating_point():
            x = x.to(dtype)
        feed[name] = x.cpu().numpy()
    outs = sess.run(list(output_names), feed)
    worst = 0.0
    for name, r, o in zip(output_names, ref, outs):
        r = r.float().numpy()
        o = o.astype(np.float32)
        if r.shape != o.shape:
            raise RuntimeError(f"{shown}: {name} shape {o.shape} != torch {r.shape}")
        if not np.all(np.isfinite(o)):
            raise RuntimeError(f"{shown}: {name} has non-finite values")
        if not np.all(np.isfinite(r)):
            # Nothing to compare with: the source model itself gives NaN/Inf (missing or broken
            # weights), and a NaN difference passes every tolerance.
            raise RuntimeError(f"{shown}: the source model's own {name} has non-finite values: its weights are "
                               "missing or broken")
        err = float(np.max(np.abs(r - o)))
        scale = max(1.0, float(np.max(np.abs(r))))
        print(f"[check] {os.path.basename(shown)} {name}: batch {o.shape[0]} max|ort-torch| = {err:.3e} "
              f"(max|torch| = {float(np.max(np.abs(r))):.3g}, tol {tol * scale:.1e})")
        if err > tol * scale:
            raise RuntimeError(f"{shown}: output {name} differs from torch by {err} > {tol * scale}")
        worst = max(worst, err)
    return worst


def default_tol(fp16: bool) -> float:
    return 3e-2 if fp16 else 1e-4


# ---------------------------------------------------------------------------
# Public export functions
# ---------------------------------------------------------------------------

class Bf16DiT(nn.Module):
    """An original-code DiT (`DiT` above) computing in bfloat16 behind float32 inputs and output.

    The patch embedding stays float32 (ONNX opset 18's Conv has no bfloat16) and its output is
    cast; the timestep's sin/cos features are float32 as always, cast to bfloat16 at the MLP."""

    def __init__(self, dit: "DiT"):
        super().__init__()
        self.dit = copy.deepcopy(dit).to(torch.bfloat16)
        self.dit.x_embedder.float()

    def forward(self, x, t, y):
        d = self.dit
        h = d.x_embedder(x.float()).to(torch.bfloat16) + d.pos_embed
        c = d.t_embedder(t) + d.y_embedder(y)
        for blk in d.blocks:
            h = blk(h, c)
        return d.unpatchify(d.final_layer(h, c)).float()


def dit_metadata(num_classes: int, learn_sigma: bool, source: str, fp16: bool,
                 precision: Optional[str] = None) -> Dict[str, str]:
    return {
        "mgd3.kind": "dit",
        "mgd3.num_classes": str(num_classes),
        "mgd3.learn_sigma": "true" if learn_sigma else "false",
        "mgd3.train_timesteps": str(TRAIN_TIMESTEPS),
        "mgd3.beta_schedule": BETA_SCHEDULE,
        "mgd3.beta_start": BETA_START,
        "mgd3.beta_end": BETA_END,
        "mgd3.source": source,
        "mgd3.precision": precision or ("fp16" if fp16 else "fp32"),
    }


def export_dit(model: nn.Module, out: str, *, in_channels: int, input_size: int, num_classes: int,
               learn_sigma: bool, source: str, fp16: bool = False, tol: Optional[float] = None,
               seed: int = 0, external_data: Optional[bool] = None, graph: str = "plain",
               bf16: bool = False) -> float:
    """Export a DiT-like module forward(x, t, y) -> out as the `graph` ("plain" or "fused"), in
    fp32, fp16 (`fp16`) or bfloat16 behind fp32 I/O (`bf16`, the original-code `DiT` only).
    Returns the max abs torch-vs-ORT error (bf16: NaN when ONNX Runtime's CPU provider has no
    bfloat16 kernels to check with; the census still holds)."""
    if bf16 and fp16:
        raise ValueError("--bf16 and --fp16 exclude each other")
    if bf16 and not isinstance(model, DiT):
        raise ValueError("the bf16 export takes the original DiT code (--checkpoint), not diffusers' port")
    precision = "bf16" if bf16 else "fp16" if fp16 else "fp32"
    tol = (3e-1 if bf16 else default_tol(fp16)) if tol is None else tol
    model = model.eval().float()
    ref = model
    exp_model = Bf16DiT(model).eval() if bf16 else copy.deepcopy(model).half() if fp16 else model
    dtype = torch.float16 if fp16 else torch.float32
    g = torch.Generator().manual_seed(seed)
    ex = (torch.randn(2, in_channels, input_size, input_size, generator=g).to(dtype),
          torch.tensor([1, 999], dtype=torch.int64), torch.tensor([0, num_classes], dtype=torch.int64))
    print(f"[dit] exporting {source} -> {out} ({precision}, {graph} graph, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params)")
    with _staged_output(out) as staged:
        _export(exp_model, ex, staged, ["x", "t", "y"], ["out"],
                dit_metadata(num_classes, learn_sigma, source, fp16, precision),
                external_data=external_data, graph=graph)
        # check on a batch size different from the example's (proves the dynamic batch)
        xc = torch.randn(3, in_channels, input_size, input_size, generator=g)
        tc = torch.tensor([0, 517, TRAIN_TIMESTEPS - 1], dtype=torch.int64)
        yc = torch.tensor([min(3, num_classes - 1), num_classes, 0], dtype=torch.int64)
        try:
            return _verify(staged, ref, [xc, tc, yc], ["x", "t", "y"], ["out"], dtype, tol, out)
        except Exception as e:  # noqa: BLE001 - only the bf16 kernels' absence is forgiven
            if bf16 and "NOT_IMPLEMENTED" in str(e) or bf16 and "Could not find an implementation" in str(e):
                print(f"[check] {os.path.basename(out)}: not run: ONNX Runtime's CPU provider has no bfloat16 "
                      f"kernel for this graph ({str(e).splitlines()[0][:160]}); scripts/gpu_check.sh runs it on "
                      "CUDA")
                return float("nan")
            raise


def vae_metadata(kind: str, scale_factor: float, image_size: int, source: str, fp16: bool) -> Dict[str, str]:
    return {
        "mgd3.kind": kind,
        "mgd3.scale_factor": repr(float(scale_factor)),
        "mgd3.image_size": str(int(image_size)),
        "mgd3.source": source,
        "mgd3.precision": "fp16" if fp16 else "fp32",
    }


def export_vae(vae, encoder_out: str, decoder_out: str, *, image_size: int, scale_factor: float,
               source: str, fp16: bool = False, tol: Optional[float] = None, seed: int = 0,
               external_data: Optional[bool] = None, graph: str = "plain"):
    """Export a diffusers AutoencoderKL as encoder/decoder ONNX pair of the `graph` ("plain" or
    "fused").  Returns (enc_err, dec_err)."""
    tol = default_tol(fp16) if tol is None else tol
    vae = vae.eval().float()
    cfg = vae.config
    in_ch = cfg.in_channels
    lat_ch = cfg.latent_channels
    down = 2 ** (len(cfg.block_out_channels) - 1)
    if image_size % down:
        raise ValueError(f"image size {image_size} not divisible by {down}")
    lat = image_size // down
    enc_ref, dec_ref = VaeEncoderWrapper(vae).eval(), VaeDecoderWrapper(vae).eval()
    vexp = copy.deepcopy(vae).half() if fp16 else vae
    enc_exp, dec_exp = VaeEncoderWrapper(vexp).eval(), VaeDecoderWrapper(vexp).eval()
    dtype = torch.float16 if fp16 else torch.float32
    g = torch.Generator().manual_seed(seed)
    prec = "fp16" if fp16 else "fp32"

    if not (math.isfinite(scale_factor) and scale_factor > 0):
        raise ExportError(f"scale factor {scale_factor}: the VAE's latent scale factor is a positive number "
                          "(SD VAEs: 0.18215)")
    # Both halves are written and checked before either replaces a file: a failure leaves the
    # earlier pair as it was, never one half of each.
    with _staged_output(encoder_out) as enc_staged, _staged_output(decoder_out) as dec_staged:
        print(f"[vae] exporting encoder {source} -> {encoder_out} ({prec}, {graph} graph)")
        ex = (torch.rand(2, in_ch, image_size, image_size, generator=g) * 2 - 1).to(dtype)
        _export(enc_exp, ex, enc_staged, ["image"], ["mean", "logvar"],
                vae_metadata("vae_encoder", scale_factor, image_size, source, fp16), external_data=external_data,
                graph=graph)
        xc = torch.rand(3, in_ch, image_size, image_size, generator=g) * 2 - 1
        e1 = _verify(enc_staged, enc_ref, [xc], ["image"], ["mean", "logvar"], dtype, tol, encoder_out)

        print(f"[vae] exporting decoder {source} -> {decoder_out} ({prec}, {graph} graph)")
        ex = (torch.randn(2, lat_ch, lat, lat, generator=g) * 5).to(dtype)
        _export(dec_exp, ex, dec_staged, ["latent"], ["image"],
                vae_metadata("vae_decoder", scale_factor, image_size, source, fp16), external_data=external_data,
                graph=graph)
        zc = torch.randn(3, lat_ch, lat, lat, generator=g) * 5  # ~ unscaled latents (scaled / 0.18215)
        e2 = _verify(dec_staged, dec_ref, [zc], ["latent"], ["image"], dtype, tol, decoder_out)
    return e1, e2


# ---------------------------------------------------------------------------
# diffusers loading
# ---------------------------------------------------------------------------

def _load_diffusers(cls, name: str, pipeline_subfolder: str, subfolder: Optional[str]):
    """`cls` from diffusers folder or hub id `name`; ExportError when the checkpoint does not hold
    every weight of `cls` (another kind of model: diffusers would fill the rest at random, and the
    export would be a random network under the right name)."""
    def load(**kwargs):
        model, info = cls.from_pretrained(name, torch_dtype=torch.float32, output_loading_info=True, **kwargs)
        missing = list(info.get("missing_keys") or []) + [k[0] if isinstance(k, tuple) else k
                                                           for k in info.get("mismatched_keys") or []]
        if missing:
            raise ExportError(f"{name}: {len(missing)} weights of a {cls.__name__} are not in it (e.g. "
                              f"{', '.join(missing[:3])}), so they would be random: is it a {cls.__name__} "
                              "checkpoint (a DiT for `dit`, an AutoencoderKL for `vae`)?")
        return model
    if subfolder is not None:
        return load(subfolder=subfolder or None)
    if os.path.isdir(name):
        sub = pipeline_subfolder if os.path.isdir(os.path.join(name, pipeline_subfolder)) else None
        return load(subfolder=sub)
    try:  # hub id: a pipeline repo first, then a bare model repo
        return load(subfolder=pipeline_subfolder)
    except (OSError, EnvironmentError, ValueError):
        return load()


def export_diffusers_dit(transformer, out: str, *, source: str, fp16: bool = False,
                         tol: Optional[float] = None, seed: int = 0, graph: str = "plain") -> float:
    cfg = transformer.config
    out_ch = cfg.out_channels if cfg.out_channels is not None else cfg.in_channels
    if out_ch not in (cfg.in_channels, 2 * cfg.in_channels):
        raise ValueError(f"out_channels {out_ch} vs in_channels {cfg.in_channels}")
    return export_dit(DiffusersDiTWrapper(transformer).eval(), out, in_channels=cfg.in_channels,
                      input_size=cfg.sample_size, num_classes=cfg.num_embeds_ada_norm,
                      learn_sigma=(out_ch == 2 * cfg.in_channels), source=source, fp16=fp16, tol=tol,
                      seed=seed, graph=graph)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def _tolerance(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text}: must be a finite number >= 0")
    return value


def _root_cause(error: BaseException) -> str:
    """The error and its innermost cause, in one line (library wrappers such as onnx_ir's
    PassError bury the cause, e.g. a missing file, in their chain)."""
    inner = error
    while inner.__cause__ is not None or (inner.__context__ is not None and not inner.__suppress_context__):
        inner = inner.__cause__ or inner.__context__
    text = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if inner is not error:
        text += f" (caused by {type(inner).__name__}: {str(inner).splitlines()[0] if str(inner) else ''})"
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dit", help="export a DiT")
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="original facebookresearch/DiT .pt checkpoint")
    src.add_argument("--diffusers", help="diffusers DiT (hub id or local dir)")
    d.add_argument("--subfolder", default=None, help="diffusers subfolder (default: 'transformer' if present)")
    d.add_argument("--out", required=True)
    d.add_argument("--num-heads", type=int, default=None,
                   help="attention heads (--checkpoint; default from the hidden size: XL/L 16, B 12, S 6)")
    d.add_argument("--input-size", type=int, default=None,
                   help="latent size (--checkpoint; default from pos_embed, i.e. 32 for 256px)")
    d.add_argument("--trust-pickle", action="store_true",
                   help="--checkpoint: load a checkpoint that holds more than weights (a training checkpoint's "
                        "pickled objects run code when loaded: only for a file you trust)")
    v = sub.add_parser("vae", help="export an SD AutoencoderKL as vae_encoder.onnx + vae_decoder.onnx")
    v.add_argument("--diffusers", required=True, help="hub id or local dir (e.g. stabilityai/sd-vae-ft-mse)")
    v.add_argument("--subfolder", default=None, help="diffusers subfolder (default: 'vae' if present)")
    v.add_argument("--out-dir", required=True)
    v.add_argument("--image-size", type=int, default=None, help="default: config.sample_size (256 for SD VAEs)")
    v.add_argument("--scale-factor", type=float, default=None, help="default: config.scaling_factor (0.18215)")
    f = sub.add_parser("fuse", help="rewrite a plain mgd3 export (fp32, fp16 or bf16) into the fused graph")
    f.add_argument("input", help="a DiT / VAE encoder / VAE decoder exported by this script with --graph plain")
    f.add_argument("output", help="the fused model's file (not the input); its weights go to OUTPUT.data "
                                  "when they exceed 1.8 GB")
    c = sub.add_parser("cuda-vae", help="rewrite a plain mgd3 VAE half into the CUDA-only graph (fused "
                                        "GroupNorm, NHWC convolutions, fused attention)")
    c.add_argument("input", help="vae_encoder.onnx or vae_decoder.onnx exported in fp32 with --graph plain")
    c.add_argument("output", help="the CUDA graph's file (not the input)")
    c.add_argument("--fp16", action="store_true", help="fp16 weights, inputs and outputs (from the fp32 input)")
    c.add_argument("--tol", type=_tolerance, default=None,
                   help="max difference from the input, checked on the CPU with the CUDA-only operators "
                        "spelt out in standard ones, relative to max(1,max|out|) (default 1e-4; --fp16 3e-2)")
    for p in (d, v):
        p.add_argument("--graph", choices=GRAPHS, default=DEFAULT_GRAPH,
                       help=f"fused: attention, GELU and LayerNorm as ONNX Runtime's fused operators; "
                            f"plain: torch.onnx.export's graph (default {DEFAULT_GRAPH})")
    d.add_argument("--bf16", action="store_true",
                   help="bfloat16 weights and maths behind float32 inputs and output (--checkpoint only; "
                        "ONNX Runtime runs it on CUDA only)")
    for p in (d, v):
        p.add_argument("--fp16", action="store_true", help="fp16 weights, inputs and outputs (float16)")
    for p in (d, v):
        p.add_argument("--tol", type=_tolerance, default=None,
                       help="max abs ORT-vs-torch(fp32) error, relative to max(1,max|out|) "
                            "(default 1e-4, fp16 3e-2)")
    f.add_argument("--tol", type=_tolerance, default=None,
                   help="max fused-vs-plain difference, relative to max(1,max|out|) (default 1e-4; fp16 models "
                        "3e-2; bf16 models are not compared: ONNX Runtime runs them on CUDA only)")
    for p in (d, v, f, c):
        p.add_argument("--threads", type=_positive_int, default=1, help="torch CPU threads")
    a = ap.parse_args(argv)
    if a.cmd == "dit" and a.bf16 and a.fp16:
        ap.error("--bf16 and --fp16 exclude each other: choose one precision")
    if a.cmd == "dit" and a.bf16 and a.diffusers:
        ap.error("--bf16 takes the original DiT code (--checkpoint), not diffusers' port")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    try:
        run_command(a)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - one line for the user; MGD3_TRACEBACK=1 for the whole story
        if os.environ.get("MGD3_TRACEBACK"):
            raise
        hint = ""
        source = getattr(a, "diffusers", None)
        if isinstance(e, OSError) and source and not os.path.isdir(source):
            hint = (f" (`{source}` is no local folder, so it was looked up on the Hugging Face hub: without "
                    "network, download it elsewhere and pass the folder)")
        print(f"error: {_root_cause(e)}{hint} (MGD3_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 1
    print("done")
    return 0


def run_command(a):
    """The subcommand `a.cmd` with its parsed arguments `a`."""
    if a.cmd == "fuse":
        checked = check_mgd3_model(a.input)
        precision = checked[0].get("mgd3.precision", "fp32")
        tol = a.tol if a.tol is not None else (1e-4 if precision == "fp32" else 3e-2)
        if precision == "bf16":
            fuse_onnx(a.input, a.output, checked=checked)  # ONNX Runtime's CPU provider cannot run bf16
            print(f"[compare] not run: {a.input} is bf16, which ONNX Runtime runs on CUDA only")
        else:
            fuse_onnx(a.input, a.output, checked=checked,
                      check=lambda staged: compare_onnx(a.input, staged, tol=tol, b_name=a.output))
    elif a.cmd == "cuda-vae":
        tol = a.tol if a.tol is not None else (3e-2 if a.fp16 else 1e-4)
        cuda_vae_onnx(a.input, a.output, fp16=a.fp16,
                      check=lambda staged: check_cuda_vae(a.input, staged, tol=tol, name=a.output))
    elif a.cmd == "dit":
        _refuse_overwriting_source(a.out, a.checkpoint or a.diffusers)
        if a.checkpoint:
            model = dit_from_checkpoint(a.checkpoint, a.num_heads, a.input_size, a.trust_pickle)
            export_dit(model, a.out, in_channels=model.in_channels, input_size=model.input_size,
                       num_classes=model.num_classes, learn_sigma=model.learn_sigma,
                       source=f"dit-original:{os.path.basename(a.checkpoint)}", fp16=a.fp16, tol=a.tol,
                       graph=a.graph, bf16=a.bf16)
        else:
            from diffusers import DiTTransformer2DModel
            tr = _load_diffusers(DiTTransformer2DModel, a.diffusers, "transformer", a.subfolder)
            export_diffusers_dit(tr, a.out, source=f"diffusers:{a.diffusers.rstrip('/').split('/')[-1]}",
                                 fp16=a.fp16, tol=a.tol, graph=a.graph)
    else:
        if a.scale_factor is not None and not (math.isfinite(a.scale_factor) and a.scale_factor > 0):
            raise ExportError(f"--scale-factor {a.scale_factor}: the VAE's latent scale factor is a positive number "
                              "(SD VAEs: 0.18215)")
        from diffusers import AutoencoderKL
        vae = _load_diffusers(AutoencoderKL, a.diffusers, "vae", a.subfolder)
        size = a.image_size or vae.config.sample_size
        if isinstance(size, (list, tuple)):
            size = size[0]
        sf = a.scale_factor if a.scale_factor is not None else (vae.config.scaling_factor or 0.18215)
        for half in ("vae_encoder.onnx", "vae_decoder.onnx"):
            _refuse_overwriting_source(os.path.join(a.out_dir, half), a.diffusers)
        os.makedirs(a.out_dir, exist_ok=True)
        export_vae(vae, os.path.join(a.out_dir, "vae_encoder.onnx"), os.path.join(a.out_dir, "vae_decoder.onnx"),
                   image_size=int(size), scale_factor=sf,
                   source=f"diffusers:{a.diffusers.rstrip('/').split('/')[-1]}", fp16=a.fp16, tol=a.tol,
                   graph=a.graph)


if __name__ == "__main__":
    sys.exit(main())
