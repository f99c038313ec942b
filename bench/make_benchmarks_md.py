"""Assemble BENCHMARKS.md from bench/results/*.md (each written by the benchmark that measured it)."""

from pathlib import Path

HERE = Path(__file__).parent
ORDER = ["sample", "ingest", "embed", "kmeans", "semdedup", "engines", "smollm2", "distill", "distill-identities",
         "alpaca52k", "cpu-avx2", "scale", "scorers", "quality", "quality-smollm2", "judge-truncation",
         "generation-cut", "select", "kmq-temperature", "subsets", "eval", "eval-intervals", "eval-strategy",
         "report", "flow", "refactor", "fuzz"]
HEAD = """# Benchmarks

Every number below was measured by the script named with it, on this project's machine kind: 2 x86_64
cores, 24 GiB, no GPU, unless a section says otherwise. Several benchmarks ran while other jobs shared the
two cores; each section states the load it saw. Rebuild this file with `python bench/make_benchmarks_md.py`
after re-running a benchmark (its results file in `bench/results/` is overwritten by the benchmark).
No GPU was lent to the sessions that wrote these numbers, so there are no GPU rows yet (`bench/gpu_oneshot.py` is
ready for one). Sections measured before SmolLM2 became the default scorer (engines, scorers, quality, subsets)
used the pool-trained proxy LM; they say so. The sections "alpaca52k", "distill" and the SmolLM2-student
"eval" were measured on 2026-12-02 with the benchmark at nice 0 and other jobs at nice 19 (the kernel's
autogroup scheduling, which had made `nice` ineffective in earlier sessions, was switched off).
"""


def demote(text: str) -> str:
    """Every heading one level down; lines inside ``` fences (shell comments) are left alone."""
    out, fenced = [], False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        out.append("#" + line if line.startswith("#") and not fenced else line)
    return "\n".join(out)


def main() -> None:
    parts = [HEAD]
    files = {p.stem: p for p in sorted((HERE / "results").glob("*.md")) if not p.stem.endswith("-readme")}
    for name in ORDER + sorted(set(files) - set(ORDER)):
        if name in files:
            text = files[name].read_text().strip()
            if not text.startswith("#"):
                text = f"# {name}\n\n{text}"
            # each results file is a document of its own: demote its headings one level under this page
            parts.append(demote(text))
    (HERE.parent / "BENCHMARKS.md").write_text("\n\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
