"""bp_common.chat on real upstream templates (TRL's copies): rendering, assistant masks, EOS/BOS checks."""
from __future__ import annotations

from pathlib import Path

import pytest

from bp_common import chat

TRL_TEMPLATES = Path(__import__("trl").__file__).parent / "chat_templates"
# Special tokens each family's template writes, and its bos/eos.
FAMILIES = {
    "llama3": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "qwen2_5": (["<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|im_end|>"),
    "qwen3": (["<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|im_end|>"),
    "gemma": (["<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<end_of_turn>", "<end_of_turn>"),
    "phi3": (["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"], None, "<|endoftext|>", "<|end|>"),
}
CONV = [
    {"role": "user", "content": "What does the cat say?"},
    {"role": "assistant", "content": "The cat says meow."},
    {"role": "user", "content": "And the dog?"},
    {"role": "assistant", "content": "The dog says woof."},
]


def family_tokenizer(tiny_llama, family: str, template: str | None = None):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    specials, bos, eos, _eot = FAMILIES[family]
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.bos_token = bos
    tok.eos_token = eos
    tok.chat_template = template if template is not None else (TRL_TEMPLATES / f"{family}.jinja").read_text()
    return tok


def assistant_runs(tok, enc):
    runs, cur = [], []
    for i, m in zip(enc.input_ids, enc.assistant_mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_tiny_chatml_uses_template_markers(tiny_llama):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    assert chat.mask_mode(tok) == "template"
    enc = chat.tokenize_conversation(tok, CONV)
    assert assistant_runs(tok, enc) == ["The cat says meow.<|im_end|>", "The dog says woof.<|im_end|>"]
    assert enc.problems == []
    assert chat.end_of_turn_token(tok) == "<|im_end|>"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_upstream_templates_mask_each_assistant_turn(tiny_llama, family):
    tok = family_tokenizer(tiny_llama, family)
    eot = FAMILIES[family][3]
    assert chat.end_of_turn_token(tok) == eot
    mode = chat.mask_mode(tok)
    assert mode in ("template", "derived")
    enc = chat.tokenize_conversation(tok, CONV)
    assert enc.text == chat.render(tok, CONV)  # masks never change the model's own rendering
    runs = [r.strip() for r in assistant_runs(tok, enc)]
    answers = ["The cat says meow.", "The dog says woof."]
    if family == "qwen3":
        # Qwen3 re-renders history (old reasoning dropped): only the final turn is recoverable.
        assert mode == "derived" and enc.problems == ["history_rewritten:last_turn_only"]
        answers = answers[1:]
    else:
        assert enc.problems == [], enc.problems
    assert len(runs) == len(answers)
    for run, answer in zip(runs, answers):
        assert answer in run and eot in run
        assert "dog?" not in run and "cat say?" not in run  # never the user's words


@pytest.mark.parametrize("family", ["llama3", "gemma", "phi3"])
def test_derived_masks_agree_with_marked_templates(tiny_llama, family):
    """A template TRL does not know (one extra comment) is derived by prefix rendering; the answer
    tokens found must be the ones the generation markers find."""
    tmpl = (TRL_TEMPLATES / f"{family}.jinja").read_text() + "{# local copy #}"
    tok = family_tokenizer(tiny_llama, family, tmpl)
    assert chat.mask_mode(tok) == "derived"
    derived = chat.tokenize_conversation(tok, CONV)
    marked = chat.tokenize_conversation(family_tokenizer(tiny_llama, family), CONV)
    assert derived.input_ids == marked.input_ids
    # Marked templates may also label a final EOS after the end-of-turn token; compare answers.
    strip = lambda runs: [r.replace(tok.eos_token, "").strip() for r in runs]
    assert strip(assistant_runs(tok, derived)) == strip(assistant_runs(tok, marked))
    assert derived.mode == "derived" and derived.problems == []


def test_template_whose_generation_prompt_differs_is_unavailable(tiny_llama):
    # The generation prompt is not how an assistant turn starts: no prefix can be found.
    tmpl = ("{% for m in messages %}{{ m.role }}: {{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}Answer: {% endif %}")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    tok.chat_template = tmpl
    assert chat.mask_mode(tok) == "unavailable"
    enc = chat.tokenize_conversation(tok, CONV)
    assert enc.assistant_mask is None and enc.mode == "unavailable"


def test_history_rewriting_template_masks_the_last_turn(tiny_llama):
    # Earlier assistant turns are shortened once later turns exist: only the last is trainable.
    tmpl = ("{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}A: ...\n"
            "{% else %}{{ m.role[0]|upper }}: {{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}A: {% endif %}")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    tok.chat_template = tmpl
    enc = chat.tokenize_conversation(tok, CONV)
    assert enc.mode == "derived" and "history_rewritten:last_turn_only" in enc.problems
    assert [r.strip() for r in assistant_runs(tok, enc)] == ["The dog says woof.<|im_end|>"]


def test_missing_end_of_turn_is_reported(tiny_llama):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}"
                         "{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    enc = chat.tokenize_conversation(tok, CONV[:2])
    assert "eos_not_labelled" in enc.problems


def test_double_bos_is_reported(tiny_llama):
    tok = family_tokenizer(tiny_llama, "llama3")
    enc = chat.tokenize_conversation(tok, CONV[:2])
    assert enc.problems == []
    bad = [{"role": "user", "content": "<|begin_of_text|>hi"}, CONV[1]]
    assert "bos_count:2" in chat.tokenize_conversation(tok, bad).problems


def test_gemma_refuses_system_turn(tiny_llama):
    tok = family_tokenizer(tiny_llama, "gemma")
    with pytest.raises(chat.ChatError):
        chat.tokenize_conversation(tok, [{"role": "system", "content": "x"}] + CONV[:2])


def test_stop_ids_and_pad_is_eos(tiny_llama):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    ids = chat.stop_token_ids(tok, {"eos_token_id": [tok.convert_tokens_to_ids("<|endoftext|>")]})
    assert ids[0] == tok.convert_tokens_to_ids("<|im_end|>") and len(ids) == 2
    assert not chat.pad_is_eos(tok)
    tok.pad_token = tok.eos_token
    assert chat.pad_is_eos(tok)
