"""bp-train's data path: labels on assistant tokens (the masks bp-prep and bp-eval use), EOS never
masked by padding, padding-free batches without attention across examples, inputs of every kind."""
from __future__ import annotations

import json

import pytest

from bp_common import chat
from bp_common.errors import BpError
from bp_common.manifest import new_manifest, read_manifest, write_manifest
from bp_common.progress import Reporter
from bp_train.dataset import encode_rows, read_rows, read_source
from helpers.training import CHATS, prepared

CONV = {"messages": [{"role": "user", "content": "What does the cat say?"},
                     {"role": "assistant", "content": "The cat says meow."},
                     {"role": "user", "content": "And the dog?"},
                     {"role": "assistant", "content": "The dog says woof."}]}


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(tiny_llama))


def label_runs(tok, ids, labels):
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != chat.IGNORE_INDEX:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_loss_only_on_each_assistant_answer_and_its_end_of_turn(tok):
    enc = encode_rows(tok, [CONV], mode=chat.mask_mode(tok), seq_len=512)
    ex = enc.examples[0]
    assert label_runs(tok, ex["input_ids"], ex["labels"]) == ["The cat says meow.<|im_end|>",
                                                              "The dog says woof.<|im_end|>"]
    # exactly what bp-eval scores with
    ids, labels, _ = chat.training_example(tok, CONV, chat.mask_mode(tok))
    assert (ex["input_ids"], ex["labels"]) == (ids, labels)
    assert enc.label_tokens == sum(1 for x in labels[1:] if x != chat.IGNORE_INDEX)


def test_train_on_all_and_marker_templates(tok):
    ids, labels, _ = chat.training_example(tok, CONV, train_on_all=True)
    assert labels == ids
    ids, labels, enc = chat.training_example(tok, CONV, response_template="<|im_start|>assistant\n",
                                             instruction_template="<|im_start|>user")
    assert enc.mode == "markers"
    runs = label_runs(tok, ids, labels)
    assert [r.strip() for r in runs] == ["The cat says meow.<|im_end|>", "The dog says woof.<|im_end|>"]


def test_raw_text_rows_learn_every_token_and_end_with_eos(tok):
    ids, labels, enc = chat.training_example(tok, {"text": "The cow says moo."})
    assert enc is None and labels == ids and ids[-1] == tok.eos_token_id


def test_rows_without_loss_tokens_are_dropped_and_long_rows_truncated(tok):
    no_answer = {"messages": [{"role": "user", "content": "hello"}]}
    long = {"messages": [{"role": "user", "content": "cat " * 50}, {"role": "assistant", "content": "meow"}]}
    enc = encode_rows(tok, [CONV, no_answer, {"other": 1}, long], mode="template", seq_len=40)
    assert enc.rows == 4 and len(enc.examples) == 1
    assert dict(enc.dropped) == {"no_assistant_tokens": 1, "no_messages_or_text": 1,
                                 "no_loss_tokens_within_seq_len": 1}
    assert enc.truncated == 1 and all(len(e["input_ids"]) <= 40 for e in enc.examples)


def test_padding_equal_to_eos_never_masks_the_eos_label(tiny_llama):
    from transformers import AutoTokenizer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    tok.pad_token = tok.eos_token  # the classic trap: a collator masking pad ids masks EOS too
    assert chat.pad_is_eos(tok)
    short = {"messages": [{"role": "user", "content": "Cat?"}, {"role": "assistant", "content": "Meow."}]}
    enc = encode_rows(tok, [CONV, short], mode="template", seq_len=512)
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(enc.examples)
    eos = tok.eos_token_id
    for row in range(2):
        ids, labels, att = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        real = int(att.sum())
        labelled_eos = [i for i in range(real) if ids[i] == eos and labels[i] == eos]
        assert len(labelled_eos) == (2 if row == 0 else 1)
        assert (labels[real:] == -100).all()


def test_padding_free_batches_do_not_attend_across_examples(tiny_llama, tok):
    """The loss of a flattened batch equals the token-weighted loss of each example alone."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    rows = [json.loads(x) for x in CHATS[0].read_text().splitlines()[:6]]
    examples = encode_rows(tok, rows, mode="template", seq_len=512).examples

    def loss_sum(batch):
        labels = batch.pop("labels")
        logits = model(**batch, use_cache=False).logits[:, :-1].float()
        target = labels[:, 1:]
        m = target != -100
        return float(torch.nn.functional.cross_entropy(logits[m], target[m], reduction="sum")), int(m.sum())

    flat = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(examples)
    assert "attention_mask" not in flat and flat["input_ids"].shape[0] == 1
    with torch.no_grad():
        together, n = loss_sum(dict(flat))
        alone = [loss_sum(dict(DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)([e])))
                 for e in examples]
        # the same flattened ids with positions running on (as if one long text) really differ
        run_on = dict(flat)
        run_on["position_ids"] = torch.arange(flat["input_ids"].shape[1])[None]
        leaked, _ = loss_sum(run_on)
    assert n == sum(c for _, c in alone)
    assert together / n == pytest.approx(sum(s for s, _ in alone) / n, abs=1e-5)
    assert abs(leaked / n - together / n) > 1e-3


def test_inputs_dataset_manifest_vram_manifest_and_plain_file(tmp_path, tiny_llama):
    r = Reporter("bp-train", level="error")
    data = prepared(str(tiny_llama))
    src = read_source(str(data), model=None, output=tmp_path / "o1", seed=0, reporter=r, tool="bp-train")
    assert src.dataset.kind == "dataset" and src.plan is None
    assert len(read_rows(src.dataset, "train")) == src.dataset["rows"]["train"]
    vram_dir = tmp_path / "vram"
    vram_dir.mkdir()
    vram = new_manifest("vram", "bp-vram", vram_dir, inputs=[read_manifest(data).ref()], batch_size=3, grad_accum=2,
                        fits=True)
    write_manifest(vram, vram_dir)
    src = read_source(str(vram_dir), model=None, output=tmp_path / "o2", seed=0, reporter=r, tool="bp-train")
    assert src.dataset["id"] == read_manifest(data)["id"] and src.plan == {"batch_size": 3, "grad_accum": 2}
    with pytest.raises(BpError) as e:
        read_source(str(CHATS[0]), model=None, output=tmp_path / "o3", seed=0, reporter=r, tool="bp-train")
    assert e.value.code == "INPUT_USAGE" and "--model" in e.value.message
    src = read_source(str(CHATS[0]), model=str(tiny_llama), output=tmp_path / "o4", seed=0, reporter=r,
                      tool="bp-train")
    assert src.prepared_here and (tmp_path / "o4" / "data" / "manifest.json").is_file()
    assert src.dataset["mask"] == "template" and src.dataset["rows"]["train"] > 150
