"""The layer-to-layer Jacobian as a matrix-free linear operator.

Add a vector v (``d_model``) to the source activation ``blocks.{s}.{source_site}`` at
every token position and read the target activation ``blocks.{t}.{target_site}`` at the
last ``target_positions`` tokens of each prompt. The Jacobian at v = 0,

    J = ∂ target / ∂ v,        shape (batch · target_positions · d_model) × d_model,

stacks the prompts' Jacobians Jᵢ, so JᵀJ = Σᵢ JᵢᵀJᵢ. ``rmatvec`` is a reverse-mode
product (``torch.func.vjp``, whose pullback u ↦ Jᵀu is built once and reused, vmapped
over a block of vectors). ``matvec`` computes J V in one of two exact ways:

* ``jvp_method="forward"``: forward-mode AD, ``torch.func.jvp`` vmapped over the block;
* ``jvp_method="reverse"`` (default): the pullback is linear in u, so its own VJP is
  u' ↦ J u'. This reverse-over-reverse product reuses the cached graph and, on CPU with
  PyTorch 2.13, costs about half of the forward-mode one (``benchmarks/bench_products.py``).

``RecordedPass`` records one forward pass with its own vector at each of several source
hooks and applies J of any of its (source, target) pairs by autograd on that record, with no
further forward pass: for many pairs of one prompt (the atlas), where a bridge's forward pass,
mostly Python, would otherwise cost more than the products of a short pair.

Blocks wider than ``chunk_size`` are split (by default evenly, into blocks of about
``TOKEN_ROWS_PER_CHUNK`` token rows, see ``default_chunk_size``). ``dense()`` forms J from
products with the identity, for tests and small models. Left vectors (length ``n_out``) are
ordered as ``[prompt, position, d_model]`` flattened.

>>> import torch
>>> from transformer_lens.config import TransformerBridgeConfig
>>> from transformer_lens.model_bridge import TransformerBridge
>>> from tl_powersteer import LayerJacobian
>>> cfg = TransformerBridgeConfig(d_model=8, d_head=4, n_heads=2, n_layers=3, n_ctx=16,
...                               d_vocab=20, d_mlp=16, act_fn="gelu", seed=0)
>>> model = TransformerBridge.boot_native(cfg, dtype=torch.float64)
>>> op = LayerJacobian(model, torch.tensor([[1, 2, 3, 4, 5]]), source=0, target=2, target_positions=2)
>>> op.shape
(16, 8)
>>> V = torch.randn(8, 3, dtype=torch.float64)
>>> torch.allclose(op.matvec(V), op.dense() @ V)
True
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from torch.func import jvp, vjp, vmap
from torch.utils._python_dispatch import TorchDispatchMode

from .adapters import Model, ModelAdapter, Prompts, TokenBatch
from .checks import is_int, plain_ints, renamed_options

__all__ = [
    "JVP_METHODS",
    "ActivationsWithKnownDerivatives",
    "RoundedMatrixProducts",
    "LayerJacobian",
    "RecordedJacobian",
    "CheckedPair",
    "RecordedPass",
    "check_chunk_size",
    "check_matmul_dtype",
    "check_pair",
    "cpu_multiplies_bfloat16",
    "default_chunk_size",
]

# Former option names that still work for one release.
RENAMED = {"positions": "target_positions"}

JVP_METHODS = ("reverse", "forward")
# A vmapped product over c columns runs the model on c x batch x seq token rows; on a CPU it
# is fastest while their intermediates stay in cache (measured: docs/concepts/jacobian.md).
TOKEN_ROWS_PER_CHUNK = 1024


def default_chunk_size(token_rows: int) -> int:
    """Columns per vmapped product for prompts of ``token_rows`` = batch x seq tokens."""
    return max(1, TOKEN_ROWS_PER_CHUNK // max(1, token_rows))


def check_chunk_size(chunk_size: Any) -> None:
    if chunk_size is None:
        return
    if not is_int(chunk_size) or chunk_size < 1:
        raise ValueError(
            f"chunk_size must be a positive int (or None for the default), got {chunk_size!r}"
        )


def _float_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    # Listed once per recorded graph: walking a bridge's modules takes about 10 ms.
    return [p for p in model.parameters() if p.is_floating_point()]


@contextmanager
def _weights_marked_for_grad(weights: list[torch.nn.Parameter]) -> Iterator[None]:
    """Frozen weights (of ``_float_weights``) marked as requiring grad for the block, then
    restored, exceptions included.

    With frozen weights, PyTorch 2.13's vmap of the second backward of a linear layer falls
    back to one matmul per column; marked, the whole block is one GEMM (reverse-over-reverse
    products 30-45% faster on Gemma 3 270M and on random GPT-2s, same values). Products
    run under ``no_grad``, so no gradient ever reaches the weights.
    """
    frozen = [p for p in weights if not p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(True)
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


class _KnownDerivative(torch.autograd.Function):
    """y = f(x) for an elementwise f whose derivative f'(x) is computed in the forward pass.
    The backward, g ↦ g f'(x), is linear in g: differentiated again (the reverse-over-reverse
    product) it is the same multiplication."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, f: Callable[[Tensor], Tensor], df: Callable[[Tensor], Tensor]
    ) -> Tensor:
        ctx.save_for_backward(df(x))
        return f(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (derivative,) = ctx.saved_tensors
        return grad * derivative, None, None


# Elementwise activations recorded as ``_KnownDerivative``: f ↦ (the keyword options it may
# take, f'(x) for those options). Calls with anything else run as they are.
_DERIVATIVES: dict[Any, tuple[frozenset[str], Callable[..., Tensor]]] = {
    torch.nn.functional.gelu: (
        frozenset({"approximate"}),
        lambda x, approximate="none": torch.ops.aten.gelu_backward(
            torch.ones_like(x), x, approximate=approximate
        ),
    ),
    torch.nn.functional.silu: (
        frozenset({"inplace"}),
        lambda x, inplace=False: torch.ops.aten.silu_backward(torch.ones_like(x), x),
    ),
    torch.tanh: (frozenset(), lambda x: 1 - torch.tanh(x) ** 2),
}


class ActivationsWithKnownDerivatives(torch.overrides.TorchFunctionMode):
    """Records GELU, SiLU and tanh as ``_KnownDerivative``s, for a graph of first-order
    products.

    Their own backward recomputes f'(x) (tanh, sigmoid) for every vector of a block: a
    vmapped product then evaluates the same derivative once per column (PyTorch 2.13's
    batched gradients have no batching rule for ``gelu_backward`` and loop over columns).
    Computed once, it leaves one multiplication per product: on Gemma 3 270M, blocks of 48
    products 5% to 15% faster, the exact atlas about 3%, same values. Only first
    derivatives stay exact: f'(x) is a constant of the record, so a second derivative in x
    would miss f''.
    """

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        known = _DERIVATIVES.get(func)
        x = args[0] if len(args) == 1 else None
        if (
            known is not None
            and isinstance(x, Tensor)
            and x.requires_grad
            and x.is_floating_point()
            and set(kwargs) <= known[0]
            and not kwargs.get("inplace", False)
        ):
            derivative = known[1]
            return _KnownDerivative.apply(
                x, lambda x: func(x, **kwargs), lambda x: derivative(x, **kwargs)
            )
        return func(*args, **kwargs)


_aten = torch.ops.aten
_MATRIX_PRODUCTS = {
    _aten.mm.default: _aten.mm.default,
    _aten.bmm.default: _aten.bmm.default,
    _aten.addmm.default: _aten.mm.default,
    _aten.baddbmm.default: _aten.bmm.default,
}


class RoundedMatrixProducts(TorchDispatchMode):
    """Runs every matrix product of two ``dtype`` tensors with both factors rounded to
    ``low`` (bfloat16): the backends accumulate in float32 and round the product to ``low``,
    which comes back as ``dtype``. Everything else (the elementwise work, the norms, the
    softmax) keeps ``dtype``.

    Entered around a recorded graph's backward passes, it reaches the products autograd
    runs there (the linear layers' and the attention's), whichever model class made them.
    """

    def __init__(self, dtype: torch.dtype, low: torch.dtype):
        super().__init__()
        self.dtype, self.low = dtype, low

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        product = _MATRIX_PRODUCTS.get(func)
        if product is not None:
            *added, a, b = args
            if a.dtype == b.dtype == self.dtype:
                out = product(a.to(self.low), b.to(self.low)).to(self.dtype)
                if added:  # addmm and baddbmm: beta * added + alpha * a @ b
                    alpha, beta = kwargs.get("alpha", 1), kwargs.get("beta", 1)
                    out = out * alpha if alpha != 1 else out
                    out = out + beta * added[0] if beta != 0 else out
                return out
        return func(*args, **kwargs)


def cpu_multiplies_bfloat16() -> bool:
    """Whether this machine's CPU multiplies bfloat16 matrices in hardware (AVX512-BF16 or
    AMX): there bfloat16 GEMMs run 2.2x to 2.6x as fast as float32 (measured on the MLP
    shapes of Gemma 3 270M, two cores of an AMD EPYC with AVX512-BF16)."""
    # PyTorch's own CPU feature checks (private; absent in some builds).
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def check_matmul_dtype(matmul_dtype: Any, model_dtype: torch.dtype, what: str) -> None:
    """``matmul_dtype`` must be None, bfloat16, or the model's own dtype."""
    if matmul_dtype is None:
        return
    choices = f"None, torch.bfloat16 or the model's {model_dtype}"
    if not isinstance(matmul_dtype, torch.dtype):
        raise TypeError(f"{what} must be {choices}, got {type(matmul_dtype).__name__}")
    if matmul_dtype not in (torch.bfloat16, model_dtype):
        raise ValueError(f"{what} must be {choices}, got {matmul_dtype}")


def _check_order(adapter: ModelAdapter, sources: list[int], targets: list[int]) -> None:
    if min(targets) <= max(sources):
        shown = f"source={max(sources)}, target={min(targets)}"
        raise ValueError(
            f"the target layer must come after the source layer, got {shown}; "
            f"choose target in {max(sources) + 1}..{adapter.n_layers - 1}"
        )


@dataclass
class _Readout:
    """Tokenized prompts, and where the target is read: ``act[rows, last]``."""

    batch: TokenBatch
    rows: Tensor
    last: Tensor
    chunk_size: int
    default_chunks: bool

    def read(self, act: Float[Tensor, "batch seq d_model"]) -> Float[Tensor, " n_out"]:
        """The read positions of a target activation, flattened ``[prompt, position, d]``."""
        return act[self.rows, self.last].reshape(-1)


def _readout_positions(
    adapter: ModelAdapter, prompts: Prompts | TokenBatch, target_positions: Any, chunk_size: Any
) -> _Readout:
    n = target_positions
    if not is_int(n):
        raise TypeError(f"target_positions must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"target_positions must be at least 1, got {n}")
    check_chunk_size(chunk_size)
    batch = adapter.tokenize(prompts)
    shortest = int(batch.lengths.min())
    if n > shortest:
        raise ValueError(
            f"target_positions={n} is longer than the shortest prompt "
            f"({shortest} tokens); use target_positions <= {shortest} or longer prompts"
        )
    last = batch.lengths[:, None] - n + torch.arange(n, device=adapter.device)
    rows = torch.arange(last.shape[0], device=adapter.device)[:, None]
    chunk = default_chunk_size(batch.tokens.numel()) if chunk_size is None else chunk_size
    return _Readout(batch, rows, last, chunk, chunk_size is None)


@dataclass
class CheckedPair:
    """A layer pair's checked arguments: layers, hooks and where the target is read."""

    sources: list[int]
    targets: list[int]
    source_hooks: list[str]
    target_hooks: list[str]
    reading: _Readout


def check_pair(
    adapter: ModelAdapter,
    prompts: Prompts | TokenBatch,
    source: int | Sequence[int],
    target: int | Sequence[int],
    *,
    source_site: str,
    target_site: str,
    target_positions: int,
    jvp_method: str = "reverse",
    chunk_size: int | None = None,
) -> CheckedPair:
    """Every check of ``LayerJacobian``'s arguments, with no forward pass: what the
    methods built on it run first, so that a bad option fails before any work."""
    if jvp_method not in JVP_METHODS:
        raise ValueError(f"jvp_method must be one of {JVP_METHODS}, got {jvp_method!r}")
    sources, targets = (
        adapter.resolve_layers(source, "source"),
        adapter.resolve_layers(target, "target"),
    )
    _check_order(adapter, sources, targets)
    source_hooks = [adapter.hook_name(s, source_site) for s in sources]
    target_hooks = [adapter.hook_name(t, target_site) for t in targets]
    reading = _readout_positions(adapter, prompts, target_positions, chunk_size)
    return CheckedPair(sources, targets, source_hooks, target_hooks, reading)


class _StackedJacobian:
    """What every operator here shares: J has one block of rows per target layer (each
    ``[prompt, position, d_model]`` flattened) and one block of columns per source layer;
    products run ``chunk_size`` columns at a time."""

    def __init__(
        self,
        adapter: ModelAdapter,
        sources: list[int],
        targets: list[int],
        source_hooks: list[str],
        target_hooks: list[str],
        rows_per_target: int,
        chunk_size: int,
        default_chunks: bool = False,
    ):
        self.adapter = adapter
        self.sources, self.targets = sources, targets
        self.source, self.target = min(sources), max(targets)
        self.source_hooks, self.target_hooks = source_hooks, target_hooks
        self.chunk_size = chunk_size
        self._default_chunks = default_chunks
        self._rows_per_target = rows_per_target
        # Rounds the factors of the products' matrix multiplications (RecordedJacobian).
        self._matmul_dtype: torch.dtype | None = None
        self.n_jvp = 0
        self.n_vjp = 0

    def rows(self, target: int) -> slice:
        """The rows of J (and entries of left vectors) that belong to one target layer."""
        if target not in self.targets:
            raise ValueError(f"target {target} is not among this operator's {self.targets}")
        start = self.targets.index(target) * self._rows_per_target
        return slice(start, start + self._rows_per_target)

    def columns(self, source: int) -> slice:
        """The columns of J (and entries of right vectors) that belong to one source layer."""
        if source not in self.sources:
            raise ValueError(f"source {source} is not among this operator's {self.sources}")
        start = self.sources.index(source) * self.adapter.d_model
        return slice(start, start + self.adapter.d_model)

    @property
    def shape(self) -> tuple[int, int]:
        return self._rows_per_target * len(self.targets), len(self.sources) * self.adapter.d_model

    @property
    def dtype(self) -> torch.dtype:
        return self.adapter.dtype

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    def matvec(self, V: Float[Tensor, "d_model b"]) -> Float[Tensor, "n_out b"]:
        """J V for a block of columns, ``chunk_size`` at a time."""
        V2, vector = self._columns(V, self.shape[1], "V")
        out = self._checked(self._matvec(V2), "J @ V")
        self.n_jvp += V2.shape[1]
        return out[:, 0] if vector else out

    def rmatvec(self, U: Float[Tensor, "n_out b"]) -> Float[Tensor, "d_model b"]:
        """Jᵀ U by reverse-mode AD, ``chunk_size`` columns at a time."""
        U2, vector = self._columns(U, self.shape[0], "U")
        out = self._checked(self._rmatvec(U2), "J.T @ U")
        self.n_vjp += U2.shape[1]
        return out[:, 0] if vector else out

    def _matvec(self, V: Tensor) -> Tensor:
        raise NotImplementedError

    def _rmatvec(self, U: Tensor) -> Tensor:
        raise NotImplementedError

    def gram(self, V: Float[Tensor, "d_model b"]) -> Float[Tensor, "d_model b"]:
        """JᵀJ V."""
        return self.rmatvec(self.matvec(V))

    def dense(self) -> Float[Tensor, "n_out d_model"]:
        """The exact Jacobian, from chunked vmapped products with the identity's columns."""
        return self.matvec(torch.eye(self.shape[1], dtype=self.dtype, device=self.device))

    def _columns(self, X: Tensor, rows: int, name: str) -> tuple[Tensor, bool]:
        if not isinstance(X, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(X).__name__}")
        vector = X.ndim == 1
        X2 = X[:, None] if vector else X
        if X2.ndim != 2 or X2.shape[0] != rows:
            raise ValueError(
                f"{name} must have shape [{rows}] or [{rows}, b], got {tuple(X.shape)}"
            )
        return X2.to(self.device, self.dtype), vector

    def _checked(self, out: Tensor, what: str) -> Tensor:
        if not bool(torch.isfinite(out).all()):
            raise ValueError(
                f"non-finite values in {what} between {self.source_hooks} and "
                f"{self.target_hooks}: the model overflows in {self.dtype}; try float32"
            )
        return out

    def _in_chunks(self, product: Callable[[Tensor], Tensor], X: Tensor, out_rows: int) -> Tensor:
        """``product`` (vmapped over rows of its argument) applied to the columns of X,
        at most ``chunk_size`` at a time: memory stays bounded, and on CPU small blocks run
        faster than one large vmapped call (see ``TOKEN_ROWS_PER_CHUNK``).

        The default chunk size is a speed guide, not a bound: X is then split evenly into
        the nearest number of blocks, up to 1.5x as wide, rather than leave a small block
        over (56 columns as one block instead of 48 + 8: one backward pass, not two)."""
        n = X.shape[1]
        if n == 0:
            return X.new_zeros(out_rows, 0)
        if self._default_chunks:
            pieces = max(1, int(n / self.chunk_size + 0.5))
            sizes = [n // pieces + (i < n % pieces) for i in range(pieces)]
        else:
            sizes = [min(self.chunk_size, n - i) for i in range(0, n, self.chunk_size)]
        low = self._matmul_dtype
        rounding = (
            nullcontext() if low in (None, self.dtype) else RoundedMatrixProducts(self.dtype, low)
        )
        with torch.no_grad(), rounding:
            blocks = [product(block.T).T for block in X.split(sizes, dim=1)]
        return torch.cat(blocks, dim=1)


class LayerJacobian(_StackedJacobian):
    """J = ∂ target / ∂ v for a vector v added at a source hook; see the module docstring.

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge`` (never modified), or its
            ``ModelAdapter``.
        prompts: a string, a list of strings, an integer token tensor ``[batch, seq]``, or
            a ``TokenBatch`` already made.
        source: source block index (negative counts from the end); or several, each with
            its own vector: J then has one block of columns per source (see ``columns``).
        target: target block index, after ``source``; or several, whose Jacobians are
            stacked in the order given and captured in one forward pass (see ``rows``).
        source_site: hook suffix inside the source block where v is added.
        target_site: hook suffix inside the target block that is read.
        target_positions: how many final tokens of each prompt are read at the target.
        jvp_method: ``"reverse"`` or ``"forward"``, how ``matvec`` computes J V.
        chunk_size: most columns per vmapped product; larger blocks (``dense`` included)
            are split. ``None``: ``default_chunk_size`` of the prompts' batch x seq, tuned
            for a CPU (blocks then split evenly, up to 1.5x as wide); on a GPU, larger
            chunks run faster while memory allows.
        **renamed: ``positions``, the former name of ``target_positions``.
    """

    @plain_ints
    def __init__(
        self,
        model: Model | ModelAdapter,
        prompts: Prompts | TokenBatch,
        source: int | Sequence[int],
        target: int | Sequence[int],
        *,
        source_site: str = "hook_mlp_out",
        target_site: str = "hook_mlp_out",
        target_positions: int = 4,
        jvp_method: str = "reverse",
        chunk_size: int | None = None,
        **renamed: Any,
    ):
        target_positions = renamed_options("LayerJacobian", renamed, RENAMED).get(
            "target_positions", target_positions
        )
        adapter = ModelAdapter.of(model)
        pair = check_pair(
            adapter, prompts, source, target, source_site=source_site,
            target_site=target_site, target_positions=target_positions,
            jvp_method=jvp_method, chunk_size=chunk_size,
        )  # fmt: skip
        sources, targets, reading = pair.sources, pair.targets, pair.reading
        source_hooks, target_hooks = pair.source_hooks, pair.target_hooks
        self.jvp_method = jvp_method
        self.source_hook = source_hooks[0] if isinstance(source, int) else None
        self.target_hook = target_hooks[0] if isinstance(target, int) else None
        self.source_site, self.target_site = source_site, target_site
        self.batch, self.target_positions = reading.batch, target_positions
        rows_per_target = reading.last.numel() * adapter.d_model
        super().__init__(
            adapter, sources, targets, source_hooks, target_hooks, rows_per_target,
            reading.chunk_size, reading.default_chunks,
        )  # fmt: skip

        run = adapter.segment(self.batch, source_hooks, target_hooks)
        n_sources, d_model = len(sources), adapter.d_model

        def readout(v: Tensor, check: bool = False) -> Tensor:
            acts = run(v.reshape(n_sources, d_model), check)
            return torch.cat([reading.read(act) for act in acts])

        self._readout = readout
        zero = torch.zeros(n_sources * d_model, dtype=adapter.dtype, device=adapter.device)
        self._zero = zero
        with torch.no_grad():
            # One forward pass both validates the activations and builds the pullback
            # that every later rmatvec reuses.
            primal_and_pullback = vjp(lambda v: readout(v, True), zero)
        target_value, self._pullback = primal_and_pullback[0], primal_and_pullback[1]
        self._transpose_pullback: Any = None
        self._weights: list[torch.nn.Parameter] | None = None  # listed on first J V
        self.target_value: Float[Tensor, " n_out"] = target_value.detach()

    def readout(self, v: Float[Tensor, " d_model"]) -> Float[Tensor, " n_out"]:
        """The flattened target activation with ``v`` added at the source: J is its derivative."""
        return self._readout(v)

    def _matvec(self, V: Tensor) -> Tensor:
        if self.jvp_method == "forward":
            return self._in_chunks(vmap(self._forward_product), V, self.shape[0])
        if self._weights is None:
            self._weights = _float_weights(self.adapter.model)
        with _weights_marked_for_grad(self._weights):
            reverse = vmap(self._reverse_product())
            return self._in_chunks(lambda block: reverse(block)[0], V, self.shape[0])

    def _forward_product(self, column: Tensor) -> Tensor:
        return jvp(self._readout, (self._zero,), (column,))[1]

    def _reverse_product(self) -> Any:
        """The pullback of the pullback, u' ↦ J u', built on first use."""
        if self._transpose_pullback is None:
            cotangent = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
            self._transpose_pullback = vjp(lambda u: self._pullback(u)[0], cotangent)[1]
        return self._transpose_pullback

    def _rmatvec(self, U: Tensor) -> Tensor:
        # Reuses the pullback built at construction.
        return self._in_chunks(lambda block: vmap(self._pullback)(block)[0], U, self.shape[1])


def _same_activation(recomputed: Tensor, read: Tensor) -> bool:
    """Whether a recomputed activation is the recorded one, up to rounding (a wrong guess
    at a block's structure differs by far more)."""
    with torch.no_grad():
        scale = float(read.abs().max())
        tol = 256 * torch.finfo(read.dtype).eps * max(scale, 1e-30)
        return recomputed.shape == read.shape and float((recomputed - read).abs().max()) <= tol


class RecordedPass:
    """One recorded forward pass with its own zero vector at every source hook; ``operator``
    applies the Jacobian of any of its (sources, targets) by autograd on that record.

    Products are those of ``LayerJacobian`` (reverse mode, and reverse-over-reverse for
    J V), with no forward pass of their own: a bridge's forward pass is mostly Python
    (about 20 ms per block on Gemma 3 270M, where a short prompt's arithmetic takes well
    under 1 ms), and an atlas that built one ``LayerJacobian`` per pair or per layer spent a
    third of its time there. The record (the activations autograd keeps, as for one
    ``LayerJacobian`` to the last target) lives as long as this object.

    With ``target_site="hook_mlp_out"`` (float32 or float64), the record also holds each
    target block's MLP run again on the read positions alone, from ``hook_resid_mid`` there
    (``ModelAdapter.mlp_out_from_resid_mid``), wherever that reproduces the recorded
    activation. An operator reads its last target there: its products cross that block's
    MLP at ``target_positions`` tokens instead of every token (an earlier target's MLP is crossed
    at every token anyway, on the way to the later ones).

    Args:
        model: a ``HookedTransformer`` or ``TransformerBridge`` (never modified), or its
            ``ModelAdapter``.
        prompts: a string, a list of strings, an integer token tensor ``[batch, seq]``, or
            a ``TokenBatch`` already made.
        sources: source block indices, each with its own vector.
        targets: target block indices; the last must come after every source.
        source_site: hook suffix inside each source block where its vector is added.
        target_site: hook suffix inside each target block that is read.
        target_positions: how many final tokens of each prompt are read at the targets.
        chunk_size: most columns per vmapped product, as for ``LayerJacobian``.
        matmul_dtype: ``torch.bfloat16`` runs the matrix multiplications of every product
            with bfloat16 factors (float32 accumulation; the rest in the model's dtype):
            faster where ``cpu_multiplies_bfloat16``, at a relative error of 0.5% to 1% per
            product (Gemma 3 270M). ``None`` or the model's dtype: full precision.
    """

    @plain_ints
    def __init__(
        self,
        model: Model | ModelAdapter,
        prompts: Prompts | TokenBatch,
        sources: Sequence[int],
        targets: Sequence[int],
        *,
        source_site: str = "hook_mlp_out",
        target_site: str = "hook_mlp_out",
        target_positions: int = 4,
        chunk_size: int | None = None,
        matmul_dtype: torch.dtype | None = None,
        **renamed: Any,
    ):
        target_positions = renamed_options("RecordedPass", renamed, RENAMED).get(
            "target_positions", target_positions
        )
        adapter = ModelAdapter.of(model)
        check_matmul_dtype(matmul_dtype, adapter.dtype, "matmul_dtype")
        self.matmul_dtype = matmul_dtype
        self.sources = adapter.resolve_layers(sources, "sources")
        self.targets = adapter.resolve_layers(targets, "targets")
        _check_order(adapter, self.sources, [max(self.targets)])
        self.source_hooks = {s: adapter.hook_name(s, source_site) for s in self.sources}
        self.target_hooks = {t: adapter.hook_name(t, target_site) for t in self.targets}
        reading = _readout_positions(adapter, prompts, target_positions, chunk_size)
        self.adapter, self.chunk_size = adapter, reading.chunk_size
        self._default_chunks = reading.default_chunks
        self.rows_per_target = reading.last.numel() * adapter.d_model
        # A target's hook_mlp_out at the read positions, recomputed from its hook_resid_mid
        # there (see the class docstring).
        recompute = {}
        if target_site == "hook_mlp_out" and adapter.dtype in (torch.float32, torch.float64):
            found = {t: adapter.mlp_out_from_resid_mid(t) for t in self.targets}
            recompute = {t: f for t, f in found.items() if f is not None}
        mid_hooks = [adapter.hook_name(t, "hook_resid_mid") for t in recompute]
        run = adapter.segment(
            reading.batch,
            list(self.source_hooks.values()),
            list(self.target_hooks.values()) + mid_hooks,
        )
        # Separate leaves, not rows of one tensor: autograd then walks back from a target
        # only to the sources asked for, never through the blocks below them.
        self._vectors = {
            s: torch.zeros(
                adapter.d_model, dtype=adapter.dtype, device=adapter.device, requires_grad=True
            )
            for s in self.sources
        }
        with torch.enable_grad(), ActivationsWithKnownDerivatives():
            acts = run([self._vectors[s] for s in self.sources], True)
            n = len(self.targets)
            reads = zip(self.targets, acts[:n], strict=True)
            self._reads = {t: reading.read(act) for t, act in reads}
            self._short_reads: dict[int, Tensor] = {}
            for (t, mlp_out), mid in zip(recompute.items(), acts[n:], strict=True):
                try:
                    read = mlp_out(mid[reading.rows, reading.last]).reshape(-1)
                except (IndexError, RuntimeError, ValueError):
                    continue  # a hook of the user's inside the block wants every position
                if _same_activation(read, self._reads[t]):
                    self._short_reads[t] = read
        self._weights = _float_weights(adapter.model)

    def operator(
        self, sources: int | Sequence[int], targets: int | Sequence[int]
    ) -> RecordedJacobian:
        """J of these sources (one block of columns each) and targets (one block of rows
        each, in the order given), all among this graph's, every target after every source."""
        return RecordedJacobian(self, sources, targets)


class RecordedJacobian(_StackedJacobian):
    """J of some of a ``RecordedPass``'s sources and targets (``RecordedPass.operator``)."""

    @plain_ints
    def __init__(
        self, graph: RecordedPass, sources: int | Sequence[int], targets: int | Sequence[int]
    ):
        adapter = graph.adapter
        chosen_sources = adapter.resolve_layers(sources, "source")
        chosen_targets = adapter.resolve_layers(targets, "target")
        for chosen, available, what in (
            (chosen_sources, graph.sources, "source"),
            (chosen_targets, graph.targets, "target"),
        ):
            missing = [layer for layer in chosen if layer not in available]
            if missing:
                raise ValueError(
                    f"{what} layers {missing} are not in this graph; choose among {available}"
                )
        _check_order(adapter, chosen_sources, chosen_targets)
        super().__init__(
            adapter, chosen_sources, chosen_targets,
            [graph.source_hooks[s] for s in chosen_sources],
            [graph.target_hooks[t] for t in chosen_targets],
            graph.rows_per_target, graph.chunk_size, graph._default_chunks,
        )  # fmt: skip
        last = max(chosen_targets)
        self._reads = [
            graph._short_reads[t] if t == last and t in graph._short_reads else graph._reads[t]
            for t in chosen_targets
        ]
        self._vectors = [graph._vectors[s] for s in chosen_sources]
        self._transpose: tuple[tuple[Tensor, ...], list[Tensor]] | None = None
        self._weights = graph._weights
        self._matmul_dtype = graph.matmul_dtype

    def _rmatvec(self, U: Tensor) -> Tensor:
        def product(block: Tensor) -> Tensor:
            pieces = [block[:, self.rows(t)] for t in self.targets]
            grads = torch.autograd.grad(
                self._reads, self._vectors, pieces, retain_graph=True, is_grads_batched=True
            )
            return torch.cat(grads, dim=1)

        return self._in_chunks(product, U, self.shape[1])

    def _matvec(self, V: Tensor) -> Tensor:
        # The pullback u ↦ Jᵀu is linear in u, so its own VJP is u' ↦ J u'.
        if self._transpose is None:
            cotangents = [torch.zeros_like(read, requires_grad=True) for read in self._reads]
            with torch.enable_grad():
                pulled = torch.autograd.grad(
                    self._reads, self._vectors, cotangents, retain_graph=True, create_graph=True
                )
            self._transpose = pulled, cotangents
        pulled, cotangents = self._transpose

        def product(block: Tensor) -> Tensor:
            pieces = [block[:, self.columns(s)] for s in self.sources]
            grads = torch.autograd.grad(
                pulled, cotangents, pieces, retain_graph=True, is_grads_batched=True
            )
            return torch.cat(grads, dim=1)

        with _weights_marked_for_grad(self._weights):
            return self._in_chunks(product, V, self.shape[0])


def __getattr__(name: str) -> Any:
    # JacobianGraph was the former name of RecordedPass; it keeps working for one release.
    if name == "JacobianGraph":
        warnings.warn(
            "tl_powersteer.jacobian.JacobianGraph is now RecordedPass (the old name goes in "
            "the next release)",
            DeprecationWarning,
            stacklevel=2,
        )
        return RecordedPass
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
