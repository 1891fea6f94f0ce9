"""``normlab bench --models``: the CLI end to end on the tiny models (--quick, no
torch.compile), the patched models' outputs against eager, the models' torchvision layout, the
norm-share accounting, fold only for CNN inference, the transformers models skipped without
transformers, and clear errors. Speeds are never asserted, only that every case and peer is
there with a positive finite time. NORMLAB_SLOW=1 adds one case with the real torch.compile."""
import copy
import csv
import math
import os
import sys

import pytest
import torch
from torch import nn

import normlab
from normlab.bench import models as zoo
from normlab.bench import models_harness as H
from normlab.bench import models_report
from normlab.cli import main

HF = ("bert", "gpt2", "llama")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _table_rows(md):
    return [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| model ")]


def _key(c):
    return (c.model, c.layout, c.mode, str(c.batch))


def test_cli_quick_end_to_end(tmp_path, capsys):
    assert main(["bench", "--models", "--quick", "--no-compile", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    md = (tmp_path / "models.md").read_text()
    assert md.strip() in printed
    config = H.ModelConfig(quick=True, compile=False)
    cases = config.cases()
    # resnet18, resnet50, unet: 2 layouts x 3 cases; bert, gpt2, llama: 3 cases
    assert len(cases) == 27
    rows = _rows(tmp_path / "models.csv")
    want = {(*_key(c), p) for c in cases for p in config.peers(c)}
    assert {(r["model"], r["layout"], r["mode"], r["batch"], r["peer"]) for r in rows} == want
    assert len(rows) == len(want)
    hf = zoo.transformers_status()[0] is not None
    for r in rows:
        if r["model"] in HF and not hf:
            assert r["error"].startswith("skipped: transformers is not importable"), r
            continue
        assert not r["error"], r
        ms, speedup = float(r["ms"]), float(r["speedup"])
        assert math.isfinite(ms) and ms > 0 and float(r["ms_min"]) <= ms, r
        assert math.isfinite(speedup) and speedup > 0, r
        assert 0 < float(r["norm_pct"]) < 100, r
        assert r["rounds"] == "2" and r["quick"] == "1"
        if r["peer"] != "torch":
            assert r["check"] == ("output" if r["mode"] == "infer" else "first-step loss")
            assert float(r["max_abs_diff"]) < 1e-4, r
        if r["peer"] == "normlab" and r["model"] != "llama":
            on, total = map(int, r["norms"].split("/"))
            assert on == total > 0, r
    if hf:  # LlamaRMSNorm computes by hand: patch leaves it, and the report says so
        llama = [r for r in rows if r["model"] == "llama" and r["peer"] == "normlab"]
        assert {r["norms"] for r in llama} == {"0/5"}
        assert {r["unpatched"] for r in llama} == {"LlamaRMSNorm"}
        assert "- llama: LlamaRMSNorm (0/5 norm modules on normlab)" in md

    assert md.startswith("# normlab bench --models")
    for part in ("- machine: ", "torch threads: ", "torch 2.", "normlab backend: ",
                 "time.perf_counter", "1-minute load average", "norm % = ", "aten::layer_norm"):
        assert part in md, part
    assert ("| model | layout | mode | batch | input | torch ms | normlab ms | normlab+fold ms |"
            " normlab | normlab+fold | norm % | norms on normlab | max diff normlab |") in md
    assert "compile" not in md.split("| model ")[1].split("\n")[0]
    assert len(_table_rows(md)) == len(cases)
    assert "**Summary:** geometric-mean speedup over torch eager" in md
    assert "normlab+fold" in md and "torch.compile not run" in md


def _outputs(model, inputs, spec):
    """Eval and train-mode outputs (the state restored after each: BatchNorm's running stats;
    the same dropout masks: seeded)."""
    outs = []
    for train in (False, True):
        model.train(train)
        state = copy.deepcopy(model.state_dict())
        torch.manual_seed(1)
        with torch.no_grad():
            outs.append(spec.forward(model, inputs, False))
        model.load_state_dict(state)
    return outs


@pytest.mark.parametrize("name", zoo.MODEL_NAMES)
def test_patched_model_matches_eager(name):
    spec = zoo.MODELS[name]
    if spec.requires:
        pytest.importorskip(spec.requires)
    torch.manual_seed(0)
    eager = spec.build(True, False)
    inputs = spec.inputs(True, 2, False, torch.Generator().manual_seed(0))
    ours = normlab.patch(copy.deepcopy(eager))
    on, total, left = H.norm_count(ours)
    assert total > 0 and (on, left) == ((0, ["LlamaRMSNorm"]) if name == "llama" else (total, []))
    for got, want in zip(_outputs(ours, inputs, spec), _outputs(eager, inputs, spec)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_resnets_have_torchvision_names_and_shapes():
    r18, r50 = zoo.resnet18(), zoo.resnet50()
    assert sum(p.numel() for p in r18.parameters()) == 11_689_512  # torchvision's counts
    assert sum(p.numel() for p in r50.parameters()) == 25_557_032
    assert (len(r18.state_dict()), len(r50.state_dict())) == (122, 320)
    for key in ("conv1.weight", "bn1.running_var", "layer1.1.bn2.num_batches_tracked",
                "layer2.0.downsample.1.weight", "layer4.1.conv2.weight", "fc.bias"):
        assert key in r18.state_dict()
    assert r50.state_dict()["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert r50.state_dict()["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in r50.modules()) == 53
    unet = zoo.UNetBlocks()
    gns = [m for m in unet.modules() if isinstance(m, nn.GroupNorm)]
    assert len(gns) == 11 and {m.num_groups for m in gns} == {32}
    assert {m.num_channels for m in gns} == {128, 256, 384}


class _MyRMSNorm(nn.Module):
    """A hand-written norm, as transformers' LlamaRMSNorm."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def test_norm_share_counts_forward_and_backward_of_every_norm():
    model = nn.Sequential(nn.Linear(32, 32), nn.LayerNorm(32), nn.Linear(32, 32),
                          _MyRMSNorm(32), nn.Linear(32, 32))
    x = torch.randn(64, 32)

    def step():
        model.zero_grad()
        model(x).sum().backward()
    step()
    share = H.norm_share(step, model, steps=2)
    assert 0 < share.share < 1 and share.norm_s < share.total_s
    names = [n.removeprefix(H._EVALUATE) for n in share.counted]
    # per step: aten::layer_norm and its node; the hand-written norm's range and its six nodes
    assert names.count("aten::layer_norm") == names.count("NativeLayerNormBackward0") == 2
    assert names.count(H.NORM_RANGE + "_MyRMSNorm") == 2
    for node, n in (("PowBackward0", 2), ("MeanBackward1", 2), ("AddBackward0", 2),
                    ("RsqrtBackward0", 2), ("MulBackward0", 4)):
        assert names.count(node) == n, (node, names)
    assert len(names) == 2 * 9  # not the Linears' nodes, the loss's sum, or AccumulateGrad
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_fold_only_for_cnn_inference():
    config = H.ModelConfig(quick=True)
    for case in config.cases():
        fold = case.mode == "infer" and case.model in ("resnet18", "resnet50")
        assert ("normlab+fold" in config.peers(case)) == fold, case
        assert "compile" in config.peers(case)
    assert "compile" not in H.ModelConfig(compile=False).peers(config.cases()[0])
    case = H.ModelConfig(quick=True, models=["resnet50"]).cases()[0]
    results = H.time_case(case, H.ModelConfig(quick=True, compile=False, rounds=1))
    fold = next(r for r in results if r.peer == "normlab+fold")
    assert fold.impl == "17/17 BatchNorms folded" and fold.norms == "0/0"
    assert fold.max_abs_diff < 1e-4 and not fold.error


def test_transformers_missing_skips_cleanly(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    assert zoo.transformers_status()[0] is None
    out = tmp_path / "run.csv"
    assert main(["bench", "--models", "--quick", "--no-compile", "--no-progress", "--modes",
                 "infer", "--model-set", "unet,gpt2", "--out", str(out)]) == 0
    rows = _rows(out)
    assert {r["model"] for r in rows} == {"unet", "gpt2"}
    for r in rows:
        if r["model"] == "gpt2":
            assert r["error"].startswith("skipped: transformers is not importable"), r
            assert r["ms"] == "nan"
        else:
            assert not r["error"] and float(r["ms"]) > 0
    md = (tmp_path / "run.md").read_text()
    assert "Not available (n/a):" in md and "pip install transformers" in md
    assert "| gpt2 | tokens | infer | 1 | 1x16 | n/a | n/a |" in md
    assert "transformers" not in md.splitlines()[3]  # the versions line
    with pytest.raises(zoo.ModelUnavailable, match="transformers is not importable"):
        zoo.MODELS["llama"].build(True, False)


def test_compile_peer_with_a_stand_in(monkeypatch, tmp_path):
    """The compile peer's rows and columns, with torch.compile replaced by the identity (the
    real one takes about 30 s per case here: NORMLAB_SLOW)."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: calls.append(m) or m)
    results = H.run(H.ModelConfig(models=["unet"], modes=["infer"], quick=True, rounds=1,
                                  progress=False))
    assert len(calls) == 4
    comp = [r for r in results if r.peer == "compile"]
    assert len(comp) == 4 and all(r.compile_s > 0 and r.max_abs_diff < 1e-4 for r in comp)
    md = models_report.to_markdown(results)
    assert "| compile ms |" in md and "| compile s |" in md and "torch.compile:" in md
    assert "torch.compile 1." in md or "torch.compile 0." in md


def test_time_budget_reports_the_rest_as_not_run(tmp_path):
    config = H.ModelConfig(models=["resnet18"], quick=True, compile=False, progress=False,
                           time_budget_s=1e-6)
    results = H.run(config)
    assert len(results) == sum(len(config.peers(c)) for c in config.cases())
    assert all(r.error.startswith("not run: time budget of 0 s") for r in results)
    text = models_report.to_csv(results, tmp_path / "b.csv")
    assert text == (tmp_path / "b.csv").read_text() and "not run" in text


@pytest.mark.parametrize("argv, message", [
    (["--models", "--model-set", "resnet99"], "unknown model 'resnet99'; known models: resnet18"),
    (["--models", "--modes", "eval"], "unknown mode 'eval'; known modes: infer, train"),
    (["--models", "--norms", "layer_norm", "--device", "cuda"],
     "--norms, --device belong to the kernel bench, not to --models"),
    (["--models", "--shapes", "8x8"], "--shapes belongs to the kernel bench"),
    (["--model-set", "resnet18"], "--model-set needs --models"),
    (["--models", "--backend", "nope"], "nope"),
    (["--models", "--rounds", "0"], "expected a positive integer"),
    (["--models", "--time-budget", "-1"], "expected a positive number of seconds"),
])
def test_bad_options_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_config_errors():
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        H.ModelConfig(rounds=0)
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        H.ModelConfig(models="resnet18,vgg")
    assert H.ModelConfig(models="ResNet-18,gpt-2", modes="training").models == (
        "resnet18", "gpt2")


@pytest.mark.skipif(not os.environ.get("NORMLAB_SLOW"), reason="NORMLAB_SLOW=1: torch.compile")
def test_real_compile_one_case():
    config = H.ModelConfig(models=["resnet18"], quick=True, rounds=1, progress=False)
    results = H.time_case(config.cases()[0], config)
    comp = next(r for r in results if r.peer == "compile")
    assert not comp.error and comp.impl == "inductor" and comp.compile_s > 0
    assert comp.max_abs_diff < 1e-4
