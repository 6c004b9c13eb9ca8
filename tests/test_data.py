"""Data pipeline: synthetic and real E2E data, encoding to fixed shapes, client partitions, batches, tokenizer."""

import gzip
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from hsplit_sim.data import BUNDLED_E2E_DIR, e2e_dir
from hsplit_sim.errors import ScenarioError
from hsplit_sim.training.data import (
    Example,
    attribute_value,
    encode_examples,
    load_dataset,
    load_e2e,
    partition,
    prompt_text,
    synthetic_e2e,
)
from hsplit_sim.training.tokenizer import WordTokenizer


def tokenizer_for(examples):
    return WordTokenizer.build([f"{e.mr} || {e.ref}" for e in examples], 1000)


def test_synthetic_is_deterministic_and_e2e_shaped():
    examples = synthetic_e2e(200, seed=3)
    assert examples == synthetic_e2e(200, seed=3)
    assert examples != synthetic_e2e(200, seed=4)
    for example in examples:
        name = attribute_value(example.mr, "name")
        assert example.mr.startswith(f"name[{name}]")
        assert name in example.ref
        for key in ("food", "near", "area"):
            value = attribute_value(example.mr, key)
            assert value is None or value in example.ref


def test_synthetic_eval_shares_no_mr_with_train():
    train, evaluation = load_dataset("e2e-synthetic", None, 300, 50, seed=0)
    assert len(train) == 300 and len(evaluation) == 50
    assert len({e.mr for e in evaluation}) == 50
    assert not {e.mr for e in train} & {e.mr for e in evaluation}


def test_shipped_e2e_splits_by_mr_and_counts_the_release():
    splits = load_e2e(BUNDLED_E2E_DIR)
    assert not {e.mr for e in splits["train"]} & {e.mr for e in splits["validation"]}
    assert len(splits["train"]) + len(splits["validation"]) == 4672
    assert len({e.mr for e in splits["train"] + splits["validation"]}) == 547
    assert len(splits["test"]) == 4693 and len({e.mr for e in splits["test"]}) == 630
    train, evaluation = load_dataset("e2e", None, 100, 30, seed=1)
    assert len(train) == 100 and len(evaluation) == 30
    assert train == load_dataset("e2e", str(BUNDLED_E2E_DIR), 100, 30, seed=1)[0]


def test_plain_and_gzipped_csv_read_the_same(tmp_path):
    rows = "mr,ref\n\"name[A], area[riverside]\",A is by the river.\n\"name[B], food[Thai]\",B serves Thai food.\n"
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    plain.mkdir(), packed.mkdir()
    (plain / "devset.csv").write_text(rows, encoding="utf-8")
    with gzip.open(packed / "devset.csv.gz", "wt", encoding="utf-8") as f:
        f.write(rows)
    assert load_e2e(plain) == load_e2e(packed)
    assert len(load_e2e(plain)["train"] + load_e2e(plain)["validation"]) == 2


def test_e2e_directory_choice_and_missing_files(tmp_path, monkeypatch):
    with pytest.raises(ScenarioError, match="devset.csv"):
        load_e2e(tmp_path)
    with pytest.raises(ScenarioError, match="not found"):
        load_e2e(tmp_path / "absent")
    monkeypatch.delenv("HSPLIT_SIM_E2E_DIR", raising=False)
    assert e2e_dir(None) == BUNDLED_E2E_DIR
    monkeypatch.setenv("HSPLIT_SIM_E2E_DIR", str(tmp_path))
    assert e2e_dir(None) == tmp_path
    assert e2e_dir("elsewhere") == Path("elsewhere")


def test_encode_masks_prompt_and_pads_exactly():
    example = Example("name[The Eagle], area[riverside]", "The Eagle is in the riverside area.")
    tokenizer = tokenizer_for([example])
    encoded = encode_examples([example], tokenizer, max_length=40)
    prompt = tokenizer.encode(prompt_text(example.mr))
    target = tokenizer.encode(" " + example.ref) + [tokenizer.eos_id]
    length = len(prompt) + len(target)
    for array in (encoded.input_ids, encoded.attention_mask, encoded.labels):
        assert array.shape == (1, 40) and array.dtype == np.int64
    assert encoded.input_ids[0, :length].tolist() == prompt + target
    assert (encoded.input_ids[0, length:] == tokenizer.pad_id).all()
    assert encoded.attention_mask[0].tolist() == [1] * length + [0] * (40 - length)
    assert encoded.labels[0].tolist() == [-100] * len(prompt) + target + [-100] * (40 - length)


def test_truncation_keeps_target_tokens():
    example = Example(
        "name[The Eagle], eatType[pub], food[Italian], area[riverside], near[Burger King]",
        "The Eagle is an Italian pub in the riverside area near Burger King.",
    )
    tokenizer = tokenizer_for([example])
    prompt = tokenizer.encode(prompt_text(example.mr))
    target = tokenizer.encode(" " + example.ref)
    # Room for 3 target tokens after the prompt: the target still gets 8, the prompt loses its start.
    encoded = encode_examples([example], tokenizer, max_length=len(prompt) + 3)
    assert encoded.attention_mask.sum() == len(prompt) + 3
    assert encoded.labels[0, -8:].tolist() == target[:8]
    assert (encoded.labels[0] != -100).sum() == 8
    assert encoded.input_ids[0, :-8].tolist() == prompt[-(len(prompt) - 5) :]
    # Enough room: the whole target with its end-of-sequence fits after the prompt.
    roomy = encode_examples([example], tokenizer, max_length=len(prompt) + len(target) + 1)
    assert roomy.labels[0, -1] == tokenizer.eos_id


def test_partition_iid_covers_each_index_once_and_balances():
    examples = synthetic_e2e(103, seed=0)
    parts = partition(examples, 4, "iid", seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(103))
    assert {len(part) for part in parts} <= {25, 26}
    with pytest.raises(ValueError):
        partition(examples, 4, "shards", seed=0)


def test_partition_dirichlet_is_skewed_and_nonempty():
    examples = synthetic_e2e(800, seed=0)
    parts = partition(examples, 5, "dirichlet", seed=0, alpha=0.1)
    assert sorted(np.concatenate(parts).tolist()) == list(range(800))
    assert all(len(part) >= 1 for part in parts)
    classes = ["coffee shop", "pub", "restaurant", None]
    shares = []
    for part in parts:
        counts = Counter(attribute_value(examples[i].mr, "eatType") for i in part)
        shares.append([counts[c] / len(part) for c in classes])
    assert np.ptp(np.array(shares), axis=0).max() > 0.5
    tiny = partition(examples[:6], 6, "dirichlet", seed=0, alpha=0.01)
    assert all(len(part) == 1 for part in tiny)


def test_word_tokenizer_round_trip_and_unknown():
    tokenizer = WordTokenizer.build(["The Eagle is a pub.", "The pub is near Ranch."], vocab_size=100)
    assert (tokenizer.pad_id, tokenizer.eos_id) == (0, 2)
    assert tokenizer.decode(tokenizer.encode("The Eagle is a pub.")) == "the eagle is a pub ."
    assert tokenizer.encode("zebra") == [3]
    assert tokenizer.vocab_size == 4 + len({"the", "eagle", "is", "a", "pub", ".", "near", "ranch"})
    assert WordTokenizer.build(["a b c d e"], vocab_size=6).vocab_size == 6
