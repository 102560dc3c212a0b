"""LoRA as openpi does it: frozen weights plus trainable low-rank updates, merged on export.

    y = x W^T + (alpha / r) sum over heads of x A_h^T B_h^T

openpi puts LoRA on the einsums of both Gemma experts (`gemma_2b_lora`: rank 16, `gemma_300m_lora`:
rank 32, alpha = rank) and keeps the heads apart: its attention weights carry a head axis, and the
LoRA factors keep it. So q, k and v get one rank-r adapter per head (each from the full width to
that head's slice), the attention output one per head (from that head's slice to the full width,
summed), while the MLP's gate, up and down projections get one adapter each. Both factors start
from N(0, 0.01), as openpi's do (so training does not start exactly at the pretrained model; the
usual LoRA start, B = 0, is `init="zero"`).

What stays trainable follows openpi's freeze filter: with LoRA on PaliGemma, everything under
`llm` is frozen (both experts' weights, the token embedding, the final norms) except the LoRA
factors and, when the action expert has no LoRA, the action expert; with LoRA on the action
expert alone, only that expert is frozen. SigLIP and the action / time / state projections train.
The frozen weight keeps its name, so merging W += (alpha / r) B A gives a plain model back.
"""

import torch
import torch.nn.functional as F


class LoRALinear(torch.nn.Linear):
    """A frozen Linear plus `groups` low-rank updates: over output slices (heads_out, openpi's
    q / k / v), over input slices (heads_in, its attention output), or one (groups = 1).

    A (G, r, in / G_in), B (G, out / G_out, r): group g maps its input (all of x, or slice g) to
    its output (slice g, or all of y, summed over groups)."""

    def __init__(self, linear, rank, alpha, heads_out=1, heads_in=1, init="openpi"):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device=linear.weight.device)
        self.weight, self.bias = linear.weight, linear.bias
        self.weight.requires_grad_(False)
        assert heads_out == 1 or heads_in == 1, "heads on one side only"
        self.heads_out, self.heads_in, G = heads_out, heads_in, max(heads_out, heads_in)
        dev = linear.weight.device
        a = torch.randn(G, rank, linear.in_features // heads_in, device=dev)
        b = torch.randn(G, linear.out_features // heads_out, rank, device=dev)
        if init == "openpi":
            a, b = a * 0.01, b * 0.01
        elif init == "zero":  # the LoRA paper's start: exactly the pretrained model
            a, b = a / a.shape[-1] ** 0.5, b * 0
        else:
            raise ValueError(f"LoRA init {init!r}: 'openpi' (both factors N(0, 0.01)) or 'zero' (B = 0)")
        self.lora_a, self.lora_b = torch.nn.Parameter(a), torch.nn.Parameter(b)
        self.scale = alpha / rank

    def forward(self, x):
        a, b = self.lora_a.to(x.dtype), self.lora_b.to(x.dtype)
        if self.heads_in > 1:  # (..., G, in / G) -> (..., G, r) -> sum_g (..., out)
            h = torch.einsum("...gi,gri->...gr", x.unflatten(-1, (self.heads_in, -1)), a)
            update = torch.einsum("...gr,gor->...o", h, b)
        else:                  # (..., in) -> (..., G, r) -> (..., G, out / G) -> (..., out)
            update = torch.einsum("...gr,gor->...go", torch.einsum("...i,gri->...gr", x, a), b).flatten(-2)
        return F.linear(x, self.weight, self.bias) + update * self.scale

    def merged_weight(self):
        """W + scale * the updates as one (out, in) matrix."""
        delta = self.lora_b @ self.lora_a  # (G, out / G_out, in / G_in)
        if self.heads_in > 1:
            delta = delta.permute(1, 0, 2).flatten(1)  # (out, G * in / G)
        else:
            delta = delta.flatten(0, 1)                # (G * out / G, in)
        return self.weight + self.scale * delta


def add_lora(expert, rank, alpha, init="openpi"):
    """LoRA on every attention and MLP projection of one Gemma expert (a paligemma.Gemma.expert
    view), per head where openpi's einsums have heads; the expert's other weights are frozen."""
    expert.requires_grad_(False)
    for layer in expert:
        if not hasattr(layer, "q_proj"):  # the expert's final norm
            continue
        N, K = layer.q_proj.out_features // layer.head_dim, layer.k_proj.out_features // layer.head_dim
        heads = dict(q_proj=dict(heads_out=N), k_proj=dict(heads_out=K), v_proj=dict(heads_out=K),
                     o_proj=dict(heads_in=N), gate_proj={}, up_proj={}, down_proj={})
        for name, kw in heads.items():
            setattr(layer, name, LoRALinear(getattr(layer, name), rank, alpha, init=init, **kw))


def apply_openpi_lora(model, parts, ranks, init="openpi"):
    """LoRA on the Gemma experts named in `parts` ("llm", "expert"), frozen as openpi's freeze
    filter freezes: LoRA on PaliGemma freezes the token embedding too."""
    for part in parts:
        add_lora(model.llm.expert({"llm": 0, "expert": 1}[part]), ranks[part], alpha=ranks[part], init=init)
    if "llm" in parts:
        model.llm.embed.requires_grad_(False)
