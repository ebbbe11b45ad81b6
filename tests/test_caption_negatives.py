"""Hard negative captions (NegCLIP's word swaps): each negative differs from its caption by one word of one
group, reads as grammatical English, is fitted to the words the captions use, reaches the batch tokenised
with a validity flag, and enters the losses as extra negatives exactly as their formulas say."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from pipeline.world.shards import write_world_shards
from support import shard_stream, stage_config
from training.clip.losses import ClipLoss, SigLipLoss
from training.data.caption_negatives import WordSwap
from training.errors import UserError
from training.tokenizer import train_tokenizer
from training.train import train

GROUPS = {"colour": ["red", "orange", "blue"], "shape": ["circle", "star"], "shapes": ["circles", "stars"]}


def _words(text: str) -> list[str]:
    return re.findall(r"[\w-]+|[^\w\s]", text)


def _swapped(caption: str, negative: str) -> list[tuple[str, str]]:
    """The words that differ between a caption and its negative, leaving out an article made to agree."""
    before, after = _words(caption), _words(negative)
    assert len(before) == len(after), negative
    return [(a, b) for a, b in zip(before, after) if a != b and a.lower() not in ("a", "an")]


def test_a_swap_changes_one_group_word_and_keeps_the_article_and_capital_right():
    swap = WordSwap(GROUPS, min_count=1)
    caption = "A red star and two blue circles, reddish starfish"
    seen = set()
    for seed in range(200):
        [negative] = swap(caption, np.random.default_rng(seed))
        # One word of a group for another of the same group; "A" → "An" only before "orange".
        [(old, new)] = _swapped(caption, negative)
        group = next(g for g in GROUPS.values() if old.lower() in g)
        assert new.lower() in group and new.lower() != old.lower()
        assert negative.startswith("An orange") == (old == "red" and new == "orange")
        assert "reddish starfish" in negative  # whole words only
        seen.add((old, new))
    # Every word of the caption that belongs to a group gets swapped, to each of its alternatives.
    assert seen == {
        ("red", "orange"),
        ("red", "blue"),
        ("star", "circle"),
        ("blue", "red"),
        ("blue", "orange"),
        ("circles", "stars"),
    }
    assert swap("An orange circle", np.random.default_rng(1))[0] in {"A red circle", "A blue circle", "An orange star"}
    assert swap("a dog on a sofa", np.random.default_rng(0)) == [None]
    assert swap("a red star", np.random.default_rng(7)) == swap("a red star", np.random.default_rng(7))


def test_several_negatives_per_caption_each_swap_a_different_group():
    swap = WordSwap(GROUPS, min_count=1, per_caption=3)
    for seed in range(50):
        negatives = swap("a red star and two blue circles", np.random.default_rng(seed))
        groups = set()
        for negative in negatives:
            [(old, new)] = _swapped("a red star and two blue circles", negative)
            groups.add(next(name for name, words in GROUPS.items() if old in words))
        assert groups == {"colour", "shape", "shapes"}  # three groups, one negative each
    assert swap("a red star", np.random.default_rng(0))[2] is None  # two groups only: the third is empty
    with pytest.raises(UserError, match="per_caption=0"):
        WordSwap(GROUPS, per_caption=0)


def test_fit_keeps_only_the_words_the_captions_use():
    swap = WordSwap(GROUPS, min_count=2)
    counts = swap.fit(["a red star", "a blue star", "a red circle", "two red stars", "a blue circle"])
    assert counts["red"] == 3 and counts["orange"] == 0 and counts["stars"] == 1
    # orange is never used; "stars" once, so the plural group is left with one word and dropped.
    assert swap.groups == {"colour": ("red", "blue"), "shape": ("circle", "star")}
    assert swap("two red circles", np.random.default_rng(0)) == ["two blue circles"]
    nothing = WordSwap(GROUPS, min_count=1)
    nothing.fit(["a dog"])
    assert nothing("a red star", np.random.default_rng(0)) == [None] and "no hard negatives" in nothing.describe()


def test_bad_groups_are_refused_in_one_line():
    with pytest.raises(UserError, match="'red' is in both"):
        WordSwap({"a": ["red", "blue"], "b": ["red", "green"]})
    with pytest.raises(UserError, match="groups.solo: a group needs at least two words"):
        WordSwap({"solo": ["red"]})


def test_the_shipped_groups_load_and_swap_world_captions():
    cfg = stage_config("train", "+caption_negatives=word_swap", "data.path=unused", "output=unused")
    swap = instantiate(cfg.data.caption_negatives)
    assert isinstance(swap, WordSwap)
    swap.fit(["three green triangles at the top"] * 5 + ["two blue stars at the bottom"] * 5)
    # "left" and "right" are never used: no side group; a word seen in fewer than min_count captions is dropped.
    assert set(swap.groups) == {"colour", "shapes", "number", "end"}
    negatives = swap("three green triangles at the top", np.random.default_rng(0))
    assert len(negatives) == swap.per_caption and None not in negatives
    assert "three green triangles at the top" not in negatives


def test_a_training_stream_carries_tokenised_negatives_and_their_flags(tmp_path):
    shards = write_world_shards(tmp_path, 24, 12, image_size=24)
    tokenizer = train_tokenizer(["a red circle", "two blue squares", "a picture"], vocab_size=300, max_length=64)
    swap = WordSwap({"colour": ["red", "orange", "yellow", "green", "blue", "purple"]}, min_count=1, per_caption=2)

    def read():
        stream = shard_stream(shards, tokenizer, batch_size=6, context_length=64, caption_negatives=swap)
        return list(DataLoader(stream, batch_size=None, num_workers=1))

    batches = read()
    assert len(batches) == 4
    for batch in batches:
        assert batch["input_ids"].shape == (6, 64) and batch["negative_input_ids"].shape == (12, 64)
        valid = batch["negative_valid"]
        assert valid.dtype == torch.bool and valid.shape == (12,)
        for i, caption in enumerate(batch["captions"]):
            # Sample-major: sample i's two negatives are rows 2i and 2i+1. Every world caption names a colour
            # (one group): its first negative is real and differs from its tokens, its second is masked.
            assert bool(valid[2 * i]) and not bool(valid[2 * i + 1]), caption
            assert not torch.equal(batch["negative_input_ids"][2 * i], batch["input_ids"][i])
    again = read()  # the same seed and epoch: the same negatives
    assert all(torch.equal(a["negative_input_ids"], b["negative_input_ids"]) for a, b in zip(batches, again))


def _ce(logits: list[float], i: int) -> float:
    finite = [v for v in logits if v != -math.inf]
    return -logits[i] + math.log(sum(math.exp(v) for v in finite))


def test_negatives_are_extra_columns_for_the_images_in_the_clip_loss():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    negative = torch.tensor([[0.8, 0.6], [1.0, 0.0]])
    scale = 3.0
    loss = ClipLoss()(image, text, torch.tensor(math.log(scale)), None, negative, torch.tensor([True, False]))
    # Image rows see [true captions | valid negatives]: negative 1 is masked; text rows are unchanged.
    by_hand = (_ce([scale * 0.6, 0, scale * 0.8], 0) + _ce([scale * 0.8, scale * 1, scale * 0.6], 1)) / 2
    by_hand = (by_hand + (_ce([scale * 0.6, scale * 0.8], 0) + _ce([0, scale * 1], 1)) / 2) / 2
    assert float(loss) == pytest.approx(by_hand, abs=1e-6)
    for local in (True, False):
        plain = ClipLoss(local_loss=local)(image, text, torch.tensor(math.log(scale)))
        masked = ClipLoss(local_loss=local)(
            image, text, torch.tensor(math.log(scale)), None, negative, torch.tensor([False, False])
        )
        assert float(masked) == pytest.approx(float(plain), abs=1e-6)  # no valid negative: the plain loss


def test_negatives_are_more_minus_one_pairs_in_the_siglip_loss():
    image = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    text = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    negative = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    t, b = 2.0, -1.0
    valid = torch.tensor([False, True])
    loss = SigLipLoss()(image, text, torch.tensor(math.log(t)), torch.tensor([b]), negative, valid)
    plain = SigLipLoss()(image, text, torch.tensor(math.log(t)), torch.tensor([b]))
    # The one valid negative (0.6, 0.8) against image 0 (similarity 0.6) and image 1 (similarity 1.0).
    log_sigmoid = lambda z: -math.log1p(math.exp(-z))  # noqa: E731
    extra = -(log_sigmoid(-(t * 0.6 + b)) + log_sigmoid(-(t * 1.0 + b))) / 2
    assert float(loss) == pytest.approx(float(plain) + extra, abs=1e-6)


def test_training_with_word_swaps_fits_them_and_feeds_them_to_the_loss(tmp_path, capsys):
    """Through `training.train`: the groups are fitted to the training captions (one line says which), and
    the first step's loss, same seed and data, is above the plain one (more negatives in the softmax)."""
    shards = write_world_shards(tmp_path / "pairs", 64, 64, image_size=32)
    common = [
        f"data.path={shards}",
        "data.num_workers=0",
        "data.shuffle_buffer=0",
        "data.batch_size=16",
        "trainer.max_steps=1",
        "trainer.enable_progress_bar=false",
        "tracking=false",
    ]
    plain = train(stage_config("train", *common, f"output={tmp_path}/plain"))
    capsys.readouterr()
    swapped = train(stage_config("train", *common, "+caption_negatives=word_swap", f"output={tmp_path}/swap"))
    printed = capsys.readouterr().out
    assert "hard negative captions, words swapped within groups: colour: " in printed
    assert swapped > plain + 0.05
    with pytest.raises(UserError, match="module.accum_freq=2 with data.caption_negatives"):
        train(
            stage_config(
                "train", *common, "+caption_negatives=word_swap", "module.accum_freq=2", f"output={tmp_path}/accum"
            )
        )
