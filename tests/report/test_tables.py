"""Paper tables: bold best per column (by the metric's direction), dense row, precision, LaTeX/Markdown escaping."""
from __future__ import annotations

import re


from actsparse.report.iso import iso_quality
from actsparse.report.quality import parse_budget, parse_quality
from actsparse.report.tables import (Cell, Row, Table, iso_quality_table, latex_escape, md_escape, sparsity_table,
                                     task_table)

from .conftest import frame

KEY = {"model": "m", "eval_data": "bundled:eval", "token_policy": "all"}


def _md_rows(md: str) -> dict[str, list[str]]:
    return {r.split(" | ")[0].lstrip("| ").strip(): [c.strip() for c in r.strip(" |").split(" | ")[1:]]
            for r in md.splitlines() if r.startswith("| ") and "---" not in r}


def test_latex_escape_makes_every_special_character_literal():
    assert latex_escape(r"a_b & 50% $x$ #1 {y} ~z ^w \cmd") == \
        r"a\_b \& 50\% \$x\$ \#1 \{y\} \textasciitilde{}z \textasciicircum{}w \textbackslash{}cmd"
    assert latex_escape("ppl ≤ 1.02 × dense ↓ –") == r"ppl $\leq$ 1.02 $\times$ dense $\downarrow$ --"
    assert md_escape("ffn_threshold|x*") == r"ffn\_threshold\|x\*"


def test_latex_table_is_booktabs_with_escaped_names_and_bold_best():
    df = frame()
    df.loc[df["method"] == "B", "method"] = "ffn_thr&50%"
    t = sparsity_table(df, KEY, parse_quality("ppl"))
    tex = t.latex()
    lines = tex.splitlines()
    assert lines[:6] == ["\\begin{table}[t]", "\\centering", "\\small",
                         "\\caption{ppl $\\downarrow$ by method and requested sparsity (model m, eval bundled:eval, "
                         "token policy all)}", "\\begin{tabular}{lrrrrr}", "\\toprule"]
    assert lines[6] == "method & 0.1 & 0.2 & 0.3 & 0.4 & 0.6 \\\\"
    assert lines[7] == "\\midrule" and lines[8].startswith("dense & 10.00 & 10.00")
    assert lines[9] == "\\midrule"                                   # the dense row is set apart
    rows = {ln.split(" & ")[0]: ln.split(" & ")[1:] for ln in lines if " & " in ln}
    # column 0.2: A 10.10, ffn_thr&50% 10.05, C 10.10 -> the escaped ffn row is bold; dense (10.00) never is
    assert rows["ffn\\_thr\\&50\\%"][1] == "\\textbf{10.05}"
    assert rows["A"][1] == "10.10" and rows["dense"][1] == "10.00"
    assert tex.rstrip().endswith("\\bottomrule\n\\end{tabular}\n\\end{table}")
    assert "ffn_thr&50%" not in tex                                  # no unescaped special character survives


def test_bold_best_follows_the_metric_direction_and_ties_on_the_printed_value():
    df = frame()
    ppl = _md_rows(sparsity_table(df, KEY, parse_quality("ppl")).markdown())
    # requested 0.4: A 10.50 vs B 10.80 -> A (lower); 0.6: A 12.00 vs B 11.00 -> B
    assert ppl["method"] == ["0.1", "0.2", "0.3", "0.4", "0.6"]
    assert ppl["A"][3] == "**10.50**" and ppl["B"][3] == "10.80"
    assert ppl["A"][4] == "12.00" and ppl["B"][4] == "**11.00**"
    assert ppl["dense"] == ["10.00"] * 5                             # the reference row: never bold
    acc = _md_rows(sparsity_table(df, KEY, parse_quality("acc_avg")).markdown())
    # accuracy in percent, higher is better: 0.2 -> A 59.80 vs B 59.50 -> A; 0.4 -> B 59.60 vs A 58.00 -> B
    assert acc["A"][0] == "**59.80**" and acc["B"][0] == "59.50"
    assert acc["B"][1] == "**59.60**" and acc["dense"] == ["60.00"] * 3
    tie = frame()
    tie.loc[(tie["method"] == "A") & (tie["sparsity"] == 0.2), "ppl"] = 10.049   # prints as 10.05, like B's
    rows = _md_rows(sparsity_table(tie, KEY, parse_quality("ppl")).markdown())
    assert rows["A"][1] == rows["B"][1] == "**10.05**"


def test_every_number_of_a_table_has_the_same_precision():
    df = frame()
    df.loc[1, "ppl"] = 10.123456
    df.loc[2, "ppl"] = 100.5
    md = sparsity_table(df, KEY, parse_quality("ppl")).markdown()
    nums = re.findall(r"\d+\.\d+", "\n".join(md.splitlines()[3:]))
    assert nums and all(len(n.split(".")[1]) == 2 for n in nums)
    assert "10.12" in md and "100.50" in md


def test_task_table_bolds_per_sparsity_block_and_keeps_the_dense_row():
    df = frame()
    df["acc/arc"] = df["acc_avg"]
    df["acc/piqa"] = 1.0 - df["acc_avg"]
    tasks = [parse_quality("acc/arc"), parse_quality("acc/piqa")]
    t = task_table(df[df["method"].isin(["dense", "A", "B"])], KEY, tasks)
    rows = _md_rows(t.markdown())
    assert rows["method @ sparsity"] == ["acc/arc (%) ↑", "acc/piqa (%) ↑"]
    assert rows["dense"] == ["60.00", "40.00"]
    # block 0.2: arc A 59.80 > B 59.50; piqa B 40.50 > A 40.20 ; block 0.6: arc B 57.00 > A 50.00
    assert rows["A @ 0.2"] == ["**59.80**", "40.20"] and rows["B @ 0.2"] == ["59.50", "**40.50**"]
    assert rows["B @ 0.6"] == ["**57.00**", "43.00"] and rows["A @ 0.6"] == ["50.00", "**50.00**"]
    assert t.latex().count("\\midrule") == 1 + 3       # below the header, then above each of the 3 sparsity blocks


def test_iso_quality_table_marks_extrapolation_and_never_bolds_it():
    q = parse_quality("ppl")
    iso = iso_quality(frame(), q, parse_budget("1.02x", q))
    t = iso_quality_table(iso, KEY, q)
    rows = _md_rows(t.markdown())
    # reached effective sparsity: A .250, B .280, C .325 (extrapolated), D .400 (extrapolated)
    assert rows["A"][0] == "0.250" and rows["B"][0] == "**0.280**"
    assert rows["C"][0] == "0.325†" and rows["D"][0] == "0.400†"
    assert rows["B"][1] == "**1.28**" and rows["C"][1] == "1.16†" and rows["D"][1] == "–"
    assert rows["dense"][:2] == ["0.000", "1.00"]
    assert any("extrapolated" in n for n in t.notes)
    assert "ppl ≤ 10.20" in t.notes[0] and "\\textsuperscript{\\dag}" in t.latex()


def test_html_of_a_table_escapes_and_bolds():
    t = Table("a <b> & c", ["method", "x"], [Row("dense", [Cell("1.00")]), Row("<m>", [Cell("2.00", True, "†")], True)],
              "t")
    h = t.html()
    assert "<caption>a &lt;b&gt; &amp; c</caption>" in h and "&lt;m&gt;" in h
    assert "<strong>2.00</strong><sup>†</sup>" in h and '<tr class="ref">' in h and '<tr class="rule">' in h


def test_a_report_of_failed_cells_only_still_writes_its_page(tmp_path):
    from actsparse.report.build import build_report

    df = frame().iloc[:2].copy()
    df["status"], df["error"] = "FAILED", "dense evaluation failed: ActsparseError: text too short\nTraceback ..."
    df[["ppl", "effective", "acc_avg", "speedup"]] = float("nan")
    rep = build_report(df, tmp_path / "r", "Broken sweep")
    md = rep.markdown.read_text()
    assert "0 finished cell runs, 2 failed." in md and "dense evaluation failed: ActsparseError: text too short" in md
    assert "Traceback" not in md and rep.html.is_file() and rep.plot is None and rep.iso == ""
    assert "Failed cells" in rep.html.read_text()


def test_latex_tables_compile_with_pdflatex(tmp_path):
    import shutil
    import subprocess

    import pytest

    from actsparse.report.iso import iso_sparsity, ratios
    from actsparse.report.tables import iso_sparsity_table, ratio_table

    if not shutil.which("pdflatex"):
        pytest.skip("pdflatex is not installed (Debian: texlive-latex-base texlive-latex-recommended)")
    df = frame()
    df.loc[df["method"] == "B", "method"] = "ffn_thr&50% #1 {x} ~y ^z \\w <v>"
    q = parse_quality("ppl")
    iso = iso_quality(df, q, parse_budget("1.02x", q))
    tables = [sparsity_table(df, KEY, q), sparsity_table(df, KEY, parse_quality("acc_avg")),
              iso_quality_table(iso, KEY, q),
              ratio_table(ratios(iso), KEY, q, "effective sparsity", "ppl ≤ 1.02 × dense"),
              iso_sparsity_table(iso_sparsity(df, q, [0.3, 0.5]), KEY, q)]
    doc = tmp_path / "doc.tex"
    doc.write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
                   + "\n".join(t.latex() for t in tables) + "\n\\end{document}\n")
    proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000
