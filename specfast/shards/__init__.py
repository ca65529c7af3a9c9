"""Hidden-state shards: capture a target's hidden states once, train many epochs from disk.

The Python API over the C++ extension ``specfast._shardio``, one job per module:

- :class:`ShardWriter` (``writer.py``) writes samples into shards, crash-safe and resumable.
- :class:`ShardDataset` (``dataset.py``) opens a shard directory, checks it against what the
  caller expects, and reads single samples.
- :class:`ShardReader` (``reader.py``) reads the batches of sample indices it is given, in that
  order, on C++ threads into (optionally pinned) host buffers, verifying every sample. It does
  not choose the order or the packing: :class:`specfast.data.plan.BatchPlan` does.
- :class:`ShardError` (a ``ValueError``) is the one exception for bad data: truncated, corrupt,
  missing or mismatched shards. Its message names the file, and the sample where there is one.
- ``format.py`` holds what the format below defines: fields, header, manifest, capture config.

Usage::

    with ShardWriter(out_dir, capture_config) as w:            # resumes an interrupted capture
        for sample in samples[w.num_samples_done:]:            # dicts of numpy / torch tensors
            w.add(sample)

    ds = ShardDataset(out_dir, expect={"hidden_size": 576, "aux_layer_ids": [1, 13, 26],
                                       "tokenizer_hash": tok_hash, "dtype": "bfloat16"})
    plan = BatchPlan(ds.sample_lengths, budget, seed)          # specfast.data.plan
    plan.load_state_dict(saved)                                # when resuming
    with ShardReader(ds, plan.upcoming(), budget,
                     pin_memory=torch.cuda.is_available()) as reader:
        for batch in reader:  # aux_hidden [T, 3H], final_hidden [T, H], input_ids [T], loss_mask
                              # [T], (target_argmax [T]), offsets [B+1], sample_ids [B]
            plan.next()       # moves the plan past this batch: plan.state_dict() resumes here
            ...

Format (version 1)
==================

A dataset is a directory::

    manifest.json
    shard-000000.safetensors
    shard-000001.safetensors
    ...

Shard files
-----------
Every shard is a valid safetensors file (``safetensors.safe_open`` opens it) holding S >= 1
samples with N tokens in all. Per-token tensors are the samples concatenated along the token
axis; ``offsets`` gives the sample boundaries.

===================  ========  ===================  ============================================
tensor               shape     dtype                meaning
===================  ========  ===================  ============================================
``aux_hidden``       [N, K*H]  BF16 / F16 / F32     K target hidden states, concatenated (K = 3
                                                    for EAGLE-3), in ``aux_layer_ids`` order
``final_hidden``     [N, H]    as aux_hidden        the target's last hidden state *after* its
                                                    final norm, i.e. what its lm_head consumes
                                                    (HF ``hidden_states[-1]``), so that
                                                    ``final_hidden @ lm_head.weight.T`` equals
                                                    the target's logits
``input_ids``        [N]       I32 (default) / I64  token ids
``loss_mask``        [N]       BOOL                 True where the token is supervised
``target_argmax``    [N]       I32 / I64, optional  the target's full-vocabulary argmax per
                                                    token (saves recomputing it in training);
                                                    -1 where it cannot matter (the next token
                                                    is not supervised) and was not computed
``positions``        [N]       I32 / I64, optional  the draft's RoPE position per token where the
                                                    target has its own (mRoPE: row 0 of the
                                                    target's positions); absent: the position
                                                    within the sample
``offsets``          [S+1]     I64                  sample j is tokens [offsets[j], offsets[j+1])
``sample_checksum``  [S]       U64                  xxh64 (seed 0) of sample j's bytes in the
                                                    per-token tensors, in the order above
``pad.<name>``       [p]       U8                   zero padding after tensor <name>, 1..4095 B
===================  ========  ===================  ============================================

Alignment. The JSON header is padded with spaces so that the data starts at a multiple of 4096
bytes. safetensors requires the data region to be covered exactly, with no holes between tensors
and nothing after the last one (``safe_open`` rejects both; verified), so alignment cannot come
from gaps: after every tensor whose end is not a multiple of 4096, a ``pad.<name>`` U8 tensor
fills the gap to the next 4 KiB boundary. Every tensor, and the end of the file, is therefore
4 KiB aligned, so a reader may use O_DIRECT or GPUDirect Storage on them (specfast's own reader
reads through the page cache); the cost is < 4 KiB per tensor per shard. Tensors appear in the
order of the table. ``__metadata__`` holds ``format`` ("specfast-shard"), ``version``,
``samples``, ``tokens``, ``hidden_size``, ``aux_layer_ids`` (JSON list) and
``aux_layer_convention``, so a shard copied out alone still says what it holds.

Aux layer convention. ``aux_layer_ids`` are 0-based decoder-layer indices and entry i is the
*output* of layer ``aux_layer_ids[i]`` (HF ``output_hidden_states`` index ``aux_layer_ids[i] + 1``;
for the last layer that HF entry is after the final norm, so capture it with a hook). vLLM's
``eagle_aux_hidden_state_layer_ids`` name the *input* of a layer instead: vLLM's ``j`` is our
``j - 1``. The manifest records this as ``"aux_layer_convention": "layer_output_0based"``
(:data:`specfast.conventions.AUX_LAYER_CONVENTION`); the writer accepts nothing else, so a
capture that mixed them up must say so explicitly and fail, not train a silently bad draft.

manifest.json
-------------
::

    {"format": "specfast-shards", "version": 1,
     "complete": true,              # false while a capture runs or after it died
     "capture": {"target": "...", "aux_layer_ids": [1, 14, 26],
                 "aux_layer_convention": "layer_output_0based", "hidden_size": 576,
                 "dtype": "bfloat16", "tokenizer_hash": "...", "extra": {...}},
     "layout": {"alignment": 4096, "checksum": "xxh64", "index_dtype": "int32",
                "shard_tokens": 58254,
                "fields": {"aux_hidden": {"dtype": "BF16", "token_shape": [1728]}, ...}},
     "totals": {"shards": 2, "samples": 120, "tokens": 98765, "bytes": 455086080},
     "shards": [{"file": "shard-000000.safetensors", "samples": 61, "tokens": 58100,
                 "bytes": 267767808, "xxh64": "<hex16>", "header_xxh64": "<hex16>",
                 "index_xxh64": "<hex16>"}, ...]}

``xxh64`` covers the whole file (``ShardDataset.verify``), ``header_xxh64`` the first bytes up to
the data start (length prefix and padded JSON), ``index_xxh64`` the ``offsets`` bytes followed by
the ``sample_checksum`` bytes. Opening a dataset checks sizes, headers and indexes; reading checks
each sample against ``sample_checksum``. Together every byte a reader uses is verified.

Crash safety. Each shard and the manifest are written to ``.<name>.tmp``, fsynced, renamed into
place, and the directory fsynced. The manifest is the commit point: a shard exists for readers only
once it is listed there. A writer reopened on the directory keeps the listed shards, deletes temp
files and unlisted shard files left by a killed run, and reports ``num_samples_done`` so the
capture skips what is already stored. Shard boundaries depend only on the sample stream and
``shard_tokens``, so a killed-and-resumed capture produces the same files as an uninterrupted one.
"""

from specfast.conventions import AUX_LAYER_CONVENTION
from specfast.shards.dataset import ShardDataset
from specfast.shards.format import ALIGN, FORMAT, MANIFEST, SHARD_FORMAT, VERSION, ShardError
from specfast.shards.reader import ShardReader
from specfast.shards.writer import ShardWriter

__all__ = [
    "ALIGN",
    "AUX_LAYER_CONVENTION",
    "FORMAT",
    "MANIFEST",
    "SHARD_FORMAT",
    "VERSION",
    "ShardDataset",
    "ShardError",
    "ShardReader",
    "ShardWriter",
]
