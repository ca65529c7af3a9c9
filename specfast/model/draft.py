"""The EAGLE-3 draft, with tensor names exactly as vLLM and SGLang load them:

    fc             Linear(3·H_target → H): fuses the three aux hidden states
    midlayer       one decoder layer whose q/k/v read the 2H-wide
                   [input_layernorm(embed(token)), hidden_norm(h)]; its residual is h itself
    norm, lm_head  RMSNorm, Linear(H → V_draft)
    d2t, t2d       draft↔target vocabulary maps (buffers)

The token embedding is the target's, frozen and not saved. `attend` is a callback so the training
unroll (TTT attention over several steps) and the inference loop (a KV cache) share the layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from specfast.kernels import add_rms_norm, rms_norm, rope, swiglu

from .config import DraftConfig


class RMSNorm(nn.Module):
    """`weight · (x / rms(x))`, statistics in fp32, the normed value rounded to x's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """Inverse frequencies and attention scaling of whatever rope type the target uses (via
    transformers); the rotation itself is `specfast.kernels.rope`."""

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        from transformers import LlamaConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        lc = LlamaConfig(
            hidden_size=cfg.hidden_size,
            num_attention_heads=cfg.num_attention_heads,
            head_dim=cfg.head_dim,
            max_position_embeddings=cfg.max_position_embeddings,
            rope_parameters=cfg.rope_parameters(),
        )
        rope_type = cfg.rope_parameters()["rope_type"]
        if rope_type == "default":
            exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim
            inv_freq = 1.0 / (cfg.rope_theta**exponents)
            self.attention_scaling = 1.0
        else:
            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](lc, None)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, heads, T, D] rotated to integer positions [B, T] (rotate-half, as Llama)."""
        return rope(x, positions, self.inv_freq, self.attention_scaling)


class Attention(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(2 * cfg.hidden_size, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(2 * cfg.hidden_size, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(2 * cfg.hidden_size, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding):
        """x [B, T, 2H] -> q [B, nh, T, hd], k and v [B, nkv, T, hd], RoPE applied to q and k."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        return rotary(q, positions), rotary(k, positions), v


class MLP(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"draft MLP supports hidden_act 'silu', not {cfg.hidden_act!r}")
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    """Split in two around the attention call (`pre`, `post`) so that a step can be recomputed in
    backward without writing its keys into the caller's buffers a second time."""

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.norm_before_residual = cfg.norm_before_residual

    def pre(self, emb, h, positions, rotary):
        """q, k, v and the residual stream from the token embedding and the incoming hidden."""
        hn = self.hidden_norm(h)
        residual = hn if self.norm_before_residual else h
        x = torch.cat([self.input_layernorm(emb), hn], dim=-1)
        q, k, v = self.self_attn.qkv(x, positions, rotary)
        return q, k, v, residual

    def post(self, a, residual):
        """a [B, nh, T, hd] (attention output) -> the new hidden state (before the final `norm`)."""
        B, _, T, _ = a.shape
        o = self.self_attn.o_proj(a.transpose(1, 2).reshape(B, T, -1))
        norm = self.post_attention_layernorm
        h, y = add_rms_norm(residual, o, norm.weight, norm.eps)
        return h + self.mlp(y)

    def forward(self, emb, h, positions, rotary, attend, out_rows=None):
        """emb, h [B, T, H]; attend(q, k, v) -> [B, nh, T, hd]. `out_rows` (bool [T]): the rows
        whose new hidden state is returned; every row still gives its key and value."""
        q, k, v, residual = self.pre(emb, h, positions, rotary)
        return self.post(*_rows_of(attend(q, k, v), residual, out_rows))


def _rows_of(a, residual, rows):
    """The attention output [B, nh, T, hd] and residual [B, T, H] at `rows` (all when None)."""
    return (a, residual) if rows is None else (a[:, :, rows], residual[:, rows])


def init_logit_scale(head: torch.Tensor, norm_weight: torch.Tensor) -> float:
    """The factor on the target's final-norm weight that gives the draft unit-std logits at the
    start. The target's head times its norm gives logits of std ~6 on a unit-RMS hidden state
    (SmolLM2), and an untrained draft's hidden state is not the target's: the first losses are
    ~19 nats, not ~9, and the head's rows are pushed about before they help (measured: τ 1.29 →
    1.32 at 412 steps with the scale, worse than a fresh head without it). A unit-RMS state gives
    logit j a std of ‖w_j ⊙ norm‖, so divide by its mean over the draft's rows."""
    rows = (head.float() * norm_weight.float().to(head.device)).norm(dim=1)
    return 1.0 / float(rows.mean().clamp(min=1e-6))


class Eagle3Draft(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.config = cfg
        self.fc = nn.Linear(3 * cfg.target_hidden_size, cfg.hidden_size, bias=False)
        self.midlayer = DecoderLayer(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.int64))
        self.register_buffer("t2d", torch.zeros(cfg.vocab_size, dtype=torch.bool))
        # The target's embeddings, frozen and shared: not a parameter, not saved.
        self.register_buffer("embed_tokens", torch.zeros(0), persistent=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)

    def set_vocab(self, draft_ids: torch.Tensor) -> None:
        ids = draft_ids.to(torch.int64).to(self.d2t.device)
        if ids.numel() != self.config.draft_vocab_size or bool((ids[1:] <= ids[:-1]).any()):
            raise ValueError("draft ids must be strictly ascending, one per draft-vocabulary slot")
        self.d2t.copy_(ids - torch.arange(ids.numel(), device=ids.device))
        self.t2d.zero_()
        self.t2d[ids] = True

    @property
    def draft_ids(self) -> torch.Tensor:
        return self.d2t + torch.arange(self.d2t.numel(), device=self.d2t.device)

    def attach_target(
        self,
        embed_weight: torch.Tensor,
        lm_head_weight: torch.Tensor | None = None,
        final_norm_weight: torch.Tensor | None = None,
    ) -> None:
        """Share the target's frozen embeddings; optionally start lm_head from the target's own
        rows and the final norm from the target's, scaled by `init_logit_scale` (unit logits)."""
        self.embed_tokens = embed_weight.detach()
        with torch.no_grad():
            if lm_head_weight is not None:
                self.lm_head.weight.copy_(lm_head_weight[self.draft_ids.to(lm_head_weight.device)])
            if final_norm_weight is not None:
                scale = init_logit_scale(self.lm_head.weight, final_norm_weight)
                self.norm.weight.copy_(final_norm_weight * scale)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens.numel() == 0:
            raise RuntimeError(
                "draft has no token embeddings: call attach_target(target.embed_weight()) first"
            )
        return F.embedding(token_ids, self.embed_tokens).to(self.fc.weight.dtype)

    def step(self, token_ids, h, positions, attend, recompute: bool = False, out_rows=None):
        """One draft step: token_ids, positions [B, T]; h [B, T, H] (fc output, or the previous
        step's hidden state). Returns the new hidden state [B, T, H] before `norm`; with
        `out_rows` (bool [T]) only at those rows, the others giving only their keys and values
        (rows whose output nothing reads skip the output projection and the MLP).

        `recompute` (memory for time): backward keeps only the step's inputs and recomputes the
        rest, embedding and query included. `attend` must then also offer `write(k, v)` and
        `read(q)`: the keys and values are written once, outside any checkpoint, because a
        recompute must not write into the caller's buffers again."""
        layer = self.midlayer
        if not recompute:
            return layer(self.embed(token_ids), h, positions, self.rotary, attend, out_rows)

        def pre(ids, h, pos):
            return layer.pre(self.embed(ids), h, pos, self.rotary)

        def rest(ids, h, pos):
            q, _, _, residual = pre(ids, h, pos)
            return layer.post(*_rows_of(attend.read(q), residual, out_rows))

        _, k, v, _ = checkpoint(pre, token_ids, h, positions, use_reentrant=False)
        attend.write(k, v)
        return checkpoint(rest, token_ids, h, positions, use_reentrant=False)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))

    def trainable_state_dict(self) -> dict:
        return {k: v for k, v in self.state_dict().items() if k != "embed_tokens"}
