"""Row texts on the page: cluster labels from their instructions (c-TF-IDF) and escaped, shortened examples.

Why c-TF-IDF (as BERTopic labels topics): a cluster number says nothing, and the words that are frequent in a
cluster's instructions *and* rare in the other clusters' name it well enough to read a map or a table.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from curate.report.charts import esc

#: a token: two or more letters (numbers and one-letter words name nothing)
TOKEN = r"(?u)\b[^\W\d_][^\W\d_]+\b"


def cluster_terms(docs: Mapping[Any, Sequence[str]], n_terms: int = 3) -> dict[Any, list[str]]:
    """Top `n_terms` words per cluster by class-based TF-IDF over its texts.

    tf(t, c) = count of t in c / words in c; weight = tf * log(1 + A / f(t)), with f(t) the count of t in all
    clusters and A the mean words per cluster. English stop words are left out.
    """
    from sklearn.feature_extraction.text import CountVectorizer

    keys = [k for k, v in docs.items() if v]
    if not keys:
        return {}
    joined = ["\n".join(docs[k]) for k in keys]
    try:
        vec = CountVectorizer(token_pattern=TOKEN, stop_words="english", lowercase=True, max_features=50_000)
        counts = vec.fit_transform(joined).astype(np.float64)
    except ValueError:  # nothing but stop words / numbers in every cluster
        return {k: [] for k in keys}
    words = np.asarray(vec.get_feature_names_out())
    per_class = np.asarray(counts.sum(axis=1)).ravel()
    per_term = np.asarray(counts.sum(axis=0)).ravel()
    avg = per_class.sum() / len(keys)
    idf = np.log1p(avg / np.maximum(per_term, 1))
    out: dict[Any, list[str]] = {}
    for i, k in enumerate(keys):
        row = counts.getrow(i)
        if not row.nnz or not per_class[i]:
            out[k] = []
            continue
        w = row.data / per_class[i] * idf[row.indices]
        order = np.lexsort((words[row.indices], -w))[:n_terms]  # ties broken alphabetically: deterministic
        out[k] = [str(words[row.indices[j]]) for j in order]
    return out


def clip(text: str | None, n: int, *, tail: int = 0) -> str:
    """`text` (whitespace folded) cut to about n characters on word boundaries, with an ellipsis where cut;
    with `tail`, its last `tail` characters are kept too (prompts often put what differs at the end: a
    shared tool preamble then the question, an instruction then its input)."""
    t = " ".join((text or "").split())
    if len(t) <= n:
        return t
    head = n - tail if tail else n
    cut = t[:head].rsplit(" ", 1)[0] if " " in t[:head] else t[:head]
    if not tail:
        return cut + " …"
    end = t[-tail:]
    end = end.split(" ", 1)[1] if " " in end else end
    return f"{cut} … {end}"


def example(t: Mapping[str, str] | None, n: int = 220) -> str:
    """A row as escaped HTML: instruction and response, shortened; the full texts (up to 2,000 characters)
    are in the tooltip."""
    if not t:
        return '<span class="ex muted">(text not available)</span>'
    ins, resp = t.get("instruction") or "", t.get("response") or ""
    full = f"{ins[:2000]}\n---\n{resp[:2000]}"
    return (f'<div class="ex" title="{esc(full)}"><b>Q</b> {esc(clip(ins, n, tail=n // 3))}<br>'
            f'<b>A</b> {esc(clip(resp, n // 2))}</div>')


#: where a row's text goes: sections leave a marker, the page fills every marker from one read of the texts
_REF = re.compile(r"<!--ex:(.*?):(\d+)-->")


def example_ref(row_id: Any, n: int = 220) -> str:
    """A marker for `example(<row's texts>, n)`, filled in by `fill_examples` (a row id cannot forge one: ids
    are escaped, so they hold no `>`)."""
    return f"<!--ex:{esc(row_id)}:{int(n)}-->"


def fill_examples(page: str, lookup: Callable[[Iterable[str]], Mapping[str, Mapping[str, str]]]) -> str:
    """Replace every example marker with the row's escaped texts, reading all of them with one `lookup`."""
    ids = {html.unescape(m.group(1)) for m in _REF.finditer(page)}
    if not ids:
        return page
    txt = lookup(ids)
    return _REF.sub(lambda m: example(txt.get(html.unescape(m.group(1))), int(m.group(2))), page)
