"""gate_map(): per-token gate values of an IMSM model for a list of prompts, and their picture."""

from __future__ import annotations

import pytest
import torch
from helpers import char_llama_config
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from imsm_bench.skills import build_tokenizer
from peft_imsm import IMSMConfig
from peft_imsm.gate_maps import GateMap, gate_map
from peft_imsm.model import find_imsm_tuner

PROMPTS = ["<kobe> ends:", "add 12+7=", "reverse lyr="]


def imsm_model():
    tok = build_tokenizer()
    tok.padding_side = "left"
    torch.manual_seed(0)
    base = LlamaForCausalLM(char_llama_config(tok))
    model = get_peft_model(base, IMSMConfig(adapter_config=LoraConfig(r=4, target_modules="all-linear",
                                                                      init_lora_weights=False)))  # fmt: skip
    with torch.no_grad():
        find_imsm_tuner(model).gate.W_B.weight.normal_(std=0.5)  # a gate that varies along the sequence
    return model.eval(), tok


def test_rows_tokens_and_prompt_lengths():
    model, tok = imsm_model()
    gm = gate_map(model, tok, PROMPTS, completions=["ke", "19", "ryl"])
    for row, (prompt, completion) in enumerate(zip(PROMPTS, ["ke", "19", "ryl"])):
        ids = tok(prompt)["input_ids"]
        assert gm.prompt_lengths[row] == len(ids)
        assert gm.token_ids[row] == ids + tok(completion, add_special_tokens=False)["input_ids"]
        assert "".join(gm.tokens[row][1:]) == prompt + completion  # (character tokens after <bos>)
        assert gm.gate[row].shape == (len(gm.token_ids[row]),)
        assert ((gm.gate[row] > 0) & (gm.gate[row] < 1)).all()
        assert gm.gate[row].std() > 0


def test_forced_gate_value_is_reported_everywhere():
    model, tok = imsm_model()
    find_imsm_tuner(model).gate.forced_value = 0.25
    gm = gate_map(model, tok, PROMPTS, completions=["ke", "19", "ryl"])
    for values in gm.gate:
        assert torch.equal(values, torch.full_like(values, 0.25))


def test_prompt_values_do_not_depend_on_the_completion_or_the_batch():
    """The query is the prompt, so the gate on prompt tokens is the same with or without a completion after them,
    and each row's values do not depend on the other rows (padding removed)."""
    model, tok = imsm_model()
    alone = gate_map(model, tok, PROMPTS, batch_size=1)
    with_answers = gate_map(model, tok, PROMPTS, completions=["ke", "19", "ryl"], batch_size=3)
    for row in range(len(PROMPTS)):
        n = alone.prompt_lengths[row]
        torch.testing.assert_close(with_answers.gate[row][:n], alone.gate[row], atol=1e-5, rtol=0)


def test_generated_tokens_carry_the_gate_that_generation_used():
    model, tok = imsm_model()
    new = 5
    gm = gate_map(model, tok, PROMPTS[:1], max_new_tokens=new)
    ids = torch.tensor([tok(PROMPTS[0])["input_ids"]])
    with find_imsm_tuner(model).record_gate(per_token=True) as log:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)  # fmt: skip
    generated = out[0, ids.shape[1] :].tolist()
    eos = tok.eos_token_id
    if eos in generated:
        generated = generated[: generated.index(eos) + 1]
    assert gm.token_ids[0] == ids[0].tolist() + generated
    # prefill: every prompt position; then one position per decoding step
    used = torch.cat([log[0][0], *[step[0] for step in log[1:]]])
    n = ids.shape[1]
    steps = len(generated)
    torch.testing.assert_close(gm.gate[0][: n + steps - 1], used[: n + steps - 1], atol=1e-5, rtol=0)


def test_plot_writes_a_png_with_one_row_per_prompt(tmp_path):
    import matplotlib.image

    model, tok = imsm_model()
    gm = gate_map(model, tok, PROMPTS, completions=["ke", "19", "ryl"])
    path = tmp_path / "map.png"
    fig = gm.plot(str(path), title="test", row_labels=["ends", "add", "reverse"])
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 100
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["ends", "add", "reverse"]
    assert ax.images[0].get_array().shape == (3, max(len(t) for t in gm.tokens))
    with pytest.raises(ValueError, match="row_labels has 1 entries for 3 rows"):
        gm.plot(row_labels=["x"])
    with pytest.raises(ValueError, match="no rows"):
        GateMap([], [], [], [], []).plot()


def test_bad_input():
    model, tok = imsm_model()
    with pytest.raises(ValueError, match="at least one prompt"):
        gate_map(model, tok, [])
    with pytest.raises(ValueError, match="2 completions for 3 prompts"):
        gate_map(model, tok, PROMPTS, completions=["a", "b"])
    with pytest.raises(ValueError, match="either completions or max_new_tokens"):
        gate_map(model, tok, PROMPTS, completions=["a", "b", "c"], max_new_tokens=2)
    with pytest.raises(TypeError, match="Expected an IMSM peft model"):
        gate_map(model.get_base_model(), tok, PROMPTS)


def test_the_pad_id_and_device_helpers():
    from types import SimpleNamespace

    from peft_imsm.backbone import model_device
    from peft_imsm.padding import pad_token_id

    assert pad_token_id(SimpleNamespace(pad_token_id=5, eos_token_id=2)) == 5
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0 and pad_token_id(None) == 0
    model, _ = imsm_model()
    assert model_device(model) == torch.device("cpu") == model_device(torch.nn.Linear(2, 2))
