"""specfast.kernels: fused ops for EAGLE-3 draft training, usable without the trainer.

Each op has a plain-PyTorch reference (the definition of its math), a fast path (Triton on CUDA,
an efficient PyTorch path on CPU), and tests holding the fast path to the reference.
"""

from .pruned_vocab_loss import pruned_vocab_loss, pruned_vocab_loss_reference
from .rms_norm import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference
from .rope import rope, rope_reference
from .swiglu import swiglu, swiglu_reference
from .ttt_attention import ttt_attention, ttt_attention_reference
from .vocab_argmax import SplitVocabArgmax, full_vocab_argmax

__all__ = [
    "SplitVocabArgmax",
    "add_rms_norm",
    "add_rms_norm_reference",
    "full_vocab_argmax",
    "pruned_vocab_loss",
    "pruned_vocab_loss_reference",
    "rms_norm",
    "rms_norm_reference",
    "rope",
    "rope_reference",
    "swiglu",
    "swiglu_reference",
    "ttt_attention",
    "ttt_attention_reference",
]
