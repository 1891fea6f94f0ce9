"""``normlab.data``: streaming per-channel statistics against numpy on the concatenated data,
accuracy at large offsets, the transforms, and the errors."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from normlab.data import ChannelStats, MinMaxScale, Standardize, channel_stats


def _numpy_stats(x, axis, ddof=0):
    other = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    return (x.mean(other), x.std(other, ddof=ddof), x.min(other), x.max(other),
            x.size // x.shape[axis])


def _check(stats, x, axis=1, ddof=0, rtol=1e-12):
    mean, std, lo, hi, count = _numpy_stats(x, axis, ddof)
    assert isinstance(stats, ChannelStats) and stats.count == count
    for got, want in ((stats.mean, mean), (stats.std, std), (stats.min, lo), (stats.max, hi)):
        assert got.dtype == torch.float64 and got.shape == want.shape
        np.testing.assert_allclose(got.numpy(), want, rtol=rtol, atol=1e-12)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_uneven_batches_including_a_batch_of_one(rng):
    sizes = [1, 7, 3, 64, 1, 2]
    batches = [rng.normal(rng.uniform(-5, 5), 3, size=(n, 3, 5, 4)) for n in sizes]
    whole = np.concatenate(batches)
    _check(channel_stats(batches), whole)
    _check(channel_stats(torch.tensor(b) for b in batches), whole)  # a generator: one pass
    _check(channel_stats(batches, unbiased=True), whole, ddof=1)


def test_one_tensor_or_array_is_read_in_chunks(rng):
    x = rng.normal(2.0, 1.5, size=(103, 4, 6))
    for batch_size in (1, 10, 256):
        _check(channel_stats(x, batch_size=batch_size), x)
        _check(channel_stats(torch.tensor(x), batch_size=batch_size), x)


def test_dataloader_of_pairs_and_other_channel_axes(rng):
    x = rng.normal(size=(47, 3, 8)).astype(np.float32)
    loader = DataLoader(TensorDataset(torch.tensor(x), torch.arange(47)), batch_size=10)
    _check(channel_stats(loader), x.astype(np.float64))
    # a Dataset's (C, H, W) samples: the channel axis is 0
    images = rng.normal(size=(5, 3, 4, 4))
    _check(channel_stats(list(images), dim=0), images)
    # channels last
    _check(channel_stats(images.transpose(0, 2, 3, 1), dim=-1), images)


def test_large_offsets_stay_accurate(rng):
    x = 1e6 + rng.normal(size=(5000, 2, 3))
    stats = channel_stats(x, batch_size=97)
    want = x.std((0, 2))
    np.testing.assert_allclose(stats.std.numpy(), want, rtol=1e-9)
    np.testing.assert_allclose(stats.mean.numpy(), x.mean((0, 2)), rtol=1e-14)
    # what the test guards against: E[x^2] - E[x]^2, even in float64 with numpy's pairwise
    # sums, is already off in the 4th digit here
    naive = np.sqrt(np.abs((x ** 2).mean((0, 2)) - x.mean((0, 2)) ** 2))
    assert np.abs(naive - want).max() > 1e-5
    # float32 data at the same offset: converted exactly, then the same accuracy
    x32 = x.astype(np.float32)
    np.testing.assert_allclose(channel_stats(torch.tensor(x32), batch_size=64).std.numpy(),
                               x32.astype(np.float64).std((0, 2)), rtol=1e-9)


def test_integers_are_converted(rng):
    x = rng.integers(0, 256, size=(20, 3, 4, 4), dtype=np.uint8)
    _check(channel_stats(torch.from_numpy(x), batch_size=6), x.astype(np.float64))


def test_errors():
    with pytest.raises(ValueError, match="no data"):
        channel_stats([])
    with pytest.raises(ValueError, match="no data"):
        channel_stats([np.zeros((0, 3))])
    with pytest.raises(ValueError, match="batch 1 has 4 channels.*before it had 3"):
        channel_stats([np.zeros((2, 3)), np.zeros((2, 4))])
    with pytest.raises(ValueError, match="no channel axis dim=1"):
        channel_stats([np.zeros(3)])
    with pytest.raises(TypeError, match="complex"):
        channel_stats([torch.zeros(2, 3, dtype=torch.complex64)])
    with pytest.raises(TypeError, match="batch 0 is not a tensor"):
        channel_stats([{"image": 1}])
    with pytest.raises(TypeError, match="iterable"):
        channel_stats(3.0)


def test_standardize(rng):
    x = torch.tensor(rng.normal([[1.0], [-20.0], [300.0]], [[2.0], [0.5], [40.0]],
                                size=(64, 3, 10)))
    stats = channel_stats(x)
    y = Standardize(stats, dim=1)(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y.mean((0, 2)), torch.zeros(3, dtype=torch.float64),
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(y.std((0, 2), correction=0), torch.ones(3, dtype=torch.float64))
    # torchvision style: one (C, H, W) image, default dim -3; float32 stays float32
    image = torch.full((3, 2, 2), 300.0)
    out = Standardize(stats)(image)
    assert out.dtype == torch.float32 and out.shape == (3, 2, 2)
    want = (300.0 - stats.mean) / stats.std
    torch.testing.assert_close(out[:, 0, 0], want.float())
    # uint8 becomes float32; a constant channel is only centered (no nan)
    const = channel_stats([np.stack([np.full((4, 4), 7.0), np.arange(16.0).reshape(4, 4)])],
                          dim=0)
    out = Standardize(const)(torch.full((2, 4, 4), 7, dtype=torch.uint8))
    assert out.dtype == torch.float32 and out[0].eq(0).all() and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="built for 3 channels.*has 4"):
        Standardize(stats)(torch.zeros(4, 2, 2))


def test_min_max_scale(rng):
    x = torch.tensor(rng.normal(size=(50, 2, 6)) * [[[3.0], [0.1]]] + [[[5.0], [-1.0]]])
    stats = channel_stats(x)
    y = MinMaxScale(stats, dim=1)(x)
    assert torch.equal(y.amin((0, 2)), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(y.amax((0, 2)), torch.ones(2, dtype=torch.float64))
    y = MinMaxScale(stats, low=-1, high=1, dim=1)(x)
    torch.testing.assert_close(y.amin((0, 2)), -torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(y.amax((0, 2)), torch.ones(2, dtype=torch.float64))
    const = channel_stats(torch.full((4, 1, 3), 2.0))
    assert MinMaxScale(const, low=0.5, dim=1)(torch.full((1, 1, 3), 2.0)).eq(0.5).all()
