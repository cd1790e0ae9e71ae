"""Modelfiles: read as Ollama reads them, written so Ollama reads back the same values, validated;
a user's --modelfile is honoured; names and hosts are checked before they reach a request."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bp_common.errors import BpError
from bp_ollama import modelfile as mfile
from bp_ollama.client import parse_host
from bp_ollama.derivation import Options, derive
from bp_ollama.names import check_name
from bp_ollama.source import resolve_source
from helpers.gguf_files import write_gguf

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture
def chatml_gguf(tmp_path):
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b"]
    return write_gguf(tmp_path / "m.gguf", tokens=tokens, token_types=[3, 3, 3, 1, 1], bos=0, eos=2,
                      add_bos=False, chat_template=CHATML, context_length=32768, license="apache-2.0")


# -- reading ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,commands", [
    ('FROM foo\nSYSTEM """\nline one\nline two\n"""\n', [("model", "foo"), ("system", "\nline one\nline two\n")]),
    ('FROM foo\nSYSTEM """one line"""\n', [("model", "foo"), ("system", "one line")]),
    ('FROM foo\nSYSTEM """with "quotes" inside"""', [("model", "foo"), ("system", 'with "quotes" inside')]),
    ('FROM foo\nSYSTEM """"""\n', [("model", "foo"), ("system", "")]),
    ('FROM foo\nSYSTEM "\'"\n', [("model", "foo"), ("system", "'")]),
    ("FROM ./my model.gguf\n", [("model", "./my model.gguf")]),
    ("# a comment\nfrom foo\n  # indented comment\nPARAMETER temperature 0.2\n",
     [("model", "foo"), ("temperature", "0.2")]),
    ('FROM foo\nPARAMETER stop "<|im_end|>"\nPARAMETER stop <|endoftext|>\n',
     [("model", "foo"), ("stop", "<|im_end|>"), ("stop", "<|endoftext|>")]),
    ('FROM foo\nMESSAGE user "Is the sky blue?"\nMESSAGE assistant Yes it is.\n',
     [("model", "foo"), ("message", "user: Is the sky blue?"), ("message", "assistant: Yes it is.")]),
    ('FROM foo\nTEMPLATE """{{ if .System }}{{ .System }}\n{{ end }}"""\n',
     [("model", "foo"), ("template", "{{ if .System }}{{ .System }}\n{{ end }}")]),
    ("\ufeffFROM foo\n", [("model", "foo")]),
])
def test_parser_reads_what_ollama_reads(text, commands):
    assert mfile.parse_modelfile(text) == commands


@pytest.mark.parametrize("text,fragment", [
    ('FROM foo\nSYSTEM """unterminated""\n', "unexpected EOF"),
    ('FROM foo\nSYSTEM "\n', "unexpected EOF"),
    ("FROM foo\nPARAMETER temperature\n", "unexpected EOF"),
    ("FROM foo\nMODEL bar\n", "command must be one of"),
    ("FROM foo\nMESSAGE robot hi\n", "message role"),
    ("SYSTEM hello\n", "no FROM line"),
])
def test_parser_errors(text, fragment):
    with pytest.raises(mfile.ModelfileError) as err:
        mfile.parse_modelfile(text)
    assert fragment in str(err.value)


def test_parser_drops_control_characters_so_we_refuse_them(tmp_path):
    # Ollama's parser silently drops unprintable characters: "a\x07b" would arrive as "ab".
    assert mfile.parse_modelfile('FROM foo\nSYSTEM "a\x07b"\n') == [("model", "foo"), ("system", "ab")]
    p = tmp_path / "Modelfile"
    p.write_text('FROM foo\nSYSTEM "a\x07b"\n')
    with pytest.raises(BpError) as err:
        mfile.read_modelfile(p)
    assert err.value.code == "INPUT_INVALID" and "line 2" in err.value.message


# -- writing ----------------------------------------------------------------------------------------

_printable = st.characters(blacklist_categories=("Cc", "Cs", "Co", "Cn", "Zl", "Zp")).filter(str.isprintable)


@settings(max_examples=150, deadline=None)
@given(system=st.text(alphabet=st.one_of(_printable, st.sampled_from(['"', "\n", "\t", " "])), max_size=40),
       stop=st.text(alphabet=st.one_of(_printable, st.sampled_from(['"', " "])), min_size=1, max_size=12),
       path=st.text(alphabet=st.one_of(_printable, st.just(" ")), min_size=1, max_size=20))
def test_written_modelfiles_read_back_unchanged(system, stop, path):
    commands = [("model", path), ("template", "{{ .Content }}\n"), ("stop", stop), ("num_ctx", "512"),
                ("system", system)]
    try:
        text = mfile.format_modelfile(commands, header="written by a test")
    except BpError as err:
        # Only values no quoting can carry are refused: a triple quote, or edge spaces on a bare path.
        assert err.code == "INPUT_INVALID"
        assert '"""' in system or '"""' in stop or '"""' in path or path.strip() != path or \
            path.startswith('"') or stop.strip() != stop
        return
    assert mfile.parse_modelfile(text) == commands


@pytest.mark.parametrize("value,multiline,ok", [
    ("plain text", False, True),
    ("two\nlines", False, False),
    ("two\nlines\tand a tab", True, True),
    ("carriage\rreturn", True, False),
    ("nul\x00", True, False),
    ("escape\x1b[31m", True, False),
    ("next line\u0085", True, False),
    ("line sep\u2028", True, False),
    ("delete\x7f", True, False),
    ("unicode: é 中文 ✓", False, True),
])
def test_control_characters_are_refused_everywhere(value, multiline, ok):
    if ok:
        assert mfile.check_text(value, "SYSTEM", multiline) == value
    else:
        with pytest.raises(BpError) as err:
            mfile.check_text(value, "SYSTEM", multiline)
        assert err.value.code == "INPUT_INVALID" and err.value.exit_code == 64


def test_control_characters_from_flags_never_reach_a_modelfile(chatml_gguf):
    with pytest.raises(BpError) as err:
        derive(resolve_source(str(chatml_gguf)), Options(system="hi\x1b[2Jthere"))
    assert err.value.code == "INPUT_INVALID" and "SYSTEM" in err.value.message
    with pytest.raises(BpError):
        derive(resolve_source(str(chatml_gguf)), Options(stops=["a\nb"]))


# -- create requests ------------------------------------------------------------------------------

def test_create_request_like_ollamas_client(tmp_path, chatml_gguf):
    adapter = write_gguf(tmp_path / "lora.gguf", adapter=True)
    text = (f"FROM {chatml_gguf.name}\nADAPTER ./lora.gguf\nTEMPLATE \"\"\"{{{{ .Prompt }}}}\"\"\"\n"
            "PARAMETER stop <|im_end|>\nPARAMETER stop \"<|endoftext|>\"\nPARAMETER num_ctx 512\n"
            "PARAMETER temperature 0.25\nPARAMETER use_mmap false\nPARAMETER mirostat 1\nSYSTEM terse\n"
            "LICENSE MIT\nLICENSE \"\"\"Apache\n2.0\"\"\"\nMESSAGE user hi\nMESSAGE assistant hello\n")
    req, files, adapters = mfile.create_request(mfile.parse_modelfile(text), tmp_path)
    assert files == {"m.gguf": chatml_gguf.resolve()} and adapters == {"lora.gguf": adapter.resolve()}
    assert req == {"template": "{{ .Prompt }}", "system": "terse", "license": ["MIT", "Apache\n2.0"],
                   "parameters": {"stop": ["<|im_end|>", "<|endoftext|>"], "num_ctx": 512, "temperature": 0.25,
                                  "use_mmap": False},
                   "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    req, files, _ = mfile.create_request([("model", "llama3.2")], tmp_path)
    assert req == {"from": "llama3.2"} and files == {}


@pytest.mark.parametrize("name,raw", [("num_ctx", "4k"), ("temperature", "warm"), ("use_mmap", "maybe"),
                                      ("no_such_param", "1")])
def test_bad_parameters_are_refused(name, raw):
    with pytest.raises(BpError) as err:
        mfile.create_request([("model", "x"), (name, raw)], mfile.Path("/"))
    assert err.value.code == "INPUT_INVALID"


# -- the user's Modelfile is honoured ----------------------------------------------------------------

def test_user_modelfile_is_honoured_and_completed(tmp_path, chatml_gguf):
    user = mfile.parse_modelfile(
        'FROM ./somewhere-else.gguf\nTEMPLATE """{{ range .Messages }}{{ .Content }}{{ end }}"""\n'
        'SYSTEM "You are a pirate."\nPARAMETER stop "ARR"\nPARAMETER top_k 7\n'
        'MESSAGE user "Ahoy"\n')
    d = derive(resolve_source(str(chatml_gguf)), Options(), user, tmp_path)
    c = d.commands
    assert mfile.get(c, "model") == str(chatml_gguf.resolve())          # the input GGUF wins
    assert any("replaced by the input" in w for w in d.warnings)
    assert mfile.get(c, "template") == "{{ range .Messages }}{{ .Content }}{{ end }}"
    assert d.template_source == "--modelfile"
    assert mfile.get(c, "system") == "You are a pirate."
    assert [a for n, a in c if n == "stop"] == ["ARR"]
    assert mfile.get(c, "top_k") == "7" and mfile.get(c, "message") == "user: Ahoy"
    assert mfile.get(c, "num_ctx") == "4096"                              # filled in: 32768 capped
    assert mfile.get(c, "temperature") == "0.7" and mfile.get(c, "license") == "apache-2.0"
    # Flags win over the Modelfile.
    d = derive(resolve_source(str(chatml_gguf)), Options(system="Be brief.", num_ctx=2048, temperature=0.1,
                                                         stops=["<|endoftext|>"]), user, tmp_path)
    assert mfile.get(d.commands, "system") == "Be brief." and mfile.get(d.commands, "num_ctx") == "2048"
    assert mfile.get(d.commands, "temperature") == "0.1"
    assert [a for n, a in d.commands if n == "stop"] == ["ARR", "<|endoftext|>"]


def test_modelfile_alone_reads_its_from_gguf(tmp_path, chatml_gguf):
    user = mfile.parse_modelfile(f"FROM ./{chatml_gguf.name}\nSYSTEM hi\n")
    d = derive(None, Options(), user, chatml_gguf.parent)
    assert mfile.get(d.commands, "model") == str(chatml_gguf.resolve())
    assert "<|im_start|>" in mfile.get(d.commands, "template")
    assert [a for n, a in d.commands if n == "stop"] == ["<|im_end|>"]
    assert mfile.get(d.commands, "num_ctx") == "4096"
    # FROM an Ollama model: nothing to translate, the base keeps its template.
    d = derive(None, Options(), mfile.parse_modelfile("FROM llama3.2\nSYSTEM hi\n"), tmp_path)
    assert d.commands == [("model", "llama3.2"), ("system", "hi")]


def test_num_ctx_comes_from_the_context_length_when_no_training_length(tmp_path):
    g = write_gguf(tmp_path / "short.gguf", tokens=["<|im_end|>", "a"], token_types=[3, 1], eos=0,
                   chat_template=CHATML, context_length=512)
    d = derive(resolve_source(str(g)), Options())
    assert mfile.get(d.commands, "num_ctx") == "512" and d.num_ctx_source == "the model's context length"


def test_a_manifest_with_several_ggufs_picks_by_quant(tmp_path):
    from helpers.gguf_files import gguf_manifest
    a = write_gguf(tmp_path / "m-q8_0.gguf", tokens=["<|im_end|>"], eos=0, chat_template=CHATML)
    b = write_gguf(tmp_path / "m-f16.gguf", tokens=["<|im_end|>"], eos=0, chat_template=CHATML)
    m = gguf_manifest(tmp_path, [a, b], quants=["q8_0", "f16"])
    assert resolve_source(str(m.source)).gguf == a.resolve()
    assert resolve_source(str(tmp_path), quant="f16").gguf == b.resolve()
    with pytest.raises(BpError) as err:
        resolve_source(str(tmp_path), quant="q4_k_m")
    assert err.value.code == "INPUT_INVALID" and "q8_0, f16" in err.value.message


# -- names and hosts ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["demo-tiny", "my_model.v2", "llama3.2:animals", "A1:latest", "x" * 80])
def test_good_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["-rf", "--force", "a b", "bad\nname", "tab\tname", "../etc", "a/b", "x:", "a:b:c",
                                  ":tag", ".hidden", "x" * 129, "x" * 81, "naïve", "", "a;rm -rf /", "a:-tag"])
def test_bad_names_are_refused(name):
    with pytest.raises(BpError) as err:
        check_name(name)
    assert err.value.code == "INPUT_NAME_INVALID" and err.value.exit_code == 64


@pytest.mark.parametrize("value,url", [
    ("", "http://127.0.0.1:11434"), ("127.0.0.1", "http://127.0.0.1:11434"), ("0.0.0.0", "http://127.0.0.1:11434"),
    ("example.com:8080", "http://example.com:8080"), ("http://example.com", "http://example.com:80"),
    ("https://ollama.example", "https://ollama.example:443"), ("[::1]:9999", "http://[::1]:9999"),
    ("http://10.0.0.2:11434/ollama", "http://10.0.0.2:11434/ollama"),
])
def test_hosts_are_read_like_ollama_host(value, url):
    assert parse_host(value).url == url


@pytest.mark.parametrize("value", ["ftp://x", "http://user:secret@x:1", "x:99999", "x:port", "a b", "x\ny"])
def test_bad_hosts(value):
    with pytest.raises(BpError) as err:
        parse_host(value)
    assert err.value.code == "INPUT_INVALID" and "secret" not in err.value.message


def test_a_windows_modelfile_reads_without_carriage_returns(tmp_path):
    p = tmp_path / "Modelfile"
    p.write_bytes(b'FROM llama3.2\r\nSYSTEM """two\r\nlines"""\r\nPARAMETER stop "</s>"\r\n')
    assert mfile.read_modelfile(p) == [("model", "llama3.2"), ("system", "two\nlines"), ("stop", "</s>")]
