"""Tests for scripts/build_spam_dataset.py and the bundled spam dataset it produced."""

import base64
import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "build_spam_dataset.py"
BUNDLE = ROOT / "src" / "lorakit" / "bundled"
SPLITS = ("train", "validation", "test")


def _load_script() -> ModuleType:
    # The script is not part of the package, so import it by path.
    spec = importlib.util.spec_from_file_location("build_spam_dataset", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


build = _load_script()


# --- synthetic corpus in the npm package's format -------------------------

PLAIN_HAM = """\
From alice@example.org  Thu Aug 22 12:36:23 2002
From: Alice <alice@example.org>
To: bob@example.org
Subject: Meeting notes
Content-Type: text/plain; charset=us-ascii

Hi Bob,



Let's   meet tomorrow at noon.
"""

QP_SPAM = """\
From: deals@spam.example
Subject: =?iso-8859-1?q?Caf=E9_deals?=
MIME-Version: 1.0
Content-Type: text/plain; charset=iso-8859-1
Content-Transfer-Encoding: quoted-printable

Caf=E9 special =3D cheap pills, order to=
night!
"""

BASE64_BODY = base64.b64encode("Win a free cruise — naïve offer inside.\n".encode()).decode()
BASE64_SPAM = f"""\
From: win@spam.example
Subject: =?utf-8?b?{base64.b64encode("Frëe monëy".encode()).decode()}?=
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: base64

{BASE64_BODY}
"""

HTML_SPAM = """\
From: shop@spam.example
Subject: Hot offer
MIME-Version: 1.0
Content-Type: text/html; charset=us-ascii

<html><head><style>.x { color: red }</style><script>var evil = 1;</script></head>
<body><p>Buy&nbsp;now &amp; save &#36;100</p><br>Click <a href="http://x.example">here</a>
&lt;today&gt;</body></html>
"""

MULTIPART_HAM = """\
From: carol@example.org
Subject: Re: weekend plans
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="outer"

--outer
Content-Type: multipart/alternative; boundary="inner"

--inner
Content-Type: text/plain; charset=us-ascii

Plain version wins.
--inner
Content-Type: text/html; charset=us-ascii

<p>HTML version loses.</p>
--inner--
--outer
Content-Type: application/octet-stream; name="blob.bin"
Content-Disposition: attachment; filename="blob.bin"
Content-Transfer-Encoding: base64

QVRUQUNITUVOVFNFQ1JFVA==
--outer--
"""

HARD_HAM = """\
From: newsletter@shop.example
Subject: Your order HARDHAMMARKER
Content-Type: text/plain

HARDHAMMARKER special offers for loyal customers.
"""


def _write_message(folder: Path, name: str, group: str, text: str, msg_id: str = "00001") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    obj = {
        "id": msg_id,
        "group": group,
        "checksum": {"type": "MD5", "value": "0" * 32},
        "text": text,
    }
    (folder / name).write_text(json.dumps(obj), encoding="utf-8")


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    _write_message(root / "easy-ham-1", "00001.aaa.json", "easy-ham-1", PLAIN_HAM, "00001")
    _write_message(root / "easy-ham-1", "00002.bbb.json", "easy-ham-1", MULTIPART_HAM, "00002")
    # Same message again in another group and file: must be deduplicated.
    _write_message(root / "easy-ham-2", "dup.json", "easy-ham-2", PLAIN_HAM, "00007")
    _write_message(root / "spam-1", "00001.ccc.json", "spam-1", QP_SPAM, "00001")
    _write_message(root / "spam-2" / "nested", "x.json", "spam-2", BASE64_SPAM, "00003")
    _write_message(root / "spam-2", "00004.ddd.json", "spam-2", HTML_SPAM, "00004")
    _write_message(root / "hard-ham-1", "00001.eee.json", "hard-ham-1", HARD_HAM, "00001")
    # Non-message JSON that the real package also ships.
    (root / "file_list.json").write_text(json.dumps(["easy-ham-1/00001.aaa.txt"]), encoding="utf-8")
    return root


def _read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _by_subject(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {row["text"].split("\n", 1)[0]: row for row in rows}


# --- conversion -----------------------------------------------------------


def test_labels_decoding_exclusion_and_dedup(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "spam.jsonl"
    assert build.main([str(corpus), "--out", str(out)]) == 0
    rows = _read_jsonl(out)
    by_subject = _by_subject(rows)

    assert len(rows) == 5  # 7 messages - 1 hard-ham - 1 duplicate
    assert set(by_subject) == {
        "Subject: Meeting notes",
        "Subject: Re: weekend plans",
        "Subject: Café deals",
        "Subject: Frëe monëy",
        "Subject: Hot offer",
    }
    assert Counter(r["label"] for r in rows) == {"ham": 2, "spam": 3}
    assert by_subject["Subject: Meeting notes"]["label"] == "ham"
    assert by_subject["Subject: Hot offer"]["label"] == "spam"

    # Blank-line runs and space runs collapsed.
    assert (
        by_subject["Subject: Meeting notes"]["text"]
        == "Subject: Meeting notes\n\nHi Bob,\n\nLet's meet tomorrow at noon."
    )
    # Quoted-printable: =E9 in Latin-1, =3D, soft line break.
    assert "Café special = cheap pills, order tonight!" in by_subject["Subject: Café deals"]["text"]
    # Base64 + UTF-8.
    assert "Win a free cruise — naïve offer inside." in by_subject["Subject: Frëe monëy"]["text"]
    # HTML only: tags, script and style gone; entities unescaped.
    html_text = by_subject["Subject: Hot offer"]["text"]
    assert "Buy now & save $100" in html_text
    assert "Click here" in html_text and "<today>" in html_text
    for junk in ("<p", "<br", "href", "evil", "color", "&amp;", "&nbsp;"):
        assert junk not in html_text
    # multipart/alternative: text/plain preferred; attachment skipped.
    multi = by_subject["Subject: Re: weekend plans"]["text"]
    assert "Plain version wins." in multi
    assert "HTML version loses" not in multi
    assert "ATTACHMENTSECRET" not in multi and "QVRUQUNI" not in multi

    # hard-ham excluded everywhere.
    assert all("HARDHAMMARKER" not in r["text"] for r in rows)


def test_jsonl_format(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "spam.jsonl"
    build.main([str(corpus), "--out", str(out)])
    raw = out.read_text(encoding="utf-8")
    assert raw.endswith("\n")
    assert "Café" in raw  # ensure_ascii=False
    for line in raw.splitlines():
        row = json.loads(line)
        assert list(row) == ["text", "label"]
        assert isinstance(row["text"], str) and row["label"] in {"ham", "spam"}
        assert row["text"].startswith("Subject: ")


def test_output_is_deterministic(corpus: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    build.main([str(corpus), "--out", str(first)])
    build.main([str(corpus), "--out", str(second)])
    assert first.read_bytes() == second.read_bytes()


def test_groups_option_selects_hard_ham(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "hard.jsonl"
    build.main([str(corpus), "--out", str(out), "--groups", "hard-ham-1"])
    rows = _read_jsonl(out)
    assert len(rows) == 1 and rows[0]["label"] == "ham" and "HARDHAMMARKER" in rows[0]["text"]


def test_max_chars_truncates_body(tmp_path: Path) -> None:
    long_msg = "Subject: long\nContent-Type: text/plain\n\n" + "word " * 500
    _write_message(tmp_path / "data", "m.json", "spam-1", long_msg)
    out = tmp_path / "spam.jsonl"
    build.main([str(tmp_path / "data"), "--out", str(out), "--max-chars", "50"])
    (row,) = _read_jsonl(out)
    body = row["text"].split("\n\n", 1)[1]
    assert 0 < len(body) <= 50 and body.startswith("word word")


@pytest.mark.parametrize(
    ("group", "label"),
    [
        ("easy-ham-1", "ham"),
        ("easy-ham-2", "ham"),
        ("hard-ham-1", "ham"),
        ("spam-1", "spam"),
        ("spam-2", "spam"),
    ],
)
def test_label_for_group(group: str, label: str) -> None:
    assert build.label_for_group(group) == label


# --- splitting ------------------------------------------------------------


def _tag(i: int) -> str:
    """A distinct lowercase word per ``i``: digits alone are masked by the split key."""
    word = ""
    while True:
        i, rest = divmod(i, 26)
        word = chr(ord("a") + rest) + word
        if i == 0:
            return "q" + word


def _many_messages(root: Path, n_ham: int, n_spam: int) -> None:
    for i in range(n_ham):
        body = f"Hello {_tag(i)}, here are the notes from meeting {_tag(i)} as promised.\n"
        _write_message(root, f"h{i}.json", "easy-ham-1", f"Subject: ham {i}\n\n{body}", f"{i:05d}")
    for i in range(n_spam):
        body = f"Buy item {_tag(i)} now, item {_tag(i)} is the deal of the century!\n"
        _write_message(root, f"s{i}.json", "spam-2", f"Subject: spam {i}\n\n{body}", f"{i:05d}")


def test_split_is_stratified_deterministic_and_disjoint(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _many_messages(data, n_ham=30, n_spam=20)
    outs = []
    for run in ("run1", "run2"):
        out = tmp_path / run / "spam.jsonl"
        build.main([str(data), "--out", str(out), "--split", "--seed", "7"])
        assert not out.exists()  # only the split files are written
        outs.append({s: out.with_name(f"spam_{s}.jsonl") for s in SPLITS})

    # Deterministic: same bytes on a second run.
    for split in SPLITS:
        assert outs[0][split].read_bytes() == outs[1][split].read_bytes()

    rows = {s: _read_jsonl(outs[0][s]) for s in SPLITS}
    counts = {s: Counter(r["label"] for r in rows[s]) for s in SPLITS}
    # Default fractions 0.1 / 0.2, applied per label.
    assert counts["validation"] == {"ham": 3, "spam": 2}
    assert counts["test"] == {"ham": 6, "spam": 4}
    assert counts["train"] == {"ham": 21, "spam": 14}

    texts = {s: {r["text"] for r in rows[s]} for s in SPLITS}
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    assert sum(len(t) for t in texts.values()) == 50

    # A different seed gives a different (but equally sized) test split.
    other = tmp_path / "run3" / "spam.jsonl"
    build.main([str(data), "--out", str(other), "--split", "--seed", "8"])
    other_test = {r["text"] for r in _read_jsonl(other.with_name("spam_test.jsonl"))}
    assert len(other_test) == 10 and other_test != texts["test"]


def _row(subject: str, body: str, label: str) -> dict[str, str]:
    return {"text": f"Subject: {subject}\n\n{body}", "label": label}


def _campaign_rows() -> list[dict[str, str]]:
    """~100 rows: mostly distinct messages plus campaigns resent under new subjects."""
    rows = [
        _row(
            f"note {_tag(i)}", f"Minutes of meeting {_tag(i)}: we agreed on plan {_tag(i)}.", "ham"
        )
        for i in range(60)
    ]
    rows += [
        _row(
            f"offer {_tag(i)}",
            f"Exclusive offer {_tag(i)} for you, reply to claim {_tag(i)}!",
            "spam",
        )
        for i in range(28)
    ]
    # Campaigns: one body, new subjects, new tracking numbers and spacing.
    pitch = "Dear friend, you have been selected for a FREE cruise. Call now, ref #{n}."
    rows += [_row(f"Cruise {n}!!", pitch.format(n=n * 7919), "spam") for n in range(5)]
    rows += [
        _row(
            f"Re: pills {n}", f"CHEAP  pills\n\nonline,   order {n}  today, no prescription", "spam"
        )
        for n in range(3)
    ]
    thread = "> quoted text of the original message that everyone kept replying to"
    rows += [_row(f"Re: thread {_tag(n)}", thread, "ham") for n in range(4)]
    return rows


def _split_of(parts: dict[str, list[dict[str, str]]]) -> dict[str, str]:
    return {row["text"]: name for name, rows in parts.items() for row in rows}


def test_near_duplicate_key_normalisation() -> None:
    key = build.near_duplicate_key
    body = "Dear friend, you have been selected for a FREE cruise. Call now!"
    assert key(f"Subject: a\n\n{body} ref 123") == key(f"Subject: b\n\n{body.upper()}\n ref  9")
    assert key(f"Subject: a\n\n{body}") != key("Subject: a\n\nSomething else entirely, friend.")
    # Only the opening of the body counts: per-copy tails are ignored.
    opening = "x" * build.NEAR_DUP_KEY_CHARS
    assert key(f"Subject: a\n\n{opening} tail one") == key(f"Subject: b\n\n{opening} tail two")
    # Short or empty bodies fall back to the subject; nothing at all stays unique.
    assert key("Subject: Hot Deal 42\n\n") == key("Subject: hot  deal 7\n\nok")
    assert key("Subject: Hot Deal\n\n") != key("Subject: Cold Deal\n\n")
    assert key("Subject: \n\n.") != key("Subject: \n\n..")


@pytest.mark.parametrize("seed", range(10))
def test_same_body_different_subject_lands_in_one_split(seed: int) -> None:
    rows = _campaign_rows()
    split_of = _split_of(build.stratified_split(rows, 0.1, 0.2, seed))
    assert len(split_of) == len(rows)
    for group in build.group_near_duplicates(rows).values():
        assert len({split_of[r["text"]] for r in group}) == 1, group


def test_same_body_different_subject_through_cli(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _many_messages(data, n_ham=20, n_spam=20)
    body = "You have WON our grand prize draw! Reply with your bank details to claim it.\n"
    for i, subject in enumerate(("You won", "URGENT: claim your prize", "re: prize 123")):
        _write_message(data, f"c{i}.json", "spam-1", f"Subject: {subject}\n\n{body}", f"9{i:04d}")
    out = tmp_path / "out" / "spam.jsonl"
    for seed in range(5):
        build.main([str(data), "--out", str(out), "--split", "--seed", str(seed)])
        parts = {s: _read_jsonl(out.with_name(f"spam_{s}.jsonl")) for s in SPLITS}
        homes = {s for s, rows in parts.items() for r in rows if "grand prize draw" in r["text"]}
        assert len(homes) == 1


def test_group_split_is_stratified_and_deterministic() -> None:
    rows = _campaign_rows()
    first = build.stratified_split(rows, 0.1, 0.2, 3)
    # Same seed, any input order: same split.
    assert build.stratified_split(list(reversed(rows)), 0.1, 0.2, 3) == first
    assert build.stratified_split(rows, 0.1, 0.2, 4) != first
    totals = Counter(r["label"] for r in rows)
    for seed in range(10):
        parts = build.stratified_split(rows, 0.1, 0.2, seed)
        assert sum(len(p) for p in parts.values()) == len(rows)
        for name, target in (("validation", 0.1), ("test", 0.2)):
            counts = Counter(r["label"] for r in parts[name])
            for label, total in totals.items():
                assert abs(counts[label] / total - target) <= 0.05, (seed, name, label)


def test_group_label_is_the_majority() -> None:
    assert (
        build.group_label([_row("a", "x", "spam"), _row("b", "x", "ham"), _row("c", "x", "spam")])
        == "spam"
    )
    assert build.group_label([_row("a", "x", "spam"), _row("b", "x", "ham")]) == "ham"


def test_assign_groups_never_overshoots_test_or_validation() -> None:
    groups = [
        [_row(f"s{i}", "b", "spam")] * size for i, size in enumerate((5, 1, 1, 3, 1, 1, 1, 1))
    ]
    parts = build.assign_groups(groups, (9, 2, 3))
    assert [len(parts[s]) for s in ("train", "validation", "test")] == [9, 2, 3]
    # The 5-row group does not fit test (3) or validation (2), so it trains.
    assert parts["train"][:5] == groups[0]


def test_split_paths_naming() -> None:
    paths = build.split_paths(Path("some/dir/spam.jsonl"))
    assert paths == {
        "train": Path("some/dir/spam_train.jsonl"),
        "validation": Path("some/dir/spam_validation.jsonl"),
        "test": Path("some/dir/spam_test.jsonl"),
    }


# --- errors ---------------------------------------------------------------


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(SystemExit, match="does not exist.*nope"):
        build.main([str(missing), "--out", str(tmp_path / "o.jsonl")])


def test_folder_without_messages_is_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "file_list.json").write_text("[]", encoding="utf-8")
    with pytest.raises(SystemExit, match="no usable message files.*empty"):
        build.main([str(empty), "--out", str(tmp_path / "o.jsonl")])


def test_cli_help_documents_split_naming() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert "_train.jsonl" in result.stdout and "hard-ham-1" in result.stdout


# --- the committed bundle -------------------------------------------------


def test_bundled_dataset_is_well_formed() -> None:
    texts: dict[str, set[str]] = {}
    counts: dict[str, Counter[str]] = {}
    for split in SPLITS:
        path = BUNDLE / f"spam_{split}.jsonl"
        assert path.is_file(), f"missing bundled file {path}"
        rows = _read_jsonl(path)
        for row in rows:
            assert set(row) == {"text", "label"}
            assert row["label"] in {"ham", "spam"}
            assert isinstance(row["text"], str) and row["text"].startswith("Subject: ")
        counts[split] = Counter(r["label"] for r in rows)
        texts[split] = {r["text"] for r in rows}
        assert len(texts[split]) == len(rows), f"duplicate rows in {path}"
        assert counts[split]["ham"] > 0 and counts[split]["spam"] > 0

    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not texts[a] & texts[b], f"texts shared between {a} and {b}"

    # The package has 3900 easy-ham and 1896 spam messages; more ham than
    # that would mean hard-ham-1 (250 messages) leaked in.
    ham = sum(c["ham"] for c in counts.values())
    spam = sum(c["spam"] for c in counts.values())
    assert 3500 <= ham <= 3900
    assert 1600 <= spam <= 1896
    total = ham + spam
    assert abs(sum(counts["test"].values()) / total - 0.2) < 0.02
    assert abs(sum(counts["validation"].values()) / total - 0.1) < 0.02

    readme = (BUNDLE / "README.md").read_text(encoding="utf-8")
    assert "hard-ham-1" in readme and "excluded on purpose" in readme
    assert "CC0" in readme and "PDDL" in readme

    size = sum((BUNDLE / f"spam_{s}.jsonl").stat().st_size for s in SPLITS)
    assert size <= 6_000_000


def test_bundled_near_duplicates_stay_in_one_split() -> None:
    homes: dict[str, set[str]] = {}
    openings: dict[str, set[str]] = {}
    for split in SPLITS:
        for row in _read_jsonl(BUNDLE / f"spam_{split}.jsonl"):
            homes.setdefault(build.near_duplicate_key(row["text"]), set()).add(split)
            body = row["text"].split("\n\n", 1)[1]
            if body:
                openings.setdefault(body[:300], set()).add(split)
    leaked = [key[:80] for key, splits in homes.items() if len(splits) > 1]
    assert not leaked, f"near-duplicate keys in more than one split: {leaked[:5]}"
    # The symptom that motivated grouping: test spam whose first 300 body
    # characters also open a training row.
    shared = [body[:80] for body, splits in openings.items() if len(splits) > 1]
    assert not shared, f"body openings in more than one split: {shared[:5]}"
