"""The saved index: reuse, incremental updates, rebuilds, batching, and model failures."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from guie.retrieval import index as index_module
from guie.retrieval.index import (
    Embedder, ImageIndex, ModelContractError, update_index,
)


class CountingModel:
    """Wraps the loaded TorchScript model to count forward calls and images."""

    def __init__(self, model):
        self.model = model
        self.calls = 0
        self.images = 0

    def __call__(self, batch):
        self.calls += 1
        self.images += batch.shape[0]
        return self.model(batch)


def counting_embedder(model_path, **kwargs) -> Embedder:
    embedder = Embedder(model_path, **kwargs)
    embedder.model = CountingModel(embedder.model)
    return embedder


@pytest.fixture()
def small_folder(tmp_path, load_photo):
    """Six photos of three sizes (three share one size, for batching) and one text file."""
    root = tmp_path / "images"
    root.mkdir()
    coffee = load_photo("coffee")
    for i, box in enumerate([(0, 0, 200, 150), (100, 50, 300, 200), (300, 200, 500, 350)]):
        coffee.crop(box).save(root / f"crop_{i}.png")
    load_photo("chelsea").save(root / "chelsea.jpg", quality=90)
    load_photo("rocket").resize((160, 107)).save(root / "rocket.webp")
    (root / "sub").mkdir()
    load_photo("astronaut").resize((90, 120)).save(root / "sub" / "astronaut.png")
    (root / "readme.txt").write_text("not an image")
    return root


def test_first_build_then_reuse_without_any_model_call(small_folder, model_path, tmp_path):
    cache = tmp_path / "out" / "index.npz"
    first, stats = update_index(small_folder, counting_embedder(model_path), cache,
                                progress=False)
    assert stats.embedded == 6 and stats.reused == 0 and stats.rebuilt_because == "no saved index"
    assert first.paths == ["chelsea.jpg", "crop_0.png", "crop_1.png", "crop_2.png",
                           "rocket.webp", "sub/astronaut.png"]
    assert [s.path for s in first.skipped] == ["readme.txt"]
    assert first.embeddings.shape == (6, 64)
    saved_at = cache.stat().st_mtime_ns

    embedder = counting_embedder(model_path)
    again, stats = update_index(small_folder, embedder, cache, progress=False)
    assert embedder.model.calls == 0
    assert stats.embedded == 0 and stats.reused == 7 and stats.rebuilt_because is None
    assert again.paths == first.paths and again.skipped == first.skipped
    assert torch.equal(again.embeddings, first.embeddings)
    assert cache.stat().st_mtime_ns == saved_at  # nothing changed: not rewritten
    entry = again.entries[again.paths.index("sub/astronaut.png")]
    assert (entry.width, entry.height) == (90, 120)


def test_incremental_add_modify_delete(small_folder, model_path, load_photo, tmp_path):
    cache = tmp_path / "index.npz"
    before, _ = update_index(small_folder, Embedder(model_path), cache, progress=False)

    load_photo("camera").resize((100, 100)).save(small_folder / "added.png")
    modified = small_folder / "crop_1.png"
    load_photo("coins").crop((0, 0, 200, 150)).save(modified)
    os.utime(modified, ns=(1_000_000_000, 1_000_000_000))  # a different mtime, whatever the clock
    (small_folder / "rocket.webp").unlink()

    embedder = counting_embedder(model_path)
    after, stats = update_index(small_folder, embedder, cache, progress=False)
    assert embedder.model.images == 2  # only the added and the modified file
    assert (stats.embedded, stats.removed, stats.reused) == (2, 1, 5)
    assert after.paths == ["added.png", "chelsea.jpg", "crop_0.png", "crop_1.png", "crop_2.png",
                           "sub/astronaut.png"]
    for path in ("chelsea.jpg", "crop_0.png", "crop_2.png", "sub/astronaut.png"):
        assert torch.equal(after.embeddings[after.paths.index(path)],
                           before.embeddings[before.paths.index(path)])
    fresh, _ = update_index(small_folder, Embedder(model_path), tmp_path / "fresh.npz",
                            progress=False)
    torch.testing.assert_close(after.embeddings, fresh.embeddings, rtol=0, atol=0)
    assert not torch.equal(after.embeddings[after.paths.index("crop_1.png")],
                           before.embeddings[before.paths.index("crop_1.png")])
    reloaded = ImageIndex.load(cache)
    assert reloaded.paths == after.paths and torch.equal(reloaded.embeddings, after.embeddings)


def test_changed_model_or_settings_force_a_rebuild(small_folder, model_path, make_model,
                                                    tmp_path):
    cache = tmp_path / "index.npz"
    first, _ = update_index(small_folder, Embedder(model_path), cache, progress=False)

    other = make_model(tmp_path / "other.pt", seed=1)
    embedder = counting_embedder(other)
    rebuilt, stats = update_index(small_folder, embedder, cache, progress=False)
    assert stats.rebuilt_because == "the model file changed"
    assert embedder.model.images == 6 and stats.reused == 0
    assert not torch.allclose(rebuilt.embeddings, first.embeddings)
    assert ImageIndex.load(cache).model_sha256 == embedder.model_sha256

    embedder = counting_embedder(other, max_side=64)
    _, stats = update_index(small_folder, embedder, cache, progress=False)
    assert "loading settings changed" in stats.rebuilt_because and embedder.model.images == 6


def test_unreadable_saved_index_is_rebuilt(small_folder, model_path, tmp_path):
    cache = tmp_path / "index.npz"
    cache.write_bytes(b"not an npz file")
    index, stats = update_index(small_folder, Embedder(model_path), cache, progress=False)
    assert stats.rebuilt_because.startswith("saved index unreadable") and len(index.paths) == 6
    assert ImageIndex.load(cache).paths == index.paths


def test_save_is_atomic(small_folder, model_path, tmp_path, monkeypatch):
    cache = tmp_path / "index.npz"
    update_index(small_folder, Embedder(model_path), cache, progress=False)
    good = cache.read_bytes()
    (small_folder / "crop_0.png").unlink()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(index_module.np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        update_index(small_folder, Embedder(model_path), cache, progress=False)
    assert cache.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("index")) == [
        "index.npz"]


def test_batching_matches_one_image_per_call(small_folder, model_path, tmp_path):
    one = counting_embedder(model_path)
    alone, _ = update_index(small_folder, one, tmp_path / "a.npz", progress=False)
    batched_embedder = counting_embedder(model_path, batch_size=4)
    batched, _ = update_index(small_folder, batched_embedder, tmp_path / "b.npz", progress=False)
    assert one.model.calls == 6
    assert batched_embedder.model.calls == 4  # the three same-size crops share one call
    assert batched.paths == alone.paths
    assert (batched.embeddings - alone.embeddings).abs().max().item() <= 1e-5


def test_donor_index_is_reused_for_queries(small_folder, model_path, tmp_path):
    index, _ = update_index(small_folder, Embedder(model_path), tmp_path / "i.npz",
                            progress=False)
    embedder = counting_embedder(model_path)
    queries, stats = update_index(small_folder / "sub", embedder, tmp_path / "q.npz",
                                  donor=index, progress=False)
    assert embedder.model.calls == 0 and stats.reused == 1
    assert torch.equal(queries.embeddings[0],
                       index.embeddings[index.paths.index("sub/astronaut.png")])
    single, _ = update_index(small_folder, embedder, tmp_path / "one.npz", only=["chelsea.jpg"],
                             donor=index, progress=False)
    assert single.paths == ["chelsea.jpg"] and embedder.model.calls == 0


class FailsOnTinyImages(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] < 8:
            raise RuntimeError("input too small")
        return torch.nn.functional.normalize(images.float().mean(dim=(2, 3)).repeat(1, 22)[:, :64])


class WrongShape(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float()


def test_model_failure_on_one_image_skips_only_that_image(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for name, size in (("tiny.png", (2, 2)), ("a.png", (16, 16)), ("b.png", (16, 16))):
        Image.fromarray(np.full((size[1], size[0], 3), 120, np.uint8)).save(root / name)
    model = tmp_path / "fails.pt"
    torch.jit.script(FailsOnTinyImages()).save(str(model))
    index, _ = update_index(root, Embedder(model, batch_size=3), tmp_path / "i.npz",
                            progress=False)
    assert index.paths == ["a.png", "b.png"]
    assert [(s.path, "input too small" in s.reason) for s in index.skipped] == [
        ("tiny.png", True)]

    wrong = tmp_path / "wrong.pt"
    torch.jit.script(WrongShape()).save(str(wrong))
    with pytest.raises(ModelContractError, match=r"returned \(1, 3, 16, 16\)"):
        update_index(root, Embedder(wrong), tmp_path / "w.npz", progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(small_folder, model_path, tmp_path):
    on_cpu, _ = update_index(small_folder, Embedder(model_path), tmp_path / "c.npz",
                             progress=False)
    on_gpu, _ = update_index(small_folder, Embedder(model_path, device="cuda", batch_size=4),
                             tmp_path / "g.npz", progress=False)
    assert on_gpu.paths == on_cpu.paths
    assert (on_gpu.embeddings - on_cpu.embeddings).abs().max().item() <= 1e-4
