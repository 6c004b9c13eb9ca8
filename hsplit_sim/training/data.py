"""E2E-style data: a synthetic generator, the real E2E files, encoding to fixed shapes, client partitions and batches."""

import csv
import gzip
import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hsplit_sim.data import e2e_dir, e2e_file
from hsplit_sim.errors import ScenarioError

VALIDATION_PERCENT = 10
MIN_TARGET_TOKENS = 8

# Value sets of the E2E release, in its canonical attribute order (name first).
NAMES = [
    "Alimentum", "Aromi", "Bibimbap House", "Blue Spice", "Browns Cambridge", "Clowns", "Cocum", "Cotto",
    "Fitzbillies", "Giraffe", "Green Man", "Loch Fyne", "Midsummer House", "Strada", "Taste of Cambridge",
    "The Cambridge Blue", "The Cricketers", "The Dumpling Tree", "The Eagle", "The Golden Curry",
    "The Golden Palace", "The Mill", "The Olive Grove", "The Phoenix", "The Plough", "The Punter",
    "The Rice Boat", "The Twenty Two", "The Vaults", "The Waterman", "The Wrestlers",
    "Travellers Rest Beefeater", "Wildwood", "Zizzi",
]
VALUES = {
    "eatType": ["coffee shop", "pub", "restaurant"],
    "food": ["Chinese", "English", "Fast food", "French", "Indian", "Italian", "Japanese"],
    "priceRange": ["cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"],
    "customer rating": ["low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"],
    "area": ["city centre", "riverside"],
    "familyFriendly": ["yes", "no"],
    "near": [
        "All Bar One", "Avalon", "Burger King", "Café Brazil", "Café Rouge", "Café Sicilia", "Clare Hall",
        "Crowne Plaza Hotel", "Express by Holiday Inn", "Rainbow Vegetarian Café", "Raja Indian Cuisine",
        "Ranch", "The Bakers", "The Portland Arms", "The Sorrento", "Yippee Noodle Bar",
    ],
}
OPENINGS = ["{name} is a {kind}", "There is a {kind} called {name}", "Try {name}, a {kind}"]
ATTRIBUTE = re.compile(r"([^,\[\]]+)\[([^\]]*)\]")


@dataclass(frozen=True)
class Example:
    mr: str
    ref: str


def _clause(key: str, value: str) -> str:
    """How a reference mentions one attribute, with the value verbatim so the mapping is learnable."""
    if key == "food":
        return f"serving {value} food"
    if key == "priceRange":
        return f"with a {value} price range" if value in ("cheap", "moderate", "high") else f"with prices {value}"
    if key == "customer rating":
        return f"with a customer rating of {value}"
    if key == "area":
        return f"in the {value} area"
    if key == "familyFriendly":
        return "which is family-friendly" if value == "yes" else "which is not family-friendly"
    return f"near {value}"  # the only key left: near


def _synthetic_example(rng: random.Random) -> Example:
    """Name plus at least two other attributes, mentioned in shuffled order after one of a few openings."""
    keys = list(VALUES)
    chosen = sorted(rng.sample(range(len(keys)), rng.randint(2, len(keys))))
    attributes = {"name": rng.choice(NAMES)} | {keys[i]: rng.choice(VALUES[keys[i]]) for i in chosen}
    mr = ", ".join(f"{key}[{value}]" for key, value in attributes.items())
    return Example(mr, _synthetic_reference(attributes, rng))


def _synthetic_reference(attributes: dict[str, str], rng: random.Random) -> str:
    clauses = [_clause(key, value) for key, value in attributes.items() if key not in ("name", "eatType")]
    rng.shuffle(clauses)
    ref = rng.choice(OPENINGS).format(name=attributes["name"], kind=attributes.get("eatType", "place"))
    if clauses:
        ref += " " + (", ".join(clauses[:-1]) + " and " + clauses[-1] if len(clauses) > 1 else clauses[0])
    return ref + "."


def synthetic_e2e(n: int, seed: int) -> list[Example]:
    """Deterministic E2E-format examples whose references mention every attribute; no files needed."""
    rng = random.Random(seed)
    return [_synthetic_example(rng) for _ in range(n)]


def _read_csv(directory: Path, stem: str) -> list[Example]:
    """Rows of `stem.csv` or `stem.csv.gz` in directory."""
    path = e2e_file(directory, stem)
    if path is None:
        raise ScenarioError(f"E2E data: missing file {directory / stem}.csv (or .csv.gz)")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not {"mr", "ref"} <= set(reader.fieldnames or []):
            raise ScenarioError(f"E2E data: {path} needs the columns mr and ref")
        return [Example(row["mr"], row["ref"]) for row in reader]


def _is_validation(mr: str) -> bool:
    """A stable hash of the MR, so all references of one MR fall on the same side on every machine."""
    return int(hashlib.md5(mr.encode("utf-8")).hexdigest(), 16) % 100 < VALIDATION_PERCENT


def load_e2e(directory: str | Path) -> dict[str, list[Example]]:
    """Train, validation and test splits; without trainset.csv the dev set is split by MR into train and validation."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ScenarioError(f"E2E data: directory not found: {directory}")
    dev = _read_csv(directory, "devset")
    if e2e_file(directory, "trainset") is not None:
        train, validation = _read_csv(directory, "trainset"), dev
    else:
        train = [example for example in dev if not _is_validation(example.mr)]
        validation = [example for example in dev if _is_validation(example.mr)]
    test = _read_csv(directory, "testset_w_refs") if e2e_file(directory, "testset_w_refs") is not None else []
    return {"train": train, "validation": validation, "test": test}


def load_dataset(
    name: str, directory: str | None, train_examples: int | None, eval_examples: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """Train and evaluation examples; evaluation never shares an MR with training."""
    if name == "e2e-synthetic":
        if train_examples is None:
            raise ScenarioError("dataset: e2e-synthetic needs a number of training examples")
        train = synthetic_e2e(train_examples, seed)
        seen = {example.mr for example in train}
        rng = random.Random(f"{seed}-eval")
        evaluation = []
        while len(evaluation) < eval_examples:
            example = _synthetic_example(rng)
            if example.mr not in seen:
                seen.add(example.mr)
                evaluation.append(example)
        return train, evaluation
    if name == "e2e":
        splits = load_e2e(e2e_dir(directory))
        train = list(splits["train"])
        evaluation = list(splits["validation"])
        random.Random(seed).shuffle(train)
        random.Random(f"{seed}-eval").shuffle(evaluation)
        return train[:train_examples], evaluation[:eval_examples]
    raise ScenarioError(f"dataset: unknown name {name!r} (known: e2e, e2e-synthetic)")


@dataclass
class Encoded:
    """Fixed-shape arrays (N, max_length); labels are -100 wherever no loss is taken (prompt and padding)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray


def prompt_text(mr: str) -> str:
    """The prompt a model continues with the reference; training and generation must agree on it."""
    return f"{mr} ||"


def encode_examples(examples: list[Example], tokenizer, max_length: int) -> Encoded:
    """Prompt "<mr> ||" then " <ref>" and end-of-sequence; loss on the reference only, right-padded to max_length."""
    shape = (len(examples), max_length)
    input_ids = np.full(shape, tokenizer.pad_id, dtype=np.int64)
    attention_mask = np.zeros(shape, dtype=np.int64)
    labels = np.full(shape, -100, dtype=np.int64)
    for row, example in enumerate(examples):
        prompt = tokenizer.encode(prompt_text(example.mr))
        target = tokenizer.encode(" " + example.ref) + [tokenizer.eos_id]
        # Too long: shorten the reference's end, but keep a few target tokens by cutting the prompt's start.
        kept = min(len(target), max(max_length - len(prompt), MIN_TARGET_TOKENS), max_length)
        target = target[:kept]
        prompt = prompt[len(prompt) - min(len(prompt), max_length - kept) :]
        length = len(prompt) + len(target)
        input_ids[row, :length] = prompt + target
        attention_mask[row, :length] = 1
        labels[row, len(prompt) : length] = target
    return Encoded(input_ids, attention_mask, labels)


def attribute_value(mr: str, key: str) -> str | None:
    """The value of one attribute in an E2E MR, or None if the MR lacks it."""
    for match in ATTRIBUTE.finditer(mr):
        if match.group(1).strip() == key:
            return match.group(2)
    return None


def partition(
    examples: list[Example], n_clients: int, kind: str, seed: int, alpha: float = 0.5, by: str = "eatType"
) -> list[np.ndarray]:
    """Example indices per client: "iid" shuffles and splits evenly; "dirichlet" skews each client's mix of `by` values."""
    n = len(examples)
    if n < n_clients:
        raise ValueError(f"partition: {n} examples cannot give each of {n_clients} clients one")
    rng = np.random.default_rng(seed)
    if kind == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), n_clients)]
    if kind != "dirichlet":
        raise ValueError(f"partition: unknown kind {kind!r} (known: iid, dirichlet)")
    classes = [attribute_value(example.mr, by) or "none" for example in examples]
    clients: list[list[int]] = [[] for _ in range(n_clients)]
    for value in sorted(set(classes)):
        members = rng.permutation([i for i, c in enumerate(classes) if c == value])
        cuts = (np.cumsum(rng.dirichlet([alpha] * n_clients))[:-1] * len(members)).astype(int)
        for client, part in zip(clients, np.split(members, cuts)):
            client.extend(part.tolist())
    for client in clients:
        if not client:
            client.append(max(clients, key=len).pop())
    return [np.sort(np.array(client, dtype=np.int64)) for client in clients]


def load_test_set(name: str, directory: str | None, n_mrs: int, seed: int) -> list[tuple[str, list[str]]]:
    """(MR, all its references) for generation scoring: E2E's test set, or synthetic MRs with three references each."""
    if n_mrs == 0:
        return []
    if name == "e2e":
        grouped: dict[str, list[str]] = {}
        for example in load_e2e(e2e_dir(directory))["test"]:
            grouped.setdefault(example.mr, []).append(example.ref)
        mrs = sorted(grouped)
        random.Random(f"{seed}-test").shuffle(mrs)
        return [(mr, grouped[mr]) for mr in mrs[:n_mrs]]
    rng = random.Random(f"{seed}-test")
    test = []
    for _ in range(n_mrs):
        example = _synthetic_example(rng)
        attributes = {key.strip(): value for key, value in ATTRIBUTE.findall(example.mr)}
        test.append((example.mr, [example.ref] + [_synthetic_reference(attributes, rng) for _ in range(2)]))
    return test
