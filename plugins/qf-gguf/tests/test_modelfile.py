"""Ollama Modelfiles: chat templates translated to Go templates that render what transformers'
``apply_chat_template`` renders, stop tokens, the untranslatable left to the GGUF's own template,
``qf inspect``'s chat warnings, and llama.cpp stopping at the end of SmolLM2's answer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import quantfoundry as qf
from qf_gguf.inspect import inspect_gguf
from qf_gguf.modelfile import conversation, modelfile, render, wrappers
from quantfoundry.data import default_model_path

CHATML_DEFAULT = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                  "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
                  "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
         "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
         "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
         "{{'<start_of_turn>model\n'}}{% endif %}")
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
          "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
          "{% endif %}{% for message in loop_messages %}{% if loop.index0 == 0 and system_message != false %}"
          "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}"
          "{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
          "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
          "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


def test_the_go_subset_renders_as_go_does():
    t = '{{ range .Messages }}{{ if eq .Role "user" }}U[{{ .Content }}]\n{{ else if eq .Role "assistant" }}' \
        'A[{{ .Content }}]{{ else }}?{{ end }}{{ end }}G'
    msgs = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}, {"role": "tool", "content": "x"}]
    assert render(t, msgs) == "U[1]\nA[2]?G"
    assert render(t, []) == "G"
    with pytest.raises(ValueError, match="not supported"):
        render("{{- range .Messages }}{{ end }}", msgs)


@pytest.fixture
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_path()))


@pytest.mark.parametrize(("template", "system", "default"), [(CHATML_DEFAULT, True, "You are a helpful assistant."),
                                                             (LLAMA3, True, None), (GEMMA, False, None)])
def test_templates_translate_to_what_transformers_renders(tokenizer, template, system, default):
    tokenizer.chat_template = template
    w = wrappers(tokenizer)
    assert (w.system is not None) == system and w.default_system == default
    go = w.go_template()
    for msgs in [conversation(), *([conversation("Be brief.")] if system else [])]:
        want = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        given = msgs if default is None or msgs[0]["role"] == "system" else [{"role": "system", "content": default},
                                                                             *msgs]
        assert w.bos + render(go, given) == want
    text, notes = modelfile(tokenizer, Path(str(default_model_path())))
    assert text.startswith("FROM ./model.gguf\nTEMPLATE \"\"\"") and not notes
    assert ('SYSTEM """You are a helpful assistant."""' in text) == (default is not None)


def test_a_template_with_no_per_role_wrapping_is_left_to_the_gguf(tokenizer):
    tokenizer.chat_template = LLAMA2  # the system text goes inside the first [INST]
    text, notes = modelfile(tokenizer, Path(str(default_model_path())))
    assert "TEMPLATE" not in text and 'PARAMETER stop "</s>"' in text
    assert notes and "not translated" in notes[0]


def test_the_gguf_exporter_writes_it_and_inspect_warns(tmp_path):
    out = tmp_path / "q"
    r = qf.run(str(default_model_path()), exporter="gguf", format="Q8_0", out=str(out), evaluators=[],
               progress=False)
    assert (out / "Modelfile").read_text() == 'FROM ./model.gguf\nPARAMETER stop "</s>"\n'
    assert r.manifest["gguf"]["modelfile"]["template"] is False
    assert any("no chat template" in w for w in inspect_gguf(out)["warnings"])


def test_inspect_names_an_eos_outside_the_vocabulary_and_a_turn_end_that_does_not_stop(tmp_path):
    import gguf

    path = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "<|end_of_turn|>", "<|im_start|>"])
    w.add_token_types([1, 1, 3, 3])
    w.add_eos_token_id(7)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m.content }}<|end_of_turn|>{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    warnings = inspect_gguf(path)["warnings"]
    assert any("EOS token id 7 is outside the vocabulary (4 tokens)" in x for x in warnings), warnings
    assert any("'<|end_of_turn|>' ends turns" in x for x in warnings), warnings
    assert not any("<|im_start|>" in x for x in warnings)


def test_smollm2s_modelfile_and_llama_cpp_stops_at_the_end_of_the_answer(smollm2, tmp_path, llama_cpp_python):
    from transformers import AutoTokenizer

    out = tmp_path / "smol"
    qf.run(str(smollm2), exporter="gguf", format="Q8_0", out=str(out), evaluators=[], progress=False)
    text = (out / "Modelfile").read_text()
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    template = text.split('TEMPLATE """')[1].split('"""')[0]
    tok = AutoTokenizer.from_pretrained(str(smollm2))
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = render(template, [{"role": "system", "content": "You are a helpful AI assistant named SmolLM, trained "
                                                             "by Hugging Face"}, *msgs])
    assert prompt == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    llm = llama_cpp_python.Llama(model_path=str(out / "model.gguf"), n_ctx=512, verbose=False, seed=0)
    done = llm.create_completion(prompt, max_tokens=200, temperature=0.0)
    choice = done["choices"][0]
    assert choice["finish_reason"] == "stop", choice  # an end-of-generation token, before the 200-token cap
    assert "<|im_start|>" not in choice["text"] and choice["text"].strip()
    assert json.loads((out / "quantfoundry.json").read_text())["gguf"]["modelfile"]["template"] is True
