"""``normlab lab``'s runner, report and CLI on fake experiments (monkeypatched into
``normlab.lab.experiments``), so nothing here depends on the real experiments: the results.json
shape, resuming after an interrupt, crashes recorded while the others run, atomic writes,
``--only`` merging, determinism, the self-contained HTML, and the CLI end to end."""
import base64
import json
import re
import types
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from normlab.cli import main
from normlab.lab import api, experiments, runner


def _module(name, run):
    m = types.ModuleType(f"fake_{name}")
    m.NAME, m.TITLE, m.DESCRIPTION = name, f"Fake {name} <study>", f"<p>About <b>{name}</b>.</p>"
    m.run = run
    return m


@pytest.fixture
def fake(monkeypatch):
    """``fake(name=run, ...)`` installs those experiments (in that order) as the lab's."""
    modules = {}

    def install(**runs):
        modules.clear()
        modules.update({n: _module(n, r) for n, r in runs.items()})
        monkeypatch.setattr(experiments, "NAMES", tuple(runs))
        monkeypatch.setattr(experiments, "load", lambda name: modules[name])
        return modules
    return install


def training(ctx):
    """Three cached runs, a figure, two claims (one holds), numpy and torch numbers."""
    accs = [ctx.cached(f"run-{i}", lambda i=i: 0.5 + i / 10) for i in range(3)]
    fig, ax = api.figure()
    ax.plot(accs)
    path = ctx.save_figure(fig, "curve")
    return {"title": "Fake training <study>",
            "claims": [api.claim("accuracy rises", accs[-1] > accs[0], f"{accs[0]} -> {accs[-1]}"),
                       api.claim("x < y & <script>", False, "it does not")],
            "metrics": {"final": np.float64(accs[-1]), "runs": torch.tensor([1, 2, 3]),
                        "by_norm": {"bn": {"acc": 0.9, "loss": 0.1}, "gn": {"acc": 0.8}},
                        "draw": torch.randn(()).item(), "data": ctx.data},
            "figures": [path]}


def plain(ctx):
    return {"title": "Fake plain", "claims": [api.claim("one holds", True, "yes")],
            "metrics": {"draw": torch.randn(()).item(), "data": ctx.data}, "figures": []}


def _read(out):
    return json.loads((out / "results.json").read_text())


def test_results_json_schema(fake, tmp_path):
    fake(training=training, plain=plain)
    results = runner.run_lab(out=tmp_path, mode="tiny", seed=3, progress=False)
    assert results == _read(tmp_path)
    assert list(results["experiments"]) == ["training", "plain"]  # report order
    for name, r in results["experiments"].items():
        assert {"title", "claims", "metrics", "figures", "seconds"} <= set(r), name
        assert "error" not in r and r["seconds"] >= 0
        for c in r["claims"]:
            assert set(c) - {"why"} == {"claim", "holds", "evidence"}
            assert isinstance(c["holds"], bool) and ("why" not in c or not c["holds"])
        for f in r["figures"]:
            assert (tmp_path / f).is_file()
    t = results["experiments"]["training"]
    assert t["metrics"]["final"] == pytest.approx(0.7) and t["metrics"]["runs"] == [1, 2, 3]
    assert [c["holds"] for c in t["claims"]] == [True, False]
    assert results["settings"]["mode"] == "tiny" and results["settings"]["seed"] == 3
    assert results["pending"] == []
    assert results["torch_version"] == torch.__version__ and results["normlab_version"]
    assert results["machine"]["cpus"] >= 1
    assert (tmp_path / "figures" / "axes.png").is_file()


def test_resume_after_interrupt_computes_only_the_remaining_runs(fake, tmp_path):
    calls, contexts, state = [], [], {"interrupt": True}

    def long(ctx):
        contexts.append(ctx)

        def step(i):
            calls.append(i)
            if i == 2 and state["interrupt"]:
                raise KeyboardInterrupt  # Ctrl-C in the middle of run 2
            return i * i
        values = [ctx.cached(f"run-{i}", lambda i=i: step(i)) for i in range(4)]
        return {"title": "long", "claims": [api.claim("sum", sum(values) == 14, "")],
                "metrics": {"values": values}, "figures": []}

    first = []
    fake(plain=lambda ctx: first.append(1) or plain(ctx), long=long)
    with pytest.raises(KeyboardInterrupt):
        runner.run_lab(out=tmp_path, mode="tiny", progress=False)
    assert calls == [0, 1, 2] and contexts[0].computed == ["run-0", "run-1"]
    partial = _read(tmp_path)  # the report as of the last finished experiment
    assert list(partial["experiments"]) == ["plain"] and partial["pending"] == ["long"]
    assert "Not finished yet: long" in (tmp_path / "index.html").read_text()

    state["interrupt"] = False
    calls.clear()
    results = runner.run_lab(out=tmp_path, mode="tiny", progress=False)
    assert calls == [2, 3] and contexts[1].computed == ["run-2", "run-3"]
    assert first == [1]  # the finished experiment is not run again
    assert results["experiments"]["long"]["metrics"]["values"] == [0, 1, 4, 9]
    assert results["experiments"]["long"]["claims"][0]["holds"] and results["pending"] == []
    # --rerun runs it again, every run from the cache
    runner.run_lab(["long"], out=tmp_path, mode="tiny", progress=False, rerun=True)
    assert calls == [2, 3] and contexts[2].computed == []


def test_a_crash_is_recorded_and_the_others_still_run(fake, tmp_path):
    count = []

    def boom(ctx):
        count.append(1)
        ctx.cached("before", lambda: 1)
        raise ValueError("boom at step 7")

    fake(boom=boom, malformed=lambda ctx: {"claims": []}, plain=plain)
    results = runner.run_lab(out=tmp_path, mode="tiny", progress=False)
    r = results["experiments"]["boom"]
    assert r["error"] == "ValueError: boom at step 7"
    assert "raise ValueError" in r["traceback"] and r["title"] == "Fake boom <study>"
    assert r["claims"] == [] and r["seconds"] >= 0
    assert "lacks metrics, figures" in results["experiments"]["malformed"]["error"]
    assert "error" not in results["experiments"]["plain"]
    html = (tmp_path / "index.html").read_text()
    assert "ValueError: boom at step 7" in html and "badge err" in html and "traceback" in html
    # an errored experiment is run again next time (its finished runs load), the others not
    runner.run_lab(out=tmp_path, mode="tiny", progress=False)
    assert len(count) == 2


def test_writes_are_atomic(fake, tmp_path, monkeypatch):
    fake(training=training)
    runner.run_lab(out=tmp_path, mode="tiny", progress=False)
    assert not list(tmp_path.rglob("*.tmp"))
    before = (tmp_path / "results.json").read_bytes(), (tmp_path / "index.html").read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(runner.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        runner.rebuild(tmp_path, "tiny", 0)
    assert not list(tmp_path.rglob("*.tmp"))  # the temporary file is removed...
    after = (tmp_path / "results.json").read_bytes(), (tmp_path / "index.html").read_bytes()
    assert after == before  # ...and the old files are whole


def test_only_merges_finished_experiments_of_the_same_mode_and_seed(fake, tmp_path):
    version = {"v": 1}

    def changing(ctx):
        return {"title": "changing", "claims": [], "metrics": {"v": version["v"]}, "figures": []}

    fake(training=training, changing=changing, plain=plain)
    full = runner.run_lab(out=tmp_path, mode="tiny", progress=False)
    version["v"] = 2
    only = runner.run_lab(["changing"], out=tmp_path, mode="tiny", progress=False, rerun=True)
    assert list(only["experiments"]) == ["training", "changing", "plain"]
    assert only["experiments"]["training"] == full["experiments"]["training"]
    assert only["experiments"]["changing"]["metrics"] == {"v": 2}
    assert _read(tmp_path) == only
    # another seed (or mode) is another report: nothing of seed 0 is merged in
    other = runner.run_lab(["plain"], out=tmp_path, mode="tiny", seed=1, progress=False)
    assert list(other["experiments"]) == ["plain"]
    assert list(runner.rebuild(tmp_path, "tiny", 0)["experiments"]) == list(full["experiments"])


def test_deterministic_for_a_seed_whatever_ran_before(fake, tmp_path):
    fake(training=training, plain=plain)
    a = runner.run_lab(out=tmp_path / "a", mode="tiny", seed=5, progress=False)
    b = runner.run_lab(["plain"], out=tmp_path / "b", mode="tiny", seed=5, progress=False)
    c = runner.run_lab(["plain"], out=tmp_path / "c", mode="tiny", seed=6, progress=False)
    draw = lambda r: r["experiments"]["plain"]["metrics"]["draw"]
    assert draw(a) == draw(b) != draw(c)


def test_data_paths(fake, tmp_path):
    fake(groups=plain, speed=plain)  # groups is an image experiment, speed is not
    images = tmp_path / "imgs"
    images.mkdir()
    assert runner.resolve_data(str(images)) == {"groups": str(images.resolve())}
    assert runner.resolve_data({"speed": images}) == {"speed": str(images.resolve())}
    with pytest.raises(FileNotFoundError, match="nothere"):
        runner.resolve_data(tmp_path / "nothere")
    with pytest.raises(ValueError, match="unknown experiment"):
        runner.resolve_data({"nope": images})
    results = runner.run_lab(out=tmp_path / "out", mode="tiny", data=images, progress=False)
    assert results["experiments"]["groups"]["metrics"]["data"] == str(images.resolve())
    assert results["experiments"]["speed"]["metrics"]["data"] is None
    assert results["settings"]["data"] == {"groups": str(images.resolve())}
    with pytest.raises(ValueError, match="unknown lab experiment"):
        runner.run_lab(["groups", "nope"], out=tmp_path / "out", progress=False)


class _Balance(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.problems = [], []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.problems.append(tag)


def test_html_is_self_contained_with_every_experiment_claim_and_image(fake, tmp_path):
    fake(training=training, plain=plain)
    runner.run_lab(out=tmp_path, mode="tiny", progress=False)
    html = (tmp_path / "index.html").read_text()
    parser = _Balance()
    parser.feed(html)
    assert parser.problems == [] and parser.stack == []
    for name in ("training", "plain"):
        assert f"id='exp-{name}'" in html and f"href='#exp-{name}'" in html  # section and TOC
    assert "Fake training &lt;study&gt;" in html and "<b>training</b>" in html  # description raw
    assert "x &lt; y &amp; &lt;script&gt;" in html and "<script>" not in html  # escaped
    assert "accuracy rises" in html and "one holds" in html
    assert html.count("badge ok'>supported") == 2 * 2  # summary table and section
    assert html.count("badge no'>not supported") == 2
    assert "2 of 3</strong> claims supported" in html
    assert "by norm" in html and "<th>bn</th>" in html  # a dict of dicts is a table
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(images) == 2  # the axes figure and the experiment's
    files = [(tmp_path / "figures" / "axes.png").read_bytes(),
             (tmp_path / "figures" / "training-curve.png").read_bytes()]
    assert [base64.b64decode(i) for i in images] == files
    assert "src='figures/" not in html  # nothing links out


def test_cli_end_to_end(fake, tmp_path, capsys):
    fake(good=plain, bad=lambda ctx: 1 / 0)
    out = tmp_path / "lab"
    assert main(["lab", "--quick", "--only", "good", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "index.html") in printed and re.search(r"good\s+1/1 claims supported",
                                                            printed)
    results = _read(out)
    assert results["settings"]["mode"] == "quick" and list(results["experiments"]) == ["good"]
    assert (out / "index.html").is_file()

    assert main(["lab", "--quick", "--only", "good,bad", "--out", str(out), "--no-progress",
                 "--seed", "0"]) == 1  # an experiment failed: non-zero
    printed = capsys.readouterr().out
    assert "ZeroDivisionError" in printed and re.search(r"good\s+1/1", printed)
    with pytest.raises(SystemExit) as e:
        main(["lab", "--only", "nope", "--out", str(out)])
    assert e.value.code == 2
    assert "unknown lab experiment" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["lab", "--quick", "--data", str(tmp_path / "missing"), "--out", str(out)])


def test_claim_why_kept_only_when_the_claim_fails():
    from normlab.lab.api import claim
    assert "why" not in claim("x", True, "e", why="because")
    assert claim("x", False, "e", why="because")["why"] == "because"
    assert "why" not in claim("x", False, "e")


def test_report_shows_why_a_claim_fails(tmp_path):
    from normlab.lab.api import claim
    from normlab.lab.report import render
    result = {"title": "t", "claims": [claim("it holds", True, "ev1", why="unused"),
                                       claim("it fails", False, "ev2", why="tiny <data>")],
              "metrics": {}, "figures": [], "seconds": 1.0}
    html = render({"experiments": {"x": result}}, tmp_path)
    assert "tiny &lt;data&gt;" in html and "unused" not in html
