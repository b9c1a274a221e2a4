"""export.py: a trained tiny run -> an HF BERT folder (+ heads, + sentence-transformers files),
read back by our strict loader, by hand from heads.json, and by transformers /
sentence-transformers where they are installed."""
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import export
import multitask_classifier as mtc
from base_bert import convert_state_dict, from_pretrained, hf_name_map, to_hf_state_dict
from bert import BertModel, mean_pool
from config import BertConfig
from datasets import Collator, Example
from engine.heads import BiEncoderHead, BothHead, LinearHead
from engine.specs import AUX, SPECS
from engine.tasks import Task
from tokenizer import BertTokenizer

SENTENCES = ["the movie is great .", "how do i cook rice ?", "a woman sings .",
             "the dog runs . " * 10]  # the last one is truncated at max_length
SECONDS = ["the film was bad", "what is a cat ?", "a man plays guitar .", "the cat sits ."]
MAX_LENGTH = 16
RUNS = {
    # all three head kinds: linear (mean pooling), bi_features, bi_cosine
    "bi": ["--quora_encoding", "bi", "--sts_encoding", "bi"],
    # cross-encoded pairs on the pooler, and the auxiliary head
    "cross": ["--quora_encoding", "cross", "--sts_encoding", "cross", "--pooling", "pooler",
              "--aux", "AUX"],
    # a cross and a bi head per pair task, their outputs averaged
    "both": ["--quora_encoding", "both", "--sts_encoding", "both", "--pooling", "cls"],
}


@pytest.fixture(scope="module", params=list(RUNS))
def exported(request, tiny_checkpoint, tiny_data, tmp_path_factory):
    """One tiny real run per encoding, and its export: (best.pt dict, export folder)."""
    base = tmp_path_factory.mktemp(f"export-{request.param}")
    extra = [os.path.join(tiny_data, "yelp-aux-train.csv") if a == "AUX" else a
             for a in RUNS[request.param]]
    run_dir = mtc.main(["--checkpoint", tiny_checkpoint, "--data_dir", tiny_data,
                        "--run_dir", str(base / "run"), "--epochs", "1", "--lr", "3e-3",
                        "--option", "finetune", "--mode", "mix", "--max_length", str(MAX_LENGTH),
                        "--batch_size_sst", "8", "--batch_size_quora", "8",
                        "--batch_size_sts", "8", "--batch_size_aux", "8",
                        "--no-progress", "--no-grad_diagnostics", "--seed", "1", *extra])
    best = os.path.join(run_dir, "best.pt")
    out = export.main(["--load", best, "--out", str(base / "hf")])
    return torch.load(best, weights_only=True), out


def read_json(*parts):
    return json.loads(Path(*parts).read_text())


def trained_encoder(saved) -> BertModel:
    encoder = BertModel(BertConfig(**saved["bert_config"]))
    encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in saved["model"].items()
                             if k.startswith("encoder.")})
    return encoder.eval()


def test_the_name_maps_are_inverses(tiny_config):
    model = BertModel(tiny_config)
    assert set(hf_name_map(tiny_config.num_hidden_layers)) == set(model.state_dict())
    back = convert_state_dict(to_hf_state_dict(model), model)
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_folder_layout(exported):
    saved, out = exported
    files = sorted(os.path.relpath(os.path.join(d, f), out)
                   for d, _, fs in os.walk(out) for f in fs)
    hf = ["config.json", "heads.json", "heads.safetensors", "model.safetensors",
          "special_tokens_map.json", "tokenizer_config.json", "vocab.txt"]
    st = ["1_Pooling/config.json", "config_sentence_transformers.json", "modules.json",
          "sentence_bert_config.json"]
    assert files == sorted(hf + (st if saved["config"]["sts_encoding"] == "bi" else []))
    config = read_json(out, "config.json")
    assert config["model_type"] == "bert" and config["architectures"] == ["BertModel"]
    assert {k: config[k] for k in saved["bert_config"]} == saved["bert_config"]
    tok = read_json(out, "tokenizer_config.json")
    assert tok["model_max_length"] == MAX_LENGTH and tok["do_lower_case"] is True
    assert "embeddings.position_ids" not in load_file(os.path.join(out, "model.safetensors"))
    assert not [n for n in os.listdir(os.path.dirname(out)) if n.startswith(".")]


def test_our_loader_reads_back_the_trained_encoder(exported):
    saved, out = exported
    trained, loaded = trained_encoder(saved), from_pretrained(out).eval()
    for key, tensor in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    enc = BertTokenizer.from_pretrained(out, MAX_LENGTH).encode(SENTENCES, SECONDS)
    with torch.no_grad():
        a, b = trained(**enc.as_kwargs()), loaded(**enc.as_kwargs())
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    assert torch.equal(a.pooler_output, b.pooler_output)


def apply_by_hand(entry: dict, tensors: dict, encoder: BertModel,
                  tokenizer: BertTokenizer) -> torch.Tensor:
    """What heads.json tells a reader to do, written from its fields alone."""
    task = entry["task"]
    if entry["kind"] == "both":  # each part as its own entry says, then their mean
        cross, bi = (apply_by_hand({**entry[part], "task": f"{task}.{part}", "pair": True,
                                    "num_outputs": 1}, tensors, encoder, tokenizer)
                     for part in ("cross", "bi"))
        if entry["formula"].startswith("output = logit("):  # the mean probability
            return torch.logit((torch.sigmoid(cross) + torch.sigmoid(bi)) / 2)
        return (cross + bi) / 2
    with torch.no_grad():
        if entry["kind"] == "linear":
            enc = tokenizer.encode(SENTENCES, SECONDS if entry["pair"] else None)
            out = encoder(**enc.as_kwargs())
            x = {"mean": mean_pool(out.last_hidden_state, enc.attention_mask),
                 "cls": out.last_hidden_state[:, 0], "pooler": out.pooler_output}[entry["pooling"]]
        else:
            def embed(texts):
                enc = tokenizer.encode(texts)
                return mean_pool(encoder(**enc.as_kwargs()).last_hidden_state, enc.attention_mask)
            u, v = embed(SENTENCES), embed(SECONDS)
            if entry["kind"] == "bi_cosine":
                return 5 * F.cosine_similarity(u, v, dim=-1)
            x = torch.cat([u, v, (u - v).abs(), u * v], dim=-1)
        y = x @ tensors[f"{task}.linear.weight"].T + tensors[f"{task}.linear.bias"]
        return y.squeeze(-1) if entry["num_outputs"] == 1 else y


def test_heads_reproduce_the_trained_heads(exported):
    saved, out = exported
    info = read_json(out, "heads.json")
    tensors = load_file(os.path.join(out, "heads.safetensors"))
    encoder, tokenizer = from_pretrained(out).eval(), BertTokenizer.from_pretrained(out, info["max_length"])
    trained, hidden = trained_encoder(saved), saved["bert_config"]["hidden_size"]
    cfg = saved["config"]
    expected_tasks = cfg["tasks"].split(",") + (["aux"] if cfg["aux"] else [])
    assert [e["task"] for e in info["heads"]] == expected_tasks
    for entry in info["heads"]:
        task = entry["task"]
        # The head as trained, from tasks.py and the checkpoint.
        if entry["kind"] == "linear":
            head = LinearHead(hidden, entry["num_outputs"], 0.0, entry["pooling"])
        elif entry["kind"] == "both":
            head = BothHead(hidden, 0.0, entry["pooling"],
                            "cosine" if entry["bi"]["kind"] == "bi_cosine" else "features")
        else:
            head = BiEncoderHead(hidden, 0.0, "cosine" if entry["kind"] == "bi_cosine" else "features")
        head.load_state_dict({k.removeprefix(f"heads.{task}."): v for k, v in saved["model"].items()
                              if k.startswith(f"heads.{task}.")})
        examples = [Example(str(i), (a, b) if entry["pair"] else (a,))
                    for i, (a, b) in enumerate(zip(SENTENCES, SECONDS))]
        batch = Collator(tokenizer, separate=entry["kind"].startswith("bi"),
                         both=entry["kind"] == "both")(examples)
        with torch.no_grad():
            raw = head.eval()(trained(**batch.encoded.as_kwargs()), batch)
            reference = Task({**SPECS, "aux": AUX}[task], head, None, 1).output(raw).float()
        torch.testing.assert_close(apply_by_hand(entry, tensors, encoder, tokenizer), reference,
                                   atol=1e-5, rtol=1e-5)
        assert entry["metric"] == {"sst": "accuracy", "quora": "accuracy", "sts": "pearson",
                                   "aux": None}[task]
        assert set(entry["tensors"]) == {k for k in tensors if k.startswith(f"{task}.")}


def test_transformers_loads_the_folder(exported):
    transformers = pytest.importorskip("transformers")
    saved, out = exported
    model, info = transformers.BertModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys",
                                         "error_msgs")), info
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ours = BertTokenizer.from_pretrained(out, MAX_LENGTH)
    for pairs in (None, SECONDS):
        theirs = tokenizer(SENTENCES, pairs, padding=True, truncation=True, return_tensors="pt")
        enc = ours.encode(SENTENCES, pairs)
        for name in ("input_ids", "token_type_ids", "attention_mask"):
            assert torch.equal(theirs[name], getattr(enc, name)), name
    with torch.no_grad():
        hf = model.eval()(**enc.as_kwargs())
        mine = trained_encoder(saved)(**enc.as_kwargs())
    real = enc.attention_mask.bool()
    torch.testing.assert_close(hf.last_hidden_state[real], mine.last_hidden_state[real],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hf.pooler_output, mine.pooler_output, atol=1e-5, rtol=1e-5)


def test_sentence_transformers_embeds_as_we_do(exported):
    st = pytest.importorskip("sentence_transformers")
    saved, out = exported
    if saved["config"]["sts_encoding"] != "bi":
        assert not os.path.exists(os.path.join(out, "modules.json"))
        return
    model = st.SentenceTransformer(out, device="cpu")
    assert model.max_seq_length == MAX_LENGTH
    encoder, tokenizer = trained_encoder(saved), BertTokenizer.from_pretrained(out, MAX_LENGTH)
    with torch.no_grad():
        ours = [mean_pool(encoder(**e.as_kwargs()).last_hidden_state, e.attention_mask)
                for e in (tokenizer.encode(SENTENCES), tokenizer.encode(SECONDS))]
    theirs = [model.encode(texts, convert_to_tensor=True) for texts in (SENTENCES, SECONDS)]
    for a, b in zip(theirs, ours):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.similarity_pairwise(*theirs),
                               F.cosine_similarity(*ours, dim=-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["truncated", "not_a_checkpoint", "wrong_kind", "missing",
                                  "no_vocab", "out_not_empty"])
def test_bad_input_is_one_line_and_exit_2(exported, tmp_path, capsys, case):
    saved, out = exported
    best = str(tmp_path / "best.pt")
    args = ["--load", best, "--out", str(tmp_path / "hf")]
    named = best
    if case == "truncated":
        torch.save(saved, best)
        data = Path(best).read_bytes()
        Path(best).write_bytes(data[:len(data) // 2])
    elif case == "not_a_checkpoint":
        Path(best).write_text("id\tsentence\n0\thello\n")
    elif case == "wrong_kind":
        torch.save({"weights": torch.zeros(2)}, best)
    elif case == "no_vocab":  # a best.pt saved before it kept its own copy of the tokenizer
        torch.save({k: v for k, v in saved.items() if k != "tokenizer"}, best)
        (tmp_path / "empty").mkdir()
        args += ["--checkpoint", str(tmp_path / "empty")]
        named = str(tmp_path / "empty" / "vocab.txt")
    elif case == "out_not_empty":
        torch.save(saved, best)
        args = ["--load", best, "--out", out]
        named = os.path.abspath(out)
    assert export.cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], err
    if case == "out_not_empty":  # untouched, then replaced with --force
        before = read_json(out, "heads.json")
        assert export.cli(args + ["--force"]) == 0
        after = read_json(out, "heads.json")
        assert after["heads"] == before["heads"] and after["source"]["checkpoint"] == best
        assert not [n for n in os.listdir(os.path.dirname(out)) if n.startswith(".")]
    else:
        assert not os.path.exists(tmp_path / "hf")


def test_read_back_check_names_a_tensor_that_differs(tmp_path, tiny_config):
    """export's last check: a folder whose weights do not equal the encoder's is an error
    naming the tensor (here the folder holds another random encoder's weights)."""
    from safetensors.torch import save_file
    written, other = BertModel(tiny_config), BertModel(tiny_config)
    save_file(to_hf_state_dict(other), str(tmp_path / "model.safetensors"))
    export.check_reads_back(other, str(tmp_path))  # the same weights: passes
    with pytest.raises(export.CheckpointError, match="does not read back as written"):
        export.check_reads_back(written, str(tmp_path))
