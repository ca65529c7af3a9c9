"""`specfast export --format vllm|sglang|speculators`: the vLLM/SGLang folder (one layout serves
both) and the speculators folder, checked against what vLLM's speculators config reader requires
(vllm/transformers_utils/configs/speculators: `speculators_model_type`, `transformer_layer_config`,
`speculators_config.proposal_methods[0].speculative_tokens`, `verifier.name_or_path`; EAGLE-3's
`draft_vocab_size`, `target_hidden_size`, `norm_before_residual` defaulting to true, vLLM-convention
aux ids) and read back to the same draft."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from specfast.cli import main
from specfast.conventions import aux_ids_to_vllm
from specfast.data.prepared import PreparedData
from specfast.export import export_draft
from specfast.model.checkpoint_files import save_draft_weights, step_dir_name
from specfast.model.load import new_draft, read_export
from specfast.targets import load_target


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_target_dir, tiny_prepared):
    """A run folder with one checkpoint and its config.yaml."""
    root = tmp_path_factory.mktemp("run")
    target = load_target(str(tiny_target_dir), device="cpu")
    draft = new_draft(target, PreparedData.load(tiny_prepared).vocab, True, torch.device("cpu"))
    ckpt = root / "checkpoints" / step_dir_name(5)
    ckpt.mkdir(parents=True)
    save_draft_weights(draft, ckpt)
    (ckpt / "state.json").write_text("{}")
    (root / "config.yaml").write_text(yaml.safe_dump({"target": str(tiny_target_dir)}))
    return root, draft


def test_vllm_and_sglang_are_one_layout(tmp_path, run):
    root, _ = run
    a = export_draft(root, tmp_path / "vllm", fmt="vllm")
    b = export_draft(root, tmp_path / "sglang", fmt="sglang")
    assert (a / "config.json").read_text() == (b / "config.json").read_text()
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="--format must be one of"):
        export_draft(root, tmp_path / "x", fmt="eagle")


def test_speculators_layout_matches_the_schema_vllm_reads(tmp_path, run, tiny_target_dir):
    root, draft = run
    args = ["export", str(root), "--out", str(tmp_path / "spec"), "--format", "speculators"]
    assert main(args) == 0
    c = json.loads((tmp_path / "spec" / "config.json").read_text())
    cfg = draft.config
    # what vLLM's SpeculatorsConfig.validate_speculators_config reads
    method = c["speculators_config"]["proposal_methods"][0]
    assert method["speculative_tokens"] >= 1
    assert c["speculators_config"]["verifier"]["name_or_path"] == str(tiny_target_dir)
    assert c["speculators_model_type"] == "eagle3"
    layer = c["transformer_layer_config"]
    assert isinstance(layer, dict)
    # what its update_eagle3 reads: explicit, because vLLM defaults norm_before_residual to true
    assert c["draft_vocab_size"] == cfg.draft_vocab_size
    assert c["target_hidden_size"] == cfg.target_hidden_size
    assert c["norm_before_residual"] is False
    assert c["eagle_aux_hidden_state_layer_ids"] == aux_ids_to_vllm(cfg.aux_layer_ids)
    # the layer config is a one-layer Llama config transformers accepts
    from transformers import LlamaConfig

    lc = LlamaConfig(**layer)
    assert lc.num_hidden_layers == 1 and lc.hidden_size == cfg.hidden_size
    assert lc.num_attention_heads == cfg.num_attention_heads
    assert lc.vocab_size == cfg.vocab_size
    w = load_file(str(tmp_path / "spec" / "model.safetensors"))
    assert not [k for k in w if k.startswith("midlayer.")]
    assert "layers.0.self_attn.q_proj.weight" in w and "fc.weight" in w
    assert w["d2t"].dtype == torch.int64 and w["t2d"].dtype == torch.bool
    assert "embed_tokens.weight" not in w
    assert all(v.dtype == torch.bfloat16 for v in w.values() if v.is_floating_point())


def test_speculators_export_reads_back_to_the_same_draft(tmp_path, run):
    root, _ = run
    t_v, c_v = read_export(export_draft(root, tmp_path / "vllm"))
    t_s, c_s = read_export(export_draft(root, tmp_path / "spec", fmt="speculators"))
    c_v.extra, c_s.extra = {}, {}
    assert c_v == c_s
    assert t_v.keys() == t_s.keys()
    assert all(torch.equal(t_v[k], t_s[k]) for k in t_v)


def test_aux_layer_ids_refuse_the_last_layers_output():
    """vLLM and SGLang capture layer inputs: the last layer's output (vLLM index L) is never
    captured, so a draft trained on it could not be served."""
    from specfast.conventions import check_aux_layer_ids

    check_aux_layer_ids([1, 14, 28], 30)
    with pytest.raises(ValueError, match="servers capture layer inputs"):
        check_aux_layer_ids([1, 14, 29], 30)
    with pytest.raises(ValueError, match="ascending"):
        check_aux_layer_ids([14, 1, 28], 30)
