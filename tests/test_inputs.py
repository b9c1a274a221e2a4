"""One way to read text: predict.py's input (a file or standard input) and the data files
are read by one function (UTF-8, a BOM stripped, lines split at \\n or \\r\\n only), and
outputs are written by one; every failure is one line naming the file (and line), exit 2.
Each case runs a real entry: predict.cli, the data readers, or a tiny training run."""
import io
import logging
import os

import pytest

import classifier
import predict
from datasets import DataError, read_sentences
from engine.errors import OutputError
from engine.runfiles import atomic_write
from engine.specs import SENTIMENT_5

BOM = b"\xef\xbb\xbf"
GOOD = b"the movie is good .\n"


@pytest.fixture(scope="module")
def model(tiny_checkpoint, tiny_data, tmp_path_factory) -> str:
    run_dir = tmp_path_factory.mktemp("inputs") / "run"
    classifier.main(["--task", "sst", "--checkpoint", tiny_checkpoint, "--data_dir", tiny_data,
                     "--run_dir", str(run_dir), "--epochs", "1", "--no-progress",
                     "--max_length", "64"])
    return str(run_dir / "best.pt")


def run_predict(monkeypatch, capsys, model, args, stdin=b""):
    """predict.py as a user runs it: (exit code, stdout, stderr)."""
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    monkeypatch.setattr("sys.argv", ["predict.py", "--load", model, "--task", "sst", *args])
    code = predict.cli()
    out = capsys.readouterr()
    return code, out.out, out.err


# (case, files to write under tmp_path, arguments, stdin, exit code, stdout or stderr wanted);
# {tmp} in arguments and messages is tmp_path.
PREDICT_CASES = [
    ("stdin not UTF-8", {}, [], GOOD + b"the \xff movie\n", 2,
     "error: <stdin>, line 2: not UTF-8 text (invalid start byte)\n"),
    ("input file not UTF-8", {"in.txt": b"ok\r\nok\r\n\xe9t\xe9\r\n"}, ["--input", "{tmp}/in.txt"],
     b"", 2, "error: {tmp}/in.txt, line 3: not UTF-8 text (invalid continuation byte)\n"),
    ("input a folder", {"d/": b""}, ["--input", "{tmp}/d"], b"", 2,
     "error: --input {tmp}/d: a folder, not a file\n"),
    ("input missing", {}, ["--input", "{tmp}/nothere.txt"], b"", 2,
     "error: {tmp}/nothere.txt: file not found\n"),
    ("output a folder", {"d/": b""}, ["--output", "{tmp}/d"], GOOD, 2,
     "error: {tmp}/d: is a folder, not a file\n"),
    ("split at \\n and \\r\\n only", {}, [],
     "the movie\u2028is good .\nthe film\x0cwas bad .\r\nthe movie\x1eis fine .\rok\n".encode(), 0,
     ["the movie\u2028is good .", "the film\x0cwas bad .", "the movie\x1eis fine .\rok"]),
    ("BOM on stdin", {}, [], BOM + GOOD, 0, ["the movie is good ."]),
    ("BOM in the input file", {"in.txt": BOM + GOOD}, ["--input", "{tmp}/in.txt"], b"", 0,
     ["the movie is good ."]),
]


def write_files(folder, files: dict) -> None:
    for name, data in files.items():
        if name.endswith("/"):
            os.makedirs(folder / name)
        else:
            (folder / name).write_bytes(data)


@pytest.mark.parametrize("case, files, args, stdin, code, wanted", PREDICT_CASES,
                         ids=[c[0] for c in PREDICT_CASES])
def test_predict_reads_and_writes_text_one_way(model, tmp_path, monkeypatch, capsys,
                                               case, files, args, stdin, code, wanted):
    write_files(tmp_path, files)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    got_code, out, err = run_predict(monkeypatch, capsys, model, args, stdin)
    assert got_code == code
    if code:
        assert err == wanted.replace("{tmp}", str(tmp_path)) and out == ""
        return
    lines = out.split("\n")
    assert lines.pop() == ""
    assert [line.split("\t", 2)[2] for line in lines] == wanted
    # the text reaching the model is the text without the BOM: the same predictions
    _, plain, _ = run_predict(monkeypatch, capsys, model, [],
                              "".join(t + "\n" for t in wanted).encode())
    assert out == plain


def sst_file(path, body: bytes, header: bytes = b"\tid\tsentence\tsentiment\n") -> str:
    path.write_bytes(header + body)
    return str(path)


ROWS = b"".join(b"%d\tr%d\tthe movie is good .\t3\n" % (i, i) for i in range(60))
STRAY = b"0\ta\tthe movie is fine .\t2\n1\tb\t\"the movie is good .\t3\n" + ROWS
QUOTED = b'0\ta\t"a ""quoted"" word"\t2\n1\tb\tno quotes\t3\n'

# (case, file body, header, examples wanted as (id, sentence, label), or the error wanted)
DATA_CASES = [
    ("stray quote is text", STRAY, None,
     [("a", "the movie is fine .", 2), ("b", "\"the movie is good .", 3)]
     + [(f"r{i}", "the movie is good .", 3) for i in range(60)]),
    ("a quoted field is unquoted", QUOTED, None,
     [("a", 'a "quoted" word', 2), ("b", "no quotes", 3)]),
    ("BOM in the header", b"a\tfine .\t2\n", BOM + b"id\tsentence\tsentiment\n",
     [("a", "fine .", 2)]),
    ("CRLF lines and U+2028 in a sentence", "0\ta\tfine\u2028film .\t2\r\n1\tb\tok\x0c.\t1\r\n"
     .encode(), None, [("a", "fine\u2028film .", 2), ("b", "ok\x0c.", 1)]),
    ("label inf", b"0\ta\tfine .\t2\n1\tb\tok .\tinf\n", None,
     "sst.csv, line 3: bad sentiment label: 'inf' is not a finite number"),
    ("label -inf", b"0\ta\tfine .\t-inf\n", None,
     "sst.csv, line 2: bad sentiment label: '-inf' is not a finite number"),
    ("label 1e999", b"0\ta\tfine .\t1e999\n", None,
     "sst.csv, line 2: bad sentiment label: '1e999' is not a finite number"),
    ("not UTF-8", b"0\ta\tfine .\t2\n1\tb\tok .\t1\n2\tc\tcaf\xe9 .\t1\n", None,
     "sst.csv, line 4: not UTF-8 text (invalid continuation byte)"),
]


@pytest.mark.parametrize("case, body, header, wanted", DATA_CASES,
                         ids=[c[0] for c in DATA_CASES])
def test_data_files_read_one_way(tmp_path, case, body, header, wanted):
    path = sst_file(tmp_path / "sst.csv", body, *([header] if header else []))
    if isinstance(wanted, str):
        with pytest.raises(DataError) as err:
            read_sentences(path, SENTIMENT_5)
        assert str(err.value) == f"{tmp_path}/{wanted}"
        return
    examples = read_sentences(path, SENTIMENT_5)
    assert [(e.id, *e.texts, e.label) for e in examples] == wanted


def test_a_stray_quote_is_named_in_one_warning(tmp_path, caplog):
    path = sst_file(tmp_path / "sst.csv", STRAY + b'9\tz\t"x"y\t1\n')
    with caplog.at_level(logging.WARNING):
        assert len(read_sentences(path, SENTIMENT_5)) == 63
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: 2 line(s) whose quotes do not parse read as plain text (line 3, 64)"]


def test_a_data_folder_is_named(tmp_path):
    os.makedirs(tmp_path / "sst.csv")
    with pytest.raises(DataError, match=f"^{tmp_path}/sst.csv: is a folder, not a file$"):
        read_sentences(str(tmp_path / "sst.csv"), SENTIMENT_5)


def test_one_writer_refuses_a_folder_or_a_file_as_folder(tmp_path):
    os.makedirs(tmp_path / "d")
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match=f"^{tmp_path}/d: is a folder, not a file$"):
        atomic_write(str(tmp_path / "d"), lambda f: f.write("x"))
    with pytest.raises(OutputError, match=f"^{tmp_path}/f/out.txt: cannot be written"):
        atomic_write(str(tmp_path / "f" / "out.txt"), lambda f: f.write("x"))


def copy_data(tiny_data, folder, changes: dict) -> str:
    """The tiny data with some files' lines changed: name -> {line number: new line}."""
    os.makedirs(folder)
    for name in os.listdir(tiny_data):
        lines = open(os.path.join(tiny_data, name), encoding="utf-8").read().split("\n")
        for number, line in changes.get(name, {}).items():
            lines[number - 1] = line
        (folder / name).write_text("\n".join(lines), encoding="utf-8")
    return str(folder)


def test_training_on_a_stray_quote_keeps_every_row(tiny_checkpoint, tiny_data, tmp_path, capsys):
    stray = {2: "0\ttrain0\t\"the movie is awful .\t0"}
    data = copy_data(tiny_data, tmp_path / "data", {"ids-sst-train.csv": stray,
                                                   "ids-sst-dev.csv": stray})
    classifier.main(["--task", "sst", "--checkpoint", tiny_checkpoint, "--data_dir", data,
                     "--run_dir", str(tmp_path / "run"), "--epochs", "1", "--no-progress",
                     "--max_length", "64"])
    assert "sst: 24 train, 24 dev, 6 test" in capsys.readouterr().out


def test_training_on_an_infinite_label_is_a_clean_error(tiny_checkpoint, tiny_data, tmp_path,
                                                        monkeypatch, capsys):
    data = copy_data(tiny_data, tmp_path / "data",
                     {"ids-sst-train.csv": {4: "2\ttrain2\tthe movie is fine .\tinf"}})
    monkeypatch.setattr("sys.argv", ["classifier.py", "--task", "sst", "--checkpoint",
                                     tiny_checkpoint, "--data_dir", data, "--run_dir",
                                     str(tmp_path / "run"), "--no-progress", "--max_length", "64"])
    assert classifier.cli() == 2
    assert capsys.readouterr().err == (f"error: {data}/ids-sst-train.csv, line 4: bad sentiment "
                                       "label: 'inf' is not a finite number\n")
