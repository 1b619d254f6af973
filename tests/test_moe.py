"""SparseMoE: shapes, routing invariants, losses, peers (transformers' Mixtral block and balance loss)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func

from moefuse.configutil import ConfigError
from moefuse.fusion.kernels import mkl_grouped_mm_available
from moefuse.fusion.moe import MoEConfig, SparseMoE
from moefuse.fusion.stack import FusionConfig, FusionStack

BACKENDS = ["native", "loop"] + (["mkl"] if mkl_grouped_mm_available(torch.empty(1), torch.empty(1)) else [])


def mixtral_block(d: int = 32, h: int = 48, e: int = 8, k: int = 2) -> MixtralSparseMoeBlock:
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(MixtralConfig(hidden_size=d, intermediate_size=h, num_local_experts=e,
                                                num_experts_per_tok=k, router_jitter_noise=0.0))
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return block.eval()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(13, 32), (3, 7, 32)])
def test_shapes_and_types(backend: str, shape: tuple[int, ...]) -> None:
    moe = SparseMoE(MoEConfig(32, 48, 4, top_k=2, backend=backend))
    out = moe(torch.randn(shape))
    assert out.out.shape == shape
    n = math.prod(shape[:-1])
    assert out.router_logits.shape == (n, 4) and out.router_logits.dtype == torch.float32
    assert out.top_k_index.shape == (n, 2)
    assert int(out.tokens_per_expert.sum()) == n * 2
    assert int(out.dropped_tokens) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_from_mixtral_matches_peer(backend: str, k: int) -> None:
    block = mixtral_block(k=k)
    moe = SparseMoE.from_mixtral(block, backend=backend).eval()
    x = torch.randn(4, 9, 32)
    with torch.no_grad():
        torch.testing.assert_close(moe(x).out, block(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("masked", [False, True])
def test_balance_loss_equals_transformers(masked: bool) -> None:
    block = mixtral_block()
    moe = SparseMoE.from_mixtral(block)
    x = torch.randn(3, 11, 32)
    mask = torch.rand(3, 11) > 0.3 if masked else None
    out = moe(x, mask=mask)
    logits = torch.nn.functional.linear(x.reshape(-1, 32), block.gate.weight)  # [N, E]
    ref = load_balancing_loss_func((logits,), 8, 2, mask)
    torch.testing.assert_close(out.balance_loss, ref, atol=1e-6, rtol=1e-6)


def test_combine_weights_sum_to_one_and_dropless() -> None:
    moe = SparseMoE(MoEConfig(16, 32, 8, top_k=3))
    out = moe(torch.randn(64, 16))
    torch.testing.assert_close(out.combine_weights.sum(-1), torch.ones(64))
    assert int(out.dropped_tokens) == 0
    assert int(out.tokens_per_expert.sum()) == 64 * 3


def test_unnormalised_weights_are_router_probabilities() -> None:
    moe = SparseMoE(MoEConfig(16, 32, 4, top_k=1, normalize_top_k=False))
    out = moe(torch.randn(20, 16))
    probs = out.router_logits.softmax(-1)
    torch.testing.assert_close(out.combine_weights[:, 0], probs.max(-1).values)


def test_capacity_drops_are_counted() -> None:
    torch.manual_seed(1)
    moe = SparseMoE(MoEConfig(16, 32, 4, top_k=2, capacity_factor=0.5))
    with torch.no_grad():
        moe.router.weight[0] += 5.0  # skew routing so expert 0 overflows
    x = torch.randn(40, 16).abs()
    out = moe(x)
    capacity = math.ceil(0.5 * 40 * 2 / 4)
    assert int(out.tokens_per_expert.max()) <= capacity
    assert int(out.dropped_tokens) > 0
    assert int(out.dropped_tokens) + int(out.tokens_per_expert.sum()) == 40 * 2
    assert int((out.combine_weights == 0).sum()) == int(out.dropped_tokens)


def test_capacity_keeps_first_choices_first() -> None:
    """GShard priority: a token's first choice is kept before any token's second choice."""
    moe = SparseMoE(MoEConfig(4, 8, 2, top_k=2, capacity_factor=0.5))  # capacity = N*K/E/2 = N/2
    top_i = torch.tensor([[0, 1]] * 6 + [[1, 0]] * 2)  # expert 0: 6 first choices, 2 second choices
    keep = moe.capacity_keep(top_i)
    assert keep[:4, 0].all() and not keep[4:6, 0].any()  # 4 slots, taken by first choices in token order
    assert not keep[6:, 1].any()  # second choices of expert 0 lose to the first choices


def test_padding_takes_no_part() -> None:
    moe = SparseMoE(MoEConfig(16, 32, 4, top_k=2, num_groups=2)).eval()
    x = torch.randn(2, 10, 16)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 6:] = False
    mods = torch.zeros(2, 10, dtype=torch.long)
    mods[1] = 1
    a = moe(x, modality_ids=mods, mask=mask)
    y = x.clone()
    y[0, 6:] = 100.0  # garbage in padding must not change anything
    b = moe(y, modality_ids=mods, mask=mask)
    torch.testing.assert_close(a.out[mask], b.out[mask])
    assert (b.out[~mask] == 0).all()
    for name in ("balance_loss", "z_loss", "local_entropy_loss", "global_entropy_loss"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name))
    assert int(a.tokens_per_expert.sum()) == 16 * 2
    assert a.modality_expert_counts.sum(1).tolist() == [6 * 2, 10 * 2]


def test_entropy_losses_at_uniform_routing() -> None:
    moe = SparseMoE(MoEConfig(16, 32, 8, top_k=2, num_groups=2, local_entropy_coef=1.0, global_entropy_coef=1.0))
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform routing: local entropy = log E, global = -log E
    out = moe(torch.randn(12, 16), modality_ids=torch.tensor([0] * 6 + [1] * 6))
    torch.testing.assert_close(out.local_entropy_loss, torch.tensor(math.log(8)))
    torch.testing.assert_close(out.global_entropy_loss, torch.tensor(-math.log(8)))
    torch.testing.assert_close(out.z_loss, torch.tensor(math.log(8) ** 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_reach_router_and_experts(backend: str) -> None:
    moe = SparseMoE(MoEConfig(16, 32, 4, top_k=2, backend=backend, shared_expert_hidden=8))
    out = moe(torch.randn(30, 16))
    (out.out.sum() + out.aux_loss).backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    assert moe.experts.w_in.grad.abs().sum() > 0 and moe.experts.w_out.grad.abs().sum() > 0
    assert moe.shared_expert.w_in.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("k", [1, 2, 3])
def test_dropless_gathers_equal_index_add_path(k: int) -> None:
    """The dropless path moves tokens by gathers both ways (kernels.gather_tokens / combine_slots); its output
    and every gradient (input, router, experts) equal the index_select + index_add_ path on the same plan."""
    torch.manual_seed(0)
    moe = SparseMoE(MoEConfig(16, 32, 6, top_k=k, shared_expert_hidden=8))
    x = torch.randn(37, 16)
    g = torch.randn(37, 16)
    results = []
    for dropless in (True, False):
        xi = x.clone().requires_grad_()
        moe.zero_grad(set_to_none=True)
        plan = moe.dispatch(moe.route(xi))
        assert plan.position is not None
        if not dropless:
            plan.position = None  # combine falls back to index_select + index_add_
        out = moe.combine(xi, plan)
        out.backward(g)
        results.append([out.detach(), xi.grad, moe.router.weight.grad, moe.experts.w_in.grad, moe.experts.w_out.grad])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gather_and_combine_gradcheck() -> None:
    """gather_tokens and combine_slots against torch.autograd.gradcheck (float64, a random dropless plan)."""
    from moefuse.fusion.kernels import combine_slots, gather_tokens

    torch.manual_seed(0)
    n, k, d = 7, 2, 3
    order = torch.randperm(n * k)
    position = torch.empty_like(order)
    position[order] = torch.arange(n * k)
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    y = torch.randn(n * k, d, dtype=torch.float64, requires_grad=True)
    w = torch.rand(n, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: gather_tokens(t, order // k, position), (x,))
    assert torch.autograd.gradcheck(lambda a, b: combine_slots(a, b, order, position), (y, w))


def test_all_padding_batch_trains() -> None:
    """No real token at all: output zeros, and backward still runs (empty gathers and grouped matmuls)."""
    moe = SparseMoE(MoEConfig(16, 32, 4, top_k=2))
    x = torch.randn(2, 3, 16, requires_grad=True)
    out = moe(x, mask=torch.zeros(2, 3, dtype=torch.bool))
    (out.out.sum() + out.aux_loss).backward()
    assert (out.out == 0).all() and (x.grad == 0).all()
    assert moe.experts.w_in.grad is not None and (moe.experts.w_in.grad == 0).all()


def test_noise_only_in_training() -> None:
    moe = SparseMoE(MoEConfig(16, 32, 4, router_jitter=0.5, router_noise_std=1.0)).eval()
    x = torch.randn(20, 16)
    torch.testing.assert_close(moe(x).router_logits, moe(x).router_logits)
    moe.train()
    assert not torch.equal(moe(x).router_logits, moe(x).router_logits)


def test_bad_arguments_name_the_problem() -> None:
    with pytest.raises(ValueError, match="top_k"):
        SparseMoE(MoEConfig(16, 32, 4, top_k=5))
    with pytest.raises(ValueError, match="capacity_factor"):
        SparseMoE(MoEConfig(16, 32, 4, capacity_factor=-1))
    moe = SparseMoE(MoEConfig(16, 32, 4))
    with pytest.raises(ValueError, match=r"\[N, 16\]"):
        moe(torch.randn(4, 8))
    with pytest.raises(ValueError, match="mask"):
        moe(torch.randn(2, 3, 16), mask=torch.ones(3, 2, dtype=torch.bool))


@pytest.mark.parametrize("kind", ["moe", "concat"])
def test_fusion_stack_groups_are_the_modalities_and_the_fusion_token(kind: str) -> None:
    """FusionStack(num_modalities=M): ids 0..M-1 are modalities, M the fusion token; MoE stats over M + 1 groups,
    the concat baseline over the M modalities alone."""
    stack = FusionStack(FusionConfig(kind=kind, d_model=16, num_heads=2, d_expert=8, num_experts=4), num_modalities=3)
    ids = torch.tensor([[3, 0, 0, 1, 2, 2], [3, 1, 1, 1, 0, 0]])
    mask = torch.ones(2, 6, dtype=torch.bool)
    out = stack(torch.randn(2, 6, 16), mask, ids)
    assert out.pooled.shape == (2, 16)
    if kind == "concat":
        assert stack.mlp[0].in_features == 3 * (16 + 1)
        return
    counts = out.moe[0].modality_expert_counts
    assert counts.shape == (4, 4) and counts.sum(1).tolist() == [4 * 2, 4 * 2, 2 * 2, 2 * 2]


def test_fusion_config_checks_moe_fields_by_their_fusion_key() -> None:
    for kwargs, key in [({"top_k": 9}, "fusion.top_k"), ({"d_expert": 0}, "fusion.d_expert"),
                        ({"capacity_factor": 0.0}, "fusion.capacity_factor"), ({"z_coef": -1.0}, "fusion.z_coef")]:
        with pytest.raises(ConfigError, match=f"^{key}: "):
            FusionConfig(**kwargs)
    moe = FusionConfig(shared_expert=True, d_expert=32).moe_config(num_groups=4)
    assert (moe.d_expert, moe.shared_expert_hidden, moe.num_groups) == (32, 32, 4)


def test_golden_values() -> None:
    """Fixed seed -> fixed numbers: catches silent changes to init, routing or dispatch."""
    torch.manual_seed(1234)
    moe = SparseMoE(MoEConfig(8, 16, 4, top_k=2))
    x = torch.randn(6, 8)
    out = moe(x)
    assert out.top_k_index.tolist() == GOLDEN_TOPK
    torch.testing.assert_close(out.out[0, :4], torch.tensor(GOLDEN_OUT), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.balance_loss, torch.tensor(GOLDEN_BALANCE), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.router_logits[0], torch.tensor(GOLDEN_LOGITS), atol=1e-5, rtol=1e-4)


GOLDEN_TOPK = [[2, 3], [1, 2], [1, 0], [0, 3], [3, 0], [1, 2]]
GOLDEN_OUT = [-0.086044, -0.03967, 0.345732, -0.199807]
GOLDEN_BALANCE = 2.0
GOLDEN_LOGITS = [-0.032403, 0.04161, 0.140437, 0.127559]
