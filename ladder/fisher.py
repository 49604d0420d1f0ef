"""The empirical Fisher importance of a backbone's parameters (LST_REFERENCE §4).

The sum over training examples of squared per-example gradients of the task loss, in eval mode,
as the authors' ``compute_fisher`` does at batch size 1. Two paths give the same sums (within
float rounding): a batched one that records each example's gradient from one backward over a
padded batch, and the one-example loop it falls back to where batching cannot be proven exact.
Structural pruning (``ladder.pruning``) turns these importances into side-network weights.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ladder.errors import LadderError

FISHER_TOKEN_BUDGET = 4096  # padded tokens per batch of the batched Fisher pass


def compute_fisher(
    model: torch.nn.Module,
    batches: Iterable[dict[str, Tensor]],
    num_samples: int,
    *,
    batched: bool = True,
    token_budget: int = FISHER_TOKEN_BUDGET,
) -> dict[str, Tensor]:
    """Empirical Fisher: the sum over examples of squared per-example gradients, per parameter.

    Mirrors the reference's ``compute_fisher``: batches of one example each, ``model(**batch).loss``
    backpropagated, ``grad**2`` accumulated for every parameter, the first ``num_samples`` batches
    only (fewer if ``batches`` runs out first). The model runs in eval mode, as in the reference, so
    dropout does not add noise to the scores. ``requires_grad``, existing ``.grad`` and the
    train/eval mode are restored afterwards so the caller's model is left as it was.

    Two things keep it fast without changing a bit of the result (see :class:`_SparseTables`):
    embedding tables that only their own ``nn.Embedding`` reads get sparse gradients, so only the
    rows an example looks up are squared and added (every other row of its gradient is exactly
    zero); and squares go through one reused buffer instead of a new tensor per parameter.

    By default (``batched``) the examples are padded into length-sorted batches of at most
    ``token_budget`` padded tokens and the same per-example squares are summed from one batched
    forward and backward (:class:`_PerExampleSquares`): equal to the loop up to float rounding, as
    the order of the sums differs. Models or batches it cannot handle fall back to the loop:
    sequence labels (T5's decoder targets: the batch loss is a mean over all target tokens, not
    over examples), fields other than ``input_ids``/``attention_mask``/``token_type_ids``/
    ``labels``, a model without an ``attention_mask`` argument, a parameter used outside ``F.linear``/``F.embedding``/``F.layer_norm`` (T5's
    ``T5LayerNorm``), a weight shared by a lookup and a projection (tied ``lm_head``), sparse or
    max-norm tables, and lookups without a batch dimension (T5's relative attention bias).

    Returns parameter name (as in ``model.named_parameters()``) -> float32 tensor of its shape.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise LadderError(f"num_samples={num_samples!r} for the Fisher pass; allowed: an int >= 1")
    params = dict(model.named_parameters())
    if not params:
        raise LadderError("the Fisher model has no parameters; allowed: a model with parameters")
    device = next(iter(params.values())).device
    fisher = {
        name: torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        for name, p in params.items()
    }
    saved_requires_grad = {name: p.requires_grad for name, p in params.items()}
    saved_grads = {name: p.grad for name, p in params.items()}
    was_training = model.training
    model.eval()
    tables: _SparseTables | None = None
    try:
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        examples = list(itertools.islice(batches, num_samples))
        if not examples:
            raise LadderError("no batches for the Fisher pass; allowed: at least one example")
        if batched and _batched_fisher(model, examples, params, fisher, token_budget):
            return fisher
        tables = _SparseTables(model)
        squares = _Squares()
        for batch in examples:
            _example_backward(model, batch, device, tables, params.values())
            for name, p in params.items():
                grad, p.grad = p.grad, None
                if grad is None:  # the parameter is not on the loss path (e.g. pooler)
                    continue
                if grad.is_sparse:
                    _add_sparse_square(fisher[name], grad)
                else:
                    fisher[name].add_(squares(grad))
    finally:
        if tables is not None:
            tables.restore()
        for name, p in params.items():
            p.requires_grad_(saved_requires_grad[name])
            p.grad = saved_grads[name]
        model.train(was_training)
    return fisher


# --------------------------------------------------------------------------- batched Fisher

_BATCH_FIELDS = frozenset({"input_ids", "attention_mask", "token_type_ids", "labels"})
_F = torch.nn.functional


class _Unbatchable(Exception):
    """The batched Fisher pass cannot reproduce the loop for this model; the loop runs instead."""


def _batched_fisher(
    model: torch.nn.Module,
    examples: Sequence[Mapping[str, Tensor]],
    params: Mapping[str, torch.nn.Parameter],
    fisher: dict[str, Tensor],
    token_budget: int,
) -> bool:
    """Add the per-example squared gradients of ``examples`` into ``fisher`` batch by batch.

    Returns False, with ``fisher`` left at zero, where the model or the examples are not supported
    (see :func:`compute_fisher`); the caller then runs the loop. Examples are sorted by length and
    padded at the end; each example's positions past its own length are left out of every sum, and
    the attention mask keeps them from touching the others. The batch loss (the mean of the
    examples' losses) times the batch size is backpropagated once: its gradient with respect to
    each example's activations is that example's own.
    """
    lengths = _example_lengths(examples)
    if (
        lengths is None
        or "attention_mask" not in inspect.signature(model.forward).parameters
        or any(isinstance(m, torch.nn.Embedding) and m.sparse for m in model.modules())
    ):
        return False
    device = next(iter(params.values())).device
    pad_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    order = sorted(range(len(examples)), key=lengths.__getitem__)
    ids = {id(p): p for p in params.values()}
    acc = {id(p): fisher[name] for name, p in params.items()}
    for p in params.values():
        p.requires_grad_(False)
    try:
        start = 0
        for size in _length_groups([lengths[i] for i in order], token_budget):
            chosen = order[start : start + size]
            start += size
            lens = [lengths[i] for i in chosen]
            batch = _collate([examples[i] for i in chosen], lens, pad_id, device)
            with _PerExampleGrads(ids, lens) as recorder:
                loss = getattr(model(**batch), "loss", None)
            if loss is None:
                raise LadderError(
                    "the model returned no loss for a Fisher batch; allowed: batches with labels"
                )
            (loss * len(chosen)).backward()
            recorder.add_squares(acc)
    except _Unbatchable:
        for f in fisher.values():
            f.zero_()
        return False
    finally:
        for p in params.values():
            p.requires_grad_(True)
    return True


def _example_lengths(examples: Sequence[Mapping[str, Tensor]]) -> list[int] | None:
    """Each example's token count, or None if some example is not one padded-batchable row."""
    lengths = []
    for ex in examples:
        ids = ex.get("input_ids")
        if not set(ex) <= _BATCH_FIELDS or not isinstance(ids, Tensor) or ids.dim() != 2:
            return None
        n = ids.shape[1]
        for key, value in ex.items():
            if not isinstance(value, Tensor) or value.shape[0] != 1:
                return None
            if key == "labels":
                if value.numel() != 1:  # sequence labels: the loss is a mean over tokens
                    return None
            elif value.shape != ids.shape:
                return None
        if n < 1:
            return None
        lengths.append(n)
    return lengths


def _length_groups(lengths: Sequence[int], token_budget: int) -> list[int]:
    """Sizes of consecutive groups of ascending ``lengths`` with size x longest <= budget.

    A group never has as many examples as its padded length: a per-example lookup is told from a
    shared one (a [T, T] relative-position table) by its first dimension being the batch size.
    """
    sizes: list[int] = []
    size = 0
    for n in lengths:
        if size and ((size + 1) * n > token_budget or size + 1 == n):
            sizes.append(size)
            size = 0
        size += 1
    if size:
        sizes.append(size)
    return sizes


def _collate(
    examples: Sequence[Mapping[str, Tensor]],
    lengths: Sequence[int],
    pad_id: int,
    device: torch.device,
) -> dict[str, Tensor]:
    """One padded batch: ids padded with ``pad_id``, masks and token types with 0."""
    width = max(lengths)
    keys = set().union(*examples) | {"attention_mask"}
    out: dict[str, Tensor] = {}
    for key in sorted(keys):
        if key == "labels":
            out[key] = torch.cat([ex[key].reshape(1) for ex in examples]).to(device)
            continue
        rows = []
        for ex, n in zip(examples, lengths, strict=True):
            value = ex.get(key)
            if value is None:  # no attention mask: every token is attended
                value = torch.ones_like(ex["input_ids"])
            fill = pad_id if key == "input_ids" else 0
            rows.append(_F.pad(value.to(device), (0, width - n), value=fill))
        out[key] = torch.cat(rows)
    return out


@dataclass
class _Call:
    """One use of a parameter in the forward: its kind, inputs, and its output's gradient."""

    kind: str  # "linear", "embedding", "norm"
    x: Tensor  # the input (embedding: the looked-up indices)
    weight: int | None
    bias: int | None
    extra: tuple = ()
    grad: Tensor | None = None


class _PerExampleGrads(torch.overrides.TorchFunctionMode):
    """Records ``F.linear``/``F.embedding``/``F.layer_norm`` calls on the model's parameters.

    Each call keeps its input; its output gets a hook that keeps the output's gradient. From both,
    :meth:`add_squares` forms every example's gradient of each parameter (a projection's weight as
    ``g_b^T x_b`` over the example's own positions, a table's rows from the lookups, a norm's
    affine from the normalised input), sums it over the calls sharing the parameter, squares it and
    adds it up. Any other use of a parameter raises :class:`_Unbatchable`.
    """

    def __init__(self, params: Mapping[int, Tensor], lengths: Sequence[int]) -> None:
        super().__init__()
        self.params = params
        self.lengths = list(lengths)
        self.batch = len(lengths)
        self.width = max(lengths)
        self.calls: list[_Call] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is _F.linear:
            return self._linear(*args, **kwargs)
        if func is _F.embedding:
            return self._embedding(*args, **kwargs)
        if func is _F.layer_norm:
            return self._layer_norm(*args, **kwargs)
        if getattr(func, "__name__", "") != "__get__" and _uses(self.params, (args, kwargs)):
            raise _Unbatchable(f"a parameter is used by {getattr(func, '__name__', func)}")
        return func(*args, **kwargs)

    def _tracked(self, t: Tensor | None) -> int | None:
        return id(t) if t is not None and id(t) in self.params else None

    def _watch(self, out: Tensor, call: _Call) -> Tensor:
        if call.weight is None and call.bias is None:
            return out
        if not out.requires_grad:
            out = out.detach().requires_grad_()

        def keep(g: Tensor) -> None:
            call.grad = g.detach()

        out.register_hook(keep)
        self.calls.append(call)
        return out

    def _batched(self, t: Tensor) -> None:
        if t.dim() < 2 or t.shape[0] != self.batch:
            raise _Unbatchable(f"an input of shape {tuple(t.shape)} has no batch dimension")

    def _linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        out = _F.linear(x, weight, bias)
        call = _Call("linear", x.detach(), self._tracked(weight), self._tracked(bias))
        if call.weight is not None or call.bias is not None:
            self._batched(x)
        return self._watch(out, call)

    def _embedding(
        self,
        idx: Tensor,
        weight: Tensor,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
    ) -> Tensor:
        args = (padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
        out = _F.embedding(idx, weight, *args)
        tracked = self._tracked(weight)
        if tracked is None:
            return out
        if max_norm is not None or scale_grad_by_freq or sparse:
            raise _Unbatchable("a table with max_norm, scale_grad_by_freq or sparse")
        if idx.dim() >= 1 and idx.shape[0] == 1 and self.batch > 1:  # shared positions: expand
            idx = idx.expand(self.batch, *idx.shape[1:])
            out = out.expand(self.batch, *out.shape[1:]).contiguous()
        self._batched(idx)
        return self._watch(out, _Call("embedding", idx.detach(), tracked, None, (padding_idx,)))

    def _layer_norm(
        self,
        x: Tensor,
        shape: Sequence[int],
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        eps: float = 1e-5,
    ) -> Tensor:
        out = _F.layer_norm(x, shape, weight, bias, eps)
        call = _Call("norm", x.detach(), self._tracked(weight), self._tracked(bias), (shape, eps))
        if call.weight is not None or call.bias is not None:
            self._batched(x)
        return self._watch(out, call)

    def _valid(self, t: Tensor, features: int = 1) -> Tensor | None:
        """[B, T] mask of each example's own positions if ``t`` is [B, T_padded, ...], else None.

        ``features`` is the number of trailing feature dimensions (0 for looked-up indices).
        """
        if t.dim() < 2 + features or t.shape[1] != self.width:
            return None
        lengths = torch.tensor(self.lengths, device=t.device)
        return torch.arange(self.width, device=t.device) < lengths[:, None]

    def add_squares(self, acc: Mapping[int, Tensor]) -> None:
        """Add every example's squared gradient of each recorded parameter into ``acc``."""
        roles: dict[int, list[tuple[str, _Call]]] = {}
        for call in self.calls:
            if call.grad is None:  # not on the loss path
                continue
            for role, pid in (("weight", call.weight), ("bias", call.bias)):
                if pid is not None:
                    roles.setdefault(pid, []).append((role, call))
        for pid, uses in roles.items():
            kinds = {(role, call.kind) for role, call in uses}
            if len(kinds) != 1:
                raise _Unbatchable(f"a parameter is used as {sorted(kinds)}")
            role, kind = kinds.pop()
            calls = [call for _, call in uses]
            if kind == "embedding":
                self._add_rows(acc[pid], calls)
            elif kind == "linear" and role == "weight":
                self._add_projection(acc[pid], calls)
            else:
                per_example = sum(self._small(call, role) for call in calls)
                acc[pid].add_(per_example.mul_(per_example).sum(0))

    def _tokens(self, call: _Call, t: Tensor) -> list[Tensor]:
        """``t`` [B, ..., f] as one [n_b, f] matrix of each example's own positions."""
        valid = self._valid(call.x)
        rows = t.reshape(self.batch, -1, t.shape[-1]) if valid is None else t
        out = []
        for b in range(self.batch):
            r = rows[b] if valid is None else rows[b, : self.lengths[b]]
            out.append(r.reshape(-1, t.shape[-1]).float())
        return out

    def _add_projection(self, acc: Tensor, calls: Sequence[_Call]) -> None:
        xs = [self._tokens(c, c.x) for c in calls]
        gs = [self._tokens(c, c.grad) for c in calls]
        for b in range(self.batch):
            gw = gs[0][b].t() @ xs[0][b]
            for k in range(1, len(calls)):
                gw.addmm_(gs[k][b].t(), xs[k][b])
            acc.addcmul_(gw, gw)

    def _small(self, call: _Call, role: str) -> Tensor:
        """[B, *shape] per-example gradient of a linear bias or a norm's weight or bias."""
        g = call.grad.float()
        if call.kind == "norm" and role == "weight":
            shape, eps = call.extra
            g = g * _F.layer_norm(call.x.float(), shape, None, None, eps)
        n = 1 if call.kind == "linear" else len(call.extra[0])
        valid = self._valid(call.x)
        if valid is not None:
            g = g * valid.reshape(*valid.shape, *[1] * (g.dim() - 2)).to(g.dtype)
        return g.reshape(self.batch, -1, *g.shape[g.dim() - n :]).sum(1)

    def _add_rows(self, acc: Tensor, calls: Sequence[_Call]) -> None:
        """Rows of a table: an example's lookups of one row are summed before squaring."""
        keys, values = [], []
        for call in calls:
            idx, g = call.x, call.grad
            keep = torch.ones(idx.shape, dtype=torch.bool, device=idx.device)
            valid = self._valid(idx, 0)
            if valid is not None:
                keep &= valid.reshape(*valid.shape, *[1] * (idx.dim() - 2))
            if call.extra[0] is not None:
                keep &= idx != call.extra[0]  # the padding row gets no gradient
            example = torch.arange(self.batch, device=idx.device).reshape(
                -1, *[1] * (idx.dim() - 1)
            )
            keys.append((example * acc.shape[0] + idx).expand_as(idx)[keep])
            values.append(g.reshape(*idx.shape, -1)[keep])
        key, value = torch.cat(keys), torch.cat(values)
        unique, inverse = torch.unique(key, return_inverse=True)
        summed = value.new_zeros((unique.numel(), value.shape[1])).index_add_(0, inverse, value)
        summed = summed.float()
        acc.index_add_(0, unique % acc.shape[0], summed.mul_(summed).view(-1, *acc.shape[1:]))


def _uses(params: Mapping[int, Tensor], tree: object) -> bool:
    """Whether ``tree`` (nested tuples, lists, dicts) holds one of ``params``."""
    if isinstance(tree, Tensor):
        return id(tree) in params
    if isinstance(tree, (tuple, list)):
        return any(_uses(params, t) for t in tree)
    if isinstance(tree, dict):
        return any(_uses(params, t) for t in tree.values())
    return False


class _SparseTables:
    """Sparse gradients for the embedding tables of a model during the Fisher pass.

    A table qualifies when its weight belongs to that one ``nn.Embedding`` only (not tied to an
    ``lm_head`` or shared by several lookups, as T5's and BART's ``shared``), lives on the CPU and
    has no ``max_norm`` or ``scale_grad_by_freq``. Its gradient then comes back as the looked-up
    rows in lookup order, which :func:`_add_sparse_square` sums exactly as the dense CPU backward
    does. (On a GPU the dense gradient is cheap, and ``index_add_`` there is not deterministic.)

    Two uses would change the rounding of that sum, so a table seen in one is switched back to
    dense and the example redone: a second lookup in one forward (checked by a hook before the
    backward) and a use outside the module, which turns its gradient dense (checked after it).
    ``restore`` puts back every table's ``sparse`` flag and removes the hooks.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        owners: dict[int, int] = {}
        for _, module in model.named_modules(remove_duplicate=False):
            for p in module._parameters.values():
                if p is not None:
                    owners[id(p)] = owners.get(id(p), 0) + 1
        self.tables = [
            m
            for m in model.modules()
            if isinstance(m, torch.nn.Embedding)
            and not m.sparse
            and m.max_norm is None
            and not m.scale_grad_by_freq
            and m.weight.device.type == "cpu"
            and owners[id(m.weight)] == 1
        ]
        self.calls = dict.fromkeys(self.tables, 0)
        self.hooks = [m.register_forward_hook(self._count) for m in self.tables]
        for m in self.tables:
            m.sparse = True

    def _count(self, module: torch.nn.Module, args: object, output: object) -> None:
        if module in self.calls:
            self.calls[module] += 1

    def start(self) -> None:
        """Reset the lookup counts before a forward."""
        for m in self.calls:
            self.calls[m] = 0

    def drop_reused(self) -> bool:
        """Switch tables looked up more than once since ``start`` to dense; True if any."""
        return self._drop([m for m, n in self.calls.items() if n > 1])

    def drop_mixed(self) -> bool:
        """Switch tables whose gradient came back dense to dense; True if any."""
        return self._drop(
            [m for m in self.calls if m.weight.grad is not None and not m.weight.grad.is_sparse]
        )

    def _drop(self, modules: list[torch.nn.Module]) -> bool:
        for m in modules:
            m.sparse = False
            del self.calls[m]
        return bool(modules)

    def restore(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for m in self.tables:
            m.sparse = False


def _example_backward(
    model: torch.nn.Module,
    batch: Mapping[str, Tensor],
    device: torch.device,
    tables: _SparseTables,
    params: Iterable[torch.nn.Parameter],
) -> None:
    """Forward and backward of one example into ``.grad``; redone if a sparse table must go dense."""
    while True:
        tables.start()
        loss = _example_loss(model, batch, device)
        if tables.drop_reused():
            continue
        loss.backward()
        if not tables.drop_mixed():
            return
        for p in params:
            p.grad = None


class _Squares:
    """``grad**2`` in float32 into one reused buffer (valid until the next call)."""

    def __init__(self) -> None:
        self.buffer: Tensor | None = None

    def __call__(self, grad: Tensor) -> Tensor:
        grad = grad.detach().float()
        buf = self.buffer
        if buf is None or buf.numel() < grad.numel() or buf.device != grad.device:
            buf = self.buffer = torch.empty(grad.numel(), dtype=torch.float32, device=grad.device)
        return torch.mul(grad, grad, out=buf[: grad.numel()].view(grad.shape))


def _add_sparse_square(acc: Tensor, grad: Tensor) -> None:
    """``acc += grad**2`` for a sparse embedding gradient, bit for bit as with its dense form.

    The dense backward adds the looked-up rows into zeros one by one in lookup order (skipping the
    padding index, which the sparse one drops too); ``index_add_`` sums duplicates in that same
    order, in the gradient's own dtype. Rows never looked up stay untouched: their square is 0.
    """
    idx = grad._indices()[0]  # uncoalesced: lookup order
    values = grad._values().detach()
    rows, inverse = torch.unique(idx, return_inverse=True)
    summed = values.new_zeros((rows.numel(), *values.shape[1:])).index_add_(0, inverse, values)
    summed = summed.float()
    acc.index_add_(0, rows, summed.mul_(summed))


def _example_loss(
    model: torch.nn.Module, batch: Mapping[str, Tensor], device: torch.device
) -> Tensor:
    """Loss of one example; a batch of several would square the mean gradient, not sum squares."""
    inputs = {}
    for key, value in batch.items():
        if isinstance(value, Tensor):
            if value.dim() > 0 and value.shape[0] != 1:
                raise LadderError(
                    f"Fisher batch field {key!r} has batch size {value.shape[0]}; allowed: 1"
                )
            value = value.to(device)
        inputs[key] = value
    loss = getattr(model(**inputs), "loss", None)
    if loss is None:
        raise LadderError(
            "the model returned no loss for a Fisher batch; allowed: batches with labels"
        )
    return loss
