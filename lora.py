"""LoRA as openpi does it: frozen weights plus trainable low-rank updates, merged on export.

openpi puts LoRA on the einsums of both Gemma experts (`gemma_2b_lora`: rank 16, `gemma_300m_lora`:
rank 32, alpha = rank) through its lora.Einsum, which places the two factors on the weight's last
two axes. What that gives, per projection of one layer (W width, N heads, K kv heads, H head dim):

    q   (N, W, H): one adapter per head,  x A_n B_n                 A_n (W, r), B_n (r, H)
    k, v (K, W, H): one adapter per kv head, the same
    out (N, H, W): ONE adapter over the flattened heads, x_flat A (N*H -> r), then the r-vector
         times sum_n B_n: openpi's einsums `BTNH,NHL->BTL` and `BTL,NLD->BTD` sum over the heads
         in both, so its N factors B_n (r, W) act as their sum (and share one gradient)
    gate, up, down: one adapter each (x A B), with NO alpha / rank scaling (openpi's FeedForward
         adds the product as it is; its attention einsums scale by alpha / rank)

Both factors start from N(0, 0.01), as openpi's do (so training does not start exactly at the
pretrained model; the usual LoRA start, B = 0, is `init="zero"`). The factors keep openpi's
structure, so openpi LoRA checkpoints (`lora_a`, `lora_b`) convert one to one (convert_jax.py).

What stays trainable follows openpi's freeze filter: with LoRA on PaliGemma, everything under
`llm` is frozen (both experts' weights, the token embedding, the norms) except the LoRA factors
and, when the action expert has no LoRA, the action expert; with LoRA on the action expert alone,
only that expert is frozen. SigLIP and the action / time / state projections train. The frozen
weight keeps its name, so merging W += scale * delta gives a plain model back.

Axis legend (paligemma.py's): N heads, K kv heads, H head dim, W width, r the adapter's rank.
"""

import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from paligemma import ExpertLayer

# how openpi builds each projection's adapter: "heads_out" (one per output head), "heads_in"
# (one over the flattened input heads, its B summed over them), "plain" (one, unscaled)
LAYOUT = dict(q_proj="heads_out", k_proj="heads_out", v_proj="heads_out", o_proj="heads_in",
              gate_proj="plain", up_proj="plain", down_proj="plain")


class LoRALinear(torch.nn.Linear):
    """A frozen Linear plus a low-rank update laid out as openpi's (LAYOUT above).

    heads_out: lora_a (heads, r, in), lora_b (heads, out / heads, r): head g maps x to its slice.
    heads_in:  lora_a (r, in), lora_b (heads, out, r): x A^T, times the sum over the heads' B_g.
    plain:     lora_a (1, r, in), lora_b (1, out, r), unscaled."""

    def __init__(self, linear, rank, alpha, layout, groups=1, init="openpi"):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device=linear.weight.device)
        self.weight, self.bias = linear.weight, linear.bias
        self.weight.requires_grad_(False)
        self.layout, dev = layout, linear.weight.device
        G, fan_in, fan_out = groups, linear.in_features, linear.out_features
        shape_a = (rank, fan_in) if layout == "heads_in" else (G, rank, fan_in)
        shape_b = (G, fan_out // (G if layout == "heads_out" else 1), rank)
        a, b = torch.randn(shape_a, device=dev), torch.randn(shape_b, device=dev)
        if init == "openpi":
            a, b = a * 0.01, b * 0.01
        elif init == "zero":  # the LoRA paper's start: exactly the pretrained model
            a, b = a / fan_in ** 0.5, b * 0
        else:
            raise ValueError(f"LoRA init {init!r}: 'openpi' (both factors N(0, 0.01)) or 'zero' (B = 0)")
        self.lora_a, self.lora_b = torch.nn.Parameter(a), torch.nn.Parameter(b)
        self.scale = 1.0 if layout == "plain" else alpha / rank

    def forward(self, x):
        a, b = self.lora_a.to(x.dtype), self.lora_b.to(x.dtype)
        if self.layout == "heads_in":    # (..., in) -> (..., r) -> (..., out) through sum_g B_g
            update = F.linear(F.linear(x, a), b.sum(0))
        else:                            # (..., in) -> (..., heads, r) -> (..., heads, out / heads) -> (..., out)
            update = torch.einsum("...gr,gor->...go", torch.einsum("...i,gri->...gr", x, a), b).flatten(-2)
        return F.linear(x, self.weight, self.bias) + update * self.scale

    def merged_weight(self):
        """W + scale * the update as one (out, in) matrix."""
        if self.layout == "heads_in":
            delta = self.lora_b.sum(0) @ self.lora_a  # (out, in)
        else:
            delta = (self.lora_b @ self.lora_a).flatten(0, 1)  # (heads * out / heads, in)
        return self.weight + self.scale * delta


def add_lora(expert, rank, alpha, init="openpi"):
    """LoRA on every attention and MLP projection of one Gemma expert (a paligemma.Gemma.expert
    view), laid out as openpi's; the expert's other weights are frozen."""
    expert.requires_grad_(False)
    for layer in expert:
        if not isinstance(layer, ExpertLayer):  # the expert's final norm
            continue
        heads = {"q_proj": layer.q_proj.out_features // layer.head_dim,
                 "k_proj": layer.k_proj.out_features // layer.head_dim,
                 "v_proj": layer.v_proj.out_features // layer.head_dim,
                 "o_proj": layer.o_proj.in_features // layer.head_dim}
        for name, layout in LAYOUT.items():
            setattr(layer, name, LoRALinear(getattr(layer, name), rank, alpha, layout, heads.get(name, 1), init))


def apply_openpi_lora(model, parts, ranks, init="openpi"):
    """LoRA on the Gemma experts named in `parts` ("llm", "expert"), frozen as openpi's freeze
    filter freezes: LoRA on PaliGemma freezes the token embedding too."""
    for part in parts:
        add_lora(model.llm.expert({"llm": 0, "expert": 1}[part]), ranks[part], alpha=ranks[part], init=init)
    if "llm" in parts:
        model.llm.embed.requires_grad_(False)


def full_state(model):
    """A full, unsharded CPU state dict (works for plain, DDP-wrapped and FSDP2 models)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def merged_state(model):
    """The state dict with every LoRA update merged into its weight: the plain model's names."""
    state = dict(full_state(model))
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            state[f"{name}.weight"] = module.merged_weight().detach().cpu()
            del state[f"{name}.lora_a"], state[f"{name}.lora_b"]
    return state
