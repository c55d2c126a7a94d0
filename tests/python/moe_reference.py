"""References for the mixture-of-experts tests, built from transformers' own modules."""

import torch


def router_module(model_type: str, num_experts: int, top_k: int, norm_topk_prob: bool = True):
    """transformers' router of `model_type` whose projection is the identity (hidden = E): called
    on logits it returns transformers' (router_logits, router_scores, router_indices) for them."""
    import transformers
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe
    from transformers.models.qwen3_next import modeling_qwen3_next

    common = dict(hidden_size=num_experts, num_experts=num_experts, num_experts_per_tok=top_k)
    if model_type == "qwen3_5_moe":
        router = modeling_qwen3_5_moe.Qwen3_5MoeTopKRouter(transformers.Qwen3_5MoeTextConfig(**common))
    else:
        config = transformers.Qwen3NextConfig(**common, norm_topk_prob=norm_topk_prob)
        router = modeling_qwen3_next.Qwen3NextTopKRouter(config)
    with torch.no_grad():
        router.weight.copy_(torch.eye(num_experts))
    return router


def experts_module(num_experts: int, hidden: int, intermediate: int, dtype=torch.float32,
                   implementation: str = "eager", seed: int = 0):
    """transformers' Qwen3_5MoeExperts with random weights (std 0.2) in `dtype`."""
    import transformers
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe

    config = transformers.Qwen3_5MoeTextConfig(hidden_size=hidden, num_experts=num_experts,
                                               moe_intermediate_size=intermediate)
    config._experts_implementation = implementation
    gen = torch.Generator().manual_seed(seed)
    experts = modeling_qwen3_5_moe.Qwen3_5MoeExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.copy_(0.2 * torch.randn(experts.gate_up_proj.shape, generator=gen))
        experts.down_proj.copy_(0.2 * torch.randn(experts.down_proj.shape, generator=gen))
    return experts.to(dtype)


def distinct_logits(T: int, E: int, seed: int = 0) -> torch.Tensor:
    """[T, E] logits with distinct values per row, exact in fp16 / bf16 (no top-k ties)."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(E, generator=gen) for _ in range(T)]
    return (torch.stack(rows).float() - E / 2) * 0.125


def random_routing(T: int, E: int, top_k: int, seed: int = 0):
    """Distinct experts per token and positive weights."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=gen)[:top_k] for _ in range(T)])
    weights = torch.rand(T, top_k, generator=gen) + 0.1
    return idx, weights


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
