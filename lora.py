"""LoRA as train.py applies it: a frozen Linear plus a trainable low-rank update, merged on export.

    y = x W^T + (alpha / r) x A^T B^T,   A (r, in), B (out, r), B = 0 at the start

Applied to every attention and MLP projection of a Gemma expert (openpi's targets); the expert's
other weights (its norms) are frozen with it. The frozen weight keeps its name, so merging
W += (alpha / r) B A gives back a plain model that every loader reads.
"""

import math

import torch


class LoRALinear(torch.nn.Linear):
    """A frozen Linear plus a trainable low-rank update: y = x W^T + (alpha / r) x A^T B^T.

    B starts at zero, so training starts from the pretrained model exactly. The frozen weight
    keeps its name ("weight"), so merging (W += (alpha / r) B A) gives the plain model back.
    """

    def __init__(self, linear, rank, alpha):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device=linear.weight.device)
        self.weight, self.bias = linear.weight, linear.bias
        self.weight.requires_grad_(False)
        self.lora_a = torch.nn.Parameter(torch.randn(rank, linear.in_features, device=linear.weight.device)
                                         / math.sqrt(linear.in_features))
        self.lora_b = torch.nn.Parameter(torch.zeros(linear.out_features, rank, device=linear.weight.device))
        self.scale = alpha / rank

    def forward(self, x):
        update = torch.nn.functional.linear(torch.nn.functional.linear(x, self.lora_a), self.lora_b)
        return super().forward(x) + update * self.scale

    def merged_weight(self):
        return self.weight + self.scale * (self.lora_b @ self.lora_a)


def add_lora(expert, rank, alpha):
    """LoRA on every attention and MLP projection of one Gemma expert (openpi's targets);
    its other weights (the norms) are frozen too."""
    expert.requires_grad_(False)
    for layer in expert:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            if hasattr(layer, name):  # the expert's final norm has none
                setattr(layer, name, LoRALinear(getattr(layer, name), rank, alpha))
