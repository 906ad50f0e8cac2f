"""The one module that knows TransformerLens internals.

It turns (layer, site) pairs into hook names checked against ``model.hook_dict``, tells
``HookedTransformer`` from ``TransformerBridge``, tokenizes prompts into a right-padded
batch, and runs the model segment from a source hook to a target hook with a vector
added at the source, stopping the forward pass as soon as the target hook has fired.

Right padding keeps several prompts exact: attention is causal, so real tokens never
see the pad tokens that follow them, and a batched run equals the separate runs.

>>> import torch
>>> from transformer_lens.config import TransformerBridgeConfig
>>> from transformer_lens.model_bridge import TransformerBridge
>>> from tl_powersteer.adapters import ModelAdapter
>>> cfg = TransformerBridgeConfig(d_model=8, d_head=4, n_heads=2, n_layers=2, n_ctx=16,
...                               d_vocab=20, d_mlp=16, act_fn="gelu", seed=0)
>>> adapter = ModelAdapter(TransformerBridge.boot_native(cfg))
>>> adapter.hook_name(-1, "hook_resid_post")
'blocks.1.hook_resid_post'
"""

from __future__ import annotations

import difflib
import hashlib
import json
import operator
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from .checks import is_int
from .linalg import streamed_kl

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer
    from transformer_lens.model_bridge import TransformerBridge

__all__ = [
    "Model",
    "ModelAdapter",
    "ModelKind",
    "Prompts",
    "TokenBatch",
    "SteeredRun",
    "activations",
    "boot",
    "decode_token",
    "hook_layer",
    "steered_logits",
    "steered_logits_with_grad",
    "steered_runs",
    "tensor_attributes_kept",
]

Prompts = str | Sequence[str] | Tensor
# The two TransformerLens model classes every public function takes.
Model: TypeAlias = "HookedTransformer | TransformerBridge"
ModelKind = Literal["hooked", "bridge"]


@dataclass(frozen=True)
class TokenBatch:
    """Right-padded tokens; ``mask`` is True on real tokens."""

    tokens: Int[Tensor, "batch seq"]
    lengths: Int[Tensor, " batch"]
    texts: list[str] | None

    @property
    def mask(self) -> Bool[Tensor, "batch seq"]:
        positions = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        return positions[None, :] < self.lengths[:, None]

    def provenance(self) -> dict[str, Any]:
        """What a result records of its prompts: their texts, or (given as a token tensor)
        the tokens, on the CPU."""
        tokens = None if self.texts is not None else self.tokens.cpu()
        return {"prompts": self.texts, "tokens": tokens}


RESIDUAL_SITES = (
    "hook_resid_pre",
    "hook_attn_out",
    "hook_resid_mid",
    "hook_mlp_out",
    "hook_resid_post",
)


class _NotResidual(Exception):
    """Raised inside a hook whose activation is not [batch, seq, d_model]; turned into a
    ValueError outside the forward pass, where another pass can list the usable sites."""

    def __init__(self, hook_name: str, shape: tuple[int, ...]):
        super().__init__(hook_name)
        self.hook_name, self.shape = hook_name, shape


class _StopForward(Exception):
    """Raised by the target hook so that nothing after the target layer runs."""


@contextmanager
def tensor_attributes_kept(model: nn.Module) -> Iterator[None]:
    """Undo tensors that a forward pass caches on modules (e.g. a bridge's last attention
    pattern): under torch.func they are transform wrappers that must not outlive the call,
    and the model must be left as it was."""
    # Plain copies of each module's attributes, compared by identity afterwards: a bridge
    # has well over a thousand modules, and a pass leaves nearly all of them untouched.
    before = [(module, vars(module).copy()) for module in model.modules()]
    try:
        yield
    finally:
        for module, kept in before:
            now = vars(module)
            if now.keys() == kept.keys() and all(map(operator.is_, now.values(), kept.values())):
                continue
            for key, value in list(now.items()):
                if not isinstance(value, Tensor):
                    continue
                if key not in kept:
                    delattr(module, key)
                elif value is not kept[key]:
                    setattr(module, key, kept[key])


def _model_kind(model: Any) -> ModelKind:
    # Only look for classes whose modules are already imported: a model of either class
    # cannot exist otherwise, and importing TransformerLens here would be slow.
    if "transformer_lens" in sys.modules:
        bridge_mod = sys.modules.get("transformer_lens.model_bridge")
        bridge_cls = getattr(bridge_mod, "TransformerBridge", None)
        if bridge_cls is not None and isinstance(model, bridge_cls):
            return "bridge"
        hooked_mod = sys.modules.get("transformer_lens.HookedTransformer")
        hooked_cls = getattr(hooked_mod, "HookedTransformer", None)
        if hooked_cls is not None and isinstance(model, hooked_cls):
            return "hooked"
    raise TypeError(
        "model must be a transformer_lens HookedTransformer or TransformerBridge, got "
        f"{type(model).__module__}.{type(model).__name__}. Load one with "
        "TransformerBridge.boot_transformers(...) or HookedTransformer.from_pretrained(...)."
    )


def _active_dropout(model: nn.Module) -> list[str]:
    """Names of dropout layers (or dropout-configured HF models) that would fire now."""
    found = [
        name or "<root>"
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0
    ]
    # HF attention often applies dropout functionally, gated on the module's training flag
    # and a config rate rather than an nn.Dropout module.
    hf_model = getattr(model, "original_model", None)
    hf_config = getattr(hf_model, "config", None)
    if isinstance(hf_model, nn.Module) and hf_model.training and hf_config is not None:
        for key, value in vars(hf_config).items():
            if "drop" in key and isinstance(value, float) and value > 0:
                found.append(f"config.{key}={value}")
    return found


_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# The configuration fields that fix a model's architecture and that both model classes
# report alike (n_ctx and devices differ between them; the name is recorded on its own).
_ARCHITECTURE_FIELDS = (
    "original_architecture",
    "n_layers",
    "d_model",
    "n_heads",
    "d_head",
    "n_key_value_heads",
    "d_mlp",
    "d_vocab",
    "act_fn",
    "normalization_type",
    "positional_embedding_type",
)


# weights_fingerprint of each live model, with the parameter versions it was hashed at.
_FINGERPRINTS: weakref.WeakKeyDictionary[Any, tuple[tuple[int, ...], str]] = (
    weakref.WeakKeyDictionary()
)


class ModelAdapter:
    """A HookedTransformer or TransformerBridge seen through hook names and token batches."""

    @classmethod
    def of(cls, model: Any) -> ModelAdapter:
        """``model`` itself if it is already an adapter, else a new one: functions that
        take a model take its adapter too, so that a caller builds it once and hands it
        down (each build walks the model's modules)."""
        return model if isinstance(model, cls) else cls(model)

    def __init__(self, model: Any):
        self.kind: ModelKind = _model_kind(model)
        self.model = model
        self._affine_unembed: bool | None = None  # _affine_unembedding, once measured
        # Warnings already given through this adapter, so that one call gives each once.
        self.warned: set[str] = set()
        dropout = _active_dropout(model)
        if dropout:
            raise ValueError(
                "the model is in training mode with active dropout "
                f"({', '.join(dropout[:3])}), which makes Jacobians random. "
                "Call model.eval() first."
            )

    @property
    def n_layers(self) -> int:
        return int(self.model.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.model.cfg.d_model)

    @property
    def name(self) -> str:
        return str(getattr(self.model.cfg, "model_name", None) or type(self.model).__name__)

    @property
    def dtype(self) -> torch.dtype:
        param = next(self.model.parameters(), None)
        return param.dtype if param is not None else torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def resolve_layer(self, layer: int, what: str) -> int:
        """A block index, negative ones counted from the end as in Python."""
        if not is_int(layer):
            several = isinstance(layer, (Sequence, slice)) and not isinstance(layer, str)
            raise TypeError(
                f"{what} must be one int layer index, got {type(layer).__name__}"
                + (f" {layer!r}: this takes one layer; call it once per layer" if several else "")
            )
        n = self.n_layers
        if not -n <= layer < n:
            raise ValueError(
                f"{what}={layer} is out of range for a model with {n} layers: "
                f"use 0..{n - 1} (or -{n}..-1 from the end)"
            )
        return operator.index(layer) % n

    def resolve_pair(self, source: int, target: int) -> tuple[int, int]:
        """One (source, target) pair of block indices, for the methods that take exactly
        one; ``LayerJacobian`` takes lists and would stack their Jacobians."""
        return self.resolve_layer(source, "source"), self.resolve_layer(target, "target")

    def resolve_layers(
        self, layers: int | Sequence[int] | slice, what: str, *, merge_repeats: bool = False
    ) -> list[int]:
        """Block indices from one int, a list, or a slice of ``range(n_layers)``; negative
        ones counted from the end. A repeated layer is refused, or with ``merge_repeats``
        kept once (the list then sorted)."""
        if isinstance(layers, slice):
            chosen = list(range(self.n_layers))[layers]
            if not chosen:
                raise ValueError(
                    f"the {what} range {layers.start}:{layers.stop} selects no layer of the "
                    f"{self.n_layers}"
                )
            return chosen
        if not (is_int(layers) or isinstance(layers, Sequence)) or isinstance(layers, str):
            raise TypeError(
                f"{what} must be an int layer index (or a list of them), got "
                f"{type(layers).__name__}"
            )
        requested: list[Any] = list(layers) if isinstance(layers, Sequence) else [layers]
        if not requested:
            raise ValueError(f"{what} is an empty list: give at least one layer")
        resolved = [self.resolve_layer(layer, what) for layer in requested]
        if merge_repeats:
            return sorted(set(resolved))
        if len(set(resolved)) != len(resolved):
            raise ValueError(f"{what} layers repeat: {resolved}")
        return resolved

    def hook_name(self, layer: int, site: str) -> str:
        """``blocks.{layer}.{site}``, checked against ``model.hook_dict``."""
        if not isinstance(site, str):
            raise TypeError(f"site must be a string such as 'hook_mlp_out', got {site!r}")
        layer = self.resolve_layer(layer, "layer")
        prefix = f"blocks.{layer}."
        name = prefix + site
        hook_dict = self.model.hook_dict
        if name in hook_dict:
            return name
        sites = sorted(n[len(prefix) :] for n in hook_dict if n.startswith(prefix))
        close = difflib.get_close_matches(site, sites, n=5, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        common = [s for s in ("hook_mlp_out", "hook_resid_post", "hook_attn_out") if s in sites]
        raise ValueError(
            f"unknown site {site!r}: the model has no hook {name!r}.{hint} "
            f"Sites are hook suffixes inside a block, e.g. {', '.join(common) or sites[:3]}; "
            f"all {len(sites)} are listed by [n for n in model.hook_dict if n.startswith({prefix!r})]."
        )

    def tokenize(self, prompts: Prompts | TokenBatch) -> TokenBatch:
        """Tokenize one prompt, several, or take a token tensor, into a right-padded batch
        (a batch already made is returned as it is, so that it is made once and handed
        down)."""
        if isinstance(prompts, TokenBatch):
            return prompts
        if isinstance(prompts, Tensor):
            return self._token_tensor(prompts)
        texts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(texts, Sequence) or not all(isinstance(p, str) for p in texts):
            raise TypeError(
                "prompts must be a string, a list of strings, or an integer token tensor "
                f"[batch, seq]; got {type(prompts).__name__}"
            )
        texts = list(texts)
        if not texts:
            raise ValueError("prompts is an empty list: give at least one prompt")
        for i, text in enumerate(texts):
            if not text.strip():
                raise ValueError(f"prompt {i} is empty: every prompt needs some text")
        if getattr(self.model, "tokenizer", None) is None:
            raise ValueError(
                "the model has no tokenizer, so string prompts cannot be tokenized: pass "
                "an integer token tensor [batch, seq] instead"
            )
        rows = [self.prompt_tokens(text) for text in texts]
        n_ctx = int(self.model.cfg.n_ctx)
        for i, row in enumerate(rows):
            if len(row) > n_ctx:
                raise ValueError(
                    f"prompt {i} is {len(row)} tokens long, more than the model's context of "
                    f"n_ctx = {n_ctx} tokens: shorten it"
                )
        lengths = torch.tensor([len(r) for r in rows], device=self.device)
        pad_id = getattr(self.model.tokenizer, "pad_token_id", None) or 0
        tokens = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
        tokens = tokens.to(self.device)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = row
        return TokenBatch(tokens=tokens, lengths=lengths, texts=texts)

    def _token_tensor(self, tokens: Tensor) -> TokenBatch:
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(f"token tensors must hold integer ids, got dtype {tokens.dtype}")
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or tokens.numel() == 0:
            raise ValueError(
                f"token tensors must be non-empty with shape [seq] or [batch, seq], "
                f"got {tuple(tokens.shape)}"
            )
        vocab = int(self.model.cfg.d_vocab)
        if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
            raise ValueError(
                f"token ids must be in 0..{vocab - 1} (the model's vocabulary), got ids from "
                f"{int(tokens.min())} to {int(tokens.max())}"
            )
        self._refuse_padding(tokens)
        tokens = tokens.to(self.device, torch.long)
        lengths = torch.full((tokens.shape[0],), tokens.shape[1], device=self.device)
        return TokenBatch(tokens=tokens, lengths=lengths, texts=None)

    def _refuse_padding(self, tokens: Tensor) -> None:
        """Refuse a token tensor that looks padded: a row that ends with the pad id, or
        starts with it where it is not also the BOS id. Every token of a tensor is read as
        a real one, so pads would shift the positions read and steer the pads."""
        tokenizer = getattr(self.model, "tokenizer", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        if tokenizer is None or pad is None:
            return
        bos = getattr(tokenizer, "bos_token_id", None)
        ends, starts = tokens[:, -1] == pad, tokens[:, 0] == pad
        padded = ends | (starts if pad != bos else torch.zeros_like(starts))
        if bool(padded.any()):
            row = int(padded.nonzero()[0, 0])
            side = "ends" if bool(ends[row]) else "starts"
            raise ValueError(
                f"token row {row} {side} with the pad token id {pad} "
                f"({tokenizer.decode([pad])!r}), so the tensor looks padded, and every token "
                "of a tensor is read as a real one. Pass the prompts as strings (they are "
                "padded and masked for you), or each prompt as its own tensor without pads"
            )

    def mlp_out_from_resid_mid(
        self, layer: int
    ) -> Callable[[Float[Tensor, "... d_model"]], Float[Tensor, "... d_model"]] | None:
        """``f`` that computes block ``layer``'s ``hook_mlp_out`` from its ``hook_resid_mid``,
        token by token: the MLP's norm, the MLP, and the norm after it where the block has
        one (Gemma's). None where the block has no MLP after its attention.

        This is the usual block's structure, not a guarantee: callers compare f's output
        with the real activation before relying on it. Call it with no hooks of this
        adapter active (the model's own ``hook_mlp_out`` fires inside it for a
        ``HookedTransformer``).
        """
        prefix = f"blocks.{layer}."
        if not {prefix + "hook_resid_mid", prefix + "hook_mlp_out"} <= set(self.model.hook_dict):
            return None
        block = self.model.blocks[layer]
        ln2, mlp = getattr(block, "ln2", None), getattr(block, "mlp", None)
        if not isinstance(ln2, nn.Module) or not isinstance(mlp, nn.Module):
            return None
        if self.kind == "hooked":
            apply_mlp = getattr(block, "apply_mlp", None)  # the MLP, ln2_post, hook_mlp_out
            return None if apply_mlp is None else lambda x: apply_mlp(ln2(x))
        post = getattr(block, "ln2_post", None)
        after = post if isinstance(post, nn.Module) else nn.Identity()
        return lambda x: after(mlp(ln2(x)))

    def segment(
        self,
        batch: TokenBatch,
        source_hooks: Sequence[str],
        target_hooks: Sequence[str],
    ) -> Callable[
        [Float[Tensor, "n_sources d_model"] | Sequence[Float[Tensor, " d_model"]], bool],
        list[Float[Tensor, "batch seq d_model"]],
    ]:
        """``f(v, check)``: target activations with ``v[i]`` added at every real position of
        source hook i (``v`` a tensor of rows or a sequence of vectors).

        Returns one activation per target hook, in the order given; the forward pass stops
        as soon as the last of them has fired. With ``check`` true, the source and target
        activations are checked for NaN/inf on real tokens (only outside ``vmap``, where
        the check cannot branch on data).
        """
        model, tokens = self.model, batch.tokens
        # Pad positions get no vector: nothing at a pad position then depends on v.
        weight = batch.mask.to(self.dtype)[..., None]
        targets = list(target_hooks)
        expected = (*tokens.shape, self.d_model)

        def check_shape(act: Tensor, hook_name: str) -> None:
            # Under vmap the shape is the logical one, so this holds in every pass.
            if tuple(act.shape) != expected:
                raise _NotResidual(hook_name, tuple(act.shape))

        def check_finite(act: Tensor, hook_name: str) -> None:
            if not bool(torch.isfinite(act[batch.mask]).all()):
                raise ValueError(
                    f"non-finite activations (NaN or inf) at {hook_name}: the model "
                    "overflows on these prompts; try float32 or shorter prompts"
                )

        def run(v: Tensor | Sequence[Tensor], check: bool = False) -> list[Tensor]:
            captured: dict[str, Tensor] = {}

            def add_row(i: int, name: str) -> Callable[[Tensor, Any], Tensor]:
                def add(act: Tensor, hook: Any) -> Tensor:
                    check_shape(act, name)
                    if check:
                        check_finite(act, name)
                    return act + weight * v[i]

                return add

            def capture_as(name: str) -> Callable[[Tensor, Any], None]:
                def capture(act: Tensor, hook: Any) -> None:
                    check_shape(act, name)
                    if check:
                        check_finite(act, name)
                    captured[name] = act
                    if len(captured) == len(targets):
                        raise _StopForward

                return capture

            hooks: list[tuple[str, Callable[[Tensor, Any], Tensor | None]]]
            hooks = [(name, add_row(i, name)) for i, name in enumerate(source_hooks)]
            hooks += [(name, capture_as(name)) for name in targets]
            try:
                with tensor_attributes_kept(model), model.hooks(fwd_hooks=hooks):
                    model(tokens)
            except _StopForward:
                pass
            except _NotResidual as wrong:
                raise self.not_residual(wrong.hook_name, wrong.shape, tokens) from None
            missing = [name for name in targets if name not in captured]
            if missing:
                raise RuntimeError(
                    f"the hooks {missing} did not fire during the forward pass; "
                    "choose another target_site"
                )
            return [captured[name] for name in targets]

        return run

    def residual_sites(self, layer: int, tokens: Tensor) -> list[str]:
        """The sites of block ``layer`` whose activations on ``tokens`` are
        ``[batch, seq, d_model]``, the ones a vector can be added at or read from (one
        forward pass)."""
        prefix = f"blocks.{layer}."
        shapes: dict[str, tuple[int, ...]] = {}

        def record(name: str) -> Callable[[Tensor, Any], None]:
            # By the name asked for: a bridge reports its own name for an alias.
            def keep(act: Tensor, hook: Any) -> None:
                shapes.setdefault(name, tuple(act.shape))

            return keep

        names = [n for n in self.model.hook_dict if n.startswith(prefix) and self._can_hook(n)]
        with torch.no_grad(), tensor_attributes_kept(self.model):
            with self.model.hooks(fwd_hooks=[(n, record(n)) for n in names]):
                self.model(tokens)
        expected = (*tokens.shape, self.d_model)
        usable = [n[len(prefix) :] for n in names if shapes.get(n) == expected]
        # TransformerLens' usual names first.
        return sorted(usable, key=lambda site: (site not in RESIDUAL_SITES, usable.index(site)))

    def _can_hook(self, name: str) -> bool:
        """Whether a hook can be added at ``name`` (a bridge refuses those switched off)."""
        try:
            with self.model.hooks(fwd_hooks=[(name, lambda act, hook: None)]):
                return True
        except ValueError:
            return False

    def not_residual(self, hook_name: str, shape: tuple[int, ...], tokens: Tensor) -> ValueError:
        """The error for a hook whose activations are not ``[batch, seq, d_model]``."""
        layer_text, site = hook_name.split(".", 2)[1:]
        usable = self.residual_sites(int(layer_text), tokens)
        return ValueError(
            f"site {site!r} holds activations of shape {list(shape)} at {hook_name}, not "
            f"[batch, seq, d_model] with d_model = {self.d_model}: steering vectors are "
            f"added and read as one d_model vector per token. Choose a site whose "
            f"activations have that shape: {', '.join(usable)}"
        )

    @contextmanager
    def hooks(self, fwd_hooks: Sequence[tuple[str, Callable[..., Any]]]) -> Iterator[None]:
        """Forward hooks that live exactly as long as the ``with`` block, exceptions included.

        Both model classes remove only the hooks of this context on exit, so contexts nest
        and compose with hooks the user added.
        """
        with self.model.hooks(fwd_hooks=list(fwd_hooks)):
            yield

    def sequence_hooks(self) -> tuple[str, str | None]:
        """Hooks that tell where a forward pass sits in its sequence: the first block's
        input (seen first in every pass) and, where the model has it, the first block's
        attention scores, whose key axis is longer than the query axis exactly when a KV
        cache holds earlier tokens."""
        scores = "blocks.0.attn.hook_attn_scores"
        return "blocks.0.hook_resid_pre", scores if scores in self.model.hook_dict else None

    def generate(
        self,
        tokens: Int[Tensor, "batch seq"],
        *,
        max_new_tokens: int,
        greedy: bool,
        use_cache: bool = True,
        stop_at_eos: bool = True,
    ) -> Int[Tensor, "batch total"]:
        """The prompt tokens followed by the generated ones (sampling uses torch's RNG).

        A ``HookedTransformer`` without a tokenizer always generates without its cache:
        there (TransformerLens 3.9) the cached steps re-embed the whole sequence at the
        cache's offset, so absolute position embeddings land at the wrong positions.
        """
        if self.kind == "hooked" and getattr(self.model, "tokenizer", None) is None:
            use_cache = False
        with torch.no_grad(), tensor_attributes_kept(self.model), warnings.catch_warnings():
            # Raised inside transformers by TransformerLens' own call: nothing a user can change.
            warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
            out = self.model.generate(
                tokens.to(self.device),
                max_new_tokens=max_new_tokens,
                do_sample=not greedy,
                use_past_kv_cache=use_cache,
                # A model without a tokenizer has no end-of-sequence token to stop at.
                stop_at_eos=stop_at_eos and self.eos_token_id is not None,
                verbose=False,
            )
        # HookedTransformer generates under inference mode; a clone made outside it is an
        # ordinary tensor that later autograd-tracked passes may use.
        return out.clone()

    def weights_fingerprint(self) -> str:
        """A SHA-256 fingerprint of the model's weights, to tell two models with the same
        name and shapes apart (new weights saved into the same folder, two random inits).

        It hashes every parameter's name, dtype and shape and every 97th of its values, bit
        for bit, so it is the same on every device: any retraining, fine-tuning or
        reinitialisation changes it, though an edit of a few chosen weights might not.
        """
        params = list(self.model.named_parameters())
        # Hashed once per model while no parameter is replaced or edited in place
        # (load_state_dict, optimiser steps and in-place edits all bump these counters).
        versions = tuple(v for _, p in params for v in (p._version, p.data_ptr()))
        known = _FINGERPRINTS.get(self.model)
        if known is not None and known[0] == versions:
            return known[1]
        digest = hashlib.sha256()
        with torch.no_grad():
            for name, param in params:
                digest.update(json.dumps([name, str(param.dtype), list(param.shape)]).encode())
                sample = param.detach().reshape(-1)[::97].cpu()
                # Same-width integers, which numpy has for every dtype (bfloat16 included).
                bits = _SAME_WIDTH_INT[sample.element_size()]
                digest.update(sample.view(bits).numpy().tobytes())
        fingerprint = "sha256:" + digest.hexdigest()
        _FINGERPRINTS[self.model] = (versions, fingerprint)
        return fingerprint

    def config_hash(self) -> str:
        """A SHA-256 of the architecture in the model's config (layers, widths, heads,
        vocabulary, activation, normalisation, positional embedding), the same for a
        ``HookedTransformer`` and a ``TransformerBridge`` of one model."""
        cfg = self.model.cfg
        fields = {}
        for key in _ARCHITECTURE_FIELDS:
            value = getattr(cfg, key, None)
            fields[key] = (
                value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
            )
        text = json.dumps(fields, sort_keys=True)
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()

    def hook_count(self) -> int:
        """Forward and backward hooks registered on the model's modules right now."""
        return sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            for m in self.model.modules()
        )

    def greedy_mismatch(
        self, tokens: Int[Tensor, "1 total"], prompt_length: int
    ) -> tuple[int, int, int] | None:
        """Where a greedy continuation departs from the model's own cache-free choice.

        One full forward pass over ``tokens`` gives the next-token logits at every prefix
        (attention is causal), so each generated token can be checked against the argmax
        that a plain loop of full passes would pick. A token whose logit is within
        ``sqrt(eps)`` (relative) of the best counts as a tie. Returns ``(index in the
        continuation, generated id, greedy id)`` of the first departure, or None. Hooks
        active around the call (a ``steer`` block) apply to this pass as to generation.
        """
        return self.greedy_mismatches(tokens, prompt_length)[0]

    def greedy_mismatches(
        self, tokens: Int[Tensor, "batch total"], prompt_length: int
    ) -> list[tuple[int, int, int] | None]:
        """``greedy_mismatch`` for each row of a batch generated together, in one pass.

        A row that ended at the end-of-sequence token is checked up to it: generation pads
        it with that token while the other rows go on, and the padding is no choice.
        """
        tokens = tokens.to(self.device)
        if tokens.shape[1] <= prompt_length:
            return [None] * tokens.shape[0]
        with torch.no_grad(), tensor_attributes_kept(self.model):
            logits = self.model(tokens[:, :-1])[:, prompt_length - 1 :].double()
        chosen = tokens[:, prompt_length:]
        best = logits.max(dim=-1).values
        picked = logits.gather(-1, chosen[..., None])[..., 0]
        tolerance = torch.finfo(self.dtype).eps ** 0.5 * best.abs().clamp(min=1.0)
        bad = picked < best - tolerance
        eos = self.eos_token_id
        if eos is not None:
            ended = (chosen == eos).long().cumsum(dim=1)
            bad &= (ended == 0) | ((ended == 1) & (chosen == eos))
        found: list[tuple[int, int, int] | None] = []
        for row in range(tokens.shape[0]):
            where = torch.nonzero(bad[row])
            if len(where) == 0:
                found.append(None)
                continue
            i = int(where[0, 0])
            found.append((i, int(chosen[row, i]), int(logits[row, i].argmax())))
        return found

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's end-of-sequence id, at which generation stops (None without one)."""
        tokenizer = getattr(self.model, "tokenizer", None)
        eos = getattr(tokenizer, "eos_token_id", None)
        return None if eos is None else int(eos)

    def decode(self, tokens: Int[Tensor, " seq"]) -> str:
        """Text of a token sequence (``#id`` per token for a model without a tokenizer)."""
        tokenizer = getattr(self.model, "tokenizer", None)
        if tokenizer is None:
            return " ".join(f"#{int(t)}" for t in tokens)
        return str(tokenizer.decode(tokens.tolist()))

    def prompt_tokens(self, text: str) -> Int[Tensor, " n"]:
        """Token ids of one prompt, whole (never cut at ``n_ctx``).

        BOS is prepended as ``model.cfg.default_prepend_bos`` says, except to a text that
        already starts with the BOS token's text: a chat template's rendering (Gemma's
        starts with ``<bos>``, SmolLM2's with ``<|im_start|>``) then keeps its one BOS.
        """
        bos = getattr(self.model.tokenizer, "bos_token", None)
        prepend = False if bos and text.startswith(bos) else None
        # to_tokens would cut a long prompt at n_ctx, and the Jacobian would then be read
        # at the cut instead of the prompt's last tokens.
        tokens = self.model.to_tokens(text, prepend_bos=prepend, truncate=False)
        return tokens[0].to(self.device)

    def text_tokens(self, text: str, what: str) -> Int[Tensor, " n"]:
        """Token ids of ``text`` as it would continue a prompt: no BOS prepended."""
        if getattr(self.model, "tokenizer", None) is None:
            raise ValueError(f"{what}={text!r}: the model has no tokenizer, give token ids")
        return self.model.to_tokens(text, prepend_bos=False)[0].to(self.device)

    def single_token(self, answer: str | int, what: str) -> int:
        """The id of an answer given as one token's text or id."""
        if isinstance(answer, bool) or not isinstance(answer, (str, int)):
            raise TypeError(f"{what} must be a token's text or id, got {answer!r}")
        vocab = int(self.model.cfg.d_vocab)
        if isinstance(answer, int):
            if not 0 <= answer < vocab:
                raise ValueError(f"{what}={answer} is not a token id (0..{vocab - 1})")
            return answer
        ids = self.text_tokens(answer, what).tolist()
        if len(ids) != 1:
            pieces = [self.model.tokenizer.decode([i]) for i in ids]
            raise ValueError(
                f"{what}={answer!r} is {len(ids)} tokens {pieces}, not one; answers are "
                "compared as single next tokens (mind the leading space, e.g. ' great')"
            )
        unknown = getattr(self.model.tokenizer, "unk_token_id", None)
        if unknown is not None and ids[0] == unknown and answer != self.model.tokenizer.unk_token:
            raise ValueError(
                f"{what}={answer!r} is not in the model's vocabulary: it tokenizes to the "
                "unknown token; choose a word the tokenizer knows"
            )
        return int(ids[0])

    def answer_pairs(self, answers: Any, n_prompts: int, what: str) -> list[tuple[int, int]]:
        """One (A, B) token pair per prompt, from one pair for every prompt or a list of
        ``n_prompts`` pairs, each answer one token's text or id."""
        if answers is None:
            raise ValueError(
                f"a logit difference needs {what}=(A, B), two single tokens such as "
                "(' great', ' terrible'), or one such pair per prompt"
            )
        single = (
            isinstance(answers, Sequence)
            and not isinstance(answers, str)
            and len(answers) == 2
            and all(isinstance(a, (str, int)) and not isinstance(a, bool) for a in answers)
        )
        pairs = [answers] * n_prompts if single else answers
        if isinstance(pairs, str) or not isinstance(pairs, Sequence) or len(pairs) != n_prompts:
            raise ValueError(
                f"{what} must be one pair (A, B) or a list of {n_prompts} pairs, one per "
                f"prompt; got {answers!r}"
            )
        out = []
        for pair in pairs:
            if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
                raise ValueError(f"each of {what} must be a pair (A, B) of tokens, got {pair!r}")
            a, b = (self.single_token(x, "answer") for x in pair)
            if a == b:
                raise ValueError(
                    f"{what} {tuple(pair)!r} are the same token (id {a}), so logit(A) - "
                    "logit(B) is 0 whatever the steering: give two different tokens"
                )
            out.append((a, b))
        return out


# transformers 5.24.0 breaks TransformerBridge.generate with its KV cache (TransformerLens 4.3).
def boot(
    name_or_path: str,
    *,
    kind: ModelKind,
    device: str,
    dtype: torch.dtype,
    hooked_name: str | None = None,
) -> Any:
    """Load a TransformerLens model of the given class, in eval mode.

    ``hooked_name`` is the official TransformerLens name for a local directory loaded as a
    ``HookedTransformer``, which needs it to pick the architecture. Weights are never
    processed (no folding or centering), so both classes give the same activations.
    """
    if kind == "bridge":
        from transformer_lens.model_bridge import TransformerBridge

        model = TransformerBridge.boot_transformers(name_or_path, device=device, dtype=dtype)
        return model.eval()
    try:
        from transformer_lens import HookedTransformer
    except ImportError as err:
        raise ValueError(
            "kind='hooked' needs TransformerLens 3.x: HookedTransformer was removed in 4.0. "
            "Use kind='bridge'."
        ) from err
    if hooked_name is None:
        return HookedTransformer.from_pretrained_no_processing(
            name_or_path, device=device, dtype=dtype
        ).eval()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    return HookedTransformer.from_pretrained_no_processing(
        hooked_name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    ).eval()


@dataclass(frozen=True)
class _BlockPrefix:
    """What blocks ``0 .. layer - 1`` hand on to block ``layer`` for one token batch,
    unsteered: passes steered at block ``layer`` or later replay it instead of running
    those blocks again, since nothing before the steering hook depends on the delta."""

    layer: int
    output: Any  # the last skipped block's return value, as the model's block loop gets it
    batch_size: int


def _block_prefix(adapter: ModelAdapter, batch: TokenBatch, layer: int) -> _BlockPrefix | None:
    """The prefix of ``batch`` up to block ``layer`` (None for block 0: nothing to skip).

    ``start_at_layer`` is not the route: a ``TransformerBridge`` (TransformerLens 4.3)
    still runs every block under it and only swaps block ``layer``'s input. Replaying the
    blocks' return value works the same way on both model classes.
    """
    if layer == 0:
        return None
    model, captured = adapter.model, {}

    def grab(module: nn.Module, args: Any, output: Any) -> None:
        captured["output"] = output
        raise _StopForward

    handle = model.blocks[layer - 1].register_forward_hook(grab)
    try:
        model(batch.tokens)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return _BlockPrefix(layer, captured["output"], int(batch.tokens.shape[0]))


def _repeated(output: Any, copies: int, batch_size: int) -> Any:
    """``output`` with every tensor of the batch's leading size repeated ``copies`` times
    along it, as the batch is in a pass over ``tokens.repeat(copies, 1)``."""
    if isinstance(output, Tensor):
        if output.ndim and output.shape[0] == batch_size:
            return output.repeat(copies, *([1] * (output.ndim - 1)))
        return output
    if isinstance(output, (tuple, list)):
        return type(output)(_repeated(item, copies, batch_size) for item in output)
    return output


@contextmanager
def _replaying(model: Any, prefix: _BlockPrefix | None, copies: int) -> Iterator[None]:
    """Blocks before ``prefix.layer`` return the prefix's output without computing: each
    skipped block's input is ignored, so only the last one's output matters."""
    if prefix is None:
        yield
        return
    output = _repeated(prefix.output, copies, prefix.batch_size)
    blocks = [model.blocks[i] for i in range(prefix.layer)]
    # Past the modules' own __setattr__: a bridge component would hand the attribute on to
    # the HuggingFace layer it wraps.
    for block in blocks:
        object.__setattr__(block, "forward", lambda *args, **kwargs: output)
    try:
        yield
    finally:
        for block in blocks:
            object.__delattr__(block, "forward")


def hook_layer(hook: str) -> int | None:
    """The block a hook name sits in (``blocks.5.hook_mlp_out`` -> 5), else None."""
    parts = hook.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else None


def _softcapped(model: Any) -> bool:
    cap = getattr(model.cfg, "output_logits_soft_cap", None)
    return cap is not None and float(cap) > 0


def _steered_passes(
    adapter: ModelAdapter,
    batch: TokenBatch,
    hook: str,
    deltas: Tensor,
    weights: Tensor | None,
    last_only: bool,
    chunk: int,
    prefix: _BlockPrefix | None,
    read: Tensor | None = None,
) -> Iterator[tuple[Tensor, bool]]:
    """``steered_logits``' passes, inside its no-grad and attribute guard: for each
    ``chunk`` of deltas, its logits (``[m, batch, vocab]``, or ``[m, batch, seq, vocab]``
    without ``last_only``) and False, or with ``last_only``, where the model allows it,
    the unembedding's input at each prompt's last token (``[m, batch, d_model]``) and
    True. With ``read`` (``[batch, p]`` positions, and ``last_only``), the positions read
    are those instead of the last token, kept as a dimension: ``[m, batch, p, ...]``."""
    model, tokens, hook_name = adapter.model, batch.tokens, hook
    if weights is None:
        weights = batch.mask.to(adapter.dtype)
    weights = weights.to(adapter.device, adapter.dtype)
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    last = batch.lengths - 1
    if read is not None:
        rows, last = rows[:, None], read.to(tokens.device)
    # With a large vocabulary the unembedding of every position costs more than the
    # blocks: for the last token only, stop at the unembedding's input. Not where the
    # model caps its logits after the unembedding (the full pass applies the cap).
    shortcut = last_only and "unembed.hook_in" in model.hook_dict and not _softcapped(model)
    unembed_in = "unembed.hook_in" if shortcut else None
    for start in range(0, deltas.shape[0], chunk):
        block = deltas[start : start + chunk].to(adapter.device, adapter.dtype)
        m = block.shape[0]
        shift = (block[:, None, None, :] * weights[None, :, :, None]).flatten(0, 1)
        seen: dict[str, Tensor] = {}

        def add(act: Tensor, hook: Any, shift: Tensor = shift) -> Tensor:
            if act.shape != shift.shape:
                raise _NotResidual(hook_name, tuple(act.shape))
            return act + shift

        def grab(act: Tensor, hook: Any, seen: dict[str, Tensor] = seen) -> None:
            seen["x"] = act
            raise _StopForward

        fwd: list[tuple[str, Callable[..., Any]]] = [(hook, add)]
        if unembed_in is not None:
            fwd.append((unembed_in, grab))
        try:
            with _replaying(model, prefix, m), model.hooks(fwd_hooks=fwd):
                logits = model(tokens.repeat(m, 1))
        except _StopForward:
            x = seen["x"].view(m, tokens.shape[0], tokens.shape[1], -1)[:, rows, last]
            yield x, True
            continue
        except _NotResidual as wrong:
            raise adapter.not_residual(hook_name, wrong.shape, tokens) from None
        logits = logits.view(m, tokens.shape[0], tokens.shape[1], -1)
        yield (logits[:, rows, last] if last_only else logits), False


def _widened(logits: Tensor) -> Tensor:
    # Half-precision logits are widened; float64 models keep their precision.
    return (logits if logits.dtype == torch.float64 else logits.float()).cpu()


def _unembedded(model: Any, x: Tensor) -> Tensor:
    return model.unembed(x.reshape(-1, 1, x.shape[-1])).view(*x.shape[:-1], -1)


def _logits_of(model: Any, passes: Iterator[tuple[Tensor, bool]]) -> Tensor:
    """The logits of ``_steered_passes``, unembedding the passes that stopped before it."""
    return torch.cat([_widened(_unembedded(model, x) if hidden else x) for x, hidden in passes])


def steered_logits(
    adapter: ModelAdapter,
    batch: TokenBatch,
    hook: str,
    deltas: Float[Tensor, "m d_model"],
    *,
    weights: Float[Tensor, "batch seq"] | None = None,
    last_only: bool = True,
    chunk: int = 8,
) -> Float[Tensor, "m batch *rest"]:
    """Full-model logits with ``deltas[i]`` added at ``hook``, for each i; a zero delta gives
    the unsteered logits.

    ``weights`` multiplies the delta at each position (default: 1 on real tokens, 0 on
    pads). With ``last_only`` only each prompt's last real token is returned
    (``[m, batch, vocab]``), else every position (``[m, batch, seq, vocab]``). Runs
    ``chunk`` deltas per forward pass: logits over a large vocabulary dominate memory.
    """
    with torch.no_grad(), tensor_attributes_kept(adapter.model):
        passes = _steered_passes(adapter, batch, hook, deltas, weights, last_only, chunk, None)
        return _logits_of(adapter.model, passes)


def steered_logits_with_grad(
    adapter: ModelAdapter,
    batch: TokenBatch,
    hook: str,
    deltas: Float[Tensor, "batch d_model"],
) -> Float[Tensor, "batch vocab"]:
    """Each prompt's last-token logits with its own delta (``deltas[i]`` for prompt i)
    added at ``hook`` on every real token, differentiable in ``deltas``: for gradients of
    a metric or a KL with respect to the steering."""
    model, tokens = adapter.model, batch.tokens
    weights = batch.mask.to(adapter.dtype)[..., None]
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    last = batch.lengths.to(tokens.device) - 1
    shortcut = "unembed.hook_in" in model.hook_dict and not _softcapped(model)
    seen: dict[str, Tensor] = {}

    def add(act: Tensor, hook: Any) -> Tensor:
        if act.shape[:2] != tokens.shape or act.shape[-1] != deltas.shape[-1]:
            raise _NotResidual(hook.name, tuple(act.shape))
        return act + deltas.to(act.dtype)[:, None, :] * weights

    def grab(act: Tensor, hook: Any) -> None:
        seen["x"] = act
        raise _StopForward

    fwd: list[tuple[str, Callable[..., Any]]] = [(hook, add)]
    if shortcut:
        fwd.append(("unembed.hook_in", grab))
    with torch.enable_grad(), tensor_attributes_kept(model):
        try:
            with model.hooks(fwd_hooks=fwd):
                logits = model(tokens)[rows, last]
        except _StopForward:
            logits = _unembedded(model, seen["x"][rows, last])
        except _NotResidual as wrong:
            raise adapter.not_residual(hook, wrong.shape, tokens) from None
    return logits if logits.dtype == torch.float64 else logits.float()


def _next_block_input(adapter: ModelAdapter, batch: TokenBatch, hook: str) -> str:
    """The next block's ``hook_resid_pre`` where a delta added at ``hook`` reaches it
    unchanged (a block's last addition to the residual stream, ``hook_mlp_out`` or
    ``hook_resid_post`` in the usual layouts), else ``hook`` itself.

    Steering there lets the replayed prefix take in the hook's own block, which every
    pass would otherwise recompute unsteered up to the hook. Whether the delta passes
    unchanged depends on the architecture (a norm after the MLP would change it), so it
    is measured: one delta of the activation's own size, added at ``hook``, must reach
    the next block's input to within the rounding of a few more additions.
    """
    layer = hook_layer(hook)
    later = None if layer is None else f"blocks.{layer + 1}.hook_resid_pre"
    if later is None or later not in adapter.model.hook_dict or hook == later:
        return hook
    run = adapter.segment(batch, [hook], [hook, later])
    zero = torch.zeros(1, adapter.d_model, dtype=adapter.dtype, device=adapter.device)
    try:
        act, base = run(zero, False)
    except _NotResidual:
        return hook
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(adapter.d_model, generator=generator, dtype=torch.float64)
    size = act.double().norm(dim=-1).mean() / direction.norm()
    delta = (direction * size).to(adapter.device, adapter.dtype)
    moved = run(delta[None], False)[1]
    shift = batch.mask.to(adapter.dtype)[..., None] * delta
    bound = 16 * torch.finfo(adapter.dtype).eps * (base.abs().amax() + shift.abs().amax())
    return later if bool((moved - base - shift).abs().amax() <= bound) else hook


class SteeredRun:
    """Steered passes on one batch and hook (``steered_runs``): ``run(deltas)`` gives the
    last-token logits, ``run.kl(deltas, base, columns)`` the next-token KL and a few
    logits without forming the whole vocabulary's logits at once."""

    def __init__(
        self,
        adapter: ModelAdapter,
        batch: TokenBatch,
        hook: str,
        weights: Tensor | None,
        chunk: int,
        prefix: _BlockPrefix | None,
        read: Tensor | None = None,
    ):
        self._adapter, self._batch, self._hook = adapter, batch, hook
        self._weights, self._chunk, self._prefix = weights, chunk, prefix
        self._read = read
        # Steered sequences run so far: a method's cost in passes of one vector.
        self.rows_run = 0

    def _passes(self, deltas: Tensor) -> Iterator[tuple[Tensor, bool]]:
        self.rows_run += int(deltas.shape[0])
        return _steered_passes(
            self._adapter, self._batch, self._hook, deltas, self._weights, True, self._chunk,
            self._prefix, self._read,
        )  # fmt: skip

    def __call__(self, deltas: Float[Tensor, "m d_model"]) -> Float[Tensor, "m batch *read vocab"]:
        """Last-token logits with each delta added at the hook, as ``steered_logits``
        (``[m, batch, p, vocab]`` at the ``read`` positions where the run has them)."""
        return _logits_of(self._adapter.model, self._passes(deltas))

    def kl(
        self,
        deltas: Float[Tensor, "m d_model"],
        base: Float[Tensor, "batch *read vocab"],
        columns: Sequence[int],
    ) -> tuple[Float[Tensor, "m batch *read"], Float[Tensor, "m batch *read columns"]]:
        """KL(steered ‖ base) in nats at each prompt's last token (or at each ``read``
        position) for each delta, as ``scales.kl_divergence`` of ``self(deltas)`` gives it
        (to the logits' rounding), and the steered logits of ``columns`` there.

        Where the unembedding is the affine map ``x @ W_U + b_U`` (checked once per
        adapter against the model's own), it is applied a slice of the vocabulary at a
        time and each slice reduced at once (``linalg.streamed_kl``): the logits of a
        large vocabulary are never written out, and the pass over them costs about half.
        """
        adapter, out_kl, out_cols = self._adapter, [], []
        base = base.to(adapter.device)
        base_lse = base.double().logsumexp(dim=-1)
        picked = list(columns)
        for x, hidden in self._passes(deltas):
            affine = hidden and _affine_unembedding(adapter, x)
            if affine:
                weight, bias = adapter.model.W_U.T, adapter.model.b_U
                slices = (
                    (x @ weight[i : i + _VOCAB_SLICE].T + bias[i : i + _VOCAB_SLICE],
                     base[..., i : i + _VOCAB_SLICE])
                    for i in range(0, weight.shape[0], _VOCAB_SLICE)
                )  # fmt: skip
                cols = x @ weight[picked].T + bias[picked]
            else:
                logits = _unembedded(adapter.model, x) if hidden else x
                slices = (
                    (logits[..., i : i + _VOCAB_SLICE], base[..., i : i + _VOCAB_SLICE])
                    for i in range(0, logits.shape[-1], _VOCAB_SLICE)
                )
                cols = logits[..., picked]
            out_kl.append(streamed_kl(slices, base_lse).cpu())
            out_cols.append(_widened(cols))
        return torch.cat(out_kl), torch.cat(out_cols)


# Rows of the unembedding per slice: 1024 x d_model floats stay in cache while every
# row's logits of the slice are reduced (measured fastest of 512 to 32768 on Gemma 3).
_VOCAB_SLICE = 1024


def _affine_unembedding(adapter: ModelAdapter, x: Tensor) -> bool:
    """Whether ``model.unembed`` is ``x @ W_U + b_U``, checked on the first row of ``x``
    once per adapter: the bridge exposes W_U and b_U for every architecture, but an
    architecture could do more in its unembedding than they say."""
    if adapter._affine_unembed is None:
        model = adapter.model
        row = x.reshape(-1, x.shape[-1])[:1]
        try:
            direct = row @ model.W_U + model.b_U
        except (AttributeError, RuntimeError):
            adapter._affine_unembed = False
            return False
        own = _unembedded(model, row)
        scale = own.abs().amax() + 1
        adapter._affine_unembed = bool(
            direct.shape == own.shape
            and (direct - own).abs().amax() <= 64 * torch.finfo(own.dtype).eps * scale
        )
    return adapter._affine_unembed


@contextmanager
def steered_runs(
    adapter: ModelAdapter,
    batch: TokenBatch,
    hook: str,
    *,
    weights: Float[Tensor, "batch seq"] | None = None,
    chunk: int = 32,
    read: Int[Tensor, "batch p"] | None = None,
) -> Iterator[SteeredRun]:
    """A ``SteeredRun`` on ``batch`` and ``hook``: ``run(deltas)`` gives last-token logits
    with each delta added at ``hook``, as ``steered_logits`` gives them, and ``run.kl``
    their KL against base logits, for many calls on one batch and hook.

    The blocks before the hook's run once, on the batch alone, when the context opens;
    each pass replays their output and computes only the blocks from the hook's on, or
    from the next one where the delta reaches its input unchanged
    (``_next_block_input``). The model is guarded once for all the calls (the guard
    walks every module). With ``read`` (positions per prompt), logits and KLs are those
    at each of those positions instead of the last token: e.g. every token of a
    continuation, teacher-forced.
    """
    with torch.no_grad(), tensor_attributes_kept(adapter.model):
        steered = _next_block_input(adapter, batch, hook)
        layer = hook_layer(steered)
        prefix = None if layer is None else _block_prefix(adapter, batch, layer)
        yield SteeredRun(adapter, batch, steered, weights, chunk, prefix, read)


def activations(
    adapter: ModelAdapter, batch: TokenBatch, hooks: Sequence[str]
) -> list[Float[Tensor, "batch seq d_model"]]:
    """Unsteered activations at ``hooks`` from one forward pass (stopped after the last)."""
    run = adapter.segment(batch, [hooks[0]], hooks)
    zero = torch.zeros(1, adapter.d_model, dtype=adapter.dtype, device=adapter.device)
    with torch.no_grad():
        return [act.detach() for act in run(zero, False)]


def decode_token(model: Any, token: int) -> str:
    """The text of one token id, or ``#id`` for a model without a tokenizer."""
    tokenizer = getattr(model, "tokenizer", None)
    return f"#{token}" if tokenizer is None else str(tokenizer.decode([token]))
