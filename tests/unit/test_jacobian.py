"""LayerJacobian against dense references from torch.func.jacfwd / jacrev in float64."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import tl_powersteer as tps
from tests.helpers import build_models
from tests.reference import reference_function, reference_jacobian
from tl_powersteer.adapters import ModelAdapter
from tl_powersteer.jacobian import (
    ActivationsWithKnownDerivatives,
    RecordedPass,
    RoundedMatrixProducts,
    cpu_multiplies_bfloat16,
)

ATOL = 1e-10


@pytest.mark.parametrize("jvp_method", ["reverse", "forward"])
def test_dense_matches_jacfwd(model: Any, tokens: torch.Tensor, jvp_method: str) -> None:
    op = tps.LayerJacobian(
        model, tokens, source=1, target=3, target_positions=3, jvp_method=jvp_method
    )
    ref = reference_jacobian(model, list(tokens), op.source_hook, op.target_hook, 3)
    assert op.shape == (2 * 3 * 16, 16)
    torch.testing.assert_close(op.dense(), ref, atol=ATOL, rtol=1e-8)
    assert ref.abs().max() > 1e-3  # the pair is not trivially decoupled


@pytest.mark.parametrize("jvp_method", ["reverse", "forward"])
def test_matvec_rmatvec_match_jacobian(model: Any, tokens: torch.Tensor, jvp_method: str) -> None:
    op = tps.LayerJacobian(
        model, tokens[:1], source=0, target=2, target_positions=2, jvp_method=jvp_method
    )
    f = reference_function(model, tokens[0], op.source_hook, op.target_hook, 2)
    zero = torch.zeros(16, dtype=torch.float64)
    with torch.no_grad():
        J = torch.func.jacrev(f)(zero)
    V = torch.randn(16, 5, dtype=torch.float64)
    U = torch.randn(op.shape[0], 3, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(V), J @ V, atol=ATOL, rtol=1e-8)
    torch.testing.assert_close(op.rmatvec(U), J.T @ U, atol=ATOL, rtol=1e-8)
    torch.testing.assert_close(op.matvec(V[:, 0]), J @ V[:, 0], atol=ATOL, rtol=1e-8)
    torch.testing.assert_close(op.gram(V), J.T @ (J @ V), atol=ATOL, rtol=1e-8)


@pytest.mark.parametrize("jvp_method", ["reverse", "forward"])
def test_adjointness(model: Any, tokens: torch.Tensor, jvp_method: str) -> None:
    op = tps.LayerJacobian(model, tokens, source=0, target=3, jvp_method=jvp_method)
    v = torch.randn(16, dtype=torch.float64)
    u = torch.randn(op.shape[0], dtype=torch.float64)
    lhs = torch.dot(u, op.matvec(v))
    rhs = torch.dot(op.rmatvec(u), v)
    torch.testing.assert_close(lhs, rhs, atol=1e-12, rtol=1e-10)


def test_counts_products(model: Any, tokens: torch.Tensor) -> None:
    op = tps.LayerJacobian(model, tokens, source=0, target=1)
    op.matvec(torch.randn(16, 3, dtype=torch.float64))
    op.rmatvec(torch.randn(op.shape[0], 2, dtype=torch.float64))
    op.gram(torch.randn(16, dtype=torch.float64))
    assert (op.n_jvp, op.n_vjp) == (4, 3)


def test_string_prompts_of_different_lengths_are_stacked(text_model: Any) -> None:
    prompts = ["the cat sat on the mat", "i liked it", "the movie was not very good but so"]
    op = tps.LayerJacobian(text_model, prompts, source=1, target=2, target_positions=2)
    assert op.batch.lengths.tolist() == [7, 4, 9]  # BOS + words, right padded
    single = [text_model.to_tokens(p)[0] for p in prompts]
    ref = reference_jacobian(text_model, single, op.source_hook, op.target_hook, 2)
    torch.testing.assert_close(op.dense(), ref, atol=ATOL, rtol=1e-8)
    # JᵀJ of the batch is the sum of the single prompts' JᵀJ.
    V = torch.randn(16, 4, dtype=torch.float64)
    separate = sum(
        tps.LayerJacobian(text_model, p, 1, 2, target_positions=2).gram(V) for p in prompts
    )
    torch.testing.assert_close(op.gram(V), separate, atol=ATOL, rtol=1e-8)


def test_pad_positions_contribute_nothing(text_model: Any) -> None:
    long, short = "the movie was not very good but so", "i liked it"
    op = tps.LayerJacobian(text_model, [short, long], source=0, target=3, target_positions=1)
    alone = tps.LayerJacobian(text_model, short, source=0, target=3, target_positions=1)
    torch.testing.assert_close(op.dense()[:16], alone.dense(), atol=ATOL, rtol=1e-8)


def test_other_sites(model: Any, tokens: torch.Tensor) -> None:
    op = tps.LayerJacobian(
        model,
        tokens,
        source=1,
        target=2,
        source_site="hook_resid_post",
        target_site="hook_resid_post",
        target_positions=1,
    )
    assert op.source_hook == "blocks.1.hook_resid_post"
    ref = reference_jacobian(model, list(tokens), op.source_hook, op.target_hook, 1)
    torch.testing.assert_close(op.dense(), ref, atol=ATOL, rtol=1e-8)


def test_negative_layers_resolve_like_python(model: Any, tokens: torch.Tensor) -> None:
    op = tps.LayerJacobian(model, tokens, source=-3, target=-1)
    assert (op.source, op.target) == (1, 3)
    assert op.target_hook == "blocks.3.hook_mlp_out"


def record_vmap_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on, the number of columns of every vmapped product, in call order."""
    import tl_powersteer.jacobian as jacobian

    sizes: list[int] = []
    real_vmap = jacobian.vmap

    def recording_vmap(f: Any) -> Any:
        def batched(x: torch.Tensor) -> Any:
            sizes.append(x.shape[0])
            return real_vmap(f)(x)

        return batched

    monkeypatch.setattr(jacobian, "vmap", recording_vmap)
    return sizes


@pytest.mark.parametrize("jvp_method", ["reverse", "forward"])
def test_products_are_chunked_exactly(
    model: Any, tokens: torch.Tensor, jvp_method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = tps.LayerJacobian(model, tokens, 0, 2, chunk_size=64, jvp_method=jvp_method)
    chunked = tps.LayerJacobian(model, tokens, 0, 2, chunk_size=5, jvp_method=jvp_method)
    V = torch.randn(16, 12, dtype=torch.float64)
    U = torch.randn(whole.shape[0], 12, dtype=torch.float64)
    expected = (whole.dense(), whole.matvec(V), whole.rmatvec(U))
    sizes = record_vmap_sizes(monkeypatch)
    got = (chunked.dense(), chunked.matvec(V), chunked.rmatvec(U))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-13, rtol=0)
    assert sizes == [5, 5, 5, 1] + [5, 5, 2] * 2  # dense (16 columns), matvec, rmatvec
    sizes.clear()
    assert chunked.matvec(V[:, :0]).shape == (whole.shape[0], 0)
    assert chunked.rmatvec(U[:, :0]).shape == (16, 0)
    assert sizes == []


def test_default_chunk_keeps_about_1024_token_rows(
    model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tl_powersteer.jacobian as jacobian

    sizes = [jacobian.default_chunk_size(rows) for rows in (4, 21, 61, 1024, 5000, 0)]
    assert sizes == [256, 48, 16, 1, 1, 1024]
    long_tokens = torch.randint(1, 18, (3, 32), generator=torch.Generator().manual_seed(0))
    op = tps.LayerJacobian(model, long_tokens, 0, 2)
    assert op.chunk_size == 1024 // 96 == 10
    explicit = tps.LayerJacobian(model, long_tokens, 0, 2, chunk_size=16)
    calls = record_vmap_sizes(monkeypatch)
    dense = op.dense()
    assert calls == [8, 8]  # evenly, in the nearest number of blocks of about 10
    torch.testing.assert_close(dense, explicit.dense(), atol=1e-13, rtol=0)
    assert calls == [8, 8, 16]
    calls.clear()
    V = torch.randn(16, 15, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(V[:, :14]), dense @ V[:, :14], atol=1e-12, rtol=0)
    torch.testing.assert_close(op.matvec(V), dense @ V, atol=1e-12, rtol=0)
    assert calls == [14, 8, 7]  # no block of 4 left over, never past 1.5x
    # An explicit chunk size is a bound on memory, kept to the column.
    calls.clear()
    tps.LayerJacobian(model, long_tokens, 0, 2, chunk_size=10).matvec(V[:, :14])
    assert calls == [10, 4]
    with pytest.raises(ValueError, match="positive int \\(or None for the default\\), got 0"):
        tps.LayerJacobian(model, long_tokens, 0, 2, chunk_size=0)


def test_readout_is_the_differentiated_function(model: Any, tokens: torch.Tensor) -> None:
    op = tps.LayerJacobian(model, tokens, source=0, target=2, target_positions=2)
    ref = reference_function(model, tokens[1], op.source_hook, op.target_hook, 2)
    v = 0.1 * torch.randn(16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(op.readout(v)[2 * 16 :], ref(v), atol=1e-12, rtol=0)
        torch.testing.assert_close(
            op.readout(torch.zeros(16, dtype=torch.float64)), op.target_value
        )


def test_model_is_left_untouched(model: Any, tokens: torch.Tensor) -> None:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    training = [m.training for m in model.modules()]

    def cached_tensors() -> list[tuple[str, str, int]]:
        return [
            (name, key, id(value))
            for name, module in model.named_modules()
            for key, value in vars(module).items()
            if isinstance(value, torch.Tensor)
        ]

    cached = cached_tensors()
    op = tps.LayerJacobian(model, tokens, source=0, target=2)
    op.gram(torch.randn(16, 3, dtype=torch.float64))
    op.dense()
    tps.LayerJacobian(model, tokens, 0, 3, jvp_method="forward").matvec(torch.ones(16))
    # Forward passes can cache tensors on modules; none of ours may stay behind.
    assert cached_tensors() == cached
    for name, p in model.named_parameters():
        assert p.grad is None, name
        assert torch.equal(p, before[name]), name
    assert [m.training for m in model.modules()] == training
    for name, hook in model.hook_dict.items():
        assert not hook._forward_hooks, f"hook left on {name}"


def test_frozen_weights_are_marked_for_reverse_products_only(
    model: Any, tokens: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With frozen weights vmap falls back to one matmul per column in the second backward;
    reverse products mark them as requiring grad while they run, and restore every flag,
    also when the product fails."""
    params = list(model.parameters())
    before = [p.requires_grad for p in params]
    flags = [i % 3 != 0 for i in range(len(params))]  # some frozen, some not
    seen: list[list[bool]] = []
    in_chunks = tps.LayerJacobian._in_chunks

    def spy(self: Any, *args: Any) -> Any:
        seen.append([p.requires_grad for p in params])
        if len(seen) == 2:
            raise KeyboardInterrupt
        return in_chunks(self, *args)

    try:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        op = tps.LayerJacobian(model, tokens[:1], source=0, target=2, target_positions=2)
        f = reference_function(model, tokens[0], op.source_hook, op.target_hook, 2)
        with torch.no_grad():
            J = torch.func.jacrev(f)(torch.zeros(16, dtype=torch.float64))
        monkeypatch.setattr(tps.LayerJacobian, "_in_chunks", spy)
        V = torch.randn(16, 5, dtype=torch.float64)
        torch.testing.assert_close(op.matvec(V), J @ V, atol=ATOL, rtol=1e-8)
        assert [p.requires_grad for p in params] == flags
        with pytest.raises(KeyboardInterrupt):
            op.matvec(V)
        assert [p.requires_grad for p in params] == flags
        op.rmatvec(torch.randn(op.shape[0], 2, dtype=torch.float64))
        tps.LayerJacobian(model, tokens[:1], 0, 2, jvp_method="forward").matvec(V)
    finally:
        for p, flag in zip(params, before, strict=True):
            p.requires_grad_(flag)
    assert seen[0] == seen[1] == [True] * len(params)
    assert seen[2] == seen[3] == flags  # VJPs and forward-mode products leave flags alone
    assert all(p.grad is None for p in params)


def test_stops_after_target(model: Any, tokens: torch.Tensor) -> None:
    fired: list[str] = []

    def spy(act: torch.Tensor, hook: Any) -> None:
        fired.append(hook.name)

    names = ["blocks.1.hook_resid_mid", "blocks.1.hook_resid_post", "blocks.2.hook_resid_pre"]
    with model.hooks(fwd_hooks=[(n, spy) for n in names]):
        op = tps.LayerJacobian(model, tokens, source=0, target=1)
        op.matvec(torch.randn(16, 2, dtype=torch.float64))
    # The target is blocks.1.hook_mlp_out: what runs before it fires, nothing after it.
    # Bridges report an alias by the name of the hook point it stands for.
    mid, post, pre = (model.hook_dict[n].name for n in names)
    assert mid in fired
    assert post not in fired and pre not in fired


def test_float32_model_runs_in_its_dtype(models: dict[str, Any], tokens: torch.Tensor) -> None:
    import copy

    model32 = copy.deepcopy(models["native_bridge"]).to(torch.float32)
    op = tps.LayerJacobian(model32, tokens, source=0, target=2)
    op64 = tps.LayerJacobian(models["native_bridge"], tokens, source=0, target=2)
    dense = op.dense()
    assert dense.dtype == torch.float32
    torch.testing.assert_close(dense.double(), op64.dense(), atol=1e-5, rtol=1e-4)


def test_bfloat16_model(models: dict[str, Any], tokens: torch.Tensor) -> None:
    import copy

    model16 = copy.deepcopy(models["native_bridge"]).to(torch.bfloat16)
    res = tps.power_steer(model16, tokens, source=0, target=2, k=2)
    exact = tps.power_steer(models["native_bridge"], tokens, source=0, target=2, k=2, tol=1e-8)
    assert res.vectors.dtype == torch.float32
    torch.testing.assert_close(
        res.singular_values.double(), exact.singular_values, rtol=5e-2, atol=0
    )


@pytest.mark.parametrize("shape", [(15,), (16, 2, 1)])
def test_matvec_shape_errors(models: dict[str, Any], tokens: torch.Tensor, shape: tuple) -> None:
    op = tps.LayerJacobian(models["native_bridge"], tokens, source=0, target=1)
    with pytest.raises(ValueError, match=r"V must have shape \[16\] or \[16, b\]"):
        op.matvec(torch.zeros(shape, dtype=torch.float64))


def test_several_targets_stack_in_one_pass(model: Any, tokens: torch.Tensor) -> None:
    op = tps.LayerJacobian(model, tokens, source=0, target=[3, 1, 2], target_positions=2)
    assert op.targets == [3, 1, 2] and op.target_hook is None
    dense = op.dense()
    assert dense.shape == (3 * 2 * 2 * 16, 16)
    for t in (1, 2, 3):
        single = tps.LayerJacobian(model, tokens, source=0, target=t, target_positions=2).dense()
        torch.testing.assert_close(dense[op.rows(t)], single, atol=ATOL, rtol=1e-8)
    with pytest.raises(ValueError, match="not among"):
        op.rows(0)


@pytest.mark.parametrize(
    ("target", "message"),
    [([], "empty list"), ([2, 2], "repeat"), ([2, 0], "must come after the source")],
)
def test_bad_target_lists(
    models: dict[str, Any], tokens: torch.Tensor, target: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        tps.LayerJacobian(models["native_bridge"], tokens, source=0, target=target)


def test_recorded_operators_match_jacfwd(model: Any, tokens: torch.Tensor) -> None:
    """Every operator of one recorded forward pass, any sources and targets, against
    jacfwd's dense Jacobians of the single pairs."""
    graph = RecordedPass(model, tokens, [0, 1, 2], [1, 2, 3], target_positions=2)
    ref = {
        (s, t): reference_jacobian(
            model, list(tokens), graph.source_hooks[s], graph.target_hooks[t], 2
        )
        for s in (0, 1, 2)
        for t in (1, 2, 3)
        if t > s
    }
    for sources, targets in [(0, 1), (0, [3, 1, 2]), ([1, 0], [2, 3]), (2, 3)]:
        op = graph.operator(sources, targets)
        dense = torch.cat([torch.cat([ref[s, t] for s in op.sources], dim=1) for t in op.targets])
        assert op.shape == dense.shape
        torch.testing.assert_close(op.dense(), dense, atol=ATOL, rtol=1e-8)
        V = torch.randn(op.shape[1], 5, dtype=torch.float64)
        U = torch.randn(op.shape[0], 3, dtype=torch.float64)
        torch.testing.assert_close(op.matvec(V), dense @ V, atol=ATOL, rtol=1e-8)
        torch.testing.assert_close(op.rmatvec(U), dense.T @ U, atol=ATOL, rtol=1e-8)
        torch.testing.assert_close(
            op.gram(V[:, 0]), dense.T @ dense @ V[:, 0], atol=ATOL, rtol=1e-8
        )
    # Blocks are addressed like LayerJacobian's.
    op = graph.operator([1, 0], [2, 3])
    torch.testing.assert_close(op.dense()[op.rows(3), op.columns(0)], ref[0, 3], atol=ATOL, rtol=0)


def test_recorded_products_run_no_forward_pass_and_stop_at_the_source(
    model: Any, tokens: torch.Tensor
) -> None:
    """One forward pass records everything; products walk back only as far as their
    sources (the blocks below a source are never differentiated)."""
    forward_passes: list[int] = []
    reached: list[int] = []  # the backward reached block 1's MLP input, below source 1

    def count(act: torch.Tensor, hook: Any) -> None:
        forward_passes.append(1)

    def watch(act: torch.Tensor, hook: Any) -> None:
        if act.requires_grad:
            act.register_hook(lambda grad: reached.append(1))

    spies = [("blocks.0.hook_resid_pre", count), ("blocks.1.hook_resid_mid", watch)]
    with model.hooks(fwd_hooks=spies):
        graph = RecordedPass(model, tokens, [0, 1, 2], [3])
        assert len(forward_passes) == 1
        late = graph.operator([1, 2], 3)
        late.matvec(torch.randn(late.shape[1], 2, dtype=torch.float64))
        late.rmatvec(torch.randn(late.shape[0], 2, dtype=torch.float64))
        assert not reached
        graph.operator(0, 3).rmatvec(torch.randn(late.shape[0], dtype=torch.float64))
        assert reached
    assert len(forward_passes) == 1


def test_recorded_products_leave_the_model_untouched(model: Any, tokens: torch.Tensor) -> None:
    params = list(model.parameters())
    flags = [i % 3 != 0 for i in range(len(params))]  # some frozen, some not
    before = [p.requires_grad for p in params]
    cached = [
        (key, id(value))
        for module in model.modules()
        for key, value in vars(module).items()
        if isinstance(value, torch.Tensor)
    ]
    try:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        graph = RecordedPass(model, tokens, [0, 1], [2, 3])
        op = graph.operator([0, 1], [2, 3])
        op.gram(torch.randn(op.shape[1], 3, dtype=torch.float64))
        assert [p.requires_grad for p in params] == flags
    finally:
        for p, flag in zip(params, before, strict=True):
            p.requires_grad_(flag)
    assert all(p.grad is None for p in params)
    assert [
        (key, id(value))
        for module in model.modules()
        for key, value in vars(module).items()
        if isinstance(value, torch.Tensor)
    ] == cached
    for name, hook in model.hook_dict.items():
        assert not hook._forward_hooks, f"hook left on {name}"


@pytest.mark.parametrize(
    ("sources", "targets", "message"),
    [
        (0, 2, r"target layers \[2\] are not in this graph; choose among \[1, 3\]"),
        (3, 3, r"source layers \[3\] are not in this graph; choose among \[0, 1\]"),
        (1, 1, "must come after the source"),
        ([], 3, "empty list"),
    ],
)
def test_recorded_operator_errors(
    models: dict[str, Any], tokens: torch.Tensor, sources: Any, targets: Any, message: str
) -> None:
    graph = RecordedPass(models["native_bridge"], tokens, [0, 1], [1, 3])
    with pytest.raises(ValueError, match=message):
        graph.operator(sources, targets)


def test_graph_needs_a_target_after_every_source(
    models: dict[str, Any], tokens: torch.Tensor
) -> None:
    with pytest.raises(ValueError, match="must come after the source"):
        RecordedPass(models["native_bridge"], tokens, [0, 2], [1, 2])


def _backward_node_names(outputs: Any) -> set[str]:
    seen, names, stack = set(), set(), [out.grad_fn for out in outputs]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(child for child, _ in node.next_functions)
    return names


ACTIVATIONS = [
    (torch.nn.functional.gelu, {}),
    (torch.nn.functional.gelu, {"approximate": "tanh"}),
    (torch.nn.functional.silu, {}),
    (torch.tanh, {}),
]


@pytest.mark.parametrize(("f", "options"), ACTIVATIONS)
def test_activations_are_recorded_with_their_derivative(f: Any, options: dict[str, Any]) -> None:
    """Inside a recorded graph an activation's value, vector-Jacobian products (batched, as
    the operators run them) and reverse-over-reverse products are those of PyTorch's own."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    G = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64)
    x = x0.clone().requires_grad_(True)
    with ActivationsWithKnownDerivatives():
        y = f(x, **options)
    assert type(y.grad_fn).__name__ == "_KnownDerivativeBackward"
    torch.testing.assert_close(y, f(x0, **options), atol=0, rtol=0)
    derivative = torch.func.jvp(lambda z: f(z, **options), (x0,), (torch.ones_like(x0),))[1]
    (pulled,) = torch.autograd.grad(y, x, G, retain_graph=True, is_grads_batched=True)
    torch.testing.assert_close(pulled, G * derivative, atol=1e-14, rtol=1e-12)
    cotangent = torch.zeros_like(y, requires_grad=True)
    (transpose,) = torch.autograd.grad(y, x, cotangent, retain_graph=True, create_graph=True)
    (pushed,) = torch.autograd.grad(transpose, cotangent, G, is_grads_batched=True)
    torch.testing.assert_close(pushed, G * derivative, atol=1e-14, rtol=1e-12)


def test_other_calls_run_as_they_are() -> None:
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    with ActivationsWithKnownDerivatives():
        relu = torch.nn.functional.relu(x)
        frozen = torch.nn.functional.gelu(x.detach())
        inplace = torch.nn.functional.silu(x * 1, inplace=True)
        method = x.tanh()
    assert type(relu.grad_fn).__name__ == "ReluBackward0"
    assert frozen.grad_fn is None
    assert type(inplace.grad_fn).__name__ == "SiluBackward0"
    assert type(method.grad_fn).__name__ == "TanhBackward0"


def test_graph_records_activation_derivatives_once(model: Any, tokens: torch.Tensor) -> None:
    """No product of a recorded graph recomputes an activation's derivative (the operators
    are checked against jacfwd above)."""
    graph = RecordedPass(model, tokens, [0], [2, 3])
    names = _backward_node_names(graph._reads.values())
    assert "_KnownDerivativeBackward" in names
    assert not names & {"GeluBackward0", "SiluBackward0", "TanhBackward0"}, names


def test_adapter_recomputes_mlp_out_from_resid_mid(model: Any, tokens: torch.Tensor) -> None:
    """On a few positions, as the graph uses it: every tiny model's block is the usual one."""
    adapter = ModelAdapter(model)
    _, cache = model.run_with_cache(tokens)
    for layer in range(model.cfg.n_layers):
        mlp_out = adapter.mlp_out_from_resid_mid(layer)
        assert mlp_out is not None
        mid = cache[f"blocks.{layer}.hook_resid_mid"][:, -3:]
        torch.testing.assert_close(
            mlp_out(mid), cache[f"blocks.{layer}.hook_mlp_out"][:, -3:], atol=1e-12, rtol=1e-10
        )


def test_operators_read_their_last_target_at_the_read_positions(
    model: Any, tokens: torch.Tensor
) -> None:
    """An operator's products never reach its last target's MLP output at every position
    (only its recomputation at the read ones), while earlier targets are read there as
    recorded; the values are checked against jacfwd above."""
    seen: list[torch.Tensor] = []
    reached: list[int] = []

    def watch(act: torch.Tensor, hook: Any) -> None:
        # The forward pass's activation, not the recomputation's (where the hook fires too).
        if not seen:
            seen.append(act)
            act.register_hook(lambda grad: reached.append(1))

    with model.hooks(fwd_hooks=[("blocks.3.hook_mlp_out", watch)]):
        graph = RecordedPass(model, tokens, [0, 1], [2, 3], target_positions=2)
    assert sorted(graph._short_reads) == [2, 3]
    for t in (2, 3):
        torch.testing.assert_close(graph._short_reads[t], graph._reads[t], atol=1e-12, rtol=0)
    op = graph.operator([0, 1], [2, 3])
    assert op._reads[0] is graph._reads[2] and op._reads[1] is graph._short_reads[3]
    op.matvec(torch.randn(op.shape[1], 2, dtype=torch.float64))
    op.rmatvec(torch.randn(op.shape[0], 2, dtype=torch.float64))
    assert not reached
    # The last layer, not the last listed; alone, a target is its operator's last.
    swapped = graph.operator(0, [3, 2])
    assert swapped._reads[0] is graph._short_reads[3] and swapped._reads[1] is graph._reads[2]
    assert graph.operator(1, 2)._reads[0] is graph._short_reads[2]


def test_graph_reads_as_recorded_where_the_recomputation_differs(
    model: Any, tokens: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A block of another structure (here: an MLP output that is not what the guess
    computes) is read where it was recorded, with the same Jacobians."""
    exact = RecordedPass(model, tokens, [0, 1], [2, 3], target_positions=2).operator([0, 1], [2, 3])
    monkeypatch.setattr(ModelAdapter, "mlp_out_from_resid_mid", lambda self, layer: lambda x: 2 * x)
    graph = RecordedPass(model, tokens, [0, 1], [2, 3], target_positions=2)
    assert graph._short_reads == {}
    op = graph.operator([0, 1], [2, 3])
    torch.testing.assert_close(op.dense(), exact.dense(), atol=ATOL, rtol=1e-8)


def test_graph_reads_as_recorded_where_a_hook_of_the_user_wants_every_position(
    model: Any, tokens: torch.Tensor
) -> None:
    def seventh_token(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return act + 0.1 * act[:, 6:7]  # fails on the 2 read positions alone

    exact = RecordedPass(model, tokens, [0, 1], [2, 3], target_positions=2).operator([0, 1], [2, 3])
    with model.hooks(fwd_hooks=[("blocks.3.ln2.hook_normalized", seventh_token)]):
        graph = RecordedPass(model, tokens, [0, 1], [2, 3], target_positions=2)
        op = graph.operator([0, 1], [2, 3])
        assert sorted(graph._short_reads) == [2]
        ref = reference_jacobian(
            model, list(tokens), graph.source_hooks[0], graph.target_hooks[3], 2
        )
    torch.testing.assert_close(op.dense()[op.rows(3), op.columns(0)], ref, atol=ATOL, rtol=1e-8)
    assert not torch.allclose(op.dense(), exact.dense())  # the hook did change the model


def test_other_target_sites_are_read_as_recorded(model: Any, tokens: torch.Tensor) -> None:
    graph = RecordedPass(model, tokens, [0], [2, 3], target_site="hook_resid_post")
    assert graph._short_reads == {}


def test_rounded_matrix_products_round_both_factors_and_nothing_else() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b, bias = (torch.randn(*shape, generator=gen) for shape in [(6, 5), (5, 4), (4,)])
    A, B = torch.randn(3, 6, 5, generator=gen), torch.randn(3, 5, 4, generator=gen)
    with RoundedMatrixProducts(torch.float32, torch.bfloat16):
        mm, bmm = a @ b, torch.bmm(A, B)
        addmm = torch.addmm(bias, a, b, beta=0.5, alpha=2.0)
        linear = torch.nn.functional.linear(a, b.T, bias)
        wide, scaled = a.double() @ b.double(), a * 3

    rounded = (a.bfloat16() @ b.bfloat16()).float()
    torch.testing.assert_close(mm, rounded, rtol=0, atol=0)
    torch.testing.assert_close(bmm, torch.bmm(A.bfloat16(), B.bfloat16()).float(), rtol=0, atol=0)
    torch.testing.assert_close(addmm, 2.0 * rounded + 0.5 * bias, rtol=0, atol=0)
    torch.testing.assert_close(linear, rounded + bias, rtol=0, atol=0)
    assert float((mm - a @ b).abs().max()) > 1e-4  # really rounded
    # Other dtypes and other operations are left alone.
    torch.testing.assert_close(wide, a.double() @ b.double(), rtol=0, atol=0)
    torch.testing.assert_close(scaled, a * 3, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["hooked", "native_bridge", "hf_bridge"])
def test_graph_products_with_bfloat16_matmuls(
    name: str, models: dict[str, Any], tokenizer_dir: str, gpt2_dir: str, tokens: torch.Tensor
) -> None:
    """Every model class's products (einsum, linear and Conv1D layers) are rounded."""
    if name not in models:
        pytest.skip(f"{name} is not available in this TransformerLens version")
    model = models[name]
    # A fresh copy with the same weights (a used bridge holds tensors deepcopy refuses).
    model32 = build_models(tokenizer_dir, gpt2_dir)[name].to(torch.float32)
    kwargs: dict[str, Any] = {"target_positions": 2}
    full = RecordedPass(model32, tokens, [0, 1], [2, 3], **kwargs)
    low = RecordedPass(model32, tokens, [0, 1], [2, 3], matmul_dtype=torch.bfloat16, **kwargs)
    # The record is made in float32: only the products are rounded.
    for t in (2, 3):
        torch.testing.assert_close(low._reads[t], full._reads[t], rtol=0, atol=0)
    # The float64 model's Jacobian by jacfwd, one block of rows per target and of columns
    # per source, in the operator's order.
    hooks = full.source_hooks, full.target_hooks
    exact = torch.cat(
        [
            torch.cat(
                [
                    reference_jacobian(model, list(tokens), hooks[0][s], hooks[1][t], 2)
                    for s in (0, 1)
                ],
                dim=1,
            )
            for t in (2, 3)
        ]
    )
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(exact.shape[1], 5, generator=gen)
    U = torch.randn(exact.shape[0], 5, generator=gen)

    def errors(graph: RecordedPass) -> list[float]:
        op = graph.operator([0, 1], [2, 3])
        pairs = [(op.matvec(V), exact @ V.double()), (op.rmatvec(U), exact.T @ U.double())]
        return [float((got.double() - want).norm() / want.norm()) for got, want in pairs]

    assert max(errors(full)) < 1e-6
    assert all(1e-4 < error < 3e-2 for error in errors(low))


@pytest.mark.parametrize(
    ("matmul_dtype", "error", "message"),
    [
        (torch.float16, ValueError, "must be None, torch.bfloat16 or the model's torch.float64"),
        (
            "bfloat16",
            TypeError,
            "must be None, torch.bfloat16 or the model's torch.float64, got str",
        ),
    ],
)
def test_bad_matmul_dtype(
    models: dict[str, Any], tokens: torch.Tensor, matmul_dtype: Any, error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        RecordedPass(models["native_bridge"], tokens, [0], [1], matmul_dtype=matmul_dtype)


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"),
    [(True, False, True), (False, True, True), (False, False, False)],
)
def test_cpu_bfloat16_follows_the_cpu_features(
    monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool, expected: bool
) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert cpu_multiplies_bfloat16() is expected
    # A PyTorch build without the checks counts as having neither feature.
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert cpu_multiplies_bfloat16() is False
