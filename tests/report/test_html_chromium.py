"""The report's HTML page in a real headless Chromium: it renders, every image (inlined PNG and linked SVG) loads,
and a screenshot is taken. Skips, saying why, only when Chromium cannot be installed (scripts/ensure_chromium.sh).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars"]

# Runs in the page after load: marks every <img> with whether it decoded (naturalWidth > 0), loads every linked
# SVG as an image too, then marks <body data-checked> with the counts, for --dump-dom to report.
CHECK_JS = """
<script>
window.addEventListener("load", async () => {
  const imgs = Array.from(document.images);
  for (const im of imgs) im.setAttribute("data-ok", (im.complete && im.naturalWidth > 0) ? "1" : "0");
  const svgs = Array.from(document.querySelectorAll('a[href$=".svg"]')).map(a => a.getAttribute("href"));
  const loaded = await Promise.all(svgs.map(src => new Promise(res => {
    const im = new Image(); im.onload = () => res(im.naturalWidth > 0); im.onerror = () => res(false); im.src = src;
  })));
  const bad = svgs.filter((s, i) => !loaded[i]);
  document.body.setAttribute("data-svg-ok", String(loaded.filter(Boolean).length));
  document.body.setAttribute("data-svg-bad", bad.join(" "));
  document.body.setAttribute("data-checked", String(imgs.length));
});
</script>
"""


def _chromium(binary: str, *args: str, timeout: int = 90) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        return subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                              timeout=timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def test_report_page_renders_in_chromium_with_every_image_loaded(built_report, chromium, tmp_path):
    rc, _, err = built_report[3]
    assert rc == 0, err
    page = built_report[4] / "report.html"
    html = page.read_text()
    # a copy beside the original (same relative links) with the checking script added before </body>
    probe = page.with_name("report_check.html")
    probe.write_text(html.replace("</body>", CHECK_JS + "</body>"))
    try:
        proc = _chromium(chromium, "--virtual-time-budget=15000", "--dump-dom", probe.as_uri())
    finally:
        probe.unlink()
    dom = proc.stdout
    assert "<body" in dom, f"Chromium rendered nothing (exit {proc.returncode}): {proc.stderr[-2000:]}"
    assert re.search(r'<body[^>]*data-checked="(\d+)"', dom), "the page's load event never fired"
    n_imgs = int(re.search(r'data-checked="(\d+)"', dom)[1])
    oks = re.findall(r'<img [^>]*data-ok="([01])"', dom)
    # pareto (ppl), pareto (acc_avg), speedup vs sparsity, one heat map per model: 5 figures
    assert n_imgs == len(oks) == html.count("<img ") == 5
    assert oks == ["1"] * n_imgs, "an image did not load"
    assert re.search(r'data-svg-bad=""', dom), re.search(r'data-svg-bad="([^"]*)"', dom)[1]
    assert int(re.search(r'data-svg-ok="(\d+)"', dom)[1]) == 5
    # the page rendered its content: title, the tables of both models, links to the MLflow runs
    assert "<h1>Sweep synthetic-0001 (iso-0.3+0.5)</h1>" in dom
    assert dom.count('<table class="paper"') >= 20 and "model big/model-x" in dom
    assert dom.count("#/experiments/") >= 20

    shot = tmp_path / "report.png"
    proc = _chromium(chromium, "--window-size=1280,2400", f"--screenshot={shot}", page.as_uri())
    assert shot.is_file(), f"no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    from PIL import Image

    im = Image.open(shot).convert("RGB")
    assert im.size == (1280, 2400)
    colors = im.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50        # not a blank page: text, rules and plots were painted
