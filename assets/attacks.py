"""Evasion and extraction attacks on a model version, run before promotion as evidence of its robustness and
cybersecurity (EU AI Act Art. 15; NIST AI RMF Measure 2.7), with the adversarial-robustness-toolbox (ART).

Both attacks are black-box: they see the version's decisions on its own input representation (the matrix
`assets.features.transform` makes: standardized numeric values with missing indicators, one-hot categories,
text embeddings), never its weights or gradients, and they spend a bounded number of queries.

- **Evasion** (`evasion`): ART's HopSkipJump, a decision-based attack, looks for the smallest change (L-inf)
  of an applicant's *numeric* inputs that flips the decision, within `queries` model calls per applicant. Only
  numeric values are perturbed, and only where the applicant gave one: they are what a person can shade a
  little (income, amount, ratio), while a one-hot category or a text embedding moved by a small amount is not
  an input anyone can send. A row counts as evaded when some query within the budget got the other decision
  from an input no further than `epsilon` standard deviations (the train split's) from the applicant on every
  numeric input. The success rate is the share of sampled test applicants evaded. Whole-number inputs (counts,
  a term of 36 or 60 months) are shaded like any other, which overstates what an applicant can do: the
  figure errs on the side of fragility.
- **Extraction** (`extraction`): ART's KnockoffNets (random strategy) sends `queries` synthetic applicants,
  each feature drawn independently from the training split's marginal (what a public summary of the
  population allows), reads the decisions, and trains a small network on them. The agreement is the share of
  the real test applicants on which that copy decides as the version does, at the operating threshold.

Both are lower bounds on what a determined attacker does (the server also answers with probabilities, and an
attacker may hold real applications); they exist to catch a version that is far easier to fool or to copy than
its predecessors. The gate's limits are in the spec (`compliance.max_evasion_success`,
`compliance.max_extraction_agreement`). Plain functions; ART, torch and scikit-learn are imported inside them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeAlias

from assets.evidence import Evasion, Extraction
from core.lazy import np

Scorer: TypeAlias = "Callable[[np.ndarray], np.ndarray]"  # representation rows -> P(positive)

# How HopSkipJump spends a row's budget: few random starts and small gradient estimates, many iterations.
HSJ_SETTINGS = {"max_eval": 50, "init_eval": 10, "init_size": 50, "max_iter": 200}
EXTRACTION_CURVE = (100, 300, 1000, 3000)


class QueryBudgetSpent(Exception):
    """The attack used the queries it was allowed for this row."""


@dataclass(frozen=True)
class AttackSurface:
    """What the attacks see of one version: its scores on its input representation, and where the inputs are."""

    score: Scorer
    threshold: float
    x_train: np.ndarray
    x_test: np.ndarray
    numeric: dict[str, tuple[int, int]]          # numeric input -> (value column, missing-indicator column)
    blocks: list[tuple[int, int]]                # column range of every raw input, in matrix order

    def decide(self, x: np.ndarray) -> np.ndarray:
        return (self.score(np.asarray(x, dtype=np.float32)) >= self.threshold).astype(np.int64)

    def class_scores(self, x: np.ndarray) -> np.ndarray:
        """Two columns whose argmax is the decision at the operating threshold (what ART classifiers return)."""
        p = self.score(np.asarray(x, dtype=np.float32))
        return np.stack([np.full(len(p), self.threshold), p], axis=1)


def surface_blocks(prep: dict[str, Any]) -> tuple[dict[str, tuple[int, int]], list[tuple[int, int]]]:
    """Numeric inputs' columns and every raw input's column range in the matrix `transform(frame, prep)` makes."""
    from assets.features import ordered_items

    numeric: dict[str, tuple[int, int]] = {}
    blocks: list[tuple[int, int]] = []
    start = 0
    for col, _ in ordered_items(prep, "numeric"):
        numeric[col] = (start, start + 1)
        blocks.append((start, start + 2))
        start += 2
    for _, st in ordered_items(prep, "categorical"):
        blocks.append((start, start + len(st["categories"]) + 1))
        start += len(st["categories"]) + 1
    for _, st in ordered_items(prep, "embeddings"):
        blocks.append((start, start + int(st["dim"])))
        start += int(st["dim"])
    return numeric, blocks


def net_scorer(net: Any) -> Scorer:
    """P(positive) of a torch network on representation rows (the version's own network, used as a black box).

    The attacks ask thousands of tiny questions: run them under `one_torch_thread()`, where each is answered in
    microseconds; torch's default thread pool spends milliseconds waking up (50 times slower on a busy two-core
    machine).
    """
    import torch

    def score(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch.sigmoid(net(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).squeeze(-1)
                                 ).double().numpy().reshape(-1)
    return score


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread while the attacks run (see net_scorer); the caller's setting comes back after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _RowQueries:
    """Counts one row's queries, stops the attack at the budget, and remembers the closest flip it saw."""

    def __init__(self, surface: AttackSurface, columns: list[int], budget: int):
        self.surface, self.columns, self.budget = surface, columns, budget
        self.start(np.zeros(surface.x_test.shape[1], dtype=np.float32), 0)

    def start(self, x: np.ndarray, decision: int) -> None:
        self.x, self.decision, self.used, self.closest = x, decision, 0, np.inf

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.float32).reshape(-1, self.x.shape[0])
        room = self.budget - self.used
        if room <= 0:
            raise QueryBudgetSpent
        seen = batch[:room]
        self.used += len(seen)
        scores = self.surface.class_scores(seen)
        flipped = np.argmax(scores, axis=1) != self.decision
        if flipped.any() and self.columns:
            distance = np.abs(seen[flipped][:, self.columns] - self.x[self.columns]).max(axis=1)
            self.closest = min(self.closest, float(distance.min()))
        if len(seen) < len(batch):
            raise QueryBudgetSpent
        return scores


def evasion(surface: AttackSurface, rows: int, epsilon: float, queries: int, seed: int = 0) -> Evasion | None:
    """HopSkipJump on up to `rows` test applicants, `queries` model calls each; None without numeric inputs."""
    from art.attacks.evasion import HopSkipJump
    from art.estimators.classification import BlackBoxClassifier

    if not surface.numeric or not len(surface.x_test):
        return None
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(surface.x_test), size=min(rows, len(surface.x_test)), replace=False)
    x = surface.x_test[pick].astype(np.float32)
    values = [v for v, _ in surface.numeric.values()]
    # Within the range the training data spans, widened by the attack's own reach.
    lo = np.minimum(surface.x_train.min(axis=0), x.min(axis=0)).astype(np.float32)
    hi = np.maximum(surface.x_train.max(axis=0), x.max(axis=0)).astype(np.float32)
    lo[values] -= epsilon
    hi[values] += epsilon
    hi = np.maximum(hi, lo + 1e-3)  # ART wants min < max on every column, constant ones included
    log = _RowQueries(surface, values, queries)
    classifier = BlackBoxClassifier(predict_fn=log, input_shape=(x.shape[1],), nb_classes=2, clip_values=(lo, hi))
    decisions = surface.decide(x)
    used, closest = [], []
    state = np.random.get_state()
    np.random.seed(seed)  # HopSkipJump draws from numpy's global generator; put it back afterwards
    try:
        for i in range(len(x)):
            mask = np.zeros((1, x.shape[1]), dtype=np.float32)
            for value, missing in surface.numeric.values():
                mask[0, value] = 0.0 if x[i, missing] > 0.5 else 1.0  # a missing value cannot be shaded
            log.start(x[i], int(decisions[i]))
            if mask.any():
                attack = HopSkipJump(classifier=classifier, targeted=False, norm=np.inf, verbose=False,
                                     **HSJ_SETTINGS)
                try:
                    attack.generate(x=x[i:i + 1].copy(), mask=mask)
                except QueryBudgetSpent:
                    pass
            used.append(log.used)
            closest.append(log.closest)
    finally:
        np.random.set_state(state)
    closest_arr = np.asarray(closest)
    found = closest_arr[np.isfinite(closest_arr)]
    return Evasion(attack="HopSkipJump (ART), decision-based, L-inf over numeric inputs", rows=len(x),
                   epsilon=epsilon, query_budget=queries, mean_queries=float(np.mean(used)),
                   success_rate=float(np.mean(closest_arr <= epsilon)),
                   median_flip_distance=float(np.median(found)) if len(found) else None,
                   features=list(surface.numeric), seconds=round(time.perf_counter() - t0, 2))


def marginal_queries(x_train: np.ndarray, blocks: list[tuple[int, int]], n: int, seed: int) -> np.ndarray:
    """`n` synthetic applicants: each raw input (a column block) taken from an independently drawn train row."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, x_train.shape[1]), dtype=np.float32)
    for lo, hi in blocks:
        out[:, lo:hi] = x_train[rng.integers(0, len(x_train), size=n), lo:hi]
    return out


def _copy(surface: AttackSurface, pool: np.ndarray, n: int, seed: int) -> np.ndarray:
    """KnockoffNets with `n` queries from `pool`; the copy's decisions on the test applicants."""
    import torch
    from art.attacks.extraction import KnockoffNets
    from art.estimators.classification import BlackBoxClassifier, PyTorchClassifier

    d = pool.shape[1]
    victim = BlackBoxClassifier(predict_fn=surface.class_scores, input_shape=(d,), nb_classes=2)
    state = np.random.get_state()
    np.random.seed(seed)  # KnockoffNets picks its queries with numpy's global generator
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = torch.nn.Sequential(torch.nn.Linear(d, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
            thief = PyTorchClassifier(model=net, loss=torch.nn.CrossEntropyLoss(),
                                      optimizer=torch.optim.Adam(net.parameters(), lr=3e-3), input_shape=(d,),
                                      nb_classes=2)
            epochs = int(np.clip(6000 // max(n, 1), 5, 60))  # about the same number of optimizer steps for any n
            stolen = KnockoffNets(classifier=victim, batch_size_fit=64, batch_size_query=4096, nb_epochs=epochs,
                                  nb_stolen=n, sampling_strategy="random", verbose=False
                                  ).extract(x=pool[:n], thieved_classifier=thief)
            return np.argmax(stolen.predict(surface.x_test.astype(np.float32), batch_size=4096), axis=1)
    finally:
        np.random.set_state(state)


def _boosted_copy(surface: AttackSurface, pool: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The same queries and answers fitted by gradient-boosted trees: a thief's second tool, which finds a
    decision that hangs on one input where a small network spread over hundreds of inputs may not."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    answers = surface.decide(pool[:n])
    if len(np.unique(answers)) < 2:
        return np.full(len(surface.x_test), answers[0] if len(answers) else 0)
    model = HistGradientBoostingClassifier(max_iter=100, random_state=seed).fit(pool[:n], answers)
    return model.predict(surface.x_test).astype(np.int64)


SURROGATES = {"KnockoffNets MLP (32 hidden units)": _copy, "gradient-boosted trees": _boosted_copy}


def extraction(surface: AttackSurface, queries: int, seed: int = 0) -> Extraction | None:
    """The agreement the better of two copies reaches on the test applicants after `queries` queries (and on the
    way there: the curve)."""
    if not len(surface.x_test) or not len(surface.x_train):
        return None
    t0 = time.perf_counter()
    pool = marginal_queries(surface.x_train, surface.blocks, queries, seed)
    truth = surface.decide(surface.x_test)
    curve: dict[str, float] = {}
    best_name, copied = "", truth
    for n in sorted({*(q for q in EXTRACTION_CURVE if q < queries), queries}):
        scored = {name: fit(surface, pool, n, seed) for name, fit in SURROGATES.items()}
        best_name = max(scored, key=lambda name: kappa(truth, scored[name]))
        copied = scored[best_name]
        curve[str(n)] = kappa(truth, copied)
    return Extraction(attack="KnockoffNets (ART), random queries from the training marginals, decisions only",
                      surrogate=best_name, queries=queries, agreement=curve[str(queries)],
                      raw_agreement=float(np.mean(copied == truth)),
                      majority_agreement=float(max(truth.mean(), 1 - truth.mean())), curve=curve,
                      seconds=round(time.perf_counter() - t0, 2))


def kappa(truth: np.ndarray, copied: np.ndarray) -> float:
    """Cohen's kappa of two decision vectors: their agreement beyond what their decision rates give by chance.

    Raw agreement flatters a copy of a model that flags few applicants (answering "no" to all agrees 95% with a
    model that flags 5%); kappa is 0 for such a copy and 1 for a perfect one. Two identical vectors score 1,
    constant ones included (a constant model is copied by one query).
    """
    truth, copied = np.asarray(truth).astype(int), np.asarray(copied).astype(int)
    observed = float(np.mean(truth == copied))
    if observed == 1.0:
        return 1.0
    p, q = truth.mean(), copied.mean()
    chance = float(p * q + (1 - p) * (1 - q))
    return float((observed - chance) / (1 - chance))


def surface_for(python_model: Any, feature_frame: Any, threshold: float,
                matrices: dict[str, np.ndarray] | None = None) -> AttackSurface:
    """The attack surface of a loaded version: its network and preprocessing (workloads/model_code.py's
    TabularMLPModel: `net`, `preprocessing`) over the train and test rows of `feature_frame`
    (assets.features.build_feature_frame), in the version's own input representation; `matrices` (train and test,
    already prepared with that preprocessing: assets/evaluation.py's split_features) are used as they are."""
    from assets.features import SPLIT, transform

    prep = python_model.preprocessing
    numeric, blocks = surface_blocks(prep)
    if matrices is not None:
        x_train, x_test = matrices["train"], matrices["test"]
    else:
        train, test = feature_frame[feature_frame[SPLIT] == "train"], feature_frame[feature_frame[SPLIT] == "test"]
        x_train, x_test = transform(train, prep), transform(test, prep)
    return AttackSurface(score=net_scorer(python_model.net), threshold=float(threshold), x_train=x_train,
                         x_test=x_test, numeric=numeric, blocks=blocks)


def attack_evidence(surface: AttackSurface, compliance: Any, seed: int = 0) -> dict[str, Any]:
    """Both attacks with the spec's budgets (`compliance` is the spec's Compliance section), as the fields of
    assets.evidence.Robustness they fill; an attack that cannot run leaves its field empty and says why."""
    out: dict[str, Any] = {"evasion": None, "extraction": None, "attack_error": None}
    errors = []
    with one_torch_thread():
        try:
            out["evasion"] = evasion(surface, compliance.evasion_rows, compliance.evasion_epsilon,
                                     compliance.evasion_queries, seed)
        except Exception as exc:  # the gate reports it: no evidence is a failed gate, never a crash
            errors.append(f"evasion: {type(exc).__name__}: {exc}")
        try:
            out["extraction"] = extraction(surface, compliance.extraction_queries, seed)
        except Exception as exc:
            errors.append(f"extraction: {type(exc).__name__}: {exc}")
    out["attack_error"] = "; ".join(errors)[:1000] or None
    return out
