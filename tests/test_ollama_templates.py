"""bp-ollama's TEMPLATE: the Go template translated from a model's Jinja chat template, rendered by Go's
own text/template with Ollama's data, equals what transformers' apply_chat_template writes."""
from __future__ import annotations

import pytest

from bp_common.errors import BpError
from bp_ollama.derivation import Options, derive
from bp_ollama.gotemplate import TurnFormat, go_template, render_format, translate
from bp_ollama.modelfile import get
from bp_ollama.source import resolve_source
from ollama_fixtures import FAMILIES

SYSTEM = "You are a farm guide. Answer in one sentence."
TURNS = [("user", "What does the cow say?"), ("assistant", "The cow says moo."),
         ("user", "And the sheep?"), ("assistant", "The sheep says baa."),
         ("user", "And the duck?")]


def msgs(pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def derived_for(fam):
    return derive(resolve_source(str(fam.manifest)), Options())


def expected(fam, messages):
    """apply_chat_template's text, less a leading BOS when the GGUF's tokenizer adds BOS itself."""
    text = fam.hf_render(messages)
    bos = fam.spec.bos
    if fam.spec.add_bos and bos and text.startswith(bos):
        return text[len(bos):]
    return text


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_go_rendering_equals_apply_chat_template(name, template_family, go_render):
    fam = template_family(name)
    d = derived_for(fam)
    template = get(d.commands, "template")
    cases = [msgs(TURNS)]
    if name != "gemma":  # Gemma's template refuses a system turn
        cases.append(msgs([("system", SYSTEM)] + TURNS))
    got = go_render(template, cases)
    for messages, text in zip(cases, got):
        assert text == expected(fam, messages), (name, len(messages))
    # The turn markers really are in there, and the prompt ends ready for the answer.
    assert "The sheep says baa." in got[0] and got[0] != "".join(c for _, c in TURNS)
    if name == "chatml":
        assert got[0].endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("name", ["llama3", "llama3_1", "mistral", "gemma", "gemma3"])
def test_bos_is_left_to_the_runtime_when_the_gguf_adds_it(name, template_family, go_render):
    fam = template_family(name)
    hf = fam.hf_render(msgs(TURNS))
    assert hf.startswith(fam.spec.bos)
    go = go_render(get(derived_for(fam).commands, "template"), [msgs(TURNS)])[0]
    assert not go.startswith(fam.spec.bos) and fam.spec.bos + go == hf


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_stops_num_ctx_and_parameters(name, template_family):
    fam = template_family(name)
    d = derived_for(fam)
    stops = [a for n, a in d.commands if n == "stop"]
    assert stops[0] == fam.spec.eot
    for text in fam.spec.gen_eos:
        assert text in stops, (name, text, stops)
    assert len(stops) == len(set(stops))
    assert get(d.commands, "num_ctx") == str(fam.seq_len)  # the training sequence length, not 8192
    assert "training sequence length" in d.num_ctx_source
    assert get(d.commands, "temperature") == "0.7"


def test_placements_match_the_families(template_family):
    placements = {n: derived_for(template_family(n)).translation.format.placement for n in FAMILIES}
    assert placements["mistral"] == "last_user"
    assert placements["gemma"] == placements["gemma3"] == "first_user"
    assert placements["qwen2_5"] == placements["llama3_1"] == placements["chatml"] == "turn"
    # Qwen2.5 writes a default system prompt when none is given; the TEMPLATE does too.
    fmt = derived_for(template_family("qwen2_5")).translation.format
    assert "You are Qwen, created by Alibaba Cloud." in fmt.no_system


def test_gemma_system_prompt_goes_where_gemma3_puts_it(template_family, go_render):
    """Gemma's template refuses a system turn; the translation writes it as Gemma 3's template does."""
    gemma, gemma3 = template_family("gemma"), template_family("gemma3")
    with pytest.raises(Exception):
        gemma.hf_render(msgs([("system", SYSTEM)] + TURNS))
    d = derived_for(gemma)
    assert not d.translation.system_supported
    assert any("refuses a system message" in w for w in d.warnings)
    with_system = msgs([("system", SYSTEM)] + TURNS)
    got = go_render(get(d.commands, "template"), [with_system])[0]
    assert got == expected(gemma3, with_system)


@pytest.mark.parametrize("name", ["chatml", "llama3_1", "mistral", "gemma3", "qwen2_5"])
def test_python_mirror_matches_go(name, template_family, go_render):
    """render_format (used to verify translations) renders exactly what Go does, for odd chats too."""
    fmt = derived_for(template_family(name)).translation.format
    cases = [
        msgs(TURNS[:1]),
        msgs(TURNS[:2]),                                   # a prefill: the answer is left open
        msgs([("system", "A"), ("system", "B")] + TURNS),  # two system messages: joined by a blank line
        msgs([("user", "one"), ("user", "two"), ("assistant", "ok"), ("assistant", "fine"), ("user", "x")]),
        msgs([("system", SYSTEM), ("user", "{{ .System }} and {{ not a template }}")]),
        msgs([("user", "hi"), ("tool", "42"), ("user", "thanks")]),
    ]
    got = go_render(go_template(fmt), cases)
    assert got == [render_format(fmt, c) for c in cases]


def test_literal_braces_in_a_template_survive(go_render):
    jinja = ("{% for m in messages %}{{ '{{' + m['role'] + '}} ' + m['content'] + ' {{end}}\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '{{assistant}} ' }}{% endif %}")
    tr = translate(jinja, {}, add_bos=False)
    cases = [msgs([("system", SYSTEM)] + TURNS), msgs(TURNS)]
    from bp_ollama.gotemplate import render_jinja
    assert go_render(tr.template, cases) == [render_jinja(jinja, c, {}) for c in cases]


def test_a_template_that_repeats_content_is_refused_with_the_reason(tmp_path, go_render):
    from helpers.gguf_files import write_gguf
    jinja = "{% for m in messages %}{{ m['content'] }}|{{ m['content'] }}\n{% endfor %}"
    g = write_gguf(tmp_path / "twice.gguf", tokens=["a", "b"], eos=1, chat_template=jinja)
    src = resolve_source(str(g))
    with pytest.raises(BpError) as err:
        derive(src, Options())
    assert err.value.code == "OLLAMA_TEMPLATE_UNSUPPORTED" and err.value.exit_code == 65
    assert "2 times" in err.value.message and "--template" in err.value.hint
    # --template FILE supplies one instead.
    t = tmp_path / "t.gotmpl"
    t.write_text("{{ range .Messages }}{{ .Content }}\n{{ end }}")
    d = derive(src, Options(template_file=t))
    assert get(d.commands, "template") == t.read_text() and d.template_source.startswith("--template")
    assert go_render(get(d.commands, "template"), [msgs(TURNS[:2])]) == ["What does the cow say?\nThe cow says moo.\n"]


def test_a_gguf_without_a_chat_template_is_a_documented_error(tmp_path):
    from helpers.gguf_files import write_gguf
    g = write_gguf(tmp_path / "plain.gguf", tokens=["a", "</s>"], eos=1)
    with pytest.raises(BpError) as err:
        derive(resolve_source(str(g)), Options())
    assert err.value.code == "CONFIG_NO_CHAT_TEMPLATE" and err.value.exit_code == 64
    assert "--template" in err.value.hint


def test_turn_format_written_as_go_keeps_whitespace(go_render):
    fmt = TurnFormat(bos="", no_system="  \n", placement="turn", system_prefix="\n<s> ", system_suffix=" \n\n",
                     user_prefix="\tU: ", user_suffix=" \n", assistant_prefix="A:\n ", assistant_suffix="\n\n",
                     generation="A:\n ")
    cases = [msgs(TURNS), msgs([("system", " S ")] + TURNS), msgs(TURNS[:2])]
    assert go_render(go_template(fmt), cases) == [render_format(fmt, c) for c in cases]
