"""EarlyExit: exits found through graft.ir.layers, heads fitted on calibration data, the
control flow that skips the remaining layers, and the digits classifier with real weights."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

import graft
from graft import passes as P
from graft.codegen.rewrites.exit_branches import ExitBranches
from graft.runtime.errors import GraftError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import digits_cnn  # noqa: E402


def test_exit_branches_skip_what_no_exit_needs():
    @I.ir_module
    class Flat:
        @R.function
        def main(x: R.Tensor((1, 4), "float32"), w: R.Tensor((4, 4), "float32"),
                 wh: R.Tensor((4, 3), "float32"), wo: R.Tensor((4, 3), "float32")):
            R.func_attr({"graft.early_exit": 1})
            with R.dataflow():
                h = R.nn.relu(R.matmul(x, w))
                rest = R.nn.relu(R.matmul(h, w))   # only the full model needs it
                z = R.matmul(h, wh)
                ok = R.greater_equal(R.min(R.max(z, axis=-1)), R.const(0.5, "float32"))
                y = R.matmul(rest, wo)
                gv = (y, z, ok)
                R.output(gv)
            return gv

    @I.ir_module
    class Branched:
        @R.function
        def main(x: R.Tensor((1, 4), "float32"), w: R.Tensor((4, 4), "float32"),
                 wh: R.Tensor((4, 3), "float32"), wo: R.Tensor((4, 3), "float32")):
            lv = R.matmul(x, w)
            h = R.nn.relu(lv)
            z = R.matmul(h, wh)
            lv1 = R.max(z, axis=-1)
            lv2 = R.min(lv1)
            ok = R.greater_equal(lv2, R.const(0.5, "float32"))
            if ok:
                r = (z, R.const(0, "int32"))
            else:
                lv3 = R.matmul(h, w)
                rest = R.nn.relu(lv3)
                y = R.matmul(rest, wo)
                r = (y, R.const(1, "int32"))
            return r

    tvm.ir.assert_structural_equal(ExitBranches()(Flat), Branched)


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.convs = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.convs(x).mean(dim=(2, 3)))


def _tiny_calibration(n=64, seed=0):
    gen = np.random.default_rng(seed)
    return [(gen.standard_normal((1, 1, 8, 8)).astype(np.float32),) for _ in range(n)]


@pytest.mark.parametrize("threshold", [0.0, 2.0])
def test_exited_result_is_the_head_on_that_layers_hidden_state(tmp_path, threshold):
    """Threshold 0: every input leaves at the exit, and the output is the fitted head applied
    to the hidden state torch computes after that layer; 2 (above any confidence): the output
    is the full model's."""
    from graft.passes.early_exit import heads

    model = TinyNet().eval()
    calibration = _tiny_calibration()
    x = torch.from_numpy(calibration[0][0])
    compiled = graft.compile(model, (x,), calibration=calibration, passes=[
        P.EarlyExit("top1>=0.01", exits=[2], thresholds=[threshold])])
    compiled.save(tmp_path / "art")
    artifact = graft.load(tmp_path / "art")
    main = artifact.function("main")
    test = np.random.default_rng(9).standard_normal((1, 1, 8, 8)).astype(np.float32)
    got = main(test)
    with torch.no_grad():
        hidden = model.convs[:4](torch.from_numpy(test)).numpy()
        full = model(torch.from_numpy(test)).numpy()
    weight = artifact.params["early_exit.0.weight"].numpy()
    bias = artifact.params["early_exit.0.bias"].numpy()
    head = heads.features(hidden) @ weight + bias
    if threshold == 0.0:
        np.testing.assert_allclose(got, head, rtol=1e-4, atol=1e-4)
        assert main.exit_rates() == {"layer 2": 1.0, "full": 0.0}
    else:
        np.testing.assert_allclose(got, full, rtol=1e-4, atol=1e-4)
        assert main.exit_rates() == {"layer 2": 0.0, "full": 1.0}


@pytest.fixture(scope="module")
def digits():
    """The digits CNN trained here (about 30 s), its splits, and calibration samples: the
    training and calibration images, one per sample (labels are not used)."""
    model = digits_cnn.train()
    (train_x, _), (calib_x, _), test = digits_cnn.splits()
    images = np.concatenate([train_x, calib_x])
    return model, [(images[i:i + 1],) for i in range(len(images))], test


def test_digits_classifier_exits_early_within_one_point(tmp_path, digits):
    model, calibration, (test_x, test_y) = digits
    compiled = graft.compile(model, (torch.from_numpy(test_x[:1]),), calibration=calibration,
                             passes=[P.EarlyExit("top1>=0.99")])
    did = compiled.manifest["passes"][0]["did"]
    assert did["exits"] and did["agreement_held_out"] >= 0.99
    assert sum(e["rate"] for e in did["exits"]) > 0.5  # digits are easy: most exit early
    assert did["expected_flops"] < 0.67
    compiled.save(tmp_path / "art")
    main = graft.load(tmp_path / "art").function("main")
    got = np.concatenate([main(test_x[i:i + 1]) for i in range(len(test_x))])
    with torch.no_grad():
        full = model(torch.from_numpy(test_x)).numpy()
    assert digits_cnn.accuracy(got, test_y) >= digits_cnn.accuracy(full, test_y) - 0.01
    rates = main.exit_rates()
    assert list(rates) == [f"layer {e['layer']}" for e in did["exits"]] + ["full"]
    assert abs(sum(rates.values()) - 1.0) < 1e-9 and rates["full"] < 0.5


def test_early_exit_refusals(digits):
    model, calibration, (test_x, _) = digits
    example = (torch.from_numpy(test_x[:1]),)
    with pytest.raises(GraftError, match="top-1 agreement"):
        P.EarlyExit("cosine>=0.99")
    with pytest.raises(GraftError, match="confidence 'margin'"):
        P.EarlyExit(confidence="margin")
    with pytest.raises(GraftError, match="calibration inputs"):
        graft.compile(model, example, passes=[P.EarlyExit()])
    with pytest.raises(GraftError, match="no exit point after layer 40"):
        graft.compile(model, example, passes=[P.EarlyExit(exits=[40])],
                      calibration=calibration[:16])
    with pytest.raises(GraftError, match="EarlyExit must come after Quantize"):
        graft.compile(model, example, passes=[P.EarlyExit(), P.Quantize("int8")],
                      calibration=calibration[:16])


def test_cli_compiles_with_early_exit(tmp_path):
    from test_cli import assert_one_line_error, graft_cli

    model = TinyNet().eval()
    calibration = _tiny_calibration()
    program = torch.export.export(model, (torch.from_numpy(calibration[0][0]),))
    torch.export.save(program, tmp_path / "tiny.pt2")
    np.savez(tmp_path / "calibration.npz", x=np.stack([c[0] for c in calibration]))
    result = graft_cli("compile", tmp_path / "tiny.pt2", "-o", tmp_path / "art", "--quiet",
                       "--early-exit", "top1>=0.01", "--exit-layers", "1,2",
                       "--calibration", tmp_path / "calibration.npz")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["functions"]["main"]["early_exit"]["exits"]
    assert_one_line_error(graft_cli("compile", tmp_path / "tiny.pt2", "-o", tmp_path / "b",
                                    "--exit-layers", "1"), "--exit-layers goes with")


def test_exit_rates_are_reported_and_plotted(tmp_path):
    model = TinyNet().eval()
    calibration = _tiny_calibration()
    compiled = graft.compile(model, (torch.from_numpy(calibration[0][0]),),
                             calibration=calibration, dump_dir=tmp_path / "dump",
                             passes=[P.EarlyExit("top1>=0.01", exits=[1, 2],
                                                 thresholds=[0.0, 0.0])])
    did = compiled.manifest["passes"][0]["did"]
    assert did["layers"]["layer 1"]["exit_rate"] == 1.0  # threshold 0: every sample leaves
    assert did["layers"]["layer 2"]["exit_rate"] == 0.0
    assert did["layers"]["full model"]["exit_rate"] == 0.0
    report = (tmp_path / "dump" / "report.html").read_text()
    assert "exit rate by layer" in report and "exit agreement by layer" in report


def test_a_batch_exits_only_when_every_row_is_confident(tmp_path):
    """Threshold between two rows' confidences: the batch of both runs the full model for
    both rows; the confident row twice leaves at the exit."""
    from graft.passes.early_exit import heads

    model = TinyNet().eval()
    calibration = [(np.repeat(c[0], 2, axis=0),) for c in _tiny_calibration()]
    example = (torch.from_numpy(calibration[0][0]),)
    probe = graft.compile(model, example, calibration=calibration, passes=[
        P.EarlyExit("top1>=0.01", exits=[2], thresholds=[2.0])])
    weight, bias = probe.params["early_exit.0.weight"], probe.params["early_exit.0.bias"]
    gen = np.random.default_rng(4)
    pool = (gen.standard_normal((64, 1, 8, 8)) * gen.uniform(0.1, 3, (64, 1, 1, 1)))
    with torch.no_grad():
        pooled = model.convs[:4](torch.from_numpy(pool.astype(np.float32))).numpy()
    pool_confidence = heads.confidence(heads.features(pooled) @ weight + bias, "max_prob")
    rows = pool[[pool_confidence.argmin(), pool_confidence.argmax()]].astype(np.float32)
    with torch.no_grad():
        hidden = model.convs[:4](torch.from_numpy(rows)).numpy()
        full = model(torch.from_numpy(rows)).numpy()
    confidence = heads.confidence(heads.features(hidden) @ weight + bias, "max_prob")
    assert abs(confidence[0] - confidence[1]) > 1e-3
    sure = int(np.argmax(confidence))
    compiled = graft.compile(model, example, calibration=calibration, passes=[
        P.EarlyExit("top1>=0.01", exits=[2], thresholds=[float(confidence.mean())])])
    compiled.save(tmp_path / "art")
    main = graft.load(tmp_path / "art").function("main")
    np.testing.assert_allclose(main(rows), full, rtol=1e-4, atol=1e-4)
    both_sure = np.stack([rows[sure], rows[sure]])
    exited = main(both_sure)
    np.testing.assert_allclose(exited[0], (heads.features(hidden) @ weight + bias)[sure],
                               rtol=1e-4, atol=1e-4)
    assert main.exit_counts == [1, 1]


def test_depth_reduction_fits_a_map_and_compiles(tmp_path):
    """Two of six layers of a random Llama removed: the fitted map brings the final hidden
    state on the calibration text closer to the full model's than plain removal of the same
    layers (least squares on those tokens), and the reduced model compiles with a 4-layer
    cache and generates what transformers generates with it."""
    from graft.passes import reduce_depth
    from graft.runtime.generate import Generator
    from test_paged_kv import greedy, prompts, random_llama

    model = random_llama(6, seed=1)
    calibration = prompts([48] * 8, seed=3)
    mapped, did = reduce_depth(model, calibration, remove=2)
    plain, _ = reduce_depth(model, calibration, remove=2, fit_map=False,
                            start=did["removed"][0])
    assert did["layers"] == 4 and len(did["removed"]) == 2 and did["removed"][0] >= 1

    def last_hidden(m):
        with torch.no_grad():
            return torch.cat([m(torch.tensor([ids]), output_hidden_states=True)
                              .hidden_states[-1][0] for ids in calibration])

    target = last_hidden(model)
    assert (last_hidden(mapped) - target).pow(2).mean() < \
        (last_hidden(plain) - target).pow(2).mean()
    compiled = graft.compile(mapped, task="causal-lm", max_seq_len=128)
    assert compiled.manifest["model"]["causal_lm"]["num_layers"] == 4
    compiled.save(tmp_path / "art")
    generator = Generator(graft.load(tmp_path / "art"))
    for prompt in prompts([5, 17], seed=11):
        assert generator.generate(prompt, 12).token_ids == greedy(mapped, prompt, 12)
    with pytest.raises(GraftError, match="removing 5 of 6 layers"):
        reduce_depth(model, calibration, remove=5)
