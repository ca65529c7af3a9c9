"""DraftConfig: the draft's shape, copied from the target's config, plus the draft vocabulary size
and the aux layer ids. Checkpoints store it; export turns it into vLLM/SGLang config.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


class DraftFormatError(ValueError):
    """Stored draft weights or config that disagree with each other (export refuses them)."""


@dataclass
class DraftConfig:
    hidden_size: int
    target_hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int  # the target's vocabulary
    draft_vocab_size: int
    aux_layer_ids: list[int]  # outputs of these 0-based target layers feed `fc` (conventions.py)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # the target's rope_scaling / rope_parameters beyond theta
    max_position_embeddings: int = 4096
    hidden_act: str = "silu"
    norm_before_residual: bool = False  # False: the residual is h itself, not hidden_norm(h)
    target_num_layers: int = 0
    extra: dict = field(default_factory=dict)

    @staticmethod
    def from_target(cfg, draft_vocab_size: int, aux_layer_ids: list[int]) -> "DraftConfig":
        """cfg: the target's transformers config."""
        # transformers 5 keeps rope fields in `rope_parameters` (mirrored as `rope_scaling`); older
        # configs have `rope_theta` plus an optional `rope_scaling`. Plain RoPE exports
        # rope_scaling null.
        rope = dict(
            getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        )
        rope_theta = rope.pop("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = rope if rope_type != "default" else None
        heads = cfg.num_attention_heads
        return DraftConfig(
            hidden_size=cfg.hidden_size,
            target_hidden_size=cfg.hidden_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            intermediate_size=cfg.intermediate_size,
            vocab_size=cfg.vocab_size,
            draft_vocab_size=draft_vocab_size,
            aux_layer_ids=list(aux_layer_ids),
            rms_norm_eps=float(getattr(cfg, "rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=dict(scaling) if scaling else None,
            max_position_embeddings=getattr(cfg, "max_position_embeddings", 4096),
            hidden_act=getattr(cfg, "hidden_act", "silu"),
            target_num_layers=cfg.num_hidden_layers,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "DraftConfig":
        known = {f.name for f in fields(DraftConfig)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown draft config keys: {sorted(unknown)}")
        return DraftConfig(**d)

    def rope_parameters(self) -> dict:
        """In transformers' `rope_parameters` form, for the rotary embedding."""
        params = {"rope_type": "default"}
        if self.rope_scaling:
            params.update(self.rope_scaling)
            params.setdefault("rope_type", params.pop("type", "default"))
        params["rope_theta"] = self.rope_theta
        return params
