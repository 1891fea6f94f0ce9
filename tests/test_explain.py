"""``normlab explain`` and the axes figure: the spec each norm's text shows, which elements the
engine's reductions make share a statistic, the worked 3x3 example against torch and by hand."""
import pytest
import torch

from normlab.cli import main
from normlab.lab import axes
from normlab.lab.explain import explain, worked_example

# what each norm must say for the (N, C, H, W) = (4, 6, 2, 3) input: written out, not derived
SPEC = {
    "batchnorm": ("batch_reduction((4, 6, 2, 3))", "dims      (0, 2, 3)",
                  "reduced for one statistic: N, H, W", "one statistic per (C), over N, H, W"),
    "layernorm": ("row_reduction((4, 6, 2, 3), normalized_ndim=3, centered=True)",
                  "dims      (1, 2, 3)", "reduced for one statistic: C, H, W",
                  "one statistic per (N), over C, H, W"),
    "instancenorm": ("instance_reduction((4, 6, 2, 3))", "dims      (2, 3)",
                     "reduced for one statistic: H, W", "one statistic per (N, C), over H, W"),
    "groupnorm": ("group_reduction((4, 6, 2, 3), groups=2)", "dims      (2, 3, 4)",
                  "the input viewed as (N, G, C/G, H, W)",
                  "one statistic per (N), over C in groups of 3, H, W"),
    "rmsnorm": ("centered=False", "dims      (1, 2, 3)",
                "no mean: the statistic is the mean square", "one statistic per (N), over C, H, W"),
}

# the worked example's statistics by hand: (mean per set or None, variance / mean square per set)
BY_HAND = {
    "batchnorm": ([4, 5, 6], [6, 6, 6]),  # columns
    "layernorm": ([2, 5, 8], [2 / 3] * 3),  # rows
    "instancenorm": ([2, 5, 8], [2 / 3] * 3),  # rows (channels) of one sample
    "groupnorm": ([5], [20 / 3]),  # one group: the whole matrix
    "rmsnorm": (None, [14 / 3, 77 / 3, 194 / 3]),  # mean squares of the rows
}


@pytest.mark.parametrize("norm", list(SPEC))
def test_explain_text_and_figure(norm, tmp_path):
    text = explain(norm.upper() if norm == "groupnorm" else norm, tmp_path)
    for line in SPEC[norm]:
        assert line in text, (norm, line)
    figure = tmp_path / f"axes-{norm}.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(figure) in text
    assert "gives the same: max |engine - torch|" in text and "MISMATCH" not in text


@pytest.mark.parametrize("norm", list(BY_HAND))
def test_worked_example_matches_torch_and_the_hand_computation(norm):
    ex = worked_example(norm)
    assert ex.max_diff < 1e-6
    torch.testing.assert_close(ex.y, ex.torch_y, atol=1e-6, rtol=0)
    mean, var = BY_HAND[norm]
    assert (ex.mean is None) == (mean is None)
    if mean is not None:
        torch.testing.assert_close(ex.mean, torch.tensor(mean, dtype=torch.float32))
    torch.testing.assert_close(ex.var, torch.tensor(var, dtype=torch.float32))
    # the output from the hand statistics
    x = torch.tensor([[1.0, 2, 3], [4, 5, 6], [7, 8, 9]]).reshape(ex.x.shape)
    labels = ex.labels
    m = torch.tensor(mean)[labels] if mean is not None else 0.0
    want = (x - m) / (torch.tensor(var)[labels] + ex.eps).sqrt()
    torch.testing.assert_close(ex.y, want)


def test_stat_labels_follow_the_engine_reductions():
    n, c, h, w = axes.SHAPE
    idx = torch.meshgrid(*(torch.arange(s) for s in axes.SHAPE), indexing="ij")
    ni, ci = idx[0], idx[1]
    want = {"batchnorm": ci, "layernorm": ni, "rmsnorm": ni, "instancenorm": ni * c + ci,
            "groupnorm": ni * axes.GROUPS + ci // (c // axes.GROUPS)}
    for norm, labels in want.items():
        d = axes.describe(norm)
        assert torch.equal(d.labels, labels), norm
    roles = {k: axes.describe(k).roles for k in want}
    assert roles["batchnorm"] == [n, 1, h, w] and roles["instancenorm"] == [1, 1, h, w]
    assert roles["groupnorm"] == [1, c // axes.GROUPS, h, w] and roles["layernorm"] == [1, c, h, w]


def test_names_and_cli(tmp_path, capsys):
    assert axes.norm("Group_Norm").key == "groupnorm"
    with pytest.raises(ValueError, match="unknown norm 'batchnorm2d'"):
        explain("batchnorm2d", tmp_path)
    assert main(["explain", "LayerNorm", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("LayerNorm\n") and (tmp_path / "axes-layernorm.png").is_file()
    with pytest.raises(SystemExit):
        main(["explain", "weightnorm"])
