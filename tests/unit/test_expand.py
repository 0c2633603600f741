"""Several images per prompt: ids, seeds, resume filtering and the encode stage's expansion, without Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ifbatch.models.seeding import derive_seed
from ifbatch.tasks.inputs.expand import expand, image_count, image_id, image_lists, image_seed, without_done
from ifbatch.tasks.stream.stages import StageActor


def test_image_zero_is_the_row_itself_and_later_images_derive_from_it():
    assert (image_id("cat-1", 0), image_seed(42, 0)) == ("cat-1", 42)
    assert image_id("cat-1", 3) == "cat-1~3" and image_seed(42, 3) == derive_seed(42, "image 3")
    assert len({image_seed(42, k) for k in range(100)}) == 100


def test_work_table_lists_and_resume_per_image():
    rows = pa.table({"id": ["a", "b", "c"], "images": image_lists(np.array([1, 3, 2]))})
    assert rows.column("images").to_pylist() == [[0], [0, 1, 2], [0, 1]] and image_count(rows) == 6
    left = without_done(rows, pa.array(["a", "b~1", "c", "c~1", "unrelated"]))
    assert left.to_pylist() == [{"id": "b", "images": [0, 2]}]  # a and c are whole: dropped
    assert image_count(left) == 2 and image_count(left.slice(0, 0)) == 0


def test_expand_gives_each_image_its_own_row_id_and_seed():
    batch = {
        "id": np.array(["a", "b"], object),
        "seed": np.array([5, 7]),
        "images": np.array([np.array([0], np.int32), np.array([0, 2], np.int32)], object),
        "prompt_embeds": np.arange(2 * 3 * 4, dtype=np.float16).reshape(2, 3, 4),
        "error": np.array(["", "text_encoder: boom"], object),
    }
    out = expand(batch)
    assert list(out["id"]) == ["a", "b", "b~2"] and list(out["prompt_id"]) == ["a", "b", "b"]
    assert list(out["image_index"]) == [0, 0, 2] and list(out["seed"]) == [5, 7, image_seed(7, 2)]
    assert np.array_equal(out["prompt_embeds"][2], batch["prompt_embeds"][1])  # the row's embedding, shared
    assert list(out["error"]) == ["", "text_encoder: boom", "text_encoder: boom"]  # each image gets a record
    assert "images" not in out


class CountingEncoder(StageActor):
    """The encode stage's plumbing with a model call that records how many prompts it encoded."""

    name = "text_encoder"
    expands = True

    def __init__(self):
        self.encoded = 0

    def compute(self, batch, idx, params):
        self.encoded += len(idx)
        return {"prompt_embeds": np.zeros((len(idx), 2, 2), np.float16)}


def test_the_encode_stage_encodes_each_prompt_once_and_hands_on_one_row_per_image():
    stage = CountingEncoder()
    batch = {
        "id": np.array(["a", "b"], object),
        "prompt": np.array(["x", "y"], object),
        "seed": np.array([1, 2]),
        "images": np.array([np.arange(4, dtype=np.int32), np.arange(3, dtype=np.int32)], object),
    }
    out = stage(batch)
    assert stage.encoded == 2 and len(out["id"]) == 7 and out["prompt_embeds"].shape == (7, 2, 2)
