"""`specfast convert`: another trainer's offline hidden states -> specfast shards.

    specfast convert SRC --from specforge|angelslim|speculators --out SHARDS [--target T]
                     [--dtype bfloat16] [--on-error stop|skip] [--layer-ids a,b,c]
                     [--vocab FOLDER_OR_FILE | --draft-vocab-size N]

One module per source format (specforge.py, angelslim.py, speculators.py: each documents the
layout it reads), one shared loop (loop.py). The shards are written by
:class:`specfast.shards.ShardWriter`, so they are checksummed and a killed conversion resumes; the
manifest records the aux layers in specfast's convention and, under ``extra.converted_from``, the
ids and convention the source used. The target (only its config, tokenizer, embeddings, final norm
and lm_head are read) supplies the tokenizer hash and the full-vocabulary argmax stored per token.

A bad sample file (missing key, wrong shape, NaN or inf, lengths that disagree, ids outside the
vocabulary, a pickle that `torch.load(weights_only=True)` refuses) is named and either stops the
conversion (``--on-error stop``, the default) or is skipped and listed in ``convert_skipped.json``
and ``convert_report.json`` (``--on-error skip``); it is never written.
"""

from .common import SampleError
from .loop import SOURCES, convert

__all__ = ["SOURCES", "SampleError", "convert"]
