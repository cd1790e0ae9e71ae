"""bp-ollama against a loopback server that speaks Ollama's API: create, re-create, list, show, rm, shelf,
adapters, a server that is down or fails mid-create; and the official `ollama` client against the same
server, so the server stays faithful to the real protocol."""
from __future__ import annotations

import hashlib
import http.client
import json

import pytest

from bp_common.cli import run_main
from bp_common.errors import BpError
from bp_common.manifest import read_manifest
from bp_common.progress import Reporter
from bp_ollama import cli
from bp_ollama.client import OllamaClient
from bp_ollama.derivation import Options, derive
from bp_ollama.modelfile import create_request
from bp_ollama.registration import check_registered, register
from bp_ollama.source import resolve_source
from helpers.gguf_files import gguf_manifest, write_gguf
from ollama_fixtures import free_port


def bp(capsys, *argv):
    """Run bp-ollama in this process: (exit code, stdout JSON, stderr)."""
    rc = run_main(cli.TOOL, cli.get_parser, cli.run, [str(a) for a in argv])
    out = capsys.readouterr()
    lines = [l for l in out.out.splitlines() if l.strip()]
    assert len(lines) == 1, out.out
    return rc, json.loads(lines[0]), out.err


def creates(server):
    return [body for m, p, body in server.requests if p == "/api/create"]


def blob_posts(server):
    return [p for m, p, _ in server.requests if m == "POST" and p.startswith("/api/blobs/")]


def test_create_uploads_registers_and_confirms(ollama_server, template_family, capsys):
    fam = template_family("chatml")
    rc, m, err = bp(capsys, "create", "demo-tiny", fam.manifest, "--host", ollama_server.url, "--system", "Be brief.",
                    "--log-format", "json")
    assert rc == 0, err
    digest = "sha256:" + hashlib.sha256(fam.gguf.read_bytes()).hexdigest()
    assert m["kind"] == "ollama" and m["name"] == "demo-tiny:latest" and m["host"] == ollama_server.url
    assert m["digest"] == digest and m["uploaded"] == [digest]
    assert m["inputs"][0]["kind"] == "gguf"
    # HEAD said missing, so the GGUF was uploaded once, then created from its digest.
    assert [(meth, p) for meth, p, _ in ollama_server.requests][:2] == [("HEAD", f"/api/blobs/{digest}"),
                                                                 ("POST", f"/api/blobs/{digest}")]
    (body,) = creates(ollama_server)
    assert body["model"] == "demo-tiny" and body["files"] == {fam.gguf.name: digest}
    assert body["stream"] is True and body["system"] == "Be brief."
    assert "<|im_start|>" in body["template"] and m["template_digest"] == \
        "sha256:" + hashlib.sha256(body["template"].encode()).hexdigest()
    assert body["parameters"] == {"stop": ["<|im_end|>", "<|endoftext|>"], "num_ctx": 256, "temperature": 0.7}
    # NDJSON progress arrived as events, ending in success.
    events = [json.loads(l) for l in err.splitlines() if l.startswith("{")]
    statuses = [e["status"] for e in events if e["event"] == "create"]
    assert statuses[0] == "parsing GGUF" and statuses[-2:] == ["writing manifest", "success"]
    # The server holds what was sent.
    shown = OllamaClient(ollama_server.url).show("demo-tiny")
    assert shown["template"] == body["template"] and shown["system"] == "Be brief."
    assert m["model_digest"] == ollama_server.models["demo-tiny:latest"]["digest"]


def test_recreate_uploads_nothing_and_list_show_rm(ollama_server, template_family, capsys):
    fam = template_family("qwen3")
    for _ in range(2):
        rc, m, err = bp(capsys, "create", "q3:v1", fam.manifest, "--host", ollama_server.url)
        assert rc == 0, err
    assert len(blob_posts(ollama_server)) == 1 and m["uploaded"] == []
    assert "already on the server" in err
    rc, listing, _ = bp(capsys, "list", "--host", ollama_server.url)
    assert rc == 0 and [x["name"] for x in listing["models"]] == ["q3:v1"]
    assert listing["kind"] == "report" and listing["models"][0]["family"] == "llama"
    rc, shown, _ = bp(capsys, "show", "q3:v1", "--host", ollama_server.url)
    assert rc == 0 and shown["parameters"]["stop"] == ["<|im_end|>", "<|endoftext|>"]
    assert shown["parameters"]["num_ctx"] == 256 and "<think>" not in shown["template"]
    rc, removed, _ = bp(capsys, "rm", "q3:v1", "--host", ollama_server.url)
    assert rc == 0 and removed["removed"] == "q3:v1"
    rc, env, err = bp(capsys, "rm", "q3:v1", "--host", ollama_server.url)
    assert rc == 66 and env["code"] == "OLLAMA_NOT_FOUND" and "not found" in env["message"]
    rc, env, _ = bp(capsys, "show", "q3:v1", "--host", ollama_server.url)
    assert rc == 66 and env["code"] == "OLLAMA_NOT_FOUND"


def test_server_down_is_unavailable_and_retryable(template_family, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    rc, env, err = bp(capsys, "create", "demo", template_family("chatml").manifest, "--host", url)
    assert rc == 69 and env["code"] == "OLLAMA_UNAVAILABLE" and env["retryable"] is True
    assert env["details"]["attempts"] == 3 and url in env["message"]
    assert err.startswith("error[OLLAMA_UNAVAILABLE]")
    for argv in (["list"], ["rm", "x"]):
        rc, env, _ = bp(capsys, *argv, "--host", url)
        assert rc == 69 and env["code"] == "OLLAMA_UNAVAILABLE"


def test_host_comes_from_the_environment(ollama_server, template_family, capsys, monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", ollama_server.url.replace("http://", ""))
    rc, listing, _ = bp(capsys, "list")
    assert rc == 0 and listing["host"] == ollama_server.url
    monkeypatch.setenv("BACKPROPAGATE_OLLAMA_HOST", f"http://127.0.0.1:{free_port()}")
    rc, env, _ = bp(capsys, "list")  # ours wins over Ollama's
    assert rc == 69


@pytest.mark.parametrize("after", [1, 3, 4])
def test_server_error_mid_create_leaves_nothing_registered(ollama_server, template_family, capsys, after):
    """An error line in the stream fails the create; a model the failed create left behind is removed."""
    ollama_server.create_error = ("after", after, "write /models/manifests: no space left on device")
    rc, env, err = bp(capsys, "create", "demo", template_family("chatml").manifest, "--host", ollama_server.url)
    assert rc == 69 and env["code"] == "OLLAMA_CREATE_FAILED"
    assert "no space left on device" in env["message"]
    assert ollama_server.models == {}
    assert OllamaClient(ollama_server.url).tags() == []


def test_create_refused_maps_to_exit_codes(ollama_server, template_family, capsys):
    ollama_server.create_error = ("status", 400, "invalid model name")
    rc, env, _ = bp(capsys, "create", "demo", template_family("chatml").manifest, "--host", ollama_server.url)
    assert rc == 65 and env["code"] == "OLLAMA_BAD_REQUEST" and "invalid model name" in env["message"]
    ollama_server.create_error = ("status", 500, "llama runner crashed")
    rc, env, _ = bp(capsys, "create", "demo", template_family("chatml").manifest, "--host", ollama_server.url)
    assert rc == 69 and env["code"] == "OLLAMA_CREATE_FAILED" and "llama runner crashed" in env["message"]


def test_a_model_that_does_not_hold_what_was_sent_is_refused():
    sent = {"template": "T", "system": "S", "parameters": {"stop": ["<|im_end|>"], "num_ctx": 256,
                                                            "temperature": 0.7}}
    good = {"template": "T", "system": "S", "parameters": 'num_ctx                        256\n'
            'stop                           "<|im_end|>"\ntemperature                    0.7'}
    assert check_registered(good, sent) == []
    bad = dict(good, template="{{ .Prompt }}", parameters='num_ctx                        2048')
    problems = check_registered(bad, sent)
    assert any("template" in p for p in problems) and any("stop" in p for p in problems) and \
        any("num_ctx" in p for p in problems)


def test_bad_name_is_refused_before_any_request(ollama_server, template_family, capsys):
    rc, env, _ = bp(capsys, "create", "-rf", template_family("chatml").manifest, "--host", ollama_server.url)
    assert rc == 2 and env["code"] == "INPUT_USAGE"  # an option, never a name
    for name in ("-rf", "a b", "x\x1by", "a:b:c", "../up"):
        rc, env, _ = bp(capsys, "create", "--host", ollama_server.url, "--", name, template_family("chatml").manifest)
        assert rc == 64 and env["code"] == "INPUT_NAME_INVALID", name
    assert ollama_server.requests == []


def test_user_modelfile_arrives_in_create(ollama_server, template_family, capsys, tmp_path):
    fam = template_family("llama3")
    mf = tmp_path / "Modelfile"
    mf.write_text('FROM llama3.2\nTEMPLATE """{{- range .Messages }}<{{ .Role }}>{{ .Content }}{{ end }}"""\n'
                  'SYSTEM """You answer\nin French."""\nPARAMETER top_p 0.9\nPARAMETER stop "</end>"\n'
                  'PARAMETER num_ctx 1024\nLICENSE "MIT"\nMESSAGE user Bonjour\n')
    rc, m, err = bp(capsys, "create", "fr", fam.manifest, "--modelfile", mf, "--host", ollama_server.url)
    assert rc == 0, err
    (body,) = creates(ollama_server)
    assert body["template"] == "{{- range .Messages }}<{{ .Role }}>{{ .Content }}{{ end }}"
    assert body["system"] == "You answer\nin French." and body["license"] == ["MIT"]
    assert body["parameters"] == {"stop": ["</end>"], "num_ctx": 1024, "temperature": 0.7, "top_p": 0.9}
    assert body["messages"] == [{"role": "user", "content": "Bonjour"}]
    assert "files" in body and "from" not in body  # the input GGUF replaced FROM llama3.2
    assert m["template_source"] == "--modelfile"


def test_adapter_mode_and_the_shelf(ollama_server, template_family, capsys, tmp_path):
    fam = template_family("chatml")
    rc, _, err = bp(capsys, "create", "farm", fam.manifest, "--host", ollama_server.url)
    assert rc == 0, err
    lora = write_gguf(tmp_path / "lora" / "animals-lora-f32.gguf", adapter=True)
    adapter_manifest = read_manifest(fam.manifest.parent.parent / "adapter")
    gguf_manifest(tmp_path / "lora", [lora], inputs=[adapter_manifest], types=["adapter"], base="hf-base-model-dir")
    # Without --base there is nothing to put in FROM.
    rc, env, _ = bp(capsys, "create", "farm:animals", tmp_path / "lora", "--host", ollama_server.url)
    assert rc == 64 and env["code"] == "CONFIG_INVALID_SETTING" and "--base" in env["message"]
    rc, m, err = bp(capsys, "create", "farm:animals", tmp_path / "lora", "--base", "farm", "--host", ollama_server.url)
    assert rc == 0, err
    body = creates(ollama_server)[-1]
    digest = "sha256:" + hashlib.sha256(lora.read_bytes()).hexdigest()
    assert body["from"] == "farm" and body["adapters"] == {lora.name: digest} and "files" not in body
    # The adapter's chat template comes from the adapter's training directory in the chain.
    assert "<|im_start|>" in body["template"] and body["parameters"]["num_ctx"] == 256
    assert m["adapter_digest"] == digest and m["from"] == "farm"
    shown = OllamaClient(ollama_server.url).show("farm:animals")
    assert "ADAPTER" in shown["modelfile"]
    bp(capsys, "create", "farm:plants", tmp_path / "lora", "--base", "farm", "--host", ollama_server.url)
    bp(capsys, "create", "other:animals", fam.manifest, "--host", ollama_server.url)
    rc, shelf, _ = bp(capsys, "shelf", "farm", "--host", ollama_server.url)
    assert rc == 0 and sorted(x["name"] for x in shelf["models"]) == ["farm:animals", "farm:plants"]
    rc, env, _ = bp(capsys, "shelf", "farm:animals", "--host", ollama_server.url)
    assert rc == 64


def test_adapter_on_a_missing_base_fails_and_leaves_nothing(ollama_server, tmp_path, capsys):
    lora = write_gguf(tmp_path / "lora.gguf", adapter=True)
    tpl = tmp_path / "t.gotmpl"
    tpl.write_text("{{ range .Messages }}{{ .Content }}{{ end }}")
    rc, env, _ = bp(capsys, "create", "ghost:lora", lora, "--base", "ghost", "--template", tpl, "--host", ollama_server.url)
    assert rc == 69 and env["code"] == "OLLAMA_CREATE_FAILED" and "pull model manifest" in env["message"]
    assert ollama_server.models == {}


# -- the server is faithful to Ollama's protocol ----------------------------------------------------

def raw(server, method, path, body=b"", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, resp.getheader("Content-Type"), data


def test_blob_endpoints_check_digests(ollama_server):
    data = b"GGUF not really"
    good = "sha256:" + hashlib.sha256(data).hexdigest()
    bad = "sha256:" + "0" * 64
    assert raw(ollama_server, "HEAD", f"/api/blobs/{good}")[0] == 404
    assert raw(ollama_server, "HEAD", "/api/blobs/sha256:xyz")[0] == 400
    status, ctype, body = raw(ollama_server, "POST", f"/api/blobs/{bad}", data)
    assert status == 400 and ctype.startswith("application/json") and "digest mismatch" in json.loads(body)["error"]
    assert raw(ollama_server, "POST", f"/api/blobs/{good}", data)[0] == 201
    assert raw(ollama_server, "HEAD", f"/api/blobs/{good}")[0] == 200
    assert raw(ollama_server, "POST", f"/api/blobs/{good}", data)[0] == 200
    # Chunked uploads are read too (httpx streams file bodies this way).
    other = b"another blob"
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(other), other)
    d2 = "sha256:" + hashlib.sha256(other).hexdigest()
    assert raw(ollama_server, "POST", f"/api/blobs/{d2}", chunked, {"Transfer-Encoding": "chunked"})[0] == 201


def test_create_errors_are_json_with_status_or_ndjson_lines(ollama_server):
    status, _, body = raw(ollama_server, "POST", "/api/create", b"")
    assert status == 400 and json.loads(body) == {"error": "missing request body"}
    status, _, body = raw(ollama_server, "POST", "/api/create", json.dumps({"model": "x"}).encode())
    assert status == 400 and "neither 'from' or 'files'" in json.loads(body)["error"]
    status, _, body = raw(ollama_server, "POST", "/api/create", json.dumps({"model": "bad name!", "from": "y"}).encode())
    assert status == 400 and json.loads(body)["error"] == "invalid model name"
    status, _, body = raw(ollama_server, "POST", "/api/create",
                          json.dumps({"model": "x", "files": {"../m.gguf": "sha256:" + "1" * 64}}).encode())
    assert status == 400 and "relative" in json.loads(body)["error"]
    # A blob that was never uploaded: progress has begun, so the error is an NDJSON line.
    status, ctype, body = raw(ollama_server, "POST", "/api/create",
                              json.dumps({"model": "x", "files": {"m.gguf": "sha256:" + "1" * 64}}).encode())
    lines = [json.loads(l) for l in body.splitlines()]
    assert status == 200 and ctype == "application/x-ndjson"
    assert lines[0] == {"status": "parsing GGUF"} and "no such file" in lines[-1]["error"]
    status, _, body = raw(ollama_server, "POST", "/api/create",
                          json.dumps({"model": "x", "files": {"m.gguf": "sha256:" + "1" * 64},
                                      "stream": False}).encode())
    assert status == 500 and "no such file" in json.loads(body)["error"]
    assert raw(ollama_server, "GET", "/api/nope")[0] == 404 and raw(ollama_server, "GET", "/")[2] == b"Ollama is running"


def test_official_ollama_client_against_the_server(ollama_server, template_family):
    import ollama as official

    fam = template_family("llama3")
    d = derive(resolve_source(str(fam.manifest)), Options(system="Short answers."))
    req, _files, _ = create_request(d.commands, fam.gguf.parent)
    client = official.Client(host=ollama_server.url)
    digest = client.create_blob(fam.gguf)
    assert digest == "sha256:" + hashlib.sha256(fam.gguf.read_bytes()).hexdigest()
    progress = list(client.create(model="llama-fan", files={fam.gguf.name: digest}, template=req["template"],
                                  system=req["system"], parameters=req["parameters"], stream=True))
    assert progress[0].status == "parsing GGUF" and progress[-1].status == "success"
    assert client.create(model="llama-fan:two", from_="llama-fan", system="Other.").status == "success"
    names = sorted(m.model for m in client.list().models)
    assert names == ["llama-fan:latest", "llama-fan:two"]
    shown = client.show("llama-fan")
    assert shown.template == req["template"] and 'SYSTEM """Short answers."""' in shown.modelfile
    assert '"<|eot_id|>"' in shown.parameters and "num_ctx" in shown.parameters
    assert shown.modelinfo["general.architecture"] == "llama"
    two = OllamaClient(ollama_server.url).show("llama-fan:two")  # layers inherited, system replaced
    assert two["system"] == "Other." and two["template"] == req["template"]
    assert client.delete("llama-fan:two").status == "success"
    with pytest.raises(official.ResponseError) as err:
        client.show("llama-fan:two")
    assert err.value.status_code == 404 and "not found" in err.value.error
    with pytest.raises(official.ResponseError) as err:
        client.create(model="nope", from_="missing-base")
    assert "pull model manifest" in err.value.error
    # And what the official client registered, bp-ollama reads back.
    assert check_registered(OllamaClient(ollama_server.url).show("llama-fan"), req) == []


def test_register_reports_uploads_through_the_reporter(ollama_server, template_family):
    fam = template_family("phi3")
    events = []
    r = Reporter("bp-ollama", callback=events.append, quiet=True)
    d = derive(resolve_source(str(fam.manifest)), Options())
    reg = register(OllamaClient(ollama_server.url), "phi", d.commands, r)
    assert reg.uploaded == [reg.blobs[fam.gguf.name]]
    assert [e["event"] for e in events if e["event"] == "upload"] == ["upload"]
    assert [e["status"] for e in events if e["event"] == "create"][-1] == "success"
    with pytest.raises(BpError) as err:
        register(OllamaClient(ollama_server.url), "phi", d.commands + [("num_ctx", "4k")], r)
    assert err.value.code == "INPUT_INVALID"


def test_output_directories_are_not_overwritten_by_other_results(ollama_server, template_family, capsys, tmp_path):
    chatml, qwen3 = template_family("chatml"), template_family("qwen3")
    rc, printed, _ = bp(capsys, "modelfile", chatml.manifest)
    assert rc == 0 and printed["modelfile"] is None and printed["text"].startswith("# Modelfile written by")
    out = tmp_path / "ollama"
    rc, m, _ = bp(capsys, "modelfile", chatml.manifest, "-o", out)
    assert rc == 0 and (out / "Modelfile").read_text() == printed["text"]
    rc, env, _ = bp(capsys, "modelfile", qwen3.manifest, "-o", out)
    assert rc == 73 and env["code"] == "STATE_OUTPUT_EXISTS"
    rc, m, _ = bp(capsys, "modelfile", qwen3.manifest, "-o", out, "--force")
    assert rc == 0 and str(qwen3.gguf) in (out / "Modelfile").read_text()
    # create -o leaves the Modelfile it registered and the manifest naming the model; again is fine.
    reg = tmp_path / "registered"
    for _ in range(2):
        rc, m, err = bp(capsys, "create", "q3", qwen3.manifest, "-o", reg, "--host", ollama_server.url)
        assert rc == 0, err
    saved = read_manifest(reg)
    assert saved["name"] == "q3:latest" and saved["modelfile"] == "Modelfile" and saved["id"] == m["id"]
    assert (reg / "Modelfile").read_text().count("PARAMETER stop") == 2
    rc, env, _ = bp(capsys, "create", "other", chatml.manifest, "-o", reg, "--host", ollama_server.url)
    assert rc == 73 and "other:latest" not in ollama_server.models


def test_something_else_at_the_address_is_not_taken_for_ollama(ollama_server, capsys):
    # Under a path prefix the test server answers "404 page not found" as plain text, like any web server.
    rc, env, _ = bp(capsys, "list", "--host", ollama_server.url + "/not-ollama")
    assert rc == 69 and env["code"] == "OLLAMA_SERVER_ERROR" and "is it an Ollama server?" in env["message"]
    rc, env, _ = bp(capsys, "show", "demo", "--host", ollama_server.url)
    assert rc == 66 and env["code"] == "OLLAMA_NOT_FOUND"  # Ollama's own 404 {"error"} is a missing model
