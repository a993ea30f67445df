"""Offline data: seeded batches from the bundled digits and text, synthetic data, and data files."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydoc_data.topics import topics
from sklearn.datasets import load_digits

from hessian_blocks.data import DATA_SOURCES, make_batches, samples_available
from hessian_blocks.models import MODEL_NAMES, build_model

BUNDLED_TEXT = "".join(topics[k] for k in sorted(topics)).encode("utf-8")


def same_batches(a, b):
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def mini_mlp():
    return build_model("mlp")


@pytest.mark.parametrize(
    "name, source", [("vit-tiny", "digits"), ("mlp", "digits"), ("gpt2-nano", "text"), ("bert-mini", "text")]
    + [(name, "synthetic") for name in MODEL_NAMES],
)
def test_same_seed_same_batches(name, source):
    spec = build_model(name)
    first = make_batches(spec, source, batch_size=4, n_batches=3, seed=5)
    assert same_batches(first, make_batches(spec, source, batch_size=4, n_batches=3, seed=5))
    assert not same_batches(first, make_batches(spec, source, batch_size=4, n_batches=3, seed=6))
    assert len(first) == 3 and all(len(x) == len(y) == 4 for x, y in first)


def test_data_sources():
    assert DATA_SOURCES == ("digits", "text", "synthetic")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_digits_images(dtype):
    spec = build_model("resnet18", channels=2, image_size=8)
    batches = make_batches(spec, batch_size=5, n_batches=2, dtype=dtype)
    digits = load_digits()
    raw = torch.tensor(digits.images, dtype=torch.float64) / 16
    normalised = (raw - raw.mean()) / raw.std()
    for x, y in batches:
        assert x.shape == (5, 2, 8, 8) and x.dtype == dtype and y.dtype == torch.long
        assert torch.equal(x[:, 0], x[:, 1])  # the grey image repeated over channels
        for image, label in zip(x[:, 0].double(), y):  # each sample is a digit of the data set, label included
            match = (normalised - image).flatten(1).abs().amax(dim=1) < 1e-6
            assert match.any() and (torch.tensor(digits.target)[match] == label).all()
    all_x = torch.cat([x for x, _ in batches])
    assert all_x.mean().abs() < 0.5 and 0.5 < all_x.std() < 2  # normalised


def test_digits_resized_bilinearly():
    spec32, spec8 = build_model("vgg16", channels=1, image_size=32), build_model("resnet18", channels=1, image_size=8)
    (big, y32), = make_batches(spec32, batch_size=3, n_batches=1, dtype=torch.float64)
    (small, y8), = make_batches(spec8, batch_size=3, n_batches=1, dtype=torch.float64)
    assert torch.equal(y32, y8) and big.shape == (3, 1, 32, 32)
    expected = F.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(big, expected, rtol=0, atol=1e-12)
    assert make_batches(build_model("vit-tiny"))[0][0].shape == (8, 3, 32, 32)


def test_digits_as_vectors():
    (x, y), = make_batches(mini_mlp(), "digits", batch_size=6, n_batches=1)
    assert x.shape == (6, 64) and x.dtype == torch.float32 and y.shape == (6,) and int(y.max()) < 10


def test_text_next_tokens():
    spec = build_model("gpt2-nano")
    batches = make_batches(spec, batch_size=4, n_batches=2, seed=1)
    for x, y in batches:
        assert x.shape == y.shape == (4, 64) and x.dtype == y.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y):  # a window of the bundled text, and its next byte
            window = bytes(row_x.tolist()) + bytes(row_y[-1:].tolist())
            assert window in BUNDLED_TEXT


def test_masked_text():
    spec = build_model("bert-mini")
    mask_id = spec.data_shape["vocab_size"] - 1
    for x, y in make_batches(spec, batch_size=4, n_batches=2, seed=2):
        assert x.shape == y.shape == (4, 64) and x.dtype == y.dtype == torch.long
        masked = y != -100
        assert (masked.sum(dim=1) == round(0.15 * 64)).all()
        assert (x[masked] == mask_id).all() and (x[~masked] < 256).all() and (y[masked] < 256).all()
        for row_x, row_y in zip(x, y):  # unmasking gives back a window of the bundled text
            assert bytes(torch.where(row_y == -100, row_x, row_y).tolist()) in BUNDLED_TEXT
    # short windows still mask at least one token per row
    (x, y), = make_batches(build_model("bert-mini", context=3), batch_size=16, n_batches=1)
    assert ((y != -100).sum(dim=1) == 1).all()


def test_synthetic_shapes_for_every_task():
    cases = {
        "gpt2-nano": ((2, 64), torch.long, (2, 64)),
        "bert-mini": ((2, 64), torch.long, (2, 64)),
        "vit-tiny": ((2, 3, 32, 32), torch.float64, (2,)),
        "mlp": ((2, 64), torch.float64, (2,)),
    }
    for name, (x_shape, x_dtype, y_shape) in cases.items():
        spec = build_model(name)
        (x, y), = make_batches(spec, "synthetic", batch_size=2, n_batches=1, dtype=torch.float64)
        assert x.shape == x_shape and x.dtype == x_dtype and y.shape == y_shape and y.dtype == torch.long
    (x, y), = make_batches(build_model("bert-mini", vocab_size=20, context=10), "synthetic", batch_size=3, n_batches=1)
    assert ((y != -100).sum(dim=1) == 2).all() and (x[y != -100] == 19).all() and (x[y == -100] < 19).all()
    assert make_batches(mini_mlp())[0][0].shape == (8, 64)  # auto = synthetic for vectors


def test_last_batch_size():
    batches = make_batches(build_model("vit-tiny"), batch_size=5, n_batches=3, last_batch_size=2)
    assert [len(x) for x, _ in batches] == [5, 5, 2] and [len(y) for _, y in batches] == [5, 5, 2]
    assert [len(x) for x, _ in make_batches(mini_mlp(), n_batches=1, last_batch_size=3)] == [3]
    with pytest.raises(ValueError, match="last_batch_size"):
        make_batches(mini_mlp(), last_batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        make_batches(mini_mlp(), batch_size=0)


def test_small_vocabularies_fold_the_bytes_with_one_warning():
    reference = make_batches(build_model("gpt2-nano", context=16), "text", batch_size=2, n_batches=1, seed=3)
    with pytest.warns(UserWarning, match="byte b is token b mod 200. Set vocab_size >= 256") as caught:
        (x, y), = make_batches(build_model("gpt2-nano", vocab_size=200, context=16), "text", batch_size=2,
                               n_batches=1, seed=3)
        make_batches(build_model("gpt2-nano", vocab_size=200, context=16), "text", batch_size=2, n_batches=1)
    assert len(caught) == 1  # once per model and vocabulary
    assert torch.equal(x, reference[0][0] % 200) and torch.equal(y, reference[0][1] % 200)
    with pytest.warns(UserWarning, match=r"vocab_size 256 \(one id is \[MASK\]\).*mod 255"):
        (x, y), = make_batches(build_model("bert-mini", vocab_size=256), "text", batch_size=2, n_batches=1)
    assert x.max() <= 255 and y.max() < 255  # 255 is [MASK], never a target
    with pytest.raises(ValueError, match="vocab_size >= 3"):
        make_batches(build_model("bert-mini", vocab_size=2))


def test_errors():
    with pytest.raises(ValueError, match="num_classes=5"):
        make_batches(build_model("vit-tiny", num_classes=5))
    with pytest.raises(ValueError, match="1797 images; 2000 are needed"):
        make_batches(build_model("vit-tiny"), batch_size=1000, n_batches=2)
    with pytest.raises(ValueError, match="in_features=10"):
        make_batches(build_model("mlp", in_features=10), "digits")
    with pytest.raises(ValueError, match="image data"):
        make_batches(build_model("gpt2-nano"), "digits")
    with pytest.raises(ValueError, match="text data"):
        make_batches(build_model("vit-tiny"), "text")
    with pytest.raises(FileNotFoundError, match="neither one of auto, digits, text, synthetic"):
        make_batches(mini_mlp(), "no/such/file.pt")


def test_custom_models_need_a_file():
    spec = build_model("tests.test_models:tiny_factory")
    with pytest.raises(ValueError, match="no default data"):
        make_batches(spec)
    with pytest.raises(ValueError, match="synthetic data does not know"):
        make_batches(spec, "synthetic")


# ---- data files


def test_pt_dict_file(tmp_path):
    x, y = torch.randn(10, 64, dtype=torch.float64), torch.arange(10) % 10
    torch.save({"x": x, "y": y}, tmp_path / "data.pt")
    batches = make_batches(mini_mlp(), str(tmp_path / "data.pt"), batch_size=4, n_batches=2, last_batch_size=1)
    assert [len(b[0]) for b in batches] == [4, 1]
    assert torch.equal(torch.cat([b[0] for b in batches]), x[:5].float())  # in file order, cast to float32
    assert torch.equal(torch.cat([b[1] for b in batches]), y[:5])
    with pytest.raises(ValueError, match="holds 10 samples; 12 are needed"):
        make_batches(mini_mlp(), str(tmp_path / "data.pt"), batch_size=4, n_batches=3)


def test_pt_list_of_batches_round_trips(tmp_path):
    spec = build_model("gpt2-nano", context=16)
    batches = make_batches(spec, batch_size=3, n_batches=2)
    torch.save(batches, tmp_path / "batches.pt")
    assert same_batches(make_batches(spec, str(tmp_path / "batches.pt"), batch_size=3, n_batches=2), batches)
    regrouped = make_batches(spec, str(tmp_path / "batches.pt"), batch_size=2, n_batches=3)
    assert torch.equal(torch.cat([x for x, _ in regrouped]), torch.cat([x for x, _ in batches]))


def test_npz_file(tmp_path):
    x = np.random.default_rng(0).normal(size=(6, 3, 32, 32)).astype(np.float32)
    y = np.arange(6, dtype=np.int32)
    np.savez(tmp_path / "images.npz", x=x, y=y)
    spec = build_model("vgg16")
    batches = make_batches(spec, str(tmp_path / "images.npz"), batch_size=3, n_batches=2, dtype=torch.float64)
    assert batches[0][0].dtype == torch.float64 and batches[0][1].dtype == torch.long
    assert torch.equal(batches[1][0], torch.from_numpy(x[3:6]).double())
    assert batches[1][1].tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match=r"images of shape \(3, 32, 32\); model 'vit-tiny' takes \(1, 32, 32\)"):
        make_batches(build_model("vit-tiny", channels=1), str(tmp_path / "images.npz"), batch_size=2, n_batches=1)
    np.savez(tmp_path / "bad.npz", inputs=x, y=y)
    with pytest.raises(ValueError, match="no array x"):
        make_batches(spec, str(tmp_path / "bad.npz"), batch_size=2, n_batches=1)


def test_txt_file(tmp_path):
    text = "The quick brown fox jumps over the lazy dog. Ünïcödé too. " * 3
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    data = text.encode("utf-8")
    spec = build_model("gpt2-nano", context=8)
    batches = make_batches(spec, str(path), batch_size=2, n_batches=2)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    for i in range(4):  # consecutive windows, in file order
        assert bytes(x[i].tolist()) == data[8 * i : 8 * i + 8] and bytes(y[i].tolist()) == data[8 * i + 1 : 8 * i + 9]
    masked = make_batches(build_model("bert-mini", context=8), str(path), batch_size=2, n_batches=1)[0]
    assert bytes(torch.where(masked[1] == -100, masked[0], masked[1]).flatten().tolist()) == data[:16]
    with pytest.raises(ValueError, match=f"has {len(data)} bytes; {100 * 8 + 1} are needed"):
        make_batches(spec, str(path), batch_size=50, n_batches=2)
    with pytest.raises(ValueError, match="text data"):
        make_batches(mini_mlp(), str(path))


def test_bad_files(tmp_path):
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match="expected .pt, .npz or .txt"):
        make_batches(mini_mlp(), str(tmp_path / "data.csv"))
    torch.save({"inputs": torch.zeros(3)}, tmp_path / "keys.pt")
    with pytest.raises(ValueError, match="no x, y"):
        make_batches(mini_mlp(), str(tmp_path / "keys.pt"))
    torch.save({"x": torch.zeros(8, 64), "y": torch.zeros(7, dtype=torch.long)}, tmp_path / "lengths.pt")
    with pytest.raises(ValueError, match="x has 8 samples but y has 7"):
        make_batches(mini_mlp(), str(tmp_path / "lengths.pt"))
    torch.save({"x": torch.full((8, 64), 600), "y": torch.zeros(8, 64, dtype=torch.long)}, tmp_path / "ids.pt")
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 512\)"):
        make_batches(build_model("gpt2-nano"), str(tmp_path / "ids.pt"), batch_size=4, n_batches=2)


# ---- train / validation parts


def test_text_parts_are_the_two_ends_of_the_bundled_text():
    spec = build_model("gpt2-nano", context=32)
    cut = len(BUNDLED_TEXT) - round(0.1 * len(BUNDLED_TEXT))
    for split, part in (("train", BUNDLED_TEXT[:cut]), ("validation", BUNDLED_TEXT[cut:])):
        x, y = make_batches(spec, batch_size=64, n_batches=1, seed=3, split=split)[0]
        for row_x, row_y in zip(x, y):
            assert bytes(row_x.tolist()) + bytes(row_y[-1:].tolist()) in part
    train, = make_batches(spec, batch_size=64, n_batches=1, seed=3, split="train")
    assert not torch.equal(train[0], make_batches(spec, batch_size=64, n_batches=1, seed=3)[0][0])


def test_digits_parts_are_disjoint_and_cover_every_image():
    spec = mini_mlp()
    train = make_batches(spec, "digits", batch_size=1617, n_batches=1, split="train", dtype=torch.float64)[0][0]
    val = make_batches(spec, "digits", batch_size=180, n_batches=1, split="validation", dtype=torch.float64)[0][0]
    everything = torch.cat([train, val])
    assert torch.unique(everything, dim=0).shape[0] == torch.unique(
        make_batches(spec, "digits", batch_size=1797, n_batches=1, dtype=torch.float64)[0][0], dim=0).shape[0]
    rows = {tuple(r.tolist()) for r in train}
    assert len(rows) >= 1600 and sum(tuple(r.tolist()) in rows for r in val) <= 2  # (a few duplicate images)
    with pytest.raises(ValueError, match=r"digits data set \(validation part\) has 180 images; 181 are needed"):
        make_batches(spec, "digits", batch_size=181, n_batches=1, split="validation")


def test_file_parts_and_synthetic_streams(tmp_path):
    x, y = torch.randn(20, 64, dtype=torch.float64), torch.arange(20) % 10
    torch.save({"x": x, "y": y}, tmp_path / "data.pt")
    path = str(tmp_path / "data.pt")
    (vx, vy), = make_batches(mini_mlp(), path, batch_size=2, n_batches=1, split="validation", dtype=torch.float64)
    assert torch.equal(vx, x[18:]) and torch.equal(vy, y[18:])  # the last 10 % of the samples
    (tx, _), = make_batches(mini_mlp(), path, batch_size=18, n_batches=1, split="train", dtype=torch.float64)
    assert torch.equal(tx, x[:18])
    (vx, _), = make_batches(mini_mlp(), path, batch_size=5, n_batches=1, split="validation", validation_fraction=0.25,
                            dtype=torch.float64)
    assert torch.equal(vx, x[15:])
    with pytest.raises(ValueError, match=r"\(train part\) holds 18 samples; 19 are needed"):
        make_batches(mini_mlp(), path, batch_size=19, n_batches=1, split="train")
    (sx, _), = make_batches(mini_mlp(), "synthetic", batch_size=4, n_batches=1, split="train")
    (ax, _), = make_batches(mini_mlp(), "synthetic", batch_size=4, n_batches=1)
    (vx, _), = make_batches(mini_mlp(), "synthetic", batch_size=4, n_batches=1, split="validation")
    assert torch.equal(sx, ax) and not torch.equal(sx, vx)
    with pytest.raises(ValueError, match="split must be one of all, train, validation"):
        make_batches(mini_mlp(), split="test")
    with pytest.raises(ValueError, match="validation_fraction must lie strictly between 0 and 1"):
        make_batches(mini_mlp(), split="train", validation_fraction=1.0)


def test_samples_available_per_part(tmp_path):
    from hessian_blocks.data import samples_available

    image = build_model("vgg16")
    assert [samples_available(image, split=s) for s in ("all", "train", "validation")] == [1797, 1617, 180]
    assert samples_available(build_model("gpt2-nano")) is None and samples_available(mini_mlp()) is None
    torch.save({"x": torch.randn(20, 64), "y": torch.arange(20) % 10}, tmp_path / "data.pt")
    assert samples_available(mini_mlp(), str(tmp_path / "data.pt"), split="train", validation_fraction=0.25) == 15
    (tmp_path / "corpus.txt").write_bytes(bytes(range(100)))
    # next-token windows of 8 read 9 bytes: 90 training bytes hold 11 windows; masked windows need no extra byte
    assert samples_available(build_model("gpt2-nano", context=8), str(tmp_path / "corpus.txt"), split="train") == 11
    assert samples_available(build_model("bert-mini", context=10), str(tmp_path / "corpus.txt")) == 10
    with pytest.raises(ValueError, match="split must be one of all, train, validation"):
        samples_available(image, split="test")
    spec = build_model("gpt2-nano", context=8)
    make_batches(spec, str(tmp_path / "corpus.txt"), batch_size=11, n_batches=1, split="train")
    with pytest.raises(ValueError, match="needed"):
        make_batches(spec, str(tmp_path / "corpus.txt"), batch_size=12, n_batches=1, split="train")


# ---- unreadable, missing and mismatched data files


def test_unreadable_data_files_name_the_file_and_the_fix(tmp_path):
    junk = bytes(range(256)) * 2
    (tmp_path / "junk.pt").write_bytes(junk)
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "junk.npz").write_bytes(junk)
    np.save(tmp_path / "single.npy", np.zeros((4, 64)))
    (tmp_path / "single.npz").write_bytes((tmp_path / "single.npy").read_bytes())
    np.savez(tmp_path / "objects.npz", x=np.array([{}, {}], dtype=object), y=np.zeros(2))
    np.savez(tmp_path / "strings.npz", x=np.zeros((2, 64)), y=np.array(["a", "b"]))
    torch.save({"x": "not numbers", "y": torch.zeros(2)}, tmp_path / "strings.pt")
    cases = {
        "junk.pt": "is not a file of tensors written by torch.save .*save \\{'x': inputs, 'y': targets\\} with torch.save",
        "empty.pt": "is not a file of tensors written by torch.save \\(torch: EOFError\\)",
        "junk.npz": "is not an .npz archive of numeric arrays .*numpy.savez\\(path, x=inputs, y=targets\\)",
        "single.npz": "holds a single array .*numpy.savez",
        "objects.npz": "x and y must be numeric arrays .*numpy.savez",
        "strings.npz": "y is not numeric",
        "strings.pt": "x is not numeric",
    }
    for name, message in cases.items():
        path = str(tmp_path / name)
        for call in (lambda: make_batches(mini_mlp(), path, batch_size=2, n_batches=1),
                     lambda: samples_available(mini_mlp(), path)):
            with pytest.raises(ValueError, match=message) as err:
                call()
            assert name in str(err.value)


def test_a_missing_data_source_gets_the_projects_message_everywhere(tmp_path):
    for call in (lambda source: make_batches(mini_mlp(), source), lambda source: samples_available(mini_mlp(), source)):
        with pytest.raises(FileNotFoundError, match="'nosuch' is neither one of auto, digits, text, synthetic nor an "
                                                    "existing file: pass one of those names or the path of a .pt"):
            call("nosuch")
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match="expected .pt, .npz or .txt"):
        samples_available(mini_mlp(), str(tmp_path / "data.csv"))


def test_text_data_for_a_model_without_tokens_names_the_data_it_takes(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("some text " * 100)
    image = build_model("vit-tiny")
    for call in (lambda: samples_available(image, str(path)), lambda: make_batches(image, str(path))):
        with pytest.raises(ValueError, match=r"corpus.txt is text data; model 'vit-tiny' has task 'image', which takes "
                                             r"images: the data source digits \(= auto\), synthetic, or a .pt / .npz"):
            call()
    with pytest.raises(ValueError, match="which takes vectors: the data source synthetic"):
        make_batches(mini_mlp(), str(path))
    with pytest.raises(ValueError, match="digits is image data; model 'gpt2-nano' has task 'text', which takes text"):
        make_batches(build_model("gpt2-nano"), "digits")


def test_too_few_samples_names_the_options_that_ask_for_fewer(tmp_path):
    torch.save({"x": torch.randn(20, 64), "y": torch.arange(20) % 10}, tmp_path / "data.pt")
    (tmp_path / "corpus.txt").write_bytes(bytes(range(100)))
    calls = [
        lambda: make_batches(mini_mlp(), str(tmp_path / "data.pt"), batch_size=8, n_batches=16, split="validation"),
        lambda: make_batches(build_model("gpt2-nano", context=8), str(tmp_path / "corpus.txt"), batch_size=8),
        lambda: make_batches(mini_mlp(), "digits", batch_size=200, n_batches=1, split="validation"),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"are needed.*: ask for fewer or smaller batches \(on the command line: "
                                             r"--batch-size, with --batches .* or --val-batches for compare\)"):
            call()
