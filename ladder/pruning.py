"""Structural initialisation of a side network by pruning the frozen backbone (LST_REFERENCE §4).

The authors initialise each side block from the same-index backbone block, shrunk by the reduction
factor r with one-shot structural pruning (``pruning_without_residual``, version 2):

* every projection keeps the ``n // r`` output rows with the largest L1 importance
  (Torch-Pruning's ``L1Strategy``), in ascending original order;
* its input columns are the rows kept by the projection that feeds it: each projection picks its
  own output indices and hands them on, so there is no shared residual index set;
* q, k and v are scored together by the elementwise product of their importances and keep one
  shared row set (the inner dimension, not head-structured: the side keeps the same head count
  with d_kv / r per head);
* biases and LayerNorms are selected by the indices of the projection that produces them.

Llama family (grouped KV heads, rotary; not in the reference, which has no decoder-only code):
the side keeps every query and key-value head, each head_dim/r wide, so q, k, v and o are pruned
per head with the head structure kept (:meth:`_Pruner.grouped_attention`): each key-value group
g keeps one set of head dims, used by k_g, v_g and every query head of the group (h // (n_head /
n_kv_head) = g), so query heads still meet their own keys, and o keeps the matching columns of
every query head. Rotary positions rotate dims j and j + head_dim/2 together, so dims are kept in
those pairs. The MLP's gate and up share one row set (one product score), down follows them.

GPT-2 (not in the reference either) goes through the same walk as Llama, pre-norm, with
LayerNorm biases selected with their weights and no rotary pairing (every head is its own
key-value group). Its projections are ``Conv1D`` layers whose weights are [in, out], and q, k, v
are one fused ``c_attn`` [d, 3d]: :func:`_gpt2_as_linears` first turns weights and importances
alike into [out, in] matrices, c_attn split into q, k, v (and its bias into three), so the
indices returned for GPT-2 read ``W[rows][:, cols]`` of those transposed, split matrices
(``c_attn.weight[:, :d].T`` for q).

Importance is either the empirical Fisher (``ladder.fisher.compute_fisher``) or, for the magnitude
variant, the raw weights (:func:`magnitude_importance`).

The result uses a canonical naming shared with the side network (see :func:`prune_backbone`),
and every index set is returned too, so that each pruned tensor can be checked against
``W[rows][:, cols]`` of the backbone.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import transformers
from torch import Tensor

from ladder.errors import LadderError
from ladder.families import CAUSAL_FAMILIES, Dims, check_family, dims_of, divisors

# --------------------------------------------------------------------------- importance


def magnitude_importance(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The raw weights as importance: the reference's magnitude variant (``importance_measure=None``).

    Only floating-point tensors are kept (integer buffers such as ``position_ids`` are never
    scored). Tensors that are already float32 are shared, not copied; pruning only reads them.
    """
    return {
        name: t.detach().to(torch.float32)
        for name, t in state_dict.items()
        if isinstance(t, Tensor) and t.is_floating_point()
    }


# --------------------------------------------------------------------------- row selection


def _keep_rows(score: Tensor, r: int, what: str) -> Tensor:
    """Indices of the n/r rows with the largest L1 score, ascending, as Torch-Pruning's L1Strategy.

    ``score`` is [n, ...]. The reference prunes ``round((1 - 1/r) * n)`` rows with the smallest
    L1 norm; with r dividing n that keeps exactly n/r. Scores are summed in float64 because the
    product of three tiny Fisher values can underflow float32 to zero and turn rows into ties; exact
    ties prune the lower index first (stable sort).
    """
    n = score.shape[0]
    if n % r:
        raise LadderError(f"{what} has {n} rows, not divisible by r={r}; allowed: r dividing {n}")
    l1 = score.reshape(n, -1).abs().sum(1)  # [n]
    pruned = torch.argsort(l1, stable=True)[: n - n // r]
    keep = torch.ones(n, dtype=torch.bool, device=l1.device)
    keep[pruned] = False
    return keep.nonzero().squeeze(1).to("cpu", torch.int64)  # [n/r], ascending


def _select(t: Tensor, rows: Tensor, cols: Tensor | None = None) -> Tensor:
    """``t[rows][:, cols]`` (or ``t[rows]`` for 1-D) as a new float32 contiguous CPU tensor."""
    out = t.detach().index_select(0, rows.to(t.device))
    if cols is not None:
        out = out.index_select(1, cols.to(t.device))
    return out.to("cpu", torch.float32).contiguous()


class _Pruner:
    """Walks the backbone in the reference's order and collects pruned weights and index sets.

    ``weights`` and ``importance`` have their model prefix (``bert.``, ``model.``) stripped;
    outputs are keyed by canonical side names.
    """

    def __init__(
        self, family: str, weights: dict[str, Tensor], importance: dict[str, Tensor], r: int
    ) -> None:
        self.family = family
        self.weights = weights
        self.importance = importance
        self.r = r
        self.out: dict[str, Tensor] = {}
        self.idx: dict[str, Tensor] = {}

    def _weight(self, key: str) -> Tensor:
        if key not in self.weights:
            raise LadderError(
                f"backbone state_dict has no {key!r}; allowed: a {self.family} state_dict"
            )
        return self.weights[key]

    def _importance(self, key: str) -> Tensor:
        if key not in self.importance:
            raise LadderError(f"importance has no {key!r}; allowed: one entry per backbone weight")
        imp = self.importance[key]
        if imp.shape != self._weight(key).shape:
            raise LadderError(
                f"importance {key!r} has shape {tuple(imp.shape)}; allowed: the weight's shape "
                f"{tuple(self._weight(key).shape)}"
            )
        return imp

    def embedding(self, candidates: Sequence[str], d_model: int) -> Tensor:
        """Initial idxs: hidden dims scored by the transposed embedding importance (d × vocab)."""
        key = next((k for k in candidates if k in self.importance), candidates[0])
        imp = self._importance(key)  # [vocab, d]
        if imp.shape[1] != d_model:
            raise LadderError(
                f"{key!r} is {imp.shape[1]} wide; allowed: embeddings as wide as d_model={d_model}"
            )
        rows = _keep_rows(imp.t(), self.r, key)  # [d/r]
        self.idx["idx.embeddings.rows"] = rows
        return rows

    def linears(self, canonical: Sequence[str], hf: Sequence[str], cols: Tensor) -> Tensor:
        """Prune projections that share one output row set; return those rows.

        Input columns are ``cols`` (the previous step's rows). A single projection is scored by its
        own importance; a group (q,k,v, gated wi_0/wi_1) by the elementwise product, as v2 does.
        Scores use the weights only; a bias follows its weight's rows.
        """
        score = None
        for name in hf:
            imp = self._importance(f"{name}.weight")
            imp = imp.index_select(1, cols.to(imp.device)).double()  # [n_out, len(cols)]
            score = imp if score is None else score * imp
        rows = _keep_rows(score, self.r, f"{hf[0]}.weight")  # [n_out/r]
        for canon, name in zip(canonical, hf, strict=True):
            self.out[f"{canon}.weight"] = _select(self._weight(f"{name}.weight"), rows, cols)
            if f"{name}.bias" in self.weights:
                self.out[f"{canon}.bias"] = _select(self.weights[f"{name}.bias"], rows)
            self.idx[f"idx.{canon}.rows"] = rows
            self.idx[f"idx.{canon}.cols"] = cols
        return rows

    def grouped_attention(
        self, canonical: Sequence[str], hf: Sequence[str], cols: Tensor, dims: Dims
    ) -> tuple[Tensor, Tensor]:
        """Prune q, k, v (in that order) head by head for grouped KV heads; return (q rows, kv rows).

        Per key-value group g and head dim j, the score is the product of the L1 importances of
        the rows of k_g, v_g and of the group's query heads (summed over those heads), each over
        the input columns ``cols``; pairs (j, j + head_dim/2) are scored by their sum and kept or
        pruned together (rotary), keeping head_dim/(2r) pairs per group with ``_keep_rows``. Row
        sets are ascending, so a kept pair's two dims stay half a side head apart. Without rotary
        (GPT-2) every head dim is scored on its own, keeping head_dim/r per group.
        """
        h, kv, hd = dims.n_head, dims.n_kv_head, dims.head_dim
        group, half = h // kv, (hd // 2 if dims.rotary else hd)

        def l1(name: str, heads: int) -> Tensor:
            imp = self._importance(f"{name}.weight")
            if imp.shape[0] != heads * hd:
                raise LadderError(
                    f"{name}.weight has {imp.shape[0]} rows; allowed: {heads} heads x {hd}"
                )
            imp = imp.index_select(1, cols.to(imp.device)).double()
            return imp.abs().sum(1).reshape(heads, hd).cpu()  # [heads, hd]

        q, k, v = (l1(name, n) for name, n in zip(hf, (h, kv, kv), strict=True))
        score = q.reshape(kv, group, hd).sum(1) * k * v  # [kv, hd]
        pairs = score[:, :half] + score[:, half:] if dims.rotary else score  # [kv, hd/2 or hd]
        kv_rows, q_rows = [], []
        for g in range(kv):
            kept = _keep_rows(pairs[g], self.r, f"{hf[1]}.weight (key-value head {g})")
            # rotary: ascending, first halves then their pairs; else the kept dims themselves
            dims_g = torch.cat([kept, kept + half]) if dims.rotary else kept
            kv_rows.append(g * hd + dims_g)
            q_rows.extend((g * group + i) * hd + dims_g for i in range(group))
        q_idx, kv_idx = torch.cat(q_rows), torch.cat(kv_rows)
        for canon, name, rows in zip(canonical, hf, (q_idx, kv_idx, kv_idx), strict=True):
            self.out[f"{canon}.weight"] = _select(self._weight(f"{name}.weight"), rows, cols)
            if f"{name}.bias" in self.weights:
                self.out[f"{canon}.bias"] = _select(self.weights[f"{name}.bias"], rows)
            self.idx[f"idx.{canon}.rows"] = rows
            self.idx[f"idx.{canon}.cols"] = cols
        return q_idx, kv_idx

    def norm(self, canonical: str, hf: str, rows: Tensor) -> None:
        """Select a LayerNorm's weight (and bias, if it has one) by ``rows``."""
        self.out[f"{canonical}.weight"] = _select(self._weight(f"{hf}.weight"), rows)
        if f"{hf}.bias" in self.weights:
            self.out[f"{canonical}.bias"] = _select(self.weights[f"{hf}.bias"], rows)
        self.idx[f"idx.{canonical}.rows"] = rows

    def copy(self, canonical: str, hf: str) -> None:
        """Copy a tensor unpruned (T5's relative position bias keeps all buckets and heads)."""
        self.out[f"{canonical}.weight"] = (
            self._weight(f"{hf}.weight").detach().to("cpu", torch.float32, copy=True).contiguous()
        )


# --------------------------------------------------------------------------- families


@dataclass(frozen=True)
class _EncoderNames:
    """HF names of one post-LN encoder family, relative to the stripped prefix."""

    anchor: str  # a key that exists in every such state dict; fixes the prefix to strip
    embeddings: tuple[str, ...]  # candidates for the token embedding (tied names differ)
    layer: str  # "{i}" is the layer index
    q: str
    k: str
    v: str
    o: str
    ln_attn: str
    ffn_in: str
    ffn_out: str
    ln_ffn: str


_BERT = _EncoderNames(
    anchor="encoder.layer.0.attention.self.query.weight",
    embeddings=("embeddings.word_embeddings.weight",),
    layer="encoder.layer.{i}.",
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    o="attention.output.dense",
    ln_attn="attention.output.LayerNorm",
    ffn_in="intermediate.dense",
    ffn_out="output.dense",
    ln_ffn="output.LayerNorm",
)

_BART = _EncoderNames(
    anchor="encoder.layers.0.self_attn.q_proj.weight",
    embeddings=("shared.weight", "encoder.embed_tokens.weight"),
    layer="encoder.layers.{i}.",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.out_proj",
    ln_attn="self_attn_layer_norm",
    ffn_in="fc1",
    ffn_out="fc2",
    ln_ffn="final_layer_norm",
)

_T5_ANCHOR = "encoder.block.0.layer.0.SelfAttention.q.weight"
_LLAMA_ANCHOR = "layers.0.self_attn.q_proj.weight"
_GPT2_ANCHOR = "h.0.attn.c_attn.weight"
_T5_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def _prune_post_ln_encoder(p: _Pruner, names: _EncoderNames, n_layers: int, d_model: int) -> None:
    """BERT family and BART encoder: embeddings -> per layer qkv, o, LN, ffn_in, ffn_out, LN.

    For BART this departs from the authors' BART code on purpose: it scored q,k,v by a sum of
    logs, whose L1 prunes the rows whose Fisher is closest to 1 (LST_REFERENCE §4). We use the
    product, as T5 v2 does, for every family.
    """
    idxs = p.embedding(names.embeddings, d_model)
    for i in range(n_layers):
        hf = names.layer.format(i=i)
        c = f"layers.{i}."
        qkv = p.linears(
            [c + "q", c + "k", c + "v"], [hf + names.q, hf + names.k, hf + names.v], idxs
        )
        o = p.linears([c + "o"], [hf + names.o], qkv)
        p.norm(c + "ln_attn", hf + names.ln_attn, o)  # post-LN: follows the projection before it
        ffn = p.linears([c + "ffn_in"], [hf + names.ffn_in], o)
        idxs = p.linears([c + "ffn_out"], [hf + names.ffn_out], ffn)
        p.norm(c + "ln_ffn", hf + names.ln_ffn, idxs)


def _prune_t5(p: _Pruner, dims: Dims) -> None:
    """T5 encoder then decoder, in the reference's order.

    Quirk kept from the reference: ``decoder.embed_tokens`` does not reset the idxs, so decoder
    block 0 starts from the encoder's last ``wo`` rows.
    """
    # Gated FFN (T5 v1.1 wi_0/wi_1): the reference has no code path for it. We treat the pair like
    # q,k,v: one product score and one shared row set, since both feed the same elementwise gate.
    wi = ("wi_0", "wi_1") if dims.gated else ("wi",)
    idxs = p.embedding(_T5_EMBEDDINGS, dims.d)
    idxs = _prune_t5_stack(p, "encoder", "enc", dims.n_layers, idxs, wi)
    _prune_t5_stack(p, "decoder", "dec", dims.n_dec_layers, idxs, wi)


def _prune_t5_stack(
    p: _Pruner, stack: str, canon: str, n_layers: int, idxs: Tensor, wi: Sequence[str]
) -> Tensor:
    """One T5 stack (pre-LN): each LN is selected by the idxs coming into its sub-layer."""
    p.copy(f"{canon}.rel_bias", f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias")
    decoder = stack == "decoder"
    for i in range(n_layers):
        hf = f"{stack}.block.{i}.layer."
        c = f"{canon}.{i}."
        p.norm(c + "sa_ln", hf + "0.layer_norm", idxs)
        sa = hf + "0.SelfAttention."
        qkv = p.linears([c + "sa.q", c + "sa.k", c + "sa.v"], [sa + "q", sa + "k", sa + "v"], idxs)
        idxs = p.linears([c + "sa.o"], [sa + "o"], qkv)
        if decoder:
            p.norm(c + "ca_ln", hf + "1.layer_norm", idxs)
            ca = hf + "1.EncDecAttention."
            # k and v read the encoder output, yet the reference selects their columns by the
            # decoder self-attention o rows, like q; we do the same.
            qkv = p.linears(
                [c + "ca.q", c + "ca.k", c + "ca.v"], [ca + "q", ca + "k", ca + "v"], idxs
            )
            idxs = p.linears([c + "ca.o"], [ca + "o"], qkv)
        ff = f"{hf}{2 if decoder else 1}."
        p.norm(c + "ff_ln", ff + "layer_norm", idxs)
        inner = p.linears(
            [c + f"ff.{w}" for w in wi], [ff + f"DenseReluDense.{w}" for w in wi], idxs
        )
        idxs = p.linears([c + "ff.wo"], [ff + "DenseReluDense.wo"], inner)
    p.norm(f"{canon}.final_ln", f"{stack}.final_layer_norm", idxs)
    return idxs


def _prune_llama(p: _Pruner, dims: Dims) -> None:
    """Llama family (pre-RMSNorm, as T5): each norm is selected by the idxs coming into it.

    The residual idxs are handed on as in the reference (no shared residual set): embeddings ->
    per block ln_attn, q/k/v (head-structured), o (own rows), ln_ffn, gate/up, down -> final norm.
    """
    idxs = p.embedding(("embed_tokens.weight",), dims.d)
    for i in range(dims.n_layers):
        hf, c = f"layers.{i}.", f"layers.{i}."
        p.norm(c + "ln_attn", hf + "input_layernorm", idxs)
        sa = hf + "self_attn."
        q_rows, _ = p.grouped_attention(
            [c + "attn.q", c + "attn.k", c + "attn.v"],
            [sa + "q_proj", sa + "k_proj", sa + "v_proj"],
            idxs,
            dims,
        )
        # o reads each query head's mix of its group's v dims: the q rows name those columns
        idxs = p.linears([c + "attn.o"], [sa + "o_proj"], q_rows)
        p.norm(c + "ln_ffn", hf + "post_attention_layernorm", idxs)
        mlp = hf + "mlp."
        inner = p.linears([c + "gate", c + "up"], [mlp + "gate_proj", mlp + "up_proj"], idxs)
        idxs = p.linears([c + "down"], [mlp + "down_proj"], inner)
    p.norm("final_ln", "norm", idxs)


def _gpt2_as_linears(tensors: Mapping[str, Tensor], d: int) -> dict[str, Tensor]:
    """GPT-2's Conv1D weights ([in, out]) as [out, in], the fused c_attn split into q, k, v.

    Applied alike to weights and importances (both are elementwise over the same tensor), so
    scores and weights stay aligned: ``h.{i}.attn.c_attn.weight`` [d, 3d] becomes
    ``h.{i}.attn.{q,k,v}.weight`` [d, d] (columns :d, d:2d, 2d: transposed) and its bias [3d] three
    [d] biases; ``attn.c_proj``, ``mlp.c_fc`` and ``mlp.c_proj`` weights are transposed. Every
    other tensor (LayerNorms, wte, wpe) is kept as it is.
    """
    out: dict[str, Tensor] = {}
    for key, t in tensors.items():
        if key.endswith(".attn.c_attn.weight") or key.endswith(".attn.c_attn.bias"):
            if t.shape[-1] != 3 * d:
                raise LadderError(
                    f"{key!r} has shape {tuple(t.shape)}; allowed: last dim 3 x d_model = {3 * d}"
                )
            base, kind = key.rsplit(".c_attn.", 1)
            for name, part in zip("qkv", t.split(d, dim=-1), strict=True):
                out[f"{base}.{name}.{kind}"] = part.t() if kind == "weight" else part
        elif key.endswith((".c_proj.weight", ".c_fc.weight")):
            out[key] = t.t()  # Conv1D [in, out] -> [out, in]
        else:
            out[key] = t
    return out


def _prune_gpt2(p: _Pruner, dims: Dims) -> None:
    """GPT-2 (pre-LayerNorm, as Llama): embeddings -> per block ln_1, q/k/v (per head), attention
    c_proj, ln_2, c_fc, mlp c_proj -> ln_f; each norm selected by the idxs coming into it."""
    idxs = p.embedding(("wte.weight",), dims.d)
    for i in range(dims.n_layers):
        hf, c = f"h.{i}.", f"layers.{i}."
        p.norm(c + "ln_attn", hf + "ln_1", idxs)
        a = hf + "attn."
        q_rows, _ = p.grouped_attention(
            [c + "attn.q", c + "attn.k", c + "attn.v"], [a + "q", a + "k", a + "v"], idxs, dims
        )
        idxs = p.linears([c + "attn.o"], [a + "c_proj"], q_rows)
        p.norm(c + "ln_ffn", hf + "ln_2", idxs)
        inner = p.linears([c + "up"], [hf + "mlp.c_fc"], idxs)
        idxs = p.linears([c + "down"], [hf + "mlp.c_proj"], inner)
    p.norm("final_ln", "ln_f", idxs)


# --------------------------------------------------------------------------- entry points


def _check_r(r: int, dims: Mapping[str, int]) -> None:
    """r must be a positive int dividing every pruned dimension, so each keeps exactly n/r."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise LadderError(f"reduction factor r={r!r}; allowed: one of {divisors(dims)}")
    for name, value in dims.items():
        if value % r:
            raise LadderError(
                f"reduction factor r={r} does not divide {name}={value}; "
                f"allowed: one of {divisors(dims)}"
            )


def _strip_prefix(tensors: Mapping[str, Tensor], anchor: str, what: str) -> dict[str, Tensor]:
    """Drop the model prefix (``bert.``, ``roberta.``, ``model.``...) found in front of ``anchor``.

    Keys without that prefix (classification heads, ``lm_head`` of a prefixed model) are dropped.
    """
    prefixes = {
        key[: -len(anchor)]
        for key in tensors
        if key.endswith(anchor) and (key == anchor or key[-len(anchor) - 1] == ".")
    }
    if len(prefixes) != 1:
        found = "no key" if not prefixes else f"several keys ({sorted(prefixes)})"
        raise LadderError(f"{what} has {found} ending in {anchor!r}; allowed: exactly one")
    prefix = prefixes.pop()
    return {key[len(prefix) :]: t for key, t in tensors.items() if key.startswith(prefix)}


def prune_backbone(
    family: str,
    state_dict: dict[str, Tensor],
    importance: dict[str, Tensor] | None,
    r: int,
    config: transformers.PretrainedConfig,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Prune every backbone layer by r into side-network weights; return (weights, indices).

    ``importance=None`` means magnitude (the raw weights). Keys of ``state_dict`` and
    ``importance`` may carry a model prefix (``bert.``, ``roberta.``, ``model.``); it is stripped.

    Weights, float32 contiguous CPU tensors in canonical names:

    * "bert", "bart": ``layers.{i}.{q,k,v,o,ffn_in,ffn_out}.{weight,bias}`` and
      ``layers.{i}.{ln_attn,ln_ffn}.{weight,bias}``; q/k/v/o [d/r, d/r], ffn_in [d_ff/r, d/r],
      ffn_out [d/r, d_ff/r].
    * "t5": ``enc.{i}.sa.{q,k,v,o}.weight``, ``enc.{i}.sa_ln.weight``,
      ``enc.{i}.ff.{wi|wi_0,wi_1,wo}.weight``, ``enc.{i}.ff_ln.weight``, ``enc.rel_bias.weight``
      (unpruned), ``enc.final_ln.weight``; the same under ``dec.`` plus
      ``dec.{i}.ca.{q,k,v,o}.weight`` and ``dec.{i}.ca_ln.weight``.
    * "llama": ``layers.{i}.attn.{q,k,v,o}.{weight[,bias]}`` (q [n_head*hd/r, d/r], k and v
      [n_kv_head*hd/r, d/r], o [d/r, n_head*hd/r]), ``layers.{i}.{gate,up}.weight`` [d_ff/r, d/r],
      ``layers.{i}.down.weight`` [d/r, d_ff/r], ``layers.{i}.{ln_attn,ln_ffn}.weight``,
      ``final_ln.weight``.
    * "gpt2": as "llama" without ``gate``, with every bias (``attn.{q,k,v,o}``, ``up``,
      ``down``, both norms and ``final_ln``); weights in [out, in] as ``nn.Linear`` has them.

    Indices, int64 ascending: ``idx.<module>.rows`` and, for projections, ``idx.<module>.cols``,
    with every pruned tensor equal to ``W[rows][:, cols]``; ``idx.embeddings.rows`` is the initial
    hidden-dim set. Layer dropping is left to the consumer: all layers are pruned.
    """
    check_family(family)
    dims = dims_of(config)
    _check_r(r, dims.r_divides())
    if importance is None:
        importance = magnitude_importance(state_dict)
    names = _BERT if family == "bert" else _BART
    anchor = {"t5": _T5_ANCHOR, "llama": _LLAMA_ANCHOR, "gpt2": _GPT2_ANCHOR}.get(
        family, names.anchor
    )
    weights = _strip_prefix(state_dict, anchor, "state_dict")
    importance = _strip_prefix(importance, anchor, "importance")
    if family == "gpt2":
        weights = _gpt2_as_linears(weights, dims.d)
        importance = _gpt2_as_linears(importance, dims.d)
    pruner = _Pruner(family, weights, importance, r)
    if family == "t5":
        _prune_t5(pruner, dims)
    elif family == "llama":
        _prune_llama(pruner, dims)
    elif family == "gpt2":
        _prune_gpt2(pruner, dims)
    else:
        _prune_post_ln_encoder(pruner, names, dims.n_layers, dims.d)
    return pruner.out, pruner.idx


def fisher_model_for(
    family: str,
    model_path_or_config: str | os.PathLike[str] | transformers.PretrainedConfig,
    num_labels: int,
    seed: int,
    pad_token_id: int | None = None,
) -> torch.nn.Module:
    """The loss-bearing model the Fisher pass differentiates, in eval mode.

    "bert"/"bart": ``AutoModelForSequenceClassification`` with a classification head randomly
    initialised under ``seed`` (as the reference's BART run; ``num_labels=1`` means regression with
    MSE). "t5": ``T5ForConditionalGeneration`` (label cross-entropy; ``num_labels`` is unused).
    "llama", "gpt2": ``AutoModelForSequenceClassification`` too (``LlamaForSequenceClassification``
    and its Mistral/Qwen2 twins, ``GPT2ForSequenceClassification``), whose head reads the last
    token that is not ``pad_token_id`` (the tokenizer's, given here when the config has none: eos
    for most Llama and GPT-2 tokenizers).
    A ``PretrainedConfig`` gives a randomly initialised model (for tests). The global RNG state is
    left untouched.
    """
    check_family(family)
    kwargs: dict[str, object] = {}
    if family == "t5":
        cls = transformers.T5ForConditionalGeneration
    else:
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise LadderError(f"num_labels={num_labels!r}; allowed: an int >= 1 (1 = regression)")
        cls = transformers.AutoModelForSequenceClassification
        problem = "regression" if num_labels == 1 else "single_label_classification"
        kwargs = {"num_labels": num_labels, "problem_type": problem}
        if family in CAUSAL_FAMILIES and pad_token_id is not None:
            kwargs["pad_token_id"] = pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(model_path_or_config, transformers.PretrainedConfig):
            model = _from_config(cls, model_path_or_config, kwargs)
        else:
            model = _from_path(cls, model_path_or_config, kwargs, family)
    return model.eval()


def _from_config(
    cls: type, config: transformers.PretrainedConfig, kwargs: Mapping[str, object]
) -> torch.nn.Module:
    config = copy.deepcopy(config)
    for key, value in kwargs.items():
        setattr(config, key, value)
    if cls is transformers.AutoModelForSequenceClassification:
        return cls.from_config(config)
    return cls(config)


def _from_path(
    cls: type, path: str | os.PathLike[str], kwargs: Mapping[str, object], family: str
) -> torch.nn.Module:
    try:
        return cls.from_pretrained(path, **kwargs)
    except OSError as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LadderError(
            f"cannot load a {family} model from {str(path)!r} ({first_line}); "
            "allowed: a local model folder or a PretrainedConfig"
        ) from err
