"""Expertise: AP / AUROC against sklearn, statistics against numpy, streaming, validation."""

from __future__ import annotations

import os

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from steer_experts import expertise
from steer_experts.concepts import ConceptRows
from steer_experts.errors import InvalidArgumentError
from steer_experts.expertise import Expertise, compute_expertise

# Every exactness test runs on both scoring paths: the compiled CPU kernel (device None) and torch on a device.
# Each exactness test runs on both CPU kernels (forced, whichever _walk_is_cheaper would pick) and on torch.
DEVICES = pytest.mark.parametrize("device", ["walk", "merge", "torch"], indirect=True)


@pytest.fixture
def device(request, monkeypatch):
    """The device argument for compute_expertise: None with the CPU kernel named by the parameter forced,
    or "cpu" for torch."""
    if request.param == "torch":
        return "cpu"
    monkeypatch.setattr(expertise, "_walk_is_cheaper", lambda *counts: request.param == "walk")
    return None


class ColumnStream:
    """Serves columns of an array one block at a time and records what was asked."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape = array.shape
        self.requests: list[tuple[int, int]] = []

    def columns(self, start: int, stop: int) -> np.ndarray:
        self.requests.append((start, stop))
        return self.array[:, start:stop].copy()


def tied_responses(rng: np.random.Generator, n: int, u: int) -> np.ndarray:
    """Responses with heavy ties: small integers, ReLU zeros, constant and all-tied columns."""
    x = rng.integers(0, 4, size=(n, u)).astype(np.float32)
    x[:, 1] = 0.0  # all tied at zero
    x[:, 2] = 5.0  # all tied, nonzero
    x[:, 3] = rng.standard_normal(n).astype(np.float32)  # continuous, no ties
    x[:, 4] = np.maximum(rng.standard_normal(n), 0).astype(np.float16)  # ReLU-like, float16 ties
    x[:, 5] = -rng.integers(0, 3, size=n)  # negative integers
    x[:, 6] = np.where(rng.random(n) < 0.5, -0.0, 0.0)  # signed zeros tie in sklearn
    x[::7, 6] = 1.0
    x[:, 7] = rng.choice([-1e30, -2.5, 3.25, 1e30], size=n)  # wide range
    return x


def mixed_concepts(rng: np.random.Generator, n: int) -> ConceptRows:
    """Concepts with overlapping index sets, complement and subset negatives, and tiny sizes."""
    everyone = np.arange(n)
    shuffled = rng.permutation(n)

    def rest(pos):
        return np.setdiff1d(everyone, pos)

    pos_a = np.arange(0, 30)
    pos_b = np.arange(20, 50)  # overlaps a
    pos_c = shuffled[:25]  # unsorted indices
    pos_d = np.array([70])
    pos_e = np.arange(50, 70)
    pos_f = shuffled[40:43]
    return ConceptRows(
        names=[
            "a_rest",
            "b_rest_overlap",
            "c_listed_unsorted",
            "d_one_positive",
            "e_listed_subset",
            "f_one_negative",
            "g_one_each",
        ],
        positives=[pos_a, pos_b, pos_c, pos_d, pos_e, pos_f, np.array([5])],
        negatives=[
            rest(pos_a),
            rest(pos_b),
            np.setdiff1d(shuffled[25:90], pos_c)[::-1],  # listed, reversed order
            rest(pos_d),
            np.arange(0, 40),  # listed, overlapping other concepts' positives
            np.array([shuffled[50]]),
            np.array([6]),
        ],
    )


def sklearn_reference(x: np.ndarray, concepts: ConceptRows) -> dict[str, np.ndarray]:
    """Per unit and concept: sklearn AP / AUROC and numpy statistics."""
    c_count, u_count = len(concepts.names), x.shape[1]
    ref = {s: np.empty((c_count, u_count)) for s in Expertise.STATS}
    for c in range(c_count):
        pos, neg = concepts.positive_indices(c), concepts.negative_indices(c)
        y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
        for u in range(u_count):
            score = np.r_[x[pos, u], x[neg, u]]
            ref["ap"][c, u] = average_precision_score(y, score)
            ref["auroc"][c, u] = roc_auc_score(y, score)
        ref["on_p50"][c] = np.median(x[pos], axis=0)
        ref["on_p90"][c] = np.percentile(x[pos], 90, axis=0)
        # float64 means: numpy's float32 accumulation loses e.g. -1e30 + 1e30 + 0.5.
        ref["on_mean"][c] = np.mean(x[pos].astype(np.float64), axis=0)
        ref["off_mean"][c] = np.mean(x[neg].astype(np.float64), axis=0)
    return ref


@pytest.fixture(scope="module")
def tied_case():
    rng = np.random.default_rng(7)
    n, u = 150, 40
    x = tied_responses(rng, n, u)
    concepts = mixed_concepts(rng, n)
    return x, concepts, sklearn_reference(x, concepts)


@DEVICES
def test_ap_and_auroc_equal_sklearn_with_heavy_ties(tied_case, device):
    x, concepts, ref = tied_case
    got = compute_expertise(x, concepts, device=device, progress=False)
    assert got.ap.dtype == np.float64 and got.auroc.dtype == np.float64
    assert got.ap.shape == (len(concepts.names), x.shape[1])
    np.testing.assert_allclose(got.ap, ref["ap"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.auroc, ref["auroc"], rtol=0, atol=1e-12)


@DEVICES
def test_statistics_equal_numpy(tied_case, device):
    x, concepts, ref = tied_case
    got = compute_expertise(x, concepts, device=device, progress=False)
    for name in ("on_p50", "on_p90"):
        assert getattr(got, name).dtype == np.float32
        np.testing.assert_array_equal(getattr(got, name), ref[name].astype(np.float32), err_msg=name)
    # Means of values up to 1e30 carry float64 rounding of that size.
    scale = 1e-6 * (1.0 + np.abs(x).max(axis=0))
    for name in ("on_mean", "off_mean"):
        assert getattr(got, name).dtype == np.float32
        error = np.abs(getattr(got, name) - ref[name])
        assert (error <= scale).all(), (name, error.max())
    np.testing.assert_array_equal(got.n_positives, [len(p) for p in concepts.positives])
    np.testing.assert_array_equal(got.n_negatives, [len(n) for n in concepts.negatives])


@DEVICES
def test_percentiles_match_numpy_bit_for_bit_on_continuous_data(device):
    rng = np.random.default_rng(3)
    n, u = 300, 24
    x = (rng.standard_normal((n, u)) * rng.choice([1e-3, 1.0, 1e3], size=u)).astype(np.float32)
    sizes = [*range(1, 26), 122, 140, 250]
    positives = [rng.choice(n, size=k, replace=False) for k in sizes]
    negatives = [np.setdiff1d(np.arange(n), p)[: 40 if i % 2 else None] for i, p in enumerate(positives)]
    got = compute_expertise(x, ConceptRows([f"size{k}" for k in sizes], positives, negatives), device=device, progress=False)
    for c, pos in enumerate(positives):
        np.testing.assert_array_equal(got.on_p50[c], np.median(x[pos], axis=0))
        np.testing.assert_array_equal(got.on_p90[c], np.percentile(x[pos], 90, axis=0))


@DEVICES
def test_single_concept_with_constant_units_equals_sklearn(monkeypatch, device):
    # Units next to each other whose keys coincide must not merge ties across units.
    monkeypatch.setattr(expertise, "_CHUNK_ELEMENTS", 100)
    rng = np.random.default_rng(5)
    n = 30
    x = np.repeat(rng.integers(0, 2, size=(n, 1)), 6, axis=1).astype(np.float32)
    x[:, 2:4] = 1.0
    concepts = ConceptRows(["only"], [np.arange(0, 12)], [np.arange(12, n)])
    ref = sklearn_reference(x, concepts)
    got = compute_expertise(x, concepts, device=device, progress=False)
    np.testing.assert_allclose(got.ap, ref["ap"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.auroc, ref["auroc"], rtol=0, atol=1e-12)


@DEVICES
def test_relu_like_float16_responses_many_units_equal_sklearn(monkeypatch, device):
    # Many chunks per block and several tie-heavy distributions at once.
    monkeypatch.setattr(expertise, "_CHUNK_ELEMENTS", 4000)
    rng = np.random.default_rng(11)
    n, u = 400, 60
    x = np.maximum(rng.standard_normal((n, u)) - 0.3, 0).astype(np.float16).astype(np.float32)
    x[:, ::5] += rng.integers(0, 2, size=(n, 1))  # shared shift: informative units
    parts = np.array_split(rng.permutation(n), 4)
    listed = [np.setdiff1d(np.arange(n), p)[::3] for p in parts]
    concepts = ConceptRows(
        names=[f"rest{i}" for i in range(4)] + [f"listed{i}" for i in range(4)],
        positives=parts + parts,
        negatives=[np.setdiff1d(np.arange(n), p) for p in parts] + listed,
    )
    ref = sklearn_reference(x, concepts)
    got = compute_expertise(x, concepts, block_units=17, device=device, progress=False)
    np.testing.assert_allclose(got.ap, ref["ap"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.auroc, ref["auroc"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.on_p90, ref["on_p90"], rtol=1e-6, atol=1e-6)


def test_stream_and_block_size_give_identical_results(tied_case, monkeypatch):
    x, concepts, _ = tied_case
    whole = compute_expertise(x, concepts, progress=False)
    monkeypatch.setattr(expertise, "_CHUNK_ELEMENTS", 1000)
    for block in (1, 3, 7, 40, 4096):
        stream = ColumnStream(x)
        got = compute_expertise(stream, concepts, block_units=block, progress=False)
        expected = [(s, min(s + block, x.shape[1])) for s in range(0, x.shape[1], block)]
        assert sorted(stream.requests) == expected
        for name in Expertise.STATS:
            assert np.array_equal(getattr(got, name), getattr(whole, name)), (block, name)


def test_zero_positives_or_negatives_is_an_error_naming_the_concept():
    x = np.zeros((10, 3), np.float32)
    empty = np.array([], np.int64)
    no_pos = ConceptRows(["fine", "empty_pos"], [np.array([0]), empty], [np.array([1]), np.array([2])])
    with pytest.raises(ValueError, match="empty_pos.*no positive"):
        compute_expertise(x, no_pos, progress=False)
    no_neg = ConceptRows(["empty_neg"], [np.array([0])], [empty])
    with pytest.raises(ValueError, match="empty_neg.*no negative"):
        compute_expertise(x, no_neg, progress=False)


def test_nan_responses_are_an_error():
    x = np.zeros((10, 6), np.float32)
    x[3, 4] = np.nan
    concepts = ConceptRows(["c"], [np.array([0, 1])], [np.array([2, 3, 4])])
    with pytest.raises(ValueError, match="NaN.*unit 4"):
        compute_expertise(x, concepts, block_units=2, progress=False)


def test_responses_that_are_not_2d_are_an_error():
    concepts = ConceptRows(["c"], [np.array([0])], [np.array([1])])
    with pytest.raises(ValueError, match="2-D"):
        compute_expertise(np.zeros(10, np.float32), concepts, progress=False)


@pytest.mark.parametrize(
    "positives, negatives, message",
    [
        ([0, 10], [1], r"\[0, 10\)"),
        ([0, 1], [1, 2], "both positive and negative"),
        ([0, 0], [1], "duplicates"),
        ([[0, 1]], [2], "1-D integer"),
    ],
)
def test_bad_indices_are_errors(positives, negatives, message):
    x = np.zeros((10, 2), np.float32)
    concepts = ConceptRows(["c"], [np.array(positives)], [np.array(negatives)])
    with pytest.raises(ValueError, match=message):
        compute_expertise(x, concepts, progress=False)


def test_repeated_concept_names_are_an_error():
    x = np.zeros((4, 2), np.float32)
    concepts = ConceptRows(["c", "c"], [np.array([0])] * 2, [np.array([1])] * 2)
    with pytest.raises(ValueError, match="unique"):
        compute_expertise(x, concepts, progress=False)


def test_index_and_subset(tied_case):
    x, concepts, _ = tied_case
    got = compute_expertise(x, concepts, progress=False)
    assert got.index("e_listed_subset") == 4
    with pytest.raises(KeyError, match="unknown concept 'nope'.*a_rest"):
        got.index("nope")
    part = got.subset(["e_listed_subset", "a_rest"])
    assert part.concepts == ["e_listed_subset", "a_rest"]
    for name in Expertise.STATS:
        np.testing.assert_array_equal(getattr(part, name), getattr(got, name)[[4, 0]])
    np.testing.assert_array_equal(part.n_positives, got.n_positives[[4, 0]])
    np.testing.assert_array_equal(part.n_negatives, got.n_negatives[[4, 0]])


# ----------------------------------------------------------------------------- what a bad input is told


class _Columns:
    """A response source read by columns, as compute_expertise accepts one (it may live on disk)."""

    def __init__(self, shape, columns):
        self.shape, self._columns = shape, columns

    def columns(self, start, stop):
        return self._columns(start, stop)


def _two_concepts(n_rows):
    return ConceptRows(["football", "woman"], [np.arange(0, 4), np.arange(4, 8)],
                       [np.arange(4, n_rows), np.r_[np.arange(0, 4), np.arange(8, n_rows)]])


def test_nan_responses_name_the_units_that_hold_them():
    """NaN in units 12 and 14 of a block read from unit 10 on: both counted, the first named by its
    index in the whole matrix (not in its block), and the whole message is as documented."""
    responses = np.random.default_rng(0).normal(size=(20, 30)).astype(np.float32)
    responses[3, 12] = responses[17, 14] = np.nan
    with pytest.raises(ValueError) as err:
        compute_expertise(responses, _two_concepts(20), block_units=10, progress=False)
    assert str(err.value) == ("responses contain NaN in 2 units, e.g. unit 12; "
                              "recompute or drop those units before scoring expertise")


def test_a_column_source_of_the_wrong_shape_is_named():
    """A response source whose columns(start, stop) returns too few units is refused with both shapes."""
    source = _Columns((20, 30), lambda start, stop: np.zeros((20, max(stop - start - 1, 0)), np.float32))
    with pytest.raises(ValueError) as err:
        compute_expertise(source, _two_concepts(20), block_units=8, progress=False)
    assert str(err.value) == "responses.columns(0, 8) returned shape (20, 7), expected (20, 8)"


def test_unknown_concept_lists_the_known_ones():
    found = compute_expertise(np.random.default_rng(0).normal(size=(12, 3)), _two_concepts(12), progress=False)
    with pytest.raises(KeyError) as err:
        found.index("basketball")
    assert err.value.args[0] == "unknown concept 'basketball'; known concepts: football, woman"


# ----------------------------------------------------------------------------- arguments, blocks, processes, numeric limits


def test_wrong_arguments_are_refused_with_the_documented_messages():
    """Each refusal of compute_expertise's arguments, whole: a block size or thread count below 1, no concepts, repeated
    names (listed once each, sorted, names seen once left out)."""
    x = np.zeros((8, 2), np.float32)
    one = ConceptRows(["c"], [np.array([0])], [np.array([1])])
    cases = [
        (dict(responses=x, concepts=one, block_units=0), "block_units must be >= 1, got 0"),
        (dict(responses=x, concepts=one, threads=0), "threads must be >= 1 (or None for one per usable CPU), got 0"),
        (dict(responses=x, concepts=ConceptRows([], [], [])),
         "no concepts given; expertise needs at least one concept"),
        (dict(responses=x, concepts=ConceptRows(["b", "a", "b", "c", "a", "a"], [np.array([0])] * 6,
                                                [np.array([1])] * 6)),
         "concept names must be unique; repeated: ['a', 'b']"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as err:
            compute_expertise(**kwargs, progress=False)
        assert str(err.value) == message


def test_a_later_block_of_the_wrong_shape_is_named_with_its_own_range():
    """A column source that serves the first block right and the second one unit short: the message names
    the second block's range and the shape it should have had."""
    def columns(start, stop):
        return np.zeros((20, stop - start - (start > 0)), np.float32)
    with pytest.raises(ValueError) as err:
        compute_expertise(_Columns((20, 30), columns), _two_concepts(20), block_units=8, progress=False)
    assert str(err.value) == "responses.columns(8, 16) returned shape (20, 7), expected (20, 8)"


def test_object_arrays_of_numbers_are_scored_as_float32():
    """Responses handed over as a Python-object array (as pandas gives for a mixed frame) are read as
    float32, like any other array of numbers: the same result as the float32 array."""
    x = np.random.default_rng(2).normal(size=(12, 3)).astype(np.float32)
    want = compute_expertise(x, _two_concepts(12), progress=False)
    got = compute_expertise(x.astype(object), _two_concepts(12), progress=False)
    for name in Expertise.STATS:
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


def test_default_blocks_are_2048_units():
    """Without block_units, a column source is read 2048 units at a time."""
    stream = ColumnStream(np.arange(3 * 2049, dtype=np.float32).reshape(3, 2049) % 5)
    compute_expertise(stream, ConceptRows(["c"], [np.array([0])], [np.array([1, 2])]), progress=False)
    assert stream.requests == [(0, 2048), (2048, 2049)]


def test_progress_bar_is_shown_by_default_and_only_then(capsys):
    """By default the lead process shows one "expertise" bar counting units up to the total, also when
    the units come in several blocks; progress=False shows nothing."""
    x = np.random.default_rng(4).normal(size=(10, 3)).astype(np.float32)
    concepts = ConceptRows(["c"], [np.arange(4)], [np.arange(4, 10)])
    compute_expertise(x, concepts, block_units=1)
    shown = capsys.readouterr().err
    final = shown.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("expertise: 100%|") and "| 3/3 [" in final and final.endswith("unit/s]"), shown
    compute_expertise(x, concepts, block_units=1, progress=False)
    assert capsys.readouterr().err == ""


class _SecondOfTwo:
    """Rank 1 of a two-process team whose rank 0 scored ``first`` (one array per statistic, in
    Expertise.STATS order); records what this process hands to gather."""

    rank, size, lead = 1, 2, False

    def __init__(self, first):
        self.first, self.handed = first, []

    def gather(self, array):
        self.handed.append(array)
        return [self.first[len(self.handed) - 1], array]


def test_a_second_process_scores_its_half_and_gathers_the_whole(monkeypatch, capsys):
    """Rank 1 of 2 scores only units U // 2 onwards, hands each statistic to gather once, joins the
    gathered parts along the units into the whole result, and shows no bar (only the lead does)."""
    x = tied_responses(np.random.default_rng(8), 150, 9)
    concepts = mixed_concepts(np.random.default_rng(8), 150)
    whole = compute_expertise(x, concepts, progress=False)
    other = _SecondOfTwo([getattr(whole, name)[:, :4] for name in Expertise.STATS])
    monkeypatch.setattr(expertise, "team", lambda: other)
    got = compute_expertise(x, concepts)
    assert capsys.readouterr().err == ""
    assert len(other.handed) == len(Expertise.STATS)
    for name, handed in zip(Expertise.STATS, other.handed):
        np.testing.assert_array_equal(handed, getattr(whole, name)[:, 4:], err_msg=name)
        assert getattr(got, name).shape == getattr(whole, name).shape, name
        np.testing.assert_array_equal(getattr(got, name), getattr(whole, name), err_msg=name)


def test_scoring_threads_are_one_per_usable_cpu_unless_given(monkeypatch):
    """The scoring pool has one thread per CPU this process may run on (its affinity), else one per CPU
    (os.cpu_count()), else one; ``threads`` sets it. (One more thread reads the next block.)"""
    from concurrent.futures import ThreadPoolExecutor

    sizes = []

    class Recording(ThreadPoolExecutor):
        def __init__(self, max_workers=None, thread_name_prefix="", **kwargs):
            if thread_name_prefix == "expertise-scoring":
                sizes.append(max_workers)
            super().__init__(max_workers, thread_name_prefix, **kwargs)

    monkeypatch.setattr(expertise, "ThreadPoolExecutor", Recording)
    x = np.random.default_rng(6).normal(size=(10, 2)).astype(np.float32)
    concepts = ConceptRows(["c"], [np.arange(4)], [np.arange(4, 10)])
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 3, 5, 6}, raising=False)
    compute_expertise(x, concepts, progress=False)
    monkeypatch.delattr(os, "sched_getaffinity")
    compute_expertise(x, concepts, progress=False)
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    compute_expertise(x, concepts, progress=False)
    compute_expertise(x, concepts, threads=3, progress=False)
    compute_expertise(x, concepts, threads=1, progress=False)
    assert sizes == [5, 7, 1, 3, 1]


def test_chunks_hold_the_units_that_fit_the_cache_budget_each_scored_once(monkeypatch):
    """Inside a block, units are scored in chunks of _CHUNK_ELEMENTS // (what one unit holds: its N
    responses, its concepts' positives and listed negatives) units (at least one), each unit exactly
    once; the result does not depend on the chunking."""
    widths = []
    score_units = expertise._score_units

    def recording(columns, plan):
        widths.append(columns.shape[1])
        return score_units(columns, plan)

    x = np.random.default_rng(9).integers(0, 3, size=(20, 7)).astype(np.float32)
    concepts = ConceptRows(["rest"], [np.arange(5)], [np.arange(5, 20)])
    whole = compute_expertise(x, concepts, progress=False)
    monkeypatch.setattr(expertise, "_score_units", recording)
    for budget, expected in ((75, [2, 2, 3]), (74, [1, 2, 2, 2]), (1, [1] * 7)):  # 20 + 5 elements a unit
        widths.clear()
        monkeypatch.setattr(expertise, "_CHUNK_ELEMENTS", budget)
        got = compute_expertise(x, concepts, block_units=5, progress=False)
        assert sorted(widths) == expected, budget
        for name in Expertise.STATS:
            np.testing.assert_array_equal(getattr(got, name), getattr(whole, name), err_msg=name)


def test_the_plan_lists_each_concepts_rows_padded_and_no_negatives_for_a_rest_concept():
    """Each concept's positives, and the negatives of concepts that list them, padded with -1; a concept
    against all other sentences lists no negatives (its negative slot is -1)."""
    concepts = ConceptRows(["listed", "rest"], [np.array([0, 1]), np.array([2, 3, 4])],
                           [np.array([5, 6, 7, 8]), np.array([0, 1, 5, 6, 7, 8, 9])])
    plan = expertise._Plan(expertise._evaluation_sets(concepts, 10), 10)
    assert list(plan.rest_rows) == [1] and list(plan.listed_rows) == [0]
    assert plan.positive_rows.tolist() == [[0, 1, -1], [2, 3, 4]]
    assert plan.negative_rows.tolist() == [[5, 6, 7, 8]]
    assert plan.negative_slot.tolist() == [0, -1]
    assert plan.unit_elements == 10 + 6 + 4


def test_the_walk_reads_each_sentences_concepts_and_counts_rest_negatives_implicitly(monkeypatch):
    """The scoring walk finds, per sentence, the concepts it is a positive of and the listed concepts it
    is a negative of; a concept against all other sentences lists no negatives."""
    monkeypatch.setattr(expertise, "_walk_is_cheaper", lambda *counts: True)
    concepts = ConceptRows(["listed", "rest"], [np.array([0, 1]), np.array([2, 3, 4])],
                           [np.array([5, 6, 7, 8]), np.array([0, 1, 5, 6, 7, 8, 9])])
    plan = expertise._Plan(expertise._evaluation_sets(concepts, 10), 10)
    assert plan.walks and plan.unit_elements == 3 * 10

    def concepts_of(memberships):
        start, concept = memberships
        return [sorted(concept[start[s]:start[s + 1]].tolist()) for s in range(10)]

    assert concepts_of(plan.positive_of) == [[0], [0], [1], [1], [1], [], [], [], [], []]
    assert concepts_of(plan.negative_of) == [[], [], [], [], [], [0], [0], [0], [0], []]


def test_the_walk_and_the_merge_give_the_same_bits(tied_case, monkeypatch):
    """Both CPU kernels add the same float64 terms in the same order (from the highest response down),
    so which one runs never changes a bit of any statistic."""
    x, concepts, _ = tied_case
    results = {}
    for walks in (True, False):
        monkeypatch.setattr(expertise, "_walk_is_cheaper", lambda *counts, walks=walks: walks)
        results[walks] = compute_expertise(x, concepts, progress=False)
    for name in Expertise.STATS:
        assert np.array_equal(getattr(results[True], name), getattr(results[False], name)), name


@pytest.mark.parametrize("n_rows, sizes, walks", [
    (1_700, [(700, 1_000)], False),  # one concept against the rest: merged, 1.5x faster
    (5_000, [(250, 1_000)] * 20, False),  # 20 concepts of 1,250 listed rows: merged, about 2x faster
    (5_050, [(100, 1_000)] * 100, True),  # 100 concepts of 1,100 listed rows: walked, 1.6x faster
    (5_000, [(250, 4_750)] * 20, True),  # 20 concepts against the rest: about even
])
def test_the_cheaper_kernel_is_chosen_from_the_concepts_sizes(n_rows, sizes, walks):
    n_pos, n_neg = (np.array(column) for column in zip(*sizes))
    assert expertise._walk_is_cheaper(n_rows, n_pos, n_neg, n_pos + n_neg == n_rows) is walks


def test_more_sentences_than_a_walk_item_holds_are_merged(monkeypatch):
    monkeypatch.setattr(expertise, "_walk_is_cheaper", lambda *counts: True)
    concepts = ConceptRows(["far"], [np.array([0, 2**32])], [np.array([1, 2**32 + 1])])
    assert not expertise._Plan(expertise._evaluation_sets(concepts, 2**32 + 2), 2**32 + 2).walks


@DEVICES
def test_means_are_summed_in_float64(device):
    """on_mean / off_mean of positives and negatives, all other sentences or a listed subset, equal the
    float64 mean rounded to float32 bit for bit, where float32 sums would drop the small values next
    to 2**26."""
    rng = np.random.default_rng(12)
    n = 40
    x = rng.integers(1, 4, size=(n, 2)).astype(np.float32)
    x[[0, 7, 21, 30], 0] = 2.0**26
    x[[3, 25], 1] = -(2.0**26)
    concepts = ConceptRows(["rest", "listed"], [np.arange(0, 12), np.arange(20, 26)],
                           [np.arange(12, n), np.r_[np.arange(0, 5), np.arange(28, 34)]])
    got = compute_expertise(x, concepts, device=device, progress=False)
    for c in range(2):
        for name, rows in (("on_mean", concepts.positives[c]), ("off_mean", concepts.negatives[c])):
            want = np.mean(x[rows].astype(np.float64), axis=0).astype(np.float32)
            np.testing.assert_array_equal(getattr(got, name)[c], want, err_msg=(c, name))


@pytest.mark.filterwarnings("ignore:overflow encountered")
@DEVICES
def test_percentiles_near_the_float32_limit_equal_numpy(device):
    """Median and 90th percentile of positives responding near +-3e38 (where a sum of two overflows)
    equal numpy's: an odd count's median is its middle value, a single positive's percentile is that
    value."""
    x = np.array([[3e38], [3e38], [3e38], [-3e38], [0.0], [1.0]], np.float32)
    concepts = ConceptRows(["three", "one"], [np.array([0, 1, 2]), np.array([3])],
                           [np.array([3, 4, 5]), np.array([0, 1, 2, 4, 5])])
    got = compute_expertise(x, concepts, device=device, progress=False)
    for c, pos in enumerate(concepts.positives):
        np.testing.assert_array_equal(got.on_p50[c], np.median(x[pos], axis=0), err_msg=c)
        np.testing.assert_array_equal(got.on_p90[c], np.percentile(x[pos], 90, axis=0), err_msg=c)


def test_torch_scoring_in_small_chunks_equals_kernel_scoring(tied_case, monkeypatch):
    """Units scored on a device a few at a time (chunks that do not divide the block) give every
    statistic of the CPU kernel: AP within 1e-12 (float64 sums in another order), AUROC and the
    percentiles bit for bit, and each chunk is scored once."""
    x, concepts, _ = tied_case
    kernel_path = compute_expertise(x, concepts, progress=False)
    chunks = []
    score = expertise._DeviceScorer.score
    monkeypatch.setattr(expertise._DeviceScorer, "chunk_units", lambda self: 3)
    monkeypatch.setattr(expertise._DeviceScorer, "score",
                        lambda self, columns: chunks.append(columns.shape[1]) or score(self, columns))
    got = compute_expertise(x, concepts, block_units=16, device="cpu", progress=False)
    assert chunks == [3, 3, 3, 3, 3, 1] * 2 + [3, 3, 2]
    np.testing.assert_allclose(got.ap, kernel_path.ap, rtol=0, atol=1e-12)
    for name in ("auroc", "on_p50", "on_p90"):
        np.testing.assert_array_equal(getattr(got, name), getattr(kernel_path, name), err_msg=name)


def test_device_chunks_fill_a_quarter_of_free_memory_on_cpu_a_fixed_256_mib():
    rng = np.random.default_rng(0)
    n = 1000
    positives = [rng.choice(n, size=k, replace=False) for k in (10, 300)]
    listed = np.setdiff1d(np.arange(n), positives[1])[:5]
    concepts = ConceptRows(["a", "b"], positives, [np.setdiff1d(np.arange(n), positives[0]), listed])
    plan = expertise._Plan(expertise._evaluation_sets(concepts, n), n)
    scorer = expertise._DeviceScorer(plan, "cpu")
    # Per unit: 48 bytes a sentence, 80 per padded positive (2 concepts x 300), 24 per padded negative.
    assert scorer.bytes_per_unit == 48 * n + 80 * 2 * 300 + 24 * 1 * 5
    assert scorer.chunk_units() == (256 << 20) // scorer.bytes_per_unit


@pytest.mark.parametrize("device, message", [
    ("cuda:7", "CUDA"), ("tpu", "Unknown device"), ("auto", "needs one device with float64"),
])
def test_a_device_that_cannot_score_is_refused_before_scoring(tied_case, device, message):
    x, concepts, _ = tied_case
    stream = ColumnStream(x)
    with pytest.raises(InvalidArgumentError, match=message):
        compute_expertise(stream, concepts, device=device, progress=False)
    assert stream.requests == []
