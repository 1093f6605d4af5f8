"""HF safetensors checkpoints in and out (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3), read by slice.

`CheckpointReader` reads every file's header once (names, shapes, dtypes; no tensor data),
checks them against the config, and then reads tensors by slice with
`safe_open(...).get_slice`: a distributed rank loads only its heads (`load_attention`) or
its experts (`load_experts`). `from_pretrained` is those same functions over the whole model.

HF names -> ours, per layer i (prefix `model.layers.{i}.`):
  input_layernorm / post_attention_layernorm     -> attn_norm / moe_norm
  self_attn.{q,k,v,o}_proj (+bias), {q,k}_norm   -> attn.*
  {moe}.gate.weight                              -> moe.router.weight
  {moe}.experts.{j}.w1|w3|w2 (Mixtral)           -> moe.experts.w_gate|w_up|w_down [j]
  {moe}.experts.{j}.gate_proj|up_proj|down_proj  -> the same (Qwen)
  {moe}.experts.gate_up_proj [E, 2I, H] (gate rows first), {moe}.experts.down_proj [E, H, I]
                                                 -> the same, fused layout
  mlp.shared_expert.*, mlp.shared_expert_gate    -> moe.shared.{gate,up,down}_proj, moe.shared.gate
{moe} is `block_sparse_moe` for Mixtral files (what transformers 5 still writes) or `mlp`.
DeepSeek-V3 (deepseek_v3) differs in:
  self_attn.{q_proj | q_a_proj, q_a_layernorm, q_b_proj}, kv_a_proj_with_mqa, kv_a_layernorm,
    kv_b_proj, o_proj                            -> attn.* (mla.MLAttention; the same names)
  mlp.{gate,up,down}_proj of the dense layers    -> mlp.* (model.DenseMLP)
  mlp.gate.e_score_correction_bias               -> moe.router.e_score_correction_bias
  mlp.shared_experts.{gate,up,down}_proj         -> moe.shared.* (ungated)
  model.layers.{i >= num_hidden_layers}.*        multi-token-prediction modules: skipped, with a
                                                 log line (only speculative decoding reads them)
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import DTYPES, ModelConfig, from_hf_config, to_hf_dict
from .hf_deepseek import MODEL_TYPE as DEEPSEEK
from .mla import MLAttention, per_head_weights
from .model import BlockParts, ModelParts, MoETransformer, kv_heads_for

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Stored dtypes we cast from. FP8 / int tensors need scales or dequantisation: refused.
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
# Old checkpoints carry RoPE caches; we recompute them.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointReader:
    """Index of an HF checkpoint directory: tensor name -> file, shape and dtype, validated once.

    Construction reads only the headers. `read` returns one tensor, or a slice of it, as stored.
    """

    def __init__(self, path: str | Path, max_seq_len: int | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ValueError(f"{self.path}: not a checkpoint directory")
        self.cfg: ModelConfig = from_hf_config(self.path, max_seq_len=max_seq_len)
        self._handles: dict[Path, object] = {}
        self.file_of: dict[str, Path] = {}
        self.shape_of: dict[str, tuple[int, ...]] = {}
        self.dtype_of: dict[str, str] = {}
        self._index()
        moe = "block_sparse_moe." if self.cfg.hf_model_type == "mixtral" else "mlp."
        # Mixtral files may use either prefix for the MoE block; decide per layer from what is there.
        self.moe_prefix = [self._moe_prefix(i, moe) for i in range(self.cfg.num_layers)]
        self.fused = [f"{p}experts.gate_up_proj" in self.file_of for p in self.moe_prefix]
        self._validate()
        extra = sorted({int(m.group(1)) for k in self.file_of if (m := self._mtp_layer(k))})
        if extra:
            log.info("%s: skipping the multi-token-prediction layer(s) %s (%d tensors): masep decodes one token "
                     "per step and the model's logits do not read them", self.path, extra,
                     sum(1 for k in self.file_of if self._mtp_layer(k)))

    # --- index ---------------------------------------------------------------------------------
    def _index(self) -> None:
        single, index = self.path / SINGLE_FILE, self.path / INDEX_FILE
        if single.exists():  # transformers prefers the single file too
            self._read_header(single)
        elif index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{index}: not a safetensors index (needs a 'weight_map'): {err}") from err
            for name in sorted(set(weight_map.values())):
                shard = self.path / name
                if not shard.exists():
                    raise ValueError(f"{index}: shard file {name!r} listed in the index is missing")
                self._read_header(shard)
            for key, name in weight_map.items():
                if self.file_of.get(key) != self.path / name:
                    raise ValueError(f"{index}: lists tensor {key!r} in {name!r}, but that file does not hold it")
        else:
            raise ValueError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE}")

    def _read_header(self, file: Path) -> None:
        f = self._open(file)
        for key in f.keys():
            if key in self.file_of:
                raise ValueError(f"tensor {key!r} is in both {self.file_of[key]} and {file}")
            sl = f.get_slice(key)
            self.file_of[key] = file
            self.shape_of[key] = tuple(sl.get_shape())
            self.dtype_of[key] = sl.get_dtype()

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except SafetensorError as err:
                raise ValueError(f"{file}: unreadable safetensors file (truncated or corrupt?): {err}") from err
        return self._handles[file]

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _moe_prefix(self, layer: int, default: str) -> str:
        for p in (default, "mlp."):
            if f"model.layers.{layer}.{p}gate.weight" in self.file_of:
                return f"model.layers.{layer}.{p}"
        return f"model.layers.{layer}.{default}"

    # --- expected names and shapes -------------------------------------------------------------
    def expert_names(self, layer: int, expert: int) -> tuple[str, str, str]:
        """Per-expert layout: (gate, up, down) tensor names of one expert."""
        p = f"{self.moe_prefix[layer]}experts.{expert}."
        if self.cfg.hf_model_type == "mixtral":
            return f"{p}w1.weight", f"{p}w3.weight", f"{p}w2.weight"
        return f"{p}gate_proj.weight", f"{p}up_proj.weight", f"{p}down_proj.weight"

    def expected(self) -> dict[str, tuple[int, ...]]:
        c = self.cfg
        h, d, i, e = c.hidden_size, c.head_dim, c.expert_hidden, c.num_experts
        out = {"model.embed_tokens.weight": (c.vocab_size, h), "model.norm.weight": (h,)}
        if not c.tie_embeddings:
            out["lm_head.weight"] = (c.vocab_size, h)
        mla = {name: tuple(p.shape) for name, p in MLAttention(c, device="meta").named_parameters()} if c.is_mla \
            else {}
        for layer in range(c.num_layers):
            p, moe = f"model.layers.{layer}.", self.moe_prefix[layer]
            out.update({f"{p}self_attn.{name}": shape for name, shape in mla.items()})
            attn = {"q_proj": c.num_heads * d, "k_proj": c.num_kv_heads * d, "v_proj": c.num_kv_heads * d}
            for name, rows in attn.items() if not c.is_mla else ():
                out[f"{p}self_attn.{name}.weight"] = (rows, h)
                if c.qkv_bias:
                    out[f"{p}self_attn.{name}.bias"] = (rows,)
            if not c.is_mla:
                out[f"{p}self_attn.o_proj.weight"] = (h, c.num_heads * d)
            if c.qk_norm:
                out[f"{p}self_attn.q_norm.weight"] = out[f"{p}self_attn.k_norm.weight"] = (d,)
            out[f"{p}input_layernorm.weight"] = out[f"{p}post_attention_layernorm.weight"] = (h,)
            if c.is_dense_layer(layer):
                out[f"{p}mlp.gate_proj.weight"] = out[f"{p}mlp.up_proj.weight"] = (c.dense_hidden, h)
                out[f"{p}mlp.down_proj.weight"] = (h, c.dense_hidden)
                continue
            out[f"{moe}gate.weight"] = (e, h)
            if c.router_scoring == "sigmoid":
                out[f"{moe}gate.e_score_correction_bias"] = (e,)
            if self.fused[layer]:
                out[f"{moe}experts.gate_up_proj"], out[f"{moe}experts.down_proj"] = (e, 2 * i, h), (e, h, i)
            else:
                for j in range(e):
                    gate, up, down = self.expert_names(layer, j)
                    out[gate], out[up], out[down] = (i, h), (i, h), (h, i)
            if c.shared_expert_hidden:
                s, shared = c.shared_expert_hidden, self.shared_prefix(layer)
                out[f"{shared}gate_proj.weight"] = out[f"{shared}up_proj.weight"] = (s, h)
                out[f"{shared}down_proj.weight"] = (h, s)
                if c.shared_expert_gate:
                    out[f"{p}mlp.shared_expert_gate.weight"] = (1, h)
        return out

    def shared_prefix(self, layer: int) -> str:
        """Qwen2-MoE's `shared_expert.` or DeepSeek's `shared_experts.` (one of n times the width)."""
        kind = "shared_experts." if self.cfg.hf_model_type == DEEPSEEK else "shared_expert."
        return f"model.layers.{layer}.mlp.{kind}"

    def _mtp_layer(self, key: str):
        """The layer-number match of a multi-token-prediction tensor of a DeepSeek-V3 file, else None."""
        m = re.match(r"model\.layers\.(\d+)\.", key)
        return m if m and self.cfg.hf_model_type == DEEPSEEK and int(m.group(1)) >= self.cfg.num_layers else None

    def _validate(self) -> None:
        expected, where = self.expected(), self._where()
        missing = [k for k in expected if k not in self.file_of]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(f"{where}: missing tensor {missing[0]!r}{more} "
                             f"for model_type={self.cfg.hf_model_type!r}")
        for key, file in self.file_of.items():
            if key not in expected and not self._ignorable(key):
                raise ValueError(f"{file}: unexpected tensor {key!r} (not part of a "
                                 f"{self.cfg.hf_model_type} model with this config.json)")
        for key, shape in expected.items():
            if self.shape_of[key] != shape:
                raise ValueError(f"{self.file_of[key]}: tensor {key!r} has shape {list(self.shape_of[key])}, "
                                 f"config.json implies {list(shape)}")
            if self.dtype_of[key] not in FLOAT_DTYPES:
                raise ValueError(f"{self.file_of[key]}: tensor {key!r} has dtype {self.dtype_of[key]}; "
                                 f"expected a floating-point dtype ({sorted(FLOAT_DTYPES)})")

    def _ignorable(self, key: str) -> bool:
        return (key.endswith(IGNORED_SUFFIXES) or (key == "lm_head.weight" and self.cfg.tie_embeddings)
                or self._mtp_layer(key) is not None)

    def _where(self) -> Path:
        return self.path / (SINGLE_FILE if (self.path / SINGLE_FILE).exists() else INDEX_FILE)

    # --- reading -------------------------------------------------------------------------------
    def read(self, key: str, index: tuple = (), check_finite: bool = True) -> torch.Tensor:
        """Tensor `key` (or `key[index]`, read by slice) in its stored dtype, on the CPU.
        ValueError when it holds NaN or inf (unless check_finite=False): such weights make
        every output garbage while the run still looks healthy."""
        if key not in self.file_of:
            raise ValueError(f"{self._where()}: no tensor {key!r}")
        file = self.file_of[key]
        try:
            sl = self._open(file).get_slice(key)
            tensor = sl[index] if index else sl[:]
        except SafetensorError as err:
            raise ValueError(f"{file}: cannot read tensor {key!r} (truncated or corrupt file?): {err}") from err
        if check_finite:
            self._refuse_non_finite(key, count_non_finite(tensor), f" (in the slice {index})" if index else "")
        return tensor

    def check_finite(self, chunk_bytes: int = 256 << 20) -> None:
        """Read every tensor once, `chunk_bytes` at a time (so a huge tensor never sits in memory
        whole), and refuse the first that holds NaN or inf. The front end calls this before
        starting ranks: a rank would find it only after every rank has started."""
        for key in self.expected():
            shape = self.shape_of[key]
            rows = shape[0] if shape else 1
            row_bytes = max(1, self.numel(key) // max(1, rows) * DTYPE_BYTES.get(self.dtype_of[key], 4))
            step = max(1, chunk_bytes // row_bytes)
            bad = sum(count_non_finite(self.read(key, (slice(a, min(a + step, rows)),) if shape else (),
                                                 check_finite=False))
                      for a in range(0, rows, step))
            self._refuse_non_finite(key, bad)

    def numel(self, key: str) -> int:
        n = 1
        for d in self.shape_of[key]:
            n *= d
        return n

    def _refuse_non_finite(self, key: str, count: int, where: str = "") -> None:
        if count:
            raise ValueError(f"{self.file_of[key]}: tensor {key!r} holds {count} non-finite values (NaN or inf)"
                             f"{where}; the checkpoint is damaged (a diverged training run or a bad conversion): "
                             "re-export or re-download it")


def count_non_finite(tensor: torch.Tensor) -> int:
    """NaN and +-inf entries of a floating tensor (0 for other dtypes)."""
    if not tensor.is_floating_point():
        return 0
    return int(tensor.numel() - torch.isfinite(tensor).sum())


def validate_checkpoint(path: str | Path, check_values: bool = False) -> ModelConfig:
    """Everything a load would refuse, before any rank starts: config.json, the safetensors
    headers (names, shapes, dtypes; cheap, no tensor data), and with `check_values` every
    weight's values (one read of the whole checkpoint). Returns the config; ValueError names
    the file and the problem."""
    with CheckpointReader(path) as r:
        if check_values:
            r.check_finite()
        return r.cfg


def _reader(ckpt: CheckpointReader | str | Path) -> CheckpointReader:
    return ckpt if isinstance(ckpt, CheckpointReader) else CheckpointReader(ckpt)


def _runs(ids: Sequence[int]) -> list[tuple[int, int]]:
    """[3, 4, 5, 9] -> [(3, 6), (9, 10)]: contiguous ranges, so each is one slice read."""
    runs: list[tuple[int, int]] = []
    for j in ids:
        if runs and runs[-1][1] == j:
            runs[-1] = (runs[-1][0], j + 1)
        else:
            runs.append((j, j + 1))
    return runs


def load_experts(ckpt: CheckpointReader | str | Path, layer: int,
                 expert_ids: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Experts `expert_ids` (in that order) of one layer, as `Experts` names them:
    w_gate, w_up [E_local, I, H] and w_down [E_local, H, I], in the stored dtype.
    Reads only those experts' bytes, in both per-expert and fused layouts."""
    r = _reader(ckpt)
    ids = list(range(r.cfg.num_experts)) if expert_ids is None else [int(j) for j in expert_ids]
    bad = [j for j in ids if not 0 <= j < r.cfg.num_experts]
    if bad:
        raise ValueError(f"expert_ids={bad}: must be in [0, {r.cfg.num_experts})")
    i = r.cfg.expert_hidden
    gates, ups, downs = [], [], []
    if r.fused[layer]:
        p = r.moe_prefix[layer]
        for a, b in _runs(ids):
            gates.append(r.read(f"{p}experts.gate_up_proj", (slice(a, b), slice(0, i))))
            ups.append(r.read(f"{p}experts.gate_up_proj", (slice(a, b), slice(i, 2 * i))))
            downs.append(r.read(f"{p}experts.down_proj", (slice(a, b),)))
    else:
        for j in ids:
            gate, up, down = r.expert_names(layer, j)
            gates.append(r.read(gate)[None])
            ups.append(r.read(up)[None])
            downs.append(r.read(down)[None])
    return {"w_gate": torch.cat(gates), "w_up": torch.cat(ups), "w_down": torch.cat(downs)}


def load_attention(ckpt: CheckpointReader | str | Path, layer: int,
                   heads: range | None = None) -> dict[str, torch.Tensor]:
    """Attention weights of one layer for query heads `heads` (all by default), as
    `Attention(cfg, heads=heads)` names them: q rows of those heads, k/v rows of the KV heads
    they read, o_proj columns of those heads. Stored dtype."""
    r = _reader(ckpt)
    c = r.cfg
    heads = heads if heads is not None else range(c.num_heads)
    if not (0 <= heads.start < heads.stop <= c.num_heads and heads.step == 1):
        raise ValueError(f"heads={heads}: must be a non-empty contiguous range within [0, {c.num_heads})")
    if c.is_mla:
        return _load_mla(r, layer, heads)
    kv, d = kv_heads_for(c, heads), c.head_dim
    q_rows, kv_rows = slice(heads.start * d, heads.stop * d), slice(kv.start * d, kv.stop * d)
    p = f"model.layers.{layer}.self_attn."
    out = {"o_proj.weight": r.read(f"{p}o_proj.weight", (slice(None), q_rows))}
    for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
        out[f"{name}.weight"] = r.read(f"{p}{name}.weight", (rows,))
        if c.qkv_bias:
            out[f"{name}.bias"] = r.read(f"{p}{name}.bias", (rows,))
    if c.qk_norm:
        out["q_norm.weight"], out["k_norm.weight"] = r.read(f"{p}q_norm.weight"), r.read(f"{p}k_norm.weight")
    return out


def _load_mla(r: CheckpointReader, layer: int, heads: range) -> dict[str, torch.Tensor]:
    """MLA weights as `MLAttention(cfg, heads)` names them: the per-head rows (q, kv_b) and o_proj
    columns of `heads`; the latent projections and norms whole."""
    p, per_head = f"model.layers.{layer}.self_attn.", per_head_weights(r.cfg)
    out = {}
    for name, _ in MLAttention(r.cfg, device="meta").named_parameters():
        if name not in per_head:
            out[name] = r.read(p + name)
            continue
        width, dim = per_head[name]
        rows = slice(heads.start * width, heads.stop * width)
        out[name] = r.read(p + name, (rows,) if dim == 0 else (slice(None), rows))
    return out


def _load_dense_mlp(r: CheckpointReader, layer: int, cols: range | None) -> dict[str, torch.Tensor]:
    """A dense layer's MLP as `DenseMLP` names it: hidden columns `cols` (all by default)."""
    p = f"model.layers.{layer}.mlp."
    c = slice(None) if cols is None else slice(cols.start, cols.stop)
    return {"mlp.gate_proj.weight": r.read(f"{p}gate_proj.weight", (c,)),
            "mlp.up_proj.weight": r.read(f"{p}up_proj.weight", (c,)),
            "mlp.down_proj.weight": r.read(f"{p}down_proj.weight", (slice(None), c))}


def load_block(ckpt: CheckpointReader | str | Path, layer: int, parts: BlockParts | None = None
               ) -> dict[str, torch.Tensor]:
    """The weights of layer `layer` that `parts` holds (all by default), named as in the state
    dict of `Block(cfg, parts=parts)`; only those bytes are read."""
    r = _reader(ckpt)
    parts = parts or BlockParts.everything(r.cfg)
    if not parts.active:
        return {}
    p, moe = f"model.layers.{layer}.", r.moe_prefix[layer]
    out = {}
    if parts.heads is not None:
        out |= {f"attn.{k}": v for k, v in load_attention(r, layer, parts.heads).items()}
    out["attn_norm.weight"] = r.read(f"{p}input_layernorm.weight")
    out["moe_norm.weight"] = r.read(f"{p}post_attention_layernorm.weight")
    if r.cfg.is_dense_layer(layer):  # held with the attention (model.Block)
        return out | (_load_dense_mlp(r, layer, parts.dense_cols) if parts.heads is not None else {})
    if parts.experts is not None:
        experts = load_experts(r, layer, parts.experts)
        if parts.hidden_cols is not None:  # gate/up rows and down columns of those hidden units
            c = slice(parts.hidden_cols.start, parts.hidden_cols.stop)
            experts = {k: (v[:, :, c] if k == "w_down" else v[:, c]) for k, v in experts.items()}
        out |= {f"moe.experts.{k}": v for k, v in experts.items()}
    out["moe.router.weight"] = r.read(f"{moe}gate.weight")
    if r.cfg.router_scoring == "sigmoid":
        out["moe.router.e_score_correction_bias"] = r.read(f"{moe}gate.e_score_correction_bias")
    if r.cfg.shared_expert_hidden and parts.heads is not None:  # held beside the attention (model.MoE)
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[f"moe.shared.{name}.weight"] = r.read(f"{r.shared_prefix(layer)}{name}.weight")
        if r.cfg.shared_expert_gate:
            out["moe.shared.gate.weight"] = r.read(f"{p}mlp.shared_expert_gate.weight")
    return out


@torch.no_grad()
def copy_into_(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy (casting dtype, moving device) `state` into `module`'s parameters; names must match exactly."""
    params = dict(module.named_parameters())
    assert set(params) == set(state), f"checkpoint mapping bug: {set(params) ^ set(state)}"
    for name, tensor in state.items():
        params[name].copy_(tensor)


def _dtype_name(dtype: torch.dtype | str | None, default: str) -> str:
    if dtype is None:
        return default
    names = {v: k for k, v in DTYPES.items()}
    name = names.get(dtype, dtype) if isinstance(dtype, torch.dtype) else str(dtype).replace("torch.", "")
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: must be one of {sorted(DTYPES)}")
    return name


def from_pretrained(path: str | Path, dtype: torch.dtype | str | None = None, device="cpu",
                    max_seq_len: int | None = None, parts: ModelParts | list[BlockParts] | None = None
                    ) -> MoETransformer:
    """Load an HF Mixtral / Qwen2-MoE / Qwen3-MoE safetensors directory into a MoETransformer.

    dtype: None keeps config.json's dtype; stored floating tensors are cast to it.
    max_seq_len: override max_position_embeddings (the default KV cache length).
    parts: what a rank holds (parallel/parts.py `rank_parts`): build and read only those heads,
    experts and hidden columns, and the embedding and head only where held.
    """
    with CheckpointReader(path, max_seq_len=max_seq_len) as r:
        cfg = r.cfg.replace(dtype=_dtype_name(dtype, r.cfg.dtype))
        parts = ModelParts.of(parts) if parts is not None else ModelParts.everything(cfg)
        model = MoETransformer(cfg, device=device, parts=parts)
        top = {}
        if parts.embedding:
            top["embed.weight"] = r.read("model.embed_tokens.weight")
        if parts.head:
            top["norm.weight"] = r.read("model.norm.weight")
            if not cfg.tie_embeddings:
                top["lm_head.weight"] = r.read("lm_head.weight")
            elif not parts.embedding:  # the tied head without the embedding: its own copy
                top["lm_head.weight"] = r.read("model.embed_tokens.weight")
        with torch.no_grad():
            for name, tensor in top.items():
                model.get_parameter(name).copy_(tensor)
        for layer, block in enumerate(model.layers):
            copy_into_(block, load_block(r, layer, parts[layer]))
    return model.eval()


# --- saving ----------------------------------------------------------------------------------
def hf_state_dict(model: MoETransformer) -> dict[str, torch.Tensor]:
    """The model's weights under HF names, per-expert layout (what transformers 5 writes), on the CPU."""
    cfg = model.cfg
    model_type = to_hf_dict(cfg)["model_type"]
    mixtral = model_type == "mixtral"
    _check_saveable(model, model_type)
    out = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    for layer, block in enumerate(model.layers):
        p = f"model.layers.{layer}."
        moe = p + ("block_sparse_moe." if mixtral else "mlp.")
        out[f"{p}input_layernorm.weight"] = block.attn_norm.weight
        out[f"{p}post_attention_layernorm.weight"] = block.moe_norm.weight
        for name, tensor in block.attn.named_parameters():
            out[f"{p}self_attn.{name}"] = tensor
        if block.moe is None:  # a dense layer
            out |= {f"{p}mlp.{name}": tensor for name, tensor in block.mlp.named_parameters()}
            continue
        out[f"{moe}gate.weight"] = block.moe.router.weight
        if block.moe.router.e_score_correction_bias is not None:
            out[f"{moe}gate.e_score_correction_bias"] = block.moe.router.e_score_correction_bias
        ex = block.moe.experts
        names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
        for j in range(cfg.num_experts):
            for name, w in zip(names, (ex.w_gate, ex.w_up, ex.w_down)):
                out[f"{moe}experts.{j}.{name}.weight"] = w[j]
        if block.moe.shared is not None:
            shared = "shared_experts" if model_type == DEEPSEEK else "shared_expert"
            for name in ("gate_proj", "up_proj", "down_proj"):
                out[f"{p}mlp.{shared}.{name}.weight"] = getattr(block.moe.shared, name).weight
            if block.moe.shared.gate is not None:
                out[f"{p}mlp.shared_expert_gate.weight"] = block.moe.shared.gate.weight
    # safetensors refuses tensors that share storage (expert rows of one stacked parameter): copy.
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in out.items()}


def _check_saveable(model: MoETransformer, model_type: str) -> None:
    cfg = model.cfg
    for layer, block in enumerate(model.layers):
        sliced = block.attn is None or block.attn.heads != range(cfg.num_heads) or (
            block.moe.experts is None or block.moe.experts.expert_ids != list(range(cfg.num_experts))
            if block.moe is not None else block.mlp is None or block.mlp.cols is not None)
        if sliced:
            raise ValueError(f"layer {layer} holds a slice of heads or experts: save_pretrained needs the whole model")
    unsupported = {"mixtral": cfg.qk_norm or cfg.qkv_bias or cfg.shared_expert_hidden or not cfg.norm_topk_prob,
                   "qwen2_moe": cfg.qk_norm, "qwen3_moe": cfg.qkv_bias or cfg.shared_expert_hidden,
                   DEEPSEEK: False}[model_type]  # config.to_hf_dict refused what deepseek_v3 cannot express
    if unsupported:
        raise ValueError(f"model_type={model_type!r} cannot express qk_norm={cfg.qk_norm}, qkv_bias={cfg.qkv_bias}, "
                         f"shared_expert_hidden={cfg.shared_expert_hidden}, norm_topk_prob={cfg.norm_topk_prob}")


def save_pretrained(model: MoETransformer, path: str | Path) -> Path:
    """Write config.json + model.safetensors (HF per-expert layout) that transformers loads back."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg.replace(dtype=_dtype_name(model.dtype, model.cfg.dtype))
    state = hf_state_dict(model)
    (path / "config.json").write_text(json.dumps(to_hf_dict(cfg), indent=2) + "\n")
    save_file(state, str(path / SINGLE_FILE), metadata={"format": "pt"})
    return path
